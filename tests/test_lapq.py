"""LaPQ: grids and token counts, exact decoding from tokens, text conditioning, gradients."""

import pytest
import torch
import torch.nn.functional as F

from pyratok import BackendUnavailable
from pyratok.models.lapq import LaPQ, LaPQConfig, causal_pool, latent_grid, level_grids, pooled_text, token_count
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


def test_latent_grid_is_integers_and_names_what_is_wrong():
    grid = latent_grid(9, 48, 40, temporal=4, spatial=8)
    assert grid == (3, 6, 5) and all(type(n) is int for n in grid)      # ints: token ids and shapes use them
    assert latent_grid(13, 36, 20, temporal=2, spatial=4) == (7, 9, 5)
    # the suggestion is the valid counts either side, never below 1
    with pytest.raises(ValueError, match=r"frames=2: .* \(e.g. 1 or 5\)"):
        latent_grid(2, 64, 64)
    with pytest.raises(ValueError, match=r"frames=-3: .* \(e.g. 1 or 1\)"):
        latent_grid(-3, 64, 64)
    for h, w in ((60, 64), (64, 60), (60, 60)):
        with pytest.raises(ValueError, match=rf"height x width = {h} x {w}: expected multiples of 8"):
            latent_grid(5, h, w)


def tiny(text=True, feature_dims=(), K=8, levels=3, backend=None, substeps=1):
    torch.manual_seed(0)
    return LaPQ(LaPQConfig(latent_dim=4, num_bits=K, levels=levels, hidden=16, heads=2, text_dim=12,
                           feature_dims=feature_dims, text_conditioning=text, substeps=substeps), backend=backend)


def text(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TextEmbedding(torch.randn(B, 3, 12, generator=g), torch.tensor([[True, True, False], [True, True, True]][:B]))


@pytest.mark.parametrize("substeps", [1, 2])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decode_from_tokens_is_exact(backend, substeps):
    lapq = tiny(feature_dims=(6, 6, 5), substeps=substeps)
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


def test_causal_pool_names_the_frame_counts_it_can_group():
    x = torch.zeros(1, 2, 8, 1, 1)
    with pytest.raises(ValueError, match=r"features: 8 frames cannot be grouped causally into 3 latent frames "
                                         r"\(expected 1 \+ r \* 2 frames\)"):
        causal_pool(x, (3, 1, 1))
    with pytest.raises(ValueError, match=r"features: 7 frames cannot be grouped causally into 2 latent frames "
                                         r"\(expected r \* 2 frames\)"):
        causal_pool(x[:, :, :7], (2, 1, 1), first=False)


def test_pooled_text_is_the_mean_of_the_valid_tokens_in_their_dtype():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    torch.testing.assert_close(pooled_text(TextEmbedding(tokens, mask)), torch.tensor([[2.0, 3.0], [7.0, 8.0]]))
    half = pooled_text(TextEmbedding(tokens.half(), mask))
    assert half.dtype == torch.float16                       # a half-precision text encoder stays in half
    torch.testing.assert_close(half.float(), torch.tensor([[2.0, 3.0], [7.0, 8.0]]))
    one = TextEmbedding(tokens, torch.tensor([[False, True, False], [True, False, False]]))
    torch.testing.assert_close(pooled_text(one), torch.tensor([[3.0, 4.0], [5.0, 6.0]]))   # one valid token: itself
    # a caption with no valid token pools to zeros, not NaN
    empty = pooled_text(TextEmbedding(tokens, torch.zeros(2, 3, dtype=torch.bool)))
    assert torch.equal(empty, torch.zeros(2, 2))


def test_codes_from_tokens_follow_the_quantizer_backend_and_the_dtype_asked():
    lapq = tiny(text=False)
    out = lapq(torch.randn(1, 4, 2, 8, 8))
    codes = lapq.codes_from_tokens(out.indices, dtype=torch.float64)
    assert all(c.dtype == torch.float64 for c in codes)
    assert all(torch.equal(c.float(), o) for c, o in zip(codes, out.codes))
    lapq.backend = "no-such-backend"                          # the quantizer's backend is the one used
    with pytest.raises(BackendUnavailable, match="unknown backend 'no-such-backend'"):
        lapq.codes_from_tokens(out.indices)
    with pytest.raises(BackendUnavailable, match="unknown backend 'no-such-backend'"):
        lapq(torch.randn(1, 4, 2, 8, 8))                      # the quantization too


def test_dequantize_names_the_missing_levels_and_the_expected_grid():
    lapq = tiny(text=False)
    ok = [torch.ones(1, 8, 3, 2, 3), torch.ones(1, 8, 3, 4, 6), torch.ones(1, 8, 3, 8, 12)]
    assert lapq.dequantize(ok, (3, 8, 12)).shape == (1, 4, 3, 8, 12)
    with pytest.raises(ValueError, match="codes: 2 levels given, 3 needed"):
        lapq.dequantize(ok[:2], (3, 8, 12))
    with pytest.raises(ValueError, match=r"codes\[1\]: expected \(B, 8, 3, 4, 6\) for latent grid \(3, 8, 12\), "
                                         r"got \(1, 8, 3, 6, 4\)"):
        lapq.dequantize([ok[0], torch.ones(1, 8, 3, 6, 4), ok[2]], (3, 8, 12))


def test_block_logits_follow_the_formula_with_lateral_taps():
    """z_l = to_bits(h + conv(h)), h = in_proj(area_down(r_(l-1))) + lateral(causal_pool(F_l)),
    composed by hand from the block's layers (text off)."""
    lapq = tiny(text=False, feature_dims=(6, 6, 5))
    latent = torch.randn(2, 4, 3, 8, 12)
    feats = [torch.randn(2, 6, 9, 16, 24), torch.randn(2, 6, 5, 8, 12), torch.randn(2, 5, 3, 8, 12)]
    with torch.no_grad():
        out = lapq(latent, feats)
        for l, (block, grid) in enumerate(zip(lapq.blocks, out.grids)):
            h = block.in_proj(F.adaptive_avg_pool3d(out.residuals[l], grid)) + block.lateral(causal_pool(feats[l], grid))
            h = h + block.conv(h)
            torch.testing.assert_close(out.logits[l], block.to_bits(h), msg=f"level {l}")


def test_substeps_pick_each_group_of_bits_from_the_residual_the_groups_before_left():
    """substeps = S: a level's K bits in S groups; group 0 as without substeps, group s from
    h + in_proj_s(area_down(r - lift of groups < s)), through its own conv and to_bits; the
    level's contribution is still phi(upsample(all K codes)), so tokens decode as before."""
    lapq = tiny(text=False, feature_dims=(6, 6, 5), substeps=2)
    assert [b.to_bits.out_channels for b in lapq.blocks] == [4] * 3
    assert all(len(b.substeps) == 1 and b.substeps[0].to_bits.out_channels == 4 for b in lapq.blocks)
    latent = torch.randn(2, 4, 3, 8, 12)
    feats = [torch.randn(2, 6, 9, 16, 24), torch.randn(2, 6, 5, 8, 12), torch.randn(2, 5, 3, 8, 12)]
    with torch.no_grad():
        out = lapq(latent, feats)
        for l, (block, grid) in enumerate(zip(lapq.blocks, out.grids)):
            r = out.residuals[l]
            h = block.in_proj(F.adaptive_avg_pool3d(r, grid)) + block.lateral(causal_pool(feats[l], grid))
            first = block.to_bits(h + block.conv(h))
            c0 = torch.where(first > 0, 1.0, -1.0)
            up = F.interpolate(c0, size=(3, 8, 12), mode="nearest")
            r1 = r - F.conv3d(up, block.phi.weight[:, :4], block.phi.bias, padding=(0, 1, 1))
            step = block.substeps[0]
            h1 = h + step.in_proj(F.adaptive_avg_pool3d(r1, grid))
            second = step.to_bits(h1 + step.conv(h1))
            torch.testing.assert_close(out.logits[l], torch.cat([first, second], 1), msg=f"level {l}")
            assert torch.equal(out.codes[l], torch.where(out.logits[l] > 0, 1.0, -1.0))
        # group 1 follows group 0's codes: flipping them (through phi's group-0 slice) moves its logits
        lapq.blocks[2].phi.weight[:, :4].mul_(-3)
        moved = lapq(latent, feats)
        assert not torch.allclose(moved.logits[2][:, 4:], out.logits[2][:, 4:])
        torch.testing.assert_close(moved.logits[2][:, :4], out.logits[2][:, :4])
    # every substep's layers train
    lapq = tiny(text=False, substeps=2)
    x = torch.randn(2, 4, 2, 8, 8)
    (lapq(x).quantized - x).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lapq.named_parameters() if "substeps" in n)


def test_substeps_config_errors():
    for bad in (0, 3, 2.0):
        with pytest.raises(ValueError, match=rf"^substeps={bad!r}: expected an int >= 1 that divides num_bits=8$"):
            tiny(text=False, substeps=bad)
    with pytest.raises(ValueError, match=r"^substeps > 1 needs spherical=False"):
        LaPQ(LaPQConfig(num_bits=8, substeps=2, spherical=True))
    assert tiny(text=False, substeps=8).config.substeps == 8


def test_padded_caption_tokens_do_not_change_the_codes():
    """The cross-attention masks the caption's padding: what a padded position holds changes
    neither the bit logits nor the tokens."""
    lapq = tiny(text=True)
    with torch.no_grad():
        for block in lapq.blocks:
            block.text_proj.weight.mul_(20)
    latent = torch.randn(2, 4, 2, 8, 8)
    a = text(seed=0)
    b = TextEmbedding(a.tokens.clone(), a.mask)
    b.tokens[0, 2] = 50.0                                     # clip 0's third token is padding
    with torch.no_grad():
        x, y = lapq(latent, text=a), lapq(latent, text=b)
    for l in range(3):
        torch.testing.assert_close(x.logits[l], y.logits[l], rtol=1e-5, atol=1e-5)
        assert torch.equal(x.indices[l], y.indices[l])
    c = TextEmbedding(a.tokens.clone(), a.mask)
    c.tokens[0, 1] = 50.0                                     # a valid token does change them
    with torch.no_grad():
        z = lapq(latent, text=c)
    assert not torch.allclose(x.logits[0][0], z.logits[0][0])


def test_text_conditioned_block_follows_the_formula():
    """h = in_proj(area_down(r)); h += cross_attention(norm(h), text_proj(e_t)) over the caption's
    valid tokens; h += conv(h); z = to_bits(h); text logits = text_head(mean of the valid e_t)."""
    lapq = tiny(text=True)
    with torch.no_grad():
        for block in lapq.blocks:
            block.text_proj.weight.mul_(20)
    latent, t = torch.randn(2, 4, 2, 8, 12), text()
    with torch.no_grad():
        out = lapq(latent, text=t)
        for l, (block, grid) in enumerate(zip(lapq.blocks, out.grids)):
            h = block.in_proj(F.adaptive_avg_pool3d(out.residuals[l], grid))
            seq = h.flatten(2).transpose(1, 2)                                   # (B, t*h*w, d)
            keys = block.text_proj(t.tokens)
            ctx = block.attn(block.norm(seq), keys, keys, key_padding_mask=~t.mask, need_weights=False)[0]
            h = h + ctx.transpose(1, 2).reshape(h.shape)
            h = h + block.conv(h)
            torch.testing.assert_close(out.logits[l], block.to_bits(h), rtol=1e-5, atol=1e-5, msg=f"level {l}")
            mean = (t.tokens * t.mask[..., None]).sum(1) / t.mask.sum(1, keepdim=True)
            torch.testing.assert_close(out.text_logits[l], block.text_head(mean)[:, :, None, None, None])


def test_check_messages_are_exact():
    lapq = tiny(feature_dims=(6, 6, 5))
    latent = torch.randn(2, 4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^features: expected 3 encoder taps, got 2$"):
        lapq(latent, [torch.randn(2, 6, 9, 16, 16)] * 2, text())
    with pytest.raises(ValueError, match=r"^text: this LaPQ is text-conditioned; pass a TextEmbedding "
                                         r"\(or a NullText one\)$"):
        tiny()(latent)


def test_num_bits_limits():
    for K in (1, 63):
        assert tiny(text=False, K=K).config.num_bits == K
    for K in (0, 65):
        with pytest.raises(ValueError, match=rf"^num_bits={K}: expected 1..64$"):
            tiny(text=False, K=K)
    with pytest.raises(ValueError, match=r"^num_bits=64: token ids hold at most 63 bits$"):
        tiny(text=False, K=64)


def test_block_norm_takes_each_frames_statistics_over_all_channels():
    """The norm before each block's conv: one group (every channel of a frame together), per frame."""
    norm = tiny(text=False).blocks[0].conv[0]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    h = torch.randn(2, 16, 3, 4, 5) * 3 + torch.arange(3.0).view(1, 1, 3, 1, 1) * 10
    mean = h.mean(dim=(1, 3, 4), keepdim=True)
    var = h.var(dim=(1, 3, 4), unbiased=False, keepdim=True)
    want = (h - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1, 1) + norm.bias.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(norm(h), want, rtol=1e-5, atol=1e-5)


def test_config_errors_and_the_backend_argument():
    with pytest.raises(ValueError, match=r"^level_scales: 2 entries for 3 levels$"):
        LaPQConfig(levels=3, level_scales=(2, 1)).scales()
    assert LaPQConfig(levels=3, level_scales=(3, 2, 1)).scales() == (3, 2, 1)
    with pytest.raises(ValueError, match=r"^feature_dims: 2 taps for 3 levels$"):
        tiny(feature_dims=(6, 6))
    assert tiny(text=False, backend="reference").backend == "reference"
