"""The CPU's fp32 FMA ceiling, measured: the roofline the compute-bound benchmarks (causal
conv3d, the entropy GEMMs) are compared against in the README.

Compiles benchmarks/peak/fma_peak.c (12 independent AVX-512 FMA chains per thread, OpenMP over
all cores) with the system C compiler, runs it three times and prints the best rate; with
--csv it appends a row to benchmarks/results/cpu_peak.csv.

usage: python benchmarks/peak_flops.py [--csv]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import re
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(runs: int = 3) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "fma_peak")
        subprocess.run(["cc", "-O3", "-mavx512f", "-fopenmp", os.path.join(HERE, "peak", "fma_peak.c"), "-o", exe],
                       check=True)
        best, threads = 0.0, 0
        for _ in range(runs):
            out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
            m = re.match(r"(\d+) threads ([\d.]+) GFLOP/s", out)
            threads, best = int(m.group(1)), max(best, float(m.group(2)))
    return best, threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", action="store_true", help="append the result to benchmarks/results/cpu_peak.csv")
    args = parser.parse_args()
    gflops, threads = measure()
    print(f"fp32 FMA peak: {gflops:.1f} GFLOP/s on {threads} threads")
    if args.csv:
        path = os.path.join(HERE, "results", "cpu_peak.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["date", "threads", "fp32_fma_gflop_per_s"])
            w.writerow([dt.datetime.now(dt.timezone.utc).isoformat()[:19], threads, f"{gflops:.1f}"])


if __name__ == "__main__":
    main()
