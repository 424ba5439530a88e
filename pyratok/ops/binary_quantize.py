"""Bit-plane binary quantization ops (DESIGN.md §2.1): the public functional API.

Every function checks its arguments (pyratok/ops/_checks.py: a clear ``TypeError``/``ValueError``
naming the argument) and calls one op declared with pyratok/ops/_define.py in the ``pyratok``
namespace, which picks the backend: its ``allocate`` function is the fake kernel
(torch.compile / meta tensors) and, where it has a float output, it has a straight-through
autograd formula.  The backends:

  reference  pyratok/reference/binary_quantize.py (readable PyTorch)
  cpu, cuda  torch.ops.pyratok._<op>.out from the C++ extension (csrc/), writing into the
             outputs allocate made
  triton     kernels/binary_quantize.py

All of them agree bit-exactly on indices, bits and codes.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from pyratok.ops._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,  # noqa: F401  (re-exported)
    K_FROM_INPUT,
    MAX_CODE_BITS,
    MAX_INDEX_BITS,
    MAX_LEVELS,
    IndexKind,
    check_bits,
    check_dim,
    check_float,
    check_indices,
    check_K,
    check_packed,
)
from pyratok.ops._define import define
from pyratok.reference import binary_quantize as ref


class BinaryQuantized(NamedTuple):
    """Result of :func:`binary_quantize`; fields not asked for are ``None``."""

    codes: Optional[torch.Tensor]    # like x: +-scale per channel, straight-through gradient
    indices: Optional[torch.Tensor]  # x.shape without dim; int32 (K<=31) / int64 (K<=63), MSB-first
    bits: Optional[torch.Tensor]     # x.shape without dim + (K,), uint8 bit labels (K<=64)


# ---------------------------------------------------------------------------------------
# layouts shared by allocate (the fake kernels) and the Python-launched backends


def _channel_layout(x: torch.Tensor, dim: int):
    """(x_used, (outer, K, inner, s_outer, s_k, s_inner)), as csrc/torch/binary_quantize.cpp."""
    K = x.shape[dim]
    outer = math.prod(x.shape[:dim])
    inner = math.prod(x.shape[dim + 1:])
    if not x.is_contiguous() and x.movedim(dim, -1).is_contiguous():
        return x, (outer, K, inner, inner * K, 1, K)
    x = x.contiguous()
    return x, (outer, K, inner, K * inner, inner, 1)


def _empty_codes(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Codes keep a channel-last-dense x's strides; every other x gives contiguous codes."""
    if not x.is_contiguous() and x.movedim(dim, -1).is_contiguous():
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _rest(shape, dim: int) -> list[int]:
    return list(shape[:dim]) + list(shape[dim + 1:])


def _tk():
    from pyratok.kernels import binary_quantize as tk

    return tk


# ---------------------------------------------------------------------------------------
# the ops: one declaration each (pyratok/ops/_define.py)


@define("binary_quantize", family="binary_quantize", native="_binary_quantize")
def _binary_quantize_op(x: torch.Tensor, dim: int, scale: float, want_codes: bool,
                        index_kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes or an empty tensor, indices / bit labels / an empty tensor, as IndexKind says)."""
    K = x.shape[dim]
    rest = _rest(x.shape, dim)
    codes = _empty_codes(x, dim) if want_codes else x.new_empty(0)
    if index_kind == IndexKind.INDICES:
        second = x.new_empty(rest, dtype=ref.index_dtype(K))
    elif index_kind == IndexKind.BIT_LABELS:
        second = x.new_empty(rest + [K], dtype=torch.uint8)
    else:
        second = x.new_empty(0, dtype=ref.index_dtype(min(K, MAX_INDEX_BITS)))
    return codes, second


@_binary_quantize_op.impl("reference", into=True)
def _(x, dim, scale, want_codes, index_kind, out):
    codes, second = out
    # codes on their own, so that K = 64 (bit labels, no index) works as on the other backends
    if want_codes:
        codes.copy_(ref.binary_codes(x, scale))
    if index_kind == IndexKind.INDICES:
        second.copy_(ref.bits_to_indices(ref.binary_quantize_bits(x, dim)))
    if index_kind == IndexKind.BIT_LABELS:
        second.copy_(ref.binary_quantize_bits(x, dim))


@_binary_quantize_op.impl("triton", into=True)
def _(x, dim, scale, want_codes, index_kind, out):
    codes, second = out
    xv, layout = _channel_layout(x, dim)
    _tk().binary_quantize(xv, layout, codes, scale, want_codes, index_kind,
                          second if index_kind == IndexKind.INDICES else None,
                          second if index_kind == IndexKind.BIT_LABELS else None)


def _quantize_setup(ctx, inputs, output):
    ctx.want_codes = inputs[3]


def _quantize_backward(ctx, grad_codes, grad_second):
    # straight-through: d codes / d x = identity
    return (grad_codes if ctx.want_codes else None), None, None, None, None, None


_binary_quantize_op.autograd(_quantize_backward, _quantize_setup)


@define("residual_binary_quantize", family="binary_quantize", native="_residual_binary_quantize")
def _residual_op(x: torch.Tensor, levels: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes like x, indices (levels, *x.shape without dim))."""
    return _empty_codes(x, dim), x.new_empty([levels] + _rest(x.shape, dim), dtype=ref.index_dtype(x.shape[dim]))


@_residual_op.impl("reference", into=True)
def _(x, levels, dim, out):
    codes, indices = ref.residual_binary_quantize(x, levels, dim)
    out[0].copy_(codes)
    out[1].copy_(indices)


@_residual_op.impl("triton", into=True)
def _(x, levels, dim, out):
    xv, layout = _channel_layout(x, dim)
    _tk().residual_binary_quantize(xv, layout, out[0], out[1], levels)


_residual_op.autograd(lambda ctx, gc, gi: (gc, None, None, None), lambda ctx, inputs, output: None)


@define("indices_to_codes", family="binary_quantize", native="_indices_to_codes")
def _indices_to_codes_op(indices: torch.Tensor, K: int, dim: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    shape = list(indices.shape)
    shape.insert(dim, K)
    return indices.new_empty(shape, dtype=dtype)


@_indices_to_codes_op.impl("reference", into=True)
def _(indices, K, dim, scale, dtype, codes):
    codes.copy_(ref.indices_to_codes(indices, K, dim, scale, dtype))


@_indices_to_codes_op.impl("triton", into=True)
def _(indices, K, dim, scale, dtype, codes):
    outer, inner = math.prod(codes.shape[:dim]), math.prod(codes.shape[dim + 1:])
    _tk().indices_to_codes(indices.contiguous(), (outer, K, inner, K * inner, inner, 1), codes, scale)


def _integer_op(name: str, allocate, reference_fn, triton_launch):
    """pyratok::<name>(Tensor t, int K, str backend) -> Tensor, the integer helper ops.  Those
    that read K off the input's last axis are called with K_FROM_INPUT."""
    op = define(name, family="binary_quantize", native=f"_{name}")(allocate)
    op.impl("reference", into=True)(lambda t, K, out: out.copy_(reference_fn(t, K)))
    op.impl("triton", into=True)(lambda t, K, out: triton_launch(_tk(), t.contiguous(), K, out))
    return op


def _bits_out(t: torch.Tensor, K: int) -> torch.Tensor:
    return t.new_empty(list(t.shape) + [K], dtype=torch.uint8)


def _indices_out(t: torch.Tensor, K: int) -> torch.Tensor:
    return t.new_empty(t.shape[:-1], dtype=ref.index_dtype(t.shape[-1]))


def _packed_out(t: torch.Tensor, K: int) -> torch.Tensor:
    return t.new_empty(list(t.shape[:-1]) + [(t.shape[-1] + 7) // 8], dtype=torch.uint8)


def _unpacked_out(t: torch.Tensor, K: int) -> torch.Tensor:
    return t.new_empty(list(t.shape[:-1]) + [K], dtype=torch.uint8)


def _reversed_out(t: torch.Tensor, K: int) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


_indices_to_bits_op = _integer_op(
    "indices_to_bits", _bits_out, ref.indices_to_bits, lambda tk, t, K, out: tk.indices_to_bits(t, K, out))
_bits_to_indices_op = _integer_op(
    "bits_to_indices", _indices_out, lambda t, K: ref.bits_to_indices(t),
    lambda tk, t, K, out: tk.bits_to_indices(t.to(torch.uint8), out))
_pack_bits_op = _integer_op(
    "pack_bits", _packed_out, lambda t, K: ref.pack_bits(t),
    lambda tk, t, K, out: tk.pack_bits(t.to(torch.uint8), out))
_unpack_bits_op = _integer_op(
    "unpack_bits", _unpacked_out, ref.unpack_bits, lambda tk, t, K, out: tk.unpack_bits(t, K, out))
_reverse_bit_order_op = _integer_op(
    "reverse_bit_order", _reversed_out, ref.reverse_bit_order,
    lambda tk, t, K, out: tk.reverse_bit_order(t, K, out))


# ---------------------------------------------------------------------------------------
# public API


def binary_quantize(x: torch.Tensor, dim: int = 1, spherical: bool = False, return_codes: bool = True,
                    return_indices: bool = True, bit_labels: bool = False,
                    backend: Optional[str] = None) -> BinaryQuantized:
    """Binary (lookup-free) quantization of the K channels on axis ``dim``.

    x: float tensor, e.g. (B, K, T, H, W) with ``dim=1`` or (..., K) with ``dim=-1``;
    any strides (channel-first and channels-last run in place).  bit k = 1 iff x_k > 0.

    Returns :class:`BinaryQuantized` with
      codes   (like x): +1/-1 (``spherical=True``: +-1/sqrt(K), the BSQ codes of the
              L2-normalised x, gradient through the normalisation); straight-through
              gradient d codes / d x = identity;
      indices (x.shape without dim): MSB-first, int32 for K <= 31, int64 for K <= 63;
      bits    (x.shape without dim, K) uint8 when ``bit_labels=True`` (K up to 64).
    """
    check_float(x)
    dim = check_dim(dim, x.dim())
    K = x.shape[dim]
    check_K(K, 1, MAX_CODE_BITS, "binary codes", name=f"x.shape[{dim}] (K)")
    want_indices = return_indices and not bit_labels
    if want_indices and K > MAX_INDEX_BITS:
        raise ValueError(f"x.shape[{dim}] (K)={K}: int64 indices hold at most 63 bits; "
                         "pass bit_labels=True for K=64")
    kind = IndexKind.BIT_LABELS if bit_labels else (IndexKind.INDICES if return_indices else IndexKind.NONE)
    if not return_codes and kind == IndexKind.NONE:
        raise ValueError("nothing requested: return_codes, return_indices and bit_labels are all False")
    scale = 1.0 / math.sqrt(K) if spherical else 1.0
    codes, second = _binary_quantize_op(x, dim, scale, return_codes, int(kind), backend=backend)
    if return_codes and spherical and x.requires_grad:
        # value: the BSQ code exactly; gradient: through the L2 normalisation of x
        xn = F.normalize(x, dim=dim)
        codes = codes.detach() + (xn - xn.detach())
    return BinaryQuantized(
        codes if return_codes else None,
        second if kind == IndexKind.INDICES else None,
        second if kind == IndexKind.BIT_LABELS else None,
    )


def residual_binary_quantize(x: torch.Tensor, levels: int, dim: int = 1, backend: Optional[str] = None):
    """Fused multi-level bit-plane coding: level i quantizes the residual with scale 2^-i.

    Returns ``(codes, indices)``: codes (like x) = sum_i c_i with a straight-through
    gradient, indices (levels, *x.shape without dim) MSB-first per level.  The
    residual is carried in fp32 (fp64 for fp64 input).
    """
    check_float(x)
    dim = check_dim(dim, x.dim())
    check_K(x.shape[dim], 1, MAX_INDEX_BITS, "per-level indices", name=f"x.shape[{dim}] (K)")
    check_K(levels, 1, MAX_LEVELS, "bit-plane levels", name="levels")
    return _residual_op(x, levels, dim, backend=backend)


def indices_to_codes(indices: torch.Tensor, K: int, spherical: bool = False, dim: int = 1,
                     dtype: torch.dtype = torch.float32, backend: Optional[str] = None) -> torch.Tensor:
    """MSB-first indices (...) -> codes with a K axis inserted at ``dim`` (default 1:
    (B, T, H, W) -> (B, K, T, H, W)); +-1, or +-1/sqrt(K) when ``spherical``."""
    check_K(K, 1, MAX_INDEX_BITS, "indices")
    check_indices(indices, K)
    dim = check_dim(dim, indices.dim() + 1)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
    scale = 1.0 / math.sqrt(K) if spherical else 1.0
    return _indices_to_codes_op(indices, K, dim, scale, dtype, backend=backend)


def indices_to_bits(indices: torch.Tensor, K: int, backend: Optional[str] = None) -> torch.Tensor:
    """MSB-first indices (...) -> (..., K) uint8 bits."""
    check_K(K, 1, MAX_INDEX_BITS, "indices")
    check_indices(indices, K)
    return _indices_to_bits_op(indices, K, backend=backend)


def bits_to_indices(bits: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """(..., K) bits (uint8 or bool, nonzero = 1) -> MSB-first indices (...)."""
    check_bits(bits)
    check_K(bits.shape[-1], 1, MAX_INDEX_BITS, "indices", name="bits.shape[-1] (K)")
    return _bits_to_indices_op(bits, K_FROM_INPUT, backend=backend)


def pack_bits(bits: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """(..., K) bits -> (..., ceil(K/8)) uint8, MSB-first in each byte (numpy.packbits order).

    Packing the transpose of (N, K) token bits gives K bit planes of ceil(N/8) bytes.
    """
    check_bits(bits)
    if bits.shape[-1] < 1:
        raise ValueError("bits: the last axis (the bits to pack) is empty")
    return _pack_bits_op(bits, K_FROM_INPUT, backend=backend)


def unpack_bits(packed: torch.Tensor, K: int, backend: Optional[str] = None) -> torch.Tensor:
    """(..., ceil(K/8)) uint8 -> (..., K) uint8 bits; the inverse of :func:`pack_bits`."""
    check_packed(packed, K)
    return _unpack_bits_op(packed, K, backend=backend)


def msb_to_lsb(indices: torch.Tensor, K: int, backend: Optional[str] = None) -> torch.Tensor:
    """MSB-first (pyratok, vector-quantize-pytorch) -> LSB-first (Open-MAGVIT2) indices."""
    check_K(K, 1, MAX_INDEX_BITS, "indices")
    check_indices(indices, K)
    return _reverse_bit_order_op(indices, K, backend=backend)


def lsb_to_msb(indices: torch.Tensor, K: int, backend: Optional[str] = None) -> torch.Tensor:
    """LSB-first (Open-MAGVIT2) -> MSB-first indices; bit reversal is its own inverse."""
    return msb_to_lsb(indices, K, backend)
