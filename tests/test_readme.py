"""The README's Python and command-line examples run as written (so they cannot rot)."""

import json
import os
import re
import shlex
import shutil

import pytest
import torch

from pyratok.cli import main
from pyratok.data import bundled_clip_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blocks(kind: str) -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(rf"```{kind}\n(.*?)```", f.read(), flags=re.S)


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = blocks("python")
    assert len(found) >= 2
    for code in found:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "tiny-model" / "config.json").is_file()


def test_cli_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks("python")[0], "README.md", "exec"), {"__name__": "readme"})    # makes tiny-model/
    shutil.copy(bundled_clip_path("carphone_pristine.mp4"), tmp_path / "video.mp4")
    (tmp_path / "videos").mkdir()
    shutil.copy(bundled_clip_path("carphone_distorted.mp4"), tmp_path / "videos" / "a.mp4")
    (tmp_path / "train.toml").write_text(
        '[model]\npreset = "tiny"\ntext_encoder = "none"\n[data]\nsource = "videos"\nnum_frames = 5\n'
        'height = 32\nwidth = 32\nnum_workers = 0\n[train]\nout_dir = "run"\nsteps = 1\nprogress = false\n')
    lines = [l[2:] for block in blocks("console") for l in block.splitlines() if l.startswith("$ pyratok ")]
    assert len(lines) >= 6
    for line in lines:
        args = shlex.split(line.split("#")[0])[1:]
        assert main(args) == 0, line
    assert json.loads((tmp_path / "recon" / "metrics.json").read_text())["frames"] == 5
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
