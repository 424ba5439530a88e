"""FLOP formulas of the pyratok ops for torch.utils.flop_counter.FlopCounterMode (which cannot
look inside a custom op).

causal_conv3d: the direct algorithm's multiply-adds, 2 * B * To * Ho * Wo * O * C * kt * kh * kw,
forward; the backward counts that once per gradient of x (with the past frames) and of the weight.

The formulas are registered when torch.utils.flop_counter is imported, not by importing it
here: it imports triton, which must not happen before a user has chosen Triton's CPU
interpreter.  :func:`install` (called by pyratok.ops once its ops exist) registers them at
once if the flop counter is already imported, else when it is.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

import torch


def _conv_flops(x_shape, w_shape, y_shape) -> int:
    B = x_shape[0]
    O, C, kt, kh, kw = w_shape
    return 2 * B * y_shape[2] * y_shape[3] * y_shape[4] * O * C * kt * kh * kw


def _causal_conv3d_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return _conv_flops(x_shape, w_shape, out_shape[0])


def _causal_conv3d_backward_flops(grad_y_shape, x_shape, w_shape, cache_shape, stride, dilation, padding,
                                  replicate, output_mask, *args, out_shape=None, **kwargs) -> int:
    grads = int(bool(output_mask[0] or output_mask[1])) + int(bool(output_mask[2]))
    return grads * _conv_flops(x_shape, w_shape, grad_y_shape)


def _register_flop_formulas(flop_counter) -> None:
    flop_counter.register_flop_formula(torch.ops.pyratok.causal_conv3d)(_causal_conv3d_flops)
    flop_counter.register_flop_formula(torch.ops.pyratok.causal_conv3d_backward)(_causal_conv3d_backward_flops)


class _RegisterOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registers the formulas as soon as torch.utils.flop_counter has been imported (FlopCounterMode
    copies the registry when it is created, so registering on the op's first call is too late)."""

    NAME = "torch.utils.flop_counter"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.NAME:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the normal finders
        if spec is not None and spec.loader is not None:
            self.loader = spec.loader
            spec.loader = self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _register_flop_formulas(module)


def install() -> None:
    if _RegisterOnImport.NAME in sys.modules:
        _register_flop_formulas(sys.modules[_RegisterOnImport.NAME])
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
