"""Training-time input masking (PyraTok: 30% of frames + cosine spatial masking).

Applied to the encoder's input only; the reconstruction target stays the clean clip.  A
masked pixel is set to ``fill`` (0 = mid-grey in [-1, 1]).

* frame masking: each frame after the first is dropped with probability ``frame_ratio``
  (frame 0 is kept: the causal VAE encodes it alone);
* cosine spatial masking, per frame: every frame draws its own ratio r = max_spatial_ratio *
  cos(pi/2 * u), u ~ U(0, 1) (MaskGIT's schedule: most frames lightly masked, a few heavily)
  and its own set of ``patch`` x ``patch`` cells, independently of the other frames.

Masking is a training-time transform only: the trainer applies it to the encoder's input while
the model is in training mode, and ``PyraTok.encode`` / evaluation never see it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class MaskingConfig:
    frame_ratio: float = 0.3
    spatial: str = "cosine"          # "cosine" | "none"
    patch: int = 16
    max_spatial_ratio: float = 0.5   # cap on r so that a clip is never fully hidden
    fill: float = 0.0

    def __post_init__(self):
        if not 0 <= self.frame_ratio < 1:
            raise ValueError(f"frame_ratio={self.frame_ratio}: expected 0 <= ratio < 1")
        if self.spatial not in ("cosine", "none"):
            raise ValueError(f"spatial={self.spatial!r}: expected 'cosine' or 'none'")
        if not 0 <= self.max_spatial_ratio < 1:
            raise ValueError(f"max_spatial_ratio={self.max_spatial_ratio}: expected 0 <= ratio < 1")


class VideoMasking:
    """Callable transform: video (B, C, T, H, W) -> (masked video, keep mask (B, 1, T, H, W) bool)."""

    def __init__(self, config: MaskingConfig = MaskingConfig()):
        self.config = config

    def __call__(self, video: torch.Tensor, generator: Optional[torch.Generator] = None):
        cfg = self.config
        B, _, T, H, W = video.shape
        dev = video.device
        keep = torch.ones(B, 1, T, H, W, dtype=torch.bool, device=dev)
        if cfg.frame_ratio > 0 and T > 1:
            drop = torch.rand(B, T, generator=generator).to(dev) < cfg.frame_ratio
            drop[:, 0] = False
            keep &= ~drop[:, None, :, None, None]
        if cfg.spatial == "cosine":
            gh, gw = math.ceil(H / cfg.patch), math.ceil(W / cfg.patch)
            u = torch.rand(B, T, generator=generator)
            ratio = torch.cos(math.pi / 2 * u) * cfg.max_spatial_ratio              # (B, T): per frame
            scores = torch.rand(B, T, gh * gw, generator=generator)
            cells = scores < ratio[..., None]                                      # (B, T, gh*gw) masked cells
            grid = cells.view(B, 1, T, gh, gw).to(dev)
            grid = grid.repeat_interleave(cfg.patch, 3).repeat_interleave(cfg.patch, 4)[..., :H, :W]
            keep &= ~grid
        return torch.where(keep, video, torch.full_like(video, cfg.fill)), keep
