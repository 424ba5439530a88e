"""Does a stage-0 backbone keep its quality past the clip length it was trained on?  Measured on the
validation split of the TRAINING data (scripts/stage1f_validation.py: the last training window of each
real clip and pan / zoom moves over three training photographs, 17 frames each), never on held-out
clips.

For each backbone (encoder and decoder on the continuous latent, no quantizer) and each validation
clip: PSNR of the whole 17-frame clip, of its frames 0-8 and 8-16 as parts of that clip, and of
frames 8-16 encoded as a clip of their own.  A backbone trained on 9-frame crops that falls on frames
8-16 only inside the longer clip has not learned to carry its causal state past its training length.

  .venv/bin/python scripts/backbone_length.py WORK RESULT_CSV NAME=CHECKPOINT [NAME=CHECKPOINT ...]

WORK holds the full run's data/ (scripts/train_default.sh).  Writes RESULT_CSV: one row per backbone
and clip, and a row "mean" per backbone.
"""
from __future__ import annotations

import csv
import os
import statistics
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stage1f_validation  # noqa: E402

PARTS = ("clip_17", "frames_0_8", "frames_8_16", "frames_8_16_alone")


def measure(model, clip) -> dict:
    """The four PSNRs of one 17-frame clip (1, C, 17, H, W) through ``model``'s backbone."""
    import torch

    from pyratok.metrics import psnr

    if clip.shape[2] != 17:
        raise ValueError(f"clip: expected 17 frames, got {clip.shape[2]}")
    late = clip[:, :, 8:]
    with torch.no_grad():   # WanVAE.forward: decode(encode(x)) on the posterior mean
        recon, alone = model.vae(clip), model.vae(late)
    return {"clip_17": float(psnr(recon, clip)), "frames_0_8": float(psnr(recon[:, :, :9], clip[:, :, :9])),
            "frames_8_16": float(psnr(recon[:, :, 8:], late)), "frames_8_16_alone": float(psnr(alone, late))}


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    from pyratok.models.pyratok import PyraTok
    from pyratok.utils import atomic_write

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work")
    parser.add_argument("result")
    parser.add_argument("backbones", nargs="+", metavar="NAME=CHECKPOINT")
    args = parser.parse_args(argv)
    named = []
    for item in args.backbones:
        name, sep, path = item.partition("=")
        if not sep or not name or not os.path.isfile(os.path.join(path, "config.json")):
            raise SystemExit(f"backbones: {item!r} is not NAME=CHECKPOINT (a model folder with config.json)")
        named.append((name, path))
    data = os.path.join(args.work, "data")
    windows = stage1f_validation.split(os.path.join(data, "train.jsonl"), None)   # only the validation windows
    sets = stage1f_validation.validation_sets(data, windows)
    clips = [(name, clip) for part in ("real", "photos") for name, clip, _ in sets[part]]
    rows = []
    for name, path in named:
        model = PyraTok.from_pretrained(path).eval()
        mine = [{"backbone": name, "clip": clip_name, **measure(model, clip)} for clip_name, clip in clips]
        mean = {"backbone": name, "clip": "mean", **{k: statistics.fmean(r[k] for r in mine) for k in PARTS}}
        rows += mine + [mean]
        print(f"{name}: " + ", ".join(f"{k} {mean[k]:.2f}" for k in PARTS) + " dB (mean of "
              f"{len(mine)} validation clips)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.result)), exist_ok=True)
    with atomic_write(args.result, "w") as f:
        writer = csv.DictWriter(f, fieldnames=["backbone", "clip", *PARTS], lineterminator="\n")
        writer.writeheader()
        writer.writerows({**r, **{k: round(r[k], 3) for k in PARTS}} for r in rows)
    print(f"-> {args.result}")


if __name__ == "__main__":
    main()
