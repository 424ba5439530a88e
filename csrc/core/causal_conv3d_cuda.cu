// CUDA kernels for causal 3D convolution; contract in causal_conv3d.h.
//
// One implicit-GEMM kernel template serves the three problems:
//   forward      y (M x O)  = A (M x K) W (K x O),  M = (b, t, h, w), K = (it, ih, iw, c)
//   input_grad   dx (M' x C) = A' (M' x K') W' (K' x C), M' = padded input positions
//                (b, p, h, w), K' = (it, ih, iw, o), A' = dy where t = (p - it*dt)/st,
//                ho, wo divide exactly (so any stride works); rows p < P -> grad_past
//   weight_grad  dW (O x K) = dy^T (O x M) A (M x K), the M reduction split over
//                gridDim.z; each split stores its own partial (splits, O, K) and the
//                binding sums them in a fixed order: deterministic, no float atomics.
// A is never materialised: each K step gathers its BM x BK tile with the causal frame
// choice (padded_frame) and the spatial zero border in the index math, int64 offsets.
//
// Index math without divisions in the K loop: every thread unravels its tile rows
// (output positions or channels) and its first reduction index once, before the loop,
// and then walks the reduction incrementally (channel += step, carrying into the taps;
// or w += step, carrying into h, t, b).  The input gradient's exact division by the stride,
// t = (p - it*dt)/st, becomes a compare of remainders walked with the taps.
//
// Coalescing in both layouts: a tile is loaded either "reduction-fast" (consecutive
// threads take consecutive reduction indices: channels of a channels_last_3d tensor) or
// "fixed-fast" (consecutive threads take consecutive rows/columns: the w positions of a
// channels-first tensor, the output channels of the packed weights); the choice is a
// template parameter picked from the tensor's channel stride.  The epilogue goes through
// shared memory and stores along the output's contiguous axis (n for channels-last and
// the weight-gradient partials, m for channels-first).  Weights arrive packed by the
// binding as (kt, kh, kw, C, O) (forward) or (kt, kh, kw, O, C) (input gradient), so the
// B tile is a contiguous row block.
//
// Pipelining.  fp16/bf16 on sm_80+ (the tensor-core path): three shared stages, two K steps
// ahead, filled with cp.async where it can: a tile is cut into 16-byte spans (8 elements along
// the tile mapping's fast axis, which is also the axis the stage is contiguous along), and a
// span whose elements are contiguous in global memory, 16-byte aligned and wholly in bounds
// (8 channels of a channels-last tap, 8 output channels of the packed weights, 8 columns of a
// channels-first row with stride 1) is one `cp.async.ca ... 16`; a span wholly in the padding
// or past the tile's end is a zero-filling cp.async (src-size 0).  Spans that straddle the
// padding, a tap or a row, misaligned pointers or strides, and partial spans at a tile's
// end take the element path: loads into registers before the multiplies, stored into the
// stage after them.  One commit_group per K step; wait_group<1> + __syncthreads at the top
// of a step makes that step's stage complete and visible.  fp32/fp64, and fp16/bf16 below
// sm_80, keep the register-staged double buffer (two stages, element path only).
//
// A block computes a 64 x 64 tile with 256 threads; fp16/bf16 tiles are staged in
// shared memory in their own format and multiplied on tensor cores (WMMA 16x16x16,
// fp32 accumulate) where the architecture has them (fp16: sm_70+, bf16: sm_80+); below
// that, and for fp32/fp64, a 4x4 register tile per thread multiplies with FMAs (fp32
// accumulate for halves).
// Cost: 2*M*N*K FLOPs; judged against the tensor-core peak and cuDNN (device_check.sh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "causal_conv3d.h"

namespace pyratok {
namespace {

constexpr int BM = 64, BN = 64, BK = 16, kThreads = 256;
constexpr int kSlots = BM * BK / kThreads;   // elements per thread per operand tile (4)
static_assert(BM == BN && BM * BK == kSlots * kThreads && kThreads == BM * kSlots, "tile mapping");

#ifdef __CUDA_ARCH__
constexpr int kArch = __CUDA_ARCH__;
#else
constexpr int kArch = 0;
#endif

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Host and device: the index logic below also runs in a host-only emulation of the kernel
// (tests/cpp/test_causal_conv3d_cuda_host.cu).
#define HD __host__ __device__ __forceinline__

template <typename F>
HD typename F::bits load_bits(const void* base, int64_t off) {
  return static_cast<const typename F::bits*>(base)[off];
}

// Which elements of a (64 fixed x 16 reduction) operand tile a thread loads.
//   RedFast:   reduction index tid % 16, fixed indices tid / 16 + 16 * q (4 contexts, 1 walker)
//   FixedFast: fixed index tid % 64, reduction indices 4 * (tid / 64) + q (1 context, 1 walker)
template <bool RedFast>
struct TileMap {
  static constexpr int kFixed = RedFast ? kSlots : 1;
  static HD int fixed(int tid, int q) { return RedFast ? tid / BK + BK * q : tid % BM; }
  static HD int red(int tid) { return RedFast ? tid % BK : kSlots * (tid / BM); }
  static HD int slot_fixed(int tid, int q) { return RedFast ? fixed(tid, q) : tid % BM; }
  static HD int slot_red(int tid, int q) { return RedFast ? red(tid) : red(tid) + q; }
};

// ---- reduction walkers: unravelled once, then advanced without divisions ----------------

// k = ((it * kh + ih) * kw + iw) * channels + ch
struct TapWalker {
  int64_t k;
  int ch, iw, ih, it;
};

HD TapWalker tap_walker(int64_t k, const ConvShape& s, int channels) {
  TapWalker w;
  w.k = k;
  const int64_t q = k / channels;
  w.ch = int(k - q * channels);
  w.iw = int(q % s.kw);
  const int64_t r = q / s.kw;
  w.ih = int(r % s.kh);
  w.it = int(r / s.kh);
  return w;
}

HD void advance(TapWalker& w, int step, const ConvShape& s, int channels) {
  w.k += step;
  w.ch += step;
  while (w.ch >= channels) {
    w.ch -= channels;
    if (++w.iw == s.kw) {
      w.iw = 0;
      if (++w.ih == s.kh) {
        w.ih = 0;
        ++w.it;
      }
    }
  }
}

// m = ((b * To + t) * Ho + h) * Wo + w over the output positions
struct PositionWalker {
  int64_t k;
  int b, t, h, w;
};

HD PositionWalker position_walker(int64_t m, const ConvShape& s) {
  PositionWalker p;
  p.k = m;
  int64_t q = m / s.Wo;
  p.w = int(m - q * s.Wo);
  p.h = int(q % s.Ho);
  q /= s.Ho;
  p.t = int(q % s.To);
  p.b = int(q / s.To);
  return p;
}

HD void advance(PositionWalker& p, int step, const ConvShape& s) {
  p.k += step;
  p.w += step;
  while (p.w >= s.Wo) {
    p.w -= int(s.Wo);
    if (++p.h == s.Ho) {
      p.h = 0;
      if (++p.t == s.To) {
        p.t = 0;
        ++p.b;
      }
    }
  }
}

// x padded causally in time and with zeros in space, at padded frame p; raw bits (0 = +0.0).
template <typename F>
HD typename F::bits padded_input(const CudaConvArgs& a, int b, int c, int p, int hi,
                                                         int wi) {
  const ConvShape& s = a.shape;
  if (hi < 0 || hi >= s.H || wi < 0 || wi >= s.W) return 0;
  const FrameSource src = padded_frame(s, p);
  if (src.kind == FrameKind::Zero) return 0;
  const View5& v = src.kind == FrameKind::Cache ? a.cache : a.x;
  return load_bits<F>(v.data, v.offset(b, c, src.frame, hi, wi));
}

// ---- cp.async spans (fp16/bf16 on sm_80+) ----------------------------------------------
// A span is 8 consecutive 2-byte elements (16 bytes) of an operand tile along the axis it is
// staged contiguously in shared memory (the tile mapping's fast axis), starting at a tile
// position that is a multiple of 8.  A span is copied straight into shared memory with one
// 16-byte cp.async when its 8 elements are contiguous in global memory, in bounds and 16-byte
// aligned; it is zero-filled (cp.async with src-size 0) when all 8 lie in the padding or past
// the tile's end; otherwise (straddling a border, a tap or a row, strided, misaligned) the
// element path gathers it.  Every thread that holds an element of a span computes the same
// answer from its own context (checks that differ between the 8 threads come first), so the
// span is written exactly once (tests/cpp/test_causal_conv3d_cuda_host.cu checks it).
constexpr int kSpan = 8;
enum class Fill : int { Element = 0, Zero = 1, Copy = 2 };
struct SpanCopy {
  const void* src;  // Fill::Copy: the first element, 16-byte aligned
  Fill fill;
};

HD SpanCopy span_element() { return {nullptr, Fill::Element}; }
HD SpanCopy span_zero() { return {nullptr, Fill::Zero}; }
// elements off .. off+7 of a 2-byte tensor: copied when 16-byte aligned
HD SpanCopy span_at(const void* base, int64_t off) {
  const uint16_t* p = static_cast<const uint16_t*>(base) + off;
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0 ? SpanCopy{p, Fill::Copy} : span_element();
}

// x padded at (b, channels c .. c+7, padded frame p, hi, wi): one position, 8 channels.
HD SpanCopy input_span_c(const CudaConvArgs& a, int b, int c, int p, int hi, int wi) {
  const ConvShape& s = a.shape;
  if (hi < 0 || hi >= s.H || wi < 0 || wi >= s.W) return span_zero();
  const FrameSource src = padded_frame(s, p);
  if (src.kind == FrameKind::Zero) return span_zero();
  const View5& v = src.kind == FrameKind::Cache ? a.cache : a.x;
  if (v.stride[1] != 1) return span_element();
  return span_at(v.data, v.offset(b, c, src.frame, hi, wi));
}

// x padded at (b, c, padded frame p, hi, columns wi .. wi+7): zeros when all 8 columns are in
// the padding, the element path when they straddle its border.
HD SpanCopy input_span_w(const CudaConvArgs& a, int b, int c, int p, int hi, int wi) {
  const ConvShape& s = a.shape;
  if (hi < 0 || hi >= s.H || wi >= s.W || wi + kSpan <= 0) return span_zero();
  const FrameSource src = padded_frame(s, p);
  if (src.kind == FrameKind::Zero) return span_zero();
  if (wi < 0 || wi + kSpan > s.W) return span_element();
  const View5& v = src.kind == FrameKind::Cache ? a.cache : a.x;
  if (v.stride[4] != 1) return span_element();
  return span_at(v.data, v.offset(b, c, src.frame, hi, wi));
}

struct OutRow {
  int64_t off;  // element offset of column 0
  int dst;      // -1: no output (row past the end), else which output tensor
};

// ---- the three problems ----------------------------------------------------------------

// Forward.  A rows: output positions (b, t, h, w); B: packed weights (K x O), row k at k*O.
template <bool CL>
struct ForwardProblem {
  CudaConvArgs a;
  static constexpr bool kARedFast = CL, kBRedFast = false, kOutNFast = CL;
  struct Row {
    int b, t0, h0, w0;  // first padded frame / input row / column the window reads
    bool valid;
  };
  using Col = int64_t;
  using RedA = TapWalker;
  using RedB = int64_t;
  HD int64_t rows() const { return a.shape.B * a.shape.To * a.shape.Ho * a.shape.Wo; }
  HD int64_t cols() const { return a.shape.O; }
  HD int64_t reduction() const { return a.shape.kt * a.shape.kh * a.shape.kw * a.shape.C; }
  HD Row row(int64_t m, bool valid) const {
    const ConvShape& s = a.shape;
    const PositionWalker p = position_walker(valid ? m : 0, s);
    return {p.b, int(p.t * s.st), int(p.h * s.sh - s.ph), int(p.w * s.sw - s.pw), valid};
  }
  HD Col col(int64_t n, bool valid) const { return valid ? n : -1; }
  HD RedA red_a(int64_t k) const { return tap_walker(k, a.shape, int(a.shape.C)); }
  HD RedB red_b(int64_t k) const { return k; }
  HD void step_a(RedA& w, int step) const { advance(w, step, a.shape, int(a.shape.C)); }
  HD void step_b(RedB& k, int step) const { k += step; }
  HD static int64_t index(const RedA& w) { return w.k; }
  HD static int64_t index(const RedB& k) { return k; }
  template <typename F>
  HD typename F::bits load_a(const Row& r, const RedA& w) const {
    if (!r.valid) return 0;
    const ConvShape& s = a.shape;
    return padded_input<F>(a, r.b, w.ch, r.t0 + w.it * int(s.dt), r.h0 + w.ih * int(s.dh),
                           r.w0 + w.iw * int(s.dw));
  }
  template <typename F>
  HD typename F::bits load_b(const RedB& k, const Col& n) const {
    return n < 0 ? 0 : load_bits<F>(a.packed_weight, k * a.shape.O + n);
  }
  // cp.async spans (element s of the span): channels-last, 8 channels of one tap; channels-first
  // (stride 1), 8 output columns of one output row, i.e. 8 input columns of one tap.
  HD SpanCopy span_a(const Row& r, const RedA& w, int s) const {
    const ConvShape& sh = a.shape;
    if (!r.valid) return span_zero();
    const int p = r.t0 + w.it * int(sh.dt), hi = r.h0 + w.ih * int(sh.dh);
    if constexpr (CL) {
      const int c0 = w.ch - s;
      if (c0 < 0 || c0 + kSpan > sh.C) return span_element();  // straddles two taps
      return input_span_c(a, r.b, c0, p, hi, r.w0 + w.iw * int(sh.dw));
    } else {
      const int w0 = r.w0 - s;  // input column of the span's first position at tap iw = 0
      if (sh.sw != 1 || w0 + int(sh.pw) < 0 || w0 + int(sh.pw) + kSpan > sh.Wo) return span_element();
      return input_span_w(a, r.b, w.ch, p, hi, w0 + w.iw * int(sh.dw));
    }
  }
  HD SpanCopy span_b(const RedB& k, const Col& n, int s) const {
    return n < 0 ? span_zero() : span_at(a.packed_weight, k * a.shape.O + n - s);
  }
  HD OutRow out_row(int64_t m, bool valid, int64_t split) const {
    if (!valid) return {0, -1};
    const PositionWalker p = position_walker(m, a.shape);
    return {a.y.offset(p.b, 0, p.t, p.h, p.w), 0};
  }
  template <typename F>
  HD void store(const OutRow& r, int64_t n, typename F::work v) const {
    if (a.bias) v += F::load(load_bits<F>(a.bias, n));
    static_cast<typename F::bits*>(a.y.data)[r.off + n * a.y.stride[1]] = F::store(v);
  }
};

// Input gradient.  A rows: padded input positions (b, p, h, w), p from p_begin; B: packed
// weights (K' x C), row k at k*C.  Input index n reaches output index (n - tap*d)/s when that
// divides exactly.  With n = q*s + r (per row, once) and tap*d = Q*s + R (walked with the
// taps: R += d % s, carry into Q), that is q - Q (- 1 when r < R) exactly when r - R is 0
// modulo s: no division in the K loop.
struct StridedTapWalker {
  TapWalker w;
  int q[3], r[3];  // (t, h, w): tap * dilation = q * stride + r, 0 <= r < stride
};

template <bool CL>
struct InputGradProblem {
  CudaConvArgs a;
  int64_t p_begin;   // 0 when grad_past is written, else P
  int dq[3], dr[3];  // dilation / stride and dilation % stride per axis (t, h, w), from the host
  static constexpr bool kARedFast = CL, kBRedFast = false, kOutNFast = CL;
  struct Axis {
    int q, r;  // (input index + padding) = q * stride + r
  };
  struct Row {
    int b;
    Axis t, h, w;
    bool valid;
  };
  using Col = int64_t;
  using RedA = StridedTapWalker;
  using RedB = int64_t;
  HD int64_t frames() const { return a.shape.P + a.shape.T - p_begin; }
  HD int64_t rows() const { return a.shape.B * frames() * a.shape.H * a.shape.W; }
  HD int64_t cols() const { return a.shape.C; }
  HD int64_t reduction() const { return a.shape.kt * a.shape.kh * a.shape.kw * a.shape.O; }
  struct Position {
    int b, p, h, w;
  };
  HD Position unravel(int64_t m) const {
    const ConvShape& s = a.shape;
    int64_t q = m / s.W;
    const int w = int(m - q * s.W);
    const int h = int(q % s.H);
    q /= s.H;
    return {int(q / frames()), int(q % frames() + p_begin), h, w};
  }
  static HD Axis axis(int n, int64_t stride) { return {int(n / stride), int(n % stride)}; }
  HD Row row(int64_t m, bool valid) const {
    const ConvShape& s = a.shape;
    const Position p = unravel(valid ? m : 0);
    return {p.b, axis(p.p, s.st), axis(p.h + int(s.ph), s.sh), axis(p.w + int(s.pw), s.sw), valid};
  }
  HD Col col(int64_t n, bool valid) const { return valid ? n : -1; }
  HD int stride(int axis) const { return int(axis == 0 ? a.shape.st : axis == 1 ? a.shape.sh : a.shape.sw); }
  HD void set_tap(StridedTapWalker& s, int axis, int tap) const {
    const int64_t d = axis == 0 ? a.shape.dt : axis == 1 ? a.shape.dh : a.shape.dw;
    s.q[axis] = int(tap * d / stride(axis));
    s.r[axis] = int(tap * d % stride(axis));
  }
  HD void next_tap(StridedTapWalker& s, int axis) const {
    s.q[axis] += dq[axis];
    s.r[axis] += dr[axis];
    if (s.r[axis] >= stride(axis)) {
      s.r[axis] -= stride(axis);
      ++s.q[axis];
    }
  }
  HD RedA red_a(int64_t k) const {
    StridedTapWalker s;
    s.w = tap_walker(k, a.shape, int(a.shape.O));
    set_tap(s, 0, s.w.it);
    set_tap(s, 1, s.w.ih);
    set_tap(s, 2, s.w.iw);
    return s;
  }
  HD RedB red_b(int64_t k) const { return k; }
  HD void step_a(RedA& s, int step) const {
    const ConvShape& sh = a.shape;
    s.w.k += step;
    s.w.ch += step;
    while (s.w.ch >= sh.O) {
      s.w.ch -= int(sh.O);
      if (++s.w.iw < sh.kw) {
        next_tap(s, 2);
        continue;
      }
      s.w.iw = 0;
      s.q[2] = s.r[2] = 0;
      if (++s.w.ih < sh.kh) {
        next_tap(s, 1);
        continue;
      }
      s.w.ih = 0;
      s.q[1] = s.r[1] = 0;
      ++s.w.it;
      next_tap(s, 0);
    }
  }
  HD void step_b(RedB& k, int step) const { k += step; }
  HD static int64_t index(const RedA& s) { return s.w.k; }
  HD static int64_t index(const RedB& k) { return k; }
  // The output index along one axis that input index x receives through the walker's tap on
  // that axis, or -1 when it receives none.
  static HD int output_index(Axis x, int tq, int tr, int64_t extent) {
    return x.r == tr && x.q >= tq && x.q - tq < extent ? x.q - tq : -1;
  }
  template <typename F>
  HD typename F::bits load_a(const Row& r, const RedA& s) const {
    if (!r.valid) return 0;
    const ConvShape& sh = a.shape;
    const int to = output_index(r.t, s.q[0], s.r[0], sh.To);
    const int ho = output_index(r.h, s.q[1], s.r[1], sh.Ho);
    const int wo = output_index(r.w, s.q[2], s.r[2], sh.Wo);
    if (to < 0 || ho < 0 || wo < 0) return 0;
    return load_bits<F>(a.grad_y.data, a.grad_y.offset(r.b, s.w.ch, to, ho, wo));
  }
  template <typename F>
  HD typename F::bits load_b(const RedB& k, const Col& n) const {
    return n < 0 ? 0 : load_bits<F>(a.packed_weight, k * a.shape.C + n);
  }
  // cp.async spans: channels-last, 8 output channels of one tap at one output position;
  // channels-first (stride 1 along w), 8 input columns of one row, i.e. 8 output columns.
  HD SpanCopy span_a(const Row& r, const RedA& w, int s) const {
    const ConvShape& sh = a.shape;
    const View5& g = a.grad_y;
    if (!r.valid) return span_zero();
    if constexpr (CL) {
      const int o0 = w.w.ch - s;
      if (o0 < 0 || o0 + kSpan > sh.O) return span_element();  // straddles two taps
      const int to = output_index(r.t, w.q[0], w.r[0], sh.To);
      const int ho = output_index(r.h, w.q[1], w.r[1], sh.Ho);
      const int wo = output_index(r.w, w.q[2], w.r[2], sh.Wo);
      if (to < 0 || ho < 0 || wo < 0) return span_zero();
      if (g.stride[1] != 1) return span_element();
      return span_at(g.data, g.offset(r.b, o0, to, ho, wo));
    } else {
      const int x0 = r.w.q - s;  // (input column + pw) of the span's first position (stride 1)
      if (sh.sw != 1 || x0 - int(sh.pw) < 0 || x0 - int(sh.pw) + kSpan > sh.W) return span_element();
      const int to = output_index(r.t, w.q[0], w.r[0], sh.To);
      const int ho = output_index(r.h, w.q[1], w.r[1], sh.Ho);
      const int wo0 = x0 - w.q[2];
      if (to < 0 || ho < 0 || wo0 >= sh.Wo || wo0 + kSpan <= 0) return span_zero();
      if (wo0 < 0 || wo0 + kSpan > sh.Wo || g.stride[4] != 1) return span_element();
      return span_at(g.data, g.offset(r.b, w.w.ch, to, ho, wo0));
    }
  }
  HD SpanCopy span_b(const RedB& k, const Col& n, int s) const {
    return n < 0 ? span_zero() : span_at(a.packed_weight, k * a.shape.C + n - s);
  }
  HD OutRow out_row(int64_t m, bool valid, int64_t split) const {
    if (!valid) return {0, -1};
    const Position r = unravel(m);
    const bool past = r.p < a.shape.P;
    const MutView5& dst = past ? a.grad_past : a.grad_x;
    if (!dst.data) return {0, -1};
    return {dst.offset(r.b, 0, past ? r.p : r.p - a.shape.P, r.h, r.w), past ? 1 : 0};
  }
  template <typename F>
  HD void store(const OutRow& r, int64_t n, typename F::work v) const {
    const MutView5& dst = r.dst == 1 ? a.grad_past : a.grad_x;
    static_cast<typename F::bits*>(dst.data)[r.off + n * dst.stride[1]] = F::store(v);
  }
};

// Weight gradient.  A rows: output channels o (A = dy^T); reduction: output positions;
// B columns: taps n = (it, ih, iw, c) of the packed order.  Split z writes partial[z].
template <bool CL>
struct WeightGradProblem {
  CudaConvArgs a;
  static constexpr bool kARedFast = !CL, kBRedFast = !CL, kOutNFast = true;
  using Row = int64_t;   // dy offset of channel o, or -1
  struct Col {
    int ch, toff, hoff, woff;  // channel and the tap's offsets it*dt, ih*dh - ph, iw*dw - pw
    bool valid;
  };
  using RedA = PositionWalker;
  using RedB = PositionWalker;
  HD int64_t rows() const { return a.shape.O; }
  HD int64_t cols() const { return a.shape.kt * a.shape.kh * a.shape.kw * a.shape.C; }
  HD int64_t reduction() const { return a.shape.B * a.shape.To * a.shape.Ho * a.shape.Wo; }
  HD Row row(int64_t o, bool valid) const { return valid ? o * a.grad_y.stride[1] : -1; }
  HD Col col(int64_t n, bool valid) const {
    const ConvShape& s = a.shape;
    const TapWalker t = tap_walker(valid ? n : 0, s, int(s.C));
    return {t.ch, int(t.it * s.dt), int(t.ih * s.dh - s.ph), int(t.iw * s.dw - s.pw), valid};
  }
  HD RedA red_a(int64_t m) const { return position_walker(m, a.shape); }
  HD RedB red_b(int64_t m) const { return position_walker(m, a.shape); }
  HD void step_a(RedA& p, int step) const { advance(p, step, a.shape); }
  HD void step_b(RedB& p, int step) const { advance(p, step, a.shape); }
  HD static int64_t index(const PositionWalker& p) { return p.k; }
  template <typename F>
  HD typename F::bits load_a(const Row& o, const RedA& p) const {
    if (o < 0) return 0;
    return load_bits<F>(a.grad_y.data, a.grad_y.offset(p.b, 0, p.t, p.h, p.w) + o);
  }
  template <typename F>
  HD typename F::bits load_b(const RedB& p, const Col& c) const {
    if (!c.valid) return 0;
    const ConvShape& s = a.shape;
    return padded_input<F>(a, p.b, c.ch, p.t * int(s.st) + c.toff, p.h * int(s.sh) + c.hoff,
                           p.w * int(s.sw) + c.woff);
  }
  // cp.async spans.  A (dy): channels-last, 8 output channels at one position; channels-first,
  // 8 positions of one output row.  B (x): channels-last, 8 channels of one tap at one position;
  // channels-first (stride 1), 8 positions of one output row, i.e. 8 input columns.
  HD SpanCopy span_a(const Row& o, const RedA& p, int s) const {
    const View5& g = a.grad_y;
    if (o < 0) return span_zero();
    if constexpr (CL) {
      if (g.stride[1] != 1) return span_element();
      return span_at(g.data, g.offset(p.b, 0, p.t, p.h, p.w) + o - s);
    } else {
      const int w0 = p.w - s;
      if (w0 < 0 || w0 + kSpan > a.shape.Wo || g.stride[4] != 1) return span_element();
      return span_at(g.data, g.offset(p.b, 0, p.t, p.h, w0) + o);
    }
  }
  HD SpanCopy span_b(const RedB& p, const Col& c, int s) const {
    const ConvShape& sh = a.shape;
    if (!c.valid) return span_zero();
    const int frame = p.t * int(sh.st) + c.toff, hi = p.h * int(sh.sh) + c.hoff;
    if constexpr (CL) {
      const int c0 = c.ch - s;
      if (c0 < 0 || c0 + kSpan > sh.C) return span_element();  // straddles two taps
      return input_span_c(a, p.b, c0, frame, hi, p.w * int(sh.sw) + c.woff);
    } else {
      const int w0 = p.w - s;
      if (sh.sw != 1 || w0 < 0 || w0 + kSpan > sh.Wo) return span_element();
      return input_span_w(a, p.b, c.ch, frame, hi, w0 + c.woff);
    }
  }
  HD OutRow out_row(int64_t o, bool valid, int64_t split) const {
    if (!valid) return {0, -1};
    return {(split * a.shape.O + o) * cols(), 0};
  }
  template <typename F>
  HD void store(const OutRow& r, int64_t n, typename F::work v) const {
    static_cast<typename F::work*>(a.grad_weight_partial)[r.off + n] = v;
  }
};

// ---- the kernel ---------------------------------------------------------------------

// One thread's share of the next K step: its kSlots elements of the A and B tiles (zero past
// k_end), then both walkers advanced by BK.
template <typename F, typename Problem>
HD void fetch_tiles(const Problem& pb, const typename Problem::Row* rows, const typename Problem::Col* cols,
                    typename Problem::RedA& walk_a, typename Problem::RedB& walk_b, int64_t k_end,
                    typename F::bits* a_next, typename F::bits* b_next) {
  using Bits = typename F::bits;
  if constexpr (Problem::kARedFast) {
    const bool in = Problem::index(walk_a) < k_end;
#pragma unroll
    for (int q = 0; q < kSlots; ++q) a_next[q] = in ? pb.template load_a<F>(rows[q], walk_a) : Bits(0);
  } else {
    typename Problem::RedA w = walk_a;
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      a_next[q] = Problem::index(w) < k_end ? pb.template load_a<F>(rows[0], w) : Bits(0);
      if (q + 1 < kSlots) pb.step_a(w, 1);
    }
  }
  if constexpr (Problem::kBRedFast) {
    const bool in = Problem::index(walk_b) < k_end;
#pragma unroll
    for (int q = 0; q < kSlots; ++q) b_next[q] = in ? pb.template load_b<F>(walk_b, cols[q]) : Bits(0);
  } else {
    typename Problem::RedB w = walk_b;
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      b_next[q] = Problem::index(w) < k_end ? pb.template load_b<F>(w, cols[0]) : Bits(0);
      if (q + 1 < kSlots) pb.step_b(w, 1);
    }
  }
  pb.step_a(walk_a, BK);
  pb.step_b(walk_b, BK);
}

// The cp.async variant of fetch_tiles: every span that fetch_tiles would gather (see SpanCopy)
// is either handed to sink(is_b, fixed, red, SpanCopy) by the thread that holds its first
// element (fixed/red: that element's tile position; the span runs along the fast axis), or,
// on the element path, loaded into a_next/b_next as before.  Returns the element-path slots
// (bit q: a_next[q], bit kSlots + q: b_next[q]), the ones to stash.  Spans that are only
// partly inside the tile (last reduction step, last rows/columns) take the element path.
// (m0, n0): the tile's first row and column; M, N: rows and columns of the problem.
// (the host emulation's sink is a host lambda: no execution-space check for Sink)
#pragma nv_exec_check_disable
template <typename F, typename Problem, typename Sink>
HD unsigned fetch_tiles_async(const Problem& pb, int tid, int64_t m0, int64_t n0, int64_t M, int64_t N,
                              const typename Problem::Row* rows, const typename Problem::Col* cols,
                              typename Problem::RedA& walk_a, typename Problem::RedB& walk_b, int64_t k_end,
                              typename F::bits* a_next, typename F::bits* b_next, Sink& sink) {
  static_assert(sizeof(typename F::bits) == 2, "cp.async spans are 8 two-byte elements");
  using Bits = typename F::bits;
  using MapA = TileMap<Problem::kARedFast>;
  using MapB = TileMap<Problem::kBRedFast>;
  unsigned element = 0;
  if constexpr (Problem::kARedFast) {  // spans along the reduction: rows[q] shared by the span
    const int s = MapA::red(tid) % kSpan;
    const int64_t k = Problem::index(walk_a), len = k_end - (k - s);
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      const SpanCopy c = len <= 0 ? span_zero() : len < kSpan ? span_element() : pb.span_a(rows[q], walk_a, s);
      if (c.fill == Fill::Element) {
        a_next[q] = k < k_end ? pb.template load_a<F>(rows[q], walk_a) : Bits(0);
        element |= 1u << q;
      } else if (s == 0) {
        sink(false, MapA::slot_fixed(tid, q), MapA::slot_red(tid, q), c);
      }
    }
  } else {  // spans along the rows: one reduction index per slot
    const int f = MapA::fixed(tid, 0), s = f % kSpan;
    const int64_t len = M - (m0 + f - s);
    typename Problem::RedA w = walk_a;
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      const bool in = Problem::index(w) < k_end;
      const SpanCopy c = !in || len <= 0 ? span_zero() : len < kSpan ? span_element() : pb.span_a(rows[0], w, s);
      if (c.fill == Fill::Element) {
        a_next[q] = in ? pb.template load_a<F>(rows[0], w) : Bits(0);
        element |= 1u << q;
      } else if (s == 0) {
        sink(false, MapA::slot_fixed(tid, q), MapA::slot_red(tid, q), c);
      }
      if (q + 1 < kSlots) pb.step_a(w, 1);
    }
  }
  if constexpr (Problem::kBRedFast) {  // spans along the reduction: cols[q] shared by the span
    const int s = MapB::red(tid) % kSpan;
    const int64_t k = Problem::index(walk_b), len = k_end - (k - s);
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      const SpanCopy c = len <= 0 ? span_zero() : len < kSpan ? span_element() : pb.span_b(walk_b, cols[q], s);
      if (c.fill == Fill::Element) {
        b_next[q] = k < k_end ? pb.template load_b<F>(walk_b, cols[q]) : Bits(0);
        element |= 1u << (kSlots + q);
      } else if (s == 0) {
        sink(true, MapB::slot_fixed(tid, q), MapB::slot_red(tid, q), c);
      }
    }
  } else {  // spans along the columns: one reduction index per slot
    const int f = MapB::fixed(tid, 0), s = f % kSpan;
    const int64_t len = N - (n0 + f - s);
    typename Problem::RedB w = walk_b;
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      const bool in = Problem::index(w) < k_end;
      const SpanCopy c = !in || len <= 0 ? span_zero() : len < kSpan ? span_element() : pb.span_b(w, cols[0], s);
      if (c.fill == Fill::Element) {
        b_next[q] = in ? pb.template load_b<F>(w, cols[0]) : Bits(0);
        element |= 1u << (kSlots + q);
      } else if (s == 0) {
        sink(true, MapB::slot_fixed(tid, q), MapB::slot_red(tid, q), c);
      }
      if (q + 1 < kSlots) pb.step_b(w, 1);
    }
  }
  pb.step_a(walk_a, BK);
  pb.step_b(walk_b, BK);
  return element;
}

// Shared-memory layout of one stage of an operand tile (kFixed rows/columns x BK reduction
// indices, padded by 8 elements against bank conflicts): reduction-contiguous [kFixed][BK + 8]
// or, where the cp.async spans run along the fixed axis, fixed-contiguous [BK][kFixed + 8].
template <bool FixedContig, int kFixed>
struct TileLayout {
  static constexpr bool kFixedContig = FixedContig;
  static constexpr int kLd = FixedContig ? kFixed + 8 : BK + 8;
  static constexpr int kElems = (FixedContig ? BK : kFixed) * kLd;
  static HD int at(int fixed, int red) { return FixedContig ? red * kLd + fixed : fixed * kLd + red; }
};

template <typename F>
constexpr bool kHalfFormat =
    std::is_same<F, Format<DType::F16>>::value || std::is_same<F, Format<DType::BF16>>::value;

// WMMA where the architecture has it for the format; elsewhere the FMA path.
template <typename F>
constexpr bool kWmma = (std::is_same<F, Format<DType::F16>>::value && kArch >= 700) ||
                       (std::is_same<F, Format<DType::BF16>>::value && kArch >= 800);

// Shared-memory operand type: the half format itself for halves, else the work type.
template <typename F, bool Half = kHalfFormat<F>>
struct Staged {
  using type = typename F::work;
  static __device__ __forceinline__ type from_bits(typename F::bits b) { return F::load(b); }
  static __device__ __forceinline__ typename F::work work(type v) { return v; }
};
template <>
struct Staged<Format<DType::F16>, true> {
  using type = __half;
  static __device__ __forceinline__ type from_bits(uint16_t b) { return __ushort_as_half(b); }
  static __device__ __forceinline__ float work(type v) { return __half2float(v); }
};
template <>
struct Staged<Format<DType::BF16>, true> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ type from_bits(uint16_t b) { return __ushort_as_bfloat16(b); }
  static __device__ __forceinline__ float work(type v) { return __bfloat162float(v); }
};

// Two blocks per SM (<= 128 registers) for the fp16/bf16/fp32 paths; fp64 (a correctness
// path, 1/64 of the FMA rate on most parts) keeps one so that it does not spill.
template <typename F>
constexpr int kMinBlocks = sizeof(typename F::work) == 8 ? 1 : 2;

// cp.async (sm_80+): the 16-byte copies of the fp16/bf16 tensor-core path, 3 stages.  Spans are
// cached in L1 (.ca): neighbouring output positions and taps of a block re-read the same input.
template <typename F>
constexpr bool kAsync = kHalfFormat<F> && kArch >= 800;
template <typename F>
constexpr int kStages = kAsync<F> ? 3 : 2;

// the (never read) source of the zero-filling copies: src-size 0 reads no byte of it
__device__ __align__(16) unsigned char zero_span_src[16];

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800

__device__ __forceinline__ void cp_async_16(void* smem, const SpanCopy& c) {
  const bool copy = c.fill == Fill::Copy;
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const size_t src = __cvta_generic_to_global(copy ? c.src : static_cast<const void*>(zero_span_src));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(copy ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// waits until at most `pending` of this thread's committed groups are still in flight
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}
#else
__device__ __forceinline__ void cp_async_16(void*, const SpanCopy&) {}
__device__ __forceinline__ void cp_async_commit() {}
template <int pending>
__device__ __forceinline__ void cp_async_wait() {}
#endif

template <typename F, typename Problem>
__global__ void __launch_bounds__(kThreads, kMinBlocks<F>) implicit_gemm_kernel(Problem pb, int64_t reduction_per_split) {
  using Bits = typename F::bits;
  using Acc = typename F::work;
  using S = Staged<F>;
  using Stage = typename S::type;
  using MapA = TileMap<Problem::kARedFast>;
  using MapB = TileMap<Problem::kBRedFast>;
  constexpr bool kCp = kAsync<F>;
  constexpr int kSt = kStages<F>;
  // the shared tiles are contiguous along the fast axis of the tile mapping where cp.async copies
  // spans along it; the register-staged path keeps A as [m][k] and B as [k][n]
  using LA = TileLayout<kCp && !Problem::kARedFast, BM>;
  using LB = TileLayout<!(kCp && Problem::kBRedFast), BN>;
  constexpr int kLdC = BN + 4;
  constexpr size_t kLoopBytes = sizeof(Stage) * kSt * (LA::kElems + LB::kElems);
  constexpr size_t kOutBytes = sizeof(Acc) * BM * kLdC;
  // the output tile reuses the operand stages once the K loop is done
  __shared__ __align__(128) unsigned char smem[kLoopBytes > kOutBytes ? kLoopBytes : kOutBytes];
  __shared__ int64_t out_off[BM];
  __shared__ int out_dst[BM];
  auto As = [&](int stage) { return reinterpret_cast<Stage*>(smem) + stage * LA::kElems; };
  auto Bs = [&](int stage) { return reinterpret_cast<Stage*>(smem) + kSt * LA::kElems + stage * LB::kElems; };
  auto* Cs = reinterpret_cast<Acc(*)[kLdC]>(smem);

  const int tid = threadIdx.x;
  const int64_t M = pb.rows(), N = pb.cols(), K = pb.reduction();
  const int64_t m0 = (int64_t)blockIdx.x * BM, n0 = (int64_t)blockIdx.y * BN;
  const int64_t k_begin = (int64_t)blockIdx.z * reduction_per_split;
  const int64_t k_end = k_begin + reduction_per_split < K ? k_begin + reduction_per_split : K;

  // per-thread contexts, unravelled once
  typename Problem::Row rows[MapA::kFixed];
#pragma unroll
  for (int q = 0; q < MapA::kFixed; ++q) {
    const int64_t m = m0 + MapA::fixed(tid, q);
    rows[q] = pb.row(m, m < M);
  }
  typename Problem::Col cols[MapB::kFixed];
#pragma unroll
  for (int q = 0; q < MapB::kFixed; ++q) {
    const int64_t n = n0 + MapB::fixed(tid, q);
    cols[q] = pb.col(n, n < N);
  }
  typename Problem::RedA walk_a = pb.red_a(k_begin + MapA::red(tid));
  typename Problem::RedB walk_b = pb.red_b(k_begin + MapB::red(tid));

  // One K step into `stage`: cp.async spans are issued straight into it; the element path's
  // loads land in a_next/b_next and `stash` stores them later (the returned slot mask).
  Bits a_next[kSlots], b_next[kSlots];
  auto fetch = [&](int stage) -> unsigned {
    if constexpr (kCp) {
      Stage* as = As(stage);
      Stage* bs = Bs(stage);
      auto sink = [&](bool is_b, int fixed, int red, const SpanCopy& c) {
        cp_async_16(is_b ? bs + LB::at(fixed, red) : as + LA::at(fixed, red), c);
      };
      return fetch_tiles_async<F>(pb, tid, m0, n0, M, N, rows, cols, walk_a, walk_b, k_end, a_next, b_next, sink);
    } else {
      fetch_tiles<F>(pb, rows, cols, walk_a, walk_b, k_end, a_next, b_next);
      return (1u << (2 * kSlots)) - 1;
    }
  };
  auto stash = [&](int stage, unsigned element) {
    Stage* as = As(stage);
    Stage* bs = Bs(stage);
#pragma unroll
    for (int q = 0; q < kSlots; ++q) {
      if (element >> q & 1u) as[LA::at(MapA::slot_fixed(tid, q), MapA::slot_red(tid, q))] = S::from_bits(a_next[q]);
      if (element >> (kSlots + q) & 1u)
        bs[LB::at(MapB::slot_fixed(tid, q), MapB::slot_red(tid, q))] = S::from_bits(b_next[q]);
    }
  };

  Acc acc[4][4] = {};
  using namespace nvcuda;
  // tensor cores: 8 warps, each owns two 16x16 fragments of the 64x64 tile
  const int warp = tid / 32;
  const int frag_row = warp / 2, frag_col = (warp % 2) * 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c_frag[2];
  if constexpr (kWmma<F>) {
    wmma::fill_fragment(c_frag[0], 0.0f);
    wmma::fill_fragment(c_frag[1], 0.0f);
  }
  const int ty = tid / 16, tx = tid % 16;   // FMA path: rows ty*4.., cols tx*4..

  // Pipeline of kSt stages, kSt - 1 K steps ahead.  Step i is multiplied from stage i % kSt
  // while step i + kSt - 1 is fetched into stage (i - 1) % kSt: the barrier at the top of step i
  // follows everyone's reads of that stage in step i - 1.  One cp.async group per step (empty
  // ones too), so wait_group<kSt - 2> at the top of step i leaves only the groups of the
  // steps after i in flight; the barrier then publishes every thread's copies and stashes.
  int64_t k_fetch = k_begin;
#pragma unroll
  for (int st = 0; st < kSt - 1; ++st) {
    if (k_fetch < k_end) stash(st, fetch(st));
    cp_async_commit();
    k_fetch += BK;
  }
  int stage = 0, fetch_stage = kSt - 1;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    cp_async_wait<kSt - 2>();
    __syncthreads();
    const bool more = k_fetch < k_end;
    unsigned element = 0;
    if (more) element = fetch(fetch_stage);   // issued before this step's multiplies
    cp_async_commit();
    const Stage* as = As(stage);
    const Stage* bs = Bs(stage);
    if constexpr (kWmma<F>) {
      using LayoutA = std::conditional_t<LA::kFixedContig, wmma::col_major, wmma::row_major>;
      using LayoutB = std::conditional_t<LB::kFixedContig, wmma::row_major, wmma::col_major>;
      wmma::fragment<wmma::matrix_a, 16, 16, 16, Stage, LayoutA> a_frag;
      wmma::load_matrix_sync(a_frag, as + LA::at(frag_row * 16, 0), LA::kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, Stage, LayoutB> b_frag;
        wmma::load_matrix_sync(b_frag, bs + LB::at((frag_col + j) * 16, 0), LB::kLd);
        wmma::mma_sync(c_frag[j], a_frag, b_frag, c_frag[j]);
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        Acc av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = S::work(as[LA::at(ty * 4 + i, kk)]);
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = S::work(bs[LB::at(tx * 4 + j, kk)]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
      }
    }
    if (more) stash(fetch_stage, element);   // the element path's registers, after the multiplies
    k_fetch += BK;
    stage = stage + 1 == kSt ? 0 : stage + 1;
    fetch_stage = fetch_stage + 1 == kSt ? 0 : fetch_stage + 1;
  }
  cp_async_wait<0>();
  __syncthreads();   // every read of the stages done before the output tile overwrites them

  // accumulators -> shared output tile -> stores along the output's contiguous axis
  if constexpr (kWmma<F>) {
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&Cs[frag_row * 16][(frag_col + j) * 16], c_frag[j], kLdC, wmma::mem_row_major);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[ty * 4 + i][tx * 4 + j] = acc[i][j];
  }
  if (tid < BM) {
    const OutRow r = pb.out_row(m0 + tid, m0 + tid < M, blockIdx.z);
    out_off[tid] = r.off;
    out_dst[tid] = r.dst;
  }
  __syncthreads();
#pragma unroll 4
  for (int e = tid; e < BM * BN; e += kThreads) {
    const int mm = Problem::kOutNFast ? e / BN : e % BM;
    const int nn = Problem::kOutNFast ? e % BN : e / BM;
    const int64_t n = n0 + nn;
    if (out_dst[mm] >= 0 && n < N) pb.template store<F>(OutRow{out_off[mm], out_dst[mm]}, n, Cs[mm][nn]);
  }
}

// Split of a reduction of K over at most `splits` blocks: elements per split (a multiple
// of BK, at least BK) and the number of splits that hold any.  K = 0 (an empty batch in
// the weight gradient) is one split that stores zeros.
struct Split {
  int64_t per_split, count;
};

Split split_reduction(int64_t K, int64_t splits) {
  if (splits < 1) splits = 1;
  int64_t per = (K + splits - 1) / splits;
  per = (per + BK - 1) / BK * BK;
  if (per < BK) per = BK;
  return {per, K > 0 ? (K + per - 1) / per : 1};
}

template <typename F, typename Problem>
void launch(const Problem& pb, int64_t M, int64_t N, Split split, void* stream, const char* what) {
  if (M == 0 || N == 0) return;
  const int64_t gx = (M + BM - 1) / BM, gy = (N + BN - 1) / BN;
  if (gx > 0x7fffffff || gy > 65535 || split.count > 65535)
    throw std::invalid_argument(std::string(what) + ": problem too large for one launch (" + std::to_string(M) +
                                " x " + std::to_string(N) + ")");
  const dim3 grid((unsigned)gx, (unsigned)gy, (unsigned)split.count);
  implicit_gemm_kernel<F, Problem><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(pb, split.per_split);
  check_launch(what);
}

// Channels are the contiguous axis of the gathered tensor: load along them.
bool channels_last(const View5& v, int64_t channels) { return v.stride[1] == 1 && channels > 1; }

}  // namespace

void causal_conv3d_forward_cuda(const CudaConvArgs& a, void* stream) {
  const ConvShape& s = a.shape;
  const int64_t M = s.B * s.To * s.Ho * s.Wo, K = s.kt * s.kh * s.kw * s.C;
  const char* what = "causal_conv3d_forward_cuda";
  if (channels_last(a.x, s.C)) {
    PYRATOK_DISPATCH_DTYPE(a.dtype, launch<F>(ForwardProblem<true>{a}, M, s.O, split_reduction(K, 1), stream, what));
  } else {
    PYRATOK_DISPATCH_DTYPE(a.dtype, launch<F>(ForwardProblem<false>{a}, M, s.O, split_reduction(K, 1), stream, what));
  }
}

void causal_conv3d_input_grad_cuda(const CudaConvArgs& a, void* stream) {
  const ConvShape& s = a.shape;
  const int64_t p_begin = a.grad_past.data ? 0 : s.P;
  const int64_t M = s.B * (s.P + s.T - p_begin) * s.H * s.W, K = s.kt * s.kh * s.kw * s.O;
  const char* what = "causal_conv3d_input_grad_cuda";
  const int dq[3] = {int(s.dt / s.st), int(s.dh / s.sh), int(s.dw / s.sw)};
  const int dr[3] = {int(s.dt % s.st), int(s.dh % s.sh), int(s.dw % s.sw)};
  if (channels_last(a.grad_y, s.O)) {
    InputGradProblem<true> pb{a, p_begin, {dq[0], dq[1], dq[2]}, {dr[0], dr[1], dr[2]}};
    PYRATOK_DISPATCH_DTYPE(a.dtype, launch<F>(pb, M, s.C, split_reduction(K, 1), stream, what));
  } else {
    InputGradProblem<false> pb{a, p_begin, {dq[0], dq[1], dq[2]}, {dr[0], dr[1], dr[2]}};
    PYRATOK_DISPATCH_DTYPE(a.dtype, launch<F>(pb, M, s.C, split_reduction(K, 1), stream, what));
  }
}

// Enough blocks to fill the device: split the position reduction, >= 1024 positions per split.
static Split weight_grad_split(const ConvShape& s) {
  const int64_t positions = s.B * s.To * s.Ho * s.Wo;
  const int64_t taps = s.kt * s.kh * s.kw * s.C;
  const int64_t tiles = ((s.O + BM - 1) / BM) * ((taps + BN - 1) / BN);
  int64_t splits = (1024 + tiles - 1) / tiles;
  const int64_t most = (positions + 1023) / 1024;
  splits = splits < most ? splits : most;
  return split_reduction(positions, splits);
}

int64_t causal_conv3d_weight_grad_splits(const ConvShape& s) { return weight_grad_split(s).count; }

void causal_conv3d_weight_grad_cuda(const CudaConvArgs& a, void* stream) {
  const ConvShape& s = a.shape;
  const int64_t taps = s.kt * s.kh * s.kw * s.C;
  const char* what = "causal_conv3d_weight_grad_cuda";
  if (channels_last(a.x, s.C)) {
    PYRATOK_DISPATCH_DTYPE(a.dtype, launch<F>(WeightGradProblem<true>{a}, s.O, taps, weight_grad_split(s), stream,
                                              what));
  } else {
    PYRATOK_DISPATCH_DTYPE(a.dtype, launch<F>(WeightGradProblem<false>{a}, s.O, taps, weight_grad_split(s), stream,
                                              what));
  }
}

}  // namespace pyratok
