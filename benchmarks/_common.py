"""Helpers shared by the benchmark files: peak memory, machine facts, providers.

Benchmarks run on pytest-benchmark (`make bench`); every benchmark records in
``benchmark.extra_info`` the op, provider, shape, dtype, layout and whatever it can say
about the work (``bytes`` moved, ``flops``) and ``peak_bytes``.  benchmarks/report.py
turns the JSON into CSV rows (benchmarks/results/<op>.csv) and README tables.
"""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
from functools import lru_cache

import torch

if not torch.cuda.is_available():  # Triton kernels only run here under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@lru_cache(maxsize=None)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


# On the CPU the peak is read from the resident set, which glibc's malloc decouples from
# the live memory: freed blocks below its (adaptive, up to 32 MB) mmap threshold stay
# resident and are reused, so a call's peak reads as ~0, or as the fragmentation of
# earlier calls.  For the one call whose peak is measured, blocks of 64 KB and more are
# mapped and unmapped one by one instead (mallopt M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD
# = -1).  Timed calls run with the thresholds at glibc's 64-bit maxima (32 MB, 64 MB), as a
# long-running process settles to: with 64 KB there, every call of an op that allocates
# work buffers would pay page faults for them that a real training loop does not pay
# (results before 2026-11-29 10:30 UTC were timed that way).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _malloc_thresholds(mmap: int, trim: int) -> None:
    libc = _libc()
    if DEVICE == "cpu" and libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, mmap)
        libc.mallopt(_M_TRIM_THRESHOLD, trim)


def _timing_thresholds() -> None:
    _malloc_thresholds(32 * 2**20, 64 * 2**20)


_timing_thresholds()


def _release_free_heap():
    """Hands freed heap pages back to the OS (malloc_trim) before a measured call."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_memory_bytes(fn) -> int:
    """Extra memory at the peak of one call of fn, above what was in use before it.

    CUDA: the caching allocator's peak.  CPU: the process's peak resident set (VmHWM),
    reset through /proc/self/clear_refs first, minus the resident set before the call.
    """
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _malloc_thresholds(64 * 1024, 64 * 1024)
    try:
        _release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return -1
        before = _proc_status_kb("VmRSS")
        fn()
        return max(0, (_proc_status_kb("VmHWM") - before) * 1024)
    finally:
        _timing_thresholds()


def run(benchmark, fn, rounds: int = 5, **info):
    """Times fn with pytest-benchmark (one warm-up) and records peak memory and info."""
    def call():
        fn()
        sync()

    benchmark.extra_info.update(info)
    benchmark.extra_info["device"] = DEVICE
    call()  # warm-up outside the peak: first-call costs (thread pools, compiles) are not the op's
    benchmark.extra_info["peak_bytes"] = peak_memory_bytes(call)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)


@lru_cache(maxsize=None)
def machine() -> dict:
    """What the numbers were measured on."""
    if DEVICE == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip() or "-"
    except OSError:
        commit = "-"
    return {
        "machine": f"{name} ({os.cpu_count()} cpus, {torch.get_num_threads()} threads)" if DEVICE == "cpu" else name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "-",
        "commit": commit,
    }
