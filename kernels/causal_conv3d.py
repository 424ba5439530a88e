"""Triton kernels for causal 3D convolution (DESIGN.md §2.3): implicit GEMM.

Forward: y (M x N) = A (M x K) @ Wmat (K x N) with M = output positions (b, t, h, w),
N = output channels, K = (it, ih, iw, c) taps, c innermost.  A is never built: each
K-step gathers A's tile straight from x with the causal padding folded into the index
math (padded frame p = t*st + it*dt reads x frame p - P, or the cache frame p, or x's
frame 0 (replicate), or zero) and the spatial zero border as load masks.
Input gradient: the same over the padded input positions (b, p, h, w), K = (it, ih,
iw, o), A gathered from dy at t = (p - it*dt)/st, ho, wo where those divisions are
exact (so any stride works), N = input channels; rows p < P go to grad_past.
Weight gradient: dW (O x K) = dy^T (O x M) @ A (M x K), the M reduction split over
program axis 2; each split stores its own partial and the launcher sums them in a fixed
order (deterministic: no atomics).

Layouts: every tensor is addressed through its 5 strides (channels-first,
channels_last_3d or any view).  Offsets and flat indices are int64: Triton passes integer
arguments below 2^31 as int32, so products of sizes (M = B*To*Ho*Wo, Wo*Ho*To) are never
formed in the kernels; M comes from the host and positions unravel by successive divisions
of an int64 index.  fp16/bf16 inputs accumulate in fp32 on tensor cores, fp64 in fp64; fp32
follows PyTorch's flag for its own (cuDNN) convolutions, like cuDNN: TF32 by default,
IEEE fp32 with torch.backends.cudnn.allow_tf32 = False (kernels/_launch.py,
conv_fp32_precision: the expected TF32 error is stated there).
Cost: 2*M*N*K FLOPs; judged against the tensor-core peak and cuDNN (device_check.sh).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyratok.kernels._launch import conv_fp32_precision, on_tensor_device


def _blocks(t: torch.Tensor) -> dict:
    """Tile sizes; on the GPU fp64 multiplies by broadcast (a BLOCK_M x BLOCK_K x BLOCK_N
    product in registers), so its tiles are smaller there."""
    if t.dtype == torch.float64 and t.device.type == "cuda":
        return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=8)
    return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)


def _dot_precision(dtype: torch.dtype) -> str:
    return conv_fp32_precision() if dtype == torch.float32 else "ieee"


@triton.jit
def _gather_input(x_ptr, cache_ptr, b, p, hi, wi, c, valid, P, H, W,
                  sxb, sxc, sxt, sxh, sxw, scb, scc, sct, sch, scw,
                  HAS_CACHE: tl.constexpr, REPLICATE: tl.constexpr):
    """x padded causally in time and with zeros in space, at (b, c, p, hi, wi)."""
    inside = valid & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    past = p < P
    spatial = hi * sxh + wi * sxw
    if HAS_CACHE:
        a = tl.load(x_ptr + b * sxb + c * sxc + (p - P) * sxt + spatial, mask=inside & ~past, other=0.0)
        cached = tl.load(cache_ptr + b * scb + c * scc + p * sct + hi * sch + wi * scw, mask=inside & past, other=0.0)
        a = tl.where(past, cached, a)
    elif REPLICATE:
        a = tl.load(x_ptr + b * sxb + c * sxc + tl.maximum(p - P, 0) * sxt + spatial, mask=inside, other=0.0)
    else:
        a = tl.load(x_ptr + b * sxb + c * sxc + (p - P) * sxt + spatial, mask=inside & ~past, other=0.0)
    return a


@triton.jit
def _unravel4(i, n0, n1, n2):
    """Flat int64 index -> (i0, i1, i2, i3) of a row-major (.., n2, n1, n0) grid, innermost
    first.  Successive divisions of i only: a product of the (possibly int32) sizes such as
    n0 * n1 * n2 would wrap at 2^31."""
    q0 = i // n0
    q1 = q0 // n1
    return i - q0 * n0, q0 - q1 * n1, q1 % n2, q1 // n2


@triton.jit
def _gather_window(x_ptr, cache_ptr, b, t_o, h_o, w_o, c, it, ih, iw, valid, P, H, W, ST, SH, SW, DT, DH, DW,
                   PH, PW, sxb, sxc, sxt, sxh, sxw, scb, scc, sct, sch, scw,
                   HAS_CACHE: tl.constexpr, REPLICATE: tl.constexpr):
    """The (positions x taps) tile of the implicitly padded input that output positions
    (b, t_o, h_o, w_o) (column vectors) read through taps (c, it, ih, iw) (row vectors)."""
    p = t_o[:, None] * ST + it[None, :] * DT
    hi = h_o[:, None] * SH + ih[None, :] * DH - PH
    wi = w_o[:, None] * SW + iw[None, :] * DW - PW
    return _gather_input(x_ptr, cache_ptr, b[:, None], p, hi, wi, c[None, :], valid, P, H, W,
                         sxb, sxc, sxt, sxh, sxw, scb, scc, sct, sch, scw, HAS_CACHE, REPLICATE)


@triton.jit
def _mma(acc, a, b, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """acc += a @ b; fp64 as a broadcast product (tl.dot has no fp64 tensor-core path)."""
    if ACC_DTYPE == tl.float64:
        acc += tl.sum(a[:, :, None].to(tl.float64) * b[None, :, :].to(tl.float64), axis=1)
    else:
        acc += tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _forward_kernel(x_ptr, cache_ptr, w_ptr, bias_ptr, y_ptr,
                    M, B, C, H, W, O, To, Ho, Wo, P, KT, KH, KW, ST, SH, SW, DT, DH, DW, PH, PW,
                    sxb, sxc, sxt, sxh, sxw, scb, scc, sct, sch, scw,
                    swo, swc, swt, swh, sww, syb, syc, syt, syh, syw,
                    HAS_CACHE: tl.constexpr, REPLICATE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    K = KT * KH * KW * C
    mask_m = m < M
    mask_n = n < O
    w_o, h_o, t_o, b = _unravel4(m, Wo, Ho, To)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = k < K
        c, iw, ih, it = _unravel4(k, C, KW, KH)
        a = _gather_window(x_ptr, cache_ptr, b, t_o, h_o, w_o, c, it, ih, iw, mask_m[:, None] & mask_k[None, :],
                           P, H, W, ST, SH, SW, DT, DH, DW, PH, PW,
                           sxb, sxc, sxt, sxh, sxw, scb, scc, sct, sch, scw, HAS_CACHE, REPLICATE)
        w_off = n[None, :] * swo + c[:, None] * swc + it[:, None] * swt + ih[:, None] * swh + iw[:, None] * sww
        wt = tl.load(w_ptr + w_off, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(acc, a, wt, PRECISION, ACC_DTYPE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    y_off = b[:, None] * syb + n[None, :] * syc + t_o[:, None] * syt + h_o[:, None] * syh + w_o[:, None] * syw
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _input_grad_kernel(dy_ptr, w_ptr, gx_ptr, gp_ptr,
                       M, B, C, H, W, O, To, Ho, Wo, P, T, P_BEGIN, KT, KH, KW, ST, SH, SW, DT, DH, DW, PH, PW,
                       sdb, sdc, sdt, sdh, sdw, swo, swc, swt, swh, sww,
                       sgb, sgc, sgt, sgh, sgw, spb, spc, spt, sph, spw,
                       WRITE_X: tl.constexpr, WRITE_PAST: tl.constexpr,
                       PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    frames = P + T - P_BEGIN
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    K = KT * KH * KW * O
    mask_m = m < M
    mask_n = n < C
    wi, hi, p, b = _unravel4(m, W, H, frames)
    p += P_BEGIN
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = k < K
        o, iw, ih, it = _unravel4(k, O, KW, KH)
        tn = p[:, None] - it[None, :] * DT
        hn = hi[:, None] + PH - ih[None, :] * DH
        wn = wi[:, None] + PW - iw[None, :] * DW
        tn0 = tl.maximum(tn, 0)
        hn0 = tl.maximum(hn, 0)
        wn0 = tl.maximum(wn, 0)
        t = tn0 // ST
        ho = hn0 // SH
        wo = wn0 // SW
        valid = (tn >= 0) & (tn0 % ST == 0) & (t < To) & (hn >= 0) & (hn0 % SH == 0) & (ho < Ho)
        valid = valid & (wn >= 0) & (wn0 % SW == 0) & (wo < Wo) & mask_m[:, None] & mask_k[None, :]
        off = b[:, None] * sdb + o[None, :] * sdc + t * sdt + ho * sdh + wo * sdw
        a = tl.load(dy_ptr + off, mask=valid, other=0.0)
        w_off = o[:, None] * swo + n[None, :] * swc + it[:, None] * swt + ih[:, None] * swh + iw[:, None] * sww
        wt = tl.load(w_ptr + w_off, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(acc, a, wt, PRECISION, ACC_DTYPE)
    out_mask = mask_m[:, None] & mask_n[None, :]
    if WRITE_X:
        g_off = b[:, None] * sgb + n[None, :] * sgc + (p[:, None] - P) * sgt + hi[:, None] * sgh + wi[:, None] * sgw
        tl.store(gx_ptr + g_off, acc.to(gx_ptr.dtype.element_ty), mask=out_mask & (p[:, None] >= P))
    if WRITE_PAST:
        p_off = b[:, None] * spb + n[None, :] * spc + p[:, None] * spt + hi[:, None] * sph + wi[:, None] * spw
        tl.store(gp_ptr + p_off, acc.to(gp_ptr.dtype.element_ty), mask=out_mask & (p[:, None] < P))


@triton.jit
def _weight_grad_kernel(x_ptr, cache_ptr, dy_ptr, dw_ptr,
                        M, B, C, H, W, O, To, Ho, Wo, P, KT, KH, KW, ST, SH, SW, DT, DH, DW, PH, PW,
                        sxb, sxc, sxt, sxh, sxw, scb, scc, sct, sch, scw, sdb, sdc, sdt, sdh, sdw,
                        POSITIONS_PER_PROGRAM, HAS_CACHE: tl.constexpr, REPLICATE: tl.constexpr,
                        PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dW[o, (it, ih, iw, c)] over a BLOCK_N x BLOCK_K tile, reducing over one slice of the
    positions (program axis 2) and storing it as that slice's partial dw[split]."""
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    K = KT * KH * KW * C
    mask_n = n < O
    mask_k = k < K
    c, iw, ih, it = _unravel4(k, C, KW, KH)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC_DTYPE)
    m_begin = tl.program_id(2).to(tl.int64) * POSITIONS_PER_PROGRAM
    m_end = tl.minimum(m_begin + POSITIONS_PER_PROGRAM, M)
    for m0 in range(m_begin, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = m < m_end
        w_o, h_o, t_o, b = _unravel4(m, Wo, Ho, To)
        dy_off = b[None, :] * sdb + n[:, None] * sdc + t_o[None, :] * sdt + h_o[None, :] * sdh + w_o[None, :] * sdw
        dyt = tl.load(dy_ptr + dy_off, mask=mask_n[:, None] & mask_m[None, :], other=0.0)
        a = _gather_window(x_ptr, cache_ptr, b, t_o, h_o, w_o, c, it, ih, iw, mask_m[:, None] & mask_k[None, :],
                           P, H, W, ST, SH, SW, DT, DH, DW, PH, PW,
                           sxb, sxc, sxt, sxh, sxw, scb, scc, sct, sch, scw, HAS_CACHE, REPLICATE)
        acc = _mma(acc, dyt, a, PRECISION, ACC_DTYPE)
    # partials are (splits, O, C, kt, kh, kw) contiguous
    dw_off = (tl.program_id(2).to(tl.int64) * O + n[:, None]) * K + c[None, :] * (KT * KH * KW) \
        + it[None, :] * (KH * KW) + ih[None, :] * KW + iw[None, :]
    tl.store(dw_ptr + dw_off, acc, mask=mask_n[:, None] & mask_k[None, :])


def _geometry(x_shape, weight_shape, stride, dilation, padding):
    B, C, T, H, W = x_shape
    O, _, KT, KH, KW = weight_shape
    P = dilation[0] * (KT - 1) + 1 - stride[0]
    To = T // stride[0]
    Ho = (H + 2 * padding[0] - dilation[1] * (KH - 1) - 1) // stride[1] + 1
    Wo = (W + 2 * padding[1] - dilation[2] * (KW - 1) - 1) // stride[2] + 1
    return (B, C, H, W, O, To, Ho, Wo, P, KT, KH, KW, *stride, *dilation, *padding), T


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@on_tensor_device
def causal_conv3d_forward(x, weight, bias, cache, stride, dilation, padding, replicate, y):
    """y (B, O, To, Ho, Wo) = causal conv of x (B, C, T, H, W); y preallocated."""
    geom, _ = _geometry(x.shape, weight.shape, stride, dilation, padding)
    M, O = y.shape[0] * y.shape[2] * y.shape[3] * y.shape[4], y.shape[1]
    if M == 0 or O == 0:
        return
    cache_t = cache if cache is not None else x
    blocks = _blocks(x)
    grid = (triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(O, blocks["BLOCK_N"]))
    _forward_kernel[grid](x, cache_t, weight, bias if bias is not None else x, y, M, *geom,
                          *x.stride(), *cache_t.stride(), *weight.stride(), *y.stride(),
                          HAS_CACHE=cache is not None, REPLICATE=replicate, HAS_BIAS=bias is not None,
                          PRECISION=_dot_precision(x.dtype), ACC_DTYPE=_acc_dtype(x.dtype), **blocks)


@on_tensor_device
def causal_conv3d_input_grad(grad_y, weight, x_shape, stride, dilation, padding, grad_x, grad_past):
    """grad_x (B, C, T, H, W) and/or grad_past (B, C, P, H, W) from grad_y; None = skip."""
    geom, T = _geometry(x_shape, weight.shape, stride, dilation, padding)
    B, C, _, H, W = x_shape
    P = geom[8]
    p_begin = 0 if grad_past is not None else P
    M = B * (P + T - p_begin) * H * W
    if M == 0:
        return
    gx = grad_x if grad_x is not None else grad_y
    gp = grad_past if grad_past is not None else grad_y
    blocks = _blocks(grad_y)
    grid = (triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(C, blocks["BLOCK_N"]))
    _input_grad_kernel[grid](grad_y, weight, gx, gp, M, *geom[:9], T, p_begin, *geom[9:],
                             *grad_y.stride(), *weight.stride(), *gx.stride(), *gp.stride(),
                             WRITE_X=grad_x is not None, WRITE_PAST=grad_past is not None,
                             PRECISION=_dot_precision(grad_y.dtype), ACC_DTYPE=_acc_dtype(grad_y.dtype), **blocks)


def weight_grad_splits(positions: int, tiles: int, device_type: str) -> int:
    """How many slices the position reduction of the weight gradient is split into: about 1024
    programs on a GPU (>= 4096 positions each); one under the interpreter."""
    if device_type == "cpu":
        return 1
    return max(1, min(triton.cdiv(1024, tiles), positions // 4096))


@on_tensor_device
def causal_conv3d_weight_grad(x, cache, grad_y, stride, dilation, padding, replicate, accum, splits=None):
    """accum (O, C, kt, kh, kw) contiguous fp32 (fp64 for fp64): = dL/dweight.

    Each of ``splits`` slices of the positions stores its partial; the partials are summed
    in a fixed order, so the result is the same bits on every run."""
    geom, _ = _geometry(x.shape, accum.shape, stride, dilation, padding)
    O, C, KT, KH, KW = accum.shape
    positions = grad_y.shape[0] * grad_y.shape[2] * grad_y.shape[3] * grad_y.shape[4]
    if positions == 0:  # an empty batch: no contribution
        accum.zero_()
        return
    cache_t = cache if cache is not None else x
    blocks = _blocks(x)
    tiles = triton.cdiv(O, blocks["BLOCK_N"]) * triton.cdiv(KT * KH * KW * C, blocks["BLOCK_K"])
    if splits is None:
        splits = weight_grad_splits(positions, tiles, x.device.type)
    per_program = triton.cdiv(triton.cdiv(positions, splits), blocks["BLOCK_M"]) * blocks["BLOCK_M"]
    splits = triton.cdiv(positions, per_program)
    partial = torch.empty((splits, *accum.shape), dtype=accum.dtype, device=accum.device)
    grid = (triton.cdiv(O, blocks["BLOCK_N"]), triton.cdiv(KT * KH * KW * C, blocks["BLOCK_K"]), splits)
    _weight_grad_kernel[grid](x, cache_t, grad_y, partial, positions, *geom,
                              *x.stride(), *cache_t.stride(), *grad_y.stride(), per_program,
                              HAS_CACHE=cache is not None, REPLICATE=replicate,
                              PRECISION=_dot_precision(x.dtype), ACC_DTYPE=_acc_dtype(x.dtype), **blocks)
    torch.sum(partial, 0, out=accum)
