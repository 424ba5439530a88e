// CPU kernels for the entropy and alignment losses; contract in entropy.h.
//
// Code probabilities are built per token by prepending bits (least significant first):
// with the suffix distribution in row[0, n), prepending bit j writes row[n + a] = row[a] * p
// and then row[a] *= 1 - p, two contiguous vectorisable loops.  The backward reduces the
// weights w_c = grad_probs_c * probs_c to per-bit sums S1 (bit set) and S0 (bit clear) most
// significant bit first: the two halves of w are the bit's S0 and S1, and adding the upper
// half onto the lower one leaves the next bit most significant (~4 * 2^bits contiguous
// operations per token instead of bits * 2^bits).
//
// Denormals: every entry point runs under FlushDenormals (entropy.h); see there for why.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "entropy.h"

namespace pyratok {
namespace {


template <typename F>
void code_probs_impl(const CodeProbsArgs& a, void* probs_out, int64_t begin, int64_t end) {
  using W = typename F::work;
  using B = typename F::bits;
  const B* x = static_cast<const B*>(a.x);
  W* probs = static_cast<W*>(probs_out);
  const int64_t width = int64_t(1) << a.bits;
  const W coef = W(a.coef);
  for (int64_t t = begin; t < end; ++t) {
    W* row = probs + (t - a.first_token) * width;
    const B* xr = x + t * a.K + a.bit0;
    row[0] = W(1);
    int64_t n = 1;
    for (int j = a.bits - 1; j >= 0; --j, n *= 2) {
      const W z = coef * F::load(xr[j]);
      const W p = sigmoid_w<W>(z), q = sigmoid_w<W>(-z);
      for (int64_t c = 0; c < n; ++c) row[n + c] = row[c] * p;
      for (int64_t c = 0; c < n; ++c) row[c] *= q;
    }
  }
}

template <typename F>
void code_probs_backward_impl(const CodeProbsArgs& a, const void* probs_in, const void* grad_in,
                              void* dx_out, int64_t begin, int64_t end) {
  using W = typename F::work;
  using B = typename F::bits;
  const B* x = static_cast<const B*>(a.x);
  const W* probs = static_cast<const W*>(probs_in);
  const W* grad = static_cast<const W*>(grad_in);
  B* dx = static_cast<B*>(dx_out);
  const int64_t width = int64_t(1) << a.bits;
  const W coef = W(a.coef);
  std::vector<W> w(width);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t r = (t - a.first_token) * width;
    for (int64_t c = 0; c < width; ++c) w[c] = grad[r + c] * probs[r + c];
    // The most significant remaining bit splits w into a lower (bit 0) and an upper (bit 1)
    // half; folding the halves together leaves the next bit most significant.
    for (int j = 0, n = (int)width; j < a.bits; ++j, n /= 2) {
      const int half = n / 2;
      W s0 = 0, s1 = 0;
      for (int c = 0; c < half; ++c) s0 += w[c];
      for (int c = 0; c < half; ++c) s1 += w[half + c];
      for (int c = 0; c < half; ++c) w[c] += w[half + c];
      const int64_t off = t * a.K + a.bit0 + j;
      const W z = coef * F::load(x[off]);
      dx[off] = F::store(coef * (s1 * sigmoid_w<W>(-z) - s0 * sigmoid_w<W>(z)));
    }
  }
}

}  // namespace

void code_probs_cpu(const CodeProbsArgs& a, void* probs, int64_t begin, int64_t end) {
  const FlushDenormals flush;
  PYRATOK_DISPATCH_DTYPE(a.dtype, code_probs_impl<F>(a, probs, begin, end));
}

void code_probs_backward_cpu(const CodeProbsArgs& a, const void* probs, const void* grad_probs,
                             void* dx, int64_t begin, int64_t end) {
  const FlushDenormals flush;
  PYRATOK_DISPATCH_DTYPE(a.dtype, code_probs_backward_impl<F>(a, probs, grad_probs, dx, begin, end));
}

void bit_probs_cpu(DType dtype, const void* x, double coef, void* probs, int64_t begin, int64_t end) {
  const FlushDenormals flush;
  PYRATOK_DISPATCH_DTYPE(dtype, {
    using W = typename F::work;
    const auto* xs = static_cast<const typename F::bits*>(x);
    W* out = static_cast<W*>(probs);
    for (int64_t i = begin; i < end; ++i) out[i] = sigmoid_w<W>(W(coef) * F::load(xs[i]));
  });
}

double binary_entropy_sum_cpu(DType dtype, const void* x, double coef, int64_t begin, int64_t end) {
  const FlushDenormals flush;
  double total = 0;
  PYRATOK_DISPATCH_DTYPE(dtype, {
    using W = typename F::work;
    const auto* xs = static_cast<const typename F::bits*>(x);
    for (int64_t i = begin; i < end; ++i) total += binary_entropy_w<W>(W(coef) * F::load(xs[i]));
  });
  return total;
}

void binary_entropy_backward_cpu(DType dtype, const void* x, double coef, double grad, void* dx,
                                 int64_t begin, int64_t end) {
  const FlushDenormals flush;
  PYRATOK_DISPATCH_DTYPE(dtype, {
    using W = typename F::work;
    const auto* xs = static_cast<const typename F::bits*>(x);
    auto* out = static_cast<typename F::bits*>(dx);
    const W scale = W(grad * coef);
    for (int64_t i = begin; i < end; ++i)
      out[i] = F::store(scale * binary_entropy_grad_w<W>(W(coef) * F::load(xs[i])));
  });
}

double bernoulli_kl_sum_cpu(DType dtype, const void* a, const void* b, int64_t begin, int64_t end) {
  const FlushDenormals flush;
  double total = 0;
  PYRATOK_DISPATCH_DTYPE(dtype, {
    using W = typename F::work;
    const auto* as = static_cast<const typename F::bits*>(a);
    const auto* bs = static_cast<const typename F::bits*>(b);
    for (int64_t i = begin; i < end; ++i) total += bernoulli_kl_w<W>(F::load(as[i]), F::load(bs[i]));
  });
  return total;
}

void bernoulli_kl_backward_cpu(DType dtype, const void* a, const void* b, double grad, void* da,
                               void* db, int64_t begin, int64_t end) {
  const FlushDenormals flush;
  PYRATOK_DISPATCH_DTYPE(dtype, {
    using W = typename F::work;
    using B = typename F::bits;
    const B* as = static_cast<const B*>(a);
    const B* bs = static_cast<const B*>(b);
    B* das = static_cast<B*>(da);
    B* dbs = static_cast<B*>(db);
    const W g = W(grad);
    for (int64_t i = begin; i < end; ++i) {
      const W av = F::load(as[i]), bv = F::load(bs[i]);
      const W pa = sigmoid_w<W>(av);
      // dKL/da = p(1-p)(a-b), dKL/db = sigmoid(b) - sigmoid(a)
      if (das) das[i] = F::store(g * pa * sigmoid_w<W>(-av) * (av - bv));
      if (dbs) dbs[i] = F::store(g * (sigmoid_w<W>(bv) - pa));
    }
  });
}

// ---- log over count tiles ------------------------------------------------------------

namespace {

// GCC/Clang vector extensions: 8 floats, lowered to one AVX register in the avx2 clone and to
// two SSE registers in the baseline one.  (-Wpsabi: these helpers are always inlined, so no
// vector ever crosses a call boundary.)
#pragma GCC diagnostic ignored "-Wpsabi"  // (to the end of the file: GCC reports it at the end)
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

constexpr float kTinyF = 1.17549435e-38f;           // FLT_MIN
constexpr double kTinyD = 2.2250738585072014e-308;  // DBL_MIN

// log(v) for normal, finite v > 0 (the callers clamp to FLT_MIN): v = m 2^e with m in
// [sqrt(1/2), sqrt(2)), log v = e log 2 + log1p(m - 1); log1p by Cephes' logf minimax
// polynomial, log 2 split in two so that e log 2 adds no rounding error.  < 2 ulp.
__attribute__((always_inline)) inline v8f log8(v8f v) {
  const v8u u = (v8u)v;
  const v8u mbits = (u & 0x007FFFFFu) | 0x3F800000u;  // m in [1, 2)
  const v8i big = (v8i)(mbits > 0x3FB504F3u);          // -1 where m > sqrt(2): halve it
  const v8f m = (v8f)(mbits + ((v8u)big << 23));
  const v8f fe = __builtin_convertvector((v8i)(u >> 23) - 127 - big, v8f);
  const v8f f = m - 1.0f, z = f * f;
  v8f y = f * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return f + y + 0.693359375f * fe;
}

// max(c * inv_total, FLT_MIN) for the `valid` (<= 8) counts at c; lanes past them read 1.
template <int kValid>
__attribute__((always_inline)) inline v8f load_q(const float* c, int valid, float inv_total, v8f& counts) {
  if (kValid == 8) {
    memcpy(&counts, c, sizeof(counts));
  } else {
    counts = (v8f){} + 1.0f;
    memcpy(&counts, c, sizeof(float) * valid);
  }
  const v8f q = counts * inv_total;
  return q > kTinyF ? q : (v8f){} + kTinyF;
}

// sum c log(max(c inv_total, FLT_MIN)) over the tile; kGrad: also c <- scale (log(..) + 1).
template <bool kGrad>
__attribute__((always_inline)) inline double tile_f32(float* c, int64_t n, float inv_total, float scale) {
  double acc = 0;
  const int64_t body = n & ~int64_t(7);
  for (int64_t i = 0; i < body;) {
    v8f s = {};  // float lanes over <= 1024 counts, then double
    for (const int64_t e = std::min<int64_t>(body, i + 1024); i < e; i += 8) {
      v8f counts;
      const v8f l = log8(load_q<8>(c + i, 8, inv_total, counts));
      s += counts * l;
      if (kGrad) {
        const v8f g = scale * (l + 1.0f);
        memcpy(c + i, &g, sizeof(g));
      }
    }
    for (int k = 0; k < 8; ++k) acc += s[k];
  }
  if (body < n) {
    v8f counts;
    const v8f l = log8(load_q<0>(c + body, int(n - body), inv_total, counts));
    for (int k = 0; k < n - body; ++k) acc += counts[k] * l[k];
    if (kGrad) {
      const v8f g = scale * (l + 1.0f);
      memcpy(c + body, &g, sizeof(float) * (n - body));
    }
  }
  return acc;
}

__attribute__((target_clones("avx2", "default")))
double entropy_tile_f32(float* c, int64_t n, float inv_total, bool with_grad, float scale) {
  return with_grad ? tile_f32<true>(c, n, inv_total, scale) : tile_f32<false>(c, n, inv_total, scale);
}

}  // namespace

double count_entropy_tile_cpu(bool f64, void* counts, int64_t n, double inv_total, bool with_grad,
                              double scale) {
  const FlushDenormals flush;
  if (!f64) return entropy_tile_f32(static_cast<float*>(counts), n, float(inv_total), with_grad, float(scale));
  double* c = static_cast<double*>(counts);
  double acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double l = std::log(std::max(c[i] * inv_total, kTinyD));
    acc += c[i] * l;
    if (with_grad) c[i] = scale * (l + 1.0);
  }
  return acc;
}

void code_histogram_cpu(const void* indices, IndexType it, int64_t* counts, int64_t begin,
                        int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const int64_t v = it == IndexType::I32 ? (int64_t) static_cast<const int32_t*>(indices)[t]
                                           : static_cast<const int64_t*>(indices)[t];
    __atomic_fetch_add(counts + v, int64_t(1), __ATOMIC_RELAXED);
  }
}

}  // namespace pyratok
