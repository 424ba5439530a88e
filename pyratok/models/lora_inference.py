"""LoRA adapters for inference without peft.

Loading a model for encoding or decoding needs the adapters' forward, not peft's training
machinery, and importing peft (which imports transformers) took 3 s of a 3.6 s CLI model load.
:class:`InferenceLoRA` wraps a convolution with peft's state-dict layout (``base_layer``,
``lora_A.<adapter>``, ``lora_B.<adapter>``) and peft's forward, operation for operation
(``base(x) + lora_B(lora_A(x)) * scaling``), so a checkpoint trained with peft
(pyratok.models.lora) loads as is and gives bit-identical outputs.  No dropout (inference), no
merging, no training helpers: for those, build the model with peft (the default).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pyratok.nn.causal_conv3d import CausalConv3d, StreamCache


class InferenceLoRA(nn.Module):
    """``base_layer`` (CausalConv3d or nn.Conv2d) plus one plain LoRA adapter."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, adapter_name: str = "default"):
        super().__init__()
        self.base_layer = base_layer
        self.adapter_name = adapter_name
        self.scaling = alpha / rank
        out_features, in_features = base_layer.weight.shape[:2]
        if isinstance(base_layer, CausalConv3d):
            lora_a = CausalConv3d(in_features, rank, base_layer.kernel_size, base_layer.stride, base_layer.dilation,
                                  base_layer.padding, bias=False, time_pad_mode=base_layer.time_pad_mode,
                                  backend=base_layer.backend)
            lora_b = nn.Conv3d(rank, out_features, 1, bias=False)
        elif isinstance(base_layer, nn.Conv2d):  # peft's Conv2d: same kernel, stride, padding; 1x1 up
            lora_a = nn.Conv2d(in_features, rank, base_layer.kernel_size, base_layer.stride, base_layer.padding,
                               bias=False)
            lora_b = nn.Conv2d(rank, out_features, 1, 1, groups=base_layer.groups, bias=False)
        else:
            raise TypeError(f"base_layer: expected a CausalConv3d or nn.Conv2d, got {type(base_layer).__name__}")
        self.lora_A = nn.ModuleDict({adapter_name: lora_a})
        self.lora_B = nn.ModuleDict({adapter_name: lora_b})

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[self.adapter_name], self.lora_B[self.adapter_name]
        if isinstance(self.base_layer, CausalConv3d):  # pyratok.models.lora.LoraCausalConv3d.forward
            result = self.base_layer(x, cache)
            h = lora_a(x.to(lora_a.weight.dtype), cache)
            return result + (lora_b(h) * self.scaling).to(result.dtype)
        result = self.base_layer(x)                     # peft's _ConvNd.forward
        dtype = result.dtype
        result = result + lora_b(lora_a(x.to(lora_a.weight.dtype))) * self.scaling
        return result.to(dtype)


def add_inference_lora(model: nn.Module, target_modules: list[str], rank: int, alpha: float,
                       adapter_name: str = "default") -> list[str]:
    """Wraps the named convolutions of ``model`` in :class:`InferenceLoRA` (in place); returns
    their names.  The adapters start at B = 0; load the trained weights afterwards."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r}: expected a positive int")
    for name in target_modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = InferenceLoRA(getattr(parent, child), rank, alpha, adapter_name)
        nn.init.zeros_(layer.lora_B[adapter_name].weight)
        setattr(parent, child, layer)
    return list(target_modules)
