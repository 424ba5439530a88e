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
from pyratok.ops.entropy import (  # noqa: E402
    CodebookUsage,
    EntropyLoss,
    bernoulli_kl,
    bit_probs,
    codebook_entropy,
    codebook_usage,
    lfq_entropy_loss,
    per_sample_entropy,
)
from pyratok.ops import _flops  # noqa: E402

_flops.install()  # FLOP formulas for torch.utils.flop_counter, registered when it is imported

__all__ = [
    "BinaryQuantized",
    "CodebookUsage",
    "EntropyLoss",
    "bernoulli_kl",
    "binary_quantize",
    "bit_probs",
    "bits_to_indices",
    "causal_conv3d",
    "codebook_entropy",
    "codebook_usage",
    "indices_to_bits",
    "indices_to_codes",
    "lfq_entropy_loss",
    "lsb_to_msb",
    "msb_to_lsb",
    "pack_bits",
    "per_sample_entropy",
    "residual_binary_quantize",
    "unpack_bits",
]
