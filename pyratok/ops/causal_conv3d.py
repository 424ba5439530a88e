"""Causal 3D convolution with an explicit streaming cache (DESIGN.md §2.3).

Interim: this runs the reference (pyratok/reference/causal_conv3d.py) behind the final
argument checking and signature; the C++/CUDA/Triton implementations and the registered
custom op replace its body (issue: causal conv3d).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from pyratok.reference import causal_conv3d as ref

IntOr3 = Union[int, Sequence[int]]


def _triple(v, name: str):
    t = (v,) * 3 if isinstance(v, int) else tuple(v)
    if len(t) != 3 or any(not isinstance(i, int) or i < 1 for i in t):
        raise ValueError(f"{name}: expected a positive int or 3 positive ints, got {v!r}")
    return t


def _pair(v, name: str):
    t = (v,) * 2 if isinstance(v, int) else tuple(v)
    if len(t) != 2 or any(not isinstance(i, int) or i < 0 for i in t):
        raise ValueError(f"{name}: expected a non-negative int or 2 of them (H, W), got {v!r}")
    return t


def causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  stride: IntOr3 = 1, dilation: IntOr3 = 1, padding=0, time_pad_mode: str = "zeros",
                  cache: Optional[torch.Tensor] = None, backend: Optional[str] = None):
    """y, new_cache = causal_conv3d(x (B,C,T,H,W), weight (O,C,kt,kh,kw), ...).

    Past padding P = dt*(kt-1) + 1 - st frames from ``cache`` (B, C, P, H, W) or, for the
    first chunk, zeros / replicated frame 0; spatial zero ``padding`` (ph, pw).
    """
    stride, dilation, padding = _triple(stride, "stride"), _triple(dilation, "dilation"), _pair(padding, "padding")
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        raise ValueError(f"x: expected a 5-D tensor (B, C, T, H, W), got shape {tuple(getattr(x, 'shape', ()))}")
    if weight.dim() != 5:
        raise ValueError(f"weight: expected (out, in, kt, kh, kw), got shape {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x: has {x.shape[1]} channels but weight expects {weight.shape[1]}")
    if time_pad_mode not in ("zeros", "replicate"):
        raise ValueError(f"time_pad_mode={time_pad_mode!r}: expected 'zeros' or 'replicate'")
    P = ref.past_frames(weight.shape[2], stride[0], dilation[0])
    if P < 0:
        raise ValueError(f"stride[0]={stride[0]} exceeds the temporal receptive field {dilation[0] * (weight.shape[2] - 1) + 1}")
    if x.shape[2] % stride[0]:
        raise ValueError(f"x: chunk of {x.shape[2]} frames is not a multiple of the temporal stride {stride[0]}")
    if cache is not None:
        want = (x.shape[0], x.shape[1], P, x.shape[3], x.shape[4])
        if tuple(cache.shape) != want:
            raise ValueError(f"cache: shape {tuple(cache.shape)} does not fit this layer and input; expected {want}")
    return ref.causal_conv3d(x, weight, bias, stride, dilation, padding, time_pad_mode, cache)
