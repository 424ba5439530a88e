"""Readable PyTorch reference for causal 3D convolution (DESIGN.md §2.3).

x (B, C, T, H, W) is padded with P = dt*(kt-1) + 1 - st frames in the past only: the
frames of ``cache`` when given (the last P input frames of the previous chunk), else
zeros (``time_pad_mode="zeros"``, Wan) or copies of frame 0 (``"replicate"``,
CogVideoX/Cosmos), and symmetrically with zeros in H and W.  A chunk of T frames (T a
multiple of st) gives T/st output frames, and the new cache is the last P frames of the
padded input, so that the outputs of any chunk plan concatenate to the whole-clip output.

This reference pads by copying (F.pad / torch.cat + F.conv3d); the fast backends do not.
The backward (gradients of x, of the P past frames, of weight and bias) is ATen's
convolution backward on the same padded copy.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def past_frames(kernel_t: int, stride_t: int, dilation_t: int) -> int:
    """P, the number of past frames a causal conv needs before each chunk."""
    return dilation_t * (kernel_t - 1) + 1 - stride_t


def past_input(x: torch.Tensor, P: int, time_pad_mode: str, cache: Optional[torch.Tensor]) -> torch.Tensor:
    """The P frames in front of x: the cache, or zeros, or copies of frame 0.  (B, C, P, H, W)"""
    if cache is not None:
        return cache
    if time_pad_mode == "replicate":
        return x[:, :, :1].expand(-1, -1, P, -1, -1)
    return x.new_zeros(x.shape[0], x.shape[1], P, x.shape[3], x.shape[4])


def causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  stride=(1, 1, 1), dilation=(1, 1, 1), padding=(0, 0), time_pad_mode: str = "zeros",
                  cache: Optional[torch.Tensor] = None):
    """-> (y (B, O, T/st, H', W'), new_cache (B, C, P, H, W))."""
    kt = weight.shape[2]
    P = past_frames(kt, stride[0], dilation[0])
    xp = torch.cat([past_input(x, P, time_pad_mode, cache), x], dim=2)  # (B, C, P+T, H, W)
    y = F.conv3d(xp, weight, bias, stride=stride, padding=(0, padding[0], padding[1]), dilation=dilation)
    new_cache = xp[:, :, xp.shape[2] - P:].clone()                # (B, C, P, H, W)
    return y, new_cache


def causal_conv3d_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           cache: Optional[torch.Tensor] = None, stride=(1, 1, 1), dilation=(1, 1, 1),
                           padding=(0, 0), time_pad_mode: str = "zeros"):
    """-> (grad_x (B, C, T, H, W), grad_past (B, C, P, H, W), grad_weight, grad_bias (O,)).

    grad_past is the gradient of the padded past frames; the caller routes it to the
    cache, to frame 0 (replicate) or nowhere (zeros)."""
    P = past_frames(weight.shape[2], stride[0], dilation[0])
    xp = torch.cat([past_input(x, P, time_pad_mode, cache), x], dim=2)   # (B, C, P+T, H, W)
    conv_padding = (0, padding[0], padding[1])
    grad_xp = torch.nn.grad.conv3d_input(xp.shape, weight, grad_y, stride, conv_padding, dilation)
    grad_weight = torch.nn.grad.conv3d_weight(xp, weight.shape, grad_y, stride, conv_padding, dilation)
    return grad_xp[:, :, P:], grad_xp[:, :, :P], grad_weight, grad_y.sum((0, 2, 3, 4))
