// CPU kernels for bit-plane binary quantization; contract in binary_quantize.h.
//
// Channel-first input (s_inner == 1) is processed in blocks of kBlock tokens: for
// each channel k the block's K-th plane is a contiguous run, so the sign test,
// the shift-or into the block's indices and the code store vectorise over tokens.
// Channels-last input (s_k == 1) walks each token's K contiguous values.  Any other
// stride pattern takes the scalar path.  The sign test works on raw bits (dtype.h),
// so every format is exact and the inner loops are integer-only.
#include <algorithm>

#include "binary_quantize.h"

#ifndef PYRATOK_QBLOCK
#define PYRATOK_QBLOCK 2048
#endif

namespace pyratok {
namespace {

// 2048 tokens: runs of 4-16 KB per channel plane keep the prefetchers streaming.
constexpr int64_t kBlock = PYRATOK_QBLOCK;

// The typed pointers and the +scale / -scale code bit patterns of a QuantizeArgs.
template <typename F, typename Index>
struct Typed {
  const typename F::bits* x;
  typename F::bits* codes;
  Index* indices;
  typename F::bits pos, neg;
};

template <typename F, typename Index>
Typed<F, Index> typed(const QuantizeArgs& a) {
  using B = typename F::bits;
  const B pos = F::store(static_cast<typename F::work>(a.scale));
  return {static_cast<const B*>(a.x), static_cast<B*>(a.codes), static_cast<Index*>(a.indices), pos,
          F::negate(pos)};
}

template <typename F, typename Index>
void quantize_channel_first(const QuantizeArgs& a, int64_t begin, int64_t end) {
  using B = typename F::bits;
  const ChannelLayout& L = a.layout;
  const auto [x, codes, indices, pos, neg] = typed<F, Index>(a);
  Index acc[kBlock];
  int64_t t = begin;
  while (t < end) {
    const int64_t o = t / L.inner;
    const int64_t i0 = t - o * L.inner;
    const int64_t n = std::min<int64_t>({kBlock, end - t, L.inner - i0});
    std::fill(acc, acc + n, Index(0));
    for (int64_t k = 0; k < L.K; ++k) {
      const int64_t off = o * L.s_outer + k * L.s_k + i0;
      const B* xr = x + off;
      if (codes) {
        B* cr = codes + off;
        for (int64_t j = 0; j < n; ++j) {
          const bool b = F::positive(xr[j]);
          acc[j] = (Index)((acc[j] << 1) | (Index)b);
          cr[j] = b ? pos : neg;
        }
      } else {
        for (int64_t j = 0; j < n; ++j) acc[j] = (Index)((acc[j] << 1) | (Index)F::positive(xr[j]));
      }
      if (a.bit_labels) {
        uint8_t* bl = a.bit_labels + t * L.K + k;
        for (int64_t j = 0; j < n; ++j) bl[j * L.K] = (uint8_t)F::positive(xr[j]);
      }
    }
    if (indices) std::copy(acc, acc + n, indices + t);
    t += n;
  }
}

// Channels-last: each token's K values are contiguous.  The index is an OR-reduction of
// per-channel masks (bit ? weight[k] : 0), which vectorises over k, unlike a shift chain.
template <typename F, typename Index>
void quantize_channels_last(const QuantizeArgs& a, int64_t begin, int64_t end) {
  using B = typename F::bits;
  const ChannelLayout& L = a.layout;
  const auto [x, codes, indices, pos, neg] = typed<F, Index>(a);
  Index weight[64];
  for (int64_t k = 0; k < L.K; ++k) weight[k] = (Index)((Index)1 << ((L.K - 1 - k) & 63));
  int64_t o = begin / L.inner, i = begin - o * L.inner;
  for (int64_t t = begin; t < end; ++t, ++i) {
    if (i == L.inner) i = 0, ++o;
    const int64_t base = o * L.s_outer + i * L.s_inner;
    const B* xr = x + base;
    Index acc = 0;
    for (int64_t k = 0; k < L.K; ++k) acc |= weight[k] & (Index)(Index(0) - (Index)F::positive(xr[k]));
    if (codes) {
      B* cr = codes + base;
      for (int64_t k = 0; k < L.K; ++k) cr[k] = F::positive(xr[k]) ? pos : neg;
    }
    if (a.bit_labels)
      for (int64_t k = 0; k < L.K; ++k) a.bit_labels[t * L.K + k] = (uint8_t)F::positive(xr[k]);
    if (indices) indices[t] = acc;
  }
}

template <typename F, typename Index>
void quantize_strided(const QuantizeArgs& a, int64_t begin, int64_t end) {
  const ChannelLayout& L = a.layout;
  const auto [x, codes, indices, pos, neg] = typed<F, Index>(a);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t o = t / L.inner;
    const int64_t i = t - o * L.inner;
    const int64_t base = o * L.s_outer + i * L.s_inner;
    Index acc = 0;
    for (int64_t k = 0; k < L.K; ++k) {
      const bool b = F::positive(x[base + k * L.s_k]);
      acc = (Index)((acc << 1) | (Index)b);
      if (codes) codes[base + k * L.s_k] = b ? pos : neg;
      if (a.bit_labels) a.bit_labels[t * L.K + k] = (uint8_t)b;
    }
    if (indices) indices[t] = acc;
  }
}

template <typename F, typename Index>
void quantize_layout(const QuantizeArgs& a, int64_t begin, int64_t end) {
  const ChannelLayout& L = a.layout;
  if (L.s_inner == 1 && L.inner > 1)
    quantize_channel_first<F, Index>(a, begin, end);
  else if (L.s_k == 1)
    quantize_channels_last<F, Index>(a, begin, end);
  else
    quantize_strided<F, Index>(a, begin, end);
}

template <typename F>
void quantize_dispatch_index(const QuantizeArgs& a, int64_t begin, int64_t end) {
  // Index arithmetic is unsigned; the stored pattern is the same int32/int64.
  if (a.index_type == IndexType::I32)
    quantize_layout<F, uint32_t>(a, begin, end);
  else
    quantize_layout<F, uint64_t>(a, begin, end);
}

template <typename F, typename Index>
void residual_impl(const ResidualArgs& a, int64_t begin, int64_t end) {
  using B = typename F::bits;
  using W = typename F::work;
  const ChannelLayout& L = a.layout;
  const int64_t tokens = L.tokens();
  const B* x = static_cast<const B*>(a.x);
  B* codes = static_cast<B*>(a.codes);
  Index* indices = static_cast<Index*>(a.indices);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t o = t / L.inner;
    const int64_t i = t - o * L.inner;
    const int64_t base = o * L.s_outer + i * L.s_inner;
    Index acc[64] = {0};
    for (int64_t k = 0; k < L.K; ++k) {
      const int64_t off = base + k * L.s_k;
      W r = F::load(x[off]);
      W total = 0;
      W s = 1;
      for (int l = 0; l < a.levels; ++l) {
        const bool b = r > 0;  // NaN compares false: bit 0, as in the reference
        const W c = b ? s : -s;
        acc[l] = (Index)((acc[l] << 1) | (Index)b);
        total += c;
        r -= c;
        s *= W(0.5);
      }
      codes[off] = F::store(total);
    }
    if (indices)
      for (int l = 0; l < a.levels; ++l) indices[l * tokens + t] = acc[l];
  }
}

template <typename Index>
void indices_to_codes_impl(const IndicesToCodesArgs& a, int64_t begin, int64_t end) {
  const Index* idx = static_cast<const Index*>(a.indices);
  const ChannelLayout& L = a.layout;
  PYRATOK_DISPATCH_DTYPE(a.dtype, {
    using B = typename F::bits;
    B* codes = static_cast<B*>(a.codes);
    const B pos = F::store(static_cast<typename F::work>(a.scale));
    const B neg = F::negate(pos);
    if (L.s_inner == 1 && L.inner > 1) {
      // Channel-first: write plane k of a block of tokens contiguously.
      int64_t t = begin;
      while (t < end) {
        const int64_t o = t / L.inner;
        const int64_t i0 = t - o * L.inner;
        const int64_t n = std::min<int64_t>({kBlock, end - t, L.inner - i0});
        const Index* v = idx + t;
        for (int64_t k = 0; k < L.K; ++k) {
          B* cr = codes + o * L.s_outer + k * L.s_k + i0;
          const int shift = (int)(L.K - 1 - k);
          for (int64_t j = 0; j < n; ++j) cr[j] = (((uint64_t)v[j] >> shift) & 1u) ? pos : neg;
        }
        t += n;
      }
    } else {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t o = t / L.inner;
        const int64_t i = t - o * L.inner;
        const int64_t base = o * L.s_outer + i * L.s_inner;
        const uint64_t v = (uint64_t)idx[t];
        for (int64_t k = 0; k < L.K; ++k)
          codes[base + k * L.s_k] = ((v >> (L.K - 1 - k)) & 1u) ? pos : neg;
      }
    }
  });
}

uint64_t load_any(const void* p, IndexType it, int64_t t) {
  return it == IndexType::I32 ? (uint64_t)(uint32_t) static_cast<const int32_t*>(p)[t]
                              : (uint64_t) static_cast<const int64_t*>(p)[t];
}

void store_any(void* p, IndexType it, int64_t t, uint64_t v) {
  if (it == IndexType::I32)
    static_cast<int32_t*>(p)[t] = (int32_t)(uint32_t)v;
  else
    static_cast<int64_t*>(p)[t] = (int64_t)v;
}

}  // namespace

void binary_quantize_cpu(const QuantizeArgs& a, int64_t begin, int64_t end) {
  PYRATOK_DISPATCH_DTYPE(a.dtype, quantize_dispatch_index<F>(a, begin, end));
}

void residual_binary_quantize_cpu(const ResidualArgs& a, int64_t begin, int64_t end) {
  PYRATOK_DISPATCH_DTYPE(a.dtype, {
    if (a.index_type == IndexType::I32)
      residual_impl<F, uint32_t>(a, begin, end);
    else
      residual_impl<F, uint64_t>(a, begin, end);
  });
}

void indices_to_codes_cpu(const IndicesToCodesArgs& a, int64_t begin, int64_t end) {
  if (a.index_type == IndexType::I32)
    indices_to_codes_impl<int32_t>(a, begin, end);
  else
    indices_to_codes_impl<int64_t>(a, begin, end);
}

void indices_to_bits_cpu(const void* indices, IndexType it, int64_t K, uint8_t* bits,
                         int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const uint64_t v = load_any(indices, it, t);
    uint8_t* row = bits + t * K;
    for (int64_t k = 0; k < K; ++k) row[k] = (uint8_t)((v >> (K - 1 - k)) & 1u);
  }
}

void bits_to_indices_cpu(const uint8_t* bits, int64_t K, void* indices, IndexType it,
                         int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const uint8_t* row = bits + t * K;
    uint64_t v = 0;
    for (int64_t k = 0; k < K; ++k) v = (v << 1) | (uint64_t)(row[k] != 0);
    store_any(indices, it, t, v);
  }
}

void pack_bits_cpu(const uint8_t* bits, int64_t K, uint8_t* packed, int64_t begin, int64_t end) {
  const int64_t nbytes = (K + 7) / 8;
  for (int64_t t = begin; t < end; ++t) {
    const uint8_t* row = bits + t * K;
    uint8_t* out = packed + t * nbytes;
    for (int64_t j = 0; j < nbytes; ++j) {
      uint8_t byte = 0;
      for (int64_t b = 0; b < 8; ++b) {
        const int64_t k = j * 8 + b;
        byte = (uint8_t)((byte << 1) | (k < K ? (uint8_t)(row[k] != 0) : 0));
      }
      out[j] = byte;
    }
  }
}

void unpack_bits_cpu(const uint8_t* packed, int64_t K, uint8_t* bits, int64_t begin, int64_t end) {
  const int64_t nbytes = (K + 7) / 8;
  for (int64_t t = begin; t < end; ++t) {
    const uint8_t* in = packed + t * nbytes;
    uint8_t* row = bits + t * K;
    for (int64_t k = 0; k < K; ++k) row[k] = (uint8_t)((in[k >> 3] >> (7 - (k & 7))) & 1u);
  }
}

void reverse_bit_order_cpu(const void* in, IndexType it, int64_t K, void* out, int64_t begin,
                           int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const uint64_t v = load_any(in, it, t);
    uint64_t r = 0;
    for (int64_t k = 0; k < K; ++k) r |= ((v >> k) & 1u) << (K - 1 - k);
    store_any(out, it, t, r);
  }
}

}  // namespace pyratok
