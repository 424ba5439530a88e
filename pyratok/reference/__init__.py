"""Readable pure-PyTorch versions of every pyratok op: the test oracle and benchmark baseline."""

from pyratok.reference import binary_quantize, causal_conv3d, entropy

__all__ = ["binary_quantize", "causal_conv3d", "entropy"]
