"""Key mapping between the original Wan 2.1 VAE checkpoint (``Wan2.1_VAE.pth``, the state dict
of ``wan.modules.vae.WanVAE_``) and diffusers' ``AutoencoderKLWan`` names, which pyratok uses.

    Wan 2.1                                   diffusers / pyratok
    conv1.*, conv2.*                          quant_conv.*, post_quant_conv.*
    {encoder,decoder}.conv1.*                 {encoder,decoder}.conv_in.*
    {encoder,decoder}.middle.0 / .1 / .2      {..}.mid_block.resnets.0 / attentions.0 / resnets.1
    {encoder,decoder}.head.0.gamma / head.2   {..}.norm_out.gamma / conv_out
    encoder.downsamples.N                     encoder.down_blocks.N       (same flat order)
    decoder.upsamples.N                       decoder.up_blocks.i.resnets.j with N = i*(R+2) + j,
                                              decoder.up_blocks.i.upsamplers.0 with N = i*(R+2) + R+1
                                              (R = num_res_blocks; R+1 residual blocks, then the Resample)
    inside residual blocks:
    residual.0.gamma / residual.2 / residual.3.gamma / residual.6 / shortcut
                                              norm1.gamma / conv1 / norm2.gamma / conv2 / conv_shortcut

Attention, Resample (resample.1, time_conv) and RMS-norm parameters keep their names.  The
mapping is built from the config, so it covers any dim_mult / num_res_blocks / attn_scales that
both codebases can express: Wan's decoder places attention blocks where its scale is in
attn_scales, diffusers' does not, and Wan 2.2 (is_residual) uses another layout; both are
rejected with an error.
"""

from __future__ import annotations

import re

import torch

_RESIDUAL_PARTS = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                   "conv_shortcut": "shortcut"}
_MID_PARTS = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}


def _check_supported(config) -> None:
    if config.is_residual:
        raise ValueError("the original Wan 2.2 (is_residual) checkpoint layout is not supported; convert it with "
                         "diffusers (AutoencoderKLWan) and load the diffusers folder")
    n = config.num_stages
    decoder_scales = [2.0 ** (i - (n - 2)) for i in range(n)]
    if any(s in config.attn_scales for s in decoder_scales):
        raise ValueError(f"attn_scales={list(config.attn_scales)}: the original Wan decoder puts attention blocks at "
                         f"these scales, diffusers' AutoencoderKLWan (and pyratok) do not")


def _residual_part(rest: str) -> str:
    """'conv1.weight' -> 'residual.2.weight' etc.; other parameter paths unchanged."""
    head, _, param = rest.rpartition(".")
    return f"{_RESIDUAL_PARTS.get(head, head)}.{param}"


def diffusers_name_to_wan(key: str, num_res_blocks: int) -> str:
    """One diffusers-style key -> its Wan 2.1 name."""
    if key.startswith("quant_conv."):
        return "conv1." + key[len("quant_conv."):]
    if key.startswith("post_quant_conv."):
        return "conv2." + key[len("post_quant_conv."):]
    part, _, rest = key.partition(".")
    if rest.startswith("conv_in."):
        return f"{part}.conv1.{rest[len('conv_in.'):]}"
    if rest.startswith("norm_out."):
        return f"{part}.head.0.{rest[len('norm_out.'):]}"
    if rest.startswith("conv_out."):
        return f"{part}.head.2.{rest[len('conv_out.'):]}"
    m = re.fullmatch(r"mid_block\.(resnets\.\d|attentions\.\d)\.(.+)", rest)
    if m:
        return f"{part}.middle.{_MID_PARTS[m[1]]}.{_residual_part(m[2])}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest)
    if m:
        return f"encoder.downsamples.{m[1]}.{_residual_part(m[2])}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
    if m:
        return f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + int(m[2])}.{_residual_part(m[3])}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest)
    if m:
        return f"decoder.upsamples.{int(m[1]) * (num_res_blocks + 2) + num_res_blocks + 1}.{m[2]}"
    raise KeyError(f"{key}: no Wan 2.1 name for this key")


def _name_table(config) -> dict[str, str]:
    """{diffusers name: Wan name} for every weight of a model with this config."""
    from pyratok.models.vae import WanVAE

    _check_supported(config)
    with torch.device("meta"):
        keys = WanVAE(config).state_dict().keys()
    return {k: diffusers_name_to_wan(k, config.num_res_blocks) for k in keys}


def is_wan_layout(state: dict) -> bool:
    return "encoder.conv1.weight" in state or "conv1.weight" in state


def wan_to_diffusers(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Renames a Wan 2.1 state dict; keys outside the mapping keep their names (and are then
    reported as unexpected by the loader)."""
    to_diffusers = {wan: ours for ours, wan in _name_table(config).items()}
    return {to_diffusers.get(k, k): v for k, v in state.items()}


def diffusers_to_wan(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    table = _name_table(config)
    return {table[k]: v for k, v in state.items()}
