"""Wan 2.1 / 2.2 causal video VAE, numerically equal to diffusers' ``AutoencoderKLWan``.

PyraTok tokenizes the latent of a pretrained Wan video VAE (DESIGN.md §3): a video
(B, 3, T, H, W) in [-1, 1] with T = 1 + 4k frames becomes a latent (B, z_dim, 1 + k, H/8, W/8)
(Wan 2.1; Wan 2.2 is 4x16x16 with patch_size 2 and residual up/down blocks).  Every field of
diffusers' ``AutoencoderKLWan`` config is honoured, state dicts use its parameter names, and
:meth:`WanVAE.from_pretrained` reads a diffusers folder or the original Wan 2.1 ``.pth``
(key mapping in :mod:`pyratok.models.wan_checkpoint`).

Streaming.  All temporal state lives in one explicit :class:`~pyratok.nn.StreamCache` per clip,
keyed by module: each CausalConv3d keeps its last P input frames, and the two places where Wan
treats the first chunk specially are written out in :class:`Resample`.  The network is causal,
so every chunk plan gives the whole-clip result; ``encode`` defaults to Wan's plan (1 frame, then
4) and ``decode`` to one latent frame at a time, which bounds activation memory by the chunk.

Tiling.  ``tile`` and ``overlap`` are in latent pixels.  The attention in the mid blocks sees the
whole frame, so it is never tiled: the part at latent resolution (decoder: conv_in + mid block;
encoder: mid block + head) runs on whole frames, and only the convolutional part above latent
resolution is tiled.  Each tile runs the whole temporal stream on its own; in the band two tiles
share, each tile's outer ``margin`` pixels get weight 0 and the rest is a linear ramp, normalised
to sum to one.  With margin >= the receptive-field radius R of the tiled part
(:meth:`WanVAE.receptive_field`, 12.25 latent pixels for the Wan 2.1 decoder), i.e. overlap >=
2 ceil(R) + 1 (the default is 2 ceil(R) + 2), tiled equals untiled up to fp32 rounding; a smaller
overlap is allowed with a warning (seamless, not exact).  Memory: the output, the latent-resolution
activations of the whole clip, and one tile's working set.

Precision policy.  The encoder (and quant_conv) run in fp32 by default: the latent signs feed a
binary quantizer and bf16's 8-bit mantissa moves small latents across zero.  The decoder may run
in fp32, bf16 or fp16 (``set_precision(decoder=torch.bfloat16)``); bf16 is the GPU choice, fp16 can
overflow on real weights.  Whatever the weight dtype, RMS-norm statistics are computed in fp32,
SDPA accumulates in fp32, the latent distribution is returned in fp32 and the video in the
decoder's dtype, clamped to [-1, 1].  Run inference under ``torch.no_grad()``: the blocks then
reuse their scratch tensors in place, which matters on CPUs, where every fresh tensor costs page
faults.

Cost.  Dominated by the 3x3x3 convolutions, 2 * C_in * C_out * 27 FLOPs per output voxel: for the
Wan 2.1 config 5.7 TFLOP (encode) and 9.6 TFLOP (decode) per 17x256x256 clip (torch's
flop_counter), so it is compute bound; the roofline is the device's conv throughput.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pyratok.nn.causal_conv3d import CausalConv3d, StreamCache

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)
# F.normalize divides by max(||x||, 1e-12); we clamp the squared norm the same way.
_NORM_EPS_SQUARED = 1e-24

_WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                       0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                      3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass
class WanVAEConfig:
    """The fields (names and defaults) of diffusers' ``AutoencoderKLWan`` config; the defaults
    are Wan 2.1.  ``temperal_downsample`` keeps Wan's spelling so config.json files load as is.

    attn_scales adds attention blocks after the residual blocks of the (non-residual) encoder
    stages whose scale (1, 1/2, 1/4, ...) is listed; as in diffusers, the decoder has attention
    only in its mid block.
    """

    base_dim: int = 96
    decoder_base_dim: Optional[int] = None
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple = ()
    temperal_downsample: tuple = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple = _WAN21_LATENTS_MEAN
    latents_std: tuple = _WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: Optional[int] = None
    scale_factor_temporal: Optional[int] = 4
    scale_factor_spatial: Optional[int] = 8

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ValueError(f"{name}: expected a list, got {getattr(self, name)!r}")
            setattr(self, name, tuple(getattr(self, name)))
        # sizes are bounded before any layer is built: absurd values fail here, not in an allocation
        for name, high in (("base_dim", 4096), ("z_dim", 1024), ("num_res_blocks", 64), ("in_channels", 4096),
                           ("out_channels", 4096), ("decoder_base_dim", 4096), ("patch_size", 64)):
            value = getattr(self, name)
            if value is None and name in ("decoder_base_dim", "patch_size"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not (0 if name == "num_res_blocks" else 1) <= value <= high:
                raise ValueError(f"{name}={value!r}: expected an integer in "
                                 f"{0 if name == 'num_res_blocks' else 1}..{high}")
        if len(self.dim_mult) > 8 or any(isinstance(m, bool) or not isinstance(m, int) or m > 64 for m in self.dim_mult):
            raise ValueError(f"dim_mult={list(self.dim_mult)}: expected at most 8 integer multipliers of at most 64")
        if not self.dim_mult or any(int(m) < 1 for m in self.dim_mult):
            raise ValueError(f"dim_mult: expected positive channel multipliers, got {list(self.dim_mult)}")
        if len(self.temperal_downsample) < len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample: needs one flag per downsampling stage "
                             f"({len(self.dim_mult) - 1}), got {list(self.temperal_downsample)}")
        patch = self.patch_size or 1
        for name, channels in (("in_channels", self.in_channels), ("out_channels", self.out_channels)):
            if channels % (patch * patch):
                raise ValueError(f"{name}={channels} is not a multiple of patch_size**2 = {patch * patch}")
        if self.scale_factor_temporal is not None and self.scale_factor_temporal != self.temporal_factor:
            raise ValueError(f"config: scale_factor_temporal={self.scale_factor_temporal} but "
                             f"temperal_downsample={list(self.temperal_downsample)} downsamples time by "
                             f"{self.temporal_factor}; set scale_factor_temporal to {self.temporal_factor}")
        if self.scale_factor_spatial is not None and self.scale_factor_spatial != self.spatial_factor:
            raise ValueError(f"config: scale_factor_spatial={self.scale_factor_spatial} but dim_mult "
                             f"{list(self.dim_mult)} with patch_size={self.patch_size} downsamples space by "
                             f"{self.spatial_factor}; set scale_factor_spatial to {self.spatial_factor}")

    @property
    def num_stages(self) -> int:
        return len(self.dim_mult)

    @property
    def temporal_flags(self) -> tuple:
        """Whether stage i halves time, for the stages that downsample (all but the last)."""
        return tuple(bool(f) for f in self.temperal_downsample[:self.num_stages - 1])

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_flags)

    @property
    def spatial_factor(self) -> int:
        return (self.patch_size or 1) * 2 ** (self.num_stages - 1)

    @property
    def video_channels(self) -> int:
        return self.in_channels // (self.patch_size or 1) ** 2

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "WanVAEConfig":
        """Reads a diffusers config dict; keys starting with '_' (class name, versions) are
        metadata.  Any other unknown key is an error: silently ignoring a field would build a
        different network than the weights were trained in."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in fields and not k.startswith("_"))
        if unknown:
            raise ValueError(f"config: unknown AutoencoderKLWan fields {unknown}; known: {sorted(fields)}")
        return cls(**{k: v for k, v in d.items() if k in fields})


# ----------------------------------------------------------------------------- building blocks

def _can_overwrite(*tensors: torch.Tensor) -> bool:
    """True when in-place updates cannot corrupt autograd: nothing is being recorded."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class RMSNorm(nn.Module):
    """Wan's RMS_norm: F.normalize over channels (dim 1) * sqrt(C) * gamma, optionally followed
    by SiLU (the only way the residual blocks and heads use it).

    Statistics are computed in fp32 (or fp64 for fp64 input).  Without autograd the result is
    built in one scratch tensor (or in x itself when ``overwrite=True``) with in-place ops.
    """

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor, silu: bool = False, overwrite: bool = False) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        gain = self.gamma * self.scale                                   # (C, 1, 1[, 1])
        if not _can_overwrite(x, gain) or torch.compiler.is_compiling():  # compile: no out= into a view
            inv_norm = x.to(acc).square().sum(1, keepdim=True).clamp_min(_NORM_EPS_SQUARED).rsqrt()
            y = x * inv_norm.to(x.dtype) * gain.to(x.dtype)
            return F.silu(y) if silu else y
        if x.dtype == acc:
            sq = x * x
        else:
            sq = x.to(acc)
            sq.mul_(sq)
        inv_norm = sq.sum(1, keepdim=True).clamp_min_(_NORM_EPS_SQUARED).rsqrt_()   # (B, 1, ...)
        out = sq if sq.dtype == x.dtype else (x if overwrite else torch.empty_like(x))
        torch.mul(x, inv_norm.to(x.dtype), out=out)
        out.mul_(gain.to(x.dtype))
        return F.silu(out, inplace=True) if silu else out


def _frames_as_batch(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Applies a 2-D module to every frame: (B, C, T, H, W) -> (B, C', T, H', W')."""
    B, C, T, H, W = x.shape
    y = module(x.transpose(1, 2).reshape(B * T, C, H, W))               # (B*T, C', H', W')
    return y.view(B, T, *y.shape[1:]).transpose(1, 2)


class ResidualBlock(nn.Module):
    """x + conv2(drop(silu(norm2(conv1(silu(norm1(x))))))), with a 1x1x1 conv on the shortcut
    when the channel count changes."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None, first_chunk: bool = False):
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x, cache)
        h = self.conv1(self.norm1(x, silu=True), cache)                  # (B, out, T, H, W)
        h = self.dropout(self.norm2(h, silu=True, overwrite=True))
        h = self.conv2(h, cache)
        return h.add_(shortcut) if _can_overwrite(h, shortcut) else h + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no temporal mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None, first_chunk: bool = False):
        B, C, T, H, W = x.shape
        frames = x.transpose(1, 2).reshape(B * T, C, H, W)               # (B*T, C, H, W)
        qkv = self.to_qkv(self.norm(frames))                             # (B*T, 3C, H, W)
        # channels last and contiguous: the fused (flash) SDPA kernels need unit stride along C;
        # the fallback materialises the (HW x HW) scores, 4 GB per 1080p latent frame
        qkv = qkv.flatten(2).transpose(1, 2).contiguous().unsqueeze(1)   # (B*T, 1, HW, 3C)
        q, k, v = qkv.chunk(3, dim=-1)                                   # (B*T, 1, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v)                    # (B*T, 1, HW, C)
        out = self.proj(out.squeeze(1).transpose(1, 2).reshape(B * T, C, H, W))
        return x + out.view(B, T, C, H, W).transpose(1, 2)


class Resample(nn.Module):
    """Wan's Resample: 2x spatial down/up sampling of every frame, plus (``*3d`` modes) 2x
    temporal down/up sampling by a (3, 1, 1) causal conv.

    Wan's first chunk is special in time, and that is written out here (the CausalConv3d
    interface only knows "history or zeros"):
      * downsample3d: frame 0 passes through unchanged; every later pair of frames (2i-1, 2i)
        becomes one frame by a stride-2 conv over (2i-2, 2i-1, 2i).  So frame 0 is the history
        of that conv for frames 1, 2, ... .
      * upsample3d: frame 0 gives one output frame (no time conv); every later frame gives two
        by a conv to 2C channels, interleaved as (even, odd) frames.  That conv's history
        starts with zeros at frame 1, i.e. frame 0 is never part of it.
    With these rules every chunk plan (first chunk 1 + 2m frames for downsampling) gives the
    whole-clip result, which is also what diffusers computes chunk by chunk.
    """

    def __init__(self, dim: int, mode: str, upsample_out_dim: Optional[int] = None):
        super().__init__()
        if mode not in ("downsample2d", "downsample3d", "upsample2d", "upsample3d"):
            raise ValueError(f"mode={mode!r}: expected down/upsample 2d/3d")
        self.mode = mode
        if mode.startswith("downsample"):
            # Wan pads one zero row/column at the bottom/right before the stride-2 conv.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            out_dim = dim // 2 if upsample_out_dim is None else upsample_out_dim
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, out_dim, 3, padding=1))
        if mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        else:
            self.time_conv = None

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None, first_chunk: bool = False):
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache, first_chunk)
        x = _frames_as_batch(x, self.resample)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache, first_chunk)
        return x

    def _halve_frames(self, x, cache, first_chunk):
        if not first_chunk:
            return self.time_conv(x, cache)
        # Frame 0 passes through and is the history of the stride-2 conv.  Feeding the conv
        # (placeholder, frame 0, frame 1, ...) and dropping the placeholder's output gives it
        # exactly that history through its own cache entry, and through any wrapper (LoRA).
        y = self.time_conv(torch.cat([torch.zeros_like(x[:, :, :1]), x], dim=2), cache)
        return torch.cat([x[:, :, :1], y[:, :, 1:]], dim=2)

    def _double_frames(self, x, cache, first_chunk):
        head = None
        if first_chunk:
            head, x = x[:, :, :1], x[:, :, 1:]
            if x.shape[2] == 0:
                return head
        B, C, T, H, W = x.shape
        y = self.time_conv(x, cache)                                     # (B, 2C, T, H, W)
        y = y.view(B, 2, C, T, H, W).permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * T, H, W)
        return y if head is None else torch.cat([head, y], dim=2)


class AvgDown3D(nn.Module):
    """Wan 2.2 shortcut: space-to-channel (factor_t x factor_s x factor_s) then the mean over
    groups of channels.  Time is padded in front with zeros to a multiple of factor_t (only the
    first chunk, 1 + 2m frames, needs it), which keeps it chunk-plan invariant."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        factor = factor_t * factor_s * factor_s
        if in_channels * factor % out_channels:
            raise ValueError(f"AvgDown3D: in_channels ({in_channels}) times the downsampling factor ({factor}) "
                             f"must be divisible by out_channels ({out_channels})")
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        self.group_size = in_channels * factor // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))
        B, C, T, H, W = x.shape
        x = x.view(B, C, T // ft, ft, H // fs, fs, W // fs, fs)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)                            # (B, C, ft, fs, fs, T', H', W')
        x = x.reshape(B, self.out_channels, self.group_size, T // ft, H // fs, W // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Wan 2.2 shortcut, the inverse of AvgDown3D: repeat channels, then channel-to-space.  The
    first chunk drops its first factor_t - 1 frames (frame 0 yields one frame, as in Resample)."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        factor = factor_t * factor_s * factor_s
        if out_channels * factor % in_channels:
            raise ValueError(f"DupUp3D: out_channels ({out_channels}) times the upsampling factor ({factor}) "
                             f"must be divisible by in_channels ({in_channels})")
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        self.repeats = out_channels * factor // in_channels

    def forward(self, x: torch.Tensor, first_chunk: bool = False) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        B, _, T, H, W = x.shape
        x = x.repeat_interleave(self.repeats, dim=1)
        x = x.view(B, self.out_channels, ft, fs, fs, T, H, W)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)                            # (B, C, T, ft, H, fs, W, fs)
        x = x.reshape(B, self.out_channels, T * ft, H * fs, W * fs)
        return x[:, :, ft - 1:] if first_chunk else x


class MidBlock(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None, first_chunk: bool = False):
        x = self.resnets[0](x, cache)
        x = self.attentions[0](x)
        return self.resnets[1](x, cache)


class ResidualDownBlock(nn.Module):
    """Wan 2.2 encoder stage: residual blocks + Resample, plus an AvgDown3D shortcut."""

    def __init__(self, in_dim, out_dim, dropout, num_res_blocks, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2 if down else 1)
        self.resnets = nn.ModuleList(
            [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_res_blocks)])
        self.downsampler = Resample(out_dim, "downsample3d" if temporal else "downsample2d") if down else None

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None, first_chunk: bool = False):
        shortcut = self.avg_shortcut(x)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsampler is not None:
            x = self.downsampler(x, cache, first_chunk)
        return x + shortcut


class UpBlock(nn.Module):
    """Wan 2.1 decoder stage: num_res_blocks + 1 residual blocks, then an optional Resample."""

    def __init__(self, in_dim, out_dim, dropout, num_res_blocks, upsample_mode: Optional[str]):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_res_blocks + 1)])
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)]) if upsample_mode else None

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None, first_chunk: bool = False):
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache, first_chunk)
        return x


class ResidualUpBlock(nn.Module):
    """Wan 2.2 decoder stage: residual blocks + Resample (keeping out_dim), plus a DupUp3D shortcut."""

    def __init__(self, in_dim, out_dim, dropout, num_res_blocks, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2) if up else None
        self.resnets = nn.ModuleList(
            [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_res_blocks + 1)])
        self.upsampler = (Resample(out_dim, "upsample3d" if temporal else "upsample2d", upsample_out_dim=out_dim)
                          if up else None)

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None, first_chunk: bool = False):
        shortcut = None if self.avg_shortcut is None else self.avg_shortcut(x, first_chunk)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsampler is not None:
            x = self.upsampler(x, cache, first_chunk)
        return x if shortcut is None else x + shortcut


def _frames_seen(module: nn.Module, cache: Optional[StreamCache]) -> int:
    """Input frames the encoder or decoder ``module`` has streamed through ``cache`` (0: the next
    chunk is the first)."""
    seen = None if cache is None else cache.get(module)
    return 0 if seen is None else seen


def _advance_stream(module: nn.Module, cache: Optional[StreamCache], frames: int) -> None:
    # The stream position lives in the cache under the encoder/decoder itself, not under its
    # conv_in: LoRA wraps conv_in, and the cache entries belong to the wrapped layer.  It is a
    # Python int (a frame count known from shapes), not a tensor: reading a tensor back would
    # be a .item() and a graph break under torch.compile.
    if cache is not None:
        cache.set(module, _frames_seen(module, cache) + frames)


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
    lateral connections tap.
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
        first_chunk = _frames_seen(self, cache) == 0
        _advance_stream(self, cache, x.shape[2])
        x = self.conv_in(x, cache)
        for index, block in enumerate(self.down_blocks):
            x = block(x, cache, first_chunk)
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

    def spatial_part(self, x: torch.Tensor, cache: Optional[StreamCache], first_chunk: bool) -> torch.Tensor:
        for block in self.up_blocks:
            x = block(x, cache, first_chunk)
        return self.conv_out(self.norm_out(x, silu=True, overwrite=True), cache)

    def forward(self, z: torch.Tensor, cache: Optional[StreamCache] = None) -> torch.Tensor:
        first_chunk = _frames_seen(self, cache) == 0
        _advance_stream(self, cache, z.shape[2])
        return self.spatial_part(self.latent_part(z, cache), cache, first_chunk)


# ----------------------------------------------------------------------------- helpers

def patchify(x: torch.Tensor, patch_size: Optional[int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p), channel order (c, p_w, p_h) as diffusers."""
    if not patch_size or patch_size == 1:
        return x
    p = patch_size
    B, C, T, H, W = x.shape
    x = x.view(B, C, T, H // p, p, W // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(B, C * p * p, T, H // p, W // p)


def unpatchify(x: torch.Tensor, patch_size: Optional[int]) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    if not patch_size or patch_size == 1:
        return x
    p = patch_size
    B, Cpp, T, H, W = x.shape
    x = x.view(B, Cpp // (p * p), p, p, T, H, W).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(B, Cpp // (p * p), T, H * p, W * p)


def fit_frames(video: torch.Tensor, mode: str = "pad", temporal_factor: int = 4) -> torch.Tensor:
    """Makes T = 1 + temporal_factor * k: ``mode="pad"`` repeats the last frame up to the next
    such count, ``mode="trim"`` keeps the first frames up to the previous one.  video: (B, C, T, H, W)."""
    T = video.shape[2]
    if mode == "pad":
        want = 1 + -(-(T - 1) // temporal_factor) * temporal_factor
        return torch.cat([video, video[:, :, -1:].expand(-1, -1, want - T, -1, -1)], dim=2) if want > T else video
    if mode == "trim":
        return video[:, :, :1 + (T - 1) // temporal_factor * temporal_factor]
    raise ValueError(f"mode={mode!r}: expected 'pad' or 'trim'")


@dataclasses.dataclass
class LatentDistribution:
    """Diagonal Gaussian over the latent, (B, z_dim, T', h, w) each; logvar clamped to [-30, 20]."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "LatentDistribution":
        mean, logvar = moments.float().chunk(2, dim=1)
        return cls(mean, logvar.clamp(*LOGVAR_RANGE))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over all but the batch axis, (B,)."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


def _backbone_name(key: str) -> Optional[str]:
    """The diffusers name of a state-dict key of a (possibly LoRA-injected) model; None for
    LoRA adapter weights."""
    if ".lora_" in key:
        return None
    return key.replace(".base_layer.", ".")


def _chunks(total: int, first: int, size: Optional[int]) -> list[int]:
    """Chunk lengths covering ``total``: ``first``, then ``size`` at a time (None: all at once)."""
    if size is None or total <= first:
        return [total]
    plan = [first]
    while sum(plan) < total:
        plan.append(min(size, total - sum(plan)))
    return plan


def _stream_cache(plan: list[int]) -> Optional[StreamCache]:
    """A cache for a stream of several chunks; None for a single chunk, which then keeps no
    history frames (they would only be needed by a next chunk)."""
    return StreamCache() if len(plan) > 1 else None


def _split(x: torch.Tensor, plan: list[int]) -> tuple[torch.Tensor, ...]:
    """Consecutive time chunks (dim 2) of x with the lengths in ``plan``."""
    return torch.split(x, plan, dim=2)


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Origins of the fewest tiles of ``tile`` pixels that cover ``length`` with neighbours sharing
    at least ``overlap`` pixels, spread evenly."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _blend_weights(start: int, size: int, length: int, margin: int, ramp: int) -> torch.Tensor:
    """1-D weights of a tile covering [start, start + size) of an axis of ``length``.  On a side
    that borders another tile: 0 over the ``margin`` pixels at the edge (they saw the tile's zero
    padding), then a linear ramp over ``ramp`` pixels; 1 elsewhere and at the frame border."""
    w = torch.ones(size)
    rising = torch.cat([torch.zeros(margin), (torch.arange(ramp) + 0.5) / ramp])
    n = margin + ramp
    if start > 0:
        w[:n] = rising
    if start + size < length:
        w[size - n:] = torch.minimum(w[size - n:], rising.flip(0))
    return w


# ----------------------------------------------------------------------------- the VAE

class WanVAE(nn.Module):
    """Wan causal video VAE with diffusers-compatible weights (see the module docstring)."""

    def __init__(self, config: Optional[WanVAEConfig] = None, **fields):
        super().__init__()
        if config is None:
            config = WanVAEConfig(**fields)
        elif fields:
            config = dataclasses.replace(config, **fields)
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    # -- shapes and checks ------------------------------------------------------------------

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    def receptive_field(self, part: str = "decoder") -> float:
        """Spatial receptive-field radius, in latent pixels, of the part of the encoder or decoder
        that tiling splits (the convolutions above latent resolution; the mid block, with its
        frame-global attention, always runs on whole frames).  math.inf when attn_scales puts
        attention into the encoder's down blocks."""
        if part not in ("encoder", "decoder"):
            raise ValueError(f"part={part!r}: expected 'encoder' or 'decoder'")
        return (self.encoder if part == "encoder" else self.decoder).spatial_radius

    def check_video(self, video: torch.Tensor) -> None:
        """The input checks of encode (type, layout, frame count, size, value range), also callable
        on their own: under torch.compile encode skips the value-range check (it reads the data),
        so run this outside the compiled function to keep it."""
        self._check_video(video)

    def _check_video(self, video: torch.Tensor) -> None:
        if not isinstance(video, torch.Tensor):
            raise TypeError(f"video: expected a torch.Tensor, got {type(video).__name__}")
        if not video.is_floating_point():
            raise TypeError(f"video: expected floating point values in [-1, 1], got dtype {video.dtype} "
                            f"(for uint8 frames use video.float() / 127.5 - 1)")
        if video.dim() != 5:
            raise ValueError(f"video: expected (B, C, T, H, W), got shape {tuple(video.shape)}"
                             + (" (add a batch axis with video[None])" if video.dim() == 4 else ""))
        B, C, T, H, W = video.shape
        if C != self.config.video_channels:
            raise ValueError(f"video: has {C} channels, the VAE expects {self.config.video_channels} "
                             f"(layout (B, C, T, H, W); for (B, T, C, H, W) use video.transpose(1, 2))")
        tf = self.temporal_factor
        if (T - 1) % tf:
            raise ValueError(f"video: {T} frames, but the encoder needs 1 + {tf}k frames (1, {1 + tf}, "
                             f"{1 + 2 * tf}, ...); pyratok.models.fit_frames(video, 'pad', {tf}) repeats the last "
                             f"frame up to {1 + -(-(T - 1) // tf) * tf}, fit_frames(video, 'trim', {tf}) keeps the first "
                             f"{1 + (T - 1) // tf * tf}")
        sf = self.spatial_factor
        if H % sf or W % sf:
            raise ValueError(f"video: height and width must be multiples of {sf}, got {H}x{W}")
        if torch.compiler.is_compiling():  # the range check reads data: run check_video outside the graph
            return
        lo, hi = video.min().item(), video.max().item()
        if lo < -1.001 or hi > 1.001:
            warnings.warn(f"video: values span [{lo:.3g}, {hi:.3g}] but the VAE expects [-1, 1] "
                          f"(frames in [0, 255] or [0, 1] must be mapped with x / 127.5 - 1 or 2x - 1)",
                          stacklevel=3)

    def _check_latent(self, latent: torch.Tensor) -> None:
        if not isinstance(latent, torch.Tensor) or latent.dim() != 5:
            raise ValueError(f"latent: expected (B, z_dim, T, h, w), got shape {tuple(getattr(latent, 'shape', ()))}")
        if latent.shape[1] != self.config.z_dim:
            raise ValueError(f"latent: has {latent.shape[1]} channels, the VAE has z_dim={self.config.z_dim}")
        if not latent.is_floating_point():
            raise TypeError(f"latent: expected a floating point tensor, got {latent.dtype}")

    def _check_tiling(self, tile: int, overlap: Optional[int], part: str) -> tuple[int, int]:
        """-> (overlap, margin).  Exact tiling needs margin >= the receptive-field radius R, i.e.
        overlap >= 2 * ceil(R) + 1; the default is 2 * ceil(R) + 2 (a 2-latent-pixel ramp)."""
        if not isinstance(tile, int) or tile < 4:
            raise ValueError(f"tile={tile!r}: expected an int >= 4 (latent pixels)")
        radius = self.receptive_field(part)
        needed = 2 * math.ceil(radius) + 1 if math.isfinite(radius) else None
        if overlap is None:
            overlap = needed + 1 if needed is not None and needed + 1 < tile else tile // 2
        if not isinstance(overlap, int) or not 0 < overlap < tile:
            raise ValueError(f"overlap={overlap!r}: expected an int in [1, tile) latent pixels (tile={tile})")
        if needed is None or overlap < needed:
            warnings.warn(f"tile overlap {overlap} is below 2 x the {part}'s receptive-field radius + 1 "
                          f"({needed if needed is not None else 'unbounded: attention in the down blocks'}); tiles "
                          f"differ from the untiled result near their edges (the blend hides seams, but is not "
                          f"exact); use a larger tile and overlap for exact tiling", stacklevel=3)
            return overlap, (overlap - 1) // 2
        return overlap, math.ceil(radius)

    # -- dtype ---------------------------------------------------------------------------------

    @staticmethod
    def _dtype(module: nn.Module) -> torch.dtype:
        return next(p.dtype for p in module.parameters() if p.is_floating_point())

    def set_precision(self, encoder: torch.dtype = torch.float32, decoder: torch.dtype = torch.float32) -> "WanVAE":
        """Casts the encoder (+ quant_conv) and decoder (+ post_quant_conv) weights; see the
        precision policy in the module docstring."""
        for name, dtype in (("encoder", encoder), ("decoder", decoder)):
            if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                raise ValueError(f"{name}={dtype}: expected torch.float32, bfloat16, float16 or float64")
        self.encoder.to(encoder)
        self.quant_conv.to(encoder)
        self.decoder.to(decoder)
        self.post_quant_conv.to(decoder)
        return self

    # -- encode --------------------------------------------------------------------------------

    def encode_stream(self, chunk: torch.Tensor, cache: Optional[StreamCache], features: Optional[list] = None
                      ) -> LatentDistribution:
        """Encodes the next chunk of a clip: the first chunk has 1 + 4m frames, later ones 4m
        (4 = temporal_factor); one ``cache`` per clip (None: the chunk is the whole clip, and
        nothing is kept for a next one).  Returns the chunk's latent frames."""
        tf, first = self.temporal_factor, _frames_seen(self.encoder, cache) == 0
        if (chunk.shape[2] - first) % tf or chunk.shape[2] < 1:
            raise ValueError(f"chunk: {chunk.shape[2]} frames; the first chunk of a clip needs 1 + {tf}m frames, "
                             f"later ones {tf}m (this is {'the first' if first else 'a later'} chunk)")
        x = patchify(chunk.to(self._dtype(self.encoder)), self.config.patch_size)
        return LatentDistribution.from_moments(self.quant_conv(self.encoder(x, cache, features), cache))

    def encode(self, video: torch.Tensor, chunk_frames: Optional[int] = -1, tile: Optional[int] = None,
               overlap: Optional[int] = None, return_dict: Optional[bool] = None):
        """video (B, C, T, H, W) in [-1, 1], T = 1 + 4k -> latent distribution (B, z_dim, 1 + k, H/8, W/8).

        chunk_frames: frames per encoder pass after the first frame (a multiple of 4); -1 (default)
        uses 4, Wan's plan; None encodes the whole clip in one pass (fastest, most memory).
        tile / overlap: spatial tiling in latent pixels (module docstring); overlap None gives
        exact tiling (2 x receptive-field radius + 2).
        return_dict: None (default) returns the :class:`LatentDistribution`; True / False return
        diffusers' ``AutoencoderKLOutput(latent_dist=...)`` / ``(latent_dist,)`` as
        ``AutoencoderKLWan.encode`` does (pyratok.interop.diffusers).
        """
        from pyratok.interop.diffusers import AutoencoderKLOutput, as_output

        return as_output(self._encode(video, chunk_frames, tile, overlap), AutoencoderKLOutput, return_dict)

    def _encode(self, video, chunk_frames, tile, overlap) -> LatentDistribution:
        self._check_video(video)
        plan = self._encode_plan(video.shape[2], chunk_frames)
        if tile is None:
            return self._encode_untiled(video, plan, None)
        overlap, margin = self._check_tiling(tile, overlap, "encoder")
        dtype, sf, patch = self._dtype(self.encoder), self.spatial_factor, self.config.patch_size

        def spatial_part(video_tile):
            cache = _stream_cache(plan)
            return torch.cat([self.encoder.spatial_part(patchify(chunk.to(dtype), patch), cache)
                              for chunk in _split(video_tile, plan)], dim=2)

        hidden = self._tiled(video, sf, tile, overlap, margin, spatial_part).to(dtype)   # (B, C, T', h, w)
        return self._encode_latent_part(hidden, plan)

    def _encode_latent_part(self, hidden: torch.Tensor, plan: list[int]) -> LatentDistribution:
        """The encoder's latent-resolution part (mid block, head, quant_conv) over the whole frame,
        streamed with the time plan of the tiled part that made ``hidden``."""
        cache = _stream_cache(plan)
        latent_plan = [1 + (n - 1) // self.temporal_factor for n in plan[:1]] + [n // self.temporal_factor
                                                                                for n in plan[1:]]
        moments = [self.quant_conv(self.encoder.latent_part(chunk, cache), cache) for chunk in _split(hidden, latent_plan)]
        return LatentDistribution.from_moments(torch.cat(moments, dim=2))

    def encoder_features(self, video: torch.Tensor, chunk_frames: Optional[int] = -1, tile: Optional[int] = None,
                         overlap: Optional[int] = None) -> tuple[LatentDistribution, list[torch.Tensor]]:
        """The latent distribution and the per-stage encoder feature maps LaPQ taps: entry i is the
        output of encoder stage i (after its downsampler), (B, base_dim*dim_mult[i], T_i, H_i, W_i).
        chunk_frames, tile and overlap as in ``encode``; with exact tiling (overlap None) every
        feature map, each blended at its own resolution, equals the untiled one."""
        self._check_video(video)
        plan = self._encode_plan(video.shape[2], chunk_frames)
        if tile is None:
            features: list[torch.Tensor] = []
            dist = self._encode_untiled(video, plan, features)
            return dist, features
        overlap, margin = self._check_tiling(tile, overlap, "encoder")
        features = [f.to(self._dtype(self.encoder)) for f in self._tiled_many(
            video, self.spatial_factor, tile, overlap, margin, lambda piece: self._encoder_taps(piece, plan))]
        return self._encode_latent_part(features[-1], plan), features

    def encoder_taps(self, video: torch.Tensor, chunk_frames: Optional[int] = -1) -> list[torch.Tensor]:
        """The per-stage feature maps of ``encoder_features`` alone: the encoder's convolutional
        part, without the mid block, the head and the latent."""
        self._check_video(video)
        return self._encoder_taps(video, self._encode_plan(video.shape[2], chunk_frames))

    def _encoder_taps(self, video: torch.Tensor, plan: list[int]) -> list[torch.Tensor]:
        dtype, patch = self._dtype(self.encoder), self.config.patch_size
        cache, per_chunk = _stream_cache(plan), []
        for chunk in _split(video, plan):
            per_chunk.append([])
            self.encoder.spatial_part(patchify(chunk.to(dtype), patch), cache, per_chunk[-1])
        return [torch.cat(level, dim=2) for level in zip(*per_chunk)]

    def _encode_plan(self, frames: int, chunk_frames: Optional[int]) -> list[int]:
        if chunk_frames == -1:
            # Wan's plan (1, 4, 4, ...) is a Python loop over the frame count, which torch.compile
            # would unroll and recompile for every clip length; compiled, the default is the whole
            # clip in one pass (the same result: every chunk plan gives the whole-clip output)
            chunk_frames = None if torch.compiler.is_compiling() else self.temporal_factor
        if chunk_frames is not None and (not isinstance(chunk_frames, int) or chunk_frames < 1
                                         or chunk_frames % self.temporal_factor):
            raise ValueError(f"chunk_frames={chunk_frames!r}: expected None or a positive multiple of "
                             f"{self.temporal_factor}")
        return _chunks(frames, 1, chunk_frames)

    def _encode_untiled(self, video: torch.Tensor, plan: list[int], features: Optional[list]) -> LatentDistribution:
        cache, dists, taps = _stream_cache(plan), [], []
        for chunk in _split(video, plan):
            taps.append(None if features is None else [])
            dists.append(self.encode_stream(chunk, cache, taps[-1]))
        if features is not None:
            features.extend(torch.cat(level, dim=2) for level in zip(*taps))
        return LatentDistribution(torch.cat([d.mean for d in dists], 2), torch.cat([d.logvar for d in dists], 2))

    # -- decode --------------------------------------------------------------------------------

    def decode_stream(self, chunk: torch.Tensor, cache: Optional[StreamCache]) -> torch.Tensor:
        """Decodes the next latent frames of a clip (any count); one ``cache`` per clip (None:
        the chunk is the whole clip).  The
        first chunk's frame 0 gives one video frame, every other latent frame temporal_factor."""
        z = chunk.to(self._dtype(self.decoder))
        x = self.decoder(self.post_quant_conv(z, cache), cache)
        return unpatchify(x, self.config.patch_size).clamp_(-1.0, 1.0)

    def decode(self, latent: torch.Tensor, chunk_frames: Optional[int] = 1, tile: Optional[int] = None,
               overlap: Optional[int] = None, return_dict: Optional[bool] = None):
        """latent (B, z_dim, T, h, w) -> video (B, C, 1 + 4(T-1), 8h, 8w) in [-1, 1].

        chunk_frames: latent frames per decoder pass (default 1, Wan's plan; None: all at once).
        tile / overlap: spatial tiling in latent pixels (module docstring); overlap None gives
        exact tiling (2 x receptive-field radius + 2).
        return_dict: None (default) returns the video tensor; True / False return diffusers'
        ``DecoderOutput(sample=...)`` / ``(video,)`` as ``AutoencoderKLWan.decode`` does.
        """
        from pyratok.interop.diffusers import DecoderOutput, as_output

        return as_output(self._decode(latent, chunk_frames, tile, overlap), DecoderOutput, return_dict)

    def _decode(self, latent, chunk_frames, tile, overlap) -> torch.Tensor:
        self._check_latent(latent)
        if chunk_frames is not None and (not isinstance(chunk_frames, int) or chunk_frames < 1):
            raise ValueError(f"chunk_frames={chunk_frames!r}: expected None or a positive int")
        plan = _chunks(latent.shape[2], chunk_frames or latent.shape[2], chunk_frames)
        if tile is None:
            cache = _stream_cache(plan)
            return torch.cat([self.decode_stream(chunk, cache) for chunk in _split(latent, plan)], dim=2)
        overlap, margin = self._check_tiling(tile, overlap, "decoder")
        dtype, patch = self._dtype(self.decoder), self.config.patch_size
        cache = _stream_cache(plan)
        hidden = torch.cat([self.decoder.latent_part(self.post_quant_conv(chunk.to(dtype), cache), cache)
                            for chunk in _split(latent, plan)], dim=2)                   # (B, C, T, h, w)

        def spatial_part(hidden_tile):
            cache = _stream_cache(plan)
            return torch.cat([unpatchify(self.decoder.spatial_part(chunk, cache, first_chunk=i == 0), patch)
                              for i, chunk in enumerate(_split(hidden_tile, plan))], dim=2)

        return self._tiled(hidden, 1, tile, overlap, margin, spatial_part).clamp_(-1.0, 1.0)

    @staticmethod
    def _tiled(x: torch.Tensor, in_scale: int, tile: int, overlap: int, margin: int, run) -> torch.Tensor:
        """Runs ``run`` on overlapping spatial tiles of x (B, C, T, H * in_scale, W * in_scale) and
        blends the results (B, C', T', H * s, W * s, s read off the first tile); H, W count latent
        pixels.

        Neighbouring tiles share at least ``overlap`` latent pixels; there each tile's outer
        ``margin`` pixels get weight 0 and the rest ramps linearly, and the weights are
        normalised to sum to one.  Accumulates in fp32, returns the dtype ``run`` returns.
        """
        return WanVAE._tiled_many(x, in_scale, tile, overlap, margin, lambda piece: [run(piece)])[0]

    @staticmethod
    def _tiled_many(x: torch.Tensor, in_scale: int, tile: int, overlap: int, margin: int, run) -> list[torch.Tensor]:
        """``_tiled`` for a ``run`` that returns a list of maps, each at its own whole number of
        output pixels per latent pixel (read off the first tile); each is blended at its scale."""
        H, W = x.shape[-2] // in_scale, x.shape[-1] // in_scale
        outs = weights = scales = None
        for top in _tile_starts(H, tile, overlap):
            for left in _tile_starts(W, tile, overlap):
                th, tw = min(tile, H), min(tile, W)
                pieces = run(x[..., top * in_scale:(top + th) * in_scale, left * in_scale:(left + tw) * in_scale])
                if outs is None:
                    scales = [p.shape[-1] // tw for p in pieces]
                    outs = [p.new_zeros(*p.shape[:-2], H * s, W * s, dtype=torch.float32) for p, s in zip(pieces, scales)]
                    weights = [torch.zeros(H * s, W * s, device=x.device) for s in scales]
                for piece, out, weight, s in zip(pieces, outs, weights, scales):
                    if piece.shape[-2:] != (th * s, tw * s):
                        raise AssertionError(f"tiled part returned {tuple(piece.shape[-2:])} for a {th}x{tw} tile")
                    ramp = (overlap - 2 * margin) * s
                    w = (_blend_weights(top * s, th * s, H * s, margin * s, ramp)[:, None]
                         * _blend_weights(left * s, tw * s, W * s, margin * s, ramp)[None, :]).to(x.device)
                    rows, cols = slice(top * s, (top + th) * s), slice(left * s, (left + tw) * s)
                    out[..., rows, cols] += piece.float() * w
                    weight[rows, cols] += w
        return [out.div_(weight).to(piece.dtype) for out, weight, piece in zip(outs, weights, pieces)]

    def forward(self, video: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None,
                return_dict: Optional[bool] = None, sample_posterior: Optional[bool] = None):
        """Reconstruction: decode(encode(video)), with the posterior mean unless ``sample``
        (diffusers' name ``sample_posterior`` is accepted too); ``return_dict`` as in ``decode``."""
        dist = self._encode(video, -1, None, None)
        sample = sample if sample_posterior is None else sample_posterior
        return self.decode(dist.sample(generator) if sample else dist.mode(), return_dict=return_dict)

    # -- diffusers interop -------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The decoder's parameter dtype (diffusers pipelines cast latents to ``vae.dtype``)."""
        return self._dtype(self.decoder)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def from_diffusers(cls, model) -> "WanVAE":
        """A WanVAE with the config and weights of a diffusers ``AutoencoderKLWan`` (in memory)."""
        from pyratok.interop.diffusers import wan_vae_from_diffusers

        return wan_vae_from_diffusers(model)

    def to_diffusers(self):
        """A diffusers ``AutoencoderKLWan`` with this model's config and backbone weights."""
        from pyratok.interop.diffusers import wan_vae_to_diffusers

        return wan_vae_to_diffusers(self)

    # -- latent normalisation ----------------------------------------------------------------------

    def _latent_stats(self, like: torch.Tensor):
        c = self.config
        if len(c.latents_mean) != c.z_dim or len(c.latents_std) != c.z_dim:
            raise ValueError(f"config: latents_mean/latents_std have {len(c.latents_mean)}/{len(c.latents_std)} "
                             f"entries, z_dim is {c.z_dim}")
        shape = (1, c.z_dim, 1, 1, 1)
        mean = torch.tensor(c.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(c.latents_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(z - latents_mean) / latents_std: the unit-scale latent Wan's diffusion models see."""
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(z)
        return z * std + mean

    # -- weights ---------------------------------------------------------------------------------

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict in diffusers' names, without LoRA adapters (merged adapters stay merged
        into the base weights)."""
        return {base: v for k, v in self.state_dict().items() if (base := _backbone_name(k)) is not None}

    def load_backbone_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Loads diffusers-named weights; missing, unexpected or mis-shaped keys are an error
        that lists them (LoRA adapters in the model are left as they are)."""
        own = {base: (k, v) for k, v in self.state_dict().items() if (base := _backbone_name(k)) is not None}
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k][1].shape)}"
                        for k in set(own) & set(state_dict) if state_dict[k].shape != own[k][1].shape)
        if missing or unexpected or shapes:
            raise ValueError("weights do not fit the config:"
                             + (f"\n  missing keys ({len(missing)}): {missing}" if missing else "")
                             + (f"\n  unexpected keys ({len(unexpected)}): {unexpected}" if unexpected else "")
                             + (f"\n  shape mismatches ({len(shapes)}): {shapes}" if shapes else ""))
        with torch.no_grad():
            for name, (_, tensor) in own.items():
                tensor.copy_(state_dict[name])

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: Optional[WanVAEConfig | dict] = None,
                        device: torch.device | str = "cpu") -> "WanVAE":
        """Loads a diffusers folder (config.json + diffusion_pytorch_model.safetensors, or a
        pipeline folder with a ``vae/`` subfolder) or an original Wan 2.1 checkpoint file
        (``.pth`` / ``.pt`` / ``.safetensors`` with Wan's key names; ``config`` defaults to Wan 2.1)."""
        from safetensors.torch import load_file

        from pyratok.models import wan_checkpoint

        path = os.fspath(path)
        if os.path.isdir(path):
            if not os.path.exists(os.path.join(path, CONFIG_NAME)) and os.path.isdir(os.path.join(path, "vae")):
                path = os.path.join(path, "vae")
            config_file, weights_file = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
            for f in (config_file, weights_file):
                if not os.path.exists(f):
                    raise FileNotFoundError(f"{f} not found; a diffusers VAE folder holds {CONFIG_NAME} and "
                                            f"{WEIGHTS_NAME} (found: {sorted(os.listdir(path))})")
            from pyratok.models.model_files import read_json_object

            try:
                file_config = WanVAEConfig.from_dict(read_json_object(config_file, "diffusers VAE config"))
            except TypeError as err:
                raise ValueError(f"{config_file}: {err}") from None
            if config is not None:
                raise ValueError("config: a diffusers folder carries its own config.json; pass config only "
                                 "with a single checkpoint file")
            model = cls(file_config)
            model.load_backbone_state_dict(load_file(weights_file))
            return model.to(device)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: neither a diffusers VAE folder nor a checkpoint file")
        if isinstance(config, dict):
            config = WanVAEConfig.from_dict(config)
        model = cls(config or WanVAEConfig())
        try:
            if path.endswith(".safetensors"):
                state = load_file(path)
            else:  # weights_only: tensors and plain containers, never other objects
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and safetensors errors come in several types
            raise ValueError(f"{path}: not a loadable checkpoint ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path}: not a VAE checkpoint (expected a dict of tensors, "
                             f"got {type(state).__name__})")
        if wan_checkpoint.is_wan_layout(state):
            state = wan_checkpoint.wan_to_diffusers(state, model.config)
        model.load_backbone_state_dict(state)
        return model.to(device)

    def save_pretrained(self, path: str | os.PathLike, dtype: Optional[torch.dtype] = None) -> None:
        """Writes a diffusers folder that ``AutoencoderKLWan.from_pretrained`` and
        :meth:`from_pretrained` both read.  LoRA adapters are not included (see save_lora).
        ``dtype`` stores the weights in that floating dtype (torch.float16 halves the file); they
        load back into the model's own dtype."""
        from safetensors.torch import save

        from pyratok.utils import atomic_write

        os.makedirs(path, exist_ok=True)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.backbone_state_dict().items()}
        with atomic_write(os.path.join(path, WEIGHTS_NAME)) as fh:   # temp file + rename, like every writer
            fh.write(save(state))
        with atomic_write(os.path.join(path, CONFIG_NAME), "w") as fh:
            json.dump({"_class_name": "AutoencoderKLWan", **self.config.to_dict()}, fh, indent=2)

    def save_wan_checkpoint(self, path: str | os.PathLike) -> None:
        """Writes the weights in the original Wan 2.1 ``.pth`` key layout."""
        from pyratok.models import wan_checkpoint

        torch.save(wan_checkpoint.diffusers_to_wan(self.backbone_state_dict(), self.config), os.fspath(path))

    # -- LoRA ----------------------------------------------------------------------------------

    def add_lora(self, rank: int = 16, alpha: float = 32, dropout: float = 0.0,
                 target: str = "encoder", adapter_name: str = "default") -> list[str]:
        """Adds LoRA (via peft) to every convolution under ``target`` ("encoder", "decoder" or "all")
        with B initialised to zero, and freezes every other weight.  Returns the adapted module names."""
        from pyratok.models.lora import add_lora

        return add_lora(self, self._conv_names(target), rank, alpha, dropout, adapter_name)

    def _conv_names(self, target: str) -> list[str]:
        prefixes = {"encoder": ("encoder.",), "decoder": ("decoder.",), "all": ("encoder.", "decoder.")}
        if target not in prefixes:
            raise ValueError(f"target={target!r}: expected 'encoder', 'decoder' or 'all'")
        return [name for name, m in self.named_modules()
                if isinstance(m, (CausalConv3d, nn.Conv2d)) and name.startswith(prefixes[target])
                and ".lora_" not in name and not name.endswith(".base_layer")]

    def merge_lora(self) -> None:
        from pyratok.models.lora import merge_lora

        merge_lora(self)

    def unmerge_lora(self) -> None:
        from pyratok.models.lora import unmerge_lora

        unmerge_lora(self)

    def save_lora(self, path: str | os.PathLike, adapter_name: str = "default") -> None:
        from pyratok.models.lora import save_lora

        save_lora(self, path, adapter_name)

    def load_lora(self, path: str | os.PathLike, adapter_name: str = "default") -> None:
        from pyratok.models.lora import load_lora

        load_lora(self, path, adapter_name)

