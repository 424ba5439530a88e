# shellcheck shell=bash disable=SC2034,SC2154  # sourced by device_check.sh: $py, $out_dir, $dry, $status, run()
# --- vae (issue 5) fragment for benchmarks/device_check.sh; uses its $py, $out_dir, run and status.
# GPU parity with diffusers (tests/test_vae.py, incl. the CUDA test), then bench_vae.py on the GPU:
# small config 17x256x256, full Wan 2.1 config 17x720x1280 (fp32 encode, bf16 decode), and one
# 1080p frame decoded tiled vs untiled (full config, bf16).  -> vae_tests.log, vae_gpu.csv/.md
echo "== vae: tests on the GPU -> $out_dir/vae_tests.log"
run "$py" -m pytest tests/test_vae.py -q -p no:cacheprovider 2>&1 | tee "$out_dir/vae_tests.log" || status=1
echo "== vae: benchmark -> $out_dir/vae_bench.json, vae_gpu.csv"
run "$py" -m pytest benchmarks/bench_vae.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$out_dir/vae_bench.json" 2>&1 | tee "$out_dir/vae_bench.log" || status=1
run "$py" benchmarks/report.py "$out_dir/vae_bench.json" --results-dir "$out_dir" || status=1
