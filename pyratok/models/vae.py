"""Wan 2.1 / 2.2 causal video VAE, numerically equal to diffusers' ``AutoencoderKLWan``.

PyraTok tokenizes the latent of a pretrained Wan video VAE (DESIGN.md §3): a video
(B, 3, T, H, W) in [-1, 1] with T = 1 + 4k frames becomes a latent (B, z_dim, 1 + k, H/8, W/8)
(Wan 2.1; Wan 2.2 is 4x16x16 with patch_size 2 and residual up/down blocks).  Every field of
diffusers' ``AutoencoderKLWan`` config is honoured, state dicts use its parameter names, and
:meth:`WanVAE.from_pretrained` reads a diffusers folder or the original Wan 2.1 ``.pth``
(key mapping in :mod:`pyratok.models.wan.wan21_keys`).

Layout.  This module holds the public class; its parts live in :mod:`pyratok.models.wan`:
``config`` (WanVAEConfig), ``blocks`` (norms, residual/attention blocks, resampling),
``encoder_decoder``, ``latent`` (LatentDistribution), ``shapes`` (patchify, fit_frames),
``streaming`` (chunk plans), ``tiling``, ``checkpoint`` (diffusers folders, Wan files) with
``wan21_keys``, and ``lora``.  The names existing code imports from here are re-exported.

Streaming.  All temporal state lives in one explicit :class:`~pyratok.nn.StreamCache` per clip,
keyed by module: each CausalConv3d keeps its last P input frames, and the blocks where Wan treats
a clip's first chunk specially (``Resample``; Wan 2.2's ``DupUp3D``) tell it from the frames the
cache has counted for them (``StreamCache.frames_seen``).  The network is causal,
so every chunk plan gives the whole-clip result; ``encode`` defaults to Wan's plan (1 frame, then
4) and ``decode`` to one latent frame at a time, which bounds activation memory by the chunk.

Tiling (:mod:`pyratok.models.wan.tiling`).  ``tile`` and ``overlap`` are in latent pixels.  The
mid blocks' attention sees whole frames, so only the convolutional part above latent resolution
is tiled.  With overlap >= 2 ceil(R) + 1, R the receptive-field radius of that part
(:meth:`WanVAE.receptive_field`, 12.25 latent pixels for the Wan 2.1 decoder), tiled equals
untiled up to fp32 rounding (the default overlap is 2 ceil(R) + 2); a smaller overlap is allowed
with a warning (seamless, not exact).  Memory: the output, the latent-resolution activations of
the whole clip, and one tile's working set.

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
import warnings
from typing import Optional

import torch
from torch import nn

from pyratok.models.wan import tiling
from pyratok.models.wan.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointMixin
from pyratok.models.wan.config import WanVAEConfig
from pyratok.models.wan.encoder_decoder import Decoder, Encoder
from pyratok.models.wan.latent import LOGVAR_RANGE, LatentDistribution
from pyratok.models.wan.lora import LoRAMixin
from pyratok.models.wan.shapes import fit_frames, patchify, unpatchify
from pyratok.models.wan.streaming import chunk_plan, latent_plan, split_chunks, stream_cache
from pyratok.nn.causal_conv3d import CausalConv3d, StreamCache

__all__ = ["CONFIG_NAME", "LOGVAR_RANGE", "WEIGHTS_NAME", "LatentDistribution", "WanVAE", "WanVAEConfig",
           "fit_frames", "patchify", "unpatchify"]


class WanVAE(CheckpointMixin, LoRAMixin, nn.Module):
    """Wan causal video VAE with diffusers-compatible weights (see the module docstring).

    Checkpoint I/O (``from_pretrained``, ``save_pretrained``, ``backbone_state_dict``, ...) comes
    from :class:`~pyratok.models.wan.checkpoint.CheckpointMixin`, the LoRA methods (``add_lora``,
    ``merge_lora``, ...) from :class:`~pyratok.models.wan.lora.LoRAMixin`.
    """

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
        """-> (overlap, margin) for tiling ``part`` (tiling.overlap_and_margin)."""
        return tiling.overlap_and_margin(tile, overlap, self.receptive_field(part), part, stacklevel=3)

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
        tf, first = self.temporal_factor, cache is None or cache.frames_seen(self.encoder) == 0
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
            cache = stream_cache(plan)
            return torch.cat([self.encoder.spatial_part(patchify(chunk.to(dtype), patch), cache)
                              for chunk in split_chunks(video_tile, plan)], dim=2)

        hidden = tiling.run_tiled(video, sf, tile, overlap, margin, spatial_part).to(dtype)   # (B, C, T', h, w)
        return self._encode_latent_part(hidden, plan)

    def _encode_latent_part(self, hidden: torch.Tensor, plan: list[int]) -> LatentDistribution:
        """The encoder's latent-resolution part (mid block, head, quant_conv) over the whole frame,
        streamed with the time plan of the tiled part that made ``hidden``."""
        cache = stream_cache(plan)
        moments = [self.quant_conv(self.encoder.latent_part(chunk, cache), cache)
                   for chunk in split_chunks(hidden, latent_plan(plan, self.temporal_factor))]
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
        features = [f.to(self._dtype(self.encoder)) for f in tiling.run_tiled_many(
            video, self.spatial_factor, tile, overlap, margin, lambda piece: self._encoder_taps(piece, plan))]
        return self._encode_latent_part(features[-1], plan), features

    def encoder_taps(self, video: torch.Tensor, chunk_frames: Optional[int] = -1) -> list[torch.Tensor]:
        """The per-stage feature maps of ``encoder_features`` alone: the encoder's convolutional
        part, without the mid block, the head and the latent."""
        self._check_video(video)
        return self._encoder_taps(video, self._encode_plan(video.shape[2], chunk_frames))

    def _encoder_taps(self, video: torch.Tensor, plan: list[int]) -> list[torch.Tensor]:
        dtype, patch = self._dtype(self.encoder), self.config.patch_size
        cache, per_chunk = stream_cache(plan), []
        for chunk in split_chunks(video, plan):
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
        return chunk_plan(frames, 1, chunk_frames)

    def _encode_untiled(self, video: torch.Tensor, plan: list[int], features: Optional[list]) -> LatentDistribution:
        cache, dists, taps = stream_cache(plan), [], []
        for chunk in split_chunks(video, plan):
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
        plan = chunk_plan(latent.shape[2], chunk_frames or latent.shape[2], chunk_frames)
        if tile is None:
            cache = stream_cache(plan)
            return torch.cat([self.decode_stream(chunk, cache) for chunk in split_chunks(latent, plan)], dim=2)
        overlap, margin = self._check_tiling(tile, overlap, "decoder")
        dtype, patch = self._dtype(self.decoder), self.config.patch_size
        cache = stream_cache(plan)
        hidden = torch.cat([self.decoder.latent_part(self.post_quant_conv(chunk.to(dtype), cache), cache)
                            for chunk in split_chunks(latent, plan)], dim=2)                   # (B, C, T, h, w)

        def spatial_part(hidden_tile):
            cache = stream_cache(plan)
            return torch.cat([unpatchify(self.decoder.spatial_part(chunk, cache), patch)
                              for chunk in split_chunks(hidden_tile, plan)], dim=2)

        return tiling.run_tiled(hidden, 1, tile, overlap, margin, spatial_part).clamp_(-1.0, 1.0)

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
