"""What a static review of the CUDA and Triton kernels found (issue 21), checked on a CPU
machine wherever a CPU path can show it (the Triton interpreter, fake CUDA tensors, the
dispatch code); benchmarks/device_check.sh checks the rest on a GPU.  Also: zero-sized
dimensions in every op (issue 19, item 3) and the K = 64 bit labels (issue 19, item 11).

Tolerance rules for the GPU paths (the interpreter computes exact IEEE fp32, so these only
bite on a GPU; tests/test_causal_conv3d.py and tests/test_entropy.py use them):
  * fp32 Triton convolution: TF32 by default, like cuDNN (torch.backends.cudnn.allow_tf32);
    error vs fp64 up to ~1e-3 relative to sum |w x|; IEEE fp32 with allow_tf32 = False.
  * Triton entropy kernels: tl.exp is ex2.approx for fp32 (< 6e-6 relative per exp), sums in
    fp32 with IEEE tl.dot: rtol 1e-5 of the fp64 value for N*K <= 1e5.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import pyratok
from pyratok import _backend, ops
from pyratok.reference import causal_conv3d as ref_conv
from conftest import CPU_BACKENDS

TRITON = "triton" in CPU_BACKENDS


# ---------------------------------------------------------------------------------------
# zero-sized dimensions, every op, every backend (a crash must not take the test run down)

ZERO_CASES = {
    "conv C=0": "ops.causal_conv3d(torch.randn(1, 0, 5, 8, 8), torch.randn(6, 0, 3, 3, 3), padding=1, backend=B)",
    "conv O=0": "ops.causal_conv3d(torch.randn(1, 2, 5, 8, 8), torch.randn(0, 2, 3, 3, 3), padding=1, backend=B)",
    "conv H=0": "ops.causal_conv3d(torch.randn(1, 2, 5, 0, 8), torch.randn(3, 2, 3, 3, 3), padding=2, backend=B)",
    "conv kw=0": "ops.causal_conv3d(torch.randn(1, 2, 5, 8, 8), torch.randn(3, 2, 3, 3, 0), padding=1, backend=B)",
    "conv B=0": "ops.causal_conv3d(torch.randn(0, 2, 5, 8, 8), torch.randn(3, 2, 3, 3, 3), torch.randn(3), "
                "padding=1, backend=B)",
    "conv B=0 grad": "grads(lambda x, w, b: ops.causal_conv3d(x, w, b, padding=1, backend=B)[0], "
                     "torch.randn(0, 2, 5, 8, 8), torch.randn(3, 2, 3, 3, 3), torch.randn(3))",
    "nn conv C=0": "pyratok.nn.CausalConv3d(0, 4, 3, padding=1, backend=B)(torch.randn(1, 0, 5, 8, 8))",
    "quantize N=0": "ops.binary_quantize(torch.randn(0, 4, 3), backend=B)",
    "quantize K=0": "ops.binary_quantize(torch.randn(2, 0, 3), backend=B)",
    "quantize K=64 bits": "ops.binary_quantize(torch.randn(2, 64, 3), bit_labels=True, backend=B)",
    "residual N=0": "ops.residual_binary_quantize(torch.randn(0, 4, 3), 2, backend=B)",
    "indices_to_codes N=0": "ops.indices_to_codes(torch.zeros(0, 3, dtype=torch.int32), 4, backend=B)",
    "indices_to_bits N=0": "ops.indices_to_bits(torch.zeros(0, dtype=torch.int32), 4, backend=B)",
    "bits_to_indices N=0": "ops.bits_to_indices(torch.zeros(0, 4, dtype=torch.uint8), backend=B)",
    "pack_bits N=0": "ops.pack_bits(torch.zeros(0, 4, dtype=torch.uint8), backend=B)",
    "pack_bits K=0": "ops.pack_bits(torch.zeros(3, 0, dtype=torch.uint8), backend=B)",
    "unpack_bits N=0": "ops.unpack_bits(torch.zeros(0, 1, dtype=torch.uint8), 4, backend=B)",
    "msb_to_lsb N=0": "ops.msb_to_lsb(torch.zeros(0, dtype=torch.int64), 4, backend=B)",
    "bit_probs N=0": "ops.bit_probs(torch.randn(0, 4), backend=B)",
    "per_sample_entropy N=0": "ops.per_sample_entropy(torch.randn(0, 4), backend=B)",
    "codebook_entropy N=0": "ops.codebook_entropy(torch.randn(0, 4), backend=B)",
    "lfq_entropy_loss N=0": "ops.lfq_entropy_loss(torch.randn(0, 4), backend=B)",
    "bernoulli_kl N=0": "ops.bernoulli_kl(torch.randn(0, 4), torch.randn(0, 4), backend=B)",
    "codebook_usage N=0": "ops.codebook_usage(torch.randn(0, 4), backend=B)",
}

_RUNNER = textwrap.dedent("""
    import json, sys, warnings
    import torch
    import pyratok, pyratok.nn
    from pyratok import ops
    warnings.simplefilter("ignore")
    backends = json.loads(sys.argv[1])
    cases = json.loads(sys.argv[2])

    def grads(f, *inputs):
        inputs = [t.requires_grad_() for t in inputs]
        f(*inputs).sum().backward()
        return [t.grad for t in inputs]

    def flat(r):
        if isinstance(r, torch.Tensor):
            return [r]
        if isinstance(r, (tuple, list)):
            return [t for v in r for t in flat(v)]
        return [t for v in getattr(r, "__dict__", {}).values() for t in flat(v)] if not hasattr(r, "_fields") \\
            else [t for v in r for t in flat(v)]

    for B in backends:
        for name, expr in cases.items():
            print(json.dumps({"backend": B, "case": name, "started": True}), flush=True)
            torch.manual_seed(0)
            try:
                out = [t.detach() for t in flat(eval(expr))]
                res = {"ok": [[list(t.shape), str(t.dtype), t.double().sum().item() if t.numel() else 0.0]
                              for t in out]}
            except (ValueError, TypeError) as e:
                res = {"error": type(e).__name__, "message": str(e)}
            print(json.dumps({"backend": B, "case": name, **res}), flush=True)
""")


@pytest.fixture(scope="module")
def zero_results() -> dict:
    """{backend: {case: result}}, from one interpreter that runs every case on every backend."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(CPU_BACKENDS), json.dumps(ZERO_CASES)],
                          capture_output=True, text=True, env=env, timeout=600)
    results, last = {b: {} for b in CPU_BACKENDS}, None
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            last = (r["backend"], r["case"])
            if not r.get("started"):
                results[r["backend"]][r["case"]] = r
    assert proc.returncode == 0, f"the process died (rc {proc.returncode}) in case {last!r}:\n{proc.stderr[-2000:]}"
    return results


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_sized_dimensions_match_the_reference_or_raise_clearly(zero_results, backend):
    ref, got = zero_results["reference"], zero_results[backend]
    for case in ZERO_CASES:
        r, g = ref[case], got[case]
        if "error" in g:
            # a clear error opens with the argument it is about ("x: ...", "x.shape[1] (K)=0: ...")
            assert re.match(r"^[\w\[\]\.\(\), ]+[:=]", g["message"]), (case, g)
        # every backend takes the same decision, and agrees on the values where there are any
        assert ("error" in r) == ("error" in g), (case, r, g)
        if "ok" in r:
            assert [s[:2] for s in r["ok"]] == [s[:2] for s in g["ok"]], (case, r, g)
            for (_, _, a), (_, _, b) in zip(r["ok"], g["ok"]):
                assert a == pytest.approx(b, rel=1e-5, abs=1e-5), (case, r, g)


@pytest.mark.slow
def test_zero_sized_convolutions_are_rejected_with_the_argument_named(zero_results):
    for backend in CPU_BACKENDS:
        for case in ("conv C=0", "conv O=0", "conv H=0", "conv kw=0", "nn conv C=0"):
            assert zero_results[backend][case]["error"] == "ValueError", (backend, case)
        assert "ok" in zero_results[backend]["conv B=0 grad"]
    # the C++ ops (pyratok::_causal_conv3d) refuse an empty reduction on their own too
    if "cpu" in CPU_BACKENDS:
        with pytest.raises(ValueError, match="channels"):
            torch.ops.pyratok._causal_conv3d(torch.randn(1, 0, 5, 8, 8), torch.randn(6, 0, 3, 3, 3), None, None,
                                             [1, 1, 1], [1, 1, 1], [1, 1], False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bit_labels_at_k64_agree_on_every_backend(backend):
    x = torch.randn(3, 64, 5, dtype=torch.float64)
    out = ops.binary_quantize(x, bit_labels=True, backend=backend)
    assert torch.equal(out.bits, (x > 0).movedim(1, -1).to(torch.uint8))
    assert torch.equal(out.codes, torch.where(x > 0, 1.0, -1.0).to(x.dtype))


# ---------------------------------------------------------------------------------------
# item 9: auto on CUDA tensors takes the PyTorch (cuDNN / cuBLAS) path until measured


@pytest.fixture
def fake_cuda_extension(monkeypatch):
    """The dispatch as it would run where pyratok._C has CUDA kernels and a GPU exists."""

    class Ext:
        with_cuda = True

    monkeypatch.setattr(_backend, "extension", lambda: Ext)
    monkeypatch.delenv("PYRATOK_BACKEND", raising=False)


@pytest.mark.parametrize("op", sorted(_backend.CUDA_AUTO))
def test_auto_on_cuda_takes_the_pytorch_path(fake_cuda_extension, op):
    cuda = torch.device("cuda", 1)
    assert _backend.why_unavailable("cuda", cuda) is None  # the custom kernels could run ...
    assert _backend.resolve(None, cuda, op) == "reference"  # ... but auto does not take them
    assert _backend.resolve("cuda", cuda, op) == "cuda"     # asked for, they run
    assert _backend.resolve(None, torch.device("cpu"), op) == "cpu"  # the CPU choice is unchanged


def test_auto_on_cuda_reaches_the_op(fake_cuda_extension, monkeypatch):
    """The ops pass their family to the dispatch: a (fake) CUDA tensor gets 'reference'."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen = []
    real = _backend.resolve
    monkeypatch.setattr(_backend, "resolve", lambda b, d, op=None: seen.append((d.type, op, real(b, d, op))) or
                        seen[-1][2])
    with FakeTensorMode():
        x = torch.empty(1, 4, 3, 8, 8, device="cuda:1")
        ops.causal_conv3d(x, torch.empty(4, 4, 3, 3, 3, device="cuda:1"), padding=1)
        ops.binary_quantize(x)
        ops.per_sample_entropy(torch.empty(16, 4, device="cuda:1"))
    assert seen == [("cuda", "causal_conv3d", "reference"), ("cuda", "binary_quantize", "reference"),
                    ("cuda", "entropy", "reference")]


# ---------------------------------------------------------------------------------------
# item 2: Triton launches under the tensors' device

pytestmark_triton = pytest.mark.skipif(not TRITON, reason="triton is not installed")


@pytestmark_triton
def test_every_triton_launcher_is_device_guarded():
    import inspect

    from pyratok.kernels import binary_quantize, causal_conv3d, entropy

    launchers = [f for m in (binary_quantize, causal_conv3d, entropy) for name, f in vars(m).items()
                 if inspect.isfunction(f) and not name.startswith("_") and f.__module__ == m.__name__
                 and name not in ("weight_grad_splits",)]
    assert len(launchers) == 19  # 8 quantization, 3 convolution, 8 entropy launchers
    unguarded = [f.__qualname__ for f in launchers if not getattr(f, "device_guarded", False)]
    assert not unguarded


@pytestmark_triton
def test_device_guard_makes_the_tensors_device_current(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyratok.kernels._launch import on_tensor_device

    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(("enter", self.device))

        def __exit__(self, *exc):
            entered.append(("exit", self.device))

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    launcher = on_tensor_device(lambda x, k: entered.append(("launch", x.device)))
    with FakeTensorMode():
        launcher(torch.empty(2, device="cuda:1"), 3)
    assert entered == [("enter", torch.device("cuda", 1)), ("launch", torch.device("cuda", 1)),
                       ("exit", torch.device("cuda", 1))]
    entered.clear()
    launcher(torch.empty(2), 3)  # CPU: no CUDA device switch
    assert entered == [("launch", torch.device("cpu"))]


# ---------------------------------------------------------------------------------------
# item 3: int32 overflow of the Triton convolution's index math


if TRITON:
    import triton
    import triton.language as tl

    from pyratok.kernels.causal_conv3d import _unravel4

    @triton.jit
    def _unravel_probe(i_ptr, out_ptr, n0, n1, n2, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        a, b, c, d = _unravel4(tl.load(i_ptr + r), n0, n1, n2)
        tl.store(out_ptr + r * 4, a)
        tl.store(out_ptr + r * 4 + 1, b)
        tl.store(out_ptr + r * 4 + 2, c)
        tl.store(out_ptr + r * 4 + 3, d)


@pytestmark_triton
def test_unravel_is_exact_past_2_to_the_31():
    n0, n1, n2 = 50_000, 40_000, 7          # int32 arguments; n0*n1*n2 = 1.4e10 wraps in int32
    idx = torch.tensor([0, 2**31 - 1, 2**31 + 5, 2**33 + 123_456, 3 * 2**34 + 7, n0 * n1 * n2 + 99, 12, 5],
                       dtype=torch.int64)
    out = torch.empty(8, 4, dtype=torch.int64)
    _unravel_probe[(1,)](idx, out, n0, n1, n2, BLOCK=8)
    want = []
    for i in idx.tolist():
        q0, a = divmod(i, n0)
        q1, b = divmod(q0, n1)
        d, c = divmod(q1, n2)
        want.append([a, b, c, d])
    assert out.tolist() == want


# ---------------------------------------------------------------------------------------
# item 4: fp32 precision of the Triton convolution follows PyTorch's cuDNN flag


@pytestmark_triton
def test_triton_conv_precision_follows_the_cudnn_flag():
    from pyratok.kernels.causal_conv3d import _dot_precision

    conv = getattr(torch.backends.cudnn, "conv", None)
    saved = (torch.backends.cudnn.allow_tf32, getattr(conv, "fp32_precision", None))
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert _dot_precision(torch.float32) == "tf32"
        assert _dot_precision(torch.float16) == "ieee" and _dot_precision(torch.float64) == "ieee"
        torch.backends.cudnn.allow_tf32 = False
        assert _dot_precision(torch.float32) == "ieee"
        if conv is not None and hasattr(conv, "fp32_precision"):
            conv.fp32_precision = "tf32"
            assert _dot_precision(torch.float32) == "tf32"
            conv.fp32_precision = "ieee"
            assert _dot_precision(torch.float32) == "ieee"
    finally:
        torch.backends.cudnn.allow_tf32 = saved[0]
        if saved[1] is not None:
            conv.fp32_precision = saved[1]


# ---------------------------------------------------------------------------------------
# item 5: the weight gradient is a deterministic reduction (partials, no atomics)


@pytestmark_triton
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_weight_gradient_partials(splits):
    from pyratok.kernels import causal_conv3d as tk

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6, 5, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, 3, dtype=torch.float64)
    stride, dilation, padding = (1, 1, 1), (1, 1, 1), (1, 1)
    y, _ = ref_conv.causal_conv3d(x, w, None, stride, dilation, padding)
    gy = torch.randn_like(y)
    want = ref_conv.causal_conv3d_backward(gy, x, w, None, stride, dilation, padding)[2]
    runs = []
    for _ in range(2):
        accum = torch.full(w.shape, float("nan"), dtype=torch.float64)  # every element is written
        tk.causal_conv3d_weight_grad(x, None, gy, stride, dilation, padding, False, accum, splits=splits)
        runs.append(accum)
    torch.testing.assert_close(runs[0], want, rtol=1e-10, atol=1e-10)
    assert torch.equal(runs[0], runs[1])


@pytestmark_triton
def test_triton_code_value_copies_nothing_to_the_device(monkeypatch):
    """The +scale code value is a kernel argument, not a tensor built per call on x's device
    (a host-to-device copy and a stream sync, which breaks CUDA-graph capture)."""
    from pyratok.kernels import binary_quantize as tk

    real = torch.tensor

    def no_device_tensors(*args, **kwargs):
        assert "device" not in kwargs, "a launcher built a tensor on the device from host data"
        return real(*args, **kwargs)

    x = torch.randn(2, 5, 7)
    tk.code_bits.cache_clear()
    monkeypatch.setattr(torch, "tensor", no_device_tensors)
    out = ops.binary_quantize(x, spherical=True, backend="triton")
    codes = ops.indices_to_codes(out.indices, 5, spherical=True, backend="triton")
    monkeypatch.setattr(torch, "tensor", real)
    want = ops.binary_quantize(x, spherical=True, backend="reference")
    assert torch.equal(out.codes, want.codes) and torch.equal(codes, want.codes)


# ---------------------------------------------------------------------------------------
# item 8: the Triton entropy backward splits the code space


@pytestmark_triton
def test_triton_entropy_backward_splits_the_code_space(monkeypatch):
    from pyratok.kernels import entropy as tk
    from pyratok.reference import entropy as ref

    # on a GPU (not interpreted), N = 192 tokens with 8 + 8 bits: > 3 programs per half
    own_per, other_per = tk._backward_splits(3, 8, 8, 64, 64, 192, 16, interpreted=False)
    assert (256 // own_per) * (256 // other_per) * 3 >= 12
    # run those splits under the interpreter: same gradient as the reference
    real = tk._backward_splits
    monkeypatch.setattr(tk, "_backward_splits", lambda *a: real(*a[:-1], interpreted=False))
    monkeypatch.setattr(tk, "TARGET_PROGRAMS", 64)
    torch.manual_seed(0)
    x = torch.randn(40, 10, dtype=torch.float64)
    g = torch.randn(1 << 10, dtype=torch.float64)
    got = tk.soft_code_counts_backward(x, 0.7, [10], g)
    want = ref.soft_code_counts_backward(x, 0.7, [10], g)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
