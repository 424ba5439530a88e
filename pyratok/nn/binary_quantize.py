"""BinaryQuantizer: the lookup-free binary quantizer as an nn.Module."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from pyratok import ops
from pyratok.ops._checks import check_num_bits


class BinaryQuantizer(nn.Module):
    """Lookup-free binary quantization of ``dim`` channels (K = ``num_bits``).

    forward(x): x (B, K, T, H, W) (``dim=1``) or (..., K) (``dim=-1``) ->
    :class:`pyratok.ops.BinaryQuantized` (codes with a straight-through gradient,
    MSB-first indices or bit labels).  ``straight_through_activation`` (e.g. ``torch.tanh``)
    shapes the gradient: codes = act(x) + sg(q - act(x)).  ``backend`` picks the
    implementation (see pyratok._backend); None = automatic.
    """

    def __init__(self, num_bits: int, dim: int = 1, spherical: bool = False,
                 straight_through_activation: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 bit_labels: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.num_bits = check_num_bits(num_bits, bit_labels)
        self.dim = dim
        self.spherical = spherical
        self.activation = straight_through_activation
        self.bit_labels = bit_labels
        self.backend = backend

    def forward(self, x: torch.Tensor) -> ops.BinaryQuantized:
        if x.dim() == 0 or x.shape[self.dim] != self.num_bits:
            raise ValueError(f"x: expected {self.num_bits} channels on axis {self.dim}, got shape {tuple(x.shape)}")
        out = ops.binary_quantize(x, self.dim, self.spherical, bit_labels=self.bit_labels, backend=self.backend)
        if self.activation is None or not x.requires_grad:
            return out
        soft = self.activation(x)
        return out._replace(codes=out.codes.detach() + (soft - soft.detach()))

    def indices_to_codes(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Token indices (...) -> codes with the K axis at ``dim`` (as forward returns them)."""
        dim = self.dim if self.dim >= 0 else indices.dim() + 1 + self.dim
        return ops.indices_to_codes(indices, self.num_bits, self.spherical, dim, dtype, self.backend)

    def extra_repr(self) -> str:
        return f"num_bits={self.num_bits}, dim={self.dim}, spherical={self.spherical}, backend={self.backend}"
