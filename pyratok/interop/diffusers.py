"""diffusers interop: pyratok's WanVAE where diffusers expects ``AutoencoderKLWan``, and the
reverse, and pyratok's causal-conv op inside an unmodified diffusers model.

* :func:`wan_vae_from_diffusers` / :func:`wan_vae_to_diffusers` (also ``WanVAE.from_diffusers``
  and ``WanVAE.to_diffusers``): in-memory conversion.  Both models use diffusers' parameter
  names and config fields, so the conversion is a config copy and a strict state-dict load.
* :class:`AutoencoderKLOutput` / :class:`DecoderOutput`: what ``WanVAE.encode/decode/forward``
  return with ``return_dict=True`` (``False``: a one-element tuple), diffusers' shapes of
  results (``.latent_dist``, ``.sample``, ``[0]``), so pipeline code written for
  ``AutoencoderKLWan`` runs on a ``WanVAE``.
* :func:`patch_causal_convs`: replaces, in place, the forward of every diffusers
  ``WanCausalConv3d`` and ``CogVideoXCausalConv3d`` of a model by a call to
  :func:`pyratok.ops.causal_conv3d`, which pads implicitly instead of copying the padded
  activation (and on the CPU runs Winograd on wide layers).  The model keeps its class, its
  weights and its caches (diffusers' ``feat_cache`` lists / ``conv_cache`` tensors are
  translated per call), so everything around it is unchanged; :func:`unpatch_causal_convs`
  restores the original forwards.  Only layers whose padding our op reproduces exactly are
  patched (the others are counted in the result and left alone).
"""

from __future__ import annotations

import types
from typing import Optional

import torch
from torch import nn

from pyratok.ops.causal_conv3d import causal_conv3d
from pyratok.reference.causal_conv3d import past_frames

_PATCH_MARK = "_pyratok_patched_forward"


# ---------------------------------------------------------------------------------------
# diffusers-style outputs (diffusers.utils.BaseOutput: attribute, key and index access)


class _Output:
    _fields: tuple = ()

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self):
        return len(self._fields)

    def keys(self):
        return list(self._fields)

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f) for f in self._fields)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{f}=...' for f in self._fields)})"


class AutoencoderKLOutput(_Output):
    """``.latent_dist``: the posterior (a :class:`~pyratok.models.vae.LatentDistribution`, with
    diffusers' ``sample(generator)``, ``mode()``, ``mean``, ``logvar``, ``std``, ``var``)."""

    _fields = ("latent_dist",)

    def __init__(self, latent_dist):
        self.latent_dist = latent_dist


class DecoderOutput(_Output):
    """``.sample``: the decoded video (B, C, T, H, W) in [-1, 1]."""

    _fields = ("sample",)

    def __init__(self, sample: torch.Tensor):
        self.sample = sample


def as_output(value, cls, return_dict: Optional[bool]):
    """``value`` itself (return_dict None: pyratok's own return type), ``cls(value)`` (True) or
    ``(value,)`` (False, diffusers' tuple form)."""
    if return_dict is None:
        return value
    if not isinstance(return_dict, bool):
        raise TypeError(f"return_dict: expected None, True or False, got {return_dict!r}")
    return cls(value) if return_dict else (value,)


# ---------------------------------------------------------------------------------------
# WanVAE <-> AutoencoderKLWan


def wan_vae_from_diffusers(model):
    """A :class:`~pyratok.models.vae.WanVAE` with the config and weights of a diffusers
    ``AutoencoderKLWan`` (on the same device and in the same dtype)."""
    from pyratok.models.vae import WanVAE, WanVAEConfig

    config = getattr(model, "config", None)
    if config is None or type(model).__name__ != "AutoencoderKLWan":
        raise TypeError(f"model: expected a diffusers AutoencoderKLWan, got {type(model).__name__}")
    ours = WanVAE(WanVAEConfig.from_dict(dict(config)))
    param = next(model.parameters())
    ours.to(device=param.device, dtype=param.dtype)
    ours.load_backbone_state_dict(model.state_dict())
    return ours


def wan_vae_to_diffusers(vae):
    """A diffusers ``AutoencoderKLWan`` with the config and backbone weights of ``vae`` (LoRA
    adapters are not carried; merge them first with ``vae.merge_lora()``)."""
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan(**vae.config.to_dict())
    param = next(vae.parameters())
    model.to(device=param.device, dtype=param.dtype)
    model.load_state_dict(vae.backbone_state_dict(), strict=True)
    return model


# ---------------------------------------------------------------------------------------
# routing diffusers' causal convs through pyratok.ops.causal_conv3d


def _wan_forward(self, x, cache_x=None):
    """diffusers WanCausalConv3d.forward: zero past padding of P frames, of which the last
    ``cache_x.shape[2]`` come from cache_x (the previous chunk's input frames)."""
    P = self._padding[4]
    cache = None
    if cache_x is not None and P > 0:
        cache_x = cache_x.to(device=x.device, dtype=x.dtype)
        n = cache_x.shape[2]
        if n >= P:
            cache = cache_x[:, :, n - P:]
        else:
            zeros = x.new_zeros(x.shape[0], x.shape[1], P - n, x.shape[3], x.shape[4])
            cache = torch.cat([zeros, cache_x], dim=2)
    y, _ = causal_conv3d(x, self.weight, self.bias, self.stride, self.dilation, (self._padding[2], self._padding[0]),
                         "zeros", cache, getattr(self, "_pyratok_backend", None))
    return y


def _cogvideox_forward(self, inputs, conv_cache=None):
    """diffusers CogVideoXCausalConv3d.forward (any pad_mode but "replicate", e.g. "constant" or
    "first"): past frames from conv_cache or frame 0 replicated, zero spatial padding; returns (output, the last kt-1 padded frames)."""
    conv = self.conv
    if conv_cache is not None:
        conv_cache = conv_cache.to(device=inputs.device, dtype=inputs.dtype)
    y, new_cache = causal_conv3d(inputs, conv.weight, conv.bias, conv.stride, conv.dilation,
                                 tuple(conv.padding[1:]), "replicate", conv_cache,
                                 getattr(self, "_pyratok_backend", None))
    return y, new_cache


def _patchable(module) -> Optional[types.FunctionType]:
    """The replacement forward for a diffusers causal conv we reproduce exactly, else None."""
    name = type(module).__name__
    if name == "WanCausalConv3d":
        pad = module._padding
        exact = (pad[0] == pad[1] and pad[2] == pad[3] and pad[5] == 0 and module.groups == 1
                 and module.padding_mode == "zeros" and tuple(module.padding) == (0, 0, 0)
                 and pad[4] == past_frames(module.kernel_size[0], module.stride[0], module.dilation[0]))
        return _wan_forward if exact else None
    if name == "CogVideoXCausalConv3d":
        conv = module.conv
        exact = (module.pad_mode != "replicate" and module.time_kernel_size > 1 and conv.groups == 1
                 and module.time_pad == past_frames(conv.kernel_size[0], conv.stride[0], conv.dilation[0])
                 and conv.padding_mode == "zeros" and conv.padding[0] == 0)
        return _cogvideox_forward if exact else None
    return None


def patch_causal_convs(model: nn.Module, backend: Optional[str] = None) -> dict:
    """Routes every diffusers ``WanCausalConv3d`` / ``CogVideoXCausalConv3d`` of ``model``
    (an ``AutoencoderKLWan``, ``AutoencoderKLCogVideoX`` or any module holding them) through
    :func:`pyratok.ops.causal_conv3d`, in place.  Returns ``{"patched": n, "skipped": m}``;
    skipped layers (a padding our op does not reproduce: CogVideoX's pad_mode="replicate", a
    temporally strided conv whose past padding is not causal) keep diffusers' forward.
    ``backend``: pyratok backend for the op (None: automatic).  Idempotent."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    patched = skipped = 0
    for module in model.modules():
        if type(module).__name__ not in ("WanCausalConv3d", "CogVideoXCausalConv3d"):
            continue
        forward = _patchable(module)
        if forward is None:
            skipped += 1
            continue
        module.forward = types.MethodType(forward, module)
        setattr(module, _PATCH_MARK, True)
        module._pyratok_backend = backend
        patched += 1
    return {"patched": patched, "skipped": skipped}


def unpatch_causal_convs(model: nn.Module) -> int:
    """Restores diffusers' forward on every layer :func:`patch_causal_convs` patched; returns
    how many."""
    restored = 0
    for module in model.modules():
        if getattr(module, _PATCH_MARK, False):
            del module.forward, module._pyratok_backend
            delattr(module, _PATCH_MARK)
            restored += 1
    return restored
