// CPU kernels for causal 3D convolution; contract and scheme in causal_conv3d.h.
//
// Forward tile = `rows` output rows of one output frame.  The kt*R input rows the tile
// reads (R = (rows-1)*sh + (kh-1)*dh + 1 per temporal tap) are packed channels-last
// into a slab of width Wp = W + 2*pw: the spatial zero border is written once, and the
// frame of each temporal tap comes from padded_frame() (x, cache, frame 0, or skipped
// when it is zero).  Each (output row, it, ih) is then one GEMM with M = Wo positions
// at row stride sw*C in the slab; with dw = 1 the kw taps of a position are kw*C
// consecutive slab values, so K = kw*C and the weight rows (kt, kh, [kw, C], O) are
// contiguous.  On 2 Zen 4 cores this runs level with oneDNN's own conv3d in CPU time
// (benchmarks/bench_causal_conv3d.py; results/causal_conv3d.md).
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "causal_conv3d.h"

namespace pyratok {

bool make_conv_shape(ConvShape& s) {
  s.P = past_frames(s.kt, s.st, s.dt);
  if (s.P < 0 || s.st < 1 || s.sh < 1 || s.sw < 1 || s.dt < 1 || s.dh < 1 || s.dw < 1) return false;
  if (s.T < 1 || s.T % s.st != 0 || s.ph < 0 || s.pw < 0) return false;
  if (s.B < 0 || s.C < 1 || s.O < 1 || s.H < 1 || s.W < 1 || s.kt < 1 || s.kh < 1 || s.kw < 1) return false;
  const int64_t span_h = s.dh * (s.kh - 1) + 1, span_w = s.dw * (s.kw - 1) + 1;
  if (s.H + 2 * s.ph < span_h || s.W + 2 * s.pw < span_w) return false;
  s.To = s.T / s.st;
  s.Ho = (s.H + 2 * s.ph - span_h) / s.sh + 1;
  s.Wo = (s.W + 2 * s.pw - span_w) / s.sw + 1;
  return true;
}

template <typename T>
void gemm_portable(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                   T* C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (!accumulate) std::fill(c, c + N, T(0));
    const T* a = A + i * lda;
    for (int64_t k = 0; k < K; ++k) {
      const T aik = a[k];
      const T* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += aik * b[j];
    }
  }
}

template void gemm_portable<float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                                   int64_t, float*, int64_t, bool);
template void gemm_portable<double>(int64_t, int64_t, int64_t, const double*, int64_t, const double*,
                                    int64_t, double*, int64_t, bool);

void gemm_portable_bf16_vnni(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                             int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (!accumulate) std::fill(c, c + N, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float aik = bf16_to_float(A[i * lda + k]);
      const uint16_t* b = B + (k / 2) * 2 * ldb + (k % 2);
      for (int64_t j = 0; j < N; ++j) c[j] += aik * bf16_to_float(b[2 * j]);
    }
  }
}

GemmKernels portable_gemm_kernels() {
  return {&gemm_portable<float>, &gemm_portable<double>, &gemm_portable_bf16_vnni};
}

namespace {

template <typename T>
GemmFn<T> gemm_for(const GemmKernels& g);
template <>
GemmFn<float> gemm_for<float>(const GemmKernels& g) { return g.f32; }
template <>
GemmFn<double> gemm_for<double>(const GemmKernels& g) { return g.f64; }

// Positions per GEMM the tiles aim for: the fp32 tile (M x O) and the slab stay in L2.
// Blocking: a tile holds about kTargetPositions output positions; GEMMs cover at most
// kNBlock output channels and K <= kKMax (the kw taps are folded into K while kw*C
// fits, else K runs over blocks of channels), so that the weight panel (K x kNBlock)
// and a row of the slab stay in L2 while the rows of the tile stream past them.
constexpr int64_t kTargetPositions = 256;
constexpr int64_t kNBlock = 128;
constexpr int64_t kKMax = 512;

struct TilePlan {
  int64_t rows;            // output rows per tile
  int64_t Wp;              // slab row width
  int64_t R;               // slab rows per temporal tap
  int64_t tiles_per_frame;
  bool fold_kw;            // K = kw*C (dw == 1 and it fits)
  int64_t Cb;              // else K runs over blocks of Cb channels
};

TilePlan plan_tiles(const ConvShape& s) {
  TilePlan p;
  p.rows = std::min<int64_t>(s.Ho, std::max<int64_t>(1, kTargetPositions / s.Wo));
  p.Wp = s.W + 2 * s.pw;
  p.R = (p.rows - 1) * s.sh + (s.kh - 1) * s.dh + 1;
  p.tiles_per_frame = (s.Ho + p.rows - 1) / p.rows;
  p.fold_kw = s.dw == 1 && s.kw * s.C <= kKMax;
  p.Cb = std::min(s.C, kKMax);
  return p;
}

// Input gradients of layers with few input channels (the first layer of an encoder)
// run channels-first, so that their GEMMs vectorise over positions.
constexpr int64_t kFewChannels = 16;

bool input_grad_channels_first(const ConvShape& s) { return s.C < kFewChannels && s.sw == 1; }

// GEMM operands are the compute type, or the raw bits on the bfloat16 VNNI path.
template <typename F, typename Op>
Op to_operand(typename F::bits v) {
  if constexpr (std::is_same<Op, typename F::bits>::value)
    return v;
  else
    return F::load(v);
}

// One input row (b, :, frame, hi, :) of `v` -> Wp*C channels-last values with `pw`
// zero columns on each side.
template <typename F, typename Op = typename F::work>
void pack_row(const View5& v, int64_t b, int64_t frame, int64_t hi, const ConvShape& s, int64_t Wp, Op* dst) {
  using Bits = typename F::bits;
  const int64_t C = s.C, W = s.W;
  std::fill(dst, dst + s.pw * C, Op(0));
  std::fill(dst + (s.pw + W) * C, dst + Wp * C, Op(0));
  Op* d = dst + s.pw * C;
  const Bits* src = static_cast<const Bits*>(v.data) + v.offset(b, 0, frame, hi, 0);
  const int64_t sc = v.stride[1], sx = v.stride[4];
  if (sc == 1) {
    for (int64_t w = 0; w < W; ++w)
      for (int64_t c = 0; c < C; ++c) d[w * C + c] = to_operand<F, Op>(src[w * sx + c]);
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t w = 0; w < W; ++w) d[w * C + c] = to_operand<F, Op>(src[c * sc + w * sx]);
  }
}

template <typename Acc>
void zero_row(Acc* dst, int64_t n) {
  std::fill(dst, dst + n, Acc(0));
}

// Packs input row hi of padded frame p; returns false (nothing packed) for zero rows.
template <typename F, typename Op = typename F::work>
bool pack_padded_row(const View5& x, const View5& cache, const ConvShape& s, int64_t b, int64_t p,
                     int64_t hi, int64_t Wp, Op* dst) {
  const FrameSource src = padded_frame(s, p);
  if (src.kind == FrameKind::Zero || hi < 0 || hi >= s.H) {
    zero_row(dst, Wp * s.C);
    return false;
  }
  pack_row<F, Op>(src.kind == FrameKind::Cache ? cache : x, b, src.frame, hi, s, Wp, dst);
  return true;
}

// Where the GEMMs find the forward weight rows r.. (r = ((it*kh + ih)*kw + iw)*C + c)
// and columns n..: a plain (rows x O) matrix, or VNNI row pairs (r even).
template <typename Op>
struct PlainWeights {
  const Op* w;
  int64_t O;
  const Op* at(int64_t r, int64_t n) const { return w + r * O + n; }
};

struct VnniWeights {
  const uint16_t* w;
  int64_t O;
  const uint16_t* at(int64_t r, int64_t n) const { return w + (r / 2) * 2 * O + 2 * n; }
};

// Tile (rows x Wo positions x N channels) + bias -> y[b, :, t, h0 + r, w].
template <typename F>
void store_tile(const typename F::work* tile, int64_t rows, int64_t N, int64_t Wo,
                const typename F::work* bias, const MutView5& y, int64_t b, int64_t t, int64_t h0) {
  using Bits = typename F::bits;
  using Acc = typename F::work;
  Bits* out = static_cast<Bits*>(y.data);
  for (int64_t r = 0; r < rows; ++r) {
    const Acc* tr = tile + r * Wo * N;
    Bits* yr = out + y.offset(b, 0, t, h0 + r, 0);
    if (y.stride[1] == 1) {
      for (int64_t w = 0; w < Wo; ++w)
        for (int64_t n = 0; n < N; ++n)
          yr[w * y.stride[4] + n] = F::store(tr[w * N + n] + (bias ? bias[n] : Acc(0)));
    } else {
      for (int64_t n = 0; n < N; ++n) {
        const Acc bn = bias ? bias[n] : Acc(0);
        for (int64_t w = 0; w < Wo; ++w) yr[n * y.stride[1] + w * y.stride[4]] = F::store(tr[w * N + n] + bn);
      }
    }
  }
}

// Op: the GEMM operand type; Weights: PlainWeights<Op> or VnniWeights; gemm(M, N, K,
// A, lda, B, ldb, C, ldc, accumulate) with an Acc C.
template <typename F, typename Op, typename Weights, typename Gemm>
void forward_impl(const ForwardArgs& a, const Gemm& gemm, const Weights& weight, int64_t begin, int64_t end) {
  using Acc = typename F::work;
  const ConvShape& s = a.shape;
  const TilePlan p = plan_tiles(s);
  const int64_t C = s.C, O = s.O;
  const int64_t row_pitch = p.Wp * C, frame_pitch = p.R * row_pitch;
  const int64_t cblocks = (C + p.Cb - 1) / p.Cb;
  const int64_t k_steps = p.fold_kw ? 1 : s.kw * cblocks;
  std::vector<Op> slab(s.kt * frame_pitch);
  std::vector<Acc> tile(p.rows * s.Wo * O);
  std::vector<char> live(s.kt), init(p.rows);
  const Acc* bias = static_cast<const Acc*>(a.bias);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t hb = item % p.tiles_per_frame;
    const int64_t t = (item / p.tiles_per_frame) % s.To;
    const int64_t b = item / (p.tiles_per_frame * s.To);
    const int64_t h0 = hb * p.rows;
    const int64_t rows = std::min(p.rows, s.Ho - h0);
    const int64_t R = (rows - 1) * s.sh + (s.kh - 1) * s.dh + 1;
    for (int64_t it = 0; it < s.kt; ++it) {
      const int64_t pf = t * s.st + it * s.dt;
      live[it] = padded_frame(s, pf).kind != FrameKind::Zero;
      if (!live[it]) continue;
      for (int64_t r = 0; r < R; ++r)
        pack_padded_row<F, Op>(a.x, a.cache, s, b, pf, h0 * s.sh - s.ph + r, p.Wp,
                               slab.data() + it * frame_pitch + r * row_pitch);
    }
    // one GEMM (M = Wo, row stride sw*C) per output row and tap; rows innermost so that
    // the weight panel stays in cache
    for (int64_t n0 = 0; n0 < O; n0 += kNBlock) {
      const int64_t nb = std::min(kNBlock, O - n0);
      std::fill(init.begin(), init.end(), 0);
      for (int64_t it = 0; it < s.kt; ++it) {
        if (!live[it]) continue;
        for (int64_t ih = 0; ih < s.kh; ++ih)
          for (int64_t ks = 0; ks < k_steps; ++ks) {
            const int64_t iw = p.fold_kw ? 0 : ks / cblocks, c0 = p.fold_kw ? 0 : (ks % cblocks) * p.Cb;
            const int64_t K = p.fold_kw ? s.kw * C : std::min(p.Cb, C - c0);
            const Op* Bm = weight.at(((it * s.kh + ih) * s.kw + iw) * C + c0, n0);
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t hi = (h0 + r) * s.sh + ih * s.dh - s.ph;
              if (hi < 0 || hi >= s.H) continue;
              const Op* A = slab.data() + it * frame_pitch + (r * s.sh + ih * s.dh) * row_pitch + iw * s.dw * C + c0;
              gemm(s.Wo, nb, K, A, s.sw * C, Bm, O, tile.data() + r * s.Wo * O + n0, O, init[r]);
              init[r] = 1;
            }
          }
      }
      for (int64_t r = 0; r < rows; ++r)
        if (!init[r])
          for (int64_t w = 0; w < s.Wo; ++w) std::fill_n(tile.data() + (r * s.Wo + w) * O + n0, nb, Acc(0));
    }
    store_tile<F>(tile.data(), rows, O, s.Wo, bias, a.y, b, t, h0);
  }
}

// Scatter form of the transposed convolution for one row (b, p, hi) of the padded
// input: every (it, ih) whose output row exists contributes, through each iw, dy_row
// times W[it,ih,iw]^T to the columns wi = wo*sw + iw*dw - pw.
//   channels-last tile (W x C): dy_row (Wo x O) @ W^T (O x C) into rows wi, a set with
//     row stride sw in the tile (any stride);
//   channels-first tile (C x W), for few channels and sw = 1: W (C x O) @ dy_row^T
//     (O x Wo) into columns wi, so that the GEMM's N runs over positions, not over C.
template <typename F>
void input_grad_impl(const InputGradArgs& a, GemmFn<typename F::work> gemm, int64_t begin, int64_t end) {
  using Acc = typename F::work;
  using Bits = typename F::bits;
  const ConvShape& s = a.shape;
  const int64_t C = s.C, O = s.O, W = s.W;
  const int64_t frames = s.P + s.T;
  const bool channels_first = input_grad_channels_first(s);
  std::vector<Acc> tile(W * C), dy_row(s.Wo * O);
  const Acc* weight = static_cast<const Acc*>(a.weight);
  const Bits* gy = static_cast<const Bits*>(a.grad_y.data);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t hi = item % s.H;
    const int64_t p = (item / s.H) % frames;
    const int64_t b = item / (s.H * frames);
    const MutView5& dst = p < s.P ? a.grad_past : a.grad_x;
    if (!dst.data) continue;
    zero_row(tile.data(), W * C);
    for (int64_t it = 0; it < s.kt; ++it) {
      const int64_t tn = p - it * s.dt;
      if (tn < 0 || tn % s.st) continue;
      const int64_t t = tn / s.st;
      if (t >= s.To) continue;
      for (int64_t ih = 0; ih < s.kh; ++ih) {
        const int64_t hn = hi + s.ph - ih * s.dh;
        if (hn < 0 || hn % s.sh) continue;
        const int64_t ho = hn / s.sh;
        if (ho >= s.Ho) continue;
        const Bits* src = gy + a.grad_y.offset(b, 0, t, ho, 0);
        for (int64_t o = 0; o < O; ++o)
          for (int64_t w = 0; w < s.Wo; ++w) {
            const Acc v = F::load(src[o * a.grad_y.stride[1] + w * a.grad_y.stride[4]]);
            dy_row[channels_first ? o * s.Wo + w : w * O + o] = v;
          }
        for (int64_t iw = 0; iw < s.kw; ++iw) {
          const int64_t shift = iw * s.dw - s.pw;               // wi = wo*sw + shift
          const int64_t phase = ((shift % s.sw) + s.sw) % s.sw;  // first wi of the class
          const int64_t c0 = (phase - shift) / s.sw;             // wo of column `phase`
          const int64_t j_lo = std::max<int64_t>(0, -c0);
          const int64_t j_hi = std::min<int64_t>((W - phase + s.sw - 1) / s.sw, s.Wo - c0);
          if (j_hi <= j_lo) continue;
          const Acc* Wtap = weight + ((it * s.kh + ih) * s.kw + iw) * O * C;
          if (channels_first)  // sw == 1: phase == 0, wi = j, wo = j + c0
            gemm(C, j_hi - j_lo, O, Wtap, O, dy_row.data() + j_lo + c0, s.Wo, tile.data() + j_lo, W, true);
          else
            gemm(j_hi - j_lo, C, O, dy_row.data() + (j_lo + c0) * O, O, Wtap, C,
                 tile.data() + (phase + s.sw * j_lo) * C, s.sw * C, true);
        }
      }
    }
    Bits* out = static_cast<Bits*>(dst.data) + dst.offset(b, 0, p < s.P ? p : p - s.P, hi, 0);
    const int64_t tc = channels_first ? 1 : C, tw = channels_first ? W : 1;  // tile strides of (w, c)
    if (dst.stride[1] == 1) {
      for (int64_t w = 0; w < W; ++w)
        for (int64_t c = 0; c < C; ++c) out[w * dst.stride[4] + c] = F::store(tile[w * tc + c * tw]);
    } else {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t w = 0; w < W; ++w) out[c * dst.stride[1] + w * dst.stride[4]] = F::store(tile[w * tc + c * tw]);
    }
  }
}

// dW[it, ih] (O x kw*C) += dy_row^T (O x Wo) @ window (Wo x kw*C) for one output row.
template <typename F>
void weight_grad_impl(const WeightGradArgs& a, GemmFn<typename F::work> gemm, int64_t begin, int64_t end,
                      typename F::work* accum) {
  using Acc = typename F::work;
  using Bits = typename F::bits;
  const ConvShape& s = a.shape;
  const int64_t C = s.C, O = s.O;
  const int64_t Wp = s.W + 2 * s.pw;
  const bool fold_kw = s.dw == 1;
  std::vector<Acc> dyt(O * s.Wo), row(Wp * C);
  const Bits* gy = static_cast<const Bits*>(a.grad_y.data);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t ho = item % s.Ho;
    const int64_t t = (item / s.Ho) % s.To;
    const int64_t b = item / (s.Ho * s.To);
    const Bits* src = gy + a.grad_y.offset(b, 0, t, ho, 0);
    for (int64_t o = 0; o < O; ++o)
      for (int64_t w = 0; w < s.Wo; ++w)
        dyt[o * s.Wo + w] = F::load(src[o * a.grad_y.stride[1] + w * a.grad_y.stride[4]]);
    for (int64_t it = 0; it < s.kt; ++it)
      for (int64_t ih = 0; ih < s.kh; ++ih) {
        if (!pack_padded_row<F>(a.x, a.cache, s, b, t * s.st + it * s.dt, ho * s.sh + ih * s.dh - s.ph, Wp,
                                row.data()))
          continue;
        Acc* dw = accum + (it * s.kh + ih) * O * s.kw * C;
        if (fold_kw) {
          gemm(O, s.kw * C, s.Wo, dyt.data(), s.Wo, row.data(), s.sw * C, dw, s.kw * C, true);
        } else {
          for (int64_t iw = 0; iw < s.kw; ++iw)
            gemm(O, C, s.Wo, dyt.data(), s.Wo, row.data() + iw * s.dw * C, s.sw * C, dw + iw * C, s.kw * C, true);
        }
      }
  }
}

// Forward weights as bfloat16 VNNI row pairs: element (r, o) at (r/2)*2*O + 2*o + r%2.
void pack_weight_vnni(const ConvShape& s, View5 w, void* packed) {
  const uint16_t* src = static_cast<const uint16_t*>(w.data);
  uint16_t* dst = static_cast<uint16_t*>(packed);
  for (int64_t it = 0; it < s.kt; ++it)
    for (int64_t ih = 0; ih < s.kh; ++ih)
      for (int64_t iw = 0; iw < s.kw; ++iw)
        for (int64_t c = 0; c < s.C; ++c) {
          const int64_t r = ((it * s.kh + ih) * s.kw + iw) * s.C + c;
          for (int64_t o = 0; o < s.O; ++o) dst[(r / 2) * 2 * s.O + 2 * o + r % 2] = src[w.offset(o, c, it, ih, iw)];
        }
}

template <typename F>
void pack_weight_impl(const ConvShape& s, View5 w, void* packed, bool transpose) {
  using Bits = typename F::bits;
  using Acc = typename F::work;
  const Bits* src = static_cast<const Bits*>(w.data);
  Acc* dst = static_cast<Acc*>(packed);
  for (int64_t it = 0; it < s.kt; ++it)
    for (int64_t ih = 0; ih < s.kh; ++ih)
      for (int64_t iw = 0; iw < s.kw; ++iw) {
        Acc* d = dst + ((it * s.kh + ih) * s.kw + iw) * s.C * s.O;
        for (int64_t o = 0; o < s.O; ++o)
          for (int64_t c = 0; c < s.C; ++c) {
            const Acc v = F::load(src[w.offset(o, c, it, ih, iw)]);
            if (transpose)
              d[o * s.C + c] = v;   // (O, C): input_grad
            else
              d[c * s.O + o] = v;   // (C, O): forward
          }
      }
}

// ---- Winograd F(2x2, 3x3) forward ----------------------------------------------------
//
// Task = (b, t, block of tile rows).  Per live temporal tap: the 2*rows+2 input rows the
// block reads are packed channels-last into a slab (zero border, frame choice as in the
// direct path), each tile's 16 transformed values are written point-major, V[xi][tile][c]
// (C contiguous: the transform vectorises over channels), and 16 GEMMs accumulate
// M[xi] (tiles x O) += V[xi] U[it][xi].  The output transform then writes a
// (rows x Wo x O) tile that store_tile() adds the bias to and stores in y's layout.
constexpr int64_t kWinogradTiles = 64;  // tiles per task (M of the GEMMs)

struct WinogradPlan {
  int64_t TH, TW;          // 2x2 output tiles per column / row
  int64_t trows;           // tile rows per task
  int64_t tasks_per_frame;
  int64_t Wq, Rs;          // slab row width (columns) and rows
};

WinogradPlan plan_winograd(const ConvShape& s) {
  WinogradPlan p;
  p.TH = (s.Ho + 1) / 2;
  p.TW = (s.Wo + 1) / 2;
  p.trows = std::min(p.TH, std::max<int64_t>(1, kWinogradTiles / p.TW));
  p.tasks_per_frame = (p.TH + p.trows - 1) / p.trows;
  p.Wq = 2 * p.TW + 2;  // >= W + 2 pw: the last tile may read a column past the padding
  p.Rs = 2 * p.trows + 2;
  return p;
}

// U = G g G^T, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
template <typename F>
void pack_weight_winograd_impl(const ConvShape& s, View5 w, void* packed) {
  using Bits = typename F::bits;
  using Acc = typename F::work;
  const Bits* src = static_cast<const Bits*>(w.data);
  Acc* dst = static_cast<Acc*>(packed);
  for (int64_t it = 0; it < s.kt; ++it)
    for (int64_t o = 0; o < s.O; ++o)
      for (int64_t c = 0; c < s.C; ++c) {
        Acc g[3][3], gg[4][3];
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 3; ++j) g[i][j] = F::load(src[w.offset(o, c, it, i, j)]);
        for (int j = 0; j < 3; ++j) {
          gg[0][j] = g[0][j];
          gg[1][j] = Acc(0.5) * (g[0][j] + g[1][j] + g[2][j]);
          gg[2][j] = Acc(0.5) * (g[0][j] - g[1][j] + g[2][j]);
          gg[3][j] = g[2][j];
        }
        for (int i = 0; i < 4; ++i) {
          const Acc u[4] = {gg[i][0], Acc(0.5) * (gg[i][0] + gg[i][1] + gg[i][2]),
                            Acc(0.5) * (gg[i][0] - gg[i][1] + gg[i][2]), gg[i][2]};
          for (int j = 0; j < 4; ++j) dst[((it * 16 + i * 4 + j) * s.C + c) * s.O + o] = u[j];
        }
      }
}

// V[xi][tile][c] = (B^T d B)[xi], B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
// for the 4x4 patch d at `base` (row pitch `rp`, column pitch C) and C channels; channels go
// 8 at a time through GCC vector extensions (two SSE or one AVX register), the rest one by one.
template <typename Acc, typename Vec>
inline void transform_block(const Acc* base, int64_t rp, int64_t C, int64_t c, Acc* v, int64_t point_pitch) {
  Vec d[4][4], r[4][4];
  for (int u = 0; u < 4; ++u)
    for (int x = 0; x < 4; ++x) memcpy(&d[u][x], base + u * rp + x * C + c, sizeof(Vec));
  for (int x = 0; x < 4; ++x) {
    r[0][x] = d[0][x] - d[2][x];
    r[1][x] = d[1][x] + d[2][x];
    r[2][x] = d[2][x] - d[1][x];
    r[3][x] = d[1][x] - d[3][x];
  }
  for (int u = 0; u < 4; ++u) {
    const Vec o[4] = {r[u][0] - r[u][2], r[u][1] + r[u][2], r[u][2] - r[u][1], r[u][1] - r[u][3]};
    for (int x = 0; x < 4; ++x) memcpy(v + (u * 4 + x) * point_pitch + c, &o[x], sizeof(Vec));
  }
}

#pragma GCC diagnostic ignored "-Wpsabi"  // vectors never cross a call: transform_block is inlined
typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef float v1f __attribute__((vector_size(4)));
typedef double v1d __attribute__((vector_size(8)));

template <typename Acc>
void input_transform(const Acc* base, int64_t rp, int64_t C, Acc* v, int64_t point_pitch) {
  using Vec = typename std::conditional<std::is_same<Acc, float>::value, v8f, v4d>::type;
  using One = typename std::conditional<std::is_same<Acc, float>::value, v1f, v1d>::type;
  constexpr int64_t kLanes = sizeof(Vec) / sizeof(Acc);
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) transform_block<Acc, Vec>(base, rp, C, c, v, point_pitch);
  for (; c < C; ++c) transform_block<Acc, One>(base, rp, C, c, v, point_pitch);
}

template <typename F>
void forward_winograd_impl(const ForwardArgs& a, GemmFn<typename F::work> gemm, int64_t begin, int64_t end) {
  using Acc = typename F::work;
  const ConvShape& s = a.shape;
  const WinogradPlan p = plan_winograd(s);
  const int64_t C = s.C, O = s.O, Wp = s.W + 2 * s.pw;
  const int64_t max_tiles = p.trows * p.TW;
  const int64_t row_pitch = p.Wq * C;
  std::vector<Acc> slab(p.Rs * row_pitch), V(16 * max_tiles * C), M(16 * max_tiles * O);
  std::vector<Acc> tile(2 * p.trows * s.Wo * O);
  const Acc* U = static_cast<const Acc*>(a.weight);
  const Acc* bias = static_cast<const Acc*>(a.bias);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t tb = item % p.tasks_per_frame;
    const int64_t t = (item / p.tasks_per_frame) % s.To;
    const int64_t b = item / (p.tasks_per_frame * s.To);
    const int64_t th0 = tb * p.trows, nrows = std::min(p.trows, p.TH - th0), tiles = nrows * p.TW;
    const int64_t h0 = 2 * th0, rows = std::min(2 * nrows, s.Ho - h0);
    bool first = true;
    for (int64_t it = 0; it < s.kt; ++it) {
      const int64_t pf = t * s.st + it * s.dt;
      if (padded_frame(s, pf).kind == FrameKind::Zero) continue;
      for (int64_t r = 0; r < 2 * nrows + 2; ++r) {
        Acc* row = slab.data() + r * row_pitch;
        pack_padded_row<F, Acc>(a.x, a.cache, s, b, pf, h0 - s.ph + r, Wp, row);
        std::fill(row + Wp * C, row + row_pitch, Acc(0));
      }
      for (int64_t j = 0; j < tiles; ++j) {
        const int64_t tr = j / p.TW, tw = j % p.TW;
        input_transform<Acc>(slab.data() + 2 * tr * row_pitch + 2 * tw * C, row_pitch, C, V.data() + j * C,
                             max_tiles * C);
      }
      for (int64_t n0 = 0; n0 < O; n0 += kNBlock) {
        const int64_t nb = std::min(kNBlock, O - n0);
        for (int xi = 0; xi < 16; ++xi)
          gemm(tiles, nb, C, V.data() + xi * max_tiles * C, C, U + (it * 16 + xi) * C * O + n0, O,
               M.data() + xi * max_tiles * O + n0, O, !first);
      }
      first = false;
    }
    if (first) std::fill(M.begin(), M.end(), Acc(0));  // every tap reads zero frames
    // Y = A^T M A, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
    for (int64_t j = 0; j < tiles; ++j) {
      const int64_t tr = j / p.TW, tw = j % p.TW;
      const int64_t y0 = 2 * tr, x0 = 2 * tw;
      const bool y1_ok = y0 + 1 < rows, x1_ok = x0 + 1 < s.Wo;
      const Acc* m[16];
      for (int k = 0; k < 16; ++k) m[k] = M.data() + (k * max_tiles + j) * O;
      Acc* out00 = tile.data() + (y0 * s.Wo + x0) * O;
      for (int64_t o = 0; o < O; ++o) {
        Acc r0[4], r1[4];
        for (int x = 0; x < 4; ++x) {
          r0[x] = m[x][o] + m[4 + x][o] + m[8 + x][o];
          r1[x] = m[4 + x][o] - m[8 + x][o] - m[12 + x][o];
        }
        out00[o] = r0[0] + r0[1] + r0[2];
        if (x1_ok) out00[O + o] = r0[1] - r0[2] - r0[3];
        if (y1_ok) {
          out00[s.Wo * O + o] = r1[0] + r1[1] + r1[2];
          if (x1_ok) out00[(s.Wo + 1) * O + o] = r1[1] - r1[2] - r1[3];
        }
      }
    }
    store_tile<F>(tile.data(), rows, O, s.Wo, bias, a.y, b, t, h0);
  }
}

}  // namespace

int64_t packed_weight_elements(const ConvShape& s) { return s.kt * s.kh * s.kw * s.C * s.O; }

bool forward_uses_bf16_vnni(DType dtype, const ConvShape& s, const GemmKernels& gemm) {
  return dtype == DType::BF16 && gemm.bf16_vnni != nullptr && s.C % 2 == 0;
}

void pack_weight_forward(DType dtype, const ConvShape& s, View5 weight, void* packed, bool vnni) {
  if (vnni)
    pack_weight_vnni(s, weight, packed);
  else
    PYRATOK_DISPATCH_DTYPE(dtype, pack_weight_impl<F>(s, weight, packed, false));
}

void pack_weight_input_grad(DType dtype, const ConvShape& s, View5 weight, void* packed) {
  PYRATOK_DISPATCH_DTYPE(dtype, pack_weight_impl<F>(s, weight, packed, !input_grad_channels_first(s)));
}

int64_t forward_tiles(const ConvShape& s) { return s.B * s.To * plan_tiles(s).tiles_per_frame; }

void causal_conv3d_forward_cpu(const ForwardArgs& a, const GemmKernels& gemm, int64_t begin, int64_t end) {
  if (forward_uses_bf16_vnni(a.dtype, a.shape, gemm)) {
    using F = Format<DType::BF16>;
    forward_impl<F, uint16_t>(a, gemm.bf16_vnni, VnniWeights{static_cast<const uint16_t*>(a.weight), a.shape.O},
                              begin, end);
    return;
  }
  PYRATOK_DISPATCH_DTYPE(a.dtype, {
    using Acc = typename F::work;
    forward_impl<F, Acc>(a, gemm_for<Acc>(gemm), PlainWeights<Acc>{static_cast<const Acc*>(a.weight), a.shape.O},
                         begin, end);
  });
}

bool winograd_geometry(const ConvShape& s) {
  return s.kh == 3 && s.kw == 3 && s.sh == 1 && s.sw == 1 && s.dh == 1 && s.dw == 1;
}

bool forward_uses_winograd(DType dtype, const ConvShape& s, ConvAlgo algo) {
  if (!winograd_geometry(s) || algo == ConvAlgo::Direct) return false;
  if (algo == ConvAlgo::Winograd) return true;
  return dtype == DType::F32 && s.C >= kWinogradMinChannels && s.O >= kWinogradMinChannels;
}

int64_t winograd_weight_elements(const ConvShape& s) { return s.kt * 16 * s.C * s.O; }

void pack_weight_winograd(DType dtype, const ConvShape& s, View5 weight, void* packed) {
  PYRATOK_DISPATCH_DTYPE(dtype, pack_weight_winograd_impl<F>(s, weight, packed));
}

int64_t winograd_forward_tiles(const ConvShape& s) { return s.B * s.To * plan_winograd(s).tasks_per_frame; }

void causal_conv3d_forward_winograd_cpu(const ForwardArgs& a, const GemmKernels& gemm, int64_t begin,
                                        int64_t end) {
  PYRATOK_DISPATCH_DTYPE(a.dtype, forward_winograd_impl<F>(a, gemm_for<typename F::work>(gemm), begin, end));
}

int64_t input_grad_rows(const ConvShape& s) { return s.B * (s.P + s.T) * s.H; }

void causal_conv3d_input_grad_cpu(const InputGradArgs& a, const GemmKernels& gemm, int64_t begin,
                                  int64_t end) {
  PYRATOK_DISPATCH_DTYPE(a.dtype, input_grad_impl<F>(a, gemm_for<typename F::work>(gemm), begin, end));
}

int64_t weight_grad_rows(const ConvShape& s) { return s.B * s.To * s.Ho; }

int64_t weight_grad_elements(const ConvShape& s) { return s.kt * s.kh * s.O * s.kw * s.C; }

void causal_conv3d_weight_grad_cpu(const WeightGradArgs& a, const GemmKernels& gemm, int64_t begin,
                                   int64_t end, void* accum) {
  PYRATOK_DISPATCH_DTYPE(a.dtype, weight_grad_impl<F>(a, gemm_for<typename F::work>(gemm), begin, end,
                                                      static_cast<typename F::work*>(accum)));
}

void store_weight_grad(DType dtype, const ConvShape& s, const void* accum, MutView5 grad_weight) {
  PYRATOK_DISPATCH_DTYPE(dtype, {
    using Acc = typename F::work;
    using Bits = typename F::bits;
    const Acc* src = static_cast<const Acc*>(accum);
    Bits* dst = static_cast<Bits*>(grad_weight.data);
    for (int64_t it = 0; it < s.kt; ++it)
      for (int64_t ih = 0; ih < s.kh; ++ih)
        for (int64_t o = 0; o < s.O; ++o)
          for (int64_t iw = 0; iw < s.kw; ++iw)
            for (int64_t c = 0; c < s.C; ++c)
              dst[grad_weight.offset(o, c, it, ih, iw)] =
                  F::store(src[(((it * s.kh + ih) * s.O + o) * s.kw + iw) * s.C + c]);
  });
}

}  // namespace pyratok
