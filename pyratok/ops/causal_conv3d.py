"""Causal 3D convolution with an explicit streaming cache (DESIGN.md §2.3): the public op.

:func:`causal_conv3d` checks its arguments (pyratok/ops/_checks.py: a ``TypeError``/``ValueError``
naming the argument) and calls ``pyratok::causal_conv3d``, declared with pyratok/ops/_define.py
(which picks the backend): its allocate function is the fake kernel (torch.compile / meta
tensors) and its autograd formula calls ``pyratok::causal_conv3d_backward`` on the same backend:

  reference     pyratok/reference/causal_conv3d.py (F.pad + F.conv3d, pads by copying)
  cpu, cuda     torch.ops.pyratok._causal_conv3d(_backward).out from the C++ extension (csrc/);
                ``cpu`` runs Winograd F(2x2, 3x3) for float32 layers with a 3x3 spatial kernel,
                spatial stride and dilation 1 and at least 48 input and output channels (2.25x
                fewer multiplies; fp32 error within 2x the direct path's), the direct implicit
                GEMM otherwise
  cpu:direct    the cpu backend, always the direct implicit GEMM forward
  cpu:winograd  the cpu backend, Winograd wherever the geometry allows, in every dtype
                (computing in the work type, fp32 or fp64)
  triton        kernels/causal_conv3d.py (implicit GEMM)

The backward always runs the direct scheme (the cpu variants run the cpu backward).  The
fast backends never build the padded input.  Outputs keep x's layout (channels_last_3d in,
channels_last_3d out).  The new cache, the last P frames of the padded input, is a P-frame
copy made here for every backend.  FLOP formulas for FlopCounterMode: pyratok/ops/_flops.py.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from pyratok.ops._checks import FLOAT_DTYPES, ConvAlgorithm, check_float, pair, triple  # noqa: F401
from pyratok.ops._define import define, native_kernel
from pyratok.reference import causal_conv3d as ref

IntOr3 = Union[int, Sequence[int]]
TIME_PAD_MODES = ("zeros", "replicate")


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d for a channels_last_3d x, else contiguous (as the C++ binding)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def output_shape(x_shape, weight_shape, stride, dilation, padding):
    """(B, O, To, Ho, Wo) of a causal conv."""
    B, _, T, H, W = x_shape
    O, _, _, kh, kw = weight_shape
    Ho = (H + 2 * padding[0] - dilation[1] * (kh - 1) - 1) // stride[1] + 1
    Wo = (W + 2 * padding[1] - dilation[2] * (kw - 1) - 1) // stride[2] + 1
    return (B, O, T // stride[0], Ho, Wo)


def _empty_like_layout(x: torch.Tensor, shape) -> torch.Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def _fill_new_cache(out: torch.Tensor, x: torch.Tensor, cache: Optional[torch.Tensor], replicate: bool) -> None:
    """Writes the last P frames of [past, x] into ``out`` (B, C, P, H, W)."""
    T, P = x.shape[2], out.shape[2]
    from_x = min(P, T)
    out[:, :, P - from_x:].copy_(x[:, :, T - from_x:])
    if from_x < P:  # a chunk shorter than P keeps some of the old past frames
        past = ref.past_input(x, P, "replicate" if replicate else "zeros", cache)
        out[:, :, :P - from_x].copy_(past[:, :, T:])


# ---------------------------------------------------------------------------------------
# the ops: one declaration each (pyratok/ops/_define.py)


@define("causal_conv3d", family="causal_conv3d")
def _causal_conv3d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      cache: Optional[torch.Tensor], stride: list[int], dilation: list[int], padding: list[int],
                      replicate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (B, O, To, Ho, Wo), new cache (B, C, P, H, W)), both in x's layout."""
    B, C, _, H, W = x.shape
    P = ref.past_frames(weight.shape[2], stride[0], dilation[0])
    y = _empty_like_layout(x, output_shape(x.shape, weight.shape, stride, dilation, padding))
    return y, _empty_like_layout(x, (B, C, P, H, W))


def _forward_impl(*backends: str):
    """Declares ``forward(x, weight, bias, cache, stride, dilation, padding, replicate, y)``, which
    writes y, the forward of ``backends``; the new cache is the same P-frame copy for all of them."""

    def register(forward):
        def run(x, weight, bias, cache, stride, dilation, padding, replicate, out):
            y, new_cache = out
            forward(x, weight, bias, cache, stride, dilation, padding, replicate, y)
            _fill_new_cache(new_cache, x, cache, replicate)

        return _causal_conv3d_op.impl(*backends, into=True)(run)

    return register


@_forward_impl("reference")
def _(x, weight, bias, cache, stride, dilation, padding, replicate, y):
    y.copy_(ref.causal_conv3d(x, weight, bias, stride, dilation, padding, "replicate" if replicate else "zeros",
                              cache)[0])


@_forward_impl("triton")
def _(x, weight, bias, cache, stride, dilation, padding, replicate, y):
    from pyratok.kernels import causal_conv3d as tk

    tk.causal_conv3d_forward(x, weight, bias, cache, stride, dilation, padding, replicate, y)


def _allocate_y(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], cache: Optional[torch.Tensor],
                stride: list[int], dilation: list[int], padding: list[int], replicate: bool,
                algorithm: int = int(ConvAlgorithm.AUTO)) -> torch.Tensor:
    """y of the C++ forward kernel, whose ``algorithm`` (ConvAlgorithm) picks the cpu forward."""
    return _empty_like_layout(x, output_shape(x.shape, weight.shape, stride, dilation, padding))


_native_forward = native_kernel("_causal_conv3d", _allocate_y)


def _native(algorithm: ConvAlgorithm):
    return lambda *args: _native_forward(*args[:-1], int(algorithm), args[-1])


_forward_impl("cpu", "cuda")(_native(ConvAlgorithm.AUTO))  # cuda has one algorithm
_forward_impl("cpu:direct")(_native(ConvAlgorithm.DIRECT))
_forward_impl("cpu:winograd")(_native(ConvAlgorithm.WINOGRAD))


@define("causal_conv3d_backward", family="causal_conv3d", native="_causal_conv3d_backward")
def _causal_conv3d_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               cache: Optional[torch.Tensor], stride: list[int], dilation: list[int],
                               padding: list[int], replicate: bool,
                               output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (grad_x, grad_past, grad_weight, grad_bias); those not asked for have 0 elements."""
    B, C, _, H, W = x.shape
    P = ref.past_frames(weight.shape[2], stride[0], dilation[0])
    return (_empty_like_layout(x, x.shape) if output_mask[0] else x.new_empty(0),
            _empty_like_layout(x, (B, C, P, H, W)) if output_mask[1] else x.new_empty(0),
            weight.new_empty(weight.shape) if output_mask[2] else weight.new_empty(0),
            x.new_empty(weight.shape[0]) if output_mask[3] else x.new_empty(0))


@_causal_conv3d_backward_op.impl("reference", into=True)
def _(grad_y, x, weight, cache, stride, dilation, padding, replicate, output_mask, outs):
    grads = ref.causal_conv3d_backward(grad_y.to(x.dtype), x, weight, cache, stride, dilation, padding,
                                       "replicate" if replicate else "zeros")
    for out, grad, wanted in zip(outs, grads, output_mask):
        if wanted:
            out.copy_(grad)


@_causal_conv3d_backward_op.impl("triton", into=True)
def _(grad_y, x, weight, cache, stride, dilation, padding, replicate, output_mask, outs):
    from pyratok.kernels import causal_conv3d as tk

    grad_y = grad_y.to(x.dtype)
    grad_x, grad_past, grad_weight, grad_bias = outs
    if output_mask[0] or output_mask[1]:
        tk.causal_conv3d_input_grad(grad_y, weight, x.shape, stride, dilation, padding,
                                    grad_x if output_mask[0] else None, grad_past if output_mask[1] else None)
    if output_mask[2]:
        accum = torch.zeros(weight.shape, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                            device=x.device)
        tk.causal_conv3d_weight_grad(x, cache, grad_y, stride, dilation, padding, replicate, accum)
        grad_weight.copy_(accum)
    if output_mask[3]:
        grad_bias.copy_(grad_y.sum((0, 2, 3, 4), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, cache, stride, dilation, padding, replicate, backend = inputs
    ctx.save_for_backward(x, weight, cache)
    ctx.has_bias = bias is not None
    ctx.conv = (list(stride), list(dilation), list(padding), replicate, backend)


def _backward(ctx, grad_y, grad_new_cache):
    x, weight, cache = ctx.saved_tensors
    stride, dilation, padding, replicate, backend = ctx.conv
    need_x, need_w, need_b, need_cache = ctx.needs_input_grad[:4]
    P = ref.past_frames(weight.shape[2], stride[0], dilation[0])
    T = x.shape[2]
    # the past frames' gradient goes to the cache, or to frame 0 when replicated
    need_past = P > 0 and (need_cache if cache is not None else (replicate and need_x))
    mask = [need_x, need_past, need_w, need_b and ctx.has_bias]
    if grad_y is None:
        grad_y = x.new_zeros(output_shape(x.shape, weight.shape, stride, dilation, padding))
    grad_x, grad_past, grad_w, grad_b = _causal_conv3d_backward_op.call(
        grad_y, x, weight, cache, stride, dilation, padding, replicate, mask, backend)
    if grad_new_cache is not None and P > 0:
        # new_cache = frames [T, T+P) of [past, x]: the last min(P, T) come from x
        from_x = min(P, T)
        if need_x:
            grad_x[:, :, T - from_x:] += grad_new_cache[:, :, P - from_x:]
        if need_past and from_x < P:
            grad_past[:, :, T:] += grad_new_cache[:, :, :P - from_x]
    if need_past and cache is None:
        grad_x[:, :, :1] += grad_past.sum(2, keepdim=True)
    return (grad_x if need_x else None, grad_w if need_w else None, grad_b if mask[3] else None,
            grad_past if need_past and cache is not None else None, None, None, None, None, None)


_causal_conv3d_op.autograd(_backward, _setup_context)


# ---------------------------------------------------------------------------------------
# public API


def causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  stride: IntOr3 = 1, dilation: IntOr3 = 1, padding=0, time_pad_mode: str = "zeros",
                  cache: Optional[torch.Tensor] = None, backend: Optional[str] = None):
    """y, new_cache = causal_conv3d(x (B,C,T,H,W), weight (O,C,kt,kh,kw), ...).

    Past padding P = dt*(kt-1) + 1 - st frames from ``cache`` (B, C, P, H, W) or, for the
    first chunk, zeros / replicated frame 0 (``time_pad_mode``); spatial zero ``padding``
    (ph, pw).  Returns y (B, O, T/st, Ho, Wo) in x's layout and the cache for the next
    chunk (the last P frames of the padded input).  ``backend`` picks the implementation
    (see pyratok._backend; ``"cpu:direct"`` / ``"cpu:winograd"`` fix the cpu forward's
    algorithm, see the module docstring); None = automatic.
    """
    stride, dilation, padding = triple(stride, "stride"), triple(dilation, "dilation"), pair(padding, "padding")
    check_float(x, "x")
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        # like nn.Conv3d under autocast: the convolution runs in the autocast dtype (custom ops
        # are opaque to autocast, so the cast happens here, before the checks)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        cache = cache.to(dtype) if cache is not None else None
    if x.dim() != 5:
        raise ValueError(f"x: expected a 5-D tensor (B, C, T, H, W), got shape {tuple(x.shape)}")
    check_float(weight, "weight", x)
    if weight.dim() != 5:
        raise ValueError(f"weight: expected (out, in, kt, kh, kw), got shape {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x: has {x.shape[1]} channels but weight expects {weight.shape[1]}")
    # zero-sized dimensions, the same decision for every backend: an empty batch gives an empty
    # output; no input or output channels, or an empty frame or kernel axis, is an error
    if x.shape[1] == 0 or weight.shape[0] == 0:
        raise ValueError(f"x, weight: a convolution needs >= 1 input and >= 1 output channel, got "
                         f"C={x.shape[1]} (x.shape[1]) and O={weight.shape[0]} (weight.shape[0])")
    if 0 in x.shape[3:] or 0 in weight.shape[2:]:
        raise ValueError(f"x, weight: empty frame {tuple(x.shape[3:])} or kernel {tuple(weight.shape[2:])}; "
                         "every spatial and kernel size must be >= 1")
    if bias is not None:
        check_float(bias, "bias", x)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if time_pad_mode not in TIME_PAD_MODES:
        raise ValueError(f"time_pad_mode={time_pad_mode!r}: expected 'zeros' or 'replicate'")
    P = ref.past_frames(weight.shape[2], stride[0], dilation[0])
    if P < 0:
        raise ValueError(f"stride[0]={stride[0]} exceeds the temporal receptive field {dilation[0] * (weight.shape[2] - 1) + 1}")
    if x.shape[2] == 0 or x.shape[2] % stride[0]:
        raise ValueError(f"x: chunk of {x.shape[2]} frames is not a positive multiple of the temporal stride {stride[0]}")
    _, _, _, Ho, Wo = output_shape(x.shape, weight.shape, stride, dilation, padding)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"x: spatial size {tuple(x.shape[3:])} with padding {padding} is smaller than the "
                         f"kernel's extent {tuple(d * (k - 1) + 1 for d, k in zip(dilation[1:], weight.shape[3:]))}")
    if cache is not None:
        check_float(cache, "cache", x)
        want = (x.shape[0], x.shape[1], P, x.shape[3], x.shape[4])
        if tuple(cache.shape) != want:
            raise ValueError(f"cache: shape {tuple(cache.shape)} does not fit this layer and input; expected {want}")
    return _causal_conv3d_op(x, weight, bias, cache, list(stride), list(dilation), list(padding),
                             time_pad_mode == "replicate", backend=backend)
