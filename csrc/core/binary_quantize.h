// Bit-plane binary quantization (DESIGN.md §2.1), framework-free.
//
// A quantized tensor is viewed as (outer, K, inner): element (o, k, i) of x lives at
// o*s_outer + k*s_k + i*s_inner (in elements).  Channel-first (B,K,T,H,W) contiguous
// input is (B, K, T*H*W) with s_inner = 1; channels-last input is (B, K, T*H*W) with
// s_k = 1, s_inner = K.  Token t = o*inner + i indexes the per-token outputs
// (indices, bit labels), which are always dense in token order.
//
// Every CPU entry point processes tokens [begin, end) so that the caller chooses
// the threading (ATen parallel_for in the torch binding, plain loops in ctest).
// The CUDA launchers process the whole tensor on the given cudaStream_t (void* so
// that this header needs no CUDA include).
//
// Cost: binary_quantize reads N*K elements and writes N*K codes + N indices; it is
// memory bound, judged against the copy bandwidth (a clone of x).
#pragma once

#include <cstdint>

#include "dtype.h"

namespace pyratok {

struct ChannelLayout {
  int64_t outer, K, inner;
  int64_t s_outer, s_k, s_inner;
  PYRATOK_HD int64_t tokens() const { return outer * inner; }
};

struct QuantizeArgs {
  DType dtype;
  const void* x;
  ChannelLayout layout;
  double scale;          // code magnitude, stored in x's format
  void* codes;           // same layout as x, or nullptr
  void* indices;         // (tokens,) int32/int64 MSB-first, or nullptr (requires K <= 63)
  IndexType index_type;
  uint8_t* bit_labels;   // (tokens, K) uint8, or nullptr
};

struct ResidualArgs {
  DType dtype;
  const void* x;
  ChannelLayout layout;
  int levels;            // level i uses scale 2^-i
  void* codes;           // sum of the level codes, layout of x
  void* indices;         // (levels, tokens)
  IndexType index_type;
};

struct IndicesToCodesArgs {
  const void* indices;   // (tokens,)
  IndexType index_type;
  DType dtype;           // format of codes
  ChannelLayout layout;  // layout of codes
  double scale;
  void* codes;
};

void binary_quantize_cpu(const QuantizeArgs& a, int64_t begin, int64_t end);
void residual_binary_quantize_cpu(const ResidualArgs& a, int64_t begin, int64_t end);
void indices_to_codes_cpu(const IndicesToCodesArgs& a, int64_t begin, int64_t end);

// Element-wise helpers over `count` tokens, range [begin, end).
void indices_to_bits_cpu(const void* indices, IndexType it, int64_t K, uint8_t* bits,
                         int64_t begin, int64_t end);
void bits_to_indices_cpu(const uint8_t* bits, int64_t K, void* indices, IndexType it,
                         int64_t begin, int64_t end);
void pack_bits_cpu(const uint8_t* bits, int64_t K, uint8_t* packed, int64_t begin, int64_t end);
void unpack_bits_cpu(const uint8_t* packed, int64_t K, uint8_t* bits, int64_t begin, int64_t end);
void reverse_bit_order_cpu(const void* in, IndexType it, int64_t K, void* out, int64_t begin,
                           int64_t end);

// CUDA launchers (binary_quantize_cuda.cu); `stream` is a cudaStream_t.
void binary_quantize_cuda(const QuantizeArgs& a, void* stream);
void residual_binary_quantize_cuda(const ResidualArgs& a, void* stream);
void indices_to_codes_cuda(const IndicesToCodesArgs& a, void* stream);
void indices_to_bits_cuda(const void* indices, IndexType it, int64_t K, uint8_t* bits,
                          int64_t tokens, void* stream);
void bits_to_indices_cuda(const uint8_t* bits, int64_t K, void* indices, IndexType it,
                          int64_t tokens, void* stream);
void pack_bits_cuda(const uint8_t* bits, int64_t K, uint8_t* packed, int64_t tokens, void* stream);
void unpack_bits_cuda(const uint8_t* packed, int64_t K, uint8_t* bits, int64_t tokens,
                      void* stream);
void reverse_bit_order_cuda(const void* in, IndexType it, int64_t K, void* out, int64_t tokens,
                            void* stream);

}  // namespace pyratok
