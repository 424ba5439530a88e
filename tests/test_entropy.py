"""Entropy, codebook-usage and alignment losses: float64 brute force over all 2^K codes,
gradcheck, every backend against the reference, fp32 accumulation of fp16/bf16 input, the
upper bounds, vector-quantize-pytorch's LFQ aux loss as an outside oracle, extreme values,
opcheck and bad input.  The 2-process all-reduce test is tests/test_entropy_distributed.py."""

import math

import pytest
import torch

from pyratok import ops
from pyratok.reference import entropy as ref
import oracles as oracle
from conftest import CPU_BACKENDS, CUDA_BACKENDS, backend_dtypes, requires_cuda

BRUTE_FORCE_KS = [1, 2, 5, 8, 12]
# tolerance of a backend against the float64 reference, by input dtype (the statistics are
# accumulated in fp32 for every non-fp64 input, so fp16/bf16 only add the input rounding)
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


def latents(shape, seed, spread=0.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * spread).to(dtype)


def loss_and_grad(fn, x):
    x = x.detach().clone().requires_grad_()
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def brute_force_loss(x, tau, scale, w_sample, w_codebook):
    sample, codebook, _ = oracle.entropy_terms(x, tau, scale)
    return w_sample * sample - w_codebook * codebook


# ---- exactness: float64 brute force over all 2^K codes -----------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("K", BRUTE_FORCE_KS)
def test_brute_force_float64(backend, K):
    # (B, K, T) tokens, temperatures where neither term is saturated nor uniform
    x = latents((3, K, 5), seed=K)
    for tau, scale in [(1.0, 1.0), (3.0, 1 / math.sqrt(K))]:
        sample, codebook, _ = oracle.entropy_terms(x, tau, scale)
        kw = dict(inv_temperature=tau, scale=scale, backend=backend)
        torch.testing.assert_close(ops.per_sample_entropy(x, **kw), sample, rtol=0, atol=1e-10)
        torch.testing.assert_close(ops.codebook_entropy(x, **kw), codebook, rtol=0, atol=1e-10)
        got, grad = loss_and_grad(lambda t: ops.lfq_entropy_loss(t, 0.7, 1.3, **kw).loss, x)
        want, want_grad = loss_and_grad(lambda t: brute_force_loss(t, tau, scale, 0.7, 1.3), x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("K", BRUTE_FORCE_KS)
def test_gradcheck(backend, K):
    x = latents((6 if K > 5 else 3, K), seed=10 + K).requires_grad_()
    kw = dict(inv_temperature=2.0, backend=backend)
    # full gradcheck re-runs the op twice per input element; under the Triton interpreter the
    # fast mode (a random projection of the Jacobian, two runs) keeps it affordable
    check = lambda fn, inputs: torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")  # noqa: E731
    check(lambda t: ops.lfq_entropy_loss(t, 0.5, 1.5, **kw).loss, (x,))
    check(lambda t: ops.codebook_entropy(t, method="bits", **kw), (x,))
    if K > 2:
        check(lambda t: ops.codebook_entropy(t, method="groups", group_size=K // 2, **kw), (x,))
    r_logits = latents(x.shape, seed=20 + K, spread=3.0).requires_grad_()
    check(lambda a, b: ops.bernoulli_kl(a, b, backend=backend), (x, r_logits))
    check(lambda t: ops.bit_probs(t, 2.0, backend=backend), (x,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("K", [1, 3, 6])
def test_bernoulli_kl_brute_force(backend, K):
    # KL between the two product distributions summed over all 2^K codes
    a, b = latents((4, K), seed=K, spread=2.0), latents((4, K), seed=K + 1, spread=2.0)
    want = oracle.bernoulli_kl(a, b)
    torch.testing.assert_close(ops.bernoulli_kl(a, b, backend=backend), want, rtol=0, atol=1e-12)
    # the bits on another axis give the same value
    torch.testing.assert_close(ops.bernoulli_kl(a.T[None], b.T[None], dim=1, backend=backend), want,
                               rtol=0, atol=1e-12)
    assert ops.bernoulli_kl(a, a, backend=backend).item() == 0.0


# ---- every backend against the reference ---------------------------------------------------


def _all_terms(x, backend, dim=1):
    """Every op of the family on x with gradients, as a list of (name, value, grad)."""
    kw = dict(inv_temperature=1.5, dim=dim, backend=backend)
    r_logits = (x.detach().float() * 0.7 - 0.2).to(x.dtype)
    cases = [
        ("per_sample", lambda t: ops.per_sample_entropy(t, **kw)),
        ("exact", lambda t: ops.codebook_entropy(t, **kw)),
        ("groups", lambda t: ops.codebook_entropy(t, method="groups", group_size=3, **kw)),
        ("bits", lambda t: ops.codebook_entropy(t, method="bits", **kw)),
        ("loss", lambda t: ops.lfq_entropy_loss(t, 0.3, 1.1, **kw).loss),
        ("kl", lambda t: ops.bernoulli_kl(t, r_logits, dim=dim, backend=backend)),
        ("bit_probs", lambda t: (ops.bit_probs(t, 1.5, backend=backend) ** 2).sum()),
    ]
    return [(name, *loss_and_grad(fn, x)) for name, fn in cases]


def _oracle_terms(x, dim=1):
    """The terms of _all_terms from the float64 brute force over all 2^K codes (tests/oracles.py)."""
    r_logits = (x.detach().float() * 0.7 - 0.2).double()
    terms = lambda t: oracle.entropy_terms(t, 1.5, dim=dim, group_size=3)  # noqa: E731
    cases = [
        ("per_sample", lambda t: terms(t)[0]),
        ("exact", lambda t: terms(t)[1]),
        ("groups", lambda t: terms(t)[2]),
        ("bits", lambda t: oracle.entropy_terms(t, 1.5, dim=dim, group_size=1)[2]),
        ("loss", lambda t: 0.3 * terms(t)[0] - 1.1 * terms(t)[1]),
        ("kl", lambda t: oracle.bernoulli_kl(t, r_logits, dim=dim)),
        ("bit_probs", lambda t: (oracle.bit_probs(t, 1.5) ** 2).sum()),
    ]
    return [(name, *loss_and_grad(fn, x)) for name, fn in cases]


def check_backend_against_reference(x, backend, dim=1):
    """Every backend, the reference included, against the float64 brute force."""
    want = _oracle_terms(x.cpu().to(torch.float64), dim)
    got = _all_terms(x, backend, dim)
    tol = TOL[x.dtype]
    grad_tol = tol if x.dtype in (torch.float32, torch.float64) else 4e-3  # grads stored in x.dtype
    for (name, value, grad), (_, want_value, want_grad) in zip(got, want):
        assert value.dtype == ref.work_dtype(x.dtype), name
        assert grad.dtype == x.dtype and grad.shape == x.shape, name
        torch.testing.assert_close(value.cpu().double(), want_value, rtol=tol, atol=tol, msg=name)
        torch.testing.assert_close(grad.cpu().double(), want_grad, rtol=grad_tol, atol=grad_tol, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends_match_reference(backend):
    for dtype in backend_dtypes(backend):
        # channel-first video latents with an odd number of bits, and (N, K) tokens
        x = latents((2, 7, 3, 2, 3), seed=1).to(dtype)
        check_backend_against_reference(x, backend)
        check_backend_against_reference(latents((19, 10), seed=2).to(dtype), backend)
        # channels-last memory and bits last
        check_backend_against_reference(x.to(memory_format=torch.channels_last_3d), backend)
        check_backend_against_reference(latents((4, 5, 8), seed=3).to(dtype), backend, dim=-1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tiles_and_large_K(backend):
    # more tokens than one tile: the CPU tiles hold 2^24 / (2^KA + 2^KB) tokens (16384 at
    # K=18), the Triton kernels split the tokens over programs; then a K=24 group
    # (Triton: fp32, whose 64-token blocks the interpreter runs much faster than fp64's 16)
    x = latents((16500, 18) if backend == "cpu" else (150, 12), seed=4, spread=0.2)
    dtype, tol = (torch.float32, 2e-5) if backend == "triton" else (torch.float64, 1e-10)
    got, grad = loss_and_grad(lambda t: ops.codebook_entropy(t, 0.5, backend=backend), x.to(dtype))
    # the reference backend against the float64 brute force (K=12), the others against the reference
    exact = (lambda t: oracle.entropy_terms(t, 0.5)[1]) if backend == "reference" else \
        (lambda t: ref.codebook_entropy(t, 0.5))
    want, want_grad = loss_and_grad(exact, x)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol * 1e-2)
    for method, group_size in (("groups", 7), ("bits", None)):
        got = ops.codebook_entropy(x.to(dtype), 0.5, method=method, group_size=group_size, backend=backend)
        want = oracle.entropy_terms(x, 0.5, group_size=group_size or 1)[2] if backend == "reference" else \
            ref.codebook_entropy(x, 0.5, method=method, group_size=group_size)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    if backend == "cpu":
        x24 = latents((40, 24), seed=5, spread=0.2)
        got, grad = loss_and_grad(lambda t: ops.codebook_entropy(t, 0.5, backend=backend), x24)
        want, want_grad = loss_and_grad(lambda t: ref.codebook_entropy(t, 0.5), x24)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-10)


@pytest.fixture
def fused_everywhere(monkeypatch):
    """codebook_entropy takes the fused path (tiles of codes, value and gradient in one pass)
    for every size instead of only for >= 2^16 codes and <= 1024 tokens."""
    from pyratok.ops import entropy as E

    monkeypatch.setattr(E, "FUSED_MIN_CODES", 0)
    monkeypatch.setattr(E, "FUSED_MAX_TOKENS", 10**9)
    return E


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_path_matches_reference(backend, fused_everywhere):
    # every term of the family on the shapes of test_backends_match_reference, through the fused
    # path: odd K (halves of different widths), groups, 1-bit groups (an empty A half), dim=-1
    for dtype in backend_dtypes(backend):
        x = latents((2, 7, 3, 2, 3), seed=1).to(dtype)
        check_backend_against_reference(x, backend)
        check_backend_against_reference(latents((19, 10), seed=2).to(dtype), backend)
        check_backend_against_reference(latents((4, 5, 8), seed=3).to(dtype), backend, dim=-1)
    x = latents((5, 9), seed=7).requires_grad_()
    torch.autograd.gradcheck(lambda t: ops.codebook_entropy(t, 2.0, backend=backend), (x,),
                             fast_mode=backend == "triton")
    torch.autograd.gradcheck(lambda t: ops.codebook_entropy(t, 2.0, method="groups", group_size=4, backend=backend),
                             (x,), fast_mode=backend == "triton")
    # saturated and extreme logits stay finite
    x = latents((20, 10), seed=9, spread=1.0)
    x[::3] *= 1e4
    x[2, :] = 0.0
    for tau in (1e-3, 1e3):
        out, grad = loss_and_grad(lambda t: ops.codebook_entropy(t, tau, backend=backend), x.float())
        assert torch.isfinite(out) and torch.isfinite(grad).all(), tau


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="pyratok._C is not built (PYRATOK_BUILD_EXT=0)")
def test_fused_path_at_k24_and_its_token_limit():
    from pyratok.ops import entropy as E

    # the model's regime (K = 24, few tokens) takes the fused path, no gradient when none is needed
    assert E._fused_pays(40, [24], "cpu") and not E._fused_pays(E.FUSED_MAX_TOKENS + 1, [24], "cpu")
    assert not E._fused_pays(40, [12], "cpu") and not E._fused_pays(40, [24], "cuda")
    x = latents((40, 24), seed=5, spread=0.3, dtype=torch.float32)
    want, want_grad = loss_and_grad(lambda t: ref.codebook_entropy(t, 0.5), x.double())
    got, grad = loss_and_grad(lambda t: ops.codebook_entropy(t, 0.5, backend="cpu"), x)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
    # fp32 error of the gradient against fp64: at most twice that of the counts path in fp32
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "FUSED_MAX_TOKENS", 0)
        _, counts_grad = loss_and_grad(lambda t: ops.codebook_entropy(t, 0.5, backend="cpu"), x)
    err = lambda g: (g.double() - want_grad).norm() / want_grad.norm()  # noqa: E731
    assert err(grad) <= 2 * err(counts_grad) + 1e-7, (err(grad), err(counts_grad))
    with torch.no_grad():
        value, unit_grad = E._soft_code_entropy_op(x, E._coefficient(0.5, 1.0), [24], False, "cpu")
    assert unit_grad.numel() == 0 and value.item() == got.item()
    # asked for no gradient, it has none to give
    value, _ = E._soft_code_entropy_op(x.clone().requires_grad_(), 0.5, [24], False, "cpu")
    with pytest.raises(RuntimeError, match="with_grad=False"):
        value.backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_precision_accumulates_in_fp32(backend):
    for dtype in [d for d in backend_dtypes(backend) if d in (torch.float16, torch.bfloat16)]:
        x = latents((64, 12), seed=6, dtype=dtype)
        for fn in (lambda t: ops.lfq_entropy_loss(t, 1.0, 1.0, inv_temperature=2.0, backend=backend).loss,
                   lambda t: ops.codebook_entropy(t, 2.0, method="groups", group_size=5, backend=backend),
                   lambda t: ops.bernoulli_kl(t, t.flip(0), backend=backend)):
            low, exact = fn(x), fn(x.float())  # fp16/bf16 -> fp32 is exact: same inputs
            assert low.dtype == torch.float32
            torch.testing.assert_close(low, exact, rtol=1e-6, atol=1e-6)
        # a naive fp16 computation would round q's 4096 entries to ~3 digits; ours matches fp64
        torch.testing.assert_close(ops.codebook_entropy(x, 2.0, backend=backend).double(),
                                   oracle.entropy_terms(x.double(), 2.0)[1], rtol=1e-6, atol=1e-6)


# ---- the bounds --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_groups_and_bits_are_upper_bounds(backend):
    for seed, K in [(0, 6), (1, 9), (2, 12)]:
        # correlated bits: every channel shares a common per-token component
        base = latents((50, 1), seed=seed)
        x = base + 0.3 * latents((50, K), seed=seed + 100)
        exact = ops.codebook_entropy(x, 2.0, backend=backend)
        previous = exact
        for g in (K // 2, K // 3, 1):
            bound = ops.codebook_entropy(x, 2.0, method="groups", group_size=g, backend=backend)
            assert bound >= previous - 1e-12  # finer groups: looser bound
            previous = bound
        bits = ops.codebook_entropy(x, 2.0, method="bits", backend=backend)
        torch.testing.assert_close(bits, previous, rtol=0, atol=1e-12)
        assert bits > exact + 0.1  # the correlation is strong: the bound is not tight here


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bounds_tight_for_independent_groups(backend):
    # full factorial design: every token of group-1 logits paired with every token of
    # group-2 logits, so q = q_1 (x) q_2 exactly and H(q) = H(q_1) + H(q_2)
    first, second = latents((6, 4), seed=7, spread=2.0), latents((5, 3), seed=8, spread=2.0)
    x = torch.cat([first.repeat_interleave(5, 0), second.repeat(6, 1)], dim=1)  # (30, 7)
    exact = ops.codebook_entropy(x, backend=backend, inv_temperature=0.5)
    groups = ops.codebook_entropy(x, backend=backend, inv_temperature=0.5, method="groups", group_size=4)
    torch.testing.assert_close(groups, exact, rtol=0, atol=1e-12)
    # one token: q is the token's own product distribution, so every bound is exact
    one = x[:1]
    exact1 = ops.codebook_entropy(one, 0.5, backend=backend)
    torch.testing.assert_close(ops.codebook_entropy(one, 0.5, method="bits", backend=backend), exact1,
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(ops.per_sample_entropy(one, 0.5, backend=backend), exact1, rtol=0, atol=1e-12)


# ---- vector-quantize-pytorch LFQ as outside oracle -----------------------------------------


@pytest.mark.parametrize("K,tau", [(4, 100.0), (8, 10.0), (12, 1.0)])
def test_matches_vector_quantize_pytorch_lfq(K, tau):
    """LFQ's aux loss (entropy term only) for the same inputs, temperature and weights.

    vector-quantize-pytorch clamps log(p) at 1e-5 (log(t, eps=1e-5) = t.clamp(min=eps).log()),
    which changes the value as soon as a code probability drops below 1e-5.  The inputs are
    drawn so that every per-token code probability stays above 1e-5 (checked below), where its
    value is the exact entropy we compute; the clamp is not reproduced.
    """
    vqp = pytest.importorskip("vector_quantize_pytorch")
    weight, gamma = 0.1, 1.3
    lfq = vqp.LFQ(dim=K, codebook_size=2 ** K, entropy_loss_weight=weight, diversity_gamma=gamma,
                  commitment_loss_weight=0.0).train()
    # min_c P_n(c) >= sigmoid(-|z|)^K = exp(-K softplus(|z|)) > 1e-5 when
    # softplus(|z|) < ln(1e5) / K; keep 10% margin
    bound = math.log(math.expm1(0.9 * math.log(1e5) / K)) / (4 * tau)
    x = (torch.rand(2, K, 4, 5, generator=torch.Generator().manual_seed(K)) * 2 - 1) * bound
    assert ref.code_probs(ref.bit_probs(ref.tokens_by_bits(x, 1).double(), tau)).min() > 1e-5
    (_, _, aux_loss), breakdown = lfq(x, inv_temperature=tau, return_loss_breakdown=True)
    ours = ops.lfq_entropy_loss(x, weight, weight * gamma, inv_temperature=tau)
    torch.testing.assert_close(ours.per_sample_entropy, breakdown.per_sample_entropy, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(ours.codebook_entropy, breakdown.batch_entropy, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(ours.loss, aux_loss, rtol=2e-5, atol=1e-6)


# ---- extreme values ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_nan_or_inf_at_extreme_values(backend):
    for dtype in backend_dtypes(backend):
        x = latents((20, 10), seed=9, spread=1.0)
        x[::3] *= 1e4
        x[1::7] = x[1::7].sign() * 1e4
        x[2, :] = 0.0
        x = x.to(dtype)
        for tau in (1e-3, 1.0, 1e3):
            for method, g in (("exact", None), ("groups", 4), ("bits", None)):
                out, grad = loss_and_grad(
                    lambda t: ops.lfq_entropy_loss(t, 1.0, 1.0, method, inv_temperature=tau, group_size=g,
                                                   backend=backend).loss, x)
                assert torch.isfinite(out) and torch.isfinite(grad).all(), (dtype, tau, method)
            probs, grad = loss_and_grad(lambda t: ops.bit_probs(t, tau, backend=backend).sum(), x)
            assert torch.isfinite(probs) and torch.isfinite(grad).all()
        # KL between logits up to 1e4 (saturated on both sides, equal, opposite, and mixed)
        for r_logits in (-x, x, x.flip(0), (x.float() * 1e-3).to(dtype)):
            kl, grad = loss_and_grad(lambda t: ops.bernoulli_kl(t, r_logits, backend=backend), x)
            assert torch.isfinite(kl) and torch.isfinite(grad).all() and kl >= 0, dtype
    # saturated tokens: zero per-sample entropy and an exact count of the codes hit
    x = torch.tensor([[1e4, -1e4, 1e4], [1e4, -1e4, 1e4], [-1e4, -1e4, 1e4]], dtype=torch.float64)
    assert ops.per_sample_entropy(x, 1e3, backend=backend).item() == 0.0
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    torch.testing.assert_close(ops.codebook_entropy(x, 1e3, backend=backend).item(), h, rtol=0, atol=1e-15)


# ---- codebook usage and bit probabilities ----------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_codebook_usage(backend):
    K = 10
    idx = torch.randint(0, 1 << K, (3, 7, 11), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    got = ops.codebook_usage(idx, K, backend=backend)
    counts = torch.bincount(idx.flatten().long(), minlength=1 << K).double()
    f = counts / counts.sum()
    assert got.codes_used.item() == int((counts > 0).sum())
    assert got.fraction_used.item() == (counts > 0).sum().item() / 1024
    torch.testing.assert_close(got.perplexity, torch.exp(-(f[f > 0] * f[f > 0].log()).sum()))
    # every code exactly once: all used, perplexity 2^K; one code only: perplexity 1
    every = ops.codebook_usage(torch.randperm(1 << K), K, backend=backend)
    assert every.fraction_used.item() == 1.0 and abs(every.perplexity.item() - 1024) < 1e-9
    assert ops.codebook_usage(torch.full((9,), 5), K, backend=backend).perplexity.item() == 1.0
    # float latents are quantized first (MSB-first, as binary_quantize)
    x = latents((2, K, 3, 4), seed=1)
    from_x = ops.codebook_usage(x, backend=backend)
    from_idx = ops.codebook_usage(ops.binary_quantize(x).indices, K, backend=backend)
    assert from_x == from_idx
    # K > 24: sorted unique codes, exact too
    big = torch.randint(0, 1 << 40, (500,), generator=torch.Generator().manual_seed(1)) // 4 * 4
    big[:100] = big[100:200]
    usage = ops.codebook_usage(big, 40, backend=backend)
    assert usage.codes_used.item() == big.unique().numel()
    assert usage.fraction_used.item() == big.unique().numel() / 2 ** 40


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bit_probs(backend):
    for dtype in backend_dtypes(backend):
        x = latents((3, 5, 7), seed=2, spread=3.0).to(dtype)
        got = ops.bit_probs(x, 0.5, scale=1 / math.sqrt(5), backend=backend)
        want = oracle.bit_probs(x, 0.5, 1 / math.sqrt(5))
        assert got.dtype == ref.work_dtype(dtype) and got.shape == x.shape
        torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])
    # LFQ's softmax over the 2^K codes factorises into these bits
    x = latents((4, 6), seed=3)
    softmax = torch.softmax(2 * 2.0 * x @ (2.0 * oracle.all_codes(6) - 1).T, dim=-1)
    p = ops.bit_probs(x, 2.0, backend=backend)
    torch.testing.assert_close(oracle.code_distribution(torch.log(p) - torch.log1p(-p)), softmax, rtol=0, atol=1e-13)


def test_torch_compile_fullgraph():
    x = latents((4, 6, 5), seed=4, dtype=torch.float32)
    fn = torch.compile(lambda t: ops.lfq_entropy_loss(t, 1.0, 1.0, inv_temperature=1.0).loss * 2,
                       fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), ops.lfq_entropy_loss(x, 1.0, 1.0, inv_temperature=1.0).loss * 2)


# ---- opcheck ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    x = latents((6, 7), seed=5, dtype=torch.float32).requires_grad_()
    r = latents((6, 7), seed=6, dtype=torch.float32).requires_grad_()
    sizes = [3, 3, 1]
    grad_counts = torch.randn(sum(1 << g for g in sizes))
    cases = [
        (torch.ops.pyratok.bit_probs, (x, 2.0, backend)),
        (torch.ops.pyratok.binary_entropy_sum, (x, 2.0, backend)),
        (torch.ops.pyratok.binary_entropy_backward, (x.detach(), 2.0, torch.tensor(0.5), backend)),
        (torch.ops.pyratok.soft_code_counts, (x, 2.0, sizes, backend)),
        (torch.ops.pyratok.soft_code_counts, (x.detach().double(), 2.0, [7], backend)),
        (torch.ops.pyratok.soft_code_counts_backward, (x.detach(), 2.0, sizes, grad_counts, backend)),
        (torch.ops.pyratok.soft_code_entropy, (x, 2.0, sizes, True, backend)),
        (torch.ops.pyratok.soft_code_entropy, (x.detach().double(), 2.0, [7], False, backend)),
        (torch.ops.pyratok.bernoulli_kl_sum, (x, r, backend)),
        (torch.ops.pyratok.bernoulli_kl_backward, (x.detach(), r.detach(), torch.tensor(1.5), backend)),
        (torch.ops.pyratok.code_histogram, (torch.randint(0, 128, (30,)), 7, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---- CUDA ------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_backends_match_reference(backend):
    for dtype in backend_dtypes(backend):
        x = latents((2, 7, 3, 2, 3), seed=1).to(dtype).cuda()
        check_backend_against_reference(x, backend)
        check_backend_against_reference(latents((33, 12), seed=2).to(dtype).cuda(), backend)
    for K in BRUTE_FORCE_KS:
        x = latents((3, K, 5), seed=K).cuda()
        sample, codebook = ref.naive_lfq_entropies(x.cpu(), 1.0, 1.0)
        got, grad = loss_and_grad(lambda t: ops.lfq_entropy_loss(t, 0.7, 1.3, inv_temperature=1.0,
                                                                 backend=backend).loss, x)
        want, want_grad = loss_and_grad(lambda t: brute_force_loss(t, 1.0, 1.0, 0.7, 1.3), x.cpu())
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-10)
        torch.testing.assert_close(grad.cpu(), want_grad, rtol=0, atol=1e-10)
    # K = 18 over several tiles and token splits, fp32 against the fp64 reference
    x = latents((5000, 18), seed=3, spread=0.2, dtype=torch.float32).cuda()
    got, grad = loss_and_grad(lambda t: ops.codebook_entropy(t, 0.5, backend=backend), x)
    want, want_grad = loss_and_grad(lambda t: ref.codebook_entropy(t, 0.5), x.cpu().double())
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), want_grad, rtol=1e-4, atol=1e-9)
    idx = torch.randint(0, 1 << 16, (10000,), device="cuda")
    assert ops.codebook_usage(idx, 16, backend=backend) == ops.codebook_usage(idx.cpu(), 16, backend="reference")
    assert torch.isfinite(ops.lfq_entropy_loss(x * 1e4, inv_temperature=1e3, backend=backend).loss)


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_input(backend):
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"method='exact'.*K <= 24, got K=30: use method='groups'.*method='bits'"):
        ops.codebook_entropy(torch.randn(3, 30), backend=backend)
    with pytest.raises(ValueError, match=r"method='exact'.*K=25"):
        ops.lfq_entropy_loss(torch.randn(3, 25), backend=backend)
    with pytest.raises(ValueError, match=r"r_logits: shape \(4, 5\) differs from p_logits \(4, 6\)"):
        ops.bernoulli_kl(x, torch.randn(4, 5), backend=backend)
    with pytest.raises(TypeError, match="x: expected a float16/bfloat16/float32/float64 tensor, got torch.int64"):
        ops.lfq_entropy_loss(torch.ones(4, 6, dtype=torch.int64), backend=backend)
    with pytest.raises(TypeError, match="x: expected a float16"):
        ops.codebook_entropy(torch.ones(4, 6, dtype=torch.int32), backend=backend)
    with pytest.raises(TypeError, match="r_logits: expected a float16"):
        ops.bernoulli_kl(x, torch.ones(4, 6, dtype=torch.bool), backend=backend)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        ops.per_sample_entropy([[1.0, 2.0]], backend=backend)
    with pytest.raises(ValueError, match="method='fast'"):
        ops.codebook_entropy(x, method="fast", backend=backend)
    with pytest.raises(TypeError, match="group_size: method='groups' needs an int"):
        ops.codebook_entropy(x, method="groups", backend=backend)
    with pytest.raises(ValueError, match="group_size=25"):
        ops.codebook_entropy(x, method="groups", group_size=25, backend=backend)
    with pytest.raises(ValueError, match="group_size=3 is only used with method='groups'"):
        ops.codebook_entropy(x, group_size=3, backend=backend)
    with pytest.raises(ValueError, match="inv_temperature=0"):
        ops.per_sample_entropy(x, inv_temperature=0, backend=backend)
    with pytest.raises(ValueError, match="scale=-1"):
        ops.bit_probs(x, scale=-1, backend=backend)
    with pytest.raises(ValueError, match="x: no tokens"):
        ops.codebook_entropy(torch.randn(0, 6), backend=backend)
    with pytest.raises(ValueError, match="dim=2"):
        ops.per_sample_entropy(x, dim=2, backend=backend)
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        ops.lfq_entropy_loss(x, process_group=object(), backend=backend)
    with pytest.raises(ValueError, match=r"codes: values must lie in \[0, 2\^4\)"):
        ops.codebook_usage(torch.tensor([3, 16]), 4, backend=backend)
    with pytest.raises(TypeError, match="K: required"):
        ops.codebook_usage(torch.tensor([3, 1]), backend=backend)
    with pytest.raises(ValueError, match="K=5 differs from x.shape"):
        ops.codebook_usage(x, 5, backend=backend)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="pyratok._C is not built (PYRATOK_BUILD_EXT=0)")
def test_cpp_kernel_ops_reject_bad_input_cleanly():
    # the private kernel ops check their own arguments: a Python error, never a crash
    x = torch.randn(5, 6)
    with pytest.raises(ValueError, match="group_sizes: the groups cover 5 bits, x has K=6"):
        torch.ops.pyratok._soft_code_counts(x, 1.0, [3, 2])
    with pytest.raises(ValueError, match="each group needs 1..24 bits, got 26"):
        torch.ops.pyratok._soft_code_counts(torch.randn(2, 26), 1.0, [26])
    with pytest.raises(ValueError, match=r"grad_counts: expected 64 values"):
        torch.ops.pyratok._soft_code_counts_backward(x, 1.0, [6], torch.zeros(10))
    with pytest.raises(ValueError, match="x: expected a \\(tokens, K\\) tensor"):
        torch.ops.pyratok._soft_code_counts(torch.randn(2, 3, 2), 1.0, [2])
    with pytest.raises(ValueError, match="group_sizes: the groups cover 5 bits, x has K=6"):
        torch.ops.pyratok._soft_code_entropy(x, 1.0, [3, 2], True)
    with pytest.raises(ValueError, match="x: no tokens"):
        torch.ops.pyratok._soft_code_entropy(torch.randn(0, 6), 1.0, [6], False)
    with pytest.raises(ValueError, match="r_logits: shape"):
        torch.ops.pyratok._bernoulli_kl_sum(x, torch.randn(5, 5))
    with pytest.raises(ValueError, match=r"indices: values must lie in \[0, 2\^3\)"):
        torch.ops.pyratok._code_histogram(torch.tensor([1, 8]), 3)
    with pytest.raises(ValueError, match="float16/bfloat16/float32/float64"):
        torch.ops.pyratok._binary_entropy_sum(torch.ones(3, dtype=torch.int32), 1.0)


def test_entropy_statistics_ignore_autocast():
    # under torch.autocast (CPU bf16 training) the statistics are computed as without it: the
    # fused forward-with-gradient must not mix a bf16 matmul into an fp32 computation
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 4, 4, generator=g, requires_grad=True)
    r = torch.randn(2, 16, 3, 4, 4, generator=g)
    plain = [ops.codebook_entropy(x, 1.0), ops.per_sample_entropy(x, 1.0), ops.bernoulli_kl(x, r),
             ops.lfq_entropy_loss(x, inv_temperature=1.0).loss]
    grads = torch.autograd.grad(sum(plain), x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = [ops.codebook_entropy(x, 1.0), ops.per_sample_entropy(x, 1.0), ops.bernoulli_kl(x, r),
                ops.lfq_entropy_loss(x, inv_temperature=1.0).loss]
    assert all(a.dtype == torch.float32 and torch.equal(a, p) for a, p in zip(auto, plain))
    assert torch.equal(torch.autograd.grad(sum(auto), x)[0], grads)
