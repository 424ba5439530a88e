"""nn.Modules over the pyratok ops."""

from pyratok.nn.binary_quantize import BinaryQuantizer
from pyratok.nn.causal_conv3d import CausalConv3d, StreamCache, run_chunked
from pyratok.nn.lfq import LFQ, join_factorized_indices, split_factorized_indices

__all__ = ["BinaryQuantizer", "CausalConv3d", "LFQ", "StreamCache", "join_factorized_indices", "run_chunked",
           "split_factorized_indices"]
