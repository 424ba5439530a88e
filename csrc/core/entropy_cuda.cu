// CUDA kernels for the entropy and alignment losses; contract in entropy.h.
//
// code_probs: one thread per (token, code) tile element, grid-stride, computing its product
// of `bits` sigmoids (consecutive threads share a token row, so the x loads broadcast and the
// tile stores coalesce).  The GEMMs that consume the tiles are cuBLAS calls in the binding.
// code_probs_backward: one warp per token; lanes stride over the codes (coalesced reads of
// the probability and gradient rows), keep S1/S0 for each of the <= 12 bits in registers
// (one instantiation per half size, fully unrolled) and reduce them with shuffles.  Sums
// (entropy, KL) reduce per block into one double partial per block, which the binding sums
// in a fixed order: deterministic.  The histogram counts in a per-block shared histogram for
// 2^K <= 4096 codes (integer atomics: exact in any order).  64-bit offsets throughout.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "entropy.h"

namespace pyratok {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return (unsigned)(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

#define PYRATOK_GRID_LOOP(i, n) \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

template <typename F>
__global__ void code_probs_kernel(CodeProbsArgs a, typename F::work* probs, int64_t rows) {
  using W = typename F::work;
  const auto* x = static_cast<const typename F::bits*>(a.x);
  const W coef = W(a.coef);
  const int64_t width = int64_t(1) << a.bits;
  PYRATOK_GRID_LOOP(e, rows * width) {
    const int64_t t = e >> a.bits;
    const int64_t c = e & (width - 1);
    const auto* xr = x + (a.first_token + t) * a.K + a.bit0;
    W prob = W(1);
    for (int j = 0; j < a.bits; ++j) {
      const W z = coef * F::load(xr[j]);
      prob *= ((c >> (a.bits - 1 - j)) & 1) ? sigmoid_w<W>(z) : sigmoid_w<W>(-z);
    }
    probs[e] = prob;
  }
}

template <typename W>
__device__ __forceinline__ W warp_sum(W v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// BITS is a compile-time constant (one instantiation per half size, 1..kMaxHalfBits), so the
// per-bit sums S1/S0 are fully unrolled registers, not a local-memory array indexed at run
// time.
template <typename F, int BITS>
__global__ void code_probs_backward_kernel(CodeProbsArgs a, const typename F::work* probs,
                                           const typename F::work* grad, typename F::bits* dx,
                                           int64_t rows) {
  using W = typename F::work;
  const auto* x = static_cast<const typename F::bits*>(a.x);
  constexpr int64_t width = int64_t(1) << BITS;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / kWarp);
  for (int64_t t = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp; t < rows; t += warps) {
    W s1[BITS], s0[BITS];
#pragma unroll
    for (int j = 0; j < BITS; ++j) s1[j] = s0[j] = W(0);
    for (int64_t c = lane; c < width; c += kWarp) {
      const W w = grad[t * width + c] * probs[t * width + c];
#pragma unroll
      for (int j = 0; j < BITS; ++j) {
        const bool one = (c >> (BITS - 1 - j)) & 1;
        s1[j] += one ? w : W(0);
        s0[j] += one ? W(0) : w;
      }
    }
#pragma unroll
    for (int j = 0; j < BITS; ++j) {
      const W one = warp_sum(s1[j]), zero = warp_sum(s0[j]);
      if (lane == 0) {
        const int64_t off = (a.first_token + t) * a.K + a.bit0 + j;
        const W z = W(a.coef) * F::load(x[off]);
        dx[off] = F::store(W(a.coef) * (one * sigmoid_w<W>(-z) - zero * sigmoid_w<W>(z)));
      }
    }
  }
}

template <typename F>
__global__ void bit_probs_kernel(const typename F::bits* x, double coef, typename F::work* probs, int64_t n) {
  using W = typename F::work;
  PYRATOK_GRID_LOOP(i, n) probs[i] = sigmoid_w<W>(W(coef) * F::load(x[i]));
}

// Stores the block's sum of v in partial[blockIdx.x]: the caller sums the partials in a fixed
// order, so the total is the same bits on every run (no floating-point atomics).
__device__ void block_sum(double v, double* partial) {
  __shared__ double warp_partial[kThreads / kWarp];
  v = warp_sum(v);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) warp_partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (int)(blockDim.x / kWarp) ? warp_partial[lane] : 0.0;
    v = warp_sum(v);
    if (lane == 0) partial[blockIdx.x] = v;
  }
}

template <typename F>
__global__ void binary_entropy_sum_kernel(const typename F::bits* x, double coef, double* partial, int64_t n) {
  using W = typename F::work;
  double acc = 0;
  PYRATOK_GRID_LOOP(i, n) acc += (double)binary_entropy_w<W>(W(coef) * F::load(x[i]));
  block_sum(acc, partial);
}

template <typename F>
__global__ void binary_entropy_backward_kernel(const typename F::bits* x, double coef, const typename F::work* grad,
                                               typename F::bits* dx, int64_t n) {
  using W = typename F::work;
  const W scale = grad[0] * W(coef);
  PYRATOK_GRID_LOOP(i, n) dx[i] = F::store(scale * binary_entropy_grad_w<W>(W(coef) * F::load(x[i])));
}

template <typename F>
__global__ void bernoulli_kl_sum_kernel(const typename F::bits* a, const typename F::bits* b, double* partial, int64_t n) {
  using W = typename F::work;
  double acc = 0;
  PYRATOK_GRID_LOOP(i, n) acc += (double)bernoulli_kl_w<W>(F::load(a[i]), F::load(b[i]));
  block_sum(acc, partial);
}

template <typename F>
__global__ void bernoulli_kl_backward_kernel(const typename F::bits* a, const typename F::bits* b,
                                             const typename F::work* grad, typename F::bits* da,
                                             typename F::bits* db, int64_t n) {
  using W = typename F::work;
  const W g = grad[0];
  PYRATOK_GRID_LOOP(i, n) {
    const W av = F::load(a[i]), bv = F::load(b[i]);
    const W pa = sigmoid_w<W>(av);
    da[i] = F::store(g * pa * sigmoid_w<W>(-av) * (av - bv));
    db[i] = F::store(g * (sigmoid_w<W>(bv) - pa));
  }
}

// Integer counts: atomics are exact and order-free, so the result is deterministic.
template <typename Index>
__global__ void code_histogram_kernel(const Index* indices, unsigned long long* counts, int64_t n) {
  PYRATOK_GRID_LOOP(i, n) atomicAdd(counts + (int64_t)indices[i], 1ULL);
}

// Small codebooks (2^K <= kSharedBins): each block counts into a shared histogram (shared
// atomics, no contention across the device) and adds its non-zero bins to the global one.
constexpr int kSharedBins = 4096;

template <typename Index>
__global__ void code_histogram_shared_kernel(const Index* indices, unsigned long long* counts, int bins,
                                             int64_t n) {
  __shared__ unsigned int local[kSharedBins];
  for (int b = threadIdx.x; b < bins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  PYRATOK_GRID_LOOP(i, n) atomicAdd(local + (int)indices[i], 1u);
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x)
    if (local[b]) atomicAdd(counts + b, (unsigned long long)local[b]);
}

}  // namespace

void code_probs_cuda(const CodeProbsArgs& a, void* probs, int64_t rows, void* stream) {
  const int64_t n = rows << a.bits;
  if (n == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  PYRATOK_DISPATCH_DTYPE(a.dtype, code_probs_kernel<F><<<grid_for(n), kThreads, 0, s>>>(
                                      a, static_cast<typename F::work*>(probs), rows));
  check_launch("code_probs_cuda");
}

template <typename F, int BITS>
void launch_code_probs_backward(const CodeProbsArgs& a, const void* probs, const void* grad_probs, void* dx,
                                int64_t rows, cudaStream_t s) {
  if constexpr (BITS <= kMaxHalfBits) {
    if (a.bits != BITS) return launch_code_probs_backward<F, BITS + 1>(a, probs, grad_probs, dx, rows, s);
    code_probs_backward_kernel<F, BITS><<<grid_for(rows * kWarp), kThreads, 0, s>>>(
        a, static_cast<const typename F::work*>(probs), static_cast<const typename F::work*>(grad_probs),
        static_cast<typename F::bits*>(dx), rows);
  } else {
    throw std::invalid_argument("code_probs_backward_cuda: a half holds 1.." + std::to_string(kMaxHalfBits) +
                                " bits, got " + std::to_string(a.bits));
  }
}

void code_probs_backward_cuda(const CodeProbsArgs& a, const void* probs, const void* grad_probs, void* dx,
                              int64_t rows, void* stream) {
  if (rows == 0 || a.bits == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  PYRATOK_DISPATCH_DTYPE(a.dtype, launch_code_probs_backward<F, 1>(a, probs, grad_probs, dx, rows, s));
  check_launch("code_probs_backward_cuda");
}

int64_t sum_partials_cuda(int64_t numel) { return grid_for(numel); }

void bit_probs_cuda(DType dtype, const void* x, double coef, void* probs, int64_t numel, void* stream) {
  if (numel == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  PYRATOK_DISPATCH_DTYPE(dtype, bit_probs_kernel<F><<<grid_for(numel), kThreads, 0, s>>>(
                                    static_cast<const typename F::bits*>(x), coef,
                                    static_cast<typename F::work*>(probs), numel));
  check_launch("bit_probs_cuda");
}

void binary_entropy_sum_cuda(DType dtype, const void* x, double coef, double* partial, int64_t numel, void* stream) {
  if (numel == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  PYRATOK_DISPATCH_DTYPE(dtype, binary_entropy_sum_kernel<F><<<grid_for(numel), kThreads, 0, s>>>(
                                    static_cast<const typename F::bits*>(x), coef, partial, numel));
  check_launch("binary_entropy_sum_cuda");
}

void binary_entropy_backward_cuda(DType dtype, const void* x, double coef, const void* grad, void* dx,
                                  int64_t numel, void* stream) {
  if (numel == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  PYRATOK_DISPATCH_DTYPE(dtype, binary_entropy_backward_kernel<F><<<grid_for(numel), kThreads, 0, s>>>(
                                    static_cast<const typename F::bits*>(x), coef,
                                    static_cast<const typename F::work*>(grad),
                                    static_cast<typename F::bits*>(dx), numel));
  check_launch("binary_entropy_backward_cuda");
}

void bernoulli_kl_sum_cuda(DType dtype, const void* a, const void* b, double* partial, int64_t numel, void* stream) {
  if (numel == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  PYRATOK_DISPATCH_DTYPE(dtype, bernoulli_kl_sum_kernel<F><<<grid_for(numel), kThreads, 0, s>>>(
                                    static_cast<const typename F::bits*>(a),
                                    static_cast<const typename F::bits*>(b), partial, numel));
  check_launch("bernoulli_kl_sum_cuda");
}

void bernoulli_kl_backward_cuda(DType dtype, const void* a, const void* b, const void* grad, void* da,
                                void* db, int64_t numel, void* stream) {
  if (numel == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  PYRATOK_DISPATCH_DTYPE(dtype, bernoulli_kl_backward_kernel<F><<<grid_for(numel), kThreads, 0, s>>>(
                                    static_cast<const typename F::bits*>(a),
                                    static_cast<const typename F::bits*>(b),
                                    static_cast<const typename F::work*>(grad),
                                    static_cast<typename F::bits*>(da), static_cast<typename F::bits*>(db),
                                    numel));
  check_launch("bernoulli_kl_backward_cuda");
}

void code_histogram_cuda(const void* indices, IndexType it, int64_t* counts, int64_t bins, int64_t numel,
                         void* stream) {
  if (numel == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  auto* out = reinterpret_cast<unsigned long long*>(counts);
  const bool shared = bins <= kSharedBins;
  if (it == IndexType::I32) {
    const auto* idx = static_cast<const int32_t*>(indices);
    if (shared)
      code_histogram_shared_kernel<<<grid_for(numel), kThreads, 0, s>>>(idx, out, (int)bins, numel);
    else
      code_histogram_kernel<<<grid_for(numel), kThreads, 0, s>>>(idx, out, numel);
  } else {
    const auto* idx = static_cast<const int64_t*>(indices);
    if (shared)
      code_histogram_shared_kernel<<<grid_for(numel), kThreads, 0, s>>>(idx, out, (int)bins, numel);
    else
      code_histogram_kernel<<<grid_for(numel), kThreads, 0, s>>>(idx, out, numel);
  }
  check_launch("code_histogram_cuda");
}

}  // namespace pyratok
