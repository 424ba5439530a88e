// Host-only emulation of the CUDA implicit-GEMM convolution (csrc/core/causal_conv3d_cuda.cu):
// the kernel's index logic (row contexts, incremental reduction walkers, the input
// gradient's stride remainders, tile mappings of both layouts, the reduction split, the
// epilogue's output rows) runs on the CPU, block by block and thread by thread as the kernel
// schedules it, in fp64, and every output is compared with a naive causal convolution.  No
// GPU is needed: only the host side of the __host__ __device__ index code runs.
// The cp.async staging of the fp16/bf16 path (sm_80+) is emulated too, on fp16 bit patterns:
// every K step of every block, each thread's fetch_tiles_async hands its 16-byte spans to a
// host "cp.async" that copies (or zero-fills) them into the kernel's shared-memory layout and
// stashes its element-path slots; the stage must hold every tile element exactly once, equal
// to what the element path (fetch_tiles) gathers, with copies only from 16-byte-aligned
// addresses inside the tensors; over both layouts, both tile mappings, padding at every edge
// (spatial borders, causal zero/replicate/cache frames, spans wholly in the padding), tile ends
// and misaligned base pointers.  The MMAs, the pipeline's wait_group/__syncthreads ordering
// and the real cp.async are the GPU's part (benchmarks/device_check.sh runs them under
// compute-sanitizer memcheck and racecheck).
#include <cmath>
#include <cstdio>
#include <algorithm>
#include <array>
#include <random>
#include <vector>

#include "causal_conv3d_cuda.cu"
#include "check.h"

using namespace pyratok;
using F = Format<DType::F64>;

namespace {

// A dense (B, C, T, H, W) fp64 tensor, channels-first or channels-last.
struct Tensor5 {
  std::vector<double> data;
  int64_t size[5], stride[5];
  Tensor5(int64_t B, int64_t C, int64_t T, int64_t H, int64_t W, bool channels_last) : size{B, C, T, H, W} {
    data.assign(B * C * T * H * W, 0.0);
    if (channels_last) {
      stride[1] = 1, stride[4] = C, stride[3] = C * W, stride[2] = C * W * H, stride[0] = C * W * H * T;
    } else {
      stride[4] = 1, stride[3] = W, stride[2] = W * H, stride[1] = W * H * T, stride[0] = W * H * T * C;
    }
  }
  double& at(int64_t b, int64_t c, int64_t t, int64_t h, int64_t w) {
    return data[b * stride[0] + c * stride[1] + t * stride[2] + h * stride[3] + w * stride[4]];
  }
  View5 view() const { return {data.data(), {stride[0], stride[1], stride[2], stride[3], stride[4]}}; }
  MutView5 mut() { return {data.data(), {stride[0], stride[1], stride[2], stride[3], stride[4]}}; }
};

void fill(std::vector<double>& v, std::mt19937& rng) {
  std::uniform_real_distribution<double> u(-1, 1);
  for (double& x : v) x = u(rng);
}

// Runs the kernel's schedule on the host: every block of the grid, every thread's fetches in
// K-step order, the tile product, and the epilogue's stores.
// Each thread's fixed rows/columns and reduction walkers at the start of a block, as the
// kernel's prologue sets them up.
template <typename Problem>
struct BlockStart {
  using MapA = TileMap<Problem::kARedFast>;
  using MapB = TileMap<Problem::kBRedFast>;
  std::vector<std::array<typename Problem::Row, MapA::kFixed>> rows;
  std::vector<std::array<typename Problem::Col, MapB::kFixed>> cols;
  std::vector<typename Problem::RedA> walk_a;
  std::vector<typename Problem::RedB> walk_b;

  BlockStart(const Problem& pb, int64_t M, int64_t N, int64_t m0, int64_t n0, int64_t k_begin)
      : rows(kThreads), cols(kThreads) {
    for (int tid = 0; tid < kThreads; ++tid) {
      for (int q = 0; q < MapA::kFixed; ++q) {
        const int64_t m = m0 + MapA::fixed(tid, q);
        rows[tid][q] = pb.row(m, m < M);
      }
      for (int q = 0; q < MapB::kFixed; ++q) {
        const int64_t n = n0 + MapB::fixed(tid, q);
        cols[tid][q] = pb.col(n, n < N);
      }
      walk_a.push_back(pb.red_a(k_begin + MapA::red(tid)));
      walk_b.push_back(pb.red_b(k_begin + MapB::red(tid)));
    }
  }
};

// Every thread block of the launch grid (split, row tile, column tile) with its reduction range and
// the start state of its threads: fn(bz, m0, n0, k_begin, k_end, start).
template <typename Problem, typename Fn>
void for_each_block(const Problem& pb, int64_t M, int64_t N, Split split, Fn&& fn) {
  const int64_t K = pb.reduction();
  for (int64_t bz = 0; bz < split.count; ++bz)
    for (int64_t m0 = 0; m0 < M; m0 += BM)
      for (int64_t n0 = 0; n0 < N; n0 += BN) {
        const int64_t k_begin = bz * split.per_split;
        BlockStart<Problem> start(pb, M, N, m0, n0, k_begin);
        fn(bz, m0, n0, k_begin, std::min(k_begin + split.per_split, K), start);
      }
}

template <typename Problem>
void emulate(const Problem& pb, int64_t M, int64_t N, Split split) {
  using MapA = TileMap<Problem::kARedFast>;
  using MapB = TileMap<Problem::kBRedFast>;
  for_each_block(pb, M, N, split, [&](int64_t bz, int64_t m0, int64_t n0, int64_t k_begin, int64_t k_end,
                                      BlockStart<Problem>& start) {
        auto& rows = start.rows;
        auto& cols = start.cols;
        auto& walk_a = start.walk_a;
        auto& walk_b = start.walk_b;
        std::vector<double> C(BM * BN, 0.0);
        for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
          std::vector<double> As(BM * BK, NAN), Bs(BK * BN, NAN);  // NaN: a slot nobody wrote
          for (int tid = 0; tid < kThreads; ++tid) {
            uint64_t a_next[kSlots], b_next[kSlots];
            fetch_tiles<F>(pb, rows[tid].data(), cols[tid].data(), walk_a[tid], walk_b[tid], k_end, a_next, b_next);
            for (int q = 0; q < kSlots; ++q) {
              As[MapA::slot_fixed(tid, q) * BK + MapA::slot_red(tid, q)] = F::load(a_next[q]);
              Bs[MapB::slot_red(tid, q) * BN + MapB::slot_fixed(tid, q)] = F::load(b_next[q]);
            }
          }
          for (int i = 0; i < BM; ++i)
            for (int kk = 0; kk < BK; ++kk)
              for (int j = 0; j < BN; ++j) C[i * BN + j] += As[i * BK + kk] * Bs[kk * BN + j];
        }
        for (int mm = 0; mm < BM; ++mm) {
          const OutRow r = pb.out_row(m0 + mm, m0 + mm < M, bz);
          if (r.dst < 0) continue;
          for (int nn = 0; nn < BN && n0 + nn < N; ++nn) pb.template store<F>(r, n0 + nn, C[mm * BN + nn]);
        }
      });
}

struct Case {
  int64_t B, C, O, T, H, W, kt, kh, kw, st, sh, sw, dt, dh, dw, ph, pw;
  TimePad pad;
  bool cache;
};

// The naive padded input: frame p of [past, x].
double padded(const ConvShape& s, Tensor5& x, Tensor5& cache, int64_t b, int64_t c, int64_t p, int64_t h, int64_t w) {
  if (h < 0 || h >= s.H || w < 0 || w >= s.W) return 0;
  const FrameSource src = padded_frame(s, p);
  if (src.kind == FrameKind::Zero) return 0;
  return src.kind == FrameKind::Cache ? cache.at(b, c, src.frame, h, w) : x.at(b, c, src.frame, h, w);
}

template <bool CL>
void run_case(const Case& k, bool channels_last, std::mt19937& rng) {
  ConvShape s{k.B, k.C, k.O, k.T, k.H, k.W, k.kt, k.kh, k.kw, k.st, k.sh, k.sw, k.dt, k.dh, k.dw, k.ph, k.pw,
              k.pad, k.cache, 0, 0, 0, 0};
  CHECK(make_conv_shape(s));
  Tensor5 x(s.B, s.C, s.T, s.H, s.W, channels_last), cache(s.B, s.C, s.P, s.H, s.W, channels_last);
  Tensor5 gy(s.B, s.O, s.To, s.Ho, s.Wo, channels_last);
  fill(x.data, rng), fill(cache.data, rng), fill(gy.data, rng);
  std::vector<double> w(s.O * s.C * s.kt * s.kh * s.kw), bias(s.O);
  fill(w, rng), fill(bias, rng);
  auto W = [&](int64_t o, int64_t c, int64_t it, int64_t ih, int64_t iw) -> double& {
    return w[(((o * s.C + c) * s.kt + it) * s.kh + ih) * s.kw + iw];
  };
  // the binding's packings
  std::vector<double> fwd_w, in_w;
  for (int64_t it = 0; it < s.kt; ++it)
    for (int64_t ih = 0; ih < s.kh; ++ih)
      for (int64_t iw = 0; iw < s.kw; ++iw) {
        for (int64_t c = 0; c < s.C; ++c)
          for (int64_t o = 0; o < s.O; ++o) fwd_w.push_back(W(o, c, it, ih, iw));
        for (int64_t o = 0; o < s.O; ++o)
          for (int64_t c = 0; c < s.C; ++c) in_w.push_back(W(o, c, it, ih, iw));
      }

  // naive results
  Tensor5 y_want(s.B, s.O, s.To, s.Ho, s.Wo, channels_last), gxp(s.B, s.C, s.P + s.T, s.H, s.W, false);
  std::vector<double> gw_want(w.size(), 0.0);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t o = 0; o < s.O; ++o)
      for (int64_t t = 0; t < s.To; ++t)
        for (int64_t h = 0; h < s.Ho; ++h)
          for (int64_t v = 0; v < s.Wo; ++v) {
            double acc = bias[o];
            for (int64_t c = 0; c < s.C; ++c)
              for (int64_t it = 0; it < s.kt; ++it)
                for (int64_t ih = 0; ih < s.kh; ++ih)
                  for (int64_t iw = 0; iw < s.kw; ++iw) {
                    const int64_t p = t * s.st + it * s.dt, hi = h * s.sh + ih * s.dh - s.ph,
                                  wi = v * s.sw + iw * s.dw - s.pw;
                    const double xv = padded(s, x, cache, b, c, p, hi, wi);
                    acc += W(o, c, it, ih, iw) * xv;
                    gw_want[(((o * s.C + c) * s.kt + it) * s.kh + ih) * s.kw + iw] += gy.at(b, o, t, h, v) * xv;
                    if (hi >= 0 && hi < s.H && wi >= 0 && wi < s.W)
                      gxp.at(b, c, p, hi, wi) += W(o, c, it, ih, iw) * gy.at(b, o, t, h, v);
                  }
            y_want.at(b, o, t, h, v) = acc;
          }

  CudaConvArgs a{};
  a.dtype = DType::F64;
  a.shape = s;
  a.x = x.view();
  a.cache = k.cache ? cache.view() : View5{nullptr, {0, 0, 0, 0, 0}};
  a.bias = bias.data();
  a.grad_y = gy.view();

  // forward
  Tensor5 y(s.B, s.O, s.To, s.Ho, s.Wo, channels_last);
  a.packed_weight = fwd_w.data();
  a.y = y.mut();
  emulate(ForwardProblem<CL>{a}, s.B * s.To * s.Ho * s.Wo, s.O, split_reduction(s.kt * s.kh * s.kw * s.C, 1));
  double err = 0;
  for (size_t i = 0; i < y.data.size(); ++i) err = std::max(err, std::fabs(y.data[i] - y_want.data[i]));
  CHECK(err < 1e-12);

  // input gradient, past frames included
  Tensor5 gx(s.B, s.C, s.T, s.H, s.W, channels_last), gp(s.B, s.C, s.P, s.H, s.W, channels_last);
  a.packed_weight = in_w.data();
  a.grad_x = gx.mut();
  a.grad_past = s.P > 0 ? gp.mut() : MutView5{nullptr, {0, 0, 0, 0, 0}};
  const int dq[3] = {int(s.dt / s.st), int(s.dh / s.sh), int(s.dw / s.sw)};
  const int dr[3] = {int(s.dt % s.st), int(s.dh % s.sh), int(s.dw % s.sw)};
  emulate(InputGradProblem<CL>{a, 0, {dq[0], dq[1], dq[2]}, {dr[0], dr[1], dr[2]}}, s.B * (s.P + s.T) * s.H * s.W,
          s.C, split_reduction(s.kt * s.kh * s.kw * s.O, 1));
  err = 0;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t p = 0; p < s.P + s.T; ++p)
        for (int64_t h = 0; h < s.H; ++h)
          for (int64_t v = 0; v < s.W; ++v) {
            const double got = p < s.P ? gp.at(b, c, p, h, v) : gx.at(b, c, p - s.P, h, v);
            err = std::max(err, std::fabs(got - gxp.at(b, c, p, h, v)));
          }
  CHECK(err < 1e-12);

  // weight gradient, the position reduction split in 3 (partials summed here as the binding does)
  const int64_t taps = s.kt * s.kh * s.kw, positions = s.B * s.To * s.Ho * s.Wo;
  const Split split = split_reduction(positions, 3);
  std::vector<double> partial(split.count * s.O * taps * s.C, NAN);
  a.grad_weight_partial = partial.data();
  emulate(WeightGradProblem<CL>{a}, s.O, taps * s.C, split);
  err = 0;
  for (int64_t o = 0; o < s.O; ++o)
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t t = 0; t < taps; ++t) {
        double sum = 0;
        for (int64_t z = 0; z < split.count; ++z) sum += partial[(z * s.O + o) * taps * s.C + t * s.C + c];
        err = std::max(err, std::fabs(sum - gw_want[(o * s.C + c) * taps + t]));
      }
  CHECK(err < 1e-10);
  CHECK(split.count == 3 || positions < 3 * BK);
}

// ---- cp.async spans: fp16 bit patterns ------------------------------------------------

using H = Format<DType::F16>;

// Buffers the spans may copy from: a copy's 16 bytes must lie inside one of them.
std::vector<std::pair<const uint16_t*, const uint16_t*>> g_buffers;

// A (B, C, T, H, W) tensor of random nonzero fp16 bit patterns whose first element sits
// `shift` elements past a 16-byte boundary.
struct Bits5 {
  std::vector<uint16_t> buf;
  uint16_t* base;
  int64_t n, stride[5];
  Bits5(int64_t B, int64_t C, int64_t T, int64_t Hh, int64_t W, bool channels_last, int shift, std::mt19937& rng)
      : buf(B * C * T * Hh * W + 16) {
    n = B * C * T * Hh * W;
    base = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 15) & ~uintptr_t(15)) + shift;
    std::uniform_int_distribution<int> u(1, 0xffff);
    for (int64_t i = 0; i < n; ++i) base[i] = uint16_t(u(rng));
    if (channels_last) {
      stride[1] = 1, stride[4] = C, stride[3] = C * W, stride[2] = C * W * Hh, stride[0] = C * W * Hh * T;
    } else {
      stride[4] = 1, stride[3] = W, stride[2] = W * Hh, stride[1] = W * Hh * T, stride[0] = W * Hh * T * C;
    }
    g_buffers.push_back({base, base + n});
  }
  View5 view() const { return {base, {stride[0], stride[1], stride[2], stride[3], stride[4]}}; }
};

// [operand A/B][Fill]: spans copied / zero-filled, element-path elements
struct SpanStats {
  int64_t n[2][3] = {};
  int64_t copies() const { return n[0][2] + n[1][2]; }
};

// The kernel's cp.async staging of one problem on the host (see the file comment).
template <typename Problem>
void check_spans(const Problem& pb, int64_t M, int64_t N, Split split, SpanStats& st) {
  using MapA = TileMap<Problem::kARedFast>;
  using MapB = TileMap<Problem::kBRedFast>;
  using LA = TileLayout<!Problem::kARedFast, BM>;  // the kernel's layouts where kAsync holds
  using LB = TileLayout<!Problem::kBRedFast, BN>;
  int bad = 0;
  for_each_block(pb, M, N, split, [&](int64_t bz, int64_t m0, int64_t n0, int64_t k_begin, int64_t k_end,
                                      BlockStart<Problem>& start) {
        auto& rows = start.rows;
        auto& cols = start.cols;
        auto& ref_a = start.walk_a;
        auto& ref_b = start.walk_b;
        auto walk_a = ref_a;
        auto walk_b = ref_b;
        for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
          // what the element path gathers: want_a[m][k], want_b[k][n]
          std::vector<uint16_t> want_a(BM * BK), want_b(BK * BN);
          for (int tid = 0; tid < kThreads; ++tid) {
            uint16_t a_next[kSlots], b_next[kSlots];
            fetch_tiles<H>(pb, rows[tid].data(), cols[tid].data(), ref_a[tid], ref_b[tid], k_end, a_next, b_next);
            for (int q = 0; q < kSlots; ++q) {
              want_a[MapA::slot_fixed(tid, q) * BK + MapA::slot_red(tid, q)] = a_next[q];
              want_b[MapB::slot_red(tid, q) * BN + MapB::slot_fixed(tid, q)] = b_next[q];
            }
          }
          // the stage as the kernel fills it: cp.async spans + stashed element-path slots
          std::vector<uint16_t> sa(LA::kElems, 0xdead), sb(LB::kElems, 0xdead);
          std::vector<int> wa(LA::kElems, 0), wb(LB::kElems, 0);
          auto sink = [&](bool is_b, int fixed, int red, const SpanCopy& c) {
            const int at = is_b ? LB::at(fixed, red) : LA::at(fixed, red);
            uint16_t* dst = (is_b ? sb.data() : sa.data()) + at;
            int* writes = (is_b ? wb.data() : wa.data()) + at;
            bad += c.fill == Fill::Element || at % kSpan != 0 || at + kSpan > (is_b ? LB::kElems : LA::kElems);
            ++st.n[is_b][int(c.fill)];
            const uint16_t* src = static_cast<const uint16_t*>(c.src);
            if (c.fill == Fill::Copy) {
              bad += (reinterpret_cast<uintptr_t>(src) & 15) != 0;
              bool inside = false;
              for (const auto& b : g_buffers) inside |= src >= b.first && src + kSpan <= b.second;
              if (!inside) {
                ++bad;
                return;
              }
            }
            for (int i = 0; i < kSpan && at + i < (is_b ? LB::kElems : LA::kElems); ++i) {
              dst[i] = c.fill == Fill::Copy ? src[i] : 0;
              ++writes[i];
            }
          };
          for (int tid = 0; tid < kThreads; ++tid) {
            uint16_t a_next[kSlots], b_next[kSlots];
            const unsigned element = fetch_tiles_async<H>(pb, tid, m0, n0, M, N, rows[tid].data(), cols[tid].data(),
                                                          walk_a[tid], walk_b[tid], k_end, a_next, b_next, sink);
            for (int q = 0; q < kSlots; ++q) {
              if (element >> q & 1u) {
                const int at = LA::at(MapA::slot_fixed(tid, q), MapA::slot_red(tid, q));
                sa[at] = a_next[q], ++wa[at], ++st.n[0][0];
              }
              if (element >> (kSlots + q) & 1u) {
                const int at = LB::at(MapB::slot_fixed(tid, q), MapB::slot_red(tid, q));
                sb[at] = b_next[q], ++wb[at], ++st.n[1][0];
              }
            }
            bad += Problem::index(walk_a[tid]) != Problem::index(ref_a[tid]);
            bad += Problem::index(walk_b[tid]) != Problem::index(ref_b[tid]);
          }
          int64_t total = 0;
          for (int f = 0; f < BM; ++f)
            for (int r = 0; r < BK; ++r) {
              bad += wa[LA::at(f, r)] != 1 || sa[LA::at(f, r)] != want_a[f * BK + r];
              bad += wb[LB::at(f, r)] != 1 || sb[LB::at(f, r)] != want_b[r * BN + f];
            }
          for (int w : wa) total += w;
          for (int w : wb) total += w;
          bad += total != BM * BK + BK * BN;  // nothing written into the padding columns
        }
      });
  CHECK(bad == 0);
}

// All three problems of one geometry, cp.async staging checked; per-problem statistics out.
template <bool CL>
void run_span_case(const Case& k, bool channels_last, int shift, std::mt19937& rng, SpanStats (&st)[3]) {
  ConvShape s{k.B, k.C, k.O, k.T, k.H, k.W, k.kt, k.kh, k.kw, k.st, k.sh, k.sw, k.dt, k.dh, k.dw, k.ph, k.pw,
              k.pad, k.cache, 0, 0, 0, 0};
  CHECK(make_conv_shape(s));
  g_buffers.clear();
  Bits5 x(s.B, s.C, s.T, s.H, s.W, channels_last, shift, rng), cache(s.B, s.C, s.P, s.H, s.W, channels_last, shift, rng);
  Bits5 gy(s.B, s.O, s.To, s.Ho, s.Wo, channels_last, shift, rng);
  const int64_t taps = s.kt * s.kh * s.kw;
  Bits5 fwd_w(1, 1, 1, taps * s.C, s.O, false, shift, rng), in_w(1, 1, 1, taps * s.O, s.C, false, shift, rng);
  CudaConvArgs a{};
  a.dtype = DType::F16;
  a.shape = s;
  a.x = x.view();
  a.cache = k.cache ? cache.view() : View5{nullptr, {0, 0, 0, 0, 0}};
  a.grad_y = gy.view();
  a.packed_weight = fwd_w.base;
  check_spans(ForwardProblem<CL>{a}, s.B * s.To * s.Ho * s.Wo, s.O, split_reduction(taps * s.C, 1), st[0]);
  a.packed_weight = in_w.base;
  const int dq[3] = {int(s.dt / s.st), int(s.dh / s.sh), int(s.dw / s.sw)};
  const int dr[3] = {int(s.dt % s.st), int(s.dh % s.sh), int(s.dw % s.sw)};
  check_spans(InputGradProblem<CL>{a, 0, {dq[0], dq[1], dq[2]}, {dr[0], dr[1], dr[2]}}, s.B * (s.P + s.T) * s.H * s.W,
              s.C, split_reduction(taps * s.O, 1), st[1]);
  check_spans(WeightGradProblem<CL>{a}, s.O, taps * s.C, split_reduction(s.B * s.To * s.Ho * s.Wo, 3), st[2]);
}

void span_cases(std::mt19937& rng) {
  // B, C, O, T, H, W, kt, kh, kw, st, sh, sw, dt, dh, dw, ph, pw, pad, cache
  const Case cl = {2, 16, 24, 3, 5, 9, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, TimePad::Zeros, false};       // 8-channel spans
  // w spans: taps iw*4 - 8 give spans wholly in the padding, straddling it, 8 bytes off, aligned
  const Case cf = {1, 8, 70, 4, 3, 16, 2, 3, 5, 1, 1, 1, 1, 1, 4, 1, 8, TimePad::Replicate, false};
  const Case others[] = {
      {1, 24, 16, 2, 4, 24, 2, 3, 1, 1, 1, 1, 1, 1, 1, 1, 0, TimePad::Zeros, true},   // cache frames, aligned rows
      {1, 12, 10, 4, 6, 13, 3, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, TimePad::Zeros, false},  // spans straddle taps / rows
      {2, 3, 8, 2, 5, 16, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, TimePad::Zeros, false},    // C = 3, pointwise, aligned
  };
  const char* names[3] = {"forward", "input_grad", "weight_grad"};
  for (int shift : {0, 1, 3, 8}) {
    // the named cases: which path takes which spans, in each problem
    SpanStats cl_st[3], cf_st[3];
    run_span_case<true>(cl, true, shift, rng, cl_st);
    run_span_case<false>(cf, false, shift, rng, cf_st);
    for (int p = 0; p < 3; ++p)
      for (const auto* st : {&cl_st[p], &cf_st[p]})
        std::printf("spans shift %d %-11s %s: A copy %lld zero %lld element %lld | B copy %lld zero %lld element %lld\n",
                    shift, names[p], st == &cl_st[p] ? "channels-last " : "channels-first",
                    (long long)st->n[0][2], (long long)st->n[0][1], (long long)st->n[0][0], (long long)st->n[1][2],
                    (long long)st->n[1][1], (long long)st->n[1][0]);
    if (shift % kSpan == 0) {
      // 16-byte aligned: every operand copies spans; padding and tile ends zero-fill
      for (int p = 0; p < 3; ++p)
        for (const SpanStats* st : {&cl_st[p], &cf_st[p]}) CHECK(st->n[0][2] > 0 && st->n[1][2] > 0);
      CHECK(cl_st[0].n[0][1] > 0 && cl_st[0].n[1][1] > 0);  // padded taps (A), columns past O (B)
      CHECK(cl_st[1].n[0][1] > 0 && cl_st[2].n[1][1] > 0);
      CHECK(cf_st[0].n[0][1] > 0 && cf_st[1].n[0][1] > 0 && cf_st[2].n[1][1] > 0);
      CHECK(cf_st[0].n[0][0] > 0 && cf_st[2].n[1][0] > 0);  // spans straddling the border
    } else {
      // misaligned: no copies, the element path and zero fills only
      for (int p = 0; p < 3; ++p) CHECK(cl_st[p].copies() == 0 && cf_st[p].copies() == 0);
      CHECK(cl_st[0].n[0][1] > 0 && cf_st[0].n[0][1] > 0);
    }
    // both mappings on both layouts, and the other geometries
    for (bool channels_last : {false, true}) {
      SpanStats st[3];
      run_span_case<false>(cl, channels_last, shift, rng, st);
      run_span_case<true>(cf, channels_last, shift, rng, st);
      for (const Case& k : others) {
        run_span_case<false>(k, channels_last, shift, rng, st);
        run_span_case<true>(k, channels_last, shift, rng, st);
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  const Case cases[] = {
      // B, C, O, T, H, W, kt, kh, kw, st, sh, sw, dt, dh, dw, ph, pw, pad, cache
      {2, 5, 70, 5, 9, 11, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, TimePad::Zeros, false},     // O crosses a tile
      {1, 19, 6, 4, 8, 7, 3, 3, 3, 2, 2, 2, 1, 1, 1, 1, 1, TimePad::Replicate, false},  // stride 2
      {1, 3, 4, 6, 9, 10, 3, 3, 3, 2, 2, 3, 3, 2, 2, 2, 1, TimePad::Zeros, true},       // dilation > stride
      {2, 17, 9, 3, 5, 6, 2, 1, 3, 1, 1, 2, 2, 1, 3, 0, 3, TimePad::Zeros, true},       // cache, odd taps
      {1, 1, 1, 2, 70, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, TimePad::Zeros, false},      // 1x1x1, C = O = 1
  };
  for (const Case& k : cases)
    for (bool channels_last : {false, true}) {
      run_case<false>(k, channels_last, rng);
      run_case<true>(k, channels_last, rng);
    }
  span_cases(rng);
  return finish("test_causal_conv3d_cuda_host");
}
