"""Readable PyTorch reference for bit-plane binary quantization (DESIGN.md §2.1).

This module is the oracle every backend is tested against and the baseline of
benchmarks/bench_binary_quantize.py.  It favours clarity over speed and works in
any float dtype, float64 included.

Conventions
-----------
* ``x`` has its K code channels on axis ``dim`` (default 1: ``(B, K, T, H, W)``).
* bit = 1 iff ``x > 0``; so +0, -0 and NaN all give bit 0.
* code value = ``+scale`` for bit 1 and ``-scale`` for bit 0, in ``x.dtype``.
* index is MSB-first: channel 0 is bit ``K-1`` of the integer (the order of
  vector-quantize-pytorch's LFQ).  int32 for K <= 31, int64 for K <= 63.
* All index arithmetic is integer (shift/or), never float sums.
"""

from __future__ import annotations

import torch


def index_dtype(K: int) -> torch.dtype:
    """Integer dtype that holds a K-bit index: int32 up to K=31, int64 up to K=63."""
    if not 1 <= K <= 63:
        raise ValueError(f"K={K}: indices exist for 1 <= K <= 63 (use bit labels for K=64)")
    return torch.int32 if K <= 31 else torch.int64


def _bits_last(x: torch.Tensor, dim: int) -> torch.Tensor:
    # (..., K, ...) float -> (..., ..., K) bool, channel axis moved last
    return (x > 0).movedim(dim, -1)


def bits_to_indices(bits: torch.Tensor) -> torch.Tensor:
    """(..., K) bits (nonzero = 1) -> (...,) MSB-first integer index."""
    K = bits.shape[-1]
    out = torch.zeros(bits.shape[:-1], dtype=torch.int64, device=bits.device)
    for k in range(K):
        out = (out << 1) | (bits[..., k] != 0).to(torch.int64)
    return out.to(index_dtype(K))


def indices_to_bits(indices: torch.Tensor, K: int) -> torch.Tensor:
    """(...,) MSB-first index -> (..., K) uint8 bits."""
    shifts = torch.arange(K - 1, -1, -1, device=indices.device, dtype=torch.int64)
    return ((indices.to(torch.int64)[..., None] >> shifts) & 1).to(torch.uint8)


def binary_codes(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x float -> codes like x: +scale where x > 0, else -scale (any K, 64 included)."""
    return torch.where(x > 0, torch.tensor(scale, dtype=x.dtype), torch.tensor(-scale, dtype=x.dtype))


def binary_quantize(x: torch.Tensor, dim: int = 1, scale: float = 1.0):
    """x (.., K, ..) float -> (codes like x, indices (.., ..) int32/int64)."""
    return binary_codes(x, scale), bits_to_indices(_bits_last(x, dim))


def binary_quantize_bits(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x (.., K, ..) float -> (.., .., K) uint8 bit labels (K up to 64)."""
    return _bits_last(x, dim).to(torch.uint8)


def indices_to_codes(indices: torch.Tensor, K: int, dim: int = 1, scale: float = 1.0,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(...,) index -> codes with a new K axis inserted at ``dim``."""
    bits = indices_to_bits(indices, K).movedim(-1, dim)
    pos = torch.tensor(scale, dtype=dtype)
    return torch.where(bits.bool(), pos, -pos)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., K) bits (nonzero = 1) -> (..., ceil(K/8)) uint8, MSB-first in each byte.

    Byte j holds bits 8j..8j+7, bit 8j in its most significant position: the
    layout of ``numpy.packbits(bits, axis=-1, bitorder="big")``.  Packing the
    transpose ``(K, N)`` gives K bit planes of ceil(N/8) bytes each.
    """
    K = bits.shape[-1]
    nbytes = (K + 7) // 8
    padded = torch.zeros(*bits.shape[:-1], nbytes * 8, dtype=torch.int32, device=bits.device)
    padded[..., :K] = (bits != 0).to(torch.int32)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32, device=bits.device)
    return (padded.unflatten(-1, (nbytes, 8)) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, K: int) -> torch.Tensor:
    """(..., ceil(K/8)) uint8 -> (..., K) uint8 bits; inverse of pack_bits."""
    shifts = torch.arange(7, -1, -1, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32)[..., None] >> shifts) & 1
    return bits.flatten(-2)[..., :K].to(torch.uint8)


def reverse_bit_order(indices: torch.Tensor, K: int) -> torch.Tensor:
    """MSB-first <-> LSB-first (Open-MAGVIT2) index order; an involution."""
    return bits_to_indices(indices_to_bits(indices, K).flip(-1)).to(indices.dtype)


def residual_binary_quantize(x: torch.Tensor, levels: int, dim: int = 1):
    """Multi-level bit-plane coding of x.

    Level i (0-based) quantizes the residual with scale 2^-i:
        c_i = where(r_i > 0, +2^-i, -2^-i),  r_(i+1) = r_i - c_i,  r_0 = x.
    The residual is carried in fp32 (fp64 for fp64 input); the returned codes are
    sum_i c_i in x.dtype, and indices are (levels, ..) MSB-first per level.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = x.to(work)
    total = torch.zeros_like(r)
    level_indices = []
    for i in range(levels):
        c, idx = binary_quantize(r, dim, 2.0 ** -i)
        level_indices.append(idx)
        total = total + c
        r = r - c
    return total.to(x.dtype), torch.stack(level_indices)
