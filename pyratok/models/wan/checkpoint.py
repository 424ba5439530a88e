"""Checkpoint I/O of WanVAE: diffusers folders (config.json + safetensors, diffusers' parameter
names) and original Wan 2.1 checkpoint files (key mapping in :mod:`pyratok.models.wan.wan21_keys`).

The state dict of a WanVAE uses diffusers' ``AutoencoderKLWan`` names; with LoRA adapters
injected, :func:`backbone_name` maps its keys back to them (and drops the adapters).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from pyratok.models.wan import wan21_keys
from pyratok.models.wan.config import WanVAEConfig
from pyratok.utils import error_summary

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def backbone_name(key: str) -> Optional[str]:
    """The diffusers name of a state-dict key of a (possibly LoRA-injected) model; None for
    LoRA adapter weights."""
    if ".lora_" in key:
        return None
    return key.replace(".base_layer.", ".")


class CheckpointMixin:
    """WanVAE's weight and checkpoint methods (mixed into :class:`~pyratok.models.vae.WanVAE`: they
    use its ``config``, ``state_dict`` and constructor)."""

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict in diffusers' names, without LoRA adapters (merged adapters stay merged
        into the base weights)."""
        return {base: v for k, v in self.state_dict().items() if (base := backbone_name(k)) is not None}

    def load_backbone_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Loads diffusers-named weights; missing, unexpected or mis-shaped keys are an error
        that lists them (LoRA adapters in the model are left as they are)."""
        own = {base: (k, v) for k, v in self.state_dict().items() if (base := backbone_name(k)) is not None}
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
                        device: torch.device | str = "cpu"):
        """Loads a diffusers folder (config.json + diffusion_pytorch_model.safetensors, or a
        pipeline folder with a ``vae/`` subfolder) or an original Wan 2.1 checkpoint file
        (``.pth`` / ``.pt`` / ``.safetensors`` with Wan's key names; ``config`` defaults to Wan 2.1)."""
        from safetensors.torch import load_file

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
            raise ValueError(f"{path}: not a loadable checkpoint ({error_summary(err)})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path}: not a VAE checkpoint (expected a dict of tensors, "
                             f"got {type(state).__name__})")
        if wan21_keys.is_wan_layout(state):
            state = wan21_keys.wan_to_diffusers(state, model.config)
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
        torch.save(wan21_keys.diffusers_to_wan(self.backbone_state_dict(), self.config), os.fspath(path))
