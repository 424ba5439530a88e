"""Triton kernels for the entropy and alignment losses (DESIGN.md §2.2).

Math and layout contract as csrc/core/entropy.h: x is (N, K) row-major (elementwise kernels:
any dense buffer), z = coef * x, p = sigmoid(z), 1 - p = sigmoid(-z) (never a subtraction);
everything is computed in the work dtype (fp32, fp64 for fp64 input).

The codebook kernels never materialise the probability tiles.  Forward: program (a-block,
b-block, token split) rebuilds P_A (BLOCK_N, BLOCK_A) and P_B (BLOCK_N, BLOCK_B) from x for
each chunk of tokens (KA resp. KB multiplies per element) and accumulates P_A^T P_B with
tl.dot in IEEE fp32 (no TF32; fp64 input: multiply-and-sum on 16-wide blocks, as tl.dot has no
fp64 path on NVIDIA GPUs); token splits write partial counts that are summed after, so
the result is deterministic.  Backward, one launch per half ("own" bits, the "other"
half), programs over (block of tokens, slice of the own codes, slice of the other codes), so
that a small batch still fills the device (N = 192 tokens and 2^8 own codes: 12 programs
where one per token block gave 3): acc = P_other G^T over the program's other codes,
W = acc * P_own, and the per-bit partial sums S1 / S0 (codes with the bit set / clear) are W
times a 0/1 bit table, one more tl.dot.  Every quantity is linear in acc, so each program
stores its partial S1 / S0 and the launcher sums them in a fixed order (deterministic) and
forms d x = coef * (S1 sigmoid(-z) - S0 sigmoid(z)).

Precision, an explicit choice: tl.dot in IEEE fp32 (input_precision="ieee", never TF32);
tl.exp, which on NVIDIA GPUs compiles to ex2.approx.ftz.f32 after a multiply by log2(e) for
fp32 (relative error ~2^-22 plus |z| * 2^-24 from the rounded product: < 6e-6 where exp does
not underflow; results below 2^-126 flush to 0) and to libdevice's exp for fp64.  Triton's
CPU interpreter uses numpy's exp; the tests' tolerances (tests/test_entropy.py) cover both.

Cost: 3 * 2 * N * 2^K FLOPs for forward + backward, plus the rebuilt tiles
(~N * 2^K * (KA + KB) / block multiplies); judged against the fp32 (non-tensor-core) FMA peak.
Elementwise kernels read N*K elements: memory bound, judged against the copy bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyratok.kernels._launch import on_tensor_device
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
def _soft_code_counts_backward_kernel(x_ptr, g_ptr, s1_ptr, s0_ptr, N, K, own0, other0, coef, g_stride_own,
                                      g_stride_other, own_per_program, other_per_program,
                                      OWN: tl.constexpr, OTHER: tl.constexpr,
                                      OWN_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
                                      BLOCK_T: tl.constexpr, F64: tl.constexpr):
    """Partial S1 / S0 (BLOCK_N tokens, OWN bits) over own codes [a_begin, a_end) and other
    codes [t_begin, t_end); stored at partial index (program 1, program 2)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    j = tl.arange(0, OWN_P2)
    j_mask = j < OWN
    shift = tl.where(j_mask, OWN - 1 - j, 0)
    a_begin = tl.program_id(1) * own_per_program
    a_end = tl.minimum(a_begin + own_per_program, 1 << OWN)
    t_begin = tl.program_id(2) * other_per_program
    t_end = tl.minimum(t_begin + other_per_program, 1 << OTHER)
    zero = _to_work(tl.zeros([BLOCK_N, OWN_P2], dtype=tl.float32), F64)
    s1 = zero
    s0 = zero
    for a0 in range(a_begin, a_end, BLOCK_O):
        a = a0 + tl.arange(0, BLOCK_O)
        a_mask = a < a_end
        acc = _to_work(tl.zeros([BLOCK_N, BLOCK_O], dtype=tl.float32), F64)
        for t0 in range(t_begin, t_end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_mask = t < t_end
            probs_t = _half_probs(x_ptr, rows, row_mask, K, other0, coef, t, t_mask, OTHER, F64)
            g = tl.load(g_ptr + t[:, None] * g_stride_other + a[None, :] * g_stride_own,
                        mask=t_mask[:, None] & a_mask[None, :], other=0)
            acc += _dot(probs_t, g, F64)
        w = acc * _half_probs(x_ptr, rows, row_mask, K, own0, coef, a, a_mask, OWN, F64)
        bit = (a[:, None] >> shift[None, :]) & 1
        used = a_mask[:, None] & j_mask[None, :]
        s1 += _dot(w, _to_work(tl.where(used & (bit != 0), 1.0, 0.0), F64), F64)
        s0 += _dot(w, _to_work(tl.where(used & (bit == 0), 1.0, 0.0), F64), F64)
    split = tl.program_id(1).to(tl.int64) * tl.num_programs(2) + tl.program_id(2)
    offs = (split * N + rows[:, None]) * OWN_P2 + j[None, :]
    mask = row_mask[:, None] & j_mask[None, :]
    tl.store(s1_ptr + offs, s1, mask=mask)
    tl.store(s0_ptr + offs, s0, mask=mask)


def _grid(n: int, block: int = BLOCK):
    return (max(1, triton.cdiv(n, block)),)


def _code_block(bits: int, f64: bool) -> int:
    return max(MIN_DOT, min(MIN_DOT if f64 else CODE_BLOCK, 1 << bits))


def _token_block(f64: bool) -> int:
    return MIN_DOT if f64 else TOKEN_BLOCK


@on_tensor_device
def bit_probs(x, coef):
    out = torch.empty(x.shape, dtype=work_dtype(x.dtype), device=x.device)
    _bit_probs_kernel[_grid(x.numel())](x, out, x.numel(), coef, F64=x.dtype == torch.float64, BLOCK=BLOCK)
    return out


def _partial_sums(x):
    return torch.zeros(_grid(x.numel())[0], dtype=work_dtype(x.dtype), device=x.device)


@on_tensor_device
def binary_entropy_sum(x, coef):
    partial = _partial_sums(x)
    _binary_entropy_sum_kernel[_grid(x.numel())](x, partial, x.numel(), coef, F64=x.dtype == torch.float64,
                                                 BLOCK=BLOCK)
    return partial.sum()


def _grad_scalar(grad, dtype):
    return grad.to(work_dtype(dtype)).reshape(1).contiguous()


@on_tensor_device
def binary_entropy_backward(x, coef, grad):
    dx = torch.empty_like(x)
    _binary_entropy_backward_kernel[_grid(x.numel())](x, _grad_scalar(grad, x.dtype), dx, x.numel(), coef,
                                                      F64=x.dtype == torch.float64, BLOCK=BLOCK)
    return dx


@on_tensor_device
def bernoulli_kl_sum(a, b):
    partial = _partial_sums(a)
    _bernoulli_kl_sum_kernel[_grid(a.numel())](a, b, partial, a.numel(), F64=a.dtype == torch.float64, BLOCK=BLOCK)
    return partial.sum()


@on_tensor_device
def bernoulli_kl_backward(a, b, grad):
    da, db = torch.empty_like(a), torch.empty_like(b)
    _bernoulli_kl_backward_kernel[_grid(a.numel())](a, b, _grad_scalar(grad, a.dtype), da, db, a.numel(),
                                                    F64=a.dtype == torch.float64, BLOCK=BLOCK)
    return da, db


@on_tensor_device
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


@on_tensor_device
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


# partial S1/S0 buffers of the backward hold at most this many work elements
MAX_PARTIAL_ELEMENTS = 1 << 26


def _backward_splits(rows_blocks: int, own: int, other: int, block_o: int, block_t: int, N: int, own_p2: int,
                     interpreted: bool) -> tuple[int, int]:
    """(own codes per program, other codes per program): split the code space until about
    TARGET_PROGRAMS programs run, within MAX_PARTIAL_ELEMENTS of partials; one split of each
    under the interpreter (a CPU runs programs one after another)."""
    own_blocks, other_blocks = triton.cdiv(1 << own, block_o), triton.cdiv(1 << other, block_t)
    own_splits = other_splits = 1
    if not interpreted:
        budget = max(1, MAX_PARTIAL_ELEMENTS // max(1, 2 * N * own_p2))
        want = max(1, triton.cdiv(TARGET_PROGRAMS, rows_blocks))
        own_splits = max(1, min(own_blocks, want, budget))
        other_splits = max(1, min(other_blocks, triton.cdiv(want, own_splits), budget // own_splits))
    own_per = triton.cdiv(own_blocks, own_splits) * block_o
    other_per = triton.cdiv(other_blocks, other_splits) * block_t
    return own_per, other_per


@on_tensor_device
def soft_code_counts_backward(x, coef, sizes, grad_counts):
    N, K = x.shape
    f64 = x.dtype == torch.float64
    wd = work_dtype(x.dtype)
    G_all = grad_counts.to(wd).contiguous()
    dx = torch.empty_like(x)
    if N == 0:
        return dx
    token_block = _token_block(f64)
    rows_blocks = triton.cdiv(N, token_block)
    for bit0, offset, ka, kb in _groups(sizes):
        G = G_all[offset:offset + (1 << (ka + kb))]  # (2^KA, 2^KB) row-major
        # own half A: G[a, b] at a * 2^KB + b; own half B: the transpose
        for own0, own, other0, other, stride_own, stride_other in (
                (bit0, ka, bit0 + ka, kb, 1 << kb, 1), (bit0 + ka, kb, bit0, ka, 1, 1 << kb)):
            if own == 0:
                continue
            own_p2 = max(MIN_DOT, triton.next_power_of_2(own))
            block_o, block_t = _code_block(own, f64), _code_block(other, f64)
            own_per, other_per = _backward_splits(rows_blocks, own, other, block_o, block_t, N, own_p2,
                                                  x.device.type == "cpu")
            grid = (rows_blocks, triton.cdiv(1 << own, own_per), triton.cdiv(1 << other, other_per))
            s1 = torch.empty(grid[1] * grid[2], N, own_p2, dtype=wd, device=x.device)
            s0 = torch.empty_like(s1)
            _soft_code_counts_backward_kernel[grid](
                x, G, s1, s0, N, K, own0, other0, coef, stride_own, stride_other, own_per, other_per,
                OWN=own, OTHER=other, OWN_P2=own_p2, BLOCK_N=token_block, BLOCK_O=block_o, BLOCK_T=block_t,
                F64=f64)
            z = coef * x[:, own0:own0 + own].to(wd)
            S1, S0 = s1.sum(0)[:, :own], s0.sum(0)[:, :own]  # fixed order: deterministic
            dx[:, own0:own0 + own] = (coef * (S1 * torch.sigmoid(-z) - S0 * torch.sigmoid(z))).to(x.dtype)
    return dx
