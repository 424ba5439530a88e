"""What every Triton launcher of pyratok.kernels shares: the device its kernels run on and
the numeric choices that follow PyTorch's own flags.

Triton launches on the *current* CUDA device and stream, not on the device of the tensors it
is given, so a launcher called with tensors on cuda:1 while cuda:0 is current would run its
kernel on the wrong device (an illegal address, or silently wrong results).  Every public
launcher is wrapped in :func:`on_tensor_device`, which makes the tensors' device current for
the launch, as c10::cuda::CUDAGuard does for the C++ kernels.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def tensor_device(args, kwargs) -> torch.device | None:
    """The device of the first tensor among a call's arguments."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def device_guard(device: torch.device | None):
    """A context that makes ``device`` the current CUDA device (nothing for other devices)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_tensor_device(launcher):
    """Decorator: run ``launcher`` with its first tensor argument's CUDA device current."""

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        with device_guard(tensor_device(args, kwargs)):
            return launcher(*args, **kwargs)

    guarded.device_guarded = True
    return guarded


def conv_fp32_precision() -> str:
    """tl.dot's input precision for fp32 convolutions: what cuDNN uses for PyTorch's own
    convolutions.  PyTorch's default allows TF32 there (``torch.backends.cudnn.allow_tf32``,
    or ``torch.backends.cudnn.conv.fp32_precision`` in newer releases), so by default an fp32
    Triton convolution rounds its operands to TF32 (10-bit mantissa: relative error ~1e-3 of
    the operands' magnitude per product, ~5e-4 * sqrt(K) typical on a sum of K terms), exactly
    like F.conv3d on the same GPU; ``torch.backends.cudnn.allow_tf32 = False`` makes both IEEE
    fp32.  Triton's CPU interpreter always computes IEEE fp32, whatever this returns."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):  # PyTorch before the fp32_precision API
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    # the new API: "none" at a level defers to the level above (conv -> cudnn -> global)
    for level in (conv, torch.backends.cudnn, torch.backends):
        precision = getattr(level, "fp32_precision", "none")
        if precision != "none":
            return "tf32" if precision == "tf32" else "ieee"
    return "ieee"
