#!/usr/bin/env bash
# One prepared run for a lent GPU machine (see DEVELOPERS.md): builds the CUDA extension,
# runs the GPU-readiness checks of issue 21, the CUDA tests and the GPU benchmarks, and
# writes logs and CSVs under $OUT.
#
# usage: benchmarks/device_check.sh [--out DIR] [--python PY] [--bench FILE]... [--skip-build]
#                                   [--skip-tests] [--skip-bench] [--readiness-only] [--dry-run]
#   --out DIR         where results go (default: $OUT, else ./device_out)
#   --python PY       interpreter that has a CUDA torch (default: python3)
#   --bench FILE      benchmark file(s) to run (default: every benchmarks/bench_*.py)
#   --readiness-only  build + the issue-21 checks only (< 8 minutes on one H200)
#   --dry-run         print the plan and the commands, run nothing
# Without a CUDA device it stops after the build (that part is exercised on CPU machines).
#
# The readiness checks (each a PASS/FAIL/SKIP line; gpu_check.json has the figures):
#   benchmarks/gpu_check.py: empty reductions, device guard (2+ GPUs), the > 2^31-position
#     overflow probe, fp32 error with TF32 on and off, weight-gradient and entropy-sum
#     determinism (and torch.use_deterministic_algorithms), the CUDA backward's grad_y
#     check, what `auto` runs per op, custom kernels vs the PyTorch path (speed), the CUDA
#     conv's cp.async staging (fp16/bf16, both layouts, 16-byte aligned vs 2 bytes off);
#   compute-sanitizer memcheck and racecheck over one small launch of every kernel (the
#     cp.async path included: aligned and misaligned fp16/bf16 launches);
#   Nsight Compute's instruction mix of the convolution kernels (integer share), if time allows.
set -euo pipefail
cd "$(dirname "$0")/.."

out_dir="${OUT:-$PWD/device_out}"
py=python3
benches=()
skip_build=0 skip_tests=0 skip_bench=0 readiness_only=0 dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out_dir="$2"; shift 2 ;;
    --python) py="$2"; shift 2 ;;
    --bench) benches+=("$2"); shift 2 ;;
    --skip-build) skip_build=1; shift ;;
    --skip-tests) skip_tests=1; shift ;;
    --skip-bench) skip_bench=1; shift ;;
    --readiness-only) readiness_only=1; skip_tests=1; skip_bench=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#benches[@]} -gt 0 ] || benches=(benchmarks/bench_*.py)

run() {
  echo "+ $*"
  [ "$dry" = 1 ] || "$@"
}

mkdir -p "$out_dir"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" PYRATOK_CUDA_ARCH="${PYRATOK_CUDA_ARCH:-9.0}"

echo "== device facts -> $out_dir/device.txt"
if [ "$dry" = 0 ]; then
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
    "$py" -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    "$py" -c "import triton; print('triton', triton.__version__)" 2>&1 || true
    nvcc --version 2>&1 | tail -1 || true; } | tee "$out_dir/device.txt"
fi

if [ "$skip_build" = 0 ]; then
  echo "== build pyratok with its CUDA kernels (sm_${PYRATOK_CUDA_ARCH/./})"
  run "$py" -m pip install --quiet --no-build-isolation --no-deps --no-index -e .
  [ "$dry" = 1 ] || "$py" -c "import pyratok, pyratok._C as C; print('pyratok._C with_cuda =', C.with_cuda)" | tee -a "$out_dir/device.txt"
fi

if [ "$dry" = 0 ] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "== no CUDA device here: stopping after the build"
  exit 0
fi

status=0

# ---- issue 21: GPU readiness, every item in one run: capped at 7 minutes (210 + 2 x 75 + 60 s)
echo "== readiness checks -> $out_dir/gpu_check.log, gpu_check.json"
run timeout 210 "$py" benchmarks/gpu_check.py --out "$out_dir" 2>&1 | tee "$out_dir/gpu_check.log" || status=1
if command -v compute-sanitizer > /dev/null || [ "$dry" = 1 ]; then
  # the caching allocator hides out-of-bounds accesses inside its blocks: off for memcheck
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool over one small launch of every kernel -> $out_dir/sanitizer_$tool.log"
    backends=cuda,triton
    [ "$tool" = racecheck ] && backends=cuda  # racecheck serialises; the shared-memory kernels are cuda's
    if [ "$dry" = 1 ]; then
      echo "+ PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 75 compute-sanitizer --tool $tool --error-exitcode 9 $py benchmarks/gpu_check.py --small --backends $backends"
    else
      if PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 75 compute-sanitizer --tool "$tool" --error-exitcode 9 \
          "$py" benchmarks/gpu_check.py --small --backends "$backends" > "$out_dir/sanitizer_$tool.log" 2>&1; then
        echo "[PASS] compute-sanitizer $tool"
      else
        echo "[FAIL] compute-sanitizer $tool (rc $?; 124 = timed out)"
        status=1
      fi
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Race" "$out_dir/sanitizer_$tool.log" | head -5 || true
    fi
  done
else
  echo "[SKIP] compute-sanitizer not found"
fi
if command -v ncu > /dev/null || [ "$dry" = 1 ]; then
  echo "== Nsight Compute: instruction mix of the convolution kernels -> $out_dir/ncu_instructions.csv"
  if [ "$dry" = 1 ]; then
    echo "+ timeout 60 ncu --csv --page raw --metrics sass__inst_executed_per_opcode ... $py benchmarks/gpu_check.py --small"
  else
    timeout 60 ncu --target-processes all --kernel-name "regex:implicit_gemm|_forward_kernel|_weight_grad_kernel" \
      --launch-count 12 --csv --page raw --metrics sass__inst_executed_per_opcode \
      --print-metric-instances details "$py" benchmarks/gpu_check.py --small --backends cuda,triton \
      > "$out_dir/ncu_instructions.csv" 2> "$out_dir/ncu.log" || echo "[SKIP] ncu did not finish (see ncu.log)"
    "$py" benchmarks/static/ncu_integer_share.py "$out_dir/ncu_instructions.csv" | tee "$out_dir/ncu_integer_share.txt" \
      || true
  fi
else
  echo "[SKIP] ncu not found"
fi
[ "$readiness_only" = 1 ] && exit $status

if [ "$skip_tests" = 0 ]; then
  echo "== tests on the GPU -> $out_dir/tests.log"
  run "$py" -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$out_dir/tests.log" || status=1
fi

if [ "$skip_bench" = 0 ]; then
  echo "== benchmarks -> $out_dir/bench.json, CSV and Markdown tables"
  run "$py" -m pytest "${benches[@]}" --benchmark-only -q -p no:cacheprovider \
      --benchmark-json="$out_dir/bench.json" 2>&1 | tee "$out_dir/bench.log" || status=1
  run "$py" benchmarks/report.py "$out_dir/bench.json" --results-dir "$out_dir" || status=1
  if [ "$dry" = 0 ] && [ -f "$out_dir/binary_quantize_gpu.csv" ]; then
    echo "== binary_quantize: fraction of the measured copy bandwidth (target >= 0.80)"
    "$py" - "$out_dir/binary_quantize_gpu.csv" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["provider"] in ("cuda", "triton")]
for r in rows:
    ok = float(r["frac_of_baseline"] or 0) >= 0.8
    print(f"{r['group']:60s} {r['provider']:7s} {float(r['gb_per_s']):8.1f} GB/s  {float(r['frac_of_baseline']):.2f} of copy  {'ok' if ok else 'BELOW TARGET'}")
PY
  fi
  # per-op GPU summaries (fractions of the GEMM / cuDNN / copy ceilings), one fragment per op
  for fragment in benchmarks/device_check_*.sh; do
    # shellcheck source=/dev/null
    . "$fragment"
  done
fi
exit $status
