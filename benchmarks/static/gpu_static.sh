#!/usr/bin/env bash
# Static GPU evidence without a GPU (issue 21): compiles the CUDA kernels before and after
# with nvcc -Xptxas -v for sm_90 and tabulates registers, stack frame, spills, static shared
# memory and integer divisions (whole kernel and inside loops) per kernel; the convolution once
# more at STAGED_COMMIT (the register-staged double buffer before cp.async); counts tensor-core
# (wmma.mma), FMA and cp.async instructions (copies, commit_group, wait_group) per fp16/bf16
# convolution kernel in the sm_75 / sm_80 / sm_90 PTX (sm_75: no tensor cores for bf16, no cp.async).
# Prints Markdown: benchmarks/results/gpu_static.md holds one run of it.
#
# usage: benchmarks/static/gpu_static.sh [BEFORE_COMMIT [STAGED_COMMIT]]
#        (defaults 7c7a370, before issue 21, and 8f660fd, the register-staged convolution)
set -euo pipefail
cd "$(dirname "$0")/../.."
before="${1:-7c7a370}"
staged="${2:-8f660fd}"
py="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/before" "$work/after" "$work/staged"
for f in causal_conv3d_cuda.cu entropy_cuda.cu binary_quantize_cuda.cu causal_conv3d.h entropy.h binary_quantize.h dtype.h; do
  git show "$before:csrc/core/$f" > "$work/before/$f"
  cp "csrc/core/$f" "$work/after/$f"
done
for f in causal_conv3d_cuda.cu causal_conv3d.h dtype.h; do
  git show "$staged:csrc/core/$f" > "$work/staged/$f"
done
(cd "$work/staged" && nvcc -std=c++17 -O3 -arch=sm_90 -Xptxas -v -c causal_conv3d_cuda.cu -o conv.o > conv.ptxas.txt 2>&1 &&
   nvcc -std=c++17 -O3 -arch=sm_90 -ptx causal_conv3d_cuda.cu -o conv.ptx)
for side in before after; do
  for f in causal_conv3d_cuda entropy_cuda binary_quantize_cuda; do
    (cd "$work/$side" && nvcc -std=c++17 -O3 -arch=sm_90 -Xptxas -v -c "$f.cu" -o "$f.o" > "$f.ptxas.txt" 2>&1 &&
       nvcc -std=c++17 -O3 -arch=sm_90 -ptx "$f.cu" -o "$f.ptx")
  done
done
echo "nvcc: $(nvcc --version | tail -1)"
for f in causal_conv3d_cuda entropy_cuda binary_quantize_cuda; do
  for side in before after; do
    echo
    echo "### $f.cu, $side (sm_90)"
    echo
    "$py" benchmarks/static/ptx_report.py "$work/$side/$f.ptx" "$work/$side/$f.ptxas.txt"
  done
  if [ "$f" = causal_conv3d_cuda ]; then
    echo
    echo "### $f.cu, register-staged ($staged, sm_90), fp16/bf16"
    echo
    "$py" benchmarks/static/ptx_report.py "$work/staged/conv.ptx" "$work/staged/conv.ptxas.txt" --filter f16
  fi
done
echo
echo "### tensor-core (wmma.mma), FMA and cp.async instructions per fp16/bf16 convolution kernel in the PTX"
echo
echo "| arch | kernel | wmma.mma | fma.rn.f32 | cp.async (16 B) | commit_group | wait_group |"
echo "|---|---|---:|---:|---:|---:|---:|"
for arch in 75 80 90; do
  (cd "$work/after" && nvcc -std=c++17 -O3 -arch="sm_$arch" -ptx causal_conv3d_cuda.cu -o "conv_$arch.ptx")
  awk -v arch="$arch" '
    function flush() { if (name != "") print arch, name, w, f, c, g, x }
    /^[[:space:]]*(\.visible[[:space:]]+)?\.entry/ { flush(); name = $NF; sub(/\($/, "", name); w = 0; f = 0; c = 0; g = 0; x = 0 }
    /wmma\.mma/ { w++ }
    /fma\.rn\.f32/ { f++ }
    /cp\.async\.c[ag]\.shared/ { c++ }
    /cp\.async\.commit_group/ { g++ }
    /cp\.async\.wait_group/ { x++ }
    END { flush() }' "$work/after/conv_$arch.ptx" |
  while read -r a name w f c g x; do
    pretty="$(echo "$name" | c++filt | sed -E 's/pyratok::(\(anonymous namespace\)::)?//g;
      s/Format<\(DType\)0>/f16/; s/Format<\(DType\)1>/bf16/; s/Format<\(DType\)2>/f32/; s/Format<\(DType\)3>/f64/;
      s/\(.*\)$//')"
    case "$pretty" in *f16*) echo "| sm_$a | $pretty | $w | $f | $c | $g | $x |" ;; esac
  done
done
