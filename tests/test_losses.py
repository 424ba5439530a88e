"""The codebook and reconstruction loss terms on tiny hand-built inputs: each term's value against
its formula (written here, float64), the stop-gradients (zero gradient where a stop-gradient must
block it, nonzero where the term must train), and the weighted total as the sum of the weighted
terms.  (The alignment terms' values and the model-level total are also in test_tokenizer.py.)"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pyratok.models.lapq import LaPQOutput
from pyratok.models.losses import LossConfig, codebook_terms, codebook_total
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


def test_commitment_and_entropy_are_their_formulas():
    out = hand_output()
    cfg = LossConfig(inv_temperature=0.5, entropy_gamma=0.7)
    terms = codebook_terms(out, cfg)
    want_commit, want_entropy = 0, 0
    for z in out.logits:
        c = torch.where(z > 0, 1.0, -1.0)
        want_commit = want_commit + ((z - c) ** 2).mean()
        sample, codebook, _ = oracle.entropy_terms(z, 0.5)                      # p = sigmoid(4 tau z)
        want_entropy = want_entropy + sample - 0.7 * codebook
    torch.testing.assert_close(terms["commitment"].double(), want_commit, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(terms["entropy"].double(), want_entropy, rtol=1e-5, atol=1e-6)
    # the hierarchy term is KL(sg(up(p_coarse)) || p_fine): the coarse level as the target, first
    p = torch.sigmoid(4 * 0.5 * out.logits[1])
    r = torch.sigmoid(4 * 0.5 * out.logits[0]).repeat_interleave(2, 3).repeat_interleave(2, 4)
    torch.testing.assert_close(terms["hierarchy"].double(), bernoulli_kl(r, p), rtol=1e-5, atol=1e-6)
    assert (bernoulli_kl(p, r) - bernoulli_kl(r, p)).abs() > 1e-2          # the direction is visible here
    # the weighted codebook total is the sum of the weighted terms
    weights = dataclasses.replace(cfg, commitment=0.3, entropy=0.2, hierarchy=0.4, text_token=0.6, text_code=0.8)
    want_total = sum(getattr(weights, k) * v for k, v in terms.items())
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
