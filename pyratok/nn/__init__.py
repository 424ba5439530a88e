"""nn.Modules over the pyratok ops."""

from pyratok.nn.binary_quantize import BinaryQuantizer
from pyratok.nn.causal_conv3d import CausalConv3d, StreamCache, run_chunked

__all__ = ["BinaryQuantizer", "CausalConv3d", "StreamCache", "run_chunked"]
