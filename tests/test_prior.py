"""The global AR prior: teacher-forced BCE, gradient to the codes, learning, sampling."""

import os

import pytest
import torch

from pyratok.models.prior import ARPrior, HFCausalLMPrior, PriorConfig
from pyratok.models.text import NullText, TextEmbedding

GRIDS = [(2, 1, 1), (2, 2, 2), (2, 4, 4)]


def random_codes(B, K, grids, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.where(torch.rand(B, K, *gr, generator=g) > 0.5, 1.0, -1.0).requires_grad_(requires_grad)
            for gr in grids]


def text(B, L=3, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, -1] = False
    return TextEmbedding(torch.randn(B, L, D, generator=g), mask)


def small_prior(K=6):
    torch.manual_seed(0)
    return ARPrior(PriorConfig(num_bits=K, text_dim=12, width=32, depth=2, heads=2))


def test_loss_shapes_and_gradient_reaches_codes():
    prior = small_prior()
    codes = random_codes(2, 6, GRIDS, requires_grad=True)
    out = prior(text(2), codes)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.loss > 0
    assert [l.shape for l in out.logits] == [(2, g[0] * g[1] * g[2], 6) for g in GRIDS]
    out.loss.backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in codes[:-1])
    # the last token of the last level predicts nothing: its code gets no gradient
    assert codes[-1].grad[:, :, -1, -1, -1].abs().sum() == 0


def test_causality_later_tokens_do_not_change_earlier_predictions():
    prior = small_prior()
    codes = random_codes(2, 6, GRIDS)
    base = prior(text(2), codes)
    changed = [c.clone() for c in codes]
    changed[2][:, :, 1] *= -1                                    # flip the second frame of level 3
    other = prior(text(2), changed)
    for l in range(2):
        torch.testing.assert_close(other.logits[l], base.logits[l])
    n_first = GRIDS[2][1] * GRIDS[2][2]
    torch.testing.assert_close(other.logits[2][:, : n_first + 1], base.logits[2][:, : n_first + 1])


def test_text_padding_is_ignored_and_text_matters():
    prior = small_prior().eval()
    codes = random_codes(2, 6, GRIDS)
    t = text(2)
    out = prior(t, codes)
    garbage = TextEmbedding(t.tokens.clone(), t.mask)
    garbage.tokens[0, -1] = 1e3                                  # a padded slot
    torch.testing.assert_close(prior(garbage, codes).logits[0], out.logits[0])
    other = TextEmbedding(t.tokens + 1.0, t.mask)
    assert not torch.allclose(prior(other, codes).logits[0], out.logits[0])


def test_bce_falls_on_a_fixed_batch():
    prior = small_prior()
    codes, t = random_codes(2, 6, GRIDS, seed=1), text(2)
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = prior(t, codes).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_greedy_sample_is_consistent_with_teacher_forcing():
    """The KV-cached generator and the full-sequence forward agree: each sampled bit is the
    sign of the teacher-forced logit for the sampled prefix."""
    prior = small_prior().eval()
    t = text(2)
    levels = prior.sample(t, GRIDS)
    assert [tuple(l.shape) for l in levels] == [(2, 6) + g for g in GRIDS]
    out = prior(t, levels)
    for logit, target in zip(out.logits, out.targets):
        assert torch.equal((logit > 0).float(), target)


def test_temperature_sampling_and_bad_input():
    prior = small_prior().eval()
    g = torch.Generator().manual_seed(0)
    a = prior.sample(text(2), GRIDS[:2], temperature=1.0, generator=g)
    assert all(torch.all(l.abs() == 1) for l in a)
    with pytest.raises(ValueError, match="temperature"):
        prior.sample(text(2), GRIDS, temperature=-1)
    with pytest.raises(ValueError, match=r"codes\[1\]: batch 3 does not match the text batch 2"):
        prior(text(2), [random_codes(2, 6, GRIDS[:1])[0], random_codes(3, 6, GRIDS[1:2])[0]])
    with pytest.raises(ValueError, match=r"codes\[0\]: expected \(B, 6, t, h, w\)"):
        prior(text(2), [torch.ones(2, 5, 1, 1, 1)])


def test_works_with_null_text():
    prior = small_prior()
    null = NullText(12)
    out = prior(null(2), random_codes(2, 6, GRIDS))
    out.loss.backward()
    assert null.embedding.grad is not None


def test_hf_causal_lm_as_prior(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=16, n_embd=32, n_layer=2, n_head=2, n_positions=256)
    torch.manual_seed(0)
    transformers.GPT2Model(config).save_pretrained(tmp_path)
    prior = HFCausalLMPrior(str(tmp_path), num_bits=6, text_dim=12).eval()
    t = text(2)
    out = prior(t, random_codes(2, 6, GRIDS))
    assert torch.isfinite(out.loss)
    levels = prior.sample(t, GRIDS[:2])
    check = prior(t, levels)
    for logit, target in zip(check.logits, check.targets):
        assert torch.equal((logit > 0).float(), target)
