"""One declaration per op: :func:`define` registers a ``pyratok::<name>`` custom op from

* its ``allocate`` function, whose annotated signature is the op's schema (plus a trailing
  ``str backend``) and which returns the empty outputs: it is the fake kernel (torch.compile,
  meta tensors) and allocates the outputs of the implementations declared ``into=True``;
* its implementations, one per backend (``@op.impl("reference", ...)``; ``native="_name"``
  declares the C++ kernel op ``torch.ops.pyratok._name.out`` the cpu and cuda ones, see
  :func:`native_kernel`);
* its autograd formula (``op.autograd(backward, setup_context)``).

Dispatch is written here once: ``op(*args, backend=None)`` resolves the backend (an argument,
then ``PYRATOK_BACKEND``, then the automatic choice, raising ``BackendUnavailable`` with the
reason from pyratok._backend) on the device of the first tensor argument and calls the custom
op, which runs the implementation of that backend.  A backend variant (``"cpu:direct"``) runs
the op's implementation of that variant when it declares one, else the base backend's: the
variant names an algorithm choice only for the ops that have one.

Example::

    @define("bit_probs", family="entropy", native="_bit_probs")
    def bit_probs_op(x: torch.Tensor, coef: float) -> torch.Tensor:
        return x.new_empty(x.shape, dtype=torch.float32)

    @bit_probs_op.impl("reference")
    def _(x, coef):
        return torch.sigmoid(coef * x.float())
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

from pyratok import _backend


class Op:
    """A declared ``pyratok::<name>`` op; call it as ``op(*args, backend=None)``."""

    def __init__(self, name: str, allocate: Callable, family: str, native: Optional[str] = None):
        self.name = name
        self.family = family  # the key of pyratok._backend.CUDA_AUTO that chooses "auto" on CUDA
        self.allocate = allocate
        self._impls: dict[str, tuple[Callable, bool]] = {}
        if native is not None:
            self._impls["cpu"] = self._impls["cuda"] = (native_kernel(native, allocate), True)

        def run(*args):
            return self._run(args[:-1], args[-1])

        # the schema: allocate's parameters and return type, then the backend
        sig = inspect.signature(allocate, eval_str=True)
        params = list(sig.parameters.values())
        self._nargs = len(params)
        params.append(inspect.Parameter("backend", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str))
        run.__signature__ = sig.replace(parameters=params)
        run.__name__ = name
        run.__doc__ = allocate.__doc__
        self.op = torch.library.custom_op(f"pyratok::{name}", run, mutates_args=())
        self.op.register_fake(lambda *args: allocate(*args[:-1]))

    # ---- declaration

    def impl(self, *backends: str, into: bool = False):
        """Declares the decorated function the implementation for ``backends``.  ``into=True``:
        it takes the outputs ``allocate`` made as its last argument and fills them."""

        def register(fn):
            for backend in backends:
                self._impls[backend] = (fn, into)
            return fn

        return register

    def autograd(self, backward: Callable, setup_context: Optional[Callable] = None) -> None:
        """``backward(ctx, *grads)`` returns one gradient per argument, the backend included (None);
        ``setup_context`` defaults to :func:`save_inputs`."""
        self.op.register_autograd(backward, setup_context=setup_context or save_inputs)

    # ---- dispatch

    def implementation(self, backend: str) -> tuple[Callable, bool]:
        found = self._impls.get(backend) or self._impls.get(_backend.base(backend))
        if found is None:
            raise _backend.BackendUnavailable(
                f"backend={backend!r} cannot run: pyratok::{self.name} has no such implementation "
                f"(it has {sorted(self._impls)})")
        return found

    def _run(self, args: tuple, backend: str):
        fn, into = self.implementation(backend)
        if not into:
            return fn(*args)
        out = self.allocate(*args)
        fn(*args, out)
        return out

    def resolve(self, backend: Optional[str], device: torch.device) -> str:
        """The backend this op runs for tensors on ``device`` (see pyratok._backend.resolve)."""
        name = _backend.resolve(backend, device, self.family)
        self.implementation(name)
        return name

    def __call__(self, *args, backend: Optional[str] = None):
        if len(args) == self._nargs + 1:  # the backend passed positionally, as in the schema
            *args, backend = args
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        return self.op(*args, self.resolve(backend, device))

    def call(self, *args):
        """Calls the custom op with an already resolved backend as the last argument (autograd
        formulas, ops composed of other ops)."""
        return self.op(*args)


def native_kernel(name: str, allocate: Callable) -> Callable:
    """The C++ kernel op ``torch.ops.pyratok.<name>.out``, whose schema is ``allocate``'s
    arguments followed by the outputs ``allocate`` returns (``Tensor(a!)``, one per output) and
    which writes into them (csrc/torch/*.cpp: one function per op over the CPU/CUDA device
    policy; it decides no shape or layout).  Returns ``kernel(*args, out)`` for an ``into=True``
    implementation.

    Also defines the functional ``pyratok::<name>(*args)``: ``allocate``, then the kernel (its
    fake kernel is ``allocate``), for calling the C++ kernels directly (tests, debugging)."""

    def kernel(*args):
        *args, out = args
        getattr(torch.ops.pyratok, name).out(*args, *(out if isinstance(out, tuple) else (out,)))

    signature = inspect.signature(allocate, eval_str=True)

    def functional(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        out = allocate(*bound.args)
        kernel(*bound.args, out)
        return out

    functional.__signature__ = signature
    functional.__name__ = name
    torch.library.custom_op(f"pyratok::{name}", functional, mutates_args=()).register_fake(allocate)
    return kernel


def define(name: str, *, family: str, native: Optional[str] = None) -> Callable[[Callable], Op]:
    """Decorator: the decorated function is the op's ``allocate`` (see the module docstring)."""
    return lambda allocate: Op(name, allocate, family, native)


def save_inputs(ctx, inputs, output) -> None:
    """The default autograd setup: saves the tensor inputs (``ctx.saved_tensors``); the other
    arguments stay in ``ctx.inputs`` (None where a tensor was) and the backend in ``ctx.backend``."""
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])
    ctx.inputs = [None if isinstance(t, torch.Tensor) else t for t in inputs]
    ctx.backend = inputs[-1]
