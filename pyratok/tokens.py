"""Tokens: what PyraTok.encode returns and token files store (DESIGN.md §4).

A video becomes one grid of K-bit token ids per pyramid level, all in one shared index
space (MSB-first ids, int32 for K <= 31, int64 above).  ``Tokens`` carries the ids of a
batch together with everything needed to decode or store them: K, the level grids, the
latent grid, and optional source facts (frames, size, fps), model id and captions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

Grid = tuple[int, int, int]


@dataclass
class Tokens:
    ids: list[torch.Tensor]                # per level (B, t, h, w) int32/int64 token ids
    num_bits: int                          # K
    grids: list[Grid]                      # per level (t, h, w)
    latent_grid: Grid                      # (T, H, W) of the backbone latent
    source: dict = field(default_factory=dict)   # frames, height, width, fps of the input video
    model_id: str = ""
    captions: Optional[list[str]] = None

    def __post_init__(self):
        if not 1 <= self.num_bits <= 63:
            raise ValueError(f"num_bits={self.num_bits}: token ids exist for 1..63 bits")
        if len(self.ids) != len(self.grids) or not self.ids:
            raise ValueError(f"ids: {len(self.ids)} levels but {len(self.grids)} grids")
        self.grids = [tuple(int(v) for v in g) for g in self.grids]
        self.latent_grid = tuple(int(v) for v in self.latent_grid)
        want_dtype = torch.int32 if self.num_bits <= 31 else torch.int64
        B = self.ids[0].shape[0] if self.ids[0].dim() == 4 else -1
        for l, (i, g) in enumerate(zip(self.ids, self.grids)):
            if i.dim() != 4 or tuple(i.shape[1:]) != g or i.shape[0] != B:
                raise ValueError(f"ids[{l}]: expected shape ({B}, {g[0]}, {g[1]}, {g[2]}), got {tuple(i.shape)}")
            if i.dtype != want_dtype:
                raise ValueError(f"ids[{l}]: expected {want_dtype} for K={self.num_bits}, got {i.dtype}")
        if self.captions is not None and len(self.captions) != B:
            raise ValueError(f"captions: {len(self.captions)} captions for a batch of {B}")

    @property
    def levels(self) -> int:
        return len(self.ids)

    @property
    def batch_size(self) -> int:
        return self.ids[0].shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens per video, all levels."""
        return sum(t * h * w for t, h, w in self.grids)

    def bits_per_pixel(self) -> float:
        """K * tokens / (frames * height * width) of the source video."""
        s = self.source
        if not all(k in s for k in ("frames", "height", "width")):
            raise ValueError("source: frames, height and width are needed for bits per pixel")
        return self.num_bits * self.num_tokens / (s["frames"] * s["height"] * s["width"])

    def to(self, device) -> "Tokens":
        return replace(self, ids=[i.to(device) for i in self.ids])

    def __getitem__(self, index: int) -> "Tokens":
        """The tokens of one video of the batch (still with a batch axis of 1)."""
        if not -self.batch_size <= index < self.batch_size:
            raise IndexError(f"index {index} out of range for a batch of {self.batch_size}")
        index %= self.batch_size
        return replace(self, ids=[i[index:index + 1] for i in self.ids],
                       captions=None if self.captions is None else [self.captions[index]])
