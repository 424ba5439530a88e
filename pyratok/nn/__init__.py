"""nn.Modules over the pyratok ops."""

from pyratok.nn.binary_quantize import BinaryQuantizer

__all__ = ["BinaryQuantizer"]
