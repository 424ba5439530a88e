"""Argument checks and named codes shared by the public ops (pyratok.ops) and modules (pyratok.nn).

Every check raises a ``TypeError``/``ValueError`` that names the argument.  The C++ kernel ops
(csrc/) check their own arguments again so that a direct call never crashes; the messages the
public API gives are the ones here.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

# K ranges: binary codes / bit labels hold up to 64 bits, int64 indices up to 63
MAX_CODE_BITS = 64
MAX_INDEX_BITS = 63
MAX_LEVELS = 32


class IndexKind(IntEnum):
    """What pyratok::binary_quantize returns next to the codes (the int codes the C++ and
    Triton kernels take as ``index_kind``)."""

    NONE = 0         # nothing (an empty tensor)
    INDICES = 1      # MSB-first integer indices
    BIT_LABELS = 2   # (..., K) uint8 bits


# The integer helper ops (pyratok::bits_to_indices, pack_bits) take K from the last axis of
# their input; their schema keeps a K argument (shared with the ops that need one), passed as:
K_FROM_INPUT = -1


class ConvAlgorithm(IntEnum):
    """The cpu backend's causal_conv3d forward (the codes csrc/torch/causal_conv3d.cpp takes)."""

    AUTO = 0      # Winograd F(2x2, 3x3) for wide fp32 layers, else direct (backend "cpu")
    DIRECT = 1    # the direct implicit GEMM (backend "cpu:direct")
    WINOGRAD = 2  # Winograd wherever the geometry allows, in every dtype (backend "cpu:winograd")


# ---------------------------------------------------------------------------------------
# tensors


def is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return _is_fake(t) or t.device.type == "meta"


def check_float(x, name: str = "x", like: Optional[torch.Tensor] = None) -> None:
    """A float tensor; with ``like``, of like's dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    if like is not None and (x.dtype != like.dtype or x.device != like.device):
        raise TypeError(f"{name}: expected {like.dtype} on {like.device} like x, got {x.dtype} on {x.device}")


def check_dim(dim: int, ndim: int, name: str = "dim") -> int:
    """dim in [-ndim, ndim) -> dim in [0, ndim)."""
    if not isinstance(dim, int):
        raise TypeError(f"{name}: expected an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a {ndim}-D tensor")
    return dim % ndim


def check_K(K, lo: int, hi: int, what: str, name: str = "K") -> int:
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"{name}: expected an int, got {type(K).__name__}")
    if not lo <= K <= hi:
        raise ValueError(f"{name}={K}: {what} need {lo} <= K <= {hi}")
    return K


def check_num_bits(num_bits: int, bit_labels: bool) -> int:
    """BinaryQuantizer's K: 1..64, 64 only with bit labels (indices hold at most 63 bits)."""
    if not 1 <= num_bits <= MAX_CODE_BITS:
        raise ValueError(f"num_bits={num_bits}: expected 1..{MAX_CODE_BITS}")
    if num_bits > MAX_INDEX_BITS and not bit_labels:
        raise ValueError(f"num_bits={num_bits}: indices hold at most {MAX_INDEX_BITS} bits; pass bit_labels=True")
    return num_bits


def check_indices(indices, K: int, name: str = "indices") -> None:
    """int32/int64 indices in [0, 2^K) (the range is read only outside compile / fake tensors)."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected an int32 or int64 tensor, got {indices.dtype}")
    if indices.numel() and not torch.compiler.is_compiling() and not is_fake(indices):  # reads data
        lo, hi = torch.aminmax(indices)
        if lo.item() < 0 or hi.item() >= (1 << K):
            raise ValueError(f"{name}: values must lie in [0, 2^{K}) for K={K}; "
                             f"got min {lo.item()}, max {hi.item()}")


def check_bits(bits, name: str = "bits") -> None:
    if not isinstance(bits, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(bits).__name__}")
    if bits.dtype not in (torch.uint8, torch.bool):
        raise TypeError(f"{name}: expected a uint8 or bool tensor, got {bits.dtype}")
    if bits.dim() < 1:
        raise ValueError(f"{name}: expected at least one dimension (the bit axis last)")


def check_packed(packed, K) -> None:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed: expected a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K={K!r}: expected a positive int (the number of bits per row)")
    if packed.dim() < 1 or packed.shape[-1] != (K + 7) // 8:
        got = packed.shape[-1] if packed.dim() else "a 0-D tensor"
        raise ValueError(f"packed: last axis must hold ceil(K/8)={(K + 7) // 8} bytes for K={K}, got {got}")


# ---------------------------------------------------------------------------------------
# numbers and sizes


def check_number(value, name: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value}: expected a finite number")
    if positive and not value > 0:
        raise ValueError(f"{name}={value}: expected a positive number")
    return float(value)


def triple(v, name: str) -> tuple[int, int, int]:
    """A positive int or 3 of them (kernel size, stride, dilation of a 3D conv)."""
    t = (v,) * 3 if isinstance(v, int) else tuple(v)
    if len(t) != 3 or any(not isinstance(i, int) or i < 1 for i in t):
        raise ValueError(f"{name}: expected a positive int or 3 positive ints, got {v!r}")
    return t


def pair(v, name: str) -> tuple[int, int]:
    """A non-negative int or 2 of them (spatial padding (H, W))."""
    t = (v,) * 2 if isinstance(v, int) else tuple(v)
    if len(t) != 2 or any(not isinstance(i, int) or i < 0 for i in t):
        raise ValueError(f"{name}: expected a non-negative int or 2 of them (H, W), got {v!r}")
    return t
