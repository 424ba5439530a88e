"""Public functional ops of pyratok, registered as custom ops under ``torch.ops.pyratok``."""

from pyratok import _backend

_backend.extension()  # load pyratok._C (if built) before the Python ops are registered

from pyratok.ops.binary_quantize import (  # noqa: E402
    BinaryQuantized,
    binary_quantize,
    bits_to_indices,
    indices_to_bits,
    indices_to_codes,
    lsb_to_msb,
    msb_to_lsb,
    pack_bits,
    residual_binary_quantize,
    unpack_bits,
)
from pyratok.ops.causal_conv3d import causal_conv3d  # noqa: E402

__all__ = [
    "BinaryQuantized",
    "binary_quantize",
    "bits_to_indices",
    "causal_conv3d",
    "indices_to_bits",
    "indices_to_codes",
    "lsb_to_msb",
    "msb_to_lsb",
    "pack_bits",
    "residual_binary_quantize",
    "unpack_bits",
]
