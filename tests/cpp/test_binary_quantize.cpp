// C++ unit tests of csrc/core/binary_quantize (no torch): format conversions, the
// sign rule on special values, fast vs strided paths, and the integer helpers.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "binary_quantize.h"
#include "check.h"

using namespace pyratok;


static void test_half_round_trip() {
  // every non-NaN half survives half -> float -> half
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = half_to_float((uint16_t)h);
    if (std::isnan(f)) continue;
    CHECK(float_to_half(f) == h);
  }
  CHECK(half_to_float(0x3C00) == 1.0f);
  CHECK(half_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(float_to_half(65504.0f) == 0x7BFF);
  CHECK(float_to_half(65520.0f) == 0x7C00);          // ties to even: overflows
  CHECK(float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);  // tie -> even
  CHECK(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3C02);
  CHECK(float_to_half(std::ldexp(1.0f, -25)) == 0x0000);
  CHECK(float_to_half(std::ldexp(1.5f, -25)) == 0x0001);
}

static void test_bf16_round_trip() {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = bf16_to_float((uint16_t)h);
    if (std::isnan(f)) continue;
    CHECK(float_to_bf16(f) == h);
  }
  CHECK(float_to_bf16(1.0f) == 0x3F80);
  CHECK(float_to_bf16(bits_float(0x3F808000u)) == 0x3F80);  // tie -> even
  CHECK(float_to_bf16(bits_float(0x3F818000u)) == 0x3F82);
}

static void test_sign_rule() {
  const float specials[] = {0.0f, -0.0f, NAN, INFINITY, -INFINITY, 1e-40f, -1e-40f, 2.0f, -2.0f};
  for (float f : specials) {
    const bool want = f > 0;
    CHECK(Format<DType::F32>::positive(float_bits(f)) == want);
    CHECK(Format<DType::F64>::positive(double_bits((double)f)) == want);
    CHECK(Format<DType::F16>::positive(float_to_half(f)) == (half_to_float(float_to_half(f)) > 0));
    CHECK(Format<DType::BF16>::positive(float_to_bf16(f)) == want);
  }
}

static void test_fast_path_matches_strided() {
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  for (int64_t K : {1, 7, 16, 31, 33, 63}) {
    const int64_t outer = 3, inner = 300;  // > one kBlock, with a ragged tail
    std::vector<float> x(outer * K * inner), xl(outer * K * inner);
    for (auto& v : x) v = nd(rng);
    // channels-last copy of the same values
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t i = 0; i < inner; ++i) xl[o * inner * K + i * K + k] = x[o * K * inner + k * inner + i];
    std::vector<float> codes(x.size()), codes_l(x.size());
    std::vector<int64_t> idx(outer * inner), idx_l(outer * inner);
    std::vector<uint8_t> bits(outer * inner * K), bits_l(outer * inner * K);
    const IndexType it = IndexType::I64;
    QuantizeArgs a{DType::F32, x.data(), {outer, K, inner, K * inner, inner, 1}, 0.5, codes.data(),
                   idx.data(), it, bits.data()};
    QuantizeArgs b{DType::F32, xl.data(), {outer, K, inner, inner * K, 1, K}, 0.5, codes_l.data(),
                   idx_l.data(), it, bits_l.data()};
    // two ranges, to exercise range boundaries inside a row
    binary_quantize_cpu(a, 0, 417);
    binary_quantize_cpu(a, 417, outer * inner);
    binary_quantize_cpu(b, 0, outer * inner);
    CHECK(idx == idx_l);
    CHECK(bits == bits_l);
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t i = 0; i < inner; ++i) {
          const float v = x[o * K * inner + k * inner + i];
          const float c = codes[o * K * inner + k * inner + i];
          CHECK(c == (v > 0 ? 0.5f : -0.5f));
          CHECK(codes_l[o * inner * K + i * K + k] == c);
        }
    // index -> bits -> index, pack -> unpack, reverse twice
    const int64_t n = outer * inner;
    std::vector<uint8_t> bits2(n * K), packed(n * ((K + 7) / 8)), unpacked(n * K);
    std::vector<int64_t> idx2(n), rev(n), rev2(n);
    indices_to_bits_cpu(idx.data(), it, K, bits2.data(), 0, n);
    CHECK(bits2 == bits);
    bits_to_indices_cpu(bits2.data(), K, idx2.data(), it, 0, n);
    CHECK(idx2 == idx);
    pack_bits_cpu(bits.data(), K, packed.data(), 0, n);
    unpack_bits_cpu(packed.data(), K, unpacked.data(), 0, n);
    CHECK(unpacked == bits);
    reverse_bit_order_cpu(idx.data(), it, K, rev.data(), 0, n);
    reverse_bit_order_cpu(rev.data(), it, K, rev2.data(), 0, n);
    CHECK(rev2 == idx);
    // indices -> codes gives the quantizer's codes back
    std::vector<float> codes2(x.size());
    IndicesToCodesArgs c{idx.data(), it, DType::F32, {outer, K, inner, K * inner, inner, 1}, 0.5, codes2.data()};
    indices_to_codes_cpu(c, 0, n);
    CHECK(codes2 == codes);
  }
}

static void test_residual() {
  // x = 0.8125 = 1 - 0.5 + 0.25 + 0.125 - 0.0625 (levels 1, 1/2, 1/4, 1/8, 1/16)
  const float x[1] = {0.8125f};
  float codes[1];
  int32_t idx[5];
  ResidualArgs a{DType::F32, x, {1, 1, 1, 1, 1, 1}, 5, codes, idx, IndexType::I32};
  residual_binary_quantize_cpu(a, 0, 1);
  const int32_t want[5] = {1, 0, 1, 1, 0};
  for (int l = 0; l < 5; ++l) CHECK(idx[l] == want[l]);
  CHECK(codes[0] == 0.8125f);  // exactly representable in 5 levels
}

int main() {
  test_half_round_trip();
  test_bf16_round_trip();
  test_sign_rule();
  test_fast_path_matches_strided();
  test_residual();
  return finish("test_binary_quantize");
}
