"""Readable PyTorch reference for the lookup-free entropy and alignment losses (DESIGN.md §2.2).

The oracle every backend of pyratok/ops/entropy.py is tested against.  Works in any float
dtype; the statistics are computed in the *work dtype*: float64 for float64 input, float32
for everything else.

Model
-----
Token n has K channels x_nk (the channel axis ``dim``, default 1 as in ``(B, K, T, H, W)``;
N = numel / K tokens).  LFQ scores every code c in {-s, +s}^K with logit 2*tau*<x_n, c> and
takes the softmax over all 2^K codes.  That softmax factorises into independent bits:

    P_n(c) = prod_k p_nk^b_k (1 - p_nk)^(1 - b_k),   p_nk = sigmoid(z_nk),  z_nk = 4*tau*s*x_nk,

with b_k the bit of code c on channel k.  Codes are numbered MSB-first (channel 0 is the most
significant bit), as in binary quantization and vector-quantize-pytorch.

* per-sample entropy  E_n H(P_n) = mean_n sum_k h(p_nk),  h(p) = -p log p - (1-p) log(1-p);
  from the logit, h = softplus(z) - z*sigmoid(z).
* codebook entropy    H(q), q = mean_n P_n over all 2^K codes.  q does not factorise.  Split
  the code's bits into a most-significant half A (KA bits) and the rest B (KB bits); then
  P_n = P_A[n] (x) P_B[n] and q reshaped to (2^KA, 2^KB) is P_A^T P_B / N: one GEMM.
* "groups": the bits are cut into groups, each group's entropy is exact; by subadditivity
  their sum is an upper bound of H(q), equal to it when the groups are independent under q.
  "bits" is groups of one bit: sum_k h(mean_n p_nk).
* Bernoulli KL per bit from logits a (of p) and b (of r):
  KL(p || r) = softplus(b) - softplus(a) + sigmoid(a) * (a - b); its gradients are
  sigmoid(a) sigmoid(-a) (a - b) for a and sigmoid(b) - sigmoid(a) for b.

:func:`naive_lfq_entropies` materialises the full N x 2^K softmax as vector-quantize-pytorch
does; it is the brute-force oracle for small K (the tests use K <= 12).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("exact", "groups", "bits")
MAX_EXACT_BITS = 24  # q over 2^24 codes is 64 MiB in fp32; beyond that use groups


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logit_coefficient(inv_temperature: float, scale: float) -> float:
    """z = coef * x: the per-bit logit of LFQ's 2^K-way softmax with codes +-scale."""
    return 4.0 * inv_temperature * scale


def tokens_by_bits(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(.., K, ..) -> (N, K): one row per token, channels in order."""
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def group_sizes(K: int, method: str, group_size: int | None = None) -> list[int]:
    """Sizes of the consecutive bit groups whose code distributions are computed exactly."""
    if method == "exact":
        return [K]
    if method == "bits":
        return [1] * K
    full, rest = divmod(K, group_size)
    return [group_size] * full + ([rest] if rest else [])


def half_split(bits: int) -> tuple[int, int]:
    """(KA, KB): the most-significant KA = bits // 2 bits and the remaining KB bits."""
    return bits // 2, bits - bits // 2


def bit_probs(x: torch.Tensor, inv_temperature: float = 100.0, scale: float = 1.0) -> torch.Tensor:
    """p = sigmoid(4 * tau * s * x), elementwise, in the work dtype."""
    return torch.sigmoid(logit_coefficient(inv_temperature, scale) * x.to(work_dtype(x.dtype)))


def binary_entropy_from_logits(z: torch.Tensor) -> torch.Tensor:
    """h(sigmoid(z)) in nats.

    Written as softplus(-|z|) + |z| sigmoid(-|z|), two non-negative terms: the textbook
    softplus(z) - z sigmoid(z) cancels catastrophically for large |z| in fp32.
    """
    m = z.abs()
    return F.softplus(-m) + m * torch.sigmoid(-m)


def binary_entropy_grad(z: torch.Tensor) -> torch.Tensor:
    """d h(sigmoid(z)) / dz = -z sigmoid(z) sigmoid(-z)."""
    return -z * torch.sigmoid(z) * torch.sigmoid(-z)


def per_sample_entropy(x: torch.Tensor, inv_temperature: float = 100.0, scale: float = 1.0,
                       dim: int = 1) -> torch.Tensor:
    """mean_n sum_k h(p_nk): the mean entropy of the tokens' code distributions."""
    z = logit_coefficient(inv_temperature, scale) * x.to(work_dtype(x.dtype))
    return binary_entropy_from_logits(z).sum() / (x.numel() // x.shape[dim])


def code_probs(p: torch.Tensor) -> torch.Tensor:
    """(N, g) bit probabilities -> (N, 2^g) code probabilities, MSB-first.

    Built by doubling: appending bit j turns each code a into 2a (bit 0, times 1 - p_j) and
    2a + 1 (bit 1, times p_j).  g = 0 gives a column of ones.
    """
    probs = p.new_ones(p.shape[0], 1)
    for j in range(p.shape[1]):
        pj = p[:, j:j + 1]
        probs = torch.stack([probs * (1 - pj), probs * pj], dim=-1).flatten(1)
    return probs


def code_bits(bits: int, device=None) -> torch.Tensor:
    """(2^bits, bits) 0/1 table: row a holds the MSB-first bits of code a."""
    a = torch.arange(1 << bits, device=device)
    shifts = torch.arange(bits - 1, -1, -1, device=device)
    return ((a[:, None] >> shifts) & 1).to(torch.int64)


def _group_code_probs(z: torch.Tensor, bit0: int, bits: int) -> torch.Tensor:
    # (N, K) logits -> (N, 2^bits) code probabilities of channels [bit0, bit0 + bits)
    return code_probs(torch.sigmoid(z[:, bit0:bit0 + bits]))


def soft_code_counts(x2d: torch.Tensor, coef: float, sizes: list[int]) -> torch.Tensor:
    """(N, K) -> concatenated per-group soft counts sum_n P_n^(group)(c), each group 2^g long.

    Each group's counts are P_A^T P_B flattened MSB-first (index a * 2^KB + b).
    """
    z = coef * x2d.to(work_dtype(x2d.dtype))
    counts, bit0 = [], 0
    for g in sizes:
        ka, kb = half_split(g)
        probs_a = _group_code_probs(z, bit0, ka)       # (N, 2^KA)
        probs_b = _group_code_probs(z, bit0 + ka, kb)  # (N, 2^KB)
        counts.append((probs_a.T @ probs_b).flatten())
        bit0 += g
    return torch.cat(counts)


def soft_code_counts_backward(x2d: torch.Tensor, coef: float, sizes: list[int],
                              grad_counts: torch.Tensor) -> torch.Tensor:
    """d loss / d x2d from G = d loss / d counts, by two GEMMs per group.

    With W_A = (P_B G^T) * P_A (elementwise) and d P_n(c) / d z_nk = P_n(c) (b_k(c) - p_nk):
        d loss / d z_nk = sum_a W_A[n, a] (b_k(a) - p_nk)   for k in half A,
    and symmetrically with W_B = (P_A G) * P_B for half B.
    """
    z = coef * x2d.to(work_dtype(x2d.dtype))
    p = torch.sigmoid(z)
    grad_z = torch.zeros_like(z)
    bit0, offset = 0, 0
    for g in sizes:
        ka, kb = half_split(g)
        G = grad_counts[offset:offset + (1 << g)].reshape(1 << ka, 1 << kb)
        probs_a = _group_code_probs(z, bit0, ka)
        probs_b = _group_code_probs(z, bit0 + ka, kb)
        for first, nbits, weight in ((bit0, ka, (probs_b @ G.T) * probs_a),
                                     (bit0 + ka, kb, (probs_a @ G) * probs_b)):
            table = code_bits(nbits, z.device).to(z.dtype)  # (2^nbits, nbits)
            grad_z[:, first:first + nbits] = weight @ table - p[:, first:first + nbits] * weight.sum(1, keepdim=True)
        bit0 += g
        offset += 1 << g
    return (grad_z * coef).to(x2d.dtype)


def entropy_of_counts(counts: torch.Tensor, total) -> torch.Tensor:
    """sum over groups of H(counts_g / total) for concatenated group counts.

    0 log 0 = 0; the log is clamped at the smallest normal number so that the gradient stays
    finite where a count underflows to 0 (the counts' own derivatives vanish there).
    """
    q = counts / total
    tiny = torch.finfo(q.dtype).tiny
    terms = -q * q.clamp_min(tiny).log()
    return terms.sum()


def codebook_entropy(x: torch.Tensor, inv_temperature: float = 100.0, scale: float = 1.0, dim: int = 1,
                     method: str = "exact", group_size: int | None = None) -> torch.Tensor:
    """H(mean_n P_n) ("exact"), or the group / per-bit upper bound, via the half-split GEMM."""
    K = x.shape[dim]
    sizes = group_sizes(K, method, group_size)
    x2d = tokens_by_bits(x, dim)
    counts = soft_code_counts(x2d, logit_coefficient(inv_temperature, scale), sizes)
    return entropy_of_counts(counts, x2d.shape[0])


def lfq_entropy_loss(x: torch.Tensor, per_sample_weight: float = 1.0, codebook_weight: float = 1.0,
                     method: str = "exact", inv_temperature: float = 100.0, scale: float = 1.0,
                     group_size: int | None = None, dim: int = 1):
    """(loss, per-sample entropy, codebook entropy); loss = w_s E H(P_n) - w_c H(q) (MAGVIT-v2)."""
    sample = per_sample_entropy(x, inv_temperature, scale, dim)
    codebook = codebook_entropy(x, inv_temperature, scale, dim, method, group_size)
    return per_sample_weight * sample - codebook_weight * codebook, sample, codebook


def naive_lfq_entropies(x: torch.Tensor, inv_temperature: float = 100.0, scale: float = 1.0, dim: int = 1):
    """Brute force over all 2^K codes (K <= 16): (per-sample entropy, codebook entropy).

    Materialises the (N, 2^K) softmax of 2*tau*<x_n, c> over the codebook {-s, +s}^K, the
    way vector-quantize-pytorch's LFQ does, but with exact 0 log 0 = 0 (no clamp).
    """
    K = x.shape[dim]
    if K > 16:
        raise ValueError(f"K={K}: the naive reference materialises N x 2^K; use K <= 16")
    x2d = tokens_by_bits(x, dim).to(work_dtype(x.dtype))
    codebook = scale * (2.0 * code_bits(K, x.device).to(x2d.dtype) - 1.0)  # (2^K, K)
    log_probs = torch.log_softmax(2.0 * inv_temperature * x2d @ codebook.T, dim=-1)  # (N, 2^K)
    probs = log_probs.exp()
    per_sample = -(probs * log_probs).sum(-1).mean()
    q = probs.mean(0)
    codebook_h = -torch.special.xlogy(q, q).sum()
    return per_sample, codebook_h


def bernoulli_kl_elementwise(p_logits: torch.Tensor, r_logits: torch.Tensor) -> torch.Tensor:
    """KL(Bern(sigmoid(a)) || Bern(sigmoid(b))) per element, in the work dtype."""
    wd = work_dtype(torch.promote_types(p_logits.dtype, r_logits.dtype))
    a, b = p_logits.to(wd), r_logits.to(wd)
    # p (log p - log r) + (1 - p) (log(1 - p) - log(1 - r)) with log sigmoid(u) = -softplus(-u):
    # each log-ratio is weighted by the probability of its own side, so saturated logits give 0
    # instead of a difference of two huge softplus values.
    return (torch.sigmoid(a) * (F.softplus(-b) - F.softplus(-a))
            + torch.sigmoid(-a) * (F.softplus(b) - F.softplus(a)))


def bernoulli_kl(p_logits: torch.Tensor, r_logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """mean over positions of sum_k KL(Bern(sigmoid(a_k)) || Bern(sigmoid(b_k)))."""
    return bernoulli_kl_elementwise(p_logits, r_logits).sum() / (p_logits.numel() // p_logits.shape[dim])


def bernoulli_kl_grads(p_logits: torch.Tensor, r_logits: torch.Tensor):
    """Elementwise (d KL / d a, d KL / d b) of the per-bit KL, in the work dtype."""
    wd = work_dtype(torch.promote_types(p_logits.dtype, r_logits.dtype))
    a, b = p_logits.to(wd), r_logits.to(wd)
    return torch.sigmoid(a) * torch.sigmoid(-a) * (a - b), torch.sigmoid(b) - torch.sigmoid(a)


def code_histogram(indices: torch.Tensor, K: int) -> torch.Tensor:
    """(...) indices in [0, 2^K) -> (2^K,) int64 counts."""
    return torch.bincount(indices.reshape(-1).to(torch.int64), minlength=1 << K)


def usage_from_counts(counts: torch.Tensor, K: int):
    """(fraction of the 2^K codes used, usage perplexity exp(H(counts / total)), codes used)."""
    used = (counts > 0).sum()
    f = counts.to(torch.float64) / counts.sum().clamp_min(1)
    perplexity = torch.exp(-torch.special.xlogy(f, f).sum())
    return used.to(torch.float64) / float(2 ** K), perplexity, used


def codebook_usage(indices: torch.Tensor, K: int):
    """Usage statistics of a batch of K-bit codes: exact for every K (sorted unique codes)."""
    _, counts = torch.unique(indices.reshape(-1).to(torch.int64), return_counts=True)
    return usage_from_counts(counts, K)
