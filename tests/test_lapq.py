"""LaPQ: grids and token counts, exact decoding from tokens, text conditioning, gradients."""

import pytest
import torch
import torch.nn.functional as F

from pyratok.models.lapq import LaPQ, LaPQConfig, latent_grid, level_grids, token_count
from pyratok.models.text import NullText, TextEmbedding
from conftest import CPU_BACKENDS


def test_grid_table():
    assert latent_grid(17, 256, 256) == (5, 32, 32)
    grids = level_grids((5, 32, 32), (8, 4, 2, 1))
    assert grids == [(5, 4, 4), (5, 8, 8), (5, 16, 16), (5, 32, 32)]
    assert token_count(grids) == 5 * (16 + 64 + 256 + 1024) == 6800
    assert level_grids(latent_grid(33, 144, 176), LaPQConfig().scales()) == [(9, 3, 3), (9, 5, 6), (9, 9, 11), (9, 18, 22)]
    assert latent_grid(1, 64, 64) == (1, 8, 8)
    with pytest.raises(ValueError, match=r"frames=16: a causal video VAE takes 1 \+ 4k frames \(e.g. 13 or 17\)"):
        latent_grid(16, 256, 256)


def tiny(text=True, feature_dims=(), K=8, levels=3):
    torch.manual_seed(0)
    return LaPQ(LaPQConfig(latent_dim=4, num_bits=K, levels=levels, hidden=16, heads=2, text_dim=12,
                           feature_dims=feature_dims, text_conditioning=text))


def text(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TextEmbedding(torch.randn(B, 3, 12, generator=g), torch.tensor([[True, True, False], [True, True, True]][:B]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decode_from_tokens_is_exact(backend):
    lapq = tiny(feature_dims=(6, 6, 5))
    lapq.backend = backend
    latent = torch.randn(2, 4, 3, 8, 12)
    feats = [torch.randn(2, 6, 9, 16, 24), torch.randn(2, 6, 5, 8, 12), torch.randn(2, 5, 3, 8, 12)]  # 1 + r(t-1) frames
    out = lapq(latent, feats, text())
    assert out.grids == [(3, 2, 3), (3, 4, 6), (3, 8, 12)]
    assert [tuple(i.shape) for i in out.indices] == [(2, 3, 2, 3), (2, 3, 4, 6), (2, 3, 8, 12)]
    rebuilt = lapq.dequantize(lapq.codes_from_tokens(out.indices), (3, 8, 12))
    assert torch.equal(rebuilt, out.quantized)
    # each level's contribution rebuilt by hand from its ids: MSB-first bits -> +-1 codes,
    # nearest upsampling by explicit index, phi as a plain conv3d; the progressive sums add them
    codes_by_hand, total = [], torch.zeros_like(latent)
    for level, (ids, block) in enumerate(zip(out.indices, lapq.blocks)):
        shifts = torch.arange(7, -1, -1).view(1, 8, 1, 1, 1)
        codes = ((ids.long()[:, None] >> shifts) & 1).float() * 2 - 1                 # (B, K, t, h, w)
        codes_by_hand.append(codes)
        t, h, w = codes.shape[2:]
        up = codes[:, :, (torch.arange(3) * t) // 3][:, :, :, (torch.arange(8) * h) // 8][..., (torch.arange(12) * w) // 12]
        lifted = F.conv3d(up, block.phi.weight, block.phi.bias, padding=(0, 1, 1))
        total = total + lifted
        torch.testing.assert_close(lapq.dequantize(out.codes, (3, 8, 12), levels=level + 1), total,
                                   atol=1e-5, rtol=1e-5, msg=f"level {level}")
    assert all(torch.equal(a, b) for a, b in zip(codes_by_hand, out.codes))
    # the residual each level quantized is the latent minus the levels before it
    torch.testing.assert_close(out.residuals[2], latent - lapq.dequantize(out.codes, (3, 8, 12), levels=2),
                               atol=1e-5, rtol=1e-5)


def test_text_changes_tokens_only_when_conditioning_is_on():
    latent = torch.randn(2, 4, 2, 8, 8)
    on = tiny(text=True)
    with torch.no_grad():
        on.blocks[0].text_proj.weight.mul_(20)
    a, b = on(latent, text=text(seed=0)), on(latent, text=text(seed=1))
    assert any(not torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    off = tiny(text=False)
    assert off(latent).text_logits is None
    c, d = off(latent, text=text(seed=0)), off(latent, text=text(seed=1))
    assert all(torch.equal(x, y) for x, y in zip(c.indices, d.indices))


def test_gradients_reach_every_block_through_the_straight_through_codes():
    lapq = tiny()
    latent = torch.randn(2, 4, 2, 8, 8, requires_grad=True)
    out = lapq(latent, text=NullText(12)(2))
    (out.quantized - latent).pow(2).mean().backward()
    for l, block in enumerate(lapq.blocks):
        assert block.to_bits.weight.grad.abs().sum() > 0, l
        assert block.phi.weight.grad.abs().sum() > 0, l


def test_bad_input():
    lapq = tiny(feature_dims=(6, 6, 5))
    with pytest.raises(ValueError, match=r"latent: expected \(B, 4, T, H, W\)"):
        lapq(torch.randn(2, 5, 3, 8, 8), None, text())
    with pytest.raises(ValueError, match="features: expected 3 encoder taps, got 0"):
        lapq(torch.randn(2, 4, 3, 8, 8), None, text())
    no_feat = tiny()
    with pytest.raises(ValueError, match="text: this LaPQ is text-conditioned"):
        no_feat(torch.randn(2, 4, 3, 8, 8))
    with pytest.raises(ValueError, match="text: batch 1 does not match the video batch 2"):
        no_feat(torch.randn(2, 4, 3, 8, 8), text=text(B=1))
    with pytest.raises(ValueError, match=r"codes\[1\]: expected \(B, 8, 3, 4, 4\)"):
        no_feat.dequantize([torch.ones(1, 8, 3, 2, 2), torch.ones(1, 8, 3, 2, 2), torch.ones(1, 8, 3, 8, 8)], (3, 8, 8))
    with pytest.raises(ValueError, match="indices: 2 levels, this LaPQ has 3"):
        no_feat.codes_from_tokens([torch.zeros(1, 1, 1, 1, dtype=torch.int32)] * 2)
