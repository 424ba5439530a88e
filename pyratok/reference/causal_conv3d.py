"""Readable PyTorch reference for causal 3D convolution (DESIGN.md §2.3).

x (B, C, T, H, W) is padded with P = dt*(kt-1) + 1 - st frames in the past only: the
frames of ``cache`` when given (the last P input frames of the previous chunk), else
zeros (``time_pad_mode="zeros"``, Wan) or copies of frame 0 (``"replicate"``,
CogVideoX/Cosmos), and symmetrically with zeros in H and W.  A chunk of T frames (T a
multiple of st) gives T/st output frames, and the new cache is the last P frames of the
padded input, so that the outputs of any chunk plan concatenate to the whole-clip output.

This reference pads by copying (F.pad / torch.cat + F.conv3d); the fast backends do not.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def past_frames(kernel_t: int, stride_t: int, dilation_t: int) -> int:
    """P, the number of past frames a causal conv needs before each chunk."""
    return dilation_t * (kernel_t - 1) + 1 - stride_t


def causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  stride=(1, 1, 1), dilation=(1, 1, 1), padding=(0, 0), time_pad_mode: str = "zeros",
                  cache: Optional[torch.Tensor] = None):
    """-> (y (B, O, T/st, H', W'), new_cache (B, C, P, H, W))."""
    kt = weight.shape[2]
    P = past_frames(kt, stride[0], dilation[0])
    if cache is not None:
        past = cache
    elif time_pad_mode == "replicate":
        past = x[:, :, :1].expand(-1, -1, P, -1, -1)
    else:
        past = x.new_zeros(x.shape[0], x.shape[1], P, x.shape[3], x.shape[4])
    xp = torch.cat([past, x], dim=2)                              # (B, C, P+T, H, W)
    y = F.conv3d(xp, weight, bias, stride=stride, padding=(0, padding[0], padding[1]), dilation=dilation)
    new_cache = xp[:, :, xp.shape[2] - P:].clone()                # (B, C, P, H, W)
    return y, new_cache
