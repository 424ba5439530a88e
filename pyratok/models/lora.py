"""LoRA for pyratok models through peft, including pyratok's streaming CausalConv3d.

peft adapts nn.Conv2d itself; for :class:`~pyratok.nn.CausalConv3d` it gets the custom layer
:class:`LoraCausalConv3d`: y = conv(x) + scaling * B(A(dropout(x))), where A is a causal conv
with the base layer's kernel, stride, dilation and padding and B a 1x1x1 conv, so the LoRA path
streams like the base path (A keeps its own entry in the StreamCache).  The weight update is
delta W = scaling * B @ A (contracting the rank), which ``merge`` adds to the base weight.

Adapters are injected in place (``peft.inject_adapter_in_model``), so the model keeps its own
methods, and every non-adapter weight of the model is frozen.  Merge or unmerge between clips,
not in the middle of a stream: a merged layer does not advance the adapter's cache.
Needs peft: ``pip install 'pyratok[lora]'``.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pyratok.nn.causal_conv3d import CausalConv3d, StreamCache

try:
    import peft
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("LoRA needs peft: pip install 'pyratok[lora]'") from err

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoraCausalConv3d(nn.Module, LoraLayer):
    """peft LoRA layer around a CausalConv3d (plain LoRA: no DoRA, no LoRA bias)."""

    def __init__(self, base_layer: CausalConv3d, adapter_name: str, config: peft.LoraConfig, r: int = 0,
                 lora_alpha: float = 1, **kwargs):
        super().__init__()
        with warnings.catch_warnings():
            # peft cannot read in/out features off a layer type it does not know and warns; set below
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            LoraLayer.__init__(self, base_layer)
        self.out_features, self.in_features = base_layer.weight.shape[:2]
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: peft.LoraConfig, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"r={r}: the LoRA rank must be positive")
        if config.use_dora or config.lora_bias:
            raise ValueError("LoRA on CausalConv3d supports plain LoRA only (use_dora=False, lora_bias=False)")
        base = self.get_base_layer()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (r ** 0.5 if config.use_rslora else r)
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = CausalConv3d(self.in_features, r, base.kernel_size, base.stride, base.dilation,
                                                 base.padding, bias=False, time_pad_mode=base.time_pad_mode,
                                                 backend=base.backend)
        self.lora_B[adapter_name] = nn.Conv3d(r, self.out_features, 1, bias=False)
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling * B @ A: (out, r) x (r, in, kt, kh, kw) -> (out, in, kt, kh, kw), in fp32."""
        a = self.lora_A[adapter].weight.float()
        b = self.lora_B[adapter].weight.float().flatten(1)               # (out, r)
        return torch.einsum("or,rikhw->oikhw", b, a) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        weight = self.get_base_layer().weight
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            merged = weight.data.float() + self.get_delta_weight(adapter)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {adapter} seems to be broken")
            weight.data.copy_(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                weight.data.copy_(weight.data.float() - self.get_delta_weight(adapter))

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, cache)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_a = self.lora_A[adapter]
            h = lora_a(self.lora_dropout[adapter](x.to(lora_a.weight.dtype)), cache)
            result = result + (self.lora_B[adapter](h) * self.scaling[adapter]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _lora_config(target_modules: list[str], rank: int, alpha: float, dropout: float) -> peft.LoraConfig:
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                             init_lora_weights=True)
    config._register_custom_module({CausalConv3d: LoraCausalConv3d})
    return config


def _adapted_modules(model: nn.Module, adapter_name: str) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}


def add_lora(model: nn.Module, target_modules: list[str], rank: int = 16, alpha: float = 32,
             dropout: float = 0.0, adapter_name: str = "default") -> list[str]:
    """Injects LoRA into the named modules of ``model`` (B = 0, so outputs are unchanged) and
    freezes every other parameter.  Returns the names of the adapted modules."""
    if not target_modules:
        raise ValueError("target_modules: nothing to adapt")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r}: expected a positive int")
    peft.inject_adapter_in_model(_lora_config(target_modules, rank, alpha, dropout), model, adapter_name)
    for name, param in model.named_parameters():
        param.requires_grad_(f".lora_A.{adapter_name}." in name or f".lora_B.{adapter_name}." in name)
    return list(_adapted_modules(model, adapter_name))


def _lora_layers(model: nn.Module) -> list[BaseTunerLayer]:
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("model has no LoRA adapters (call add_lora first)")
    return layers


def merge_lora(model: nn.Module) -> None:
    """Adds every active adapter's delta W into its base weight."""
    for layer in _lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Subtracts the merged adapters again (exact up to fp32 rounding)."""
    for layer in _lora_layers(model):
        if layer.merged:
            layer.unmerge()


def save_lora(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Writes the adapter weights alone (peft's adapter_model.safetensors naming) and the LoRA
    hyper-parameters needed to re-create the adapters."""
    layers = _adapted_modules(model, adapter_name)
    if not layers:
        raise ValueError(f"model has no LoRA adapter named {adapter_name!r}")
    first = next(iter(layers.values()))
    dropout = first.lora_dropout[adapter_name]
    state = get_peft_model_state_dict(model, state_dict=model.state_dict(), adapter_name=adapter_name)
    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(path, ADAPTER_WEIGHTS))
    meta = {"peft_type": "LORA", "r": first.r[adapter_name], "lora_alpha": first.lora_alpha[adapter_name],
            "lora_dropout": dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
            "target_modules": sorted(layers), "peft_version": peft.__version__}
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as fh:
        json.dump(meta, fh, indent=2)


def load_lora(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Re-creates the adapters saved by :func:`save_lora` (if the model lacks them) and loads
    their weights; adapter keys the model does not have, or lacks, are an error."""
    with open(os.path.join(path, ADAPTER_CONFIG)) as fh:
        meta = json.load(fh)
    have = set(_adapted_modules(model, adapter_name))
    if not have:
        add_lora(model, meta["target_modules"], meta["r"], meta["lora_alpha"], meta["lora_dropout"], adapter_name)
    elif have != set(meta["target_modules"]):
        raise ValueError(f"adapter {adapter_name!r} exists on other modules than the saved one: "
                         f"{sorted(have ^ set(meta['target_modules']))}")
    state = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    expected = set(get_peft_model_state_dict(model, state_dict=model.state_dict(), adapter_name=adapter_name))
    if set(state) != expected:
        raise ValueError(f"adapter weights do not fit: missing {sorted(expected - set(state))}, "
                         f"unexpected {sorted(set(state) - expected)}")
    set_peft_model_state_dict(model, state, adapter_name=adapter_name)
