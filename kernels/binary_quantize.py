"""Triton kernels for bit-plane binary quantization (DESIGN.md §2.1).

Layout contract (as csrc/core/binary_quantize.h): x is viewed as (outer, K, inner) with
element strides (s_outer, s_k, s_inner); token t = o*inner + i indexes the dense
per-token outputs (indices, bit labels).  One program handles BLOCK tokens and loops
over the K channels at compile time, so indices are built by integer shift/or.

Code values arrive as the bit pattern of +scale in the output dtype (rounded once by
torch on the host, cached), so every backend writes the same bits for +scale / -scale and
a launch copies nothing to the device (no stream sync; CUDA-graph capture works).  The residual variant carries the
residual in fp32 (fp64 for fp64 input) like the reference.

Cost: N*K elements read, N*K written (+ N indices): memory bound; judged against the
device's copy bandwidth.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pyratok.kernels._launch import on_tensor_device

BLOCK = 128

# the integer type whose bits are a float dtype's bits
_BITS_DTYPE = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
               torch.float64: torch.int64}
_TL_BITS = {torch.float16: tl.int16, torch.bfloat16: tl.int16, torch.float32: tl.int32, torch.float64: tl.int64}


@triton.jit
def _code_value(bits, like, BITS_TYPE: tl.constexpr):
    """+scale in like's dtype from its bit pattern ``bits``; shape of ``like``."""
    return tl.full(like.shape, bits, BITS_TYPE).to(like.dtype, bitcast=True)


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, idx_ptr, bits_ptr, pos_bits, tokens, inner,
                     s_outer, s_k, s_inner,
                     K: tl.constexpr, WANT_CODES: tl.constexpr, INDEX_KIND: tl.constexpr,
                     IDX64: tl.constexpr, BITS_TYPE: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = t < tokens
    o = t // inner
    i = t - o * inner
    base = o * s_outer + i * s_inner
    pos = _code_value(pos_bits, tl.zeros([BLOCK], dtype=codes_ptr.dtype.element_ty), BITS_TYPE)
    if IDX64:
        acc = tl.zeros([BLOCK], dtype=tl.int64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.int32)
    for k in tl.static_range(K):
        off = base + k * s_k
        v = tl.load(x_ptr + off, mask=mask, other=0)
        b = v > 0
        acc = (acc << 1) | b.to(acc.dtype)
        if WANT_CODES:
            tl.store(codes_ptr + off, tl.where(b, pos, -pos), mask=mask)
        if INDEX_KIND == 2:
            tl.store(bits_ptr + t * K + k, b.to(tl.uint8), mask=mask)
    if INDEX_KIND == 1:
        tl.store(idx_ptr + t, acc, mask=mask)


@triton.jit
def _residual_kernel(x_ptr, codes_ptr, idx_ptr, tokens, inner, s_outer, s_k, s_inner,
                     K: tl.constexpr, LEVELS: tl.constexpr, LEVELS_P2: tl.constexpr,
                     IDX64: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = t < tokens
    o = t // inner
    i = t - o * inner
    base = o * s_outer + i * s_inner
    level = tl.arange(0, LEVELS_P2)
    if IDX64:
        acc = tl.zeros([BLOCK, LEVELS_P2], dtype=tl.int64)
    else:
        acc = tl.zeros([BLOCK, LEVELS_P2], dtype=tl.int32)
    for k in tl.static_range(K):
        off = base + k * s_k
        v = tl.load(x_ptr + off, mask=mask, other=0)
        if F64:
            r = v.to(tl.float64)
        else:
            r = v.to(tl.float32)
        total = tl.zeros_like(r)
        s = 1.0
        bits = tl.zeros_like(acc)
        for lv in tl.static_range(LEVELS):
            b = r > 0
            c = tl.where(b, s, -s).to(r.dtype)
            bits = tl.where(level[None, :] == lv, b.to(acc.dtype)[:, None], bits)
            total = total + c
            r = r - c
            s = s * 0.5
        acc = (acc << 1) | bits
        tl.store(codes_ptr + off, total.to(codes_ptr.dtype.element_ty), mask=mask)
    ptrs = idx_ptr + level[None, :].to(tl.int64) * tokens + t[:, None]
    tl.store(ptrs, acc, mask=mask[:, None] & (level[None, :] < LEVELS))


@triton.jit
def _indices_to_codes_kernel(idx_ptr, codes_ptr, pos_bits, tokens, inner, s_outer, s_k, s_inner,
                             K: tl.constexpr, BITS_TYPE: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = t < tokens
    o = t // inner
    i = t - o * inner
    base = o * s_outer + i * s_inner
    pos = _code_value(pos_bits, tl.zeros([BLOCK], dtype=codes_ptr.dtype.element_ty), BITS_TYPE)
    v = tl.load(idx_ptr + t, mask=mask, other=0).to(tl.int64)
    for k in tl.static_range(K):
        b = ((v >> (K - 1 - k)) & 1) != 0
        tl.store(codes_ptr + base + k * s_k, tl.where(b, pos, -pos), mask=mask)


@triton.jit
def _indices_to_bits_kernel(idx_ptr, bits_ptr, tokens, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = t < tokens
    v = tl.load(idx_ptr + t, mask=mask, other=0).to(tl.int64)
    for k in tl.static_range(K):
        tl.store(bits_ptr + t * K + k, ((v >> (K - 1 - k)) & 1).to(tl.uint8), mask=mask)


@triton.jit
def _bits_to_indices_kernel(bits_ptr, idx_ptr, tokens, K: tl.constexpr, IDX64: tl.constexpr,
                            BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = t < tokens
    if IDX64:
        acc = tl.zeros([BLOCK], dtype=tl.int64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.int32)
    for k in tl.static_range(K):
        b = tl.load(bits_ptr + t * K + k, mask=mask, other=0) != 0
        acc = (acc << 1) | b.to(acc.dtype)
    tl.store(idx_ptr + t, acc, mask=mask)


@triton.jit
def _reverse_bit_order_kernel(in_ptr, out_ptr, tokens, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = t < tokens
    v = tl.load(in_ptr + t, mask=mask, other=0)
    r = tl.zeros_like(v)
    for k in tl.static_range(K):
        r = r | (((v >> k) & 1) << (K - 1 - k))
    tl.store(out_ptr + t, r, mask=mask)


@triton.jit
def _pack_bits_kernel(bits_ptr, packed_ptr, nbytes_total, K, nbytes, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < nbytes_total
    t = j // nbytes
    byte = j - t * nbytes
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for b in tl.static_range(8):
        k = byte * 8 + b
        bit = tl.load(bits_ptr + t * K + k, mask=mask & (k < K), other=0) != 0
        acc = (acc << 1) | bit.to(tl.int32)
    tl.store(packed_ptr + j, acc.to(tl.uint8), mask=mask)


@triton.jit
def _unpack_bits_kernel(packed_ptr, bits_ptr, total, K, nbytes, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = e < total
    t = e // K
    k = e - t * K
    byte = tl.load(packed_ptr + t * nbytes + (k >> 3), mask=mask, other=0).to(tl.int32)
    tl.store(bits_ptr + e, ((byte >> (7 - (k & 7))) & 1).to(tl.uint8), mask=mask)


def _grid(n: int):
    return (max(1, triton.cdiv(n, BLOCK)),)


@functools.lru_cache(maxsize=None)
def code_bits(scale: float, dtype: torch.dtype) -> int:
    """The bit pattern of +scale in ``dtype`` as an int (rounded by torch on the CPU, once)."""
    return torch.tensor(scale, dtype=dtype).view(_BITS_DTYPE[dtype]).item()


@on_tensor_device
def binary_quantize(x, layout, codes, scale, want_codes, index_kind, indices, bits):
    """Launch on a (outer, K, inner) ``layout`` = (outer, K, inner, s_outer, s_k, s_inner)."""
    outer, K, inner, so, sk, si = layout
    tokens = outer * inner
    dummy = x.new_empty(1)
    _quantize_kernel[_grid(tokens)](
        x, codes if want_codes else dummy,
        indices if index_kind == 1 else dummy.new_empty(1, dtype=torch.int64),
        bits if index_kind == 2 else dummy.new_empty(1, dtype=torch.uint8),
        code_bits(scale, x.dtype), tokens, inner, so, sk, si,
        K=K, WANT_CODES=want_codes, INDEX_KIND=index_kind, IDX64=K > 31, BITS_TYPE=_TL_BITS[x.dtype], BLOCK=BLOCK)


@on_tensor_device
def residual_binary_quantize(x, layout, codes, indices, levels):
    outer, K, inner, so, sk, si = layout
    tokens = outer * inner
    _residual_kernel[_grid(tokens)](
        x, codes, indices, tokens, inner, so, sk, si, K=K, LEVELS=levels,
        LEVELS_P2=triton.next_power_of_2(levels), IDX64=K > 31, F64=x.dtype == torch.float64,
        BLOCK=BLOCK)


@on_tensor_device
def indices_to_codes(indices, layout, codes, scale):
    outer, K, inner, so, sk, si = layout
    tokens = outer * inner
    _indices_to_codes_kernel[_grid(tokens)](
        indices, codes, code_bits(scale, codes.dtype), tokens, inner, so, sk, si,
        K=K, BITS_TYPE=_TL_BITS[codes.dtype], BLOCK=BLOCK)


@on_tensor_device
def indices_to_bits(indices, K, bits):
    _indices_to_bits_kernel[_grid(indices.numel())](indices, bits, indices.numel(), K=K, BLOCK=BLOCK)


@on_tensor_device
def bits_to_indices(bits, indices):
    K = bits.shape[-1]
    _bits_to_indices_kernel[_grid(indices.numel())](
        bits, indices, indices.numel(), K=K, IDX64=K > 31, BLOCK=BLOCK)


@on_tensor_device
def reverse_bit_order(indices, K, out):
    _reverse_bit_order_kernel[_grid(indices.numel())](indices, out, indices.numel(), K=K, BLOCK=BLOCK)


@on_tensor_device
def pack_bits(bits, packed):
    K = bits.shape[-1]
    _pack_bits_kernel[_grid(packed.numel())](bits, packed, packed.numel(), K, packed.shape[-1], BLOCK=BLOCK)


@on_tensor_device
def unpack_bits(packed, K, bits):
    _unpack_bits_kernel[_grid(bits.numel())](packed, bits, bits.numel(), K, packed.shape[-1], BLOCK=BLOCK)
