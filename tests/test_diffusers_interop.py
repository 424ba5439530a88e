"""diffusers interop: WanVAE <-> AutoencoderKLWan in memory, diffusers-style return types, a
WanVAE inside diffusers' WanPipeline, and patch_causal_convs on unmodified diffusers models
(outputs against the unpatched models, fp32, CPU; tiny random configs)."""

from __future__ import annotations

import pytest
import torch

from pyratok.interop import diffusers as interop
from pyratok.models.vae import LatentDistribution, WanVAE

pytest.importorskip("diffusers")
from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan  # noqa: E402
from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d  # noqa: E402

TINY_WAN = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                scale_factor_temporal=4, scale_factor_spatial=4, latents_mean=[0.1, -0.2, 0.3, 0.0],
                latents_std=[1.5, 0.5, 2.0, 1.0])
FP32_TOL = dict(rtol=1e-4, atol=1e-5)


def tiny_wan(seed=0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    model = AutoencoderKLWan(**TINY_WAN).eval()
    with torch.no_grad():  # default init leaves gamma at 1; make the norms matter
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model


def video(frames=9, size=16, seed=1):
    return torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def test_from_and_to_diffusers_in_memory():
    ref = tiny_wan()
    ours = WanVAE.from_diffusers(ref).eval()
    x = video()
    want = ref.encode(x).latent_dist
    got = ours.encode(x)
    torch.testing.assert_close(got.mean, want.mean, **FP32_TOL)
    torch.testing.assert_close(got.logvar, want.logvar, **FP32_TOL)
    back = ours.to_diffusers().eval()
    assert type(back) is AutoencoderKLWan
    assert back.config.latents_std == ref.config.latents_std
    for (k, a), (k2, b) in zip(sorted(ref.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(a, b)
    with pytest.raises(TypeError, match="AutoencoderKLWan"):
        WanVAE.from_diffusers(torch.nn.Linear(2, 2))


@torch.no_grad()
def test_diffusers_return_types():
    ref = tiny_wan()
    ours = WanVAE.from_diffusers(ref).eval()
    x = video()
    out = ours.encode(x, return_dict=True)
    assert isinstance(out.latent_dist, LatentDistribution) and out[0] is out.latent_dist
    assert out["latent_dist"] is out.latent_dist
    (dist,) = ours.encode(x, return_dict=False)
    want = ref.encode(x).latent_dist
    torch.testing.assert_close(dist.var, want.var, **FP32_TOL)
    torch.testing.assert_close(dist.std, want.std, **FP32_TOL)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(dist.sample(generator=g1), want.sample(generator=g2), **FP32_TOL)
    z = want.mode()
    dec = ours.decode(z, return_dict=True)
    torch.testing.assert_close(dec.sample, ref.decode(z).sample, **FP32_TOL)
    torch.testing.assert_close(ours.decode(z, return_dict=False)[0], dec.sample)
    torch.testing.assert_close(ours(x, return_dict=True).sample, ref(x).sample, **FP32_TOL)
    assert isinstance(ours.decode(z), torch.Tensor)  # pyratok's own default is unchanged
    assert ours.dtype == torch.float32
    with pytest.raises(TypeError, match="return_dict"):
        ours.decode(z, return_dict="yes")


@torch.no_grad()
def test_wan_vae_stands_in_for_autoencoderklwan_in_wan_pipeline():
    """diffusers' own WanPipeline, tiny random transformer, prompt embeddings given (no text
    encoder): the video from our WanVAE equals the one from the AutoencoderKLWan it came from."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                        num_layers=1, rope_max_seq_len=32).eval()
    ref = tiny_wan()
    prompt = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(2))

    def generate(vae):
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt_embeds=prompt, negative_prompt_embeds=prompt, height=16, width=16, num_frames=5,
                    num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                    generator=torch.Generator().manual_seed(4)).frames

    want = generate(ref)
    got = generate(WanVAE.from_diffusers(ref).eval())
    assert got.shape == want.shape == (1, 5, 3, 16, 16)
    torch.testing.assert_close(got, want, **FP32_TOL)


@torch.no_grad()
def test_patch_wan_causal_convs_keeps_outputs():
    ref = tiny_wan()
    x = video(frames=9)
    want_latent = ref.encode(x).latent_dist.mean
    want_video = ref.decode(want_latent).sample
    counts = interop.patch_causal_convs(ref)
    total = sum(type(m).__name__ == "WanCausalConv3d" for m in ref.modules())
    # the temporally strided downsampling convs (stride 2, no causal past) stay diffusers'
    assert counts["patched"] + counts["skipped"] == total and counts["patched"] > 0.8 * total
    assert all(m.forward.__func__ is interop._wan_forward for m in ref.modules()
               if getattr(m, "_pyratok_patched_forward", False))
    torch.testing.assert_close(ref.encode(x).latent_dist.mean, want_latent, **FP32_TOL)
    torch.testing.assert_close(ref.decode(want_latent).sample, want_video, **FP32_TOL)
    assert interop.patch_causal_convs(ref) == counts  # idempotent
    assert interop.unpatch_causal_convs(ref) == counts["patched"]
    assert not any(hasattr(m, "_pyratok_patched_forward") for m in ref.modules())
    torch.testing.assert_close(ref.decode(want_latent).sample, want_video, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[9], [1, 4, 4], [3, 2, 4]])
def test_patch_cogvideox_causal_conv_streaming(chunks):
    torch.manual_seed(0)
    conv = CogVideoXCausalConv3d(6, 5, kernel_size=3).eval()
    x = torch.randn(2, 6, sum(chunks), 7, 8)

    def stream():
        outs, cache, start = [], None, 0
        for n in chunks:
            y, cache = conv(x[:, :, start:start + n], conv_cache=cache)
            outs.append(y)
            start += n
        return torch.cat(outs, 2), cache

    want, want_cache = stream()
    assert interop.patch_causal_convs(conv) == {"patched": 1, "skipped": 0}
    got, got_cache = stream()
    torch.testing.assert_close(got, want, **FP32_TOL)
    torch.testing.assert_close(got_cache, want_cache, rtol=0, atol=0)


@torch.no_grad()
def test_patch_cogvideox_autoencoder():
    torch.manual_seed(0)
    ref = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 2,
                                 up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(8, 16),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=4,
                                 temporal_compression_ratio=2).eval()
    x = video(frames=5, size=16)
    want = ref(x).sample
    counts = interop.patch_causal_convs(ref)
    assert counts["patched"] > 0
    torch.testing.assert_close(ref(x).sample, want, **FP32_TOL)


def test_replicate_padding_layers_are_skipped():
    conv = CogVideoXCausalConv3d(2, 2, kernel_size=3, pad_mode="replicate")
    assert interop.patch_causal_convs(conv) == {"patched": 0, "skipped": 1}
    with pytest.raises(TypeError, match="nn.Module"):
        interop.patch_causal_convs("model")
