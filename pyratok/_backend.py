"""Backend choice for every pyratok op (DESIGN.md §1).

Order of precedence: an explicit ``backend=`` argument, then the environment variable
``PYRATOK_BACKEND``, then the automatic choice: on CPU tensors the C++ extension (``cpu``)
when it is built, else ``reference``; on CUDA tensors the PyTorch path each op's table entry
in :data:`CUDA_AUTO` names (cuDNN / cuBLAS / ATen: the ``reference`` backend) until
benchmarks/device_check.sh has measured a custom kernel faster on the GPU.  Triton runs only
when asked for.  An explicitly requested backend that cannot run raises
:class:`BackendUnavailable` saying why; all backends agree bit-exactly on discrete
outputs, so the automatic choice never changes results.  :data:`VARIANTS` name algorithm
choices of a backend (``"cpu:direct"``, ``"cpu:winograd"``) that ops take as their backend
argument; the ops resolve and dispatch through pyratok/ops/_define.py.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Variants of a backend: an algorithm choice that changes numerics, named in the backend (an
# argument of every op, so visible to torch.compile and chosen per call, not process state).
# An op that declares no implementation of a variant runs its base backend.
VARIANTS = {
    "cpu:direct": "cpu",    # causal_conv3d: the direct implicit GEMM forward
    "cpu:winograd": "cpu",  # causal_conv3d: Winograd F(2x2, 3x3) wherever the geometry allows
}


def base(backend: str) -> str:
    """The backend a variant runs on ("cpu:direct" -> "cpu"); other names unchanged."""
    return VARIANTS.get(backend, backend)


# What ``auto`` runs on CUDA tensors, per op family, and why.  No custom CUDA or Triton kernel
# has been measured against the vendor path it replaces on a GPU yet, so every op takes the
# PyTorch path; an entry changes to "cuda" (or "triton") only with a device_check.sh
# measurement showing it faster on the same shapes.
CUDA_AUTO = {
    "causal_conv3d": ("reference", "cuDNN conv3d on x with only the P causal past frames concatenated in front "
                                   "(spatial padding inside cuDNN); cuDNN's own backward"),
    "binary_quantize": ("reference", "ATen elementwise ops (compare, where, shifts): memory bound either way"),
    "entropy": ("reference", "ATen sigmoid/log-sum and cuBLAS GEMMs for the half-split code counts"),
}


class BackendUnavailable(RuntimeError):
    """Raised when an explicitly requested backend cannot run here."""


@lru_cache(maxsize=None)
def extension():
    """The compiled module pyratok._C, or None when the package was built without it
    (or when PYRATOK_NO_EXT=1 asks to ignore it, e.g. to compare against a pure install)."""
    if os.environ.get("PYRATOK_NO_EXT") == "1":
        extension.error = "PYRATOK_NO_EXT=1"
        return None
    try:
        from pyratok import _C  # noqa: F401  (importing registers torch.ops.pyratok._*)
    except ImportError as err:  # PYRATOK_BUILD_EXT=0, or a build for another torch
        extension.error = str(err)
        return None
    return _C


@lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on tensors of ``device``, else the reason."""
    if backend in VARIANTS:
        return why_unavailable(VARIANTS[backend], device)
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        ext = extension()
        if ext is None:
            return f"the C++ extension pyratok._C is not built ({getattr(extension, 'error', 'PYRATOK_BUILD_EXT=0')})"
        if backend == "cuda" and not ext.with_cuda:
            return "pyratok._C was built without CUDA kernels"
        if device.type != backend:
            return f"backend '{backend}' runs on {backend} tensors, got a tensor on {device}"
        return None
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed (pip install 'pyratok[triton]')"
        if device.type == "cpu" and not triton_interpreted():
            return "triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before importing triton"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device}"
        return None
    return f"unknown backend '{backend}'; choose one of {BACKENDS + tuple(VARIANTS)}"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if why_unavailable(b, device) is None]


def resolve(backend: str | None, device: torch.device, op: str | None = None) -> str:
    """The backend to run for tensors on ``device``; ``op`` (a key of :data:`CUDA_AUTO`)
    chooses what ``auto`` runs on CUDA tensors."""
    if backend is None:
        backend = os.environ.get("PYRATOK_BACKEND") or "auto"
    if backend == "auto":
        if device.type == "cuda" and op in CUDA_AUTO:
            choice = CUDA_AUTO[op][0]
            if why_unavailable(choice, device) is None:
                return choice
        if device.type in ("cpu", "cuda") and why_unavailable(device.type, device) is None:
            return device.type
        return "reference"
    reason = why_unavailable(backend, device)
    if reason is not None:
        raise BackendUnavailable(f"backend={backend!r} cannot run: {reason}")
    return backend
