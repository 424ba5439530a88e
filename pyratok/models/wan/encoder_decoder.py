"""Wan's encoder and decoder, each split at latent resolution into the part that tiling may
split (convolutions only) and the part that must see whole frames (the mid block's attention)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from pyratok.models.wan.blocks import (AttentionBlock, MidBlock, Resample, ResidualBlock, ResidualDownBlock,
                                       ResidualUpBlock, RMSNorm, UpBlock)
from pyratok.models.wan.config import WanVAEConfig
from pyratok.nn.causal_conv3d import CausalConv3d, StreamCache


def _conv_receptive_radius(blocks: nn.ModuleList) -> float:
    """Spatial receptive-field radius of a run of blocks, in pixels of their input grid: each
    3x3 conv reaches one pixel of the grid it runs on, a stride-2 downsampling conv two.
    math.inf when an attention block (which sees the whole frame) is among them."""
    radius, pixel = 0.0, 1.0
    for m in blocks.modules():                                           # registration = execution order
        if isinstance(m, AttentionBlock):
            return math.inf
        if isinstance(m, ResidualBlock):
            radius += 2 * pixel
        elif isinstance(m, Resample) and m.mode.startswith("down"):
            radius += 2 * pixel
            pixel *= 2
        elif isinstance(m, Resample):
            pixel /= 2
            radius += pixel
    return radius


class Encoder(nn.Module):
    """(B, in_channels, T, H, W) -> (B, 2 * z_dim, 1 + (T-1)/temporal_factor, H/2^(n-1), W/2^(n-1)).

    Two parts: ``spatial_part`` (conv_in and the down blocks: convolutions only, unless
    attn_scales adds attention there, so it can be tiled) and ``latent_part`` (the mid block
    with its frame-global attention, and the head, at latent resolution).  ``features``, when a
    list, receives the output of every stage (after its downsampler): the per-depth maps LaPQ's
    lateral connections tap.  With a cache, ``spatial_part`` counts the input frames of the
    clip under the encoder (``cache.frames_seen(encoder)``).
    """

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        c = config
        dims = [c.base_dim * m for m in (1, *c.dim_mult)]
        last = c.num_stages - 1
        self.conv_in = CausalConv3d(c.in_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.stage_ends: list[int] = []                                  # index of each stage's last block
        scale = 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = i != last and c.temporal_flags[i]
            if c.is_residual:
                self.down_blocks.append(ResidualDownBlock(in_dim, out_dim, c.dropout, c.num_res_blocks,
                                                          temporal=temporal, down=i != last))
            else:
                for _ in range(c.num_res_blocks):
                    self.down_blocks.append(ResidualBlock(in_dim, out_dim, c.dropout))
                    if scale in c.attn_scales:
                        self.down_blocks.append(AttentionBlock(out_dim))
                    in_dim = out_dim
                if i != last:
                    self.down_blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
                    scale /= 2.0
            self.stage_ends.append(len(self.down_blocks) - 1)
        self.mid_block = MidBlock(dims[-1], c.dropout)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * c.z_dim, 3, padding=1)
        # in latent pixels: conv_in + down blocks, measured on the input grid (2^(n-1) input pixels per latent pixel)
        self.spatial_radius = (1 + _conv_receptive_radius(self.down_blocks)) / 2 ** last

    def spatial_part(self, x: torch.Tensor, cache: Optional[StreamCache] = None,
                     features: Optional[list] = None) -> torch.Tensor:
        if cache is not None:
            cache.add_frames(self, x.shape[2])   # the clip position encode_stream checks chunk lengths by
        x = self.conv_in(x, cache)
        for index, block in enumerate(self.down_blocks):
            x = block(x, cache)
            if features is not None and index in self.stage_ends:
                features.append(x)
        return x

    def latent_part(self, x: torch.Tensor, cache: Optional[StreamCache] = None) -> torch.Tensor:
        x = self.mid_block(x, cache)
        return self.conv_out(self.norm_out(x, silu=True, overwrite=True), cache)

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None,
                features: Optional[list] = None) -> torch.Tensor:
        return self.latent_part(self.spatial_part(x, cache, features), cache)


class Decoder(nn.Module):
    """(B, z_dim, T, h, w) -> (B, out_channels, 1 + (T-1)*temporal_factor, h*2^(n-1), w*2^(n-1)).

    Two parts: ``latent_part`` (conv_in and the mid block with its frame-global attention, at
    latent resolution) and ``spatial_part`` (the up blocks and the head: convolutions only, so
    it can be tiled).
    """

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        c = config
        base = c.decoder_base_dim or c.base_dim
        dims = [base * m for m in (c.dim_mult[-1], *c.dim_mult[::-1])]
        flags = c.temporal_flags[::-1]
        last = c.num_stages - 1
        self.conv_in = CausalConv3d(c.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], c.dropout)
        self.up_blocks = nn.ModuleList()
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = i != last and flags[i]
            if c.is_residual:
                self.up_blocks.append(ResidualUpBlock(in_dim, out_dim, c.dropout, c.num_res_blocks,
                                                      temporal=temporal, up=i != last))
            else:
                # Wan 2.1's upsamplers halve the channels, so every stage after the first starts at in_dim // 2.
                mode = None if i == last else ("upsample3d" if temporal else "upsample2d")
                self.up_blocks.append(UpBlock(in_dim // 2 if i > 0 else in_dim, out_dim, c.dropout,
                                              c.num_res_blocks, mode))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], c.out_channels, 3, padding=1)
        # in latent pixels: up blocks + conv_out (one pixel of the output grid)
        self.spatial_radius = _conv_receptive_radius(self.up_blocks) + 1 / 2 ** last

    def latent_part(self, z: torch.Tensor, cache: Optional[StreamCache] = None) -> torch.Tensor:
        return self.mid_block(self.conv_in(z, cache), cache)

    def spatial_part(self, x: torch.Tensor, cache: Optional[StreamCache] = None) -> torch.Tensor:
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(self.norm_out(x, silu=True, overwrite=True), cache)

    def forward(self, z: torch.Tensor, cache: Optional[StreamCache] = None) -> torch.Tensor:
        return self.spatial_part(self.latent_part(z, cache), cache)
