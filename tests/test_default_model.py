"""The embedded default model (pyratok/assets/default, trained by scripts/train_default.sh)
and `make demo` on it: the model ships in the package, loads, is the documented config, and
reconstructs held-out frames of a real clip at the quality reported in the README."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pyratok.demo import held_out_clip, main as demo_main
from pyratok.pretrained import default_model_path, load_default_model
from pyratok.data import bundled_clip_path

# benchmarks/results/default_model.json holds the measured held-out numbers; the demo clip
# (carphone, 17 held-out frames at 144x176) must give the demo's recorded figures (the run is
# deterministic) and stay far above an untrained model (~12 dB).
RESULTS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "default_model.json")


def test_the_default_model_ships_with_the_package():
    path = default_model_path()
    assert sorted(f for f in os.listdir(path) if not f.startswith(".")) == ["README.md", "config.json",
                                                                           "model.safetensors"]
    assert os.path.getsize(os.path.join(path, "model.safetensors")) < 10 * 2**20
    model = load_default_model()
    assert model.num_bits == 16 and model.config.lapq.levels == 4
    assert model.text_encoder is None
    assert not model.training


def test_held_out_frames_are_the_last_fifth_of_the_clip():
    clip, first, fps = held_out_clip(bundled_clip_path("carphone_pristine.mp4"), 17)
    assert clip.shape == (1, 3, 17, 144, 176)
    assert first == 96                     # 120 frames, the last 20% held out
    with pytest.raises(ValueError, match="held-out frames"):
        held_out_clip(bundled_clip_path("carphone_pristine.mp4"), 33)


def test_demo_reconstructs_a_held_out_real_clip(tmp_path):
    # in a fresh interpreter with make demo's environment: import order matters (Triton's CPU
    # interpreter has to be chosen before anything imports triton)
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYRATOK_BACKEND")}
    res = subprocess.run([sys.executable, "-m", "pyratok.demo", "--out", str(out)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = res.stdout
    assert "PSNR" in printed and "bits/px" in printed and str(out) in printed
    assert sorted(os.listdir(out)) == ["frames.png", "metrics.json", "reconstruction.mp4", "side_by_side.mp4",
                                       "tokens.safetensors"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backends_agree"] and metrics["decode_from_file_exact"]
    with open(RESULTS) as f:
        recorded = json.load(f)["demo"]
    # the run is deterministic: the recorded figures to fp32 noise, and a floor an untrained
    # (~12 dB) or broken model cannot reach
    assert metrics["psnr"] == pytest.approx(recorded["psnr"], abs=0.05)
    assert metrics["ssim"] == pytest.approx(recorded["ssim"], abs=0.002)
    assert metrics["psnr"] > 16.0 and metrics["ssim"] > 0.4
    assert metrics["bits_per_pixel"] == pytest.approx(recorded["bits_per_pixel"])
    assert metrics["codebook_usage"] == pytest.approx(recorded["codebook_usage"], rel=0.02)
    assert metrics["model_id"] == recorded["model_id"]


def test_demo_bad_arguments():
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        demo_main(["--frames", "4"])
    assert demo_main(["--model", "/nonexistent/model"]) == 2
