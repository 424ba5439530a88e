"""The `pyratok` CLI end to end on a tiny model and a real clip, including bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pyratok.cli import main
from pyratok.data import bundled_clip_path, read_video
from pyratok.models.pyratok import PyraTok, PyraTokConfig

CLIP = bundled_clip_path("carphone_pristine.mp4")


def run(*args):
    return main([str(a) for a in args])


def test_encode_info_decode(model_dir, tmp_path, capsys):
    out = tmp_path / "clip.safetensors"
    assert run("encode", CLIP, "-o", out, "--model", model_dir, "--frames", 5, "--size", "48x64") == 0
    assert "bits/pixel" in capsys.readouterr().out
    assert run("info", out) == 0
    info = capsys.readouterr().out
    assert "K=16" in info and "5 frames 48x64" in info
    assert run("info", out, "--json") == 0
    assert json.loads(capsys.readouterr().out)["num_bits"] == 16
    video = tmp_path / "decoded.mp4"
    assert run("decode", out, "-o", video, "--model", model_dir) == 0
    decoded = read_video(str(video))
    assert decoded.shape == (5, 48, 64, 3)


def test_tiled_encode_gives_the_untiled_tokens(model_dir, tmp_path):
    from pyratok.io import load_tokens

    whole, tiled = tmp_path / "whole.safetensors", tmp_path / "tiled.safetensors"
    common = ["--model", model_dir, "--frames", 1, "--size", "144x176", "-q"]
    assert run("encode", CLIP, "-o", whole, "--tile", "none", *common) == 0
    assert run("encode", CLIP, "-o", tiled, "--tile", 16, *common) == 0   # an 18x22 latent: 2x2 tiles
    a, b = load_tokens(str(whole)), load_tokens(str(tiled))
    assert all(torch.equal(x, y) for x, y in zip(a.ids, b.ids))
    video = tmp_path / "decoded.mp4"
    with pytest.warns(UserWarning, match="not exact"):   # 16 latent pixels is below the decoder's exact overlap
        assert run("decode", tiled, "-o", video, "--model", model_dir, "--tile", 16, "-q") == 0
    assert read_video(str(video)).shape == (1, 144, 176, 3)


def test_encode_several_videos_into_a_folder(model_dir, tmp_path):
    folder = tmp_path / "tokens"
    folder.mkdir()
    assert run("encode", CLIP, bundled_clip_path("carphone_distorted.mp4"), "-o", folder, "--model", model_dir,
               "--frames", 1, "--size", "32x32", "-q") == 0
    assert sorted(os.listdir(folder)) == ["carphone_distorted.safetensors", "carphone_pristine.safetensors"]


def hand_clip(path, frames, size, fps=None, resize=0, centred=True):
    """The clip the CLI should see, cut by hand: the centred span (eval; encode and reconstruct:
    the first frames) of ``frames`` frames sampled at ``fps`` (frame j = start + round(j *
    source_fps / fps)), resized so the short side is at least ``resize``, centre-cropped to
    ``size``; (1, 3, T, H, W) in [-1, 1]."""
    from pyratok.data import resize_and_crop
    from pyratok.data.video import open_video

    reader = open_video(path)
    total, src_fps = len(reader), float(reader.get_avg_fps())
    step = src_fps / fps if fps else 1.0
    start = (total - 1 - (frames - 1) * step) / 2 if centred else 0
    every = read_video(path)
    picked = every[[min(total - 1, int(round(start + j * step))) for j in range(frames)]]
    return resize_and_crop(picked, size[0], size[1], None, resize)[None]


def test_reconstruct_writes_everything(model_dir, tmp_path):
    from PIL import Image

    from pyratok.cli import load_clip
    from pyratok.metrics import psnr, ssim

    out = tmp_path / "recon"
    assert run("reconstruct", CLIP, "-o", out, "--model", model_dir, "--frames", 5, "--size", "32x32") == 0
    assert sorted(os.listdir(out)) == ["frames.png", "metrics.json", "reconstruction.mp4", "side_by_side.mp4"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frames"] == 5 and (metrics["height"], metrics["width"]) == (32, 32)
    # the figures are those of the model on that clip, recomputed here
    model = PyraTok.from_pretrained(model_dir).eval()
    clip, _ = load_clip(CLIP, 5, (32, 32))
    with torch.no_grad():
        tokens = model.encode(clip)
        recon = model.decode(tokens)
    assert metrics["psnr"] == pytest.approx(psnr(recon, clip).item(), abs=1e-4)
    assert metrics["ssim"] == pytest.approx(ssim(recon, clip).item(), abs=1e-5)
    assert metrics["tokens"] == tokens.num_tokens and metrics["bits_per_pixel"] == pytest.approx(tokens.bits_per_pixel())
    assert metrics["model_id"] == model.model_id
    # ... and the written reconstruction is that video (up to the H.264 round trip)
    written = torch.as_tensor(read_video(str(out / "reconstruction.mp4"))).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    assert abs(psnr(written, clip).item() - metrics["psnr"]) < 1.0
    side = read_video(str(out / "side_by_side.mp4"))
    assert side.shape == (5, 32, 64, 3)
    # the PNG: originals above reconstructions, the 5 frames side by side
    with Image.open(out / "frames.png") as png:
        assert png.format == "PNG" and png.size == (5 * 32, 2 * 32)
        top = torch.from_numpy(__import__("numpy").array(png.convert("RGB")))[:32, :32]
    want_top = ((clip[0, :, 0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(top, want_top)


def test_encoded_tokens_equal_model_encode(model_dir, tmp_path):
    from pyratok.cli import load_clip
    from pyratok.io import load_tokens

    out = tmp_path / "clip.safetensors"
    assert run("encode", CLIP, "-o", out, "--model", model_dir, "--frames", 5, "--size", "32x48", "-q") == 0
    model = PyraTok.from_pretrained(model_dir).eval()
    clip, fps = load_clip(CLIP, 5, (32, 48))
    torch.testing.assert_close(clip, hand_clip(CLIP, 5, (32, 48), centred=False), rtol=0, atol=0)
    with torch.no_grad():
        want = model.encode(clip)
    got = load_tokens(str(out))
    assert got.grids == want.grids and got.model_id == model.model_id
    assert all(torch.equal(a, b) for a, b in zip(got.ids, want.ids))
    assert got.source["fps"] == pytest.approx(fps) and got.source["path"] == os.path.abspath(CLIP)


def test_commands_without_model_use_the_bundled_model(tmp_path, capsys):
    from pyratok.cli import load_clip
    from pyratok.io import load_tokens
    from pyratok.metrics import psnr
    from pyratok.pretrained import load_default_model

    bundled = load_default_model()
    tokens = tmp_path / "clip.safetensors"
    assert run("encode", CLIP, "-o", tokens, "--frames", 1, "--size", "32x32", "-q") == 0
    clip, _ = load_clip(CLIP, 1, (32, 32))
    with torch.no_grad():
        want = bundled.encode(clip)
        want_video = bundled.decode(want)
    got = load_tokens(str(tokens))
    assert got.model_id == bundled.model_id and all(torch.equal(a, b) for a, b in zip(got.ids, want.ids))
    assert run("decode", tokens, "-o", tmp_path / "d.mp4", "-q") == 0
    assert read_video(str(tmp_path / "d.mp4")).shape == (1, 32, 32, 3)
    assert run("reconstruct", CLIP, "-o", tmp_path / "r", "--frames", 1, "--size", "32x32", "-q") == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["model_id"] == bundled.model_id
    assert metrics["psnr"] == pytest.approx(psnr(want_video, clip).item(), abs=1e-4)
    data = tmp_path / "videos"
    data.mkdir()
    os.symlink(CLIP, data / "a.mp4")
    assert run("eval", data, "-o", tmp_path / "e", "--frames", 1, "--size", "32x32", "-q") == 0
    summary = json.loads((tmp_path / "e" / "metrics.json").read_text())["summary"]
    assert summary["model_id"] == bundled.model_id


def test_rate_picks_the_bundled_operating_point(model_dir, tmp_path, capsys):
    from pyratok.cli import load_clip
    from pyratok.io import load_tokens
    from pyratok.pretrained import load_default_model

    high = load_default_model(rate="high")
    out = tmp_path / "high.safetensors"
    assert run("encode", CLIP, "-o", out, "--rate", "high", "--frames", 1, "--size", "32x32", "-q") == 0
    clip, _ = load_clip(CLIP, 1, (32, 32))
    with torch.no_grad():
        want = high.encode(clip)
    got = load_tokens(str(out))
    assert got.num_bits == 48 and got.model_id == high.model_id
    assert all(torch.equal(a, b) for a, b in zip(got.ids, want.ids))
    capsys.readouterr()
    assert run("encode", CLIP, "-o", tmp_path / "x.safetensors", "--rate", "high", "--model", model_dir) == 2
    assert "--rate high: chooses an operating point of the bundled model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("encode", CLIP, "-o", tmp_path / "y.safetensors", "--rate", "medium")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_tile_auto_tiles_only_above_512_pixels(model_dir, tmp_path, monkeypatch):
    from pyratok import cli

    model = PyraTok.from_pretrained(model_dir)
    assert cli._tile("auto", model, 512, 512) is None and cli._tile("auto", model, 64, 512) is None
    assert cli._tile("auto", model, 520, 64) == cli.AUTO_TILE == 64 and cli._tile("auto", model, 8, 513) == 64
    assert cli._tile("none", model, 4096, 4096) is None and cli._tile("24", model, 8, 8) == 24
    seen = []
    encode = PyraTok.encode

    def recording(self, video, text=None, tile=None, **kw):
        seen.append(tile)
        return encode(self, video, text, tile=tile, **kw)

    monkeypatch.setattr(PyraTok, "encode", recording)
    common = ["--model", model_dir, "--frames", 1, "-q"]
    assert run("encode", CLIP, "-o", tmp_path / "wide.safetensors", "--size", "16x520", *common) == 0
    assert run("encode", CLIP, "-o", tmp_path / "small.safetensors", "--size", "16x512", *common) == 0
    assert seen == [64, None]
    monkeypatch.setattr(PyraTok, "encode", encode)
    assert run("encode", CLIP, "-o", tmp_path / "untiled.safetensors", "--size", "16x520", "--tile", "none",
               *common) == 0
    from pyratok.io import load_tokens

    a, b = load_tokens(str(tmp_path / "wide.safetensors")), load_tokens(str(tmp_path / "untiled.safetensors"))
    assert all(torch.equal(x, y) for x, y in zip(a.ids, b.ids))


def test_eval_over_a_folder(model_dir, tmp_path):
    data = tmp_path / "videos"
    data.mkdir()
    for name in ("carphone_pristine.mp4", "carphone_distorted.mp4"):
        os.symlink(bundled_clip_path(name), data / name)
    out = tmp_path / "eval"
    assert run("eval", data, "-o", out, "--model", model_dir, "--frames", 5, "--size", "32x32", "-q") == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["summary"]["videos"] == 2 and len(result["summary"]["codebook_usage"]) == 4
    assert sorted(os.path.basename(r["path"]) for r in result["videos"]) == ["carphone_distorted.mp4",
                                                                              "carphone_pristine.mp4"]
    for key in ("psnr", "ssim", "bits_per_pixel"):
        assert result["summary"][key] == pytest.approx(sum(r[key] for r in result["videos"]) / 2)
    from PIL import Image

    with Image.open(out / "eval.png") as png:
        assert png.format == "PNG" and png.size == (1000, 350)      # figsize 10 x 3.5 at 100 dpi


def test_eval_fps_resize_and_limit(model_dir, tmp_path):
    from pyratok.data.video import open_video
    from pyratok.metrics import psnr

    data = tmp_path / "videos"
    data.mkdir()
    for name in ("carphone_pristine.mp4", "carphone_distorted.mp4"):
        os.symlink(bundled_clip_path(name), data / name)
    fps = float(open_video(CLIP).get_avg_fps()) / 3
    out = tmp_path / "eval"
    assert run("eval", data, "-o", out, "--model", model_dir, "--frames", 5, "--size", "32x32", "--fps", fps,
               "--resize", 48, "--limit", 1, "-q") == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["summary"]["videos"] == 1 and len(result["videos"]) == 1
    path = result["videos"][0]["path"]
    model = PyraTok.from_pretrained(model_dir).eval()
    clip = hand_clip(path, 5, (32, 32), fps=fps, resize=48)     # every 3rd frame, short side 48, centre crop
    with torch.no_grad():
        want = psnr(model.decode(model.encode(clip)), clip).item()
    assert result["videos"][0]["psnr"] == pytest.approx(want, abs=1e-4)
    plain = hand_clip(path, 5, (32, 32))
    with torch.no_grad():
        assert abs(psnr(model.decode(model.encode(plain)), plain).item() - want) > 1e-3   # the flags mattered


def test_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, capsys):
    cases = [
        (["encode", tmp_path / "missing.mp4", "-o", tmp_path / "t.safetensors", "--model", model_dir], "no such file"),
        (["encode", __file__, "-o", tmp_path / "t.safetensors", "--model", model_dir], "not a readable video"),
        (["encode", CLIP, "-o", tmp_path / "t.safetensors", "--model", model_dir, "--text", "hi"],
         "--text: this model has no text encoder"),
        (["encode", CLIP, "-o", tmp_path / "t.safetensors", "--model", model_dir, "--frames", 4], "1 + 4k"),
        (["encode", CLIP, "-o", tmp_path / "t.safetensors", "--model", model_dir, "--size", "30x30"],
         "multiples of 8"),
        (["decode", tmp_path / "none.safetensors", "-o", tmp_path / "x.mp4", "--model", model_dir], "no such token file"),
        (["info", __file__], "not a token file"),
        (["encode", CLIP, "-o", tmp_path / "t.safetensors", "--model", tmp_path / "nomodel"], "no such model folder"),
        (["train", tmp_path / "missing.toml"], "no such file"),
        (["encode", CLIP, "-o", tmp_path / "t.safetensors", "--model", model_dir, "--tile", "big"],
         "--tile 'big': expected a number of latent pixels"),
        (["encode", CLIP, "-o", tmp_path / "t.safetensors", "--model", model_dir, "--tile", "2"],
         "--tile 2: expected at least 8"),
        (["frobnicate"], "invalid choice"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) if args == ["frobnicate"] else _nothing():
            code = run(*args)
            assert code == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_tokens_from_another_model_are_rejected(model_dir, tmp_path, capsys):
    tokens = tmp_path / "clip.safetensors"
    assert run("encode", CLIP, "-o", tokens, "--model", model_dir, "--frames", 1, "--size", "32x32", "-q") == 0
    torch.manual_seed(1)
    other = tmp_path / "other"
    PyraTok(PyraTokConfig.tiny(text_encoder=None)).save_pretrained(str(other))
    assert run("decode", tokens, "-o", tmp_path / "x.mp4", "--model", other) == 2
    assert "made by model" in capsys.readouterr().err


def test_help_for_every_command():
    for cmd in ("encode", "decode", "reconstruct", "train", "eval", "info"):
        res = subprocess.run([sys.executable, "-m", "pyratok.cli", cmd, "--help"], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0 and "usage: pyratok " + cmd in res.stdout


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
