"""Wan causal video VAE: numerically equal to diffusers' AutoencoderKLWan on random weights
(tiny configs, all on CPU), chunk-plan invariance of streaming, exact tiling, LoRA through
peft, the original Wan .pth key mapping, precision and bad input."""

import copy
import json
import os
import warnings

import pytest
import torch

from pyratok.models import LatentDistribution, WanVAE, WanVAEConfig, fit_frames
from pyratok.models.wan import wan21_keys as wan_checkpoint
from pyratok.nn import StreamCache
from conftest import requires_cuda

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.models.autoencoders import autoencoder_kl_wan  # noqa: E402

CONFIGS = {
    # Wan 2.1 layout, narrow: 4 stages, time halved by stages 1 and 2
    "wan21": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                  temperal_downsample=[False, True, True]),
    # 3 stages, 2 residual blocks, attention in the down blocks at scale 1/4, time halved once
    "attn3": dict(base_dim=12, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=2, attn_scales=[0.25],
                  temperal_downsample=[True, False], scale_factor_temporal=2, scale_factor_spatial=4),
    # Wan 2.2 layout: residual up/down blocks, patch_size 2 (x16 spatial), wider decoder
    "wan22": dict(base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                  temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                  out_channels=12, scale_factor_spatial=16),
    # the layout diffusers' own Wan .pth converter is written for: 4 stages, 2 residual blocks, and
    # channel multipliers (1, 2, 4, 4), so that only decoder block 4 has a shortcut conv (the
    # converter hard-codes that index)
    "nrb2": dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[True, True, False]),
}
# small enough that exact tiling (overlap > 2 x receptive-field radius) runs fast on a CPU
TILING = dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
              scale_factor_temporal=2, scale_factor_spatial=2)
FP32_TOL = 1e-5


@pytest.fixture(autouse=True)
def _diffusers_encoder_attention(monkeypatch):
    """diffusers 0.42's WanEncoder3d passes feat_cache/feat_idx to every down block, but its
    WanAttentionBlock.forward takes x only (the original Wan code has the same bug), so any
    config with attn_scales crashes there.  The shim drops the two keywords; the attention
    itself is diffusers' own."""
    forward = autoencoder_kl_wan.WanAttentionBlock.forward
    monkeypatch.setattr(autoencoder_kl_wan.WanAttentionBlock, "forward",
                        lambda self, x, feat_cache=None, feat_idx=None: forward(self, x))


def random_diffusers_vae(name: str, seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    model = AutoencoderKLWan(**CONFIGS[name]).eval()
    with torch.no_grad():  # default init leaves gamma at 1; make the norms matter
        for pname, p in model.named_parameters():
            if pname.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """name -> (diffusers model, ours loaded from its save_pretrained folder, folder)."""
    made = {}

    def get(name):
        if name not in made:
            ref = random_diffusers_vae(name)
            folder = tmp_path_factory.mktemp(name)
            ref.save_pretrained(folder)
            made[name] = (ref, WanVAE.from_pretrained(folder).eval(), folder)
        return made[name]

    return get


def video_for(vae: WanVAE, frames: int, latent_hw=(2, 2), seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sf = vae.spatial_factor
    return torch.rand(1, 3, frames, latent_hw[0] * sf, latent_hw[1] * sf, generator=g) * 2 - 1


def assert_close(got, want, tol=FP32_TOL):
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol:.1g}"


# ----------------------------------------------------------------------------- diffusers parity

@pytest.mark.parametrize("name", ["wan21", "attn3", "wan22"])
@torch.no_grad()
def test_matches_diffusers(pair, name):
    ref, ours, _ = pair(name)
    for frames in (1, 5, 9, 17):
        video = video_for(ours, frames)
        want = ref.encode(video).latent_dist
        got = ours.encode(video)
        assert_close(got.mean, want.mean)
        assert_close(got.logvar, want.logvar)
        assert_close(ours.decode(want.mean), ref.decode(want.mean).sample)


@requires_cuda
@torch.no_grad()
def test_cuda_matches_diffusers(pair, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)      # fp32 parity, not TF32 rounding
    ref, _, folder = pair("wan21")
    ref = copy.deepcopy(ref).cuda()
    ours = WanVAE.from_pretrained(folder, device="cuda").eval()
    video = video_for(ours, 9).cuda()
    want = ref.encode(video).latent_dist.mean
    assert_close(ours.encode(video).mean, want)
    assert_close(ours.decode(want), ref.decode(want).sample)
    ours.set_precision(decoder=torch.bfloat16)
    got = ours.decode(want)
    assert got.dtype == torch.bfloat16
    assert_close(got, ref.to(torch.bfloat16).decode(want.bfloat16()).sample, 0.1)


@torch.no_grad()
def test_diffusers_reads_our_folder(pair, tmp_path):
    ref, ours, _ = pair("wan22")
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "AutoencoderKLWan" and saved["patch_size"] == 2
    again = AutoencoderKLWan.from_pretrained(tmp_path).eval()
    video = video_for(ours, 5)
    assert_close(again.encode(video).latent_dist.mean, ref.encode(video).latent_dist.mean, 0.0)


def test_full_configs_have_diffusers_weights():
    """Wan 2.1 (the defaults) and Wan 2.2 build exactly diffusers' parameter names and shapes."""
    wan22 = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2, in_channels=12,
                 out_channels=12, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
    for fields in ({}, wan22):
        with torch.device("meta"):
            want = {k: v.shape for k, v in AutoencoderKLWan(**fields).state_dict().items()}
            got = {k: v.shape for k, v in WanVAE(**fields).state_dict().items()}
        assert got == want


# ----------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("name", ["wan21", "wan22"])
@torch.no_grad()
def test_chunk_plans_match_whole_clip(pair, name):
    _, vae, _ = pair(name)
    video = video_for(vae, 33)
    whole = vae.encode(video, chunk_frames=None)
    assert_close(vae.encode(video).mean, whole.mean)                      # Wan's plan: 1, 4, 4, ...
    assert_close(vae.encode(video, chunk_frames=8).logvar, whole.logvar)
    cache, means = StreamCache(), []
    for chunk in torch.split(video, [5, 8, 4, 16], dim=2):
        means.append(vae.encode_stream(chunk, cache).mean)
    assert_close(torch.cat(means, dim=2), whole.mean)

    latent = whole.mean                                                   # (1, 4, 9, 2, 2)
    decoded = vae.decode(latent, chunk_frames=None)
    assert decoded.shape[2] == 33
    assert_close(vae.decode(latent), decoded)                             # one latent frame at a time
    cache = StreamCache()
    parts = [vae.decode_stream(chunk, cache) for chunk in torch.split(latent, [3, 1, 5], dim=2)]
    assert_close(torch.cat(parts, dim=2), decoded)


@torch.no_grad()
def test_encoder_features(pair):
    _, vae, _ = pair("wan21")
    video = video_for(vae, 9)
    dist, features = vae.encoder_features(video)
    _, whole = vae.encoder_features(video, chunk_frames=None)
    c = vae.config
    # stage outputs (after each downsampler): 16x16 -> 8, 4, 2, 2; 9 frames -> 9, 5, 3, 3
    assert [tuple(f.shape) for f in features] == [(1, c.base_dim * m, t, s, s) for m, t, s in
                                                  zip(c.dim_mult, (9, 5, 3, 3), (8, 4, 2, 2))]
    for a, b in zip(features, whole):
        assert_close(a, b)
    assert_close(dist.mean, vae.encode(video).mean)


def test_stream_chunk_rules(pair):
    _, vae, _ = pair("wan21")
    video = video_for(vae, 9)
    cache = StreamCache()
    with pytest.raises(ValueError, match="first chunk of a clip needs 1 \\+ 4m frames"):
        vae.encode_stream(video[:, :, :4], cache)
    vae.encode_stream(video[:, :, :1], cache)
    with pytest.raises(ValueError, match="later ones 4m"):
        vae.encode_stream(video[:, :, 1:4], cache)
    with pytest.raises(ValueError, match="chunk_frames=6"):
        vae.encode(video, chunk_frames=6)


# ----------------------------------------------------------------------------- tiling

def tile_border_mask(size: int, tile: int, overlap: int, scale: int) -> torch.Tensor:
    """True on output pixels inside an overlap band of neighbouring tiles (along one axis)."""
    from pyratok.models.wan.tiling import tile_starts as _tile_starts

    mask = torch.zeros(size // scale, dtype=torch.bool)
    starts = _tile_starts(size // scale, tile, overlap)
    for a, b in zip(starts[:-1], starts[1:]):
        mask[b:a + tile] = True
    return mask.repeat_interleave(scale)


@pytest.fixture(scope="module")
def tiling_vae():
    torch.manual_seed(0)
    return WanVAE(**TILING).eval()


@torch.no_grad()
def test_tiled_decode_is_exact_and_seamless(tiling_vae):
    vae, tile = tiling_vae, 32
    assert vae.receptive_field("decoder") == 7.0                          # default overlap 2 * 7 + 2 = 16
    latent = torch.randn(1, 4, 2, 2 * tile, 2 * tile, generator=torch.Generator().manual_seed(3))
    untiled = vae.decode(latent)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # the default overlap is exact: no warning
        tiled = vae.decode(latent, tile=tile)
    err = (tiled - untiled).abs().amax(dim=(0, 1, 2))                     # (H, W)
    assert err.max().item() <= FP32_TOL
    border = tile_border_mask(err.shape[0], tile, 16, vae.spatial_factor)
    assert border.any() and not border.all()
    assert err[border].max() <= 2 * err[~border][:, ~border].max() + 1e-6

    with pytest.warns(UserWarning, match="below 2 x the decoder's receptive-field radius"):
        rough = vae.decode(latent[:, :, :1], tile=tile, overlap=4)
    rough_err = (rough - untiled[:, :, :1]).abs().amax(dim=(0, 1, 2))
    assert rough_err.max().item() > 1e-3                                  # too little overlap is inexact
    assert rough_err.max().item() < untiled.abs().max().item()


@torch.no_grad()
def test_tiled_encode_is_exact(tiling_vae):
    vae, tile = tiling_vae, 24
    assert vae.receptive_field("encoder") == 4.5                          # default overlap 2 * 5 + 2 = 12
    video = video_for(vae, 3, latent_hw=(2 * tile, 2 * tile))
    untiled = vae.encode(video)
    tiled = vae.encode(video, tile=tile)
    assert_close(tiled.mean, untiled.mean)
    assert_close(tiled.logvar, untiled.logvar)
    with pytest.raises(ValueError, match="overlap=24"):
        vae.encode(video, tile=tile, overlap=24)
    with pytest.raises(ValueError, match="tile=2"):
        vae.encode(video, tile=2)


def test_receptive_field():
    wan21 = WanVAE(WanVAEConfig(base_dim=8))                              # Wan 2.1 layout, narrow
    # decoder up blocks: 3 res blocks x 2 convs at scales 1, 1/2, 1/4, 1/8 + 3 upsampling convs + conv_out
    assert wan21.receptive_field("decoder") == pytest.approx(6 * (1 + 1 / 2 + 1 / 4 + 1 / 8) + 1 / 2 + 1 / 4
                                                             + 1 / 8 + 1 / 8)
    # encoder: conv_in + 4 convs per stage + 3 stride-2 convs (reach 2), in input pixels / 8
    assert wan21.receptive_field("encoder") == pytest.approx((1 + 4 * (1 + 2 + 4 + 8) + 2 * (1 + 2 + 4)) / 8)
    with_attention = WanVAE(**CONFIGS["attn3"])
    assert with_attention.receptive_field("encoder") == float("inf")
    with pytest.warns(UserWarning, match="unbounded"):
        with_attention._check_tiling(16, None, "encoder")


# ----------------------------------------------------------------------------- LoRA

def test_lora(pair, tmp_path):
    pytest.importorskip("peft")
    _, base, folder = pair("wan21")
    vae = WanVAE.from_pretrained(folder).eval()
    video = video_for(vae, 9)
    with torch.no_grad():
        before = vae.encode(video).mean
    adapted = vae.add_lora()                                              # rank 16, alpha 32, B = 0
    assert "encoder.conv_in" in adapted and "encoder.down_blocks.3.time_conv" in adapted
    assert not any(name.startswith("decoder") for name in adapted)
    trainable = {n for n, p in vae.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(vae.encode(video).mean, before)               # zero B: outputs unchanged
        for name, p in vae.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 1000))
        adapted_out = vae.encode(video).mean
        assert (adapted_out - before).abs().max() > 1e-3
        assert_close(vae.encode(video, chunk_frames=None).mean, adapted_out)   # A streams with its own cache

    latent = vae.encode(video).mean                                       # gradients reach only the adapters
    latent.square().mean().backward()
    grads = {n for n, p in vae.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and grads <= trainable

    vae.save_lora(tmp_path / "adapter")
    saved = set(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"])
    assert saved == set(adapted)
    from safetensors.torch import load_file

    adapter_keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert len(adapter_keys) == 2 * len(adapted) and all(".lora_" in k for k in adapter_keys)
    with torch.no_grad():
        vae.merge_lora()
        assert_close(vae.encode(video).mean, adapted_out)
        vae.unmerge_lora()
        assert_close(vae.encode(video).mean, adapted_out)
        fresh = WanVAE.from_pretrained(folder).eval()
        fresh.load_lora(tmp_path / "adapter")
        assert_close(fresh.encode(video).mean, adapted_out)
        assert_close(WanVAE.from_pretrained(folder).encode(video).mean, before)
    # save_pretrained writes the backbone alone, under diffusers' names
    vae.save_pretrained(tmp_path / "backbone")
    assert set(WanVAE.from_pretrained(tmp_path / "backbone").state_dict()) == set(base.state_dict())


# ----------------------------------------------------------------------------- original Wan checkpoints

@torch.no_grad()
def test_wan_pth_matches_diffusers_converter(pair, tmp_path):
    """Our Wan 2.1 .pth, read back by diffusers' own single-file converter, is the same state dict."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    _, vae, _ = pair("nrb2")
    pth = tmp_path / "Wan2.1_VAE.pth"
    vae.save_wan_checkpoint(pth)
    wan_state = torch.load(pth, weights_only=True)
    assert "decoder.upsamples.4.shortcut.weight" in wan_state and "encoder.head.2.weight" in wan_state
    converted = convert_wan_vae_to_diffusers(wan_state)
    ours = vae.backbone_state_dict()
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k], ours[k]) for k in ours)
    loaded = WanVAE.from_pretrained(pth, config=CONFIGS["nrb2"])
    video = video_for(vae, 5)
    assert torch.equal(loaded.encode(video).mean, vae.encode(video).mean)


@pytest.mark.parametrize("name", ["wan21", "attn3"])
def test_wan_key_mapping_round_trips(pair, name, tmp_path):
    _, vae, _ = pair(name)
    state = vae.backbone_state_dict()
    wan = wan_checkpoint.diffusers_to_wan(state, vae.config)
    assert len(wan) == len(state) and not set(wan) & set(state)          # every name changes
    assert wan_checkpoint.wan_to_diffusers(wan, vae.config) == state
    torch.save(wan, tmp_path / "vae.pth")
    assert WanVAE.from_pretrained(tmp_path / "vae.pth", config=CONFIGS[name]).backbone_state_dict().keys() == state.keys()


def test_wan_mapping_rejects_what_it_cannot_express():
    with pytest.raises(ValueError, match="Wan 2.2"):
        wan_checkpoint.diffusers_to_wan({}, WanVAEConfig(**CONFIGS["wan22"]))
    with pytest.raises(ValueError, match="original Wan decoder puts attention"):
        wan_checkpoint.diffusers_to_wan({}, WanVAEConfig(base_dim=8, attn_scales=(0.25,)))


# ----------------------------------------------------------------------------- precision

@torch.no_grad()
def test_precision_policy(pair):
    _, vae, folder = pair("wan21")
    video = video_for(vae, 5)
    want_latent = vae.encode(video).mean
    want_video = vae.decode(want_latent)
    for dtype, tol in ((torch.bfloat16, 0.1), (torch.float16, 0.02)):
        half = WanVAE.from_pretrained(folder).eval().set_precision(decoder=dtype)
        latent = half.encode(video.to(dtype)).mean
        assert latent.dtype == torch.float32                              # encoder stays fp32
        assert_close(latent, want_latent, 1e-2 if dtype == torch.bfloat16 else 1e-3)  # input rounding only
        out = half.decode(want_latent)
        assert out.dtype == dtype and out.abs().max() <= 1
        assert_close(out, want_video, tol)
    with pytest.raises(ValueError, match="decoder=torch.int8"):
        vae.set_precision(decoder=torch.int8)


def test_autograd_path_matches_inference_path(pair):
    """With autograd recording, blocks avoid in-place updates; same numbers either way."""
    _, vae, _ = pair("wan22")
    video = video_for(vae, 5).requires_grad_(True)
    recorded = vae.decode(vae.encode(video).mean)
    recorded.mean().backward()
    assert video.grad is not None and video.grad.abs().sum() > 0
    with torch.no_grad():
        assert_close(vae.decode(vae.encode(video).mean), recorded.detach())


def test_latent_helpers(pair):
    _, vae, _ = pair("wan21")
    z = torch.randn(2, 4, 3, 2, 2)
    with pytest.raises(ValueError, match="latents_mean/latents_std have 16/16 entries, z_dim is 4"):
        vae.normalize_latents(z)
    wan = WanVAE(base_dim=8)                                              # Wan 2.1 statistics, z_dim 16
    z = torch.randn(1, 16, 2, 2, 2)
    assert_close(wan.denormalize_latents(wan.normalize_latents(z)), z)
    mean = torch.tensor(WanVAEConfig().latents_mean).view(1, 16, 1, 1, 1)
    assert_close(wan.normalize_latents(mean.expand_as(z)), torch.zeros_like(z))
    dist = LatentDistribution.from_moments(torch.cat([z, torch.full_like(z, -100.0)], dim=1))
    assert dist.logvar.min() == -30.0 and dist.sample().shape == z.shape
    assert dist.kl().shape == (1,)


# ----------------------------------------------------------------------------- bad input

def test_bad_video(pair):
    _, vae, _ = pair("wan21")
    video = video_for(vae, 9)
    with pytest.raises(ValueError, match="7 frames, but the encoder needs 1 \\+ 4k frames.*fit_frames"):
        vae.encode(video[:, :, :7])
    assert fit_frames(video[:, :, :7], "pad").shape[2] == 9
    assert torch.equal(fit_frames(video[:, :, :7], "pad")[:, :, 7:], video[:, :, 6:7].expand(-1, -1, 2, -1, -1))
    assert torch.equal(fit_frames(video[:, :, :7], "trim"), video[:, :, :5])
    with pytest.raises(ValueError, match="has 4 channels, the VAE expects 3"):
        vae.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(ValueError, match="add a batch axis"):
        vae.encode(video[0])
    with pytest.raises(TypeError, match="uint8"):
        vae.encode((video * 127 + 128).to(torch.uint8))
    with pytest.raises(ValueError, match="multiples of 8, got 12x16"):
        vae.encode(video[..., :12, :])
    with pytest.warns(UserWarning, match="values span \\[0, 255\\] but the VAE expects \\[-1, 1\\]"):
        vae.encode(torch.linspace(0, 255, 5 * 3 * 256).view(1, 3, 5, 16, 16))
    with pytest.raises(ValueError, match="latent: has 3 channels, the VAE has z_dim=4"):
        vae.decode(torch.zeros(1, 3, 2, 2, 2))


def test_config_and_weight_mismatch(pair, tmp_path):
    _, vae, folder = pair("wan21")
    with pytest.raises(ValueError, match="unknown AutoencoderKLWan fields \\['spatial_compression'\\]"):
        WanVAEConfig.from_dict({"spatial_compression": 8})
    with pytest.raises(ValueError, match="scale_factor_temporal=4 but .* downsamples time by 2"):
        WanVAEConfig(temperal_downsample=(False, False, True))
    with pytest.raises(ValueError, match="temperal_downsample: needs one flag per downsampling stage"):
        WanVAEConfig(temperal_downsample=(True,))

    other = WanVAE(**{**CONFIGS["wan21"], "base_dim": 12})
    with pytest.raises(ValueError, match="shape mismatches .*encoder.conv_in.weight: checkpoint \\(8, 3, 3, 3, 3\\)"):
        other.load_backbone_state_dict(vae.backbone_state_dict())
    state = vae.backbone_state_dict()
    state["encoder.extra.weight"] = state.pop("decoder.conv_out.bias")
    with pytest.raises(ValueError, match="missing keys \\(1\\): \\['decoder.conv_out.bias'\\]\n.*"
                                         "unexpected keys \\(1\\): \\['encoder.extra.weight'\\]"):
        vae.load_backbone_state_dict(state)

    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "num_res_blocks": 2}))
    os.link(folder / "diffusion_pytorch_model.safetensors", tmp_path / "bad" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="missing keys"):
        WanVAE.from_pretrained(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        WanVAE.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pass config only with a single checkpoint file"):
        WanVAE.from_pretrained(folder, config=CONFIGS["wan21"])
