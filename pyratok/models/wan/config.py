"""WanVAEConfig: the fields of diffusers' ``AutoencoderKLWan`` config, checked when built."""

from __future__ import annotations

import dataclasses
from typing import Optional

_WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                       0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                      3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


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
