"""Test oracles written independently of pyratok/reference: numpy and float64 brute force.

pyratok's ``reference`` backend *is* pyratok/reference, so a test that compares
``backend="reference"`` with pyratok/reference compares the code with itself.  These
oracles share no code with pyratok: numpy bit arithmetic for binary quantization, an
explicit sum over kernel taps for the causal convolution, and sums over all 2^K codes for
the entropy family (autograd through them gives the gradients)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

# ---- bit-plane binary quantization ----------------------------------------------------------


def _np(x: torch.Tensor) -> np.ndarray:
    # float64 holds every fp16/bf16/fp32 value exactly, keeps the sign of -0.0 and NaN
    return x.detach().cpu().to(torch.float64).numpy()


def quantize_bits(x: torch.Tensor, dim: int) -> np.ndarray:
    """(.., K, ..) -> (.., .., K) bool: bit = 1 iff x > 0 (NaN, +0 and -0 give 0)."""
    return np.moveaxis(_np(x) > 0, dim, -1)


def bits_to_index(bits: np.ndarray) -> np.ndarray:
    """(..., K) bool -> (...,) int64 MSB-first, through np.packbits of the big-endian 64-bit word."""
    K = bits.shape[-1]
    padded = np.zeros(bits.shape[:-1] + (64,), dtype=np.uint8)
    padded[..., 64 - K:] = bits
    return np.packbits(padded, axis=-1, bitorder="big").view(">u8")[..., 0].astype(np.int64)


def index_to_bits(indices: torch.Tensor, K: int) -> np.ndarray:
    """(...,) MSB-first index -> (..., K) uint8, through np.unpackbits of the big-endian word."""
    words = indices.detach().cpu().to(torch.int64).numpy().astype(">i8")
    return np.unpackbits(words[..., None].view(np.uint8), axis=-1, bitorder="big")[..., 64 - K:]


def index_dtype(K: int) -> torch.dtype:
    return torch.int32 if K <= 31 else torch.int64


def binary_quantize(x: torch.Tensor, dim: int, scale: float):
    """-> (codes like x: +-scale, MSB-first indices, (.., K) uint8 bit labels)."""
    bits = quantize_bits(x, dim)
    codes = np.where(np.moveaxis(bits, -1, dim), scale, -scale)
    K = bits.shape[-1]
    idx = torch.from_numpy(bits_to_index(bits)).to(index_dtype(K)) if K <= 63 else None
    return torch.from_numpy(codes).to(x.dtype), idx, torch.from_numpy(bits.astype(np.uint8))


def indices_to_codes(indices: torch.Tensor, K: int, dim: int, scale: float, dtype) -> torch.Tensor:
    bits = np.moveaxis(index_to_bits(indices, K), -1, dim if dim >= 0 else indices.dim() + 1 + dim)
    return torch.from_numpy(np.where(bits == 1, scale, -scale)).to(dtype)


def residual_binary_quantize(x: torch.Tensor, levels: int, dim: int = 1):
    """Level i quantizes the residual with +-2^-i; residual carried in fp32 (fp64 for fp64 input)."""
    work = np.float64 if x.dtype == torch.float64 else np.float32
    r = _np(x).astype(work)
    total = np.zeros_like(r)
    ids = []
    for i in range(levels):
        step = work(2.0 ** -i)
        c = np.where(r > 0, step, -step).astype(work)
        ids.append(bits_to_index(np.moveaxis(r > 0, dim, -1)))
        total = (total + c).astype(work)
        r = (r - c).astype(work)
    K = x.shape[dim]
    return torch.from_numpy(total).to(x.dtype), torch.from_numpy(np.stack(ids)).to(index_dtype(K))


# ---- causal 3D convolution --------------------------------------------------------------------


def causal_conv3d(x, w, b, stride, dilation, padding, mode, cache):
    """Causal conv as an explicit float64 sum over the kernel taps of strided slices of the input
    with its P past frames (cache, zeros or frame 0) and zero H/W padding written out; autograd
    runs through it.  -> (y, new cache = the last P frames of past + input)."""
    x64, w64 = x.double(), w.double()
    kt, kh, kw = w.shape[2:]
    (st, sh, sw), (dt, dh, dw), (ph, pw) = stride, dilation, padding
    P = dt * (kt - 1) + 1 - st
    B, C, T, H, W = x.shape
    if cache is not None:
        past = cache.double()
    elif mode == "replicate":
        past = torch.stack([x64[:, :, 0]] * P, dim=2) if P else x64[:, :, :0]
    else:
        past = torch.zeros(B, C, P, H, W, dtype=torch.float64)
    full = torch.cat([past, x64], dim=2)
    padded = torch.zeros(B, C, P + T, H + 2 * ph, W + 2 * pw, dtype=torch.float64)
    padded[:, :, :, ph:ph + H, pw:pw + W] = full
    To = (P + T - dt * (kt - 1) - 1) // st + 1
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = torch.zeros(B, w.shape[0], To, Ho, Wo, dtype=torch.float64)
    for a, c, e in itertools.product(range(kt), range(kh), range(kw)):
        patch = padded[:, :, a * dt: a * dt + st * (To - 1) + 1: st,
                       c * dh: c * dh + sh * (Ho - 1) + 1: sh,
                       e * dw: e * dw + sw * (Wo - 1) + 1: sw]              # (B, C, To, Ho, Wo)
        y = y + torch.einsum("bcthw,oc->bothw", patch, w64[:, :, a, c, e])
    if b is not None:
        y = y + b.double().view(1, -1, 1, 1, 1)
    return y, full[:, :, full.shape[2] - P:]


# ---- entropy family ---------------------------------------------------------------------------


def all_codes(K: int) -> torch.Tensor:
    """(2^K, K) float64 bits of every code, MSB-first."""
    return torch.tensor(list(itertools.product((0.0, 1.0), repeat=K)), dtype=torch.float64)


def _bits_to_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def code_distribution(z: torch.Tensor) -> torch.Tensor:
    """(N, K) bit logits -> (N, 2^K) probabilities of every code (product of bit probabilities)."""
    codes = all_codes(z.shape[1])
    logp1, logp0 = torch.nn.functional.logsigmoid(z), torch.nn.functional.logsigmoid(-z)
    return torch.exp(logp1 @ codes.T + logp0 @ (1 - codes).T)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def entropy_terms(x: torch.Tensor, inv_temperature: float, scale: float = 1.0, dim: int = 1,
                  group_size: int | None = None):
    """float64 brute force -> (E_n H(p_n), H(q) of the whole code, sum over groups of H(q_group))."""
    z = _bits_to_rows(x.double(), dim) * (4 * inv_temperature * scale)
    K = z.shape[1]
    p = code_distribution(z)                                   # (N, 2^K)
    sample = _entropy(p).mean()
    codebook = _entropy(p.mean(0))
    groups = None
    if group_size is not None:
        groups = sum(_entropy(code_distribution(z[:, s:s + group_size]).mean(0)) for s in range(0, K, group_size))
    return sample, codebook, groups


def bernoulli_kl(p_logits: torch.Tensor, r_logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """KL(p || r) of two product distributions summed over all 2^K codes, mean over tokens."""
    a, b = _bits_to_rows(p_logits.double(), dim), _bits_to_rows(r_logits.double(), dim)
    p, r = code_distribution(a), code_distribution(b)
    return (p * (torch.log(p) - torch.log(r))).sum(1).mean()


def bit_probs(x: torch.Tensor, inv_temperature: float, scale: float = 1.0) -> torch.Tensor:
    return 1 / (1 + torch.exp(-4 * inv_temperature * scale * x.double()))


def binary_entropy_nats(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else 0.0
