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


def test_reconstruct_writes_everything(model_dir, tmp_path):
    out = tmp_path / "recon"
    assert run("reconstruct", CLIP, "-o", out, "--model", model_dir, "--frames", 5, "--size", "32x32") == 0
    assert sorted(os.listdir(out)) == ["frames.png", "metrics.json", "reconstruction.mp4", "side_by_side.mp4"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frames"] == 5 and metrics["psnr"] > 0 and len(metrics["codebook_usage"]) == 4
    assert read_video(str(out / "side_by_side.mp4")).shape == (5, 32, 64, 3)


def test_eval_over_a_folder(model_dir, tmp_path):
    data = tmp_path / "videos"
    data.mkdir()
    for name in ("carphone_pristine.mp4", "carphone_distorted.mp4"):
        os.symlink(bundled_clip_path(name), data / name)
    out = tmp_path / "eval"
    assert run("eval", data, "-o", out, "--model", model_dir, "--frames", 5, "--size", "32x32", "-q") == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["summary"]["videos"] == 2 and len(result["summary"]["codebook_usage"]) == 4
    assert (out / "eval.png").stat().st_size > 1000


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
