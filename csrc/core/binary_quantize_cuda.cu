// CUDA kernels for bit-plane binary quantization; contract in binary_quantize.h.
//
// One thread per token, grid-stride loop, 64-bit offsets throughout (tensors past
// 2^31 elements are fine).  For channel-first input consecutive threads read
// consecutive tokens of one channel plane, so every load and store is coalesced.
// Channels-last input whose tokens are dense rows of K channels (x[t*K + k]) runs
// element-parallel instead: consecutive threads take consecutive elements (coalesced
// loads of x and stores of codes and bit labels, which share that layout), the bits of a
// tile of tokens go through shared memory, and one thread per token assembles its index.
// Memory bound: judged against the device copy bandwidth (device_check.sh).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "binary_quantize.h"

namespace pyratok {
namespace {

constexpr int kThreads = 256;

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return (unsigned)(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

template <typename F, typename Index>
__global__ void quantize_kernel(QuantizeArgs a) {
  using B = typename F::bits;
  const ChannelLayout L = a.layout;
  const B* x = static_cast<const B*>(a.x);
  B* codes = static_cast<B*>(a.codes);
  Index* indices = static_cast<Index*>(a.indices);
  const B pos = F::store(static_cast<typename F::work>(a.scale));
  const B neg = F::negate(pos);
  const int64_t tokens = L.tokens();
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < tokens;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t o = t / L.inner;
    const int64_t i = t - o * L.inner;
    const int64_t base = o * L.s_outer + i * L.s_inner;
    Index acc = 0;
    for (int64_t k = 0; k < L.K; ++k) {
      const int64_t off = base + k * L.s_k;
      const bool b = F::positive(x[off]);
      acc = (Index)((acc << 1) | (Index)b);
      if (codes) codes[off] = b ? pos : neg;
      if (a.bit_labels) a.bit_labels[t * L.K + k] = (uint8_t)b;
    }
    if (indices) indices[t] = acc;
  }
}

// Elements of x per tile of the channels-last kernel (4096 / K tokens).
constexpr int kTileElements = 4096;

inline bool dense_channels_last(const ChannelLayout& L) {
  return L.K > 1 && L.s_k == 1 && L.s_inner == L.K && (L.outer == 1 || L.s_outer == L.inner * L.K);
}

template <typename F, typename Index>
__global__ void quantize_channels_last_kernel(QuantizeArgs a) {
  using B = typename F::bits;
  __shared__ uint8_t tile_bits[kTileElements];
  const ChannelLayout L = a.layout;
  const B* x = static_cast<const B*>(a.x);
  B* codes = static_cast<B*>(a.codes);
  Index* indices = static_cast<Index*>(a.indices);
  const B pos = F::store(static_cast<typename F::work>(a.scale));
  const B neg = F::negate(pos);
  const int K = (int)L.K;
  const int tile_tokens = kTileElements / K;
  const int64_t tokens = L.tokens();
  for (int64_t t0 = (int64_t)blockIdx.x * tile_tokens; t0 < tokens; t0 += (int64_t)gridDim.x * tile_tokens) {
    const int n_tokens = (int)(tokens - t0 < tile_tokens ? tokens - t0 : tile_tokens);
    const int n = n_tokens * K;
    const int64_t e0 = t0 * K;
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
      const bool b = F::positive(x[e0 + e]);
      if (codes) codes[e0 + e] = b ? pos : neg;
      if (a.bit_labels) a.bit_labels[e0 + e] = (uint8_t)b;
      tile_bits[e] = (uint8_t)b;
    }
    if (indices) {
      __syncthreads();
      for (int t = threadIdx.x; t < n_tokens; t += blockDim.x) {
        Index acc = 0;
        for (int k = 0; k < K; ++k) acc = (Index)((acc << 1) | (Index)tile_bits[t * K + k]);
        indices[t0 + t] = acc;
      }
      __syncthreads();
    }
  }
}

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename F, typename Index>
__global__ void residual_kernel(ResidualArgs a) {
  using B = typename F::bits;
  using W = typename F::work;
  const ChannelLayout L = a.layout;
  const B* x = static_cast<const B*>(a.x);
  B* codes = static_cast<B*>(a.codes);
  Index* indices = static_cast<Index*>(a.indices);
  const int64_t tokens = L.tokens();
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < tokens;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t o = t / L.inner;
    const int64_t i = t - o * L.inner;
    const int64_t base = o * L.s_outer + i * L.s_inner;
    for (int l = 0; l < a.levels; ++l)
      if (indices) indices[l * tokens + t] = 0;
    for (int64_t k = 0; k < L.K; ++k) {
      const int64_t off = base + k * L.s_k;
      W r = F::load(x[off]);
      W total = 0;
      W s = 1;
      for (int l = 0; l < a.levels; ++l) {
        const bool b = r > 0;
        const W c = b ? s : -s;
        if (indices) {
          Index& slot = indices[l * tokens + t];
          slot = (Index)((slot << 1) | (Index)b);
        }
        total = add_rn(total, c);  // round-to-nearest adds, never contracted: as on the CPU
        r = add_rn(r, -c);
        s *= W(0.5);
      }
      codes[off] = F::store(total);
    }
  }
}

template <typename Index>
__global__ void indices_to_codes_kernel(IndicesToCodesArgs a) {
  const Index* idx = static_cast<const Index*>(a.indices);
  const ChannelLayout L = a.layout;
  const int64_t tokens = L.tokens();
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < tokens;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t o = t / L.inner;
    const int64_t i = t - o * L.inner;
    const int64_t base = o * L.s_outer + i * L.s_inner;
    const uint64_t v = (uint64_t)idx[t];
    PYRATOK_DISPATCH_DTYPE(a.dtype, {
      using B = typename F::bits;
      B* codes = static_cast<B*>(a.codes);
      const B pos = F::store(static_cast<typename F::work>(a.scale));
      const B neg = F::negate(pos);
      for (int64_t k = 0; k < L.K; ++k)
        codes[base + k * L.s_k] = ((v >> (L.K - 1 - k)) & 1u) ? pos : neg;
    });
  }
}

__device__ __forceinline__ uint64_t load_any(const void* p, IndexType it, int64_t t) {
  return it == IndexType::I32 ? (uint64_t)(uint32_t) static_cast<const int32_t*>(p)[t]
                              : (uint64_t) static_cast<const int64_t*>(p)[t];
}

__device__ __forceinline__ void store_any(void* p, IndexType it, int64_t t, uint64_t v) {
  if (it == IndexType::I32)
    static_cast<int32_t*>(p)[t] = (int32_t)(uint32_t)v;
  else
    static_cast<int64_t*>(p)[t] = (int64_t)v;
}

#define PYRATOK_TOKEN_LOOP(tokens) \
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < (tokens); \
       t += (int64_t)gridDim.x * blockDim.x)

__global__ void indices_to_bits_kernel(const void* indices, IndexType it, int64_t K, uint8_t* bits,
                                       int64_t tokens) {
  PYRATOK_TOKEN_LOOP(tokens) {
    const uint64_t v = load_any(indices, it, t);
    for (int64_t k = 0; k < K; ++k) bits[t * K + k] = (uint8_t)((v >> (K - 1 - k)) & 1u);
  }
}

__global__ void bits_to_indices_kernel(const uint8_t* bits, int64_t K, void* indices, IndexType it,
                                       int64_t tokens) {
  PYRATOK_TOKEN_LOOP(tokens) {
    uint64_t v = 0;
    for (int64_t k = 0; k < K; ++k) v = (v << 1) | (uint64_t)(bits[t * K + k] != 0);
    store_any(indices, it, t, v);
  }
}

__global__ void pack_bits_kernel(const uint8_t* bits, int64_t K, uint8_t* packed, int64_t tokens) {
  const int64_t nbytes = (K + 7) / 8;
  PYRATOK_TOKEN_LOOP(tokens) {
    for (int64_t j = 0; j < nbytes; ++j) {
      uint8_t byte = 0;
      for (int64_t b = 0; b < 8; ++b) {
        const int64_t k = j * 8 + b;
        byte = (uint8_t)((byte << 1) | (k < K ? (uint8_t)(bits[t * K + k] != 0) : 0));
      }
      packed[t * nbytes + j] = byte;
    }
  }
}

__global__ void unpack_bits_kernel(const uint8_t* packed, int64_t K, uint8_t* bits, int64_t tokens) {
  const int64_t nbytes = (K + 7) / 8;
  PYRATOK_TOKEN_LOOP(tokens) {
    for (int64_t k = 0; k < K; ++k)
      bits[t * K + k] = (uint8_t)((packed[t * nbytes + (k >> 3)] >> (7 - (k & 7))) & 1u);
  }
}

__global__ void reverse_bit_order_kernel(const void* in, IndexType it, int64_t K, void* out,
                                         int64_t tokens) {
  PYRATOK_TOKEN_LOOP(tokens) {
    const uint64_t v = load_any(in, it, t);
    uint64_t r = 0;
    for (int64_t k = 0; k < K; ++k) r |= ((v >> k) & 1u) << (K - 1 - k);
    store_any(out, it, t, r);
  }
}

}  // namespace

void binary_quantize_cuda(const QuantizeArgs& a, void* stream) {
  const int64_t n = a.layout.tokens();
  if (n == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dense_channels_last(a.layout)) {
    const int64_t tile_tokens = kTileElements / a.layout.K;
    const int64_t blocks = (n + tile_tokens - 1) / tile_tokens;
    const unsigned grid = (unsigned)(blocks < 65535 * 16 ? blocks : 65535 * 16);
    PYRATOK_DISPATCH_DTYPE(a.dtype, {
      if (a.index_type == IndexType::I32)
        quantize_channels_last_kernel<F, uint32_t><<<grid, kThreads, 0, s>>>(a);
      else
        quantize_channels_last_kernel<F, uint64_t><<<grid, kThreads, 0, s>>>(a);
    });
  } else {
    PYRATOK_DISPATCH_DTYPE(a.dtype, {
      if (a.index_type == IndexType::I32)
        quantize_kernel<F, uint32_t><<<grid_for(n), kThreads, 0, s>>>(a);
      else
        quantize_kernel<F, uint64_t><<<grid_for(n), kThreads, 0, s>>>(a);
    });
  }
  check_launch("binary_quantize_cuda");
}

void residual_binary_quantize_cuda(const ResidualArgs& a, void* stream) {
  const int64_t n = a.layout.tokens();
  if (n == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  PYRATOK_DISPATCH_DTYPE(a.dtype, {
    if (a.index_type == IndexType::I32)
      residual_kernel<F, uint32_t><<<grid_for(n), kThreads, 0, s>>>(a);
    else
      residual_kernel<F, uint64_t><<<grid_for(n), kThreads, 0, s>>>(a);
  });
  check_launch("residual_binary_quantize_cuda");
}

void indices_to_codes_cuda(const IndicesToCodesArgs& a, void* stream) {
  const int64_t n = a.layout.tokens();
  if (n == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.index_type == IndexType::I32)
    indices_to_codes_kernel<int32_t><<<grid_for(n), kThreads, 0, s>>>(a);
  else
    indices_to_codes_kernel<int64_t><<<grid_for(n), kThreads, 0, s>>>(a);
  check_launch("indices_to_codes_cuda");
}

void indices_to_bits_cuda(const void* indices, IndexType it, int64_t K, uint8_t* bits,
                          int64_t tokens, void* stream) {
  if (tokens == 0) return;
  indices_to_bits_kernel<<<grid_for(tokens), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      indices, it, K, bits, tokens);
  check_launch("indices_to_bits_cuda");
}

void bits_to_indices_cuda(const uint8_t* bits, int64_t K, void* indices, IndexType it,
                          int64_t tokens, void* stream) {
  if (tokens == 0) return;
  bits_to_indices_kernel<<<grid_for(tokens), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      bits, K, indices, it, tokens);
  check_launch("bits_to_indices_cuda");
}

void pack_bits_cuda(const uint8_t* bits, int64_t K, uint8_t* packed, int64_t tokens, void* stream) {
  if (tokens == 0) return;
  pack_bits_kernel<<<grid_for(tokens), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      bits, K, packed, tokens);
  check_launch("pack_bits_cuda");
}

void unpack_bits_cuda(const uint8_t* packed, int64_t K, uint8_t* bits, int64_t tokens,
                      void* stream) {
  if (tokens == 0) return;
  unpack_bits_kernel<<<grid_for(tokens), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      packed, K, bits, tokens);
  check_launch("unpack_bits_cuda");
}

void reverse_bit_order_cuda(const void* in, IndexType it, int64_t K, void* out, int64_t tokens,
                            void* stream) {
  if (tokens == 0) return;
  reverse_bit_order_kernel<<<grid_for(tokens), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      in, it, K, out, tokens);
  check_launch("reverse_bit_order_cuda");
}

}  // namespace pyratok
