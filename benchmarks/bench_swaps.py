"""Benchmark: the one-line swaps of README "Use pyratok from your codebase", each against the
code it replaces, on the same inputs and weights, in one run.

  lfq          ``from pyratok.nn import LFQ`` for ``from vector_quantize_pytorch import LFQ``:
               one training step of the quantizer (forward + backward of quantized and aux
               loss), codebook 2^14, (8, 14, 16, 16) channel-first latents (2048 tokens) at the
               peer's default inv_temperature = 100, inputs x ~ N(0, 0.05) (a trained
               encoder's scale) and N(0, 1)
  wan_patch    ``patch_causal_convs(vae)`` on a diffusers AutoencoderKLWan (base_dim 32, z_dim 16,
               Wan 2.1 layout), encode and decode of 9 x 128 x 128 frames under no_grad
  wan_vae      ``WanVAE.from_diffusers(vae)`` for the same AutoencoderKLWan, same clip
  cogvideox    ``patch_causal_convs`` on a diffusers CogVideoXCausalConv3d(128, 128, 3),
               (1, 128, 9, 64, 64), forward under no_grad

Each group has the peer (the replaced code) and ours; report.py derives speedup_vs_peer.

    python -m pytest benchmarks/bench_swaps.py --benchmark-only --benchmark-json=/tmp/swaps.json
    python benchmarks/report.py /tmp/swaps.json
"""

from __future__ import annotations

import pytest
import torch

from _common import DEVICE, run

PEER_LFQ = "vector-quantize-pytorch LFQ"
DIFFUSERS = "diffusers"


# ---- LFQ ------------------------------------------------------------------------------------

LFQ_BITS, LFQ_SHAPE = 14, (8, 14, 16, 16)


@pytest.mark.parametrize("std", [0.05, 1.0])
@pytest.mark.parametrize("provider", [PEER_LFQ, "pyratok.nn.LFQ"])
def test_lfq_swap(benchmark, provider, std):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    from pyratok.nn import LFQ

    cls = vqp.LFQ if provider == PEER_LFQ else LFQ
    torch.manual_seed(0)
    quantizer = cls(codebook_size=2 ** LFQ_BITS, dim=LFQ_BITS, entropy_loss_weight=0.1,
                    commitment_loss_weight=0.25).to(DEVICE).train()
    x = (torch.randn(LFQ_SHAPE, generator=torch.Generator().manual_seed(1)) * std).to(DEVICE)

    def step():
        xr = x.detach().requires_grad_()
        quantized, _, aux_loss = quantizer(xr, inv_temperature=100.0)
        (quantized.square().mean() + aux_loss).backward()

    benchmark.group = f"swap lfq K={LFQ_BITS} x={tuple(LFQ_SHAPE)} tau=100 std={std:g}"
    run(benchmark, step, rounds=3, op="swaps", provider=provider, shape=str(LFQ_SHAPE), dtype="float32",
        layout="channel-first", peer=PEER_LFQ, ours=provider != PEER_LFQ)


# ---- diffusers ------------------------------------------------------------------------------

WAN_CONFIG = dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
WAN_CLIP = (1, 3, 9, 128, 128)


def _wan(kind: str):
    diffusers = pytest.importorskip("diffusers")
    from pyratok.interop.diffusers import patch_causal_convs
    from pyratok.models import WanVAE

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(**WAN_CONFIG).to(DEVICE).eval()
    if kind == "patched":
        patch_causal_convs(vae)
    elif kind == "WanVAE":
        vae = WanVAE.from_diffusers(vae).eval()
    return vae


def _wan_steps(vae):
    video = (torch.rand(WAN_CLIP, generator=torch.Generator().manual_seed(2)) * 2 - 1).to(DEVICE)
    with torch.no_grad():
        latent = vae.encode(video, return_dict=True).latent_dist.mode()
    return {"encode": lambda: vae.encode(video, return_dict=True).latent_dist.mode(),
            "decode": lambda: vae.decode(latent, return_dict=True).sample}


@pytest.mark.parametrize("part", ["encode", "decode"])
@pytest.mark.parametrize("provider", [DIFFUSERS + " AutoencoderKLWan", "patch_causal_convs(AutoencoderKLWan)",
                                      "WanVAE.from_diffusers"])
def test_wan_swaps(benchmark, provider, part):
    kind = "diffusers" if provider.startswith(DIFFUSERS) else ("patched" if provider.startswith("patch") else "WanVAE")
    fn = _wan_steps(_wan(kind))[part]

    def step():
        with torch.no_grad():
            fn()

    benchmark.group = f"swap wan {part} {tuple(WAN_CLIP)} base_dim=32"
    run(benchmark, step, rounds=3, op="swaps", provider=provider, shape=str(WAN_CLIP), dtype="float32",
        layout="NCDHW", peer=DIFFUSERS + " AutoencoderKLWan", ours=not provider.startswith(DIFFUSERS))


COG_SHAPE = (1, 128, 9, 64, 64)


@pytest.mark.parametrize("provider", [DIFFUSERS + " CogVideoXCausalConv3d",
                                      "patch_causal_convs(CogVideoXCausalConv3d)"])
def test_cogvideox_conv_swap(benchmark, provider):
    pytest.importorskip("diffusers")
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

    from pyratok.interop.diffusers import patch_causal_convs

    torch.manual_seed(0)
    conv = CogVideoXCausalConv3d(128, 128, kernel_size=3).to(DEVICE).eval()
    if provider.startswith("patch"):
        patch_causal_convs(conv)
    x = torch.randn(COG_SHAPE, generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def step():
        with torch.no_grad():
            conv(x)

    benchmark.group = f"swap cogvideox causal conv {tuple(COG_SHAPE)}"
    flops = 2 * 128 * 128 * 27 * COG_SHAPE[2] * COG_SHAPE[3] * COG_SHAPE[4]
    run(benchmark, step, rounds=5, op="swaps", provider=provider, shape=str(COG_SHAPE), dtype="float32",
        layout="NCDHW", peer=DIFFUSERS + " CogVideoXCausalConv3d", ours=provider.startswith("patch"), flops=flops)
