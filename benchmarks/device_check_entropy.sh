# shellcheck shell=bash disable=SC2034,SC2154  # sourced by device_check.sh: $py, $out_dir, $dry, $status, run()
# Fragment for benchmarks/device_check.sh (issue 3, entropy losses): paste after the
# "== benchmarks" block.  It uses that script's $py, $out_dir, $dry, run() and status.
# The tests (tests/test_entropy*.py, CUDA cases included) and benchmarks/bench_entropy.py
# already run in its "tests" and "benchmarks" steps; the standalone equivalent is
#   python -m pytest tests/test_entropy.py tests/test_entropy_distributed.py -q
#   python -m pytest benchmarks/bench_entropy.py --benchmark-only --benchmark-json=$OUT/bench_entropy.json
#   python benchmarks/report.py $OUT/bench_entropy.json --results-dir $OUT
# Here: the exact path as a fraction of the fp32 and bf16 GEMM rates measured at the same
# shapes in the same run, the README table, the targets and the time-vs-N plot.
if [ "$dry" = 0 ] && [ -f "$out_dir/entropy_gpu.csv" ]; then
  echo "== entropy: exact path (3 GEMMs of 2*N*2^K FLOPs) as % of the fp32 / bf16 GEMM rate"
  "$py" - "$out_dir/entropy_gpu.csv" <<'PY' | tee "$out_dir/entropy_gemm_fraction.txt"
import csv, sys
rate = {}
for r in csv.DictReader(open(sys.argv[1])):
    rate[(r["group"], r["provider"])] = float(r["gflop_per_s"] or "nan")
for (group, provider), v in rate.items():
    if provider.startswith("exact"):
        fp32 = rate.get((group, "fp32 GEMM"), float("nan"))
        bf16 = rate.get((group, "bf16 GEMM"), float("nan"))
        print(f"{group:26s} {provider:15s} {v:9.0f} GFLOP/s  {100 * v / fp32:5.1f}% of fp32 GEMM  "
              f"{100 * v / bf16:5.1f}% of bf16 GEMM")
PY
  run "$py" benchmarks/bench_entropy.py summary "$out_dir/entropy_gpu.csv" \
      --plot "$out_dir/entropy_time_vs_n_gpu.png" | tee "$out_dir/entropy_summary.md" || status=1
fi
