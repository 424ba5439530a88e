"""The codebook and reconstruction loss terms on tiny hand-built inputs: each term's value against
its formula (written here, float64), the stop-gradients (zero gradient where a stop-gradient must
block it, nonzero where the term must train), and the weighted total as the sum of the weighted
terms.  (The alignment terms' values and the model-level total are also in test_tokenizer.py.)
The tests after the model test pin what the mutation run (benchmarks/results/mutation.md) found
unchecked: the entropy method "auto" picks, the process group's way to the entropy and text_code
terms, the config's validation and LossBreakdown.scalars."""

import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pyratok import ops
from pyratok.models.lapq import LaPQOutput
from pyratok.models.losses import (LossBreakdown, LossConfig, bernoulli_kl_from_probability, codebook_terms,
                                   codebook_total)
import oracles as oracle

K = 5


def hand_output(seed=0, text=True):
    """Two levels of pre-quantization values z_l (leaves), straight-through +-1 codes of them, and
    per-clip text logits (leaves): a LaPQOutput with nothing else in it."""
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(2, K, 2, 2, 2, generator=g, dtype=torch.float64).requires_grad_(),
              torch.randn(2, K, 2, 4, 4, generator=g, dtype=torch.float64).requires_grad_()]
    codes = [z + (torch.where(z > 0, 1.0, -1.0) - z).detach() for z in logits]
    text_logits = [torch.randn(2, K, 1, 1, 1, generator=g, dtype=torch.float64).requires_grad_()
                   for _ in logits] if text else None
    return LaPQOutput(None, codes, None, logits, text_logits, None, None)


def bernoulli_kl(r, p):
    """KL(Bern(r) || Bern(p)) summed over the bit axis 1, mean over the rest (probabilities)."""
    return (r * (r / p).log() + (1 - r) * ((1 - r) / (1 - p)).log()).sum(1).mean()


def grads(value, tensors):
    out = torch.autograd.grad(value, tensors, allow_unused=True, retain_graph=True)
    return [None if g is None or not g.abs().sum() else g for g in out]


def level_term_formulas(out, tau, gamma):
    """commitment, entropy and hierarchy of hand_output's two levels by their formulas (float64)."""
    want_commit, want_entropy = 0, 0
    for z in out.logits:
        c = torch.where(z > 0, 1.0, -1.0)
        want_commit = want_commit + ((z - c) ** 2).mean()
        sample, codebook, _ = oracle.entropy_terms(z, tau)                      # p = sigmoid(4 tau z)
        want_entropy = want_entropy + sample - gamma * codebook
    # the hierarchy term is KL(sg(up(p_coarse)) || p_fine): the coarse level as the target, first
    p = torch.sigmoid(4 * tau * out.logits[1])
    r = torch.sigmoid(4 * tau * out.logits[0]).repeat_interleave(2, 3).repeat_interleave(2, 4)
    return want_commit, want_entropy, bernoulli_kl(r, p), bernoulli_kl(p, r)


def test_commitment_and_entropy_are_their_formulas():
    out = hand_output()
    cfg = LossConfig(inv_temperature=0.5, entropy_gamma=0.7)
    terms = codebook_terms(out, cfg)
    want_commit, want_entropy, want_hierarchy, reversed_kl = level_term_formulas(out, 0.5, 0.7)
    torch.testing.assert_close(terms["commitment"].double(), want_commit, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(terms["entropy"].double(), want_entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["hierarchy"].double(), want_hierarchy, rtol=1e-5, atol=1e-6)
    assert (reversed_kl - want_hierarchy).abs() > 1e-2                    # the direction is visible here
    # the weighted codebook total is the sum of the weighted terms
    weights = dataclasses.replace(cfg, commitment=0.3, entropy=0.2, hierarchy=0.4, text_token=0.6, text_code=0.8)
    want_total = sum(getattr(weights, k) * v for k, v in terms.items() if v is not None)
    torch.testing.assert_close(codebook_total(terms, weights), want_total, rtol=1e-6, atol=1e-7)


def test_stop_gradients():
    out = hand_output()
    cfg = LossConfig()
    terms = codebook_terms(out, cfg)
    z0, z1 = out.logits
    t0, t1 = out.text_logits
    # commitment ||z - sg(c)||^2: d/dz = 2 (z - c) / n (without the stop-gradient the straight-through
    # codes would cancel it to 0)
    g0, g1 = grads(terms["commitment"], [z0, z1])
    for z, g in ((z0, g0), (z1, g1)):
        assert g is not None
        torch.testing.assert_close(g, 2 * (z - torch.where(z > 0, 1.0, -1.0)).detach() / z.numel(),
                                   rtol=1e-5, atol=1e-8)                           # the term is fp32
    # hierarchy: trains the fine level only, the coarse target is stopped
    g0, g1 = grads(terms["hierarchy"], [z0, z1])
    assert g0 is None and g1 is not None
    # text_token KL(r_text || p): trains both the text head and the tokens
    assert all(g is not None for g in grads(terms["text_token"], [z0, z1, t0, t1]))
    # text_code KL(sg(u) || r_text): trains the text head only (u is the hard codes' bit usage)
    g = grads(terms["text_code"], [z0, z1, t0, t1])
    assert g[0] is None and g[1] is None and g[2] is not None and g[3] is not None
    # its gradient is that of the formula with u held fixed
    u = (out.codes[0].detach() > 0).double().mean(dim=(2, 3, 4))
    t = t0.detach().clone().requires_grad_()
    rr = torch.sigmoid(t.flatten(1))
    (torch.xlogy(u, u / rr) + torch.xlogy(1 - u, (1 - u) / (1 - rr))).sum(1).mean().backward()
    torch.testing.assert_close(g[2].float(), t.grad.float(), rtol=1e-4, atol=1e-6)
    # entropy reaches every level
    assert all(g is not None for g in grads(terms["entropy"], [z0, z1]))


def test_switched_off_terms_are_absent():
    out = hand_output(text=False)
    terms = codebook_terms(out, LossConfig(commitment=0.0, hierarchy=0.0))
    assert terms["commitment"] is None and terms["hierarchy"] is None
    assert terms["text_token"] is None and terms["text_code"] is None and terms["entropy"] is not None
    torch.testing.assert_close(codebook_total(terms, LossConfig()), LossConfig().entropy * terms["entropy"])


def test_model_recon_and_drift_terms_are_their_formulas():
    from pyratok.metrics import ssim
    from pyratok.models.pyratok import PyraTok, PyraTokConfig

    torch.manual_seed(0)
    model = PyraTok(PyraTokConfig.tiny(text_encoder=None)).eval()
    model.config.loss = dataclasses.replace(model.config.loss, drift=0.6, ar=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.01)
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1
    recon, losses = model(video)
    t = losses.terms
    torch.testing.assert_close(t["l1"], (recon - video).abs().mean())
    torch.testing.assert_close(t["ssim"], 1 - ssim(recon, video, clamp=False))
    # drift: the mean over the taps of the squared distance to the frozen encoder's (LoRA off) features
    lora_on = [f for f in model.vae.encoder_taps(video)]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.zero_()
    frozen = model.vae.encoder_taps(video)
    want = sum(F.mse_loss(lora_on[s], frozen[s]) for s in model.taps) / len(model.taps)
    torch.testing.assert_close(t["drift"], want, rtol=1e-5, atol=1e-8)
    assert t["drift"] > 0


@pytest.mark.parametrize("name", ["commitment", "entropy", "hierarchy", "text_token", "text_code"])
def test_each_codebook_weight_scales_only_its_term(name):
    out = hand_output()
    base = LossConfig()
    terms = codebook_terms(out, base)
    doubled = dataclasses.replace(base, **{name: 2 * getattr(base, name)})
    diff = codebook_total(codebook_terms(out, doubled), doubled) - codebook_total(terms, base)
    torch.testing.assert_close(diff.double(), getattr(base, name) * terms[name].double(), rtol=1e-5, atol=1e-7)


def test_terms_without_text_logits_still_cover_every_level():
    # no text head: the text terms are skipped per level, the other terms still sum over all levels
    out = hand_output(text=False)
    terms = codebook_terms(out, LossConfig(inv_temperature=0.5, entropy_gamma=0.7))
    want_commit, want_entropy, want_hierarchy, _ = level_term_formulas(out, 0.5, 0.7)
    torch.testing.assert_close(terms["commitment"].double(), want_commit, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(terms["entropy"].double(), want_entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["hierarchy"].double(), want_hierarchy, rtol=1e-5, atol=1e-6)
    assert terms["text_token"] is None and terms["text_code"] is None


def group_entropy(rows):
    """H of the mean over the rows (N, k) of the product distributions sigmoid(rows) over all 2^k
    codes, float64; above 12 bits the code distribution is the outer product of the two halves'."""
    if rows.shape[1] <= 12:
        q = oracle.code_distribution(rows).mean(0)
    else:
        h = rows.shape[1] // 2
        q = torch.einsum("na,nb->ab", oracle.code_distribution(rows[:, :h]),
                         oracle.code_distribution(rows[:, h:])) / rows.shape[0]
    return -torch.special.xlogy(q, q).sum()


def entropy_formula(z, tau, gamma, sizes):
    """E_n H(P_n) - gamma * sum over consecutive bit groups of the given sizes of H(q_group)."""
    logits = 4 * tau * z.double().movedim(1, -1).reshape(-1, z.shape[1])         # (N, K)
    p = torch.sigmoid(logits)
    sample = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)).sum(1).mean()
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return sample - gamma * sum(group_entropy(logits[:, s:s + n]) for s, n in zip(starts, sizes))


@pytest.mark.parametrize("K, method, sizes, other_sizes", [
    (24, "auto", [24], [16, 8]),             # "auto": exact up to K = 24 ...
    (25, "auto", [16, 9], [17, 8]),          # ... then groups of 16 bits (the last one shorter)
    (20, "groups", [16, 4], [20]),           # an explicit method is kept, with groups of 16
    (20, "bits", [1] * 20, [16, 4]),         # the per-bit bound (no group size passed on)
], ids=["K24-auto", "K25-auto", "K20-groups", "K20-bits"])
def test_entropy_method_and_group_size(K, method, sizes, other_sizes):
    g = torch.Generator().manual_seed(K)
    z = torch.randn(1, K, 1, 1, 3, generator=g, dtype=torch.float64)            # 3 tokens (T = 1)
    out = LaPQOutput(None, [torch.where(z > 0, 1.0, -1.0)], None, [z], None, None, None)
    cfg = LossConfig(commitment=0.0, hierarchy=0.0, entropy_method=method, inv_temperature=0.5, entropy_gamma=0.7)
    want = entropy_formula(z, 0.5, 0.7, sizes)
    torch.testing.assert_close(codebook_terms(out, cfg)["entropy"].double(), want, rtol=1e-6, atol=1e-6)
    assert (entropy_formula(z, 0.5, 0.7, other_sizes) - want).abs() > 1e-2      # the test can tell them apart


def test_text_code_usage_counts_a_bit_where_the_code_is_positive():
    # u = per-clip frequency of code > 0, the quantizer's rule (bit k = 1 iff x_k > 0): a code
    # value of exactly 0 counts as bit 0
    g = torch.Generator().manual_seed(3)
    codes = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)[torch.randint(0, 3, (2, 4, 1, 2, 3), generator=g)]
    t = torch.randn(2, 4, 1, 1, 1, generator=g, dtype=torch.float64)
    out = LaPQOutput(None, [codes], None, [codes * 0.5], [t], None, None)
    cfg = LossConfig(commitment=0.0, entropy=0.0, hierarchy=0.0, text_token=0.0)
    u = (codes == 1).double().mean(dim=(2, 3, 4))                                  # (B, K)
    r = torch.sigmoid(t.flatten(1))
    want = (torch.special.xlogy(u, u / r) + torch.special.xlogy(1 - u, (1 - u) / (1 - r))).sum(1).mean()
    torch.testing.assert_close(codebook_terms(out, cfg)["text_code"].double(), want, rtol=1e-6, atol=1e-7)
    assert (codes == 0).any()


def test_bernoulli_kl_from_probability_sums_the_last_axis():
    u = torch.tensor([[[0.0, 1.0, 0.25, 0.5], [1.0, 1.0, 0.0, 0.75], [0.5, 0.0, 0.0, 1.0]],
                      [[0.25, 0.25, 1.0, 0.0], [0.0, 0.5, 0.5, 1.0], [1.0, 0.75, 0.0, 0.0]]], dtype=torch.float64)
    r_logits = torch.linspace(-2, 2, 24, dtype=torch.float64).reshape(2, 3, 4)
    r = torch.sigmoid(r_logits)
    want = torch.zeros(2, 3, dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            for k in range(4):                 # KL(Bern(u) || Bern(r)) with 0 log 0 = 0
                a, b = float(u[i, j, k]), float(r[i, j, k])
                want[i, j] += (a * math.log(a / b) if a else 0.0) + ((1 - a) * math.log((1 - a) / (1 - b)) if a < 1 else 0.0)
    torch.testing.assert_close(bernoulli_kl_from_probability(u, r_logits), want, rtol=1e-10, atol=1e-12)


@pytest.fixture
def single_rank_group():
    """A one-process gloo group: the all-reduces run and leave every value as it is."""
    assert not dist.is_initialized(), "another test left a default process group initialised"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_process_group_reaches_the_entropy_and_the_text_code_mean(single_rank_group, monkeypatch):
    # the entropy statistics are taken over the group: codebook_terms hands it to the entropy loss
    seen, real = [], ops.lfq_entropy_loss

    def spy(*args, **kwargs):
        seen.append(args[4] if len(args) > 4 else kwargs.get("process_group"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "lfq_entropy_loss", spy)
    out = hand_output()
    has_text = torch.tensor([False, True])             # one captioned clip: text_code's count is 1
    terms = codebook_terms(out, LossConfig(), single_rank_group, has_text)
    assert len(seen) == 2 and all(pg is single_rank_group for pg in seen)
    # text_code with a group: the all-reduced sum over the all-reduced count of clips (here 1)
    want = 0
    for c, t in zip(out.codes, out.text_logits):
        u = (c[1].detach() > 0).double().mean(dim=(1, 2, 3))
        r = torch.sigmoid(t[1].detach().flatten())
        want = want + (torch.special.xlogy(u, u / r) + torch.special.xlogy(1 - u, (1 - u) / (1 - r))).sum()
    torch.testing.assert_close(terms["text_code"].double(), want, rtol=1e-6, atol=1e-7)


def test_codebook_total_of_no_terms_is_none():
    assert codebook_total({k: None for k in ("commitment", "entropy", "hierarchy")}, LossConfig()) is None


def test_loss_breakdown_scalars():
    losses = LossBreakdown(torch.tensor(3.5, requires_grad=True), {"l1": torch.tensor(1.25), "ssim": torch.tensor(0.5)})
    assert losses.scalars() == {"total": 3.5, "l1": 1.25, "ssim": 0.5}


def test_loss_config_validation():
    assert LossConfig(drift_every=1).drift_every == 1                      # 1 = every step
    assert LossConfig(drift_every=2).drift_every == 2
    with pytest.raises(ValueError, match=r"^drift_every=0: expected an int >= 1 \(1 = every step\)$"):
        LossConfig(drift_every=0)
    with pytest.raises(ValueError, match=r"^drift_every=2\.0: expected an int >= 1"):
        LossConfig(drift_every=2.0)
    for name in ("recon", "entropy", "text_code"):
        with pytest.raises(ValueError, match=rf"^loss weight {name}=-0\.5: weights are >= 0 \(0 switches a term off\)$"):
            LossConfig(**{name: -0.5})
    assert LossConfig(entropy=0.0).entropy == 0.0                         # 0 switches a term off


def test_residual_term_fits_each_lift_to_the_residual_it_quantizes():
    # a real LaPQ: level l's lift is phi_l(up(c_l)), and the term is sum_l mean((phi_l(up(sg(c_l)))
    # - sg(r_l))^2): it trains the lifts phi_l only, neither the bits nor the latent
    from pyratok.models.lapq import LaPQ, LaPQConfig

    torch.manual_seed(0)
    lapq = LaPQ(LaPQConfig(latent_dim=4, num_bits=K, levels=3, hidden=8, text_conditioning=False)).double()
    z = torch.randn(2, 4, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    out = lapq(z)
    cfg = LossConfig(residual=1.0, commitment=0.0, entropy=0.0, hierarchy=0.0)
    terms = codebook_terms(out, cfg, lapq=lapq)
    assert set(k for k, v in terms.items() if v is not None) == {"residual"}
    # lift_l = r_l - r_(l+1) with r_L = z - q_L, so the value is sum_l mean(r_(l+1)^2)
    following = [*out.residuals[1:], z - out.quantized]
    want = sum((r.detach() ** 2).mean() for r in following)
    torch.testing.assert_close(terms["residual"].double(), want, rtol=1e-6, atol=1e-9)
    # gradient: phi_l's is the least-squares fit's, 2 (lift - r) up(c) ... (autograd on a copy
    # with the codes as constants); the level's bits and the latent get none
    phi = [b.phi.weight for b in lapq.blocks]
    got = torch.autograd.grad(terms["residual"], phi, retain_graph=True)
    lifts = [b.lift(c.detach().clone(), tuple(z.shape[2:])) for b, c in zip(lapq.blocks, out.codes)]
    fit = sum(F.mse_loss(lift, r.detach()) for lift, r in zip(lifts, out.residuals))
    for a, b in zip(got, torch.autograd.grad(fit, phi)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    others = [z, *(b.to_bits.weight for b in lapq.blocks), *(b.in_proj.weight for b in lapq.blocks)]
    assert all(g is None for g in torch.autograd.grad(terms["residual"], others, allow_unused=True))
    with pytest.raises(ValueError, match=r"^LossConfig\.residual > 0 needs the LaPQ \(codebook_terms\(\.\.\., "
                                         r"lapq=model\.lapq\)\)$"):
        codebook_terms(out, cfg)
    # off by default (the paper's Eq. 2 has no such term): absent, and it adds nothing to the total
    assert LossConfig().residual == 0.0 and codebook_terms(out, LossConfig())["residual"] is None
    base = LossConfig(residual=0.5)
    doubled = dataclasses.replace(base, residual=1.0)
    diff = (codebook_total(codebook_terms(out, doubled, lapq=lapq), doubled)
            - codebook_total(codebook_terms(out, base, lapq=lapq), base))
    torch.testing.assert_close(diff.double(), 0.5 * terms["residual"].double(), rtol=1e-6, atol=1e-9)
