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


# -- pinned details (issue #20: mutation testing) ---------------------------------------------------

def _expected_sincos(pos, dim):
    half = dim // 2
    freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = pos.double()[:, None] * freq[None] * 64.0
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def test_positional_features_follow_the_formula():
    """sin/cos features of 64 * pos at frequencies 10000^(-i/half); a cell's features are those of
    (t / 64, (y + .5) / h, (x + .5) / w), (dim // 6) * 2 each, raster order, zero-padded to dim."""
    from pyratok.models.prior import _sincos, grid_positions

    pos = torch.tensor([0.0, 0.5, 3.0, 10.0])
    torch.testing.assert_close(_sincos(pos, 8).double(), _expected_sincos(pos, 8), atol=1e-4, rtol=0)
    t, h, w = 2, 2, 3
    cells = torch.tensor([[ti / 64.0, (yi + 0.5) / h, (xi + 0.5) / w]
                          for ti in range(t) for yi in range(h) for xi in range(w)], dtype=torch.float64)
    want = torch.cat([_expected_sincos(cells[:, i], 6) for i in range(3)] + [torch.zeros(len(cells), 2)], -1)
    torch.testing.assert_close(grid_positions((t, h, w), 20, "cpu").double(), want, atol=1e-4, rtol=0)


def test_sequence_inputs_are_projection_plus_position():
    """The text prefix is text_proj(tokens) + the features of position i / 64 then SOI (valid);
    a level's tokens are code_proj(code) + that level's embedding + the cell features."""
    from pyratok.models.prior import _sincos, grid_positions

    prior = small_prior()
    t = text(2)
    with torch.no_grad():
        prefix, valid = prior._text_prefix(t)
        pos = _sincos(torch.arange(3) / 64.0, 32)
        torch.testing.assert_close(prefix[:, :3], prior.text_proj(t.tokens) + pos)
        torch.testing.assert_close(prefix[:, 3], prior.soi.expand(2, -1))
        assert torch.equal(valid, torch.cat([t.mask, torch.ones(2, 1, dtype=torch.bool)], 1))
        codes = random_codes(2, 6, [(2, 2, 3)])[0]
        for level in (0, 2):
            want = (prior.code_proj(codes.permute(0, 2, 3, 4, 1).reshape(2, 12, 6)) + prior.level_emb.weight[level]
                    + grid_positions((2, 2, 3), 32, "cpu"))
            torch.testing.assert_close(prior._level_inputs(codes, level), want)
        # codes of another dtype are cast to the projection's
        torch.testing.assert_close(prior._level_inputs(codes.double(), 1), prior._level_inputs(codes, 1))


def test_forward_targets_and_loss():
    """Targets are the bits (code > 0) in raster order; the loss is the mean BCE over all levels."""
    prior = small_prior()
    codes = random_codes(2, 6, GRIDS, seed=3)
    out = prior(text(2), codes)
    for c, target in zip(codes, out.targets):
        assert torch.equal(target, (c.flatten(2).transpose(1, 2) > 0).float())
    want = torch.nn.functional.binary_cross_entropy_with_logits(torch.cat(out.logits, 1), torch.cat(out.targets, 1))
    torch.testing.assert_close(out.loss, want)


def test_level_and_grid_limits():
    prior = ARPrior(PriorConfig(num_bits=6, text_dim=12, width=32, depth=1, heads=2, max_levels=2))
    assert prior.config == PriorConfig(num_bits=6, text_dim=12, width=32, depth=1, heads=2, max_levels=2)
    with pytest.raises(ValueError, match=r"^codes: expected one \(B, K, t, h, w\) tensor per level, got none$"):
        prior(text(2), [])
    with pytest.raises(ValueError, match="^codes: 3 levels, the prior was built for at most 2$"):
        prior(text(2), random_codes(2, 6, GRIDS))
    with pytest.raises(ValueError, match=r"^codes\[0\]: expected \(B, 6, t, h, w\), got \(2, 6, 1, 1\)$"):
        prior(text(2), [torch.ones(2, 6, 1, 1)])
    for grids in ([], GRIDS):
        with pytest.raises(ValueError, match=rf"^grids: expected 1..2 level grids, got {len(grids)}$"):
            prior.sample(text(2), grids)
    assert [tuple(l.shape) for l in prior.sample(text(2), GRIDS[:2])] == [(2, 6) + g for g in GRIDS[:2]]
    assert [l.shape[1] for l in prior(text(2), random_codes(2, 6, GRIDS[:2])).logits] == [2, 8]    # max_levels itself
    with pytest.raises(ValueError, match="^width=30 must be a multiple of heads=4$"):
        ARPrior(PriorConfig(width=30, heads=4))


def test_temperature_scales_the_logits_and_the_generator_is_used():
    """A tiny temperature gives the greedy sample; a huge one makes each bit a fair coin; the same
    generator seed gives the same sample."""
    prior = small_prior().eval()
    t = text(2)
    greedy = prior.sample(t, GRIDS[:2])
    cold = prior.sample(t, GRIDS[:2], temperature=1e-6, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(cold, greedy))
    grid = [(1, 4, 8)]
    hot = prior.sample(t, grid, temperature=1e6, generator=torch.Generator().manual_seed(2))[0]
    agree = (hot == prior.sample(t, grid)[0]).float().mean().item()
    assert 0.35 < agree < 0.65, agree                            # 384 fair bits vs greedy: sd 0.026
    runs = [prior.sample(t, GRIDS[:2], temperature=1.0, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_start_and_separator_embeddings_start_small():
    torch.manual_seed(0)
    prior = ARPrior(PriorConfig(num_bits=6, text_dim=12, width=256, depth=1, heads=2))
    for p in (prior.soi, prior.sep):                             # randn * 0.02: std 0.02 (+-0.001 for 256)
        assert p.shape == (256,) and 0.015 < p.std().item() < 0.025


def test_dropout_only_in_training():
    torch.manual_seed(0)
    prior = ARPrior(PriorConfig(num_bits=6, text_dim=12, width=32, depth=2, heads=2, dropout=0.5))
    codes, t = random_codes(2, 6, GRIDS[:2]), text(2)
    prior.eval()
    torch.testing.assert_close(prior(t, codes).loss, prior(t, codes).loss, atol=0, rtol=0)
    prior.train()
    assert prior(t, codes).loss != prior(t, codes).loss


def test_hf_prior_padding_freezing_and_bad_path(tmp_path):
    transformers = pytest.importorskip("transformers")
    # an LM whose config turns its cache off: the prior asks for the cache itself (sampling needs it)
    config = transformers.GPT2Config(vocab_size=16, n_embd=32, n_layer=1, n_head=2, n_positions=256, use_cache=False)
    torch.manual_seed(0)
    transformers.GPT2Model(config).save_pretrained(tmp_path)
    prior = HFCausalLMPrior(str(tmp_path), num_bits=6, text_dim=12).eval()
    levels = prior.sample(text(2), GRIDS[:2])
    check = prior(text(2), levels)
    for logit, target in zip(check.logits, check.targets):
        assert torch.equal((logit > 0).float(), target)
    assert all(p.requires_grad for p in prior.lm.parameters())
    assert prior.width == 32 and prior.head.out_features == 6 and prior.max_levels == 8
    codes, t = random_codes(2, 6, GRIDS[:2]), text(2)
    out = prior(t, codes)
    garbage = TextEmbedding(t.tokens.clone(), t.mask)
    garbage.tokens[0, -1] = 1e3                                  # a padded slot: masked out of attention
    torch.testing.assert_close(prior(garbage, codes).logits[0], out.logits[0])
    frozen = HFCausalLMPrior(str(tmp_path), num_bits=6, text_dim=12, max_levels=3, freeze_lm=True)
    assert not any(p.requires_grad for p in frozen.lm.parameters()) and frozen.max_levels == 3
    assert all(p.requires_grad for p in frozen.head.parameters())
    with pytest.raises(ValueError, match="is not a loadable Hugging Face causal LM folder"):
        HFCausalLMPrior(str(tmp_path / "missing"), num_bits=6, text_dim=12)


def test_hf_prior_never_reaches_the_network(monkeypatch):
    """The LM folder is loaded with local_files_only=True: a name that is not a local folder fails
    at once (as a ValueError naming the path) instead of trying the Hugging Face Hub."""
    transformers = pytest.importorskip("transformers")
    calls = []

    def fake_from_pretrained(path, **kwargs):
        calls.append((path, kwargs))
        raise OSError("not found")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fake_from_pretrained)
    with pytest.raises(ValueError, match=r"^path: gpt2 is not a loadable Hugging Face causal LM folder \(not found\)$"):
        HFCausalLMPrior("gpt2", num_bits=6, text_dim=12)
    assert calls == [("gpt2", {"local_files_only": True})]


def test_block_mlp_is_nonlinear():
    """Each block's MLP (width -> width * mlp_ratio -> width) has a nonlinearity: it is not affine."""
    prior = ARPrior(PriorConfig(num_bits=6, text_dim=12, width=32, depth=1, heads=2, mlp_ratio=2.0))
    mlp = prior.blocks[0].mlp
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    with torch.no_grad():
        assert mlp(torch.zeros(1, 32)).shape == (1, 32)
        gap = (mlp(a + b) + mlp(torch.zeros(4, 32)) - mlp(a) - mlp(b)).abs().max().item()
    assert gap > 1e-3, gap


def test_block_matches_a_reference_computation():
    """A block is pre-norm causal self-attention over the valid keys (q, k, v split as (3, heads,
    d_head) of one projection) plus a pre-norm MLP, both added to the residual stream."""
    from pyratok.models.prior import _Block

    torch.manual_seed(0)
    block = _Block(16, 2, 2.0, 0.0).eval()
    x = torch.randn(2, 5, 16)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 1] = False
    with torch.no_grad():
        out, _ = block(x, valid)
        q, k, v = block.qkv(block.norm1(x)).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / 8 ** 0.5
        allowed = torch.ones(5, 5, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
        att = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v          # (B, heads, S, d_head)
        h = x + block.proj(att.transpose(1, 2).reshape(2, 5, 16))
        torch.testing.assert_close(out, h + block.mlp(block.norm2(h)))


def test_every_tensor_the_prior_makes_follows_its_device():
    """Positions, frequencies and the causal mask are created on the codes' device: the prior runs
    wherever its weights are (the meta device stands in for a GPU here: mixing it with a CPU tensor
    fails, as a GPU tensor would)."""
    from pyratok.models.prior import grid_positions

    assert grid_positions((2, 3, 4), 48, torch.device("meta")).device.type == "meta"
    prior = small_prior().to("meta")
    t = text(2)
    out = prior(TextEmbedding(t.tokens.to("meta"), t.mask.to("meta")), [c.to("meta") for c in random_codes(2, 6, GRIDS)])
    assert out.loss.device.type == "meta" and all(l.device.type == "meta" for l in out.logits)
    assert [tuple(l.shape) for l in out.logits] == [(2, g[0] * g[1] * g[2], 6) for g in GRIDS]


def test_a_one_bit_codebook_gives_level_sizes_targets_and_loss():
    """K = 1 (one bit per token, the smallest codebook LaPQ allows): the level sizes, targets and
    loss come out as for any K."""
    prior = small_prior(K=1)
    codes = random_codes(2, 1, GRIDS, seed=5)
    out = prior(text(2), codes)
    assert [l.shape for l in out.logits] == [(2, g[0] * g[1] * g[2], 1) for g in GRIDS]
    for c, target in zip(codes, out.targets):
        assert torch.equal(target, (c.flatten(2).transpose(1, 2) > 0).float())
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(
        torch.cat(out.logits, 1), torch.cat(out.targets, 1)))
