"""pyratok: a fast PyraTok video tokenizer (arXiv 2601.16210).

Ops live in :mod:`pyratok.ops` (functional, registered under ``torch.ops.pyratok``),
modules in :mod:`pyratok.nn`, readable references in :mod:`pyratok.reference`.

Importing the package itself loads nothing heavy: ``pyratok.ops``, ``pyratok.nn`` and the
backend helpers are imported on first use (PEP 562), so the ``pyratok`` command can set up the
OpenMP runtime (pyratok/cli.py) before torch loads it.
"""

import importlib

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailable", "available_backends", "ops", "nn", "__version__"]

_FROM_BACKEND = ("BACKENDS", "BackendUnavailable", "available_backends")


def __getattr__(name):
    if name in ("ops", "nn"):
        return importlib.import_module(f"pyratok.{name}")
    if name in _FROM_BACKEND:
        return getattr(importlib.import_module("pyratok._backend"), name)
    raise AttributeError(f"module 'pyratok' has no attribute {name!r}")
