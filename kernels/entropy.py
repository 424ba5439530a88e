"""Triton kernels for the entropy and alignment losses (DESIGN.md §2.2).

Math and layout contract as csrc/core/entropy.h: x is (N, K) row-major (elementwise kernels:
any dense buffer), z = coef * x, p = sigmoid(z), 1 - p = sigmoid(-z) (never a subtraction);
everything is computed in the work dtype (fp32, fp64 for fp64 input).

The codebook kernels never materialise the probability tiles.  Forward: program (a-block,
b-block, token split) rebuilds P_A (BLOCK_N, BLOCK_A) and P_B (BLOCK_N, BLOCK_B) from x for
each chunk of tokens (KA resp. KB multiplies per element) and accumulates P_A^T P_B with
tl.dot in IEEE fp32 (no TF32; fp64 input: multiply-and-sum on 16-wide blocks, as tl.dot has no
fp64 path on NVIDIA GPUs); token splits write partial counts that are summed after, so
the result is deterministic.  Backward, one program per block of tokens and one launch per
half ("own" bits, the "other" half): acc = P_other G^T block by block, W = acc * P_own, and
the per-bit sums S1 / S0 (codes with the bit set / clear) are W times a 0/1 bit table, one
more tl.dot; d x = coef * (S1 sigmoid(-z) - S0 sigmoid(z)).

Cost: 3 * 2 * N * 2^K FLOPs for forward + backward, plus the rebuilt tiles
(~N * 2^K * (KA + KB) / block multiplies); judged against the fp32 (non-tensor-core) FMA peak.
Elementwise kernels read N*K elements: memory bound, judged against the copy bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyratok.reference.entropy import half_split, work_dtype

BLOCK = 1024
CODE_BLOCK = 64   # codes per tile side (fp64: 16, see _dot)
TOKEN_BLOCK = 64  # tokens per chunk (fp64: 16)
MIN_DOT = 16      # tl.dot needs every tile side >= 16
TARGET_PROGRAMS = 512


@triton.jit
def _to_work(v, F64: tl.constexpr):
    if F64:
        return v.to(tl.float64)
    return v.to(tl.float32)


@triton.jit
def _sigmoid(z):
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _log1p(u):
    # log(1 + u) to full relative precision (Goldberg): the rounding of 1 + u cancels out
    w = 1.0 + u
    exact = w == 1.0
    return tl.where(exact, u, tl.log(w) * u / tl.where(exact, 1.0, w - 1.0))


@triton.jit
def _softplus(z):
    return tl.maximum(z, 0.0) + _log1p(tl.exp(-tl.abs(z)))


@triton.jit
def _bit_probs_kernel(x_ptr, out_ptr, numel, coef, F64: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    z = coef * _to_work(tl.load(x_ptr + i, mask=mask, other=0), F64)
    tl.store(out_ptr + i, _sigmoid(z), mask=mask)


@triton.jit
def _binary_entropy_sum_kernel(x_ptr, partial_ptr, numel, coef, F64: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    m = tl.abs(coef * _to_work(tl.load(x_ptr + i, mask=mask, other=0), F64))
    e = tl.exp(-m)
    h = _log1p(e) + m * e / (1.0 + e)  # softplus(-|z|) + |z| sigmoid(-|z|): no cancellation
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, h, 0.0), axis=0))


@triton.jit
def _binary_entropy_backward_kernel(x_ptr, grad_ptr, dx_ptr, numel, coef, F64: tl.constexpr,
                                    BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    z = coef * _to_work(tl.load(x_ptr + i, mask=mask, other=0), F64)
    e = tl.exp(-tl.abs(z))
    d = 1.0 + e
    grad = tl.load(grad_ptr)
    tl.store(dx_ptr + i, (grad * coef * (-z * e / (d * d))).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bernoulli_kl_sum_kernel(a_ptr, b_ptr, partial_ptr, numel, F64: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    a = _to_work(tl.load(a_ptr + i, mask=mask, other=0), F64)
    b = _to_work(tl.load(b_ptr + i, mask=mask, other=0), F64)
    kl = _sigmoid(a) * (_softplus(-b) - _softplus(-a)) + _sigmoid(-a) * (_softplus(b) - _softplus(a))
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, kl, 0.0), axis=0))


@triton.jit
def _bernoulli_kl_backward_kernel(a_ptr, b_ptr, grad_ptr, da_ptr, db_ptr, numel, F64: tl.constexpr,
                                  BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    a = _to_work(tl.load(a_ptr + i, mask=mask, other=0), F64)
    b = _to_work(tl.load(b_ptr + i, mask=mask, other=0), F64)
    grad = tl.load(grad_ptr)
    pa = _sigmoid(a)
    tl.store(da_ptr + i, (grad * pa * _sigmoid(-a) * (a - b)).to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + i, (grad * (_sigmoid(b) - pa)).to(db_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _code_histogram_kernel(idx_ptr, counts_ptr, numel, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    code = tl.load(idx_ptr + i, mask=mask, other=0).to(tl.int64)
    tl.atomic_add(counts_ptr + code, tl.full([BLOCK], 1, tl.int32), mask=mask)


@triton.jit
def _half_probs(x_ptr, rows, row_mask, K, bit0, coef, codes, code_mask, BITS: tl.constexpr,
                F64: tl.constexpr):
    # (rows, codes) MSB-first probabilities of the codes of channels [bit0, bit0 + BITS);
    # 0 outside the masks so that padded rows and codes add nothing to a tl.dot
    valid = row_mask[:, None] & code_mask[None, :]
    probs = _to_work(tl.where(valid, 1.0, 0.0), F64)
    for j in tl.static_range(BITS):
        z = coef * _to_work(tl.load(x_ptr + rows * K + bit0 + j, mask=row_mask, other=0), F64)
        bit = (codes >> (BITS - 1 - j)) & 1
        probs = probs * tl.where(bit[None, :] != 0, _sigmoid(z)[:, None], _sigmoid(-z)[:, None])
    return probs


@triton.jit
def _dot(a, b, F64: tl.constexpr):
    if F64:
        # tl.dot has no fp64 path on NVIDIA GPUs (triton-lang/triton#5483): multiply and sum,
        # on the 16-wide blocks the launchers choose for fp64
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _soft_code_counts_kernel(x_ptr, partial_ptr, N, K, bit0, coef, tokens_per_split,
                             KA: tl.constexpr, KB: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, F64: tl.constexpr):
    a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    a_mask = a < (1 << KA)
    b_mask = b < (1 << KB)
    first = tl.program_id(2).to(tl.int64) * tokens_per_split
    last = tl.minimum(first + tokens_per_split, N)
    acc = _to_work(tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32), F64)
    for n0 in range(first, last, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < last
        probs_a = _half_probs(x_ptr, rows, row_mask, K, bit0, coef, a, a_mask, KA, F64)
        probs_b = _half_probs(x_ptr, rows, row_mask, K, bit0 + KA, coef, b, b_mask, KB, F64)
        acc += _dot(tl.trans(probs_a), probs_b, F64)
    out = partial_ptr + tl.program_id(2).to(tl.int64) * (1 << (KA + KB)) + a[:, None] * (1 << KB) + b[None, :]
    tl.store(out, acc, mask=a_mask[:, None] & b_mask[None, :])


@triton.jit
def _soft_code_counts_backward_kernel(x_ptr, g_ptr, dx_ptr, N, K, own0, other0, coef, g_stride_own,
                                      g_stride_other, OWN: tl.constexpr, OTHER: tl.constexpr,
                                      OWN_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
                                      BLOCK_T: tl.constexpr, F64: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    j = tl.arange(0, OWN_P2)
    j_mask = j < OWN
    shift = tl.where(j_mask, OWN - 1 - j, 0)
    zero = _to_work(tl.zeros([BLOCK_N, OWN_P2], dtype=tl.float32), F64)
    s1 = zero
    s0 = zero
    for a0 in range(0, 1 << OWN, BLOCK_O):
        a = a0 + tl.arange(0, BLOCK_O)
        a_mask = a < (1 << OWN)
        acc = _to_work(tl.zeros([BLOCK_N, BLOCK_O], dtype=tl.float32), F64)
        for t0 in range(0, 1 << OTHER, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_mask = t < (1 << OTHER)
            probs_t = _half_probs(x_ptr, rows, row_mask, K, other0, coef, t, t_mask, OTHER, F64)
            g = tl.load(g_ptr + t[:, None] * g_stride_other + a[None, :] * g_stride_own,
                        mask=t_mask[:, None] & a_mask[None, :], other=0)
            acc += _dot(probs_t, g, F64)
        w = acc * _half_probs(x_ptr, rows, row_mask, K, own0, coef, a, a_mask, OWN, F64)
        bit = (a[:, None] >> shift[None, :]) & 1
        used = a_mask[:, None] & j_mask[None, :]
        s1 += _dot(w, _to_work(tl.where(used & (bit != 0), 1.0, 0.0), F64), F64)
        s0 += _dot(w, _to_work(tl.where(used & (bit == 0), 1.0, 0.0), F64), F64)
    mask = row_mask[:, None] & j_mask[None, :]
    offs = rows[:, None] * K + own0 + j[None, :]
    z = coef * _to_work(tl.load(x_ptr + offs, mask=mask, other=0), F64)
    dx = coef * (s1 * _sigmoid(-z) - s0 * _sigmoid(z))
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(n: int, block: int = BLOCK):
    return (max(1, triton.cdiv(n, block)),)


def _code_block(bits: int, f64: bool) -> int:
    return max(MIN_DOT, min(MIN_DOT if f64 else CODE_BLOCK, 1 << bits))


def _token_block(f64: bool) -> int:
    return MIN_DOT if f64 else TOKEN_BLOCK


def bit_probs(x, coef):
    out = torch.empty(x.shape, dtype=work_dtype(x.dtype), device=x.device)
    _bit_probs_kernel[_grid(x.numel())](x, out, x.numel(), coef, F64=x.dtype == torch.float64, BLOCK=BLOCK)
    return out


def _partial_sums(x):
    return torch.zeros(_grid(x.numel())[0], dtype=work_dtype(x.dtype), device=x.device)


def binary_entropy_sum(x, coef):
    partial = _partial_sums(x)
    _binary_entropy_sum_kernel[_grid(x.numel())](x, partial, x.numel(), coef, F64=x.dtype == torch.float64,
                                                 BLOCK=BLOCK)
    return partial.sum()


def _grad_scalar(grad, dtype):
    return grad.to(work_dtype(dtype)).reshape(1).contiguous()


def binary_entropy_backward(x, coef, grad):
    dx = torch.empty_like(x)
    _binary_entropy_backward_kernel[_grid(x.numel())](x, _grad_scalar(grad, x.dtype), dx, x.numel(), coef,
                                                      F64=x.dtype == torch.float64, BLOCK=BLOCK)
    return dx


def bernoulli_kl_sum(a, b):
    partial = _partial_sums(a)
    _bernoulli_kl_sum_kernel[_grid(a.numel())](a, b, partial, a.numel(), F64=a.dtype == torch.float64, BLOCK=BLOCK)
    return partial.sum()


def bernoulli_kl_backward(a, b, grad):
    da, db = torch.empty_like(a), torch.empty_like(b)
    _bernoulli_kl_backward_kernel[_grid(a.numel())](a, b, _grad_scalar(grad, a.dtype), da, db, a.numel(),
                                                    F64=a.dtype == torch.float64, BLOCK=BLOCK)
    return da, db


def code_histogram(indices, K):
    if indices.numel() >= 2**31:
        raise ValueError(f"indices: {indices.numel()} codes; the Triton histogram counts in int32 (< 2^31)")
    counts = torch.zeros(1 << K, dtype=torch.int32, device=indices.device)
    _code_histogram_kernel[_grid(indices.numel())](indices, counts, indices.numel(), BLOCK=BLOCK)
    return counts.to(torch.int64)


def _groups(sizes):
    """(bit0, offset, KA, KB) of each bit group."""
    bit0 = offset = 0
    for g in sizes:
        ka, kb = half_split(g)
        yield bit0, offset, ka, kb
        bit0 += g
        offset += 1 << g


def soft_code_counts(x, coef, sizes):
    N, K = x.shape
    f64 = x.dtype == torch.float64
    wd = work_dtype(x.dtype)
    counts = []
    token_block = _token_block(f64)
    for bit0, _, ka, kb in _groups(sizes):
        block_a, block_b = _code_block(ka, f64), _code_block(kb, f64)
        tiles = triton.cdiv(1 << ka, block_a) * triton.cdiv(1 << kb, block_b)
        # split the tokens so that small codebooks still fill the device; partials are summed
        splits = max(1, min(triton.cdiv(TARGET_PROGRAMS, tiles), triton.cdiv(N, token_block)))
        per_split = triton.cdiv(max(N, 1), splits * token_block) * token_block
        splits = max(1, triton.cdiv(N, per_split))
        partial = torch.zeros(splits, 1 << (ka + kb), dtype=wd, device=x.device)
        grid = (triton.cdiv(1 << ka, block_a), triton.cdiv(1 << kb, block_b), splits)
        _soft_code_counts_kernel[grid](x, partial, N, K, bit0, coef, per_split, KA=ka, KB=kb,
                                       BLOCK_N=token_block, BLOCK_A=block_a, BLOCK_B=block_b, F64=f64)
        counts.append(partial.sum(0))
    return torch.cat(counts)


def soft_code_counts_backward(x, coef, sizes, grad_counts):
    N, K = x.shape
    f64 = x.dtype == torch.float64
    G_all = grad_counts.to(work_dtype(x.dtype)).contiguous()
    dx = torch.empty_like(x)
    for bit0, offset, ka, kb in _groups(sizes):
        G = G_all[offset:offset + (1 << (ka + kb))]  # (2^KA, 2^KB) row-major
        # own half A: G[a, b] at a * 2^KB + b; own half B: the transpose
        for own0, own, other0, other, stride_own, stride_other in (
                (bit0, ka, bit0 + ka, kb, 1 << kb, 1), (bit0 + ka, kb, bit0, ka, 1, 1 << kb)):
            if own == 0:
                continue
            _soft_code_counts_backward_kernel[_grid(N, _token_block(f64))](
                x, G, dx, N, K, own0, other0, coef, stride_own, stride_other, OWN=own, OTHER=other,
                OWN_P2=max(MIN_DOT, triton.next_power_of_2(own)), BLOCK_N=_token_block(f64),
                BLOCK_O=_code_block(own, f64), BLOCK_T=_code_block(other, f64), F64=f64)
    return dx
