"""Bad inputs a hostile or careless user tries (issue 19): each must give one clear line and
exit status 2 (or a ValueError naming the input), never a traceback, a crash, a memory bomb
or a silently wrong result.  The README's reliability table counts the cases of this file
and of tests/test_resume.py."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyratok
from pyratok import ops
from pyratok.cli import main
from pyratok.data import ClipConfig, VideoClipDataset, bundled_clip_path, read_manifest, resize_and_crop, write_video
from pyratok.io import TokenFileError, load_tokens, read_token_metadata, save_tokens
from pyratok.io.token_file import _checksum
from pyratok.models.pyratok import PyraTok, PyraTokConfig
from pyratok.models.vae import WanVAE, WanVAEConfig
from pyratok.tokens import Tokens
from pyratok.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = bundled_clip_path("carphone_pristine.mp4")


def run(*args):
    return main([str(a) for a in args])


def one_line_error(capsys, *args, match=None):
    """The command exits 2 with exactly one 'pyratok: error:' line on stderr."""
    code = run(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("pyratok: error: "), err
    if match is not None:
        assert match in err[0], err[0]
    return err[0]


@pytest.fixture(scope="module")
def small_clips(tmp_path_factory):
    """Real 9-frame clips: 32x32, 48x48 (a size decord cannot copy out) and 8x8."""
    folder = tmp_path_factory.mktemp("small")
    out = {}
    for h, w in ((32, 32), (48, 48), (8, 8)):
        g = torch.Generator().manual_seed(h)
        frames = (torch.rand(9, h, w, 3, generator=g) * 255).to(torch.uint8)
        out[h] = str(folder / f"clip{h}x{w}.mp4")
        write_video(out[h], frames)
    return out


# -- token files -------------------------------------------------------------------------------


def _token_file(path, **meta_changes):
    grids = [(2, 1, 1), (2, 2, 3)]
    ids = [torch.randint(0, 2 ** 16, (1, *g), dtype=torch.int32) for g in grids]
    save_tokens(str(path), Tokens(ids, 16, grids, (2, 2, 3), {"frames": 5, "height": 16, "width": 24}, "m"))
    if not meta_changes:
        return path
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    drop = meta_changes.pop("drop_tensor", None)
    if drop:
        del tensors[drop]
    for k, v in meta_changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    meta["checksum"] = _checksum(meta, [tensors[k] for k in sorted(tensors)])
    save_file(tensors, str(path), metadata=meta)
    return path


BAD_TOKEN_METADATA = {
    "num_bits missing": dict(num_bits=None),
    "num_bits not a number": dict(num_bits="sixteen"),
    "num_bits 70": dict(num_bits="70"),
    "source not an object": dict(source="[1, 2]"),
    "source not JSON": dict(source="{oops"),
    "grids of the wrong rank": dict(grids="[[2, 1], [2, 2]]"),
    "grids not a list": dict(grids='"2x1x1"'),
    "grid with a zero": dict(grids="[[2, 0, 1], [2, 2, 3]]"),
    "grid with a bool": dict(grids="[[2, true, 1], [2, 2, 3]]"),
    "latent_grid missing": dict(latent_grid=None),
    "model_id missing": dict(model_id=None),
    "a missing level": dict(drop_tensor="level_1"),
    "more levels than tensors": dict(grids="[[2, 1, 1], [2, 2, 3], [2, 4, 6]]"),
    "plane of the wrong shape": dict(grids="[[2, 1, 1], [2, 20, 30]]"),
}


@pytest.mark.parametrize("case", list(BAD_TOKEN_METADATA))
def test_token_files_with_inconsistent_metadata(tmp_path, capsys, case):
    path = _token_file(tmp_path / "t.safetensors", **dict(BAD_TOKEN_METADATA[case]))
    with pytest.raises(TokenFileError):
        read_token_metadata(str(path))
    with pytest.raises(TokenFileError):
        load_tokens(str(path))
    one_line_error(capsys, "info", path)
    one_line_error(capsys, "info", path, "--json")


def test_token_info_reads_the_header_not_the_whole_file(tmp_path, monkeypatch):
    """info validates and hashes level by level: it never reads the file in one piece."""
    path = _token_file(tmp_path / "t.safetensors")
    import pyratok.io.token_file as tf

    def whole_file(*a, **k):
        raise AssertionError("read_token_metadata read the whole file")

    monkeypatch.setattr(tf, "_read", whole_file)
    assert read_token_metadata(str(path))["num_tokens"] == 2 + 12


def test_info_into_a_closed_pipe_exits_quietly(tmp_path):
    path = _token_file(tmp_path / "t.safetensors")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(f"{sys.executable} -m pyratok.cli info --json {path} | head -1", shell=True, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.stdout == "{\n"
    assert res.stderr == "", res.stderr


# -- model folders -------------------------------------------------------------------------


def _edit_config(folder, change):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        meta = json.load(f)
    change(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


def _flip_byte(folder):
    path = os.path.join(folder, "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0x01
    open(path, "wb").write(data)


BAD_MODEL_FOLDERS = {
    "config a list": (lambda d: open(os.path.join(d, "config.json"), "w").write("[1, 2]"), "expected a JSON object"),
    "config invalid JSON": (lambda d: open(os.path.join(d, "config.json"), "w").write("{"), "not valid JSON"),
    "config empty": (lambda d: open(os.path.join(d, "config.json"), "w").close(), "not valid JSON"),
    "config without 'config'": (lambda d: _edit_config(d, lambda m: m.pop("config")), "'config'"),
    "missing sub-config": (lambda d: _edit_config(d, lambda m: m["config"].pop("lapq")), "lapq"),
    "base_dim a string": (lambda d: _edit_config(d, lambda m: m["config"]["backbone"].update(base_dim="16")),
                          "base_dim"),
    "num_bits a float": (lambda d: _edit_config(d, lambda m: m["config"]["lapq"].update(num_bits=16.5)), "num_bits"),
    "absurd base_dim": (lambda d: _edit_config(d, lambda m: m["config"]["backbone"].update(base_dim=4000)),
                        "billion parameters"),
    "absurd prior width": (lambda d: _edit_config(d, lambda m: m["config"]["prior"].update(width=10 ** 7)),
                           "prior.width"),
    "NaN loss weight": (lambda d: _edit_config(d, lambda m: m["config"]["loss"].update(entropy=float("nan"))),
                        "finite"),
    "zero-byte weights": (lambda d: open(os.path.join(d, "model.safetensors"), "wb").close(), "model.safetensors"),
    "truncated weights": (lambda d: open(os.path.join(d, "model.safetensors"), "r+b").truncate(4096),
                          "model.safetensors"),
    "one flipped byte": (_flip_byte, "sha256"),
    "model_id edited": (lambda d: _edit_config(d, lambda m: m.update(model_id="0123456789abcdef")),
                        "different models"),
}


@pytest.mark.parametrize("case", list(BAD_MODEL_FOLDERS))
def test_bad_model_folders(model_dir, tmp_path, capsys, case):
    folder = str(tmp_path / "model")
    shutil.copytree(model_dir, folder)
    damage, message = BAD_MODEL_FOLDERS[case]
    damage(folder)
    with pytest.raises(ValueError) as info:
        PyraTok.from_pretrained(folder)
    assert message in str(info.value)
    one_line_error(capsys, "reconstruct", CLIP, "-o", tmp_path / "out", "--model", folder, "--frames", 1,
                   "--size", "32x32", match=message)
    assert not (tmp_path / "out").exists()


def test_another_models_weights_are_refused(model_dir, tmp_path, capsys):
    tokens = tmp_path / "clip.safetensors"
    assert run("encode", CLIP, "-o", tokens, "--model", model_dir, "--frames", 1, "--size", "32x32", "-q") == 0
    other = tmp_path / "other"
    torch.manual_seed(1)
    PyraTok(PyraTokConfig.tiny(text_encoder=None)).save_pretrained(str(other))
    swapped = tmp_path / "swapped"
    shutil.copytree(model_dir, swapped)
    shutil.copy(other / "model.safetensors", swapped / "model.safetensors")
    one_line_error(capsys, "decode", tokens, "-o", tmp_path / "x.mp4", "--model", swapped, match="sha256")
    # the whole other folder loads, and its model id refuses the first model's tokens
    one_line_error(capsys, "decode", tokens, "-o", tmp_path / "x.mp4", "--model", other, match="made by model")
    assert not (tmp_path / "x.mp4").exists()


def test_saved_config_records_the_weights_checksum(model_dir):
    import hashlib

    meta = json.load(open(os.path.join(model_dir, "config.json")))
    data = open(os.path.join(model_dir, "model.safetensors"), "rb").read()
    assert meta["weights_sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("content", ["text", "pickle", "tensor", "empty"])
def test_wan_vae_from_a_non_checkpoint_pth(tmp_path, content):
    path = tmp_path / "model.pth"
    marker = tmp_path / "pwned"
    if content == "text":
        path.write_text("hello, not a checkpoint")
    elif content == "pickle":
        import pickle

        class Payload:
            def __reduce__(self):
                return os.system, (f"touch {marker}",)

        path.write_bytes(pickle.dumps(Payload()))
    elif content == "tensor":
        torch.save(torch.zeros(3), str(path))
    else:
        path.write_bytes(b"")
    tiny = dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, latents_mean=[0.0] * 4,
                latents_std=[1.0] * 4, temperal_downsample=[True], scale_factor_temporal=2, scale_factor_spatial=2)
    with pytest.raises(ValueError, match="model.pth"):
        WanVAE.from_pretrained(str(path), config=tiny)
    assert not marker.exists()


@pytest.mark.parametrize("field,value", [("base_dim", 10 ** 6), ("z_dim", 0), ("num_res_blocks", -1),
                                         ("base_dim", "96"), ("dim_mult", [1, 2, 4, 4, 4, 4, 4, 4, 4])])
def test_wan_vae_config_dimensions_are_bounded(field, value):
    with pytest.raises(ValueError, match=field):
        WanVAEConfig.from_dict({field: value})


# -- command line options ----------------------------------------------------------------------


@pytest.mark.parametrize("device,match", [("cuda:99", "--device cuda:99"), ("banana", "not a torch device"),
                                          ("meta", "expected cpu")])
def test_a_device_that_does_not_exist(model_dir, tmp_path, capsys, device, match):
    one_line_error(capsys, "reconstruct", CLIP, "-o", tmp_path / "out", "--model", model_dir, "--device", device,
                   match=match)


@pytest.mark.parametrize("content", [b"", b"not weights", "tensor"])
def test_lpips_that_is_not_a_weights_file(model_dir, tmp_path, capsys, content):
    path = tmp_path / "lpips.pth"
    if content == "tensor":
        torch.save(torch.zeros(2), str(path))
    else:
        path.write_bytes(content)
    one_line_error(capsys, "reconstruct", CLIP, "-o", tmp_path / "out", "--model", model_dir, "--frames", 1,
                   "--size", "32x32", "--lpips", path, match="--lpips")


def test_reconstruct_into_an_existing_file(model_dir, tmp_path, capsys):
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    one_line_error(capsys, "reconstruct", CLIP, "-o", target, "--model", model_dir, match="exists")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("args,match", [
    (["--size", "8x40000", "--frames", "1"], "at most 8192"),
    (["--size", "8x8", "--frames", "99997"], "at most 4097"),
    (["--size", "32x32", "--frames", "1", "--tile", "100000"], "--tile"),
    (["--size", "32x-8"], "--size"),
])
def test_oversized_requests_fail_before_allocating(model_dir, tmp_path, capsys, args, match):
    start = time.perf_counter()
    one_line_error(capsys, "reconstruct", CLIP, "-o", tmp_path / "out", "--model", model_dir, *args, match=match)
    assert time.perf_counter() - start < 30


def test_resizing_is_bounded_before_the_upscaled_copy_exists():
    frames = torch.zeros(33, 144, 176, 3, dtype=torch.uint8)   # covering 8x8192 needs 33 x 6703 x 8192
    with pytest.raises(ValueError, match="Gi pixel limit"):
        resize_and_crop(frames, 8, 8192, None)


def test_videos_smaller_than_decord_can_copy(model_dir, small_clips, tmp_path, capsys):
    for size in (8, 48):
        out = tmp_path / f"out{size}"
        assert run("reconstruct", small_clips[size], "-o", out, "--model", model_dir, "--frames", 5, "-q") == 0
        assert json.loads((out / "metrics.json").read_text())["height"] == size
    tiny = tmp_path / "tiny.mp4"
    write_video(str(tiny), torch.zeros(5, 2, 2, 3, dtype=torch.uint8))
    one_line_error(capsys, "reconstruct", tiny, "-o", tmp_path / "o", "--model", model_dir, match="smaller than 8x8")


# -- eval ----------------------------------------------------------------------------------------


def _bad_videos(folder, good):
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "garbage.mp4").write_bytes(os.urandom(2000))
    (folder / "text.mp4").write_text("not a video")
    data = open(good, "rb").read()
    (folder / "truncated.mp4").write_bytes(data[:200])
    write_video(str(folder / "short.mp4"), torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    (folder / "image.mp4").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)


def test_eval_counts_each_readable_video_once(model_dir, small_clips, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for n in range(3):
        shutil.copy(small_clips[32], data / f"good{n}.mp4")
    _bad_videos(data, small_clips[32])
    out = tmp_path / "eval"
    assert run("eval", data, "-o", out, "--model", model_dir, "--frames", 5, "--size", "32x32", "-q") == 0
    result = json.loads((out / "metrics.json").read_text())
    paths = [r["path"] for r in result["videos"]]
    assert sorted(os.path.basename(p) for p in paths) == ["good0.mp4", "good1.mp4", "good2.mp4"]
    assert result["summary"]["videos"] == 3 and result["summary"]["unreadable"] == 6
    assert sorted(os.path.basename(u["path"]) for u in result["unreadable"]) == \
        ["empty.mp4", "garbage.mp4", "image.mp4", "short.mp4", "text.mp4", "truncated.mp4"]
    assert all(u["reason"] for u in result["unreadable"])
    assert result["summary"]["psnr"] == pytest.approx(sum(r["psnr"] for r in result["videos"]) / 3)


def test_eval_on_only_bad_files_and_limit_zero(model_dir, small_clips, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _bad_videos(data, small_clips[32])
    one_line_error(capsys, "eval", data, "-o", tmp_path / "e", "--model", model_dir, "--frames", 5, "--size", "32x32",
                   "-q", match="no readable videos (6 unreadable")
    one_line_error(capsys, "eval", data, "-o", tmp_path / "e", "--model", model_dir, "--limit", 0, match="--limit 0")


# -- training configs and manifests ------------------------------------------------------------


BAD_TRAIN_VALUES = [
    ("train", "ema", 2.0, "train.ema=2.0"),
    ("train", "warmup", -5, "train.warmup=-5"),
    ("train", "steps", "2", "expected an integer"),
    ("train", "betas", [0.9], "two numbers"),
    ("train", "betas", [0.9, 1.5], "betas[1]"),
    ("train", "lr", float("nan"), "train.lr"),
    ("train", "lr", -1e-4, "train.lr"),
    ("train", "batch_size", 0, "train.batch_size"),
    ("train", "progress", 1, "true or false"),
    ("train", "clip_grad", -1.0, "train.clip_grad"),
    ("data", "num_frames", 6, "1 + 4k"),
    ("data", "height", 40000, "data.height"),
    ("data", "width", 33, "multiple of 8"),
    ("data", "num_workers", -1, "data.num_workers"),
    ("data", "buckets", [[32]], "data.buckets"),
    ("model", "preset", 3, "expected a string"),
]


@pytest.mark.parametrize("section,key,value,match", BAD_TRAIN_VALUES)
def test_bad_train_config_values(tmp_path, capsys, section, key, value, match):
    d = {"data": {"source": "videos"}, "train": {"out_dir": "run"}}
    d.setdefault(section, {})[key] = value
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict(d)
    assert match in str(info.value)


def test_bad_toml_types_through_the_cli(tmp_path, capsys):
    cfg = tmp_path / "t.toml"
    cfg.write_text('[data]\nsource = "v"\n[train]\nout_dir = "r"\nsteps = "2"\n')
    one_line_error(capsys, "train", cfg, match="train.steps='2'")
    cfg.write_text('data = 3\n[train]\nout_dir = "r"\n')
    one_line_error(capsys, "train", cfg, match="[data] must be a table")


@pytest.mark.parametrize("row,match", [("a.mp4,cap,abc,", "column 'start'"), ("a.mp4,cap,1,0.5", "not after"),
                                       ("a.mp4,cap,-1,", "column 'start'"), ("a.mp4,cap,,inf", "column 'end'")])
def test_csv_manifest_with_a_bad_number(tmp_path, row, match):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,caption,start,end\nb.mp4,ok,0,1\n" + row + "\n")
    with pytest.raises(ValueError, match="entry 2") as info:
        read_manifest(str(manifest))
    assert match in str(info.value)


def test_jsonl_manifest_entry_that_is_not_an_object(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "a.mp4"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="entry 2 is a JSON list"):
        read_manifest(str(manifest))


def test_dataset_reads_clips_decord_cannot_copy(small_clips):
    ds = VideoClipDataset(small_clips[48], ClipConfig(num_frames=5, height=48, width=48, crop="center"))
    assert ds.load_item(0)["video"].shape == (3, 5, 48, 48)


# -- non-finite inputs to the entropy losses -----------------------------------------------------


@pytest.mark.parametrize("backend", pyratok.available_backends("cpu"))
def test_entropy_of_infinite_inputs_is_the_saturated_limit(backend):
    torch.manual_seed(0)
    x = torch.randn(64, 12)
    x[0, 0], x[5, 3], x[9, 11] = float("inf"), -float("inf"), float("inf")
    big = x.clone()
    big[~torch.isfinite(big)] = big[~torch.isfinite(big)].sign() * 1e4     # the same bits, saturated
    xi = x.clone().requires_grad_(True)
    got = ops.lfq_entropy_loss(xi, inv_temperature=1.0, backend=backend)
    got.loss.backward()
    want = ops.lfq_entropy_loss(big, inv_temperature=1.0, backend="reference")
    for g, w in zip(got, want):
        assert torch.isfinite(g)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(xi.grad).all()
    assert xi.grad[0, 0] == 0 and xi.grad[5, 3] == 0
    sample = ops.per_sample_entropy(x, inv_temperature=1.0, backend=backend)
    torch.testing.assert_close(sample, want.per_sample_entropy, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", pyratok.available_backends("cpu"))
def test_entropy_of_nan_inputs_is_nan(backend):
    x = torch.randn(16, 8)
    x[3, 2] = float("nan")
    result = ops.lfq_entropy_loss(x, backend=backend)
    assert torch.isnan(result.loss) and torch.isnan(result.per_sample_entropy)


@pytest.mark.parametrize("name", ["per_sample_weight", "codebook_weight", "inv_temperature", "scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_entropy_weights_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name}={value}: expected a finite number"):
        ops.lfq_entropy_loss(torch.randn(8, 4), **{name: value})


def test_a_binary_file_as_manifest(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(ValueError, match="not a text manifest"):
        read_manifest(str(manifest))


def test_the_encode_memory_bomb_of_issue_19(model_dir, tmp_path, capsys):
    """`encode --size 8x40000 --frames 1` grew past 16 GB; now one line before any decoding."""
    start = time.perf_counter()
    one_line_error(capsys, "encode", CLIP, "-o", tmp_path / "x.safetensors", "--model", model_dir,
                   "--size", "8x40000", "--frames", 1, match="at most 8192")
    assert time.perf_counter() - start < 30 and not (tmp_path / "x.safetensors").exists()
