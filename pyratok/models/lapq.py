"""LaPQ: Language-aligned Pyramidal Quantization (DESIGN.md §3, LaPQ).

L quantization blocks share one K-bit binary (lookup-free) codebook.  Level l works on a
spatial pyramid grid at the latent frame rate, coarse to fine (the last level at the latent
grid):

    r_0 = normalised latent mean                                   # (B, z, T, H, W)
    for l in 1..L:
        h   = in_proj(area_down(r_(l-1), grid_l)) + lateral_l(causal_pool(F^(l), grid_l))  # (B, d, t, h, w)
        h   = h + cross_attention(h, text)        (masked; skipped when text is off)
        h   = h + conv(frame_norm(h))
        z_l = to_bits(h)                                           # (B, K, t, h, w) bit logits
        c_l = binary_quantize(z_l)                                 # +-1, straight-through
        u_l = phi_l(upsample(c_l))                                 # (B, z, T, H, W)
        r_l = r_(l-1) - u_l ;  q_l = q_(l-1) + u_l
        text_l = text_head_l(sg(pool(e_t)))                        # (B, K) bit logits from the caption
    decoder input: q_L

Substeps (``substeps`` = S > 1, a capacity option of ours, not the paper's): a level picks its K
bits in S groups of K/S, like a residual quantizer inside the level.  Group 0 is z_l above; group s
comes from h + in_proj_s(area_down(r_(l-1) - phi_<s(upsample(c_<s)))) through a conv and to_bits of
its own, phi_<s being phi's slice over the earlier groups' input channels.  The level still adds
phi(upsample(c_l)) over all K bits, so token ids, ``dequantize`` and token files do not change, and
every operation stays per latent frame.

The lateral and text paths only choose the codes: ``codes_from_tokens`` + ``dequantize``
rebuild q_L exactly from the token ids alone, and ``dequantize(..., levels=l)`` from the first
l levels (coarse-to-fine, progressive decoding).

Causality: every operation here is per latent frame (1x1x1 and 1x3x3 convolutions, per-frame
group norms, per-position attention to the text), and encoder taps at a higher frame rate are
averaged over the causal VAE's frame groups ({0}, {1..r}, {r+1..2r}, ... with r input-rate
frames per latent frame: ``causal_pool``), never across them.  So the tokens of latent frame t
depend only on the input frames latent frame t covers and the ones before, an image gets the
first-frame tokens of any clip that starts with it, and streaming equals whole-clip encoding.

The text head (one per level) maps the frozen caption embedding, mean-pooled over its valid
tokens, to K bit logits: the language-alignment losses (pyratok.models.losses) train it to
predict a clip's code bits from its caption and pull the tokens toward that prediction.  ``level_grids`` gives every level's grid
(one function for the model, the prior, token files and docs); for a 17x256x256 clip on a
4x8x8 VAE the latent is 5x32x32 and the grids are 5x4x4, 5x8x8, 5x16x16, 5x32x32:
5 x (16 + 64 + 256 + 1024) = 6,800 tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from pyratok import ops
from pyratok.models.text import TextEmbedding

Grid = tuple[int, int, int]


@dataclass
class LaPQConfig:
    latent_dim: int = 16                       # z channels of the backbone latent
    num_bits: int = 16                         # K: one shared 2^K binary codebook
    levels: int = 4                            # L
    hidden: int = 128                          # width of each quantization block
    heads: int = 4                             # cross-attention heads
    text_dim: int = 384                        # dimension of the text encoder's tokens
    feature_dims: tuple[int, ...] = ()         # channels of the encoder taps, one per level (() = none)
    text_conditioning: bool = True
    spherical: bool = False                    # BSQ codes (+-1/sqrt(K)) instead of +-1
    level_scales: Optional[tuple[int, ...]] = None  # spatial down-factor per level; default 2^(L-1-l)
    substeps: int = 1                          # S: each level picks its K bits in S groups of K/S, each
                                               # group from the residual the groups before it left

    def scales(self) -> tuple[int, ...]:
        if self.level_scales is not None:
            if len(self.level_scales) != self.levels:
                raise ValueError(f"level_scales: {len(self.level_scales)} entries for {self.levels} levels")
            return tuple(self.level_scales)
        return tuple(2 ** (self.levels - 1 - l) for l in range(self.levels))


def latent_grid(frames: int, height: int, width: int, temporal: int = 4, spatial: int = 8) -> Grid:
    """Latent grid of a causal VAE with (temporal, spatial) compression: 1 + (T-1)/temporal frames."""
    if frames < 1 or (frames - 1) % temporal:
        raise ValueError(f"frames={frames}: a causal video VAE takes 1 + {temporal}k frames "
                         f"(e.g. {1 + temporal * max(0, (frames - 1) // temporal)} or "
                         f"{1 + temporal * ((frames - 1) // temporal + 1)})")
    if height % spatial or width % spatial:
        raise ValueError(f"height x width = {height} x {width}: expected multiples of {spatial}")
    return (1 + (frames - 1) // temporal, height // spatial, width // spatial)


def level_grids(latent: Grid, scales: Sequence[int]) -> list[Grid]:
    """The token grid of each level: (T, ceil(H/s), ceil(W/s)) for each scale s, coarse to fine."""
    T, H, W = latent
    return [(T, math.ceil(H / s), math.ceil(W / s)) for s in scales]


def token_count(grids: Sequence[Grid]) -> int:
    return sum(t * h * w for t, h, w in grids)


def causal_pool(x: torch.Tensor, grid: Grid, first: bool = True) -> torch.Tensor:
    """Average pooling of an encoder tap (B, C, T_f, H_f, W_f) onto a level grid (t, h, w) that
    follows the causal VAE's frame groups: in a clip (``first``: the frames start at the clip's
    frame 0) tap frame 0 alone gives latent frame 0 and each later latent frame averages the
    r = (T_f - 1) / (t - 1) tap frames of its group; in a later chunk of a stream every latent
    frame averages r = T_f / t frames.  Spatially each frame is area-pooled on its own."""
    frames, T = grid[0], x.shape[2]
    lead = 1 if first else 0
    if T != frames:
        groups = frames - lead
        if groups < 1 or (T - lead) % groups:
            raise ValueError(f"features: {T} frames cannot be grouped causally into {frames} latent frames "
                             f"(expected {'1 + ' if first else ''}r * {groups} frames)")
        r = (T - lead) // groups
        x = torch.cat([x[:, :, :lead], x[:, :, lead:].unflatten(2, (groups, r)).mean(3)], dim=2)
    return F.adaptive_avg_pool3d(x, grid)                                    # per frame: T is already t


def pooled_text(text: TextEmbedding) -> torch.Tensor:
    """(B, D) mean of the valid text tokens (the caption embedding e_t)."""
    mask = text.mask.to(text.tokens.dtype).unsqueeze(-1)                    # (B, L, 1)
    return (text.tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics of each frame alone (B, C, T, H, W): a norm over the whole
    clip would let later frames change the tokens of earlier ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        y = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", b=B)


class LaPQOutput(NamedTuple):
    quantized: torch.Tensor                  # q_L (B, z, T, H, W): what the decoder gets
    codes: list[torch.Tensor]                # per level (B, K, t, h, w) +-1 (STE)
    indices: list[torch.Tensor]              # per level (B, t, h, w) token ids, shared index space
    logits: list[torch.Tensor]               # per level (B, K, t, h, w) pre-quantization values z_l
    text_logits: Optional[list[torch.Tensor]]  # per level (B, K, 1, 1, 1) text-head bit logits (caption only)
    residuals: list[torch.Tensor]            # per level (B, z, T, H, W) the residual each level quantized
    grids: list[Grid]


class _Substep(nn.Module):
    """Picks one later group of a level's bits from what the groups before it left (substeps > 1)."""

    def __init__(self, cfg: LaPQConfig):
        super().__init__()
        d = cfg.hidden
        self.in_proj = nn.Conv3d(cfg.latent_dim, d, 1)
        self.conv = nn.Sequential(FrameGroupNorm(1, d), nn.SiLU(), nn.Conv3d(d, d, (1, 3, 3), padding=(0, 1, 1)))
        self.to_bits = nn.Conv3d(d, cfg.num_bits // cfg.substeps, 1)

    def forward(self, context, residual, grid):
        h = context + self.in_proj(F.adaptive_avg_pool3d(residual, grid))
        return self.to_bits(h + self.conv(h))


class _QuantizationBlock(nn.Module):
    def __init__(self, cfg: LaPQConfig, feature_dim: Optional[int]):
        super().__init__()
        d = cfg.hidden
        self.group = cfg.num_bits // cfg.substeps
        self.in_proj = nn.Conv3d(cfg.latent_dim, d, 1)
        self.lateral = nn.Conv3d(feature_dim, d, 1) if feature_dim else None
        self.text_conditioning = cfg.text_conditioning
        if cfg.text_conditioning:
            self.text_proj = nn.Linear(cfg.text_dim, d)
            self.norm = nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, cfg.heads, batch_first=True)
            self.text_head = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.SiLU(), nn.Linear(d, cfg.num_bits))
        self.conv = nn.Sequential(FrameGroupNorm(1, d), nn.SiLU(), nn.Conv3d(d, d, (1, 3, 3), padding=(0, 1, 1)))
        self.to_bits = nn.Conv3d(d, self.group, 1)
        self.phi = nn.Conv3d(cfg.num_bits, cfg.latent_dim, (1, 3, 3), padding=(0, 1, 1))
        self.substeps = nn.ModuleList(_Substep(cfg) for _ in range(cfg.substeps - 1))

    def forward(self, residual, grid, feature, text, first: bool = True, quantize=None):
        """-> (bit logits z (B, K, t, h, w), text logits or None, codes or None).  With substeps
        the block quantizes itself (``quantize``: logits -> +-1 codes, straight-through): each
        later group of K/S bits is chosen from the latent residual after the groups before it."""
        h = self.in_proj(F.adaptive_avg_pool3d(residual, grid))             # (B, d, t, h, w); t = T: per frame
        if self.lateral is not None:                                        # pooling and a 1x1x1 conv commute
            h = h + self.lateral(causal_pool(feature, grid, first))
        text_logits = None
        if self.text_conditioning:
            seq = rearrange(h, "b d t y x -> b (t y x) d")
            keys = self.text_proj(text.tokens)
            ctx, _ = self.attn(self.norm(seq), keys, keys, key_padding_mask=~text.mask, need_weights=False)
            h = h + rearrange(ctx, "b (t y x) d -> b d t y x", t=grid[0], y=grid[1], x=grid[2])
            # stop-gradient on the caption embedding only: the head itself trains
            text_logits = self.text_head(pooled_text(text).detach())[:, :, None, None, None]   # (B, K, 1, 1, 1)
        if not self.substeps:
            return self.to_bits(h + self.conv(h)), text_logits, None
        logits = [self.to_bits(h + self.conv(h))]
        codes = [quantize(logits[0])]
        latent = tuple(residual.shape[2:])
        for s, step in enumerate(self.substeps):
            residual = residual - self.lift(codes[s], latent, group=s)
            logits.append(step(h, residual, grid))
            codes.append(quantize(logits[-1]))
        return torch.cat(logits, 1), text_logits, torch.cat(codes, 1)

    def lift(self, codes, latent: Grid, group: Optional[int] = None):
        """phi(upsample(codes)) on the latent grid; ``group`` = s: group s's part alone (its K/S
        codes through phi's slice of input channels; phi's bias goes with group 0)."""
        up = F.interpolate(codes, size=latent, mode="nearest")
        if group is None:
            return self.phi(up)
        w = self.phi.weight[:, group * self.group:(group + 1) * self.group]
        return F.conv3d(up, w, self.phi.bias if group == 0 else None, padding=self.phi.padding)


class LaPQ(nn.Module):
    """Language-aligned pyramidal quantizer over a backbone latent (see module docstring)."""

    def __init__(self, config: LaPQConfig = LaPQConfig(), backend: Optional[str] = None):
        super().__init__()
        if not 1 <= config.num_bits <= 64:
            raise ValueError(f"num_bits={config.num_bits}: expected 1..64")
        if config.num_bits == 64:
            raise ValueError("num_bits=64: token ids hold at most 63 bits")
        if not isinstance(config.substeps, int) or config.substeps < 1 or config.num_bits % config.substeps:
            raise ValueError(f"substeps={config.substeps!r}: expected an int >= 1 that divides num_bits={config.num_bits}")
        if config.substeps > 1 and config.spherical:
            raise ValueError("substeps > 1 needs spherical=False (BSQ normalises all K bits of a token together)")
        if config.feature_dims and len(config.feature_dims) != config.levels:
            raise ValueError(f"feature_dims: {len(config.feature_dims)} taps for {config.levels} levels")
        self.config = config
        self.backend = backend
        self.scales = config.scales()
        dims = config.feature_dims or (None,) * config.levels
        self.blocks = nn.ModuleList(_QuantizationBlock(config, f) for f in dims)

    def grids(self, latent: Grid) -> list[Grid]:
        return level_grids(latent, self.scales)

    def _check(self, latent: torch.Tensor, features, text):
        cfg = self.config
        if latent.dim() != 5 or latent.shape[1] != cfg.latent_dim:
            raise ValueError(f"latent: expected (B, {cfg.latent_dim}, T, H, W), got {tuple(latent.shape)}")
        if cfg.feature_dims:
            if features is None or len(features) != cfg.levels:
                raise ValueError(f"features: expected {cfg.levels} encoder taps, got "
                                 f"{0 if features is None else len(features)}")
        if cfg.text_conditioning:
            if text is None:
                raise ValueError("text: this LaPQ is text-conditioned; pass a TextEmbedding (or a NullText one)")
            if text.batch_size != latent.shape[0]:
                raise ValueError(f"text: batch {text.batch_size} does not match the video batch {latent.shape[0]}")

    def forward(self, latent: torch.Tensor, features: Optional[Sequence[torch.Tensor]] = None,
                text: Optional[TextEmbedding] = None, first: bool = True) -> LaPQOutput:
        """latent (B, z, T, H, W) normalised; features: encoder taps (coarse-to-fine levels);
        ``first``: the latent starts at the clip's first frame (False for later stream chunks)."""
        self._check(latent, features, text)
        grid_latent = tuple(latent.shape[2:])
        grids = self.grids(grid_latent)
        residual, quantized = latent, torch.zeros_like(latent)
        codes, indices, logits, text_logits, residuals = [], [], [], [], []
        for l, (block, grid) in enumerate(zip(self.blocks, grids)):
            residuals.append(residual)
            z, tl, c = block(residual, grid, None if features is None else features[l], text, first, self._codes)
            q = ops.binary_quantize(z, spherical=self.config.spherical, return_codes=c is None, backend=self.backend)
            c = q.codes if c is None else c
            lifted = block.lift(c, grid_latent)
            residual = residual - lifted
            quantized = quantized + lifted
            codes.append(c)
            indices.append(q.indices)
            logits.append(z)
            text_logits.append(tl)
        return LaPQOutput(quantized, codes, indices, logits,
                          text_logits if self.config.text_conditioning else None, residuals, grids)

    def _codes(self, z: torch.Tensor) -> torch.Tensor:
        return ops.binary_quantize(z, return_indices=False, backend=self.backend).codes

    def codes_from_tokens(self, indices: Sequence[torch.Tensor], dtype=torch.float32) -> list[torch.Tensor]:
        """Per-level token ids (B, t, h, w) -> per-level codes (B, K, t, h, w)."""
        if len(indices) != self.config.levels:
            raise ValueError(f"indices: {len(indices)} levels, this LaPQ has {self.config.levels}")
        return [ops.indices_to_codes(i, self.config.num_bits, self.config.spherical, dim=1, dtype=dtype,
                                     backend=self.backend) for i in indices]

    def dequantize(self, codes: Sequence[torch.Tensor], latent: Grid, levels: Optional[int] = None) -> torch.Tensor:
        """Per-level codes -> q_L (B, z, T, H, W) on the latent grid ``latent``; ``levels`` = l
        sums only the first l (coarsest) levels' contributions, q_l (progressive decoding)."""
        levels = self.config.levels if levels is None else levels
        if not isinstance(levels, int) or not 1 <= levels <= self.config.levels:
            raise ValueError(f"levels={levels!r}: expected an int in 1..{self.config.levels}")
        if len(codes) < levels:
            raise ValueError(f"codes: {len(codes)} levels given, {levels} needed")
        codes = list(codes)[:levels]
        grids = self.grids(tuple(latent))
        for l, (c, g) in enumerate(zip(codes, grids)):
            if tuple(c.shape[2:]) != g or c.shape[1] != self.config.num_bits:
                raise ValueError(f"codes[{l}]: expected (B, {self.config.num_bits}, {g[0]}, {g[1]}, {g[2]}) "
                                 f"for latent grid {tuple(latent)}, got {tuple(c.shape)}")
        total = None
        for block, c in zip(self.blocks, codes):
            lifted = block.lift(c, tuple(latent))
            total = lifted if total is None else total + lifted
        return total
