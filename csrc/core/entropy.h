// Entropy and alignment losses for huge binary codebooks (DESIGN.md §2.2), framework-free.
//
// Token n has K logits z_nk = coef * x_nk (coef = 4 * tau * s) and bit probabilities
// p_nk = sigmoid(z_nk).  The GEMM-free parts of the ops live here; the torch bindings
// (csrc/torch/entropy.cpp) tile over tokens and call ATen's GEMM (MKL / cuBLAS) for the
// half-split products:
//
//   forward   Q_g   += P_A^T P_B                       (2^KA x 2^KB per bit group g)
//   backward  W_A    = (P_B G^T) * P_A,  W_B = (P_A G) * P_B     (G = d loss / d Q_g)
//             d x_nk = coef * [S1_nk * (1 - p_nk) - S0_nk * p_nk],
//             S1/S0_nk = sum of W over the half's codes whose bit k is 1/0.
//
// P_A (tile rows, 2^KA) holds the MSB-first code probabilities of the half's bits, built by
// doubling (2 * 2^KA multiplies per token); 1 - p is evaluated as sigmoid(-z), never by a
// subtraction, so the tails stay exact and nothing is NaN at |z| ~ 1e8.
//
// Layout and dtype contract: x is (tokens, K) row-major in one of the four float formats of
// dtype.h; probability tiles, gradients of the counts and every sum are in the *work type*
// (double for F64 input, float otherwise); gradients w.r.t. x are stored in x's format.
// Elementwise ops see x as a flat array of `numel` elements.
//
// CPU entry points process [begin, end) (tokens or elements) so the binding chooses the
// threading; CUDA launchers take a cudaStream_t as void*.
//
// Cost (N tokens, K bits): elementwise ops read N*K elements (memory bound; judged against
// the copy bandwidth).  The exact codebook entropy is 3 GEMMs of 2*N*2^K FLOPs (one forward,
// two backward) plus O(N*(2^KA + 2^KB)*KA) here; judged against the fp32 GEMM peak.
#pragma once

#include <cmath>
#include <cstdint>

#if (defined(__SSE__) || defined(__x86_64__)) && !defined(__CUDACC__)
#include <xmmintrin.h>
#endif

#include "dtype.h"

namespace pyratok {

// Denormals.  Code probabilities are products of bit probabilities; at LFQ's usual
// inv_temperature = 100 with a trained encoder's small latents (|z| ~ 10..40) many of them and
// of the GEMM products P_A^T P_B fall below FLT_MIN (1.2e-38), where each multiply takes a
// microcode assist: K = 16 over 8192 tokens took 1.1-2.4 s per forward + backward instead of
// ~0.03 s, most of it inside MKL's GEMM (2.3 s instead of 24 ms for a 8192 x 256 product of
// values ~1e-20).  So the CPU kernels run with flush-to-zero and denormals-are-zero set:
// FlushDenormals sets both on the calling thread for its lifetime and restores the previous
// mode (the torch binding also sets them on its OpenMP team around the GEMMs).  Only results
// below the smallest normal number change (to 0): code probabilities < 1.2e-38, whose share of
// any entropy or gradient is far below fp32 rounding (2.2e-308 in the fp64 path).  Off x86 it
// is a no-op and the kernels keep the platform's denormal behaviour.
class FlushDenormals {
 public:
#if (defined(__SSE__) || defined(__x86_64__)) && !defined(__CUDACC__)
  static constexpr unsigned kBits = 0x8040u;  // FTZ (bit 15) | DAZ (bit 6) of MXCSR
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kBits); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#else
  FlushDenormals() {}
#endif
 public:
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

constexpr int kMaxHalfBits = 12;  // a half of at most 12 bits: groups of up to 24 bits

struct CodeProbsArgs {
  DType dtype;          // format of x
  const void* x;        // (tokens, K) row-major
  int64_t K;
  int64_t bit0;         // first channel of this half
  int bits;             // channels in this half, 0..kMaxHalfBits
  double coef;          // z = coef * x
  int64_t first_token;  // token held by row 0 of the probability tiles
};

// probs (rows, 2^bits), work type: MSB-first code probabilities of channels [bit0, bit0+bits).
void code_probs_cpu(const CodeProbsArgs& a, void* probs, int64_t begin, int64_t end);
// dx[t, bit0 + j] = coef * d/dz_tj sum_c grad_probs[t, c] * probs[t, c]; other columns untouched.
void code_probs_backward_cpu(const CodeProbsArgs& a, const void* probs, const void* grad_probs,
                             void* dx, int64_t begin, int64_t end);

// Elementwise over flat arrays; sums are returned in double.
void bit_probs_cpu(DType dtype, const void* x, double coef, void* probs, int64_t begin, int64_t end);
double binary_entropy_sum_cpu(DType dtype, const void* x, double coef, int64_t begin, int64_t end);
void binary_entropy_backward_cpu(DType dtype, const void* x, double coef, double grad, void* dx,
                                 int64_t begin, int64_t end);
double bernoulli_kl_sum_cpu(DType dtype, const void* a, const void* b, int64_t begin, int64_t end);
void bernoulli_kl_backward_cpu(DType dtype, const void* a, const void* b, double grad, void* da,
                               void* db, int64_t begin, int64_t end);

// The fused exact codebook entropy (few tokens, many codes) sees a tile of soft code counts
// c at a time and never stores all 2^K of them (csrc/torch/entropy.cpp).  With
// l = log(max(c * inv_total, tiny)) (tiny: the smallest normal number of the tile's type;
// the counts are soft counts, in [0, total]) it returns sum_c c * l (H(q) = -that / total)
// and, with `with_grad`, writes c <- scale * (l + 1) in place; with scale = -1 / total that is
// d H / d c (one log per count).  `f64`: the tile is double (fp64 input), else float.  The
// float path uses a branch-free log (Cephes' logf polynomial, < 2 ulp on normal numbers) in
// GCC vector extensions, built for AVX2 and for the baseline and chosen at run time.
double count_entropy_tile_cpu(bool f64, void* counts, int64_t n, double inv_total, bool with_grad,
                              double scale);

// counts[indices[t]] += 1 for t in [begin, end) (relaxed atomics: callers may run ranges in
// parallel); indices must lie in [0, size of counts).
void code_histogram_cpu(const void* indices, IndexType it, int64_t* counts, int64_t begin,
                        int64_t end);

// CUDA launchers (entropy_cuda.cu).  `rows` tokens starting at a.first_token; grad is a
// device scalar in the work type.  The sums write one double per block into `partial`
// (sum_partials_cuda(numel) of them, every one written); the caller adds them in a fixed
// order, so the sums are deterministic.
void code_probs_cuda(const CodeProbsArgs& a, void* probs, int64_t rows, void* stream);
void code_probs_backward_cuda(const CodeProbsArgs& a, const void* probs, const void* grad_probs,
                              void* dx, int64_t rows, void* stream);
void bit_probs_cuda(DType dtype, const void* x, double coef, void* probs, int64_t numel, void* stream);
int64_t sum_partials_cuda(int64_t numel);
void binary_entropy_sum_cuda(DType dtype, const void* x, double coef, double* partial, int64_t numel,
                             void* stream);
void binary_entropy_backward_cuda(DType dtype, const void* x, double coef, const void* grad,
                                  void* dx, int64_t numel, void* stream);
void bernoulli_kl_sum_cuda(DType dtype, const void* a, const void* b, double* partial, int64_t numel,
                           void* stream);
void bernoulli_kl_backward_cuda(DType dtype, const void* a, const void* b, const void* grad,
                                void* da, void* db, int64_t numel, void* stream);
// counts has `bins` = 2^K entries, zeroed by the caller.
void code_histogram_cuda(const void* indices, IndexType it, int64_t* counts, int64_t bins, int64_t numel,
                         void* stream);

// ---- scalar math shared by the CPU and CUDA kernels (work type W) ---------------------

template <typename W>
PYRATOK_HD W exp_w(W v);
template <>
PYRATOK_HD float exp_w<float>(float v) { return expf(v); }
template <>
PYRATOK_HD double exp_w<double>(double v) { return exp(v); }

template <typename W>
PYRATOK_HD W log1p_w(W v);
template <>
PYRATOK_HD float log1p_w<float>(float v) { return log1pf(v); }
template <>
PYRATOK_HD double log1p_w<double>(double v) { return log1p(v); }

// sigmoid(z) without overflow: exp of a non-positive argument only.
template <typename W>
PYRATOK_HD W sigmoid_w(W z) {
  if (z >= W(0)) return W(1) / (W(1) + exp_w<W>(-z));
  const W e = exp_w<W>(z);
  return e / (W(1) + e);
}

template <typename W>
PYRATOK_HD W softplus_w(W z) {
  return (z > W(0) ? z : W(0)) + log1p_w<W>(exp_w<W>(-(z < W(0) ? -z : z)));
}

// h(sigmoid(z)) = softplus(-|z|) + |z| sigmoid(-|z|): a sum of non-negative terms, so no
// cancellation for large |z| (softplus(z) - z sigmoid(z) loses everything at |z| ~ 30 in fp32).
template <typename W>
PYRATOK_HD W binary_entropy_w(W z) {
  const W m = z < W(0) ? -z : z;
  const W e = exp_w<W>(-m);
  return log1p_w<W>(e) + m * e / (W(1) + e);
}

// d h(sigmoid(z)) / dz = -z sigmoid(z) sigmoid(-z).
template <typename W>
PYRATOK_HD W binary_entropy_grad_w(W z) {
  const W m = z < W(0) ? -z : z;
  const W e = exp_w<W>(-m);
  const W d = W(1) + e;
  return -z * e / (d * d);
}

// KL(Bern(sigmoid(a)) || Bern(sigmoid(b))) =
//   sigmoid(a) [softplus(-b) - softplus(-a)] + sigmoid(-a) [softplus(b) - softplus(a)]:
// each difference is weighted by the probability of its side, so saturated logits give 0.
template <typename W>
PYRATOK_HD W bernoulli_kl_w(W a, W b) {
  return sigmoid_w<W>(a) * (softplus_w<W>(-b) - softplus_w<W>(-a)) +
         sigmoid_w<W>(-a) * (softplus_w<W>(b) - softplus_w<W>(a));
}

}  // namespace pyratok
