"""Video clip datasets for training and evaluation (DESIGN.md §4).

``VideoClipDataset`` reads a folder of videos, one video file, or a manifest (JSONL or CSV with ``path``,
optional ``caption``, ``start`` and ``end`` in seconds) and returns random 1+4k-frame clips:

* frames are sampled at ``fps`` (None keeps the file's rate): frame j of a clip is source
  frame ``start + round(j * source_fps / fps)``;
* each clip is resized so that it covers ``height`` x ``width`` (aspect kept, antialiased)
  and cropped to exactly that size (``crop="center"`` or ``"random"``); with ``buckets``
  each video instead gets the (height, width) bucket nearest to its aspect ratio;
* randomness (clip start, crop) comes from ``seed``, ``epoch`` (``set_epoch``) and the
  index only, so results do not depend on worker count or order;
* a video that cannot be read or is shorter than one clip is skipped: a warning names it
  (once) and ``skipped`` counts the reasons; the next readable video is returned instead.

Each item is a dict: ``video`` (3, T, H, W) float32 in [-1, 1], ``caption`` (str, "" if
none), ``path``, ``index``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from pyratok.data.video import open_video, read_frames
from pyratok.utils import check_clip_pixels

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
log = logging.getLogger(__name__)


class NoUsableClipError(ValueError):
    """Every video tried for an item was missing, unreadable or too short."""


@dataclass
class ClipConfig:
    num_frames: int = 17                  # 1 + 4k
    height: int = 256
    width: int = 256
    fps: Optional[float] = None           # sampling rate; None = the file's own
    crop: str = "random"                  # "random" | "center"
    buckets: Optional[Sequence[tuple[int, int]]] = None  # (height, width) choices by aspect ratio
    seed: int = 0
    resize: int = 0                       # short side before cropping; 0 = just cover the crop

    def __post_init__(self):
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames={self.num_frames}: clips have 1 + 4k frames (1, 5, 9, 17, 33, ...)")
        if self.height % 8 or self.width % 8 or self.height <= 0 or self.width <= 0:
            raise ValueError(f"height x width = {self.height} x {self.width}: expected positive multiples of 8")
        if self.crop not in ("random", "center"):
            raise ValueError(f"crop={self.crop!r}: expected 'random' or 'center'")
        if self.resize < 0:
            raise ValueError(f"resize={self.resize}: expected the short side in pixels, or 0 to cover the crop")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps={self.fps}: expected a positive frame rate or None")
        for b in self.buckets or ():
            if len(b) != 2 or b[0] % 8 or b[1] % 8:
                raise ValueError(f"buckets: {b} is not a (height, width) pair of multiples of 8")


def read_manifest(path: str) -> list[dict]:
    """Items of a JSONL / CSV manifest (or every video in a folder), paths made absolute."""
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if f.lower().endswith(VIDEO_EXTENSIONS))
        if not files:
            raise ValueError(f"source: no video files ({', '.join(VIDEO_EXTENSIONS)}) under {path}")
        return [{"path": f} for f in files]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source: no such folder or manifest: {path}")
    if path.lower().endswith(VIDEO_EXTENSIONS):  # one video
        return [{"path": os.path.abspath(path)}]
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.endswith(".csv"):
                rows = list(csv.DictReader(f))
            else:
                rows = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise ValueError(f"{path}:{n}: not a JSON line ({err})") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"source: {path} is not a text manifest (JSONL or CSV): {err}") from None
    items = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: entry {n} is a JSON {type(row).__name__}, expected an object with 'path'")
        if not row.get("path") or not isinstance(row["path"], str):
            raise ValueError(f"{path}: entry {n} has no 'path' (a string)")
        item = {"path": row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])}
        for key in ("caption",):
            if row.get(key):
                item[key] = str(row[key])
        for key in ("start", "end"):
            if row.get(key) not in (None, ""):
                try:
                    item[key] = float(row[key])
                except (TypeError, ValueError):
                    raise ValueError(f"{path}: entry {n}, column {key!r}: {row[key]!r} is not a number "
                                     "(seconds)") from None
                if not math.isfinite(item[key]) or item[key] < 0:
                    raise ValueError(f"{path}: entry {n}, column {key!r}: {row[key]!r} is not a time "
                                     "(expected finite seconds >= 0)")
        if "start" in item and "end" in item and item["end"] <= item["start"]:
            raise ValueError(f"{path}: entry {n}: end={item['end']:g} is not after start={item['start']:g}")
        items.append(item)
    if not items:
        raise ValueError(f"source: the manifest {path} lists no videos")
    return items


def resized_size(H: int, W: int, height: int, width: int, short_side: int = 0) -> tuple[int, int]:
    """The size resize_and_crop scales H x W frames to before cropping height x width."""
    scale = max(height / H, width / W, short_side / min(H, W))
    return max(height, math.ceil(H * scale - 1e-6)), max(width, math.ceil(W * scale - 1e-6))


def resize_and_crop(frames: torch.Tensor, height: int, width: int, rng: Optional[random.Random],
                    short_side: int = 0) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, height, width) float32 in [-1, 1]: resize so the short side
    is ``short_side`` (0: the smallest size that covers height x width; never smaller than
    that), then crop (random offsets from ``rng``, centred when it is None)."""
    T, H, W = frames.shape[:3]
    size = resized_size(H, W, height, width, short_side)
    check_clip_pixels(T, *size, f"resizing {H}x{W} frames to cover {height}x{width}")
    video = frames.permute(0, 3, 1, 2).float()                               # (T, 3, H, W)
    if size != (H, W):
        video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    dy, dx = size[0] - height, size[1] - width
    y0 = rng.randint(0, dy) if rng else dy // 2
    x0 = rng.randint(0, dx) if rng else dx // 2
    video = video[:, :, y0:y0 + height, x0:x0 + width]
    return (video / 127.5 - 1.0).clamp_(-1, 1).permute(1, 0, 2, 3).contiguous()  # (3, T, h, w)


class VideoClipDataset(torch.utils.data.Dataset):
    def __init__(self, source: str, config: ClipConfig = ClipConfig(), max_skips: int = 50):
        self.items = read_manifest(source)
        self.config = config
        self.max_skips = max_skips
        self.epoch = 0
        self.skipped: Counter = Counter()
        self._warned: set[str] = set()
        self._sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{self.config.seed}:{self.epoch}:{index}")

    def bucket_of(self, index: int) -> tuple[int, int]:
        """The (height, width) this item is cropped to."""
        cfg = self.config
        if not cfg.buckets:
            return cfg.height, cfg.width
        if index not in self._sizes:
            try:
                reader = open_video(self.items[index]["path"])
                self._sizes[index] = tuple(reader[0].shape[:2])
            except (OSError, ValueError):
                self._sizes[index] = (cfg.height, cfg.width)
        h, w = self._sizes[index]
        return min(cfg.buckets, key=lambda b: abs(math.log((b[1] / b[0]) / (w / h))))

    def _skip(self, index: int, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        path = self.items[index]["path"]
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(f"skipping {path}: {detail} ({sum(self.skipped.values())} skipped so far)", stacklevel=3)

    def load_item(self, index: int) -> dict:
        """Item ``index`` itself, never a replacement: FileNotFoundError (missing), EOFError
        (too short) or ValueError (unreadable) otherwise.  Evaluation uses it so that each
        video counts once; ``ds[i]`` falls back to the next readable video instead."""
        cfg = self.config
        item = self.items[index]
        reader = open_video(item["path"])
        total = len(reader)
        src_fps = float(reader.get_avg_fps()) or 25.0
        step = src_fps / cfg.fps if cfg.fps else 1.0
        span = (cfg.num_frames - 1) * step
        first = int(round(item.get("start", 0.0) * src_fps))
        last = min(total - 1, int(round(item["end"] * src_fps)) - 1) if "end" in item else total - 1
        if last - first < span or total == 0:
            raise EOFError(f"{last - first + 1} frames in range, a clip at {cfg.fps or src_fps:g} fps "
                           f"needs {math.floor(span) + 1}")
        rng = self._rng(index)
        start = first + (rng.uniform(0, last - first - span) if cfg.crop == "random" else (last - first - span) / 2)
        frames = read_frames(reader, [min(last, int(round(start + j * step))) for j in range(cfg.num_frames)],
                             item["path"])
        height, width = self.bucket_of(index)
        video = resize_and_crop(frames, height, width, rng if cfg.crop == "random" else None, cfg.resize)
        return {"video": video, "caption": item.get("caption", ""), "path": item["path"], "index": index}

    def __getitem__(self, index: int) -> dict:
        for attempt in range(min(self.max_skips, len(self.items))):
            i = (index + attempt) % len(self.items)
            try:
                return self.load_item(i)
            except FileNotFoundError as err:
                self._skip(i, "missing", str(err))
            except EOFError as err:
                self._skip(i, "too short", str(err))
            except ValueError as err:
                self._skip(i, "unreadable", str(err))
        raise NoUsableClipError(f"no usable clip in {min(self.max_skips, len(self.items))} videos from index "
                                f"{index}; skipped: {dict(self.skipped)}")


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of indices that share one (height, width) bucket, shuffled per epoch by seed."""

    def __init__(self, dataset: VideoClipDataset, batch_size: int, drop_last: bool = False):
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last

    def _batches(self) -> list[list[int]]:
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(len(self.dataset)):
            groups.setdefault(self.dataset.bucket_of(i), []).append(i)
        rng = random.Random(f"{self.dataset.config.seed}:{self.dataset.epoch}:batches")
        batches = []
        for key in sorted(groups):
            idx = groups[key]
            rng.shuffle(idx)
            for s in range(0, len(idx), self.batch_size):
                b = idx[s:s + self.batch_size]
                if len(b) == self.batch_size or not self.drop_last:
                    batches.append(b)
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def collate_clips(batch: list[dict]) -> dict:
    return {"video": torch.stack([b["video"] for b in batch]), "caption": [b["caption"] for b in batch],
            "path": [b["path"] for b in batch], "index": torch.tensor([b["index"] for b in batch])}
