"""Entropy, codebook-usage and alignment losses for huge binary codebooks (DESIGN.md §2.2).

LFQ's entropy loss is usually computed by materialising the N x 2^K softmax over the whole
codebook (K = 18: 1 MiB per token).  Here nothing of size N x 2^K ever exists:

* the per-token code distribution factorises into bits, p_nk = sigmoid(4 tau s x_nk), so the
  per-sample entropy is mean_n sum_k h(p_nk), O(N K);
* the batch distribution q = mean_n P_n is computed exactly with the half-split identity
  q = P_A^T P_B / N (one GEMM per tile of tokens; backward: two GEMMs), memory
  O(tile * (2^KA + 2^KB) + 2^K), practical up to K = 24;
* beyond that, "groups" (exact entropies of bit groups, summed: an upper bound) and "bits"
  (the per-bit bound) make the approximation explicit.

Statistics are accumulated in fp32 whatever the input dtype (fp64 for fp64 input), and every
scalar returned is in that work dtype.  Each kernel op is one declaration (pyratok/ops/_define.py:
a custom op dispatching on ``backend``; reference: pyratok/reference/entropy.py; cpu/cuda: the
C++ extension, csrc/torch/entropy.cpp; triton: kernels/entropy.py) with its allocate function as
the fake kernel and a hand-written backward that is itself a declared op.

Non-finite input (the same on every backend, because it is applied here, before dispatch):

* +-inf in x is a saturated bit, p = 1 or 0: it adds 0 to the per-sample entropy, its exact
  share to q, and its gradient is 0 (x is clamped to +-SATURATED_LOGIT / coef first, where
  h and its derivative are exactly 0 in fp32 and fp64, so finite inputs are unchanged);
* NaN in x gives NaN results and gradients: bad input is reported, not hidden (the trainer
  stops with an error on a non-finite loss);
* weights, inv_temperature and scale must be finite numbers (ValueError otherwise).

Distributed: with ``process_group``, the batch statistics (the per-sample entropy sum, the
code counts and the token count) are all-reduced before the entropy, so R ranks give the
single-process value on the concatenated batch, and each rank's gradient w.r.t. its own x is
R times that slice of the single-process gradient, so that the gradient data parallelism
averages over ranks (DDP, FSDP) is the single-process one: R ranks train like one batch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from pyratok import _backend
from pyratok.ops._checks import MAX_INDEX_BITS, check_dim, check_float, check_indices, check_number
from pyratok.ops._define import define, native_kernel
from pyratok.ops.binary_quantize import binary_quantize
from pyratok.reference import entropy as ref

MAX_HISTOGRAM_BITS = 24  # dense 2^K histogram (128 MiB of int64 at K = 24); above: sort + unique


class EntropyLoss(NamedTuple):
    """Result of :func:`lfq_entropy_loss` (0-d tensors in the work dtype)."""

    loss: torch.Tensor                # per_sample_weight * per_sample_entropy - codebook_weight * codebook_entropy
    per_sample_entropy: torch.Tensor  # E_n H(P_n), nats
    codebook_entropy: torch.Tensor    # H(q) ("exact") or its upper bound ("groups", "bits"), nats


class CodebookUsage(NamedTuple):
    """Result of :func:`codebook_usage` (0-d tensors)."""

    fraction_used: torch.Tensor  # float64: distinct codes in the batch / 2^K
    perplexity: torch.Tensor     # float64: exp(H(empirical code distribution)), in [1, 2^K]
    codes_used: torch.Tensor     # int64: distinct codes in the batch


# ---------------------------------------------------------------------------------------
# argument checking


SATURATED_LOGIT = 1000.0  # |z| beyond which h(z) = softplus(z) - z sigmoid(z) and h'(z) are 0 in fp64


def _saturate_infinities(x: torch.Tensor, coef: float) -> torch.Tensor:
    """+-inf -> the finite value whose logit is +-SATURATED_LOGIT (NaN stays NaN).  The binary
    entropy of an infinite logit is inf - inf = NaN in every backend's formula; clamping makes
    it the limit, 0, with gradient 0 at the clamped elements."""
    bound = min(SATURATED_LOGIT / coef, torch.finfo(x.dtype).max)
    return x.clamp(-bound, bound)


def _coefficient(inv_temperature, scale) -> float:
    inv_temperature = check_number(inv_temperature, "inv_temperature", positive=True)
    scale = check_number(scale, "scale", positive=True)
    return ref.logit_coefficient(inv_temperature, scale)


def _check_group_sizes(K: int, method: str, group_size) -> list[int]:
    if method not in ref.METHODS:
        raise ValueError(f"method={method!r}: expected one of {ref.METHODS}")
    if method == "exact" and K > ref.MAX_EXACT_BITS:
        raise ValueError(
            f"method='exact' materialises q over all 2^K codes and supports K <= {ref.MAX_EXACT_BITS}, "
            f"got K={K}: use method='groups' with group_size <= {ref.MAX_EXACT_BITS} (sum of exact group "
            "entropies, an upper bound of H(q)) or method='bits' (the per-bit upper bound)")
    if method == "groups":
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size: method='groups' needs an int, got {type(group_size).__name__}")
        if not 1 <= group_size <= ref.MAX_EXACT_BITS:
            raise ValueError(f"group_size={group_size}: expected 1 <= group_size <= {ref.MAX_EXACT_BITS}")
    elif group_size is not None:
        raise ValueError(f"group_size={group_size} is only used with method='groups', got method={method!r}")
    return ref.group_sizes(K, method, group_size)


def _tokens_and_bits(x, dim: int, process_group) -> tuple[int, int]:
    K = x.shape[dim]
    if K < 1:
        raise ValueError(f"x.shape[{dim}] (K)=0: expected at least one bit")
    tokens = x.numel() // K
    if tokens == 0 and process_group is None:
        raise ValueError(f"x: no tokens (shape {tuple(x.shape)}); the entropies of an empty batch are undefined")
    return tokens, K


# ---------------------------------------------------------------------------------------
# distributed batch statistics


class _AllReduceSum(torch.autograd.Function):
    """Sum over the process group.  Every rank's loss is the same function f of the sum S, and
    data parallelism (DDP, FSDP) averages the ranks' parameter gradients: the objective it
    differentiates is the mean over ranks of f(S), so each rank's gradient through its local
    term must be the sum over ranks of df/dS, i.e. world x df/dS (the ranks' df/dS are equal).
    With the identity backward the all-reduced terms trained at 1/world of their weight."""

    @staticmethod
    def forward(ctx, t, group):
        out = t.clone()
        torch.distributed.all_reduce(out, group=group)
        ctx.world = torch.distributed.get_world_size(group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.world, None


def _check_process_group(process_group) -> None:
    if process_group is not None and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("process_group: torch.distributed is not initialised (call init_process_group first)")


def _global_sum(total: torch.Tensor, tokens: int, process_group):
    """(total, tokens) summed over the process group; tokens becomes a tensor there."""
    if process_group is None:
        return total, tokens
    count = torch.tensor(float(tokens), dtype=torch.float64, device=total.device)
    torch.distributed.all_reduce(count, group=process_group)
    return _AllReduceSum.apply(total, process_group), count.to(total.dtype)


def _entropy_and_log_q(counts: torch.Tensor, total):
    """(sum over groups of H(counts_g / total), log q clamped at the smallest normal number):
    ref.entropy_of_counts, keeping the log for the gradient, d H / d counts = -(log q + 1) / total."""
    log_q = (counts / total).clamp_min_(torch.finfo(counts.dtype).tiny).log_()
    return -(counts * log_q).sum() / total, log_q


class _CountsEntropy(torch.autograd.Function):
    """sum over groups of H(counts_g / total), as ref.entropy_of_counts, in three elementwise
    passes over the 2^K counts; the backward reuses the saved log q:
    d H / d counts = -(log q + 1) / total."""

    @staticmethod
    def forward(ctx, counts, total):
        value, log_q = _entropy_and_log_q(counts, total)
        ctx.save_for_backward(log_q, torch.as_tensor(total, dtype=counts.dtype, device=counts.device))
        return value

    @staticmethod
    def backward(ctx, grad):
        log_q, total = ctx.saved_tensors
        return (log_q + 1) * (-grad / total), None


# ---------------------------------------------------------------------------------------
# kernel ops


def _tk():
    from pyratok.kernels import entropy as tk

    return tk


def _work_empty(x: torch.Tensor, shape) -> torch.Tensor:
    return x.new_empty(shape, dtype=ref.work_dtype(x.dtype))


def _dense_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@define("bit_probs", family="entropy", native="_bit_probs")
def _bit_probs_op(x: torch.Tensor, coef: float) -> torch.Tensor:
    return _work_empty(x, x.shape)


_bit_probs_op.impl("triton")(lambda x, coef: _tk().bit_probs(x.contiguous(), coef))
_bit_probs_op.impl("reference")(lambda x, coef: torch.sigmoid(coef * x.to(ref.work_dtype(x.dtype))))


def _bit_probs_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    coef = ctx.inputs[1]
    z = coef * x.to(grad.dtype)
    # sigmoid(z) sigmoid(-z), not p (1 - p): exact in the tails
    return (grad * coef * torch.sigmoid(z) * torch.sigmoid(-z)).to(x.dtype), None, None


_bit_probs_op.autograd(_bit_probs_backward)


@define("binary_entropy_sum", family="entropy", native="_binary_entropy_sum")
def _binary_entropy_sum_op(x: torch.Tensor, coef: float) -> torch.Tensor:
    return _work_empty(x, ())


_binary_entropy_sum_op.impl("triton")(lambda x, coef: _tk().binary_entropy_sum(x.contiguous(), coef))
_binary_entropy_sum_op.impl("reference")(
    lambda x, coef: ref.binary_entropy_from_logits(coef * x.to(ref.work_dtype(x.dtype))).sum())


@define("binary_entropy_backward", family="entropy", native="_binary_entropy_backward")
def _binary_entropy_backward_op(x: torch.Tensor, coef: float, grad: torch.Tensor) -> torch.Tensor:
    return _dense_like(x)


_binary_entropy_backward_op.impl("triton")(
    lambda x, coef, grad: _tk().binary_entropy_backward(x.contiguous(), coef, grad))


@_binary_entropy_backward_op.impl("reference")
def _(x, coef, grad):
    z = coef * x.to(ref.work_dtype(x.dtype))
    return (grad * coef * ref.binary_entropy_grad(z)).to(x.dtype).contiguous()


_binary_entropy_sum_op.autograd(
    lambda ctx, grad: (_binary_entropy_backward_op.call(ctx.saved_tensors[0], ctx.inputs[1], grad, ctx.backend),
                       None, None))


@define("soft_code_counts", family="entropy", native="_soft_code_counts")
def _soft_code_counts_op(x: torch.Tensor, coef: float, group_sizes: list[int]) -> torch.Tensor:
    """(N, K) -> concatenated per-group soft code counts sum_n P_n^(g), each 2^g long."""
    return _work_empty(x, (sum(1 << g for g in group_sizes),))


_soft_code_counts_op.impl("triton")(
    lambda x, coef, group_sizes: _tk().soft_code_counts(x.contiguous(), coef, group_sizes))
_soft_code_counts_op.impl("reference")(ref.soft_code_counts)


@define("soft_code_counts_backward", family="entropy", native="_soft_code_counts_backward")
def _soft_code_counts_backward_op(x: torch.Tensor, coef: float, group_sizes: list[int],
                                  grad_counts: torch.Tensor) -> torch.Tensor:
    return _dense_like(x)


_soft_code_counts_backward_op.impl("triton")(
    lambda x, coef, group_sizes, grad_counts: _tk().soft_code_counts_backward(x.contiguous(), coef, group_sizes,
                                                                               grad_counts))
_soft_code_counts_backward_op.impl("reference")(
    lambda x, coef, group_sizes, grad_counts: ref.soft_code_counts_backward(x, coef, group_sizes,
                                                                             grad_counts).contiguous())
_soft_code_counts_op.autograd(
    lambda ctx, grad: (_soft_code_counts_backward_op.call(ctx.saved_tensors[0], ctx.inputs[1], ctx.inputs[2], grad,
                                                          ctx.backend), None, None, None))


@define("soft_code_entropy", family="entropy")
def _soft_code_entropy_op(x: torch.Tensor, coef: float, group_sizes: list[int],
                          with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> (sum over groups of H(counts_g / N) in nats, d that / d x or an empty tensor).

    The value and its gradient come out of one pass (the backward only scales the saved
    gradient): on the cpu backend over tiles of codes, without the 2^K counts as a whole
    (csrc/torch/entropy.cpp); the other backends compose the counts ops."""
    return _work_empty(x, ()), (_dense_like(x) if with_grad else x.new_empty(0))


_soft_code_entropy_op.impl("cpu", into=True)(native_kernel("_soft_code_entropy", _soft_code_entropy_op.allocate))


def _composed_soft_code_entropy(backend: str):
    def run(x, coef, group_sizes, with_grad):
        if backend == "reference":
            counts = ref.soft_code_counts(x, coef, group_sizes)
            backward = lambda g: ref.soft_code_counts_backward(x, coef, group_sizes, g)  # noqa: E731
        else:
            counts = _soft_code_counts_op.call(x, coef, group_sizes, backend)
            backward = lambda g: _soft_code_counts_backward_op.call(x, coef, group_sizes, g, backend)  # noqa: E731
        value, log_q = _entropy_and_log_q(counts, x.shape[0])
        grad = backward((log_q + 1) * (-1.0 / x.shape[0])).contiguous() if with_grad else x.new_empty(0)
        return value, grad

    return run


for _name in ("reference", "cuda", "triton"):
    _soft_code_entropy_op.impl(_name)(_composed_soft_code_entropy(_name))


def _soft_code_entropy_backward(ctx, grad_value, grad_grad):
    (unit_grad,) = ctx.saved_tensors
    if unit_grad.numel() == 0:
        raise RuntimeError("soft_code_entropy: called with with_grad=False, so it has no gradient")
    return (grad_value * unit_grad).to(unit_grad.dtype), None, None, None, None


_soft_code_entropy_op.autograd(_soft_code_entropy_backward, lambda ctx, inputs, output: ctx.save_for_backward(output[1]))


@define("bernoulli_kl_sum", family="entropy", native="_bernoulli_kl_sum")
def _bernoulli_kl_sum_op(p_logits: torch.Tensor, r_logits: torch.Tensor) -> torch.Tensor:
    return _work_empty(p_logits, ())


_bernoulli_kl_sum_op.impl("triton")(lambda p, r: _tk().bernoulli_kl_sum(p.contiguous(), r.contiguous()))
_bernoulli_kl_sum_op.impl("reference")(lambda p, r: ref.bernoulli_kl_elementwise(p, r).sum())


@define("bernoulli_kl_backward", family="entropy", native="_bernoulli_kl_backward")
def _bernoulli_kl_backward_op(p_logits: torch.Tensor, r_logits: torch.Tensor,
                              grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _dense_like(p_logits), _dense_like(r_logits)


_bernoulli_kl_backward_op.impl("triton")(
    lambda p, r, grad: _tk().bernoulli_kl_backward(p.contiguous(), r.contiguous(), grad))


@_bernoulli_kl_backward_op.impl("reference")
def _(p_logits, r_logits, grad):
    grad_p, grad_r = ref.bernoulli_kl_grads(p_logits, r_logits)
    return (grad * grad_p).to(p_logits.dtype).contiguous(), (grad * grad_r).to(r_logits.dtype).contiguous()


_bernoulli_kl_sum_op.autograd(
    lambda ctx, grad: (*_bernoulli_kl_backward_op.call(*ctx.saved_tensors, grad, ctx.backend), None))


@define("code_histogram", family="entropy", native="_code_histogram")
def _code_histogram_op(indices: torch.Tensor, K: int) -> torch.Tensor:
    return indices.new_empty(1 << K, dtype=torch.int64)


_code_histogram_op.impl("triton")(lambda indices, K: _tk().code_histogram(indices.contiguous(), K))
_code_histogram_op.impl("reference")(ref.code_histogram)


# ---------------------------------------------------------------------------------------
# public API


def _statistics_in_fp32(fn):
    """Under autocast the entropy statistics run with autocast off, on their inputs as given (the
    ops compute in fp32, or fp64 for fp64 input): a reduced-precision matmul inside the fused
    forward-with-gradient would mix dtypes, and entropies are fp32 ops like softmax and log."""
    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        device = x.device.type if isinstance(x, torch.Tensor) else "cpu"
        if not torch.is_autocast_enabled(device):
            return fn(x, *args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper


@_statistics_in_fp32
def bit_probs(x: torch.Tensor, inv_temperature: float = 100.0, scale: float = 1.0,
              backend: Optional[str] = None) -> torch.Tensor:
    """p = sigmoid(4 * inv_temperature * scale * x), elementwise, in the work dtype (fp32;
    fp64 for fp64 x): the probability that each bit is 1 under LFQ's softmax over codes +-scale."""
    check_float(x)
    return _bit_probs_op(x, _coefficient(inv_temperature, scale), backend=backend)


@_statistics_in_fp32
def per_sample_entropy(x: torch.Tensor, inv_temperature: float = 100.0, scale: float = 1.0, dim: int = 1,
                       process_group=None, backend: Optional[str] = None) -> torch.Tensor:
    """E_n H(P_n) = mean over tokens of sum_k h(p_nk), exact, in nats.

    x: (.., K, ..) with the K bits on axis ``dim`` (e.g. (B, K, T, H, W)); any float dtype.
    """
    check_float(x)
    dim = check_dim(dim, x.dim())
    _check_process_group(process_group)
    tokens, _ = _tokens_and_bits(x, dim, process_group)
    coef = _coefficient(inv_temperature, scale)
    total = _binary_entropy_sum_op(_saturate_infinities(x, coef), coef, backend=backend)
    total, tokens = _global_sum(total, tokens, process_group)
    return total / tokens


# The codebook entropy has two CPU paths (csrc/torch/entropy.cpp).  The counts path builds
# the 2^K soft counts (token tiles, GEMMs accumulated) and takes elementwise passes over them;
# the fused path never stores them (tiles of codes: GEMM, then the log in cache) and computes
# the gradient in the same pass; its GEMMs run on tiles of codes, less efficiently than the
# counts path's over many tokens.  The passes cost ~2^K, the GEMMs ~N 2^K, so the crossover is
# a token count, about the same for every K.  Measured (fwd + bwd, 2 cores, counts / fused):
#   K = 24: N = 3: 140 / 16 ms, 48: 156 / 38, 192: 232 / 125, 768: 533 / 480, 1536: 891 / 970
#   K = 20: N = 3: 3.6 / 1.3 ms, 192: 11.6 / 8.3, 768: 32.8 / 30.7, 1536: 59.6 / 60.3
# Below 2^16 codes both are fast and the counts path is kept.
FUSED_MAX_TOKENS = 1024
FUSED_MIN_CODES = 1 << 16


def _fused_pays(tokens: int, sizes: list[int], backend: str) -> bool:
    return _backend.base(backend) == "cpu" and 0 < tokens <= FUSED_MAX_TOKENS and sum(1 << g for g in sizes) >= FUSED_MIN_CODES


@_statistics_in_fp32
def codebook_entropy(x: torch.Tensor, inv_temperature: float = 100.0, scale: float = 1.0, dim: int = 1,
                     method: str = "exact", group_size: Optional[int] = None, process_group=None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """H(q) of the batch code distribution q = mean_n P_n over all 2^K codes, in nats.

    method="exact" (K <= 24): the half-split GEMM, exact.  method="groups": the bits are cut
    into consecutive groups of ``group_size`` (the last one may be shorter) and the exact group
    entropies are summed, an upper bound of H(q) that is tight when the groups are independent
    under q.  method="bits": the per-bit bound sum_k h(mean_n p_nk).
    """
    check_float(x)
    dim = check_dim(dim, x.dim())
    _check_process_group(process_group)
    tokens, K = _tokens_and_bits(x, dim, process_group)
    sizes = _check_group_sizes(K, method, group_size)
    coef = _coefficient(inv_temperature, scale)
    x2d = ref.tokens_by_bits(x, dim).contiguous()  # (N, K)
    backend = _soft_code_counts_op.resolve(backend, x.device)
    if process_group is None and _fused_pays(tokens, sizes, backend):
        with_grad = torch.is_grad_enabled() and x2d.requires_grad
        return _soft_code_entropy_op(x2d, coef, sizes, with_grad, backend=backend)[0]
    counts = _soft_code_counts_op(x2d, coef, sizes, backend=backend)
    counts, tokens = _global_sum(counts, tokens, process_group)
    return _CountsEntropy.apply(counts, tokens)


@_statistics_in_fp32
def lfq_entropy_loss(x: torch.Tensor, per_sample_weight: float = 1.0, codebook_weight: float = 1.0,
                     method: str = "exact", process_group=None, *, inv_temperature: float = 100.0,
                     scale: float = 1.0, group_size: Optional[int] = None, dim: int = 1,
                     backend: Optional[str] = None) -> EntropyLoss:
    """The MAGVIT-v2 / LFQ entropy loss  per_sample_weight * E H(P_n) - codebook_weight * H(q).

    vector-quantize-pytorch's ``LFQ(entropy_loss_weight=w, diversity_gamma=g)`` aux loss is
    ``per_sample_weight=w, codebook_weight=w * g`` with the same ``inv_temperature`` (its
    default is 100) and ``scale`` = its codebook scale (1/sqrt(K) times it when spherical).
    Returns :class:`EntropyLoss`.
    """
    w_sample = check_number(per_sample_weight, "per_sample_weight")
    w_codebook = check_number(codebook_weight, "codebook_weight")
    kwargs = dict(inv_temperature=inv_temperature, scale=scale, dim=dim, process_group=process_group,
                  backend=backend)
    sample = per_sample_entropy(x, **kwargs)
    codebook = codebook_entropy(x, method=method, group_size=group_size, **kwargs)
    return EntropyLoss(w_sample * sample - w_codebook * codebook, sample, codebook)


@_statistics_in_fp32
def bernoulli_kl(p_logits: torch.Tensor, r_logits: torch.Tensor, dim: int = 1,
                 backend: Optional[str] = None) -> torch.Tensor:
    """Mean over positions of KL(p || r) between two Bernoulli-product distributions.

    p_logits, r_logits: the same shape (.., K, ..), bits on axis ``dim``; p = sigmoid(p_logits),
    r = sigmoid(r_logits).  Exact: sum over the K bits of the per-bit KL, averaged over the
    positions; differentiable in both arguments (detach r for a stop-gradient target).
    """
    check_float(p_logits, "p_logits")
    check_float(r_logits, "r_logits")
    if p_logits.shape != r_logits.shape:
        raise ValueError(f"r_logits: shape {tuple(r_logits.shape)} differs from p_logits {tuple(p_logits.shape)}; "
                         "the KL pairs each bit of p with the same bit of r (broadcast explicitly first)")
    if p_logits.device != r_logits.device:
        raise ValueError(f"r_logits: on {r_logits.device}, p_logits on {p_logits.device}")
    dim = check_dim(dim, p_logits.dim())
    positions = p_logits.numel() // p_logits.shape[dim] if p_logits.shape[dim] else 0
    if positions == 0:
        raise ValueError(f"p_logits: no positions (shape {tuple(p_logits.shape)})")
    common = torch.promote_types(p_logits.dtype, r_logits.dtype)
    total = _bernoulli_kl_sum_op(p_logits.to(common), r_logits.to(common), backend=backend)
    return total / positions


def codebook_usage(codes: torch.Tensor, K: Optional[int] = None, dim: int = 1,
                   backend: Optional[str] = None) -> CodebookUsage:
    """Code usage of a batch: fraction of the 2^K codes used and the usage perplexity.

    codes: MSB-first integer indices (..) with ``K`` given, or float latents (.., K, ..) that
    are binary-quantized along ``dim`` first.  Exact for every K: a dense 2^K histogram for
    K <= 24, and sorted unique codes above (a batch of N tokens uses at most N codes, so no
    estimate is needed).  Returns :class:`CodebookUsage`.
    """
    if isinstance(codes, torch.Tensor) and codes.is_floating_point():
        dim = check_dim(dim, codes.dim())
        if K is not None and K != codes.shape[dim]:
            raise ValueError(f"K={K} differs from x.shape[{dim}]={codes.shape[dim]}")
        K = codes.shape[dim]
        if not 1 <= K <= MAX_INDEX_BITS:
            raise ValueError(f"x.shape[{dim}] (K)={K}: codebook usage needs 1 <= K <= {MAX_INDEX_BITS}")
        indices = binary_quantize(codes, dim, return_codes=False, backend=backend).indices
    else:
        if K is None:
            raise TypeError("K: required when codes are integer indices")
        if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= MAX_INDEX_BITS:
            raise ValueError(f"K={K!r}: codebook usage needs an int 1 <= K <= {MAX_INDEX_BITS}")
        check_indices(codes, K, name="codes")
        indices = codes
    if K > MAX_HISTOGRAM_BITS:
        return CodebookUsage(*ref.codebook_usage(indices, K))
    counts = _code_histogram_op(indices, K, backend=backend)
    return CodebookUsage(*ref.usage_from_counts(counts, K))
