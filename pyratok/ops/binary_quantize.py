"""Bit-plane binary quantization ops (DESIGN.md §2.1): the public functional API.

Every function checks its arguments (a clear ``TypeError``/``ValueError`` naming the
argument), picks a backend (pyratok._backend) and calls one registered custom op in the
``pyratok`` namespace.  Each custom op has a fake kernel (torch.compile / meta tensors)
and, where it has a float output, a straight-through autograd formula.  The backends:

  reference  pyratok/reference/binary_quantize.py (readable PyTorch)
  cpu, cuda  torch.ops.pyratok._<op> from the C++ extension (csrc/)
  triton     kernels/binary_quantize.py

All of them agree bit-exactly on indices, bits and codes.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from pyratok import _backend
from pyratok.reference import binary_quantize as ref

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

# index_kind values shared with the C++ and Triton kernels
_NO_INDEX, _INDICES, _BIT_LABELS = 0, 1, 2


class BinaryQuantized(NamedTuple):
    """Result of :func:`binary_quantize`; fields not asked for are ``None``."""

    codes: Optional[torch.Tensor]    # like x: +-scale per channel, straight-through gradient
    indices: Optional[torch.Tensor]  # x.shape without dim; int32 (K<=31) / int64 (K<=63), MSB-first
    bits: Optional[torch.Tensor]     # x.shape without dim + (K,), uint8 bit labels (K<=64)


# ---------------------------------------------------------------------------------------
# argument checking


def _check_float(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}")


def _check_dim(dim: int, ndim: int, name: str = "dim") -> int:
    if not isinstance(dim, int):
        raise TypeError(f"{name}: expected an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a {ndim}-D tensor")
    return dim % ndim


def _check_K(K, lo: int, hi: int, what: str, name: str = "K") -> int:
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"{name}: expected an int, got {type(K).__name__}")
    if not lo <= K <= hi:
        raise ValueError(f"{name}={K}: {what} need {lo} <= K <= {hi}")
    return K


def _check_indices(indices, K: int, name: str = "indices") -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name}: expected an int32 or int64 tensor, got {indices.dtype}")
    if indices.numel() and not torch.compiler.is_compiling() and not _is_fake(indices):  # reads data
        lo, hi = torch.aminmax(indices)
        if lo.item() < 0 or hi.item() >= (1 << K):
            raise ValueError(f"{name}: values must lie in [0, 2^{K}) for K={K}; "
                             f"got min {lo.item()}, max {hi.item()}")


def _check_bits(bits, name: str = "bits") -> None:
    if not isinstance(bits, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(bits).__name__}")
    if bits.dtype not in (torch.uint8, torch.bool):
        raise TypeError(f"{name}: expected a uint8 or bool tensor, got {bits.dtype}")
    if bits.dim() < 1:
        raise ValueError(f"{name}: expected at least one dimension (the bit axis last)")


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t) or t.device.type == "meta"


# ---------------------------------------------------------------------------------------
# layouts shared by fake kernels and Python-launched backends


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


def _empty_outputs(x: torch.Tensor, dim: int, want_codes: bool, index_kind: int):
    K = x.shape[dim]
    rest = _rest(x.shape, dim)
    codes = _empty_codes(x, dim) if want_codes else x.new_empty(0)
    if index_kind == _INDICES:
        second = x.new_empty(rest, dtype=ref.index_dtype(K))
    elif index_kind == _BIT_LABELS:
        second = x.new_empty(rest + [K], dtype=torch.uint8)
    else:
        second = x.new_empty(0, dtype=ref.index_dtype(min(K, 63)))
    return codes, second


# ---------------------------------------------------------------------------------------
# per-backend implementations of each custom op


def _quantize_reference(x, dim, scale, want_codes, index_kind):
    codes, second = _empty_outputs(x, dim, want_codes, index_kind)
    # codes on their own, so that K = 64 (bit labels, no index) works as on the other backends
    if want_codes:
        codes.copy_(ref.binary_codes(x, scale))
    if index_kind == _INDICES:
        second.copy_(ref.bits_to_indices(ref.binary_quantize_bits(x, dim)))
    if index_kind == _BIT_LABELS:
        second.copy_(ref.binary_quantize_bits(x, dim))
    return codes, second


def _quantize_triton(x, dim, scale, want_codes, index_kind):
    from pyratok.kernels import binary_quantize as tk

    codes, second = _empty_outputs(x, dim, want_codes, index_kind)
    xv, layout = _channel_layout(x, dim)
    tk.binary_quantize(xv, layout, codes, scale, want_codes, index_kind,
                       second if index_kind == _INDICES else None,
                       second if index_kind == _BIT_LABELS else None)
    return codes, second


@torch.library.custom_op("pyratok::binary_quantize", mutates_args=())
def _binary_quantize_op(x: torch.Tensor, dim: int, scale: float, want_codes: bool,
                        index_kind: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend in ("cpu", "cuda"):
        return torch.ops.pyratok._binary_quantize(x, dim, scale, want_codes, index_kind)
    if backend == "triton":
        return _quantize_triton(x, dim, scale, want_codes, index_kind)
    return _quantize_reference(x, dim, scale, want_codes, index_kind)


@_binary_quantize_op.register_fake
def _(x, dim, scale, want_codes, index_kind, backend):
    return _empty_outputs(x, dim, want_codes, index_kind)


def _quantize_setup(ctx, inputs, output):
    ctx.want_codes = inputs[3]


def _quantize_backward(ctx, grad_codes, grad_second):
    # straight-through: d codes / d x = identity
    return (grad_codes if ctx.want_codes else None), None, None, None, None, None


_binary_quantize_op.register_autograd(_quantize_backward, setup_context=_quantize_setup)


def _residual_reference(x, levels, dim):
    codes, indices = ref.residual_binary_quantize(x, levels, dim)
    out = _empty_codes(x, dim)
    out.copy_(codes)
    return out, indices.contiguous()


def _residual_triton(x, levels, dim):
    from pyratok.kernels import binary_quantize as tk

    codes = _empty_codes(x, dim)
    indices = x.new_empty([levels] + _rest(x.shape, dim), dtype=ref.index_dtype(x.shape[dim]))
    xv, layout = _channel_layout(x, dim)
    tk.residual_binary_quantize(xv, layout, codes, indices, levels)
    return codes, indices


@torch.library.custom_op("pyratok::residual_binary_quantize", mutates_args=())
def _residual_op(x: torch.Tensor, levels: int, dim: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend in ("cpu", "cuda"):
        return torch.ops.pyratok._residual_binary_quantize(x, levels, dim)
    if backend == "triton":
        return _residual_triton(x, levels, dim)
    return _residual_reference(x, levels, dim)


@_residual_op.register_fake
def _(x, levels, dim, backend):
    return _empty_codes(x, dim), x.new_empty([levels] + _rest(x.shape, dim), dtype=ref.index_dtype(x.shape[dim]))


_residual_op.register_autograd(lambda ctx, gc, gi: (gc, None, None, None))


def _codes_shape(indices: torch.Tensor, K: int, dim: int) -> list[int]:
    shape = list(indices.shape)
    shape.insert(dim, K)
    return shape


@torch.library.custom_op("pyratok::indices_to_codes", mutates_args=())
def _indices_to_codes_op(indices: torch.Tensor, K: int, dim: int, scale: float, dtype: torch.dtype,
                         backend: str) -> torch.Tensor:
    if backend in ("cpu", "cuda"):
        return torch.ops.pyratok._indices_to_codes(indices, K, dim, scale, dtype)
    if backend == "triton":
        from pyratok.kernels import binary_quantize as tk

        codes = indices.new_empty(_codes_shape(indices, K, dim), dtype=dtype)
        outer, inner = math.prod(codes.shape[:dim]), math.prod(codes.shape[dim + 1:])
        tk.indices_to_codes(indices.contiguous(), (outer, K, inner, K * inner, inner, 1), codes, scale)
        return codes
    return ref.indices_to_codes(indices, K, dim, scale, dtype).contiguous()


@_indices_to_codes_op.register_fake
def _(indices, K, dim, scale, dtype, backend):
    return indices.new_empty(_codes_shape(indices, K, dim), dtype=dtype)


def _simple_op(name: str, triton_launch, reference_fn, out_like):
    """Registers pyratok::<name>(Tensor, int, str) -> Tensor for the integer helper ops."""

    @torch.library.custom_op(f"pyratok::{name}", mutates_args=())
    def op(t: torch.Tensor, K: int, backend: str) -> torch.Tensor:
        if backend in ("cpu", "cuda"):
            kernel = getattr(torch.ops.pyratok, f"_{name}")
            return kernel(t) if K < 0 else kernel(t, K)
        if backend == "triton":
            from pyratok.kernels import binary_quantize as tk

            out = out_like(t, K)
            triton_launch(tk, t.contiguous(), K, out)
            return out
        return reference_fn(t, K).contiguous()

    op.register_fake(lambda t, K, backend: out_like(t, K))
    return op


def _bits_out(t, K):
    return t.new_empty(list(t.shape) + [K], dtype=torch.uint8)


def _indices_out(t, K):
    return t.new_empty(t.shape[:-1], dtype=ref.index_dtype(t.shape[-1]))


def _packed_out(t, K):
    return t.new_empty(list(t.shape[:-1]) + [(t.shape[-1] + 7) // 8], dtype=torch.uint8)


def _unpacked_out(t, K):
    return t.new_empty(list(t.shape[:-1]) + [K], dtype=torch.uint8)


# K is passed as -1 where the op takes it from the last axis of its input.
_indices_to_bits_op = _simple_op(
    "indices_to_bits", lambda tk, t, K, out: tk.indices_to_bits(t, K, out), ref.indices_to_bits, _bits_out)
_bits_to_indices_op = _simple_op(
    "bits_to_indices", lambda tk, t, K, out: tk.bits_to_indices(t.to(torch.uint8), out),
    lambda t, K: ref.bits_to_indices(t), _indices_out)
_pack_bits_op = _simple_op(
    "pack_bits", lambda tk, t, K, out: tk.pack_bits(t.to(torch.uint8), out),
    lambda t, K: ref.pack_bits(t), _packed_out)
_unpack_bits_op = _simple_op(
    "unpack_bits", lambda tk, t, K, out: tk.unpack_bits(t, K, out), ref.unpack_bits, _unpacked_out)
_reverse_bit_order_op = _simple_op(
    "reverse_bit_order", lambda tk, t, K, out: tk.reverse_bit_order(t, K, out), ref.reverse_bit_order,
    lambda t, K: torch.empty_like(t, memory_format=torch.contiguous_format))


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
    _check_float(x)
    dim = _check_dim(dim, x.dim())
    K = x.shape[dim]
    _check_K(K, 1, 64, "binary codes", name=f"x.shape[{dim}] (K)")
    want_indices = return_indices and not bit_labels
    if want_indices and K > 63:
        raise ValueError(f"x.shape[{dim}] (K)={K}: int64 indices hold at most 63 bits; "
                         "pass bit_labels=True for K=64")
    index_kind = _BIT_LABELS if bit_labels else (_INDICES if return_indices else _NO_INDEX)
    if not return_codes and index_kind == _NO_INDEX:
        raise ValueError("nothing requested: return_codes, return_indices and bit_labels are all False")
    name = _backend.resolve(backend, x.device, "binary_quantize")
    scale = 1.0 / math.sqrt(K) if spherical else 1.0
    codes, second = _binary_quantize_op(x, dim, scale, return_codes, index_kind, name)
    if return_codes and spherical and x.requires_grad:
        # value: the BSQ code exactly; gradient: through the L2 normalisation of x
        xn = F.normalize(x, dim=dim)
        codes = codes.detach() + (xn - xn.detach())
    return BinaryQuantized(
        codes if return_codes else None,
        second if index_kind == _INDICES else None,
        second if index_kind == _BIT_LABELS else None,
    )


def residual_binary_quantize(x: torch.Tensor, levels: int, dim: int = 1, backend: Optional[str] = None):
    """Fused multi-level bit-plane coding: level i quantizes the residual with scale 2^-i.

    Returns ``(codes, indices)``: codes (like x) = sum_i c_i with a straight-through
    gradient, indices (levels, *x.shape without dim) MSB-first per level.  The
    residual is carried in fp32 (fp64 for fp64 input).
    """
    _check_float(x)
    dim = _check_dim(dim, x.dim())
    _check_K(x.shape[dim], 1, 63, "per-level indices", name=f"x.shape[{dim}] (K)")
    _check_K(levels, 1, 32, "bit-plane levels", name="levels")
    return _residual_op(x, levels, dim, _backend.resolve(backend, x.device, "binary_quantize"))


def indices_to_codes(indices: torch.Tensor, K: int, spherical: bool = False, dim: int = 1,
                     dtype: torch.dtype = torch.float32, backend: Optional[str] = None) -> torch.Tensor:
    """MSB-first indices (...) -> codes with a K axis inserted at ``dim`` (default 1:
    (B, T, H, W) -> (B, K, T, H, W)); +-1, or +-1/sqrt(K) when ``spherical``."""
    _check_K(K, 1, 63, "indices")
    _check_indices(indices, K)
    dim = _check_dim(dim, indices.dim() + 1)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
    scale = 1.0 / math.sqrt(K) if spherical else 1.0
    return _indices_to_codes_op(indices, K, dim, scale, dtype, _backend.resolve(backend, indices.device, "binary_quantize"))


def indices_to_bits(indices: torch.Tensor, K: int, backend: Optional[str] = None) -> torch.Tensor:
    """MSB-first indices (...) -> (..., K) uint8 bits."""
    _check_K(K, 1, 63, "indices")
    _check_indices(indices, K)
    return _indices_to_bits_op(indices, K, _backend.resolve(backend, indices.device, "binary_quantize"))


def bits_to_indices(bits: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """(..., K) bits (uint8 or bool, nonzero = 1) -> MSB-first indices (...)."""
    _check_bits(bits)
    _check_K(bits.shape[-1], 1, 63, "indices", name="bits.shape[-1] (K)")
    return _bits_to_indices_op(bits, -1, _backend.resolve(backend, bits.device, "binary_quantize"))


def pack_bits(bits: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """(..., K) bits -> (..., ceil(K/8)) uint8, MSB-first in each byte (numpy.packbits order).

    Packing the transpose of (N, K) token bits gives K bit planes of ceil(N/8) bytes.
    """
    _check_bits(bits)
    if bits.shape[-1] < 1:
        raise ValueError("bits: the last axis (the bits to pack) is empty")
    return _pack_bits_op(bits, -1, _backend.resolve(backend, bits.device, "binary_quantize"))


def unpack_bits(packed: torch.Tensor, K: int, backend: Optional[str] = None) -> torch.Tensor:
    """(..., ceil(K/8)) uint8 -> (..., K) uint8 bits; the inverse of :func:`pack_bits`."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed: expected a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K={K!r}: expected a positive int (the number of bits per row)")
    if packed.dim() < 1 or packed.shape[-1] != (K + 7) // 8:
        got = packed.shape[-1] if packed.dim() else "a 0-D tensor"
        raise ValueError(f"packed: last axis must hold ceil(K/8)={(K + 7) // 8} bytes for K={K}, got {got}")
    return _unpack_bits_op(packed, K, _backend.resolve(backend, packed.device, "binary_quantize"))


def msb_to_lsb(indices: torch.Tensor, K: int, backend: Optional[str] = None) -> torch.Tensor:
    """MSB-first (pyratok, vector-quantize-pytorch) -> LSB-first (Open-MAGVIT2) indices."""
    _check_K(K, 1, 63, "indices")
    _check_indices(indices, K)
    return _reverse_bit_order_op(indices, K, _backend.resolve(backend, indices.device, "binary_quantize"))


def lsb_to_msb(indices: torch.Tensor, K: int, backend: Optional[str] = None) -> torch.Tensor:
    """LSB-first (Open-MAGVIT2) -> MSB-first indices; bit reversal is its own inverse."""
    return msb_to_lsb(indices, K, backend)
