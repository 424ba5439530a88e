"""pyratok: a fast PyraTok video tokenizer (arXiv 2601.16210).

Ops live in :mod:`pyratok.ops` (functional, registered under ``torch.ops.pyratok``),
modules in :mod:`pyratok.nn`, readable references in :mod:`pyratok.reference`.
"""

from pyratok._backend import BACKENDS, BackendUnavailable, available_backends
from pyratok import ops, nn

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailable", "available_backends", "ops", "nn", "__version__"]
