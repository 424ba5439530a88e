"""Reconstruction metrics with one documented protocol (README, Evaluation).

Videos are (B, 3, T, H, W) in [-1, 1] (RGB).  Every metric is computed per frame on the
RGB frame and averaged over frames and then videos:

* PSNR: 10 log10(range^2 / MSE) with range 2 (= 255 on 0..255 images), per frame;
* SSIM: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 2, per RGB frame
  (torchmetrics' structural_similarity_index_measure, differentiable: also the loss);
* LPIPS (pyratok.lpips) when its weights are given as a local file.

Frames are clamped to [-1, 1] first, as a decoder's output is when written to video.
"""

from __future__ import annotations

import torch
from einops import rearrange


def _frames(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 5 or x.shape[1] != 3:
        raise ValueError(f"video: expected (B, 3, T, H, W), got {tuple(x.shape)}")
    return rearrange(x, "b c t h w -> (b t) c h w")


def psnr(recon: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Mean per-frame PSNR in dB of (B, 3, T, H, W) videos in [-1, 1]."""
    a, b = _frames(recon.float().clamp(-1, 1)), _frames(target.float().clamp(-1, 1))
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return (10 * torch.log10(data_range ** 2 / mse)).mean()


def ssim(recon: torch.Tensor, target: torch.Tensor, data_range: float = 2.0, clamp: bool = True) -> torch.Tensor:
    """Mean per-frame SSIM of (B, 3, T, H, W) videos; differentiable (clamp=False for losses)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _frames(recon.float()), _frames(target.float())
    if clamp:
        a, b = a.clamp(-1, 1), b.clamp(-1, 1)
    return structural_similarity_index_measure(a, b, data_range=data_range, kernel_size=11, sigma=1.5)
