// Framework-free element formats for pyratok kernels.
//
// Kernels see tensors as raw bit patterns (uint16/32/64) plus a DType tag, so this
// header needs neither torch nor the CUDA half headers and compiles with g++ and
// nvcc alike.  The sign decision (x > 0) is made on the bits, which is exact for
// every format and vectorises as plain integer compares; fp16/bf16 <-> fp32
// conversions round to nearest even, matching c10 (and hence torch's .to()).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PYRATOK_HD __host__ __device__ __forceinline__
#else
#define PYRATOK_HD inline
#endif

namespace pyratok {

enum class DType : int { F16 = 0, BF16 = 1, F32 = 2, F64 = 3 };

enum class IndexType : int { I32 = 0, I64 = 1 };

PYRATOK_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

PYRATOK_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

PYRATOK_HD uint64_t double_bits(double d) {
  uint64_t u;
  memcpy(&u, &d, sizeof(u));
  return u;
}

PYRATOK_HD double bits_double(uint64_t u) {
  double d;
  memcpy(&d, &u, sizeof(d));
  return d;
}

PYRATOK_HD float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu;
  uint32_t m = h & 0x3FFu;
  uint32_t u;
  if (e == 0x1Fu) {
    u = sign | 0x7F800000u | (m << 13);
  } else if (e == 0) {
    if (m == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      e = 113;
      while (!(m & 0x400u)) {
        m <<= 1;
        --e;
      }
      u = sign | (e << 23) | ((m & 0x3FFu) << 13);
    }
  } else {
    u = sign | ((e + 112) << 23) | (m << 13);
  }
  return bits_float(u);
}

PYRATOK_HD uint16_t float_to_half(float f) {
  uint32_t x = float_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return (uint16_t)(sign | (x > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (x >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // rounds past 65504
  if (x <= 0x33000000u) return (uint16_t)sign;               // <= 2^-25 rounds to 0
  uint32_t e = x >> 23;
  uint32_t r, rem, halfway;
  if (e < 113) {  // half subnormal
    uint32_t mant = (x & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126 - e;
    r = mant >> shift;
    rem = mant & ((1u << shift) - 1);
    halfway = 1u << (shift - 1);
  } else {
    r = ((e - 112) << 10) | ((x >> 13) & 0x3FFu);
    rem = x & 0x1FFFu;
    halfway = 0x1000u;
  }
  if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
  return (uint16_t)(sign | r);
}

PYRATOK_HD float bf16_to_float(uint16_t h) { return bits_float((uint32_t)h << 16); }

PYRATOK_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// Per-format traits: storage type, "x > 0" on the bits, negation, and the
// working (compute) type with its conversions.
template <DType D>
struct Format;

template <>
struct Format<DType::F16> {
  using bits = uint16_t;
  using work = float;
  // x > 0 on the bits: 0 < h <= +inf, i.e. (h - 1) < 0x7C00 unsigned (one compare; -0, NaN and
  // every negative value wrap above it).
  static PYRATOK_HD bool positive(bits h) { return (bits)(h - 1u) < 0x7C00u; }
  static PYRATOK_HD bits negate(bits h) { return (bits)(h ^ 0x8000u); }
  static PYRATOK_HD work load(bits h) { return half_to_float(h); }
  static PYRATOK_HD bits store(work w) { return float_to_half(w); }
};

template <>
struct Format<DType::BF16> {
  using bits = uint16_t;
  using work = float;
  static PYRATOK_HD bool positive(bits h) { return (bits)(h - 1u) < 0x7F80u; }
  static PYRATOK_HD bits negate(bits h) { return (bits)(h ^ 0x8000u); }
  static PYRATOK_HD work load(bits h) { return bf16_to_float(h); }
  static PYRATOK_HD bits store(work w) { return float_to_bf16(w); }
};

template <>
struct Format<DType::F32> {
  using bits = uint32_t;
  using work = float;
  static PYRATOK_HD bool positive(bits u) { return u - 1u < 0x7F800000u; }
  static PYRATOK_HD bits negate(bits u) { return u ^ 0x80000000u; }
  static PYRATOK_HD work load(bits u) { return bits_float(u); }
  static PYRATOK_HD bits store(work w) { return float_bits(w); }
};

template <>
struct Format<DType::F64> {
  using bits = uint64_t;
  using work = double;
  static PYRATOK_HD bool positive(bits u) { return u - 1u < 0x7FF0000000000000ull; }
  static PYRATOK_HD bits negate(bits u) { return u ^ 0x8000000000000000ull; }
  static PYRATOK_HD work load(bits u) { return bits_double(u); }
  static PYRATOK_HD bits store(work w) { return double_bits(w); }
};

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::F32: return "float32";
    case DType::F64: return "float64";
  }
  return "?";
}

}  // namespace pyratok

// Expands BODY once per format with `F` bound to the matching Format<> type.
#define PYRATOK_DISPATCH_DTYPE(dtype, ...)                       \
  switch (dtype) {                                                \
    case ::pyratok::DType::F16: {                                 \
      using F = ::pyratok::Format<::pyratok::DType::F16>;         \
      __VA_ARGS__;                                                \
      break;                                                      \
    }                                                             \
    case ::pyratok::DType::BF16: {                                \
      using F = ::pyratok::Format<::pyratok::DType::BF16>;        \
      __VA_ARGS__;                                                \
      break;                                                      \
    }                                                             \
    case ::pyratok::DType::F32: {                                 \
      using F = ::pyratok::Format<::pyratok::DType::F32>;         \
      __VA_ARGS__;                                                \
      break;                                                      \
    }                                                             \
    case ::pyratok::DType::F64: {                                 \
      using F = ::pyratok::Format<::pyratok::DType::F64>;         \
      __VA_ARGS__;                                                \
      break;                                                      \
    }                                                             \
  }
