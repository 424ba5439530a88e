"""The blocks of Wan's causal video VAE: RMS norm, residual and attention blocks, the
space/time resampling layers, Wan 2.2's parameter-free shortcuts and the encoder/decoder stages.

Streaming.  Every block takes the clip's :class:`~pyratok.nn.StreamCache` (None: the chunk is
the whole clip).  The causal convolutions keep their history frames there, and the two blocks
that treat the first chunk of a clip specially (:class:`Resample`, :class:`DupUp3D`) find out
whether a chunk is the first from the frames the cache has counted for them
(:func:`starts_clip`); no flag is passed down.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pyratok.nn.causal_conv3d import CausalConv3d, StreamCache

# F.normalize divides by max(||x||, 1e-12); we clamp the squared norm the same way.
_NORM_EPS_SQUARED = 1e-24


def starts_clip(module: nn.Module, x: torch.Tensor, cache: Optional[StreamCache]) -> bool:
    """True when chunk ``x`` (B, C, T, H, W) holds the first frames of its clip for ``module``:
    without a cache the chunk is the whole clip; with one, ``module`` has not been fed any frame
    through it yet.  Counts x's frames for ``module`` in the cache, so a module calls it once
    per forward."""
    if cache is None:
        return True
    first = cache.frames_seen(module) == 0
    cache.add_frames(module, x.shape[2])
    return first


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

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None):
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x, cache)
        h = self.conv1(self.norm1(x, silu=True), cache)                  # (B, out, T, H, W)
        h = self.dropout(self.norm2(h, silu=True, overwrite=True))
        h = self.conv2(h, cache)
        return h.add_(shortcut) if _can_overwrite(h, shortcut) else h + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no temporal mixing).
    Keeps no stream state; ``cache`` is accepted (and unused) so that a run of blocks is called
    alike."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None):
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
    interface only knows "history or zeros"); whether a chunk is the first of its clip is read
    off the cache (:func:`starts_clip`):
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

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None):
        if self.time_conv is None:                                       # 2d: frame by frame, no stream state
            return _frames_as_batch(x, self.resample)
        first_chunk = starts_clip(self, x, cache)
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


def _channel_ratio(block: str, name: str, channels: int, kind: str, factor: int, other_name: str, other: int) -> int:
    """channels * factor / other for the Wan 2.2 shortcuts (AvgDown3D's group size, DupUp3D's
    repeats), which must divide evenly."""
    if channels * factor % other:
        raise ValueError(f"{block}: {name} ({channels}) times the {kind} factor ({factor}) "
                         f"must be divisible by {other_name} ({other})")
    return channels * factor // other


class AvgDown3D(nn.Module):
    """Wan 2.2 shortcut: space-to-channel (factor_t x factor_s x factor_s) then the mean over
    groups of channels.  Time is padded in front with zeros to a multiple of factor_t (only the
    first chunk, 1 + 2m frames, needs it), which keeps it chunk-plan invariant."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        self.group_size = _channel_ratio("AvgDown3D", "in_channels", in_channels, "downsampling",
                                         factor_t * factor_s * factor_s, "out_channels", out_channels)

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
    first chunk of a clip (:func:`starts_clip`) drops its first factor_t - 1 frames (frame 0
    yields one frame, as in Resample)."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        self.repeats = _channel_ratio("DupUp3D", "out_channels", out_channels, "upsampling",
                                      factor_t * factor_s * factor_s, "in_channels", in_channels)

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None) -> torch.Tensor:
        first_chunk = starts_clip(self, x, cache)
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

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None):
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

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None):
        shortcut = self.avg_shortcut(x)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsampler is not None:
            x = self.downsampler(x, cache)
        return x + shortcut


class UpBlock(nn.Module):
    """Wan 2.1 decoder stage: num_res_blocks + 1 residual blocks, then an optional Resample."""

    def __init__(self, in_dim, out_dim, dropout, num_res_blocks, upsample_mode: Optional[str]):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_res_blocks + 1)])
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)]) if upsample_mode else None

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None):
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
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

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None):
        shortcut = None if self.avg_shortcut is None else self.avg_shortcut(x, cache)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsampler is not None:
            x = self.upsampler(x, cache)
        return x if shortcut is None else x + shortcut
