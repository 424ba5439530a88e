"""GPU checks of issue 21 (static review of the CUDA and Triton kernels), one item per check.

usage: python benchmarks/gpu_check.py [--out DIR] [--only NAME,...] [--list] [--small]

Run by benchmarks/device_check.sh on a lent GPU; every check prints one verdict line
(PASS / FAIL / SKIP with the reason) and the figures behind it, and all results go to
DIR/gpu_check.json.  ``--small`` runs only the small launches of every CUDA kernel (both
layouts, every dtype) once: the workload that device_check.sh runs under compute-sanitizer
(memcheck, racecheck) and Nsight Compute.  ``--list`` prints the checks.

Checks (issue 21 item in brackets):
  empty          [1]  B = 0 forward/backward on the cuda and triton backends; C = 0 rejected
  device_guard   [2]  Triton launches with tensors on cuda:1 while cuda:0 is current (>= 2 GPUs)
  overflow       [3]  1x1x1 conv, C = O = 1, fp16, >= 2^31 output positions: every output written
  tf32           [4]  fp32 conv error vs fp64 with TF32 on and off (triton, cuda, cuDNN side by side);
                      Triton entropy (tl.exp) error vs fp64
  determinism    [5]  weight gradient and entropy sums bit-identical over repeated runs, and no error
                      under torch.use_deterministic_algorithms(True)
  checks         [6]  the CUDA backward rejects a grad_y of the wrong shape; bf16 conv correct
  dispatch       [9]  what `auto` runs on CUDA tensors per op (the PyTorch path until measured)
  speed          [7-9] custom kernels vs the PyTorch path they would replace (median ms, same run):
                      the measurement that may move an op's CUDA_AUTO entry
  kernels        [8]  channels-last binary_quantize, the shared-memory histogram, the split Triton
                      entropy backward: equal to the reference
  cpasync        [7]  the CUDA conv's cp.async staging (fp16/bf16, sm_80+): both layouts, 16-byte
                      aligned tensors (spans copied) and the same tensors 2 bytes off (element path),
                      spatial/causal padding, stride 2, a cache, C = 3: forward and both gradients
                      equal the fp64 reference within the format's rounding, and the aligned and
                      misaligned runs bit-identical (the same tiles reach the same MMAs)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

# cuBLAS is deterministic only with a fixed workspace; the determinism check turns on
# torch.use_deterministic_algorithms, which otherwise raises for every cuBLAS GEMM
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pyratok  # noqa: E402
from pyratok import _backend, ops  # noqa: E402
from pyratok.ops import entropy as entropy_ops  # noqa: E402
from pyratok.reference import causal_conv3d as ref_conv  # noqa: E402
from pyratok.reference import entropy as ref_entropy  # noqa: E402

RESULTS: dict = {}


def custom_backends():
    return [b for b in ("cuda", "triton") if _backend.why_unavailable(b, torch.device("cuda")) is None]


def record(name, ok, **figures):
    verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    RESULTS[name] = {"verdict": verdict, **figures}
    print(f"[{verdict}] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


def timed(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


def conv_grads(backend, x, w, b, **kw):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y, _ = ops.causal_conv3d(x, w, b, backend=backend, **kw)
    y.backward(torch.ones_like(y) if y.numel() == 0 else torch.randn_like(y, generator=None))
    return y, x.grad, w.grad


# ---- checks -----------------------------------------------------------------------------


def check_empty():
    ok, notes = True, []
    for backend in custom_backends():
        x = torch.randn(0, 4, 5, 8, 8, device="cuda")
        w = torch.randn(6, 4, 3, 3, 3, device="cuda")
        b = torch.randn(6, device="cuda")
        y, gx, gw = conv_grads(backend, x, w, b, padding=1)
        good = y.shape == (0, 6, 5, 8, 8) and gx.shape == x.shape and torch.count_nonzero(gw).item() == 0
        try:
            ops.causal_conv3d(torch.randn(1, 0, 5, 8, 8, device="cuda"), torch.randn(6, 0, 3, 3, 3, device="cuda"),
                              padding=1, backend=backend)
            good = False
        except ValueError:
            pass
        ok &= good
        notes.append(f"{backend}:{'ok' if good else 'wrong'}")
    record("empty", ok, backends=" ".join(notes))


def check_device_guard():
    if torch.cuda.device_count() < 2 or "triton" not in custom_backends():
        return record("device_guard", None, reason=f"{torch.cuda.device_count()} GPU(s) / triton missing")
    with torch.cuda.device(0):
        x = torch.randn(1, 4, 5, 8, 8, device="cuda:1")
        w = torch.randn(6, 4, 3, 3, 3, device="cuda:1")
        y, _ = ops.causal_conv3d(x, w, padding=1, backend="triton")
        q = ops.binary_quantize(x, backend="triton")
        h = ops.per_sample_entropy(x, backend="triton")
        torch.cuda.synchronize(1)
    want, _ = ref_conv.causal_conv3d(x.cpu(), w.cpu(), None, (1, 1, 1), (1, 1, 1), (1, 1))
    err = (y.cpu() - want).abs().max().item()
    record("device_guard", err < 1e-2 and q.indices.device.index == 1 and h.device.index == 1, max_err=f"{err:.2e}")


def check_overflow():
    T, H, W = 2, 32768, 32769            # 2^31 + 65536 output positions
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        return record("overflow", None, reason="needs >= 24 GiB")
    ok, notes = True, []
    x = torch.randn(1, 1, T, H, W, device="cuda", dtype=torch.float16)
    w = torch.full((1, 1, 1, 1, 1), 2.0, device="cuda", dtype=torch.float16)
    for backend in custom_backends():
        y, _ = ops.causal_conv3d(x, w, backend=backend)
        wrong = (y != 2 * x).sum().item()   # 2x is exact in fp16
        ok &= wrong == 0
        notes.append(f"{backend}:{wrong} wrong of {y.numel()}")
        del y
    del x
    torch.cuda.empty_cache()
    record("overflow", ok, positions=T * H * W, results=" ".join(notes))


def conv_error(backend, x64, w64, tf32):
    torch.backends.cudnn.allow_tf32 = tf32
    y, _ = ops.causal_conv3d(x64.float(), w64.float(), padding=1, backend=backend)
    want, _ = ref_conv.causal_conv3d(x64, w64, None, (1, 1, 1), (1, 1, 1), (1, 1))
    scale = ref_conv.causal_conv3d(x64.abs(), w64.abs(), None, (1, 1, 1), (1, 1, 1), (1, 1))[0]
    return ((y.double() - want).abs() / scale.clamp_min(1e-30)).max().item()


def check_tf32():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 5, 24, 24, device="cuda", dtype=torch.float64)
    w = torch.randn(64, 64, 3, 3, 3, device="cuda", dtype=torch.float64)
    saved = torch.backends.cudnn.allow_tf32
    figures, ok = {}, True
    try:
        for tf32 in (False, True):
            errs = {b: conv_error(b, x, w, tf32) for b in ["reference", *custom_backends()]}
            for b, e in errs.items():
                figures[f"{b}_{'tf32' if tf32 else 'ieee'}"] = f"{e:.2e}"
            # IEEE: within 2x of cuDNN's own fp32 error; TF32: at the TF32 level (2^-11 relative
            # per operand), as cuDNN's
            bound = 2 * errs["reference"] + 1e-7 if not tf32 else max(4 * errs["reference"], 2e-3)
            ok &= all(e <= bound for e in errs.values())
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    if "triton" in custom_backends():
        z = torch.randn(4096, 16, device="cuda", dtype=torch.float64) * 3
        for name, fn in (("per_sample_entropy", ops.per_sample_entropy), ("codebook_entropy", ops.codebook_entropy)):
            got = fn(z.float(), inv_temperature=1.0, backend="triton").double()
            want = fn(z, inv_temperature=1.0, backend="reference")
            rel = ((got - want).abs() / want.abs()).item()
            figures[f"triton_{name}_rel"] = f"{rel:.2e}"
            ok &= rel <= 1e-5
    record("tf32", ok, **figures)


def check_determinism():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 9, 32, 32, device="cuda")
    w = torch.randn(48, 32, 3, 3, 3, device="cuda")
    gy = torch.randn(2, 48, 9, 32, 32, device="cuda")
    figures, ok = {}, True
    for backend in custom_backends() + ["reference"]:
        grads = []
        for _ in range(3):
            xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
            y, _ = ops.causal_conv3d(xx, ww, padding=1, backend=backend)
            y.backward(gy)
            grads.append(ww.grad)
        same = all(torch.equal(grads[0], g) for g in grads[1:])
        figures[f"{backend}_weight_grad"] = "bit-identical" if same else "DIFFERS"
        ok &= same or backend == "reference"  # cuDNN may pick a non-deterministic algorithm
    z = torch.randn(1 << 20, 16, device="cuda")
    for backend in custom_backends():
        sums = [ops.per_sample_entropy(z, backend=backend) for _ in range(3)]
        kl = [ops.bernoulli_kl(z, z.flip(0), backend=backend) for _ in range(3)]
        same = all(torch.equal(sums[0], s) for s in sums) and all(torch.equal(kl[0], k) for k in kl)
        figures[f"{backend}_entropy_sums"] = "bit-identical" if same else "DIFFERS"
        ok &= same
    torch.use_deterministic_algorithms(True)
    try:
        for backend in [None, *custom_backends()]:
            xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
            y, _ = ops.causal_conv3d(xx, ww, padding=1, backend=backend)
            y.backward(gy)
            ops.lfq_entropy_loss(z[:4096].clone().requires_grad_(), backend=backend).loss.backward()
        figures["use_deterministic_algorithms"] = "no error"
    except RuntimeError as err:
        figures["use_deterministic_algorithms"] = f"raised: {str(err)[:120]}"
        ok = False
    finally:
        torch.use_deterministic_algorithms(False)
    record("determinism", ok, **figures)


def check_backward_checks():
    if "cuda" not in custom_backends():
        return record("checks", None, reason="no cuda backend")
    x = torch.randn(1, 4, 5, 8, 8, device="cuda")
    w = torch.randn(6, 4, 3, 3, 3, device="cuda")
    try:
        torch.ops.pyratok._causal_conv3d_backward(torch.randn(1, 6, 5, 8, 7, device="cuda"), x, w, None,
                                                  [1, 1, 1], [1, 1, 1], [1, 1], False, [True, False, True, True])
        rejected = False
    except ValueError:
        rejected = True
    errs = {}
    for dtype in (torch.float16, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last_3d):
            xx = x.to(dtype).contiguous(memory_format=fmt)
            y, _ = ops.causal_conv3d(xx, w.to(dtype), padding=1, backend="cuda")
            want = F.conv3d(F.pad(xx.float(), (1, 1, 1, 1, 2, 0)), w.to(dtype).float())
            # relative to the output's magnitude: about one rounding of the output (2^-8 bf16, 2^-11 fp16)
            rel = ((y.float() - want).abs().max() / want.abs().max()).item()
            errs[f"{str(dtype)[6:]}_{'cl' if fmt != torch.contiguous_format else 'cf'}"] = rel
    ok = rejected and all(e < (1e-2 if k.startswith("bf") else 2e-3) for k, e in errs.items())
    record("checks", ok, grad_y_rejected=rejected, **{k: f"{v:.1e}" for k, v in errs.items()})


def check_dispatch():
    cuda = torch.device("cuda")
    table = {op: _backend.resolve(None, cuda, op) for op in _backend.CUDA_AUTO}
    record("dispatch", all(v == _backend.CUDA_AUTO[op][0] for op, v in table.items()), **table)


def check_speed():
    figures = {}
    layers = [(2, 128, 128, 9, 64, 64), (1, 256, 256, 5, 64, 64)]
    for dtype in (torch.bfloat16, torch.float32):
        for B, C, O, T, H, W in layers:
            for fmt in (torch.contiguous_format, torch.channels_last_3d):
                x = torch.randn(B, C, T, H, W, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                w = torch.randn(O, C, 3, 3, 3, device="cuda", dtype=dtype) / (C * 27) ** 0.5
                tag = f"{str(dtype)[6:]}_{C}to{O}_{'cl' if fmt != torch.contiguous_format else 'cf'}"
                for backend in ["reference", *custom_backends()]:
                    ms = timed(lambda: ops.causal_conv3d(x, w, padding=1, backend=backend))
                    figures[f"fwd_{tag}_{backend}_ms"] = round(ms, 3)
    for backend in ["reference", *custom_backends()]:
        z = torch.randn(1 << 16, 16, device="cuda", requires_grad=True)
        figures[f"lfq_loss_fwd_bwd_K16_N65536_{backend}_ms"] = round(
            timed(lambda: ops.lfq_entropy_loss(z, backend=backend).loss.backward()), 3)
        q = torch.randn(8, 16, 9, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last_3d)
        figures[f"binary_quantize_cl_{backend}_ms"] = round(timed(lambda: ops.binary_quantize(q, backend=backend)), 3)
    record("speed", True, **figures)


def check_kernels():
    ok, figures = True, {}
    for backend in custom_backends():
        x = torch.randn(4, 16, 5, 12, 12, device="cuda", dtype=torch.float16).contiguous(
            memory_format=torch.channels_last_3d)
        got = ops.binary_quantize(x, backend=backend)
        want = ops.binary_quantize(x.cpu(), backend="reference")
        bits = ops.binary_quantize(x.expand(4, 16, 5, 12, 12).repeat(1, 4, 1, 1, 1).contiguous(
            memory_format=torch.channels_last_3d), bit_labels=True, backend=backend).bits
        same = torch.equal(got.indices.cpu(), want.indices) and torch.equal(got.codes.cpu(), want.codes)
        same &= bits.shape[-1] == 64
        for K in (10, 14):  # 2^10 bins: the shared-memory histogram; 2^14: the global one
            idx = torch.randint(0, 1 << K, (100_003,), device="cuda")
            counts = entropy_ops._code_histogram_op(idx, K, backend)
            same &= torch.equal(counts.cpu(), torch.bincount(idx.cpu(), minlength=1 << K))
        z = torch.randn(192, 16, device="cuda", dtype=torch.float64, requires_grad=True)
        ops.codebook_entropy(z, backend=backend).backward()
        zr = z.detach().cpu().requires_grad_()
        ops.codebook_entropy(zr, backend="reference").backward()
        grad_err = (z.grad.cpu() - zr.grad).abs().max().item()
        same &= grad_err < 1e-10
        figures[backend] = f"{'ok' if same else 'WRONG'} (entropy grad err {grad_err:.1e})"
        ok &= same
    record("kernels", ok, **figures)


def shifted(t, shift):
    """t's values and strides in a fresh buffer whose first element sits `shift` elements past
    the allocation (2 bytes off a 16-byte boundary for shift 1 in fp16/bf16)."""
    flat = torch.empty(t.numel() + shift, dtype=t.dtype, device=t.device)
    out = flat[shift:].as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


def cpasync_cases():
    # (B, C, O, T, H, W, kernel, stride, padding, cache frames): 8-channel spans and 8-column rows
    # that copy, spans wholly in the padding (zero fill), spans that straddle it, C = 3
    return [
        (2, 32, 48, 5, 12, 16, (3, 3, 3), 1, 1, 0),
        (1, 16, 16, 4, 8, 32, (3, 1, 1), 1, 0, 0),
        (1, 24, 40, 4, 10, 24, (3, 3, 3), 2, 1, 0),
        (1, 16, 24, 3, 6, 16, (3, 3, 3), 1, 1, 2),
        (2, 3, 16, 5, 9, 16, (3, 3, 3), 1, 1, 0),
    ]


def check_cpasync():
    if "cuda" not in custom_backends():
        return record("cpasync", None, reason="no cuda backend")
    if torch.cuda.get_device_capability() < (8, 0):
        return record("cpasync", None, reason="cp.async needs sm_80+ (the register-staged path runs instead)")
    torch.manual_seed(0)
    ok, figures = True, {}
    for dtype in (torch.float16, torch.bfloat16):
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        for fmt in (torch.contiguous_format, torch.channels_last_3d):
            worst, same = 0.0, True
            for B, C, O, T, H, W, k, st, pad, past in cpasync_cases():
                x0 = torch.randn(B, C, T, H, W, device="cuda").to(dtype).contiguous(memory_format=fmt)
                w = (torch.randn(O, C, *k, device="cuda") / (C * k[0] * k[1] * k[2]) ** 0.5).to(dtype)
                b = torch.randn(O, device="cuda").to(dtype)
                cache0 = None if past == 0 else torch.randn(B, C, past, H, W, device="cuda").to(dtype).contiguous(
                    memory_format=fmt)
                kw = dict(stride=st, padding=pad, cache=cache0)
                if past and (k[0] - 1) + 1 - st != past:
                    continue
                xr, wr, br = (t.double().detach().requires_grad_() for t in (x0, w, b))
                yr, _ = ops.causal_conv3d(xr, wr, br, backend="reference", stride=st, padding=pad,
                                          cache=None if cache0 is None else cache0.double())
                gy0 = torch.randn(yr.shape, device="cuda").to(dtype).contiguous(memory_format=fmt)
                yr.backward(gy0.double())
                want = {"y": yr.detach(), "gx": xr.grad, "gw": wr.grad}
                runs = []
                for shift in (0, 1):
                    x, gy = shifted(x0, shift), shifted(gy0, shift)
                    cache = None if cache0 is None else shifted(cache0, shift)
                    assert (x.data_ptr() % 16 == 0) == (shift == 0)
                    xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
                    y, _ = ops.causal_conv3d(xx, ww, b, backend="cuda", **{**kw, "cache": cache})
                    y.backward(gy)
                    got = {"y": y.detach(), "gx": xx.grad, "gw": ww.grad}
                    for name, ref in want.items():
                        rel = ((got[name].double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                        worst = max(worst, rel)
                    runs.append(got)
                same &= all(torch.equal(runs[0][n], runs[1][n]) for n in ("y", "gx", "gw"))
            tag = f"{str(dtype)[6:]}_{'cl' if fmt != torch.contiguous_format else 'cf'}"
            figures[f"{tag}_max_rel_err"] = f"{worst:.1e}"
            figures[f"{tag}_aligned_vs_misaligned"] = "bit-identical" if same else "DIFFER"
            ok &= worst < tol and same
    record("cpasync", ok, **figures)


def small_launches(backends):
    """Every CUDA kernel once at a small size (for compute-sanitizer and Nsight Compute)."""
    for backend in backends:
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            if backend == "triton" and dtype == torch.float64:
                continue
            for fmt in (torch.contiguous_format, torch.channels_last_3d):
                for stride in (1, 2):
                    x = torch.randn(2, 5, 4, 9, 7, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                    w = torch.randn(6, 5, 3, 3, 3, device="cuda", dtype=dtype)
                    conv_grads(backend, x, w, torch.randn(6, device="cuda", dtype=dtype), padding=1,
                               stride=(stride, stride, stride) if stride == 2 else 1)
            if backend == "cuda" and dtype in (torch.float16, torch.bfloat16):
                # the cp.async staging: 8-channel / 8-column spans, 16-byte aligned and 2 bytes off
                for fmt in (torch.contiguous_format, torch.channels_last_3d):
                    for shift in (0, 1):
                        x = shifted(torch.randn(1, 16, 4, 6, 16, device="cuda", dtype=dtype).contiguous(
                            memory_format=fmt), shift)
                        w = torch.randn(16, 16, 3, 3, 3, device="cuda", dtype=dtype)
                        conv_grads(backend, x, w, None, padding=1)
            z = torch.randn(300, 12, device="cuda", dtype=dtype, requires_grad=True)
            ops.lfq_entropy_loss(z, backend=backend).loss.backward()
            ops.bernoulli_kl(z.detach(), z.detach().flip(0), backend=backend)
            q = torch.randn(3, 16, 5, 6, 6, device="cuda", dtype=dtype)
            ops.binary_quantize(q, backend=backend)
            ops.binary_quantize(q.contiguous(memory_format=torch.channels_last_3d), bit_labels=True, backend=backend)
            ops.residual_binary_quantize(q, 3, backend=backend)
        ops.codebook_usage(torch.randint(0, 1 << 8, (5000,), device="cuda"), K=8, backend=backend)
        ops.codebook_usage(torch.randint(0, 1 << 14, (5000,), device="cuda"), K=14, backend=backend)
    torch.cuda.synchronize()
    print("small launches done", flush=True)


CHECKS = {"empty": check_empty, "device_guard": check_device_guard, "overflow": check_overflow,
          "tf32": check_tf32, "determinism": check_determinism, "checks": check_backward_checks,
          "dispatch": check_dispatch, "kernels": check_kernels, "cpasync": check_cpasync, "speed": check_speed}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "device_out"))
    ap.add_argument("--only", default="")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--backends", default="", help="with --small: the backends to launch (default: all custom)")
    args = ap.parse_args()
    if args.list:
        print("\n".join(CHECKS))
        return 0
    if not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device", file=sys.stderr)
        return 2
    if args.small:
        small_launches([b for b in args.backends.split(",") if b] or custom_backends())
        return 0
    names = [n for n in args.only.split(",") if n] or list(CHECKS)
    unknown = set(names) - set(CHECKS)
    if unknown:
        print(f"gpu_check.py: unknown checks {sorted(unknown)}; choose from {list(CHECKS)}", file=sys.stderr)
        return 2
    print(f"pyratok {pyratok.__version__ if hasattr(pyratok, '__version__') else ''} on "
          f"{torch.cuda.get_device_name()}; custom backends: {custom_backends()}", flush=True)
    for name in names:
        try:
            CHECKS[name]()
        except Exception as err:  # one broken check must not hide the others
            traceback.print_exc()
            record(name, False, error=f"{type(err).__name__}: {str(err)[:200]}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    return 0 if all(r["verdict"] != "FAIL" for r in RESULTS.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
