"""Shared test setup: the backends present on this machine, devices, tolerances."""

import os

import torch

# Triton kernels run on the CPU under the interpreter; it must be chosen before triton
# is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pyratok  # noqa: E402

CPU_BACKENDS = pyratok.available_backends("cpu")
FAST_CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]
HAS_CUDA = torch.cuda.is_available()
CUDA_BACKENDS = pyratok.available_backends("cuda") if HAS_CUDA else []

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")


def pytest_report_header(config):
    return [f"pyratok backends on cpu: {CPU_BACKENDS}; cuda: {CUDA_BACKENDS or 'no device'}"]


def backend_dtypes(backend: str):
    """Float dtypes a backend is tested in (the Triton interpreter has no bfloat16)."""
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        dtypes.remove(torch.bfloat16)
    return dtypes


def lpips_weights_file(path) -> str:
    """A state dict in the lpips package's VGG layout (random He-initialised convs, positive
    channel weights), saved as a user would save the real one; -> its path."""
    from pyratok.lpips import _CHANNELS, _SLICES

    torch.manual_seed(0)
    state = {}
    for s, layers in enumerate(_SLICES):
        for index, i, o in layers:
            state[f"net.slice{s + 1}.{index}.weight"] = torch.randn(o, i, 3, 3) * (2 / (9 * i)) ** 0.5
            state[f"net.slice{s + 1}.{index}.bias"] = torch.zeros(o)
    for s, c in enumerate(_CHANNELS):
        state[f"lin{s}.model.1.weight"] = torch.rand(1, c, 1, 1)
    torch.save(state, path)
    return str(path)


def recording_to(tensor: torch.Tensor, calls: list) -> torch.Tensor:
    """``tensor`` as a tensor that appends (args, kwargs) of every .to() call made on it to
    ``calls`` and then moves as a plain tensor: what a device move is asked for, on a machine with
    no second device that holds data."""
    class RecordsTo(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to:
                calls.append((args[1:], kwargs or {}))
                return args[0].as_subclass(torch.Tensor).to(*args[1:], **(kwargs or {}))
            return super().__torch_function__(func, types, args, kwargs or {})

    return tensor.as_subclass(RecordsTo)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny PyraTok (random weights, no text encoder): a model folder for CLI tests."""
    from pyratok.models.pyratok import PyraTok, PyraTokConfig

    path = tmp_path_factory.mktemp("model") / "tiny"
    torch.manual_seed(0)
    PyraTok(PyraTokConfig.tiny(text_encoder=None)).save_pretrained(str(path))
    return str(path)
