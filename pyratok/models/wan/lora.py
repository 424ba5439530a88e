"""LoRA on WanVAE's convolutions: which layers are adapted, and the adapter methods, which
delegate to :mod:`pyratok.models.lora` (peft; imported only when used)."""

from __future__ import annotations

import os

from torch import nn

from pyratok.nn.causal_conv3d import CausalConv3d


class LoRAMixin:
    """WanVAE's LoRA methods (mixed into :class:`~pyratok.models.vae.WanVAE`)."""

    def add_lora(self, rank: int = 16, alpha: float = 32, dropout: float = 0.0,
                 target: str = "encoder", adapter_name: str = "default") -> list[str]:
        """Adds LoRA (via peft) to every convolution under ``target`` ("encoder", "decoder" or "all")
        with B initialised to zero, and freezes every other weight.  Returns the adapted module names."""
        from pyratok.models.lora import add_lora

        return add_lora(self, self.lora_targets(target), rank, alpha, dropout, adapter_name)

    def lora_targets(self, target: str) -> list[str]:
        """The names of the convolutions (CausalConv3d, nn.Conv2d) under ``target`` ("encoder",
        "decoder" or "all") that ``add_lora`` adapts; adapter layers and the base layers inside
        LoRA wrappers are not listed."""
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
