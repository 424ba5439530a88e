# shellcheck shell=bash disable=SC2034,SC2154  # sourced by device_check.sh: $py, $out_dir, $dry, $status, run()
# causal_conv3d (issue 4): lines for benchmarks/device_check.sh, after its build step.
# Uses that script's $py, $out_dir, $dry, $status and run().  Runs the CUDA tests of the
# op (incl. the > 2^31-element case), the GPU benchmark (bf16, VAE-like layers, both
# layouts, streamed and whole-clip), writes causal_conv3d_gpu.csv/.md under $out_dir and
# prints TFLOP/s and the speed ratio to cuDNN (provider "reference" = F.pad + F.conv3d):
# targets >= 0.9x in channels_last_3d forward on the large layers, > 1x streamed.
echo "== causal_conv3d: CUDA tests -> $out_dir/causal_conv3d_tests.log"
run "$py" -m pytest tests/test_causal_conv3d.py -q -p no:cacheprovider -m cuda 2>&1 \
    | tee "$out_dir/causal_conv3d_tests.log" || status=1
echo "== causal_conv3d: GPU benchmark -> $out_dir/causal_conv3d.json"
run "$py" -m pytest benchmarks/bench_causal_conv3d.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$out_dir/causal_conv3d.json" 2>&1 | tee "$out_dir/causal_conv3d_bench.log" || status=1
run "$py" benchmarks/report.py "$out_dir/causal_conv3d.json" --results-dir "$out_dir" || status=1
if [ "$dry" = 0 ] && [ -f "$out_dir/causal_conv3d_gpu.csv" ]; then
  echo "== causal_conv3d: TFLOP/s and speed vs cuDNN (same run)"
  "$py" - "$out_dir/causal_conv3d_gpu.csv" <<'PY'
import collections, csv, sys
groups = collections.defaultdict(dict)
for r in csv.DictReader(open(sys.argv[1])):
    groups[r["group"]][r["provider"]] = r
for group, rows in groups.items():
    ref = rows.get("reference")
    large = any(f" {c}->{c} " in group for c in (96, 192, 384))
    target = 0.9 if "fwd " in group and "channels-last" in group and large else 1.0 if " stream " in group else None
    for provider in ("cuda", "triton"):
        r = rows.get(provider)
        if r is None or ref is None:
            continue
        ratio = float(ref["median_ms"]) / float(r["median_ms"])
        verdict = "" if target is None else "ok" if ratio >= target else "BELOW TARGET"
        print(f"{group:72s} {provider:7s} {float(r['gflop_per_s'] or 0) / 1e3:7.1f} TFLOP/s "
              f"{ratio:5.2f}x cuDNN {verdict}")
PY
fi
