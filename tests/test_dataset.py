"""Clip datasets on real and generated video: skipping bad files, fps control, crops,
buckets, determinism and worker safety."""

import json
import os
import shutil

import pytest
import torch

from pyratok.data import (BucketBatchSampler, ClipConfig, NoUsableClipError, VideoClipDataset, VideoInfo, bundled_clip_path,
                          collate_clips, read_video, resize_and_crop, write_video)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    shutil.copy(bundled_clip_path("carphone_pristine.mp4"), root / "a_carphone.mp4")   # 144x176, 120 frames
    (root / "b_corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    g = torch.Generator().manual_seed(0)
    write_video(str(root / "c_one_frame.mp4"), torch.randint(0, 255, (1, 64, 64, 3), dtype=torch.uint8, generator=g))
    portrait = torch.linspace(0, 255, 112)[None, :, None, None].expand(12, 112, 64, 3).to(torch.uint8).contiguous()
    write_video(str(root / "d_portrait.mp4"), portrait, fps=25)
    (root / "notes.txt").write_text("not a video")
    return root


def test_skips_unreadable_and_short_videos_with_counted_warnings(folder):
    ds = VideoClipDataset(str(folder), ClipConfig(num_frames=5, height=32, width=32, seed=1))
    assert len(ds) == 4
    with pytest.warns(UserWarning) as record:
        item = ds[1]                                      # corrupt, 1 frame -> falls through to the next
    assert "b_corrupt.mp4" in str(record[0].message) and "c_one_frame.mp4: 1 frames in range" in str(record[1].message)
    assert item["path"].endswith("d_portrait.mp4")
    assert ds.skipped == {"unreadable": 1, "too short": 1}
    assert ds[2]["path"].endswith("d_portrait.mp4")      # skipped again, counted, warned only once
    assert ds.skipped == {"unreadable": 1, "too short": 2}
    out = ds[0]
    assert out["video"].shape == (3, 5, 32, 32) and out["video"].dtype == torch.float32
    assert -1 <= out["video"].min() and out["video"].max() <= 1


def test_one_frame_clips_read_a_one_frame_video(folder):
    ds = VideoClipDataset(str(folder / "c_one_frame.mp4").rsplit("/", 1)[0], ClipConfig(num_frames=1, height=64, width=64))
    assert ds[2]["video"].shape == (3, 1, 64, 64)


def test_portrait_resize_and_center_crop(folder):
    ds = VideoClipDataset(str(folder), ClipConfig(num_frames=5, height=48, width=48, crop="center"))
    video = ds[3]["video"]                                # 112x64 portrait: scaled to 84x48, crop rows 18..66
    assert video.shape == (3, 5, 48, 48)
    rows = video[0, 0, :, 24]
    assert torch.all(rows[1:] >= rows[:-1] - 1e-3)        # the vertical gradient survives, in order
    assert rows[0] > -0.7 and rows[-1] < 0.7              # a centred crop, not the full range


def test_fps_control_and_center_clip_are_exact(folder):
    path = str(folder / "a_carphone.mp4")                  # 29.97 fps
    ds = VideoClipDataset(str(folder), ClipConfig(num_frames=5, height=144, width=176, fps=VideoInfo(path).fps / 3,
                                                  crop="center"))
    got = ds[0]["video"]
    frames = read_video(path)
    span = 4 * 3.0                                          # (num_frames - 1) * step
    start = (len(frames) - 1 - span) / 2
    idx = [int(round(start + 3.0 * j)) for j in range(5)]
    want = resize_and_crop(frames[idx], 144, 176, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_determinism_and_epochs(folder):
    cfg = ClipConfig(num_frames=5, height=64, width=64, seed=3)
    a, b = VideoClipDataset(str(folder), cfg), VideoClipDataset(str(folder), cfg)
    assert torch.equal(a[0]["video"], b[0]["video"])
    b.set_epoch(1)
    assert not torch.equal(a[0]["video"], b[0]["video"])


def test_worker_safe_loader_matches_single_process(folder):
    cfg = ClipConfig(num_frames=5, height=32, width=32, seed=5)
    single = [VideoClipDataset(str(folder), cfg)[i]["video"] for i in (0, 3)]
    ds = VideoClipDataset(str(folder), cfg)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [0, 3]), batch_size=2, num_workers=2,
                                         collate_fn=collate_clips)
    batch = next(iter(loader))
    assert torch.equal(batch["video"][0], single[0]) and torch.equal(batch["video"][1], single[1])


def test_manifests_with_captions_and_ranges(folder, tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"path": str(folder / "a_carphone.mp4"), "caption": "a man in a car", "start": 1.0, "end": 2.0},
        {"path": "missing.mp4", "caption": "gone"},
    ]))
    ds = VideoClipDataset(str(jsonl), ClipConfig(num_frames=9, height=32, width=32))
    assert ds[0]["caption"] == "a man in a car"
    with pytest.warns(UserWarning, match="missing.mp4"):
        assert ds[1]["caption"] == "a man in a car"
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(f"path,caption,start,end\n{folder / 'a_carphone.mp4'},hello,0,0.2\n")
    short = VideoClipDataset(str(csv_path), ClipConfig(num_frames=9, height=32, width=32))
    with pytest.raises(NoUsableClipError, match="no usable clip"), pytest.warns(UserWarning, match="too short|frames in range"):
        short[0]                                           # 0.2 s at 30 fps is 6 frames < 9


def test_buckets_group_batches_by_aspect(folder):
    cfg = ClipConfig(num_frames=5, height=64, width=64, buckets=[(64, 64), (96, 48), (48, 64)])
    ds = VideoClipDataset(str(folder), cfg)
    assert ds.bucket_of(3) == (96, 48)                     # portrait 112x64
    assert ds.bucket_of(0) == (48, 64)                     # 144x176 landscape
    assert ds[3]["video"].shape == (3, 5, 96, 48)
    batches = list(BucketBatchSampler(ds, batch_size=2))
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]
    assert all(len({ds.bucket_of(i) for i in b}) == 1 for b in batches)


def test_resize_sets_the_short_side_before_cropping():
    frames = torch.arange(144 * 176, dtype=torch.float32).reshape(1, 144, 176, 1).expand(2, 144, 176, 3)
    frames = (frames % 251).to(torch.uint8)
    covered = resize_and_crop(frames, 32, 32, None)              # short side scaled to 32
    at_native = resize_and_crop(frames, 32, 32, None, short_side=144)
    assert covered.shape == at_native.shape == (3, 2, 32, 32)
    # short side 144 = the native size: no resampling, the centre 32x32 window of the frame
    want = (frames[:, 56:88, 72:104].permute(3, 0, 1, 2).float() / 127.5 - 1)
    torch.testing.assert_close(at_native, want)
    assert not torch.allclose(covered, at_native)
    # a short side smaller than the crop still covers the crop
    assert resize_and_crop(frames, 64, 96, None, short_side=16).shape == (3, 2, 64, 96)
    with pytest.raises(ValueError, match="resize=-1"):
        ClipConfig(resize=-1)


def test_config_and_source_errors(tmp_path):
    with pytest.raises(ValueError, match=r"num_frames=16: clips have 1 \+ 4k frames"):
        ClipConfig(num_frames=16)
    with pytest.raises(ValueError, match="expected positive multiples of 8"):
        ClipConfig(height=100)
    with pytest.raises(FileNotFoundError, match="no such folder or manifest"):
        VideoClipDataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no video files"):
        VideoClipDataset(str(tmp_path / "empty"))
