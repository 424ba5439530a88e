"""Video layout helpers: Wan 2.2's space-to-channel patches and the 1 + 4k frame counts."""

from __future__ import annotations

from typing import Optional

import torch


def patchify(x: torch.Tensor, patch_size: Optional[int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p), channel order (c, p_w, p_h) as diffusers."""
    if not patch_size or patch_size == 1:
        return x
    p = patch_size
    B, C, T, H, W = x.shape
    x = x.view(B, C, T, H // p, p, W // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(B, C * p * p, T, H // p, W // p)


def unpatchify(x: torch.Tensor, patch_size: Optional[int]) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    if not patch_size or patch_size == 1:
        return x
    p = patch_size
    B, Cpp, T, H, W = x.shape
    x = x.view(B, Cpp // (p * p), p, p, T, H, W).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(B, Cpp // (p * p), T, H * p, W * p)


def fit_frames(video: torch.Tensor, mode: str = "pad", temporal_factor: int = 4) -> torch.Tensor:
    """Makes T = 1 + temporal_factor * k: ``mode="pad"`` repeats the last frame up to the next
    such count, ``mode="trim"`` keeps the first frames up to the previous one.  video: (B, C, T, H, W)."""
    T = video.shape[2]
    if mode == "pad":
        want = 1 + -(-(T - 1) // temporal_factor) * temporal_factor
        return torch.cat([video, video[:, :, -1:].expand(-1, -1, want - T, -1, -1)], dim=2) if want > T else video
    if mode == "trim":
        return video[:, :, :1 + (T - 1) // temporal_factor * temporal_factor]
    raise ValueError(f"mode={mode!r}: expected 'pad' or 'trim'")
