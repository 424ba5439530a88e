// C++ unit tests of csrc/core/causal_conv3d (no torch): geometry, the padded-frame map,
// and the CPU forward / input_grad / weight_grad kernels (portable GEMM) against a
// direct loop over an explicitly padded copy, in float64, float32 and bfloat16, for
// channels-first and channels-last strides, with and without a cache.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "causal_conv3d.h"
#include "check.h"

using namespace pyratok;


struct Geometry {
  int64_t B, C, O, T, H, W, kt, kh, kw, st, sh, sw, dt, dh, dw, ph, pw;
  TimePad mode;
  bool cache;
};

static ConvShape shape_of(const Geometry& g) {
  ConvShape s{g.B, g.C, g.O, g.T, g.H, g.W, g.kt, g.kh, g.kw, g.st, g.sh, g.sw, g.dt, g.dh, g.dw, g.ph, g.pw,
              g.mode, g.cache, 0, 0, 0, 0};
  make_conv_shape(s);
  return s;
}

// Dense 5-D tensor (B, C, T, H, W) stored channels-first or channels-last.
struct Dense {
  int64_t n[5];
  bool channels_last;
  std::vector<double> v;
  Dense(int64_t b, int64_t c, int64_t t, int64_t h, int64_t w, bool cl) : n{b, c, t, h, w}, channels_last(cl) {
    v.assign(b * c * t * h * w, 0.0);
  }
  void strides(int64_t* s) const {
    if (channels_last) {
      s[1] = 1, s[4] = n[1], s[3] = n[1] * n[4], s[2] = n[1] * n[4] * n[3], s[0] = s[2] * n[2];
    } else {
      s[4] = 1, s[3] = n[4], s[2] = n[4] * n[3], s[1] = s[2] * n[2], s[0] = s[1] * n[1];
    }
  }
  int64_t at(int64_t b, int64_t c, int64_t t, int64_t h, int64_t w) const {
    int64_t s[5];
    strides(s);
    return b * s[0] + c * s[1] + t * s[2] + h * s[3] + w * s[4];
  }
  double& operator()(int64_t b, int64_t c, int64_t t, int64_t h, int64_t w) { return v[at(b, c, t, h, w)]; }
  double operator()(int64_t b, int64_t c, int64_t t, int64_t h, int64_t w) const { return v[at(b, c, t, h, w)]; }
};

static void fill_random(Dense& d, std::mt19937& rng) {
  std::normal_distribution<double> nd;
  for (double& x : d.v) x = nd(rng);
}

// The padded input value at padded frame p (the reference's explicit [past, x]).
static double padded(const ConvShape& s, const Dense& x, const Dense* cache, int64_t b, int64_t c, int64_t p,
                     int64_t hi, int64_t wi) {
  if (hi < 0 || hi >= s.H || wi < 0 || wi >= s.W) return 0.0;
  if (p >= s.P) return x(b, c, p - s.P, hi, wi);
  if (cache) return (*cache)(b, c, p, hi, wi);
  return s.time_pad == TimePad::Replicate ? x(b, c, 0, hi, wi) : 0.0;
}

static void direct_forward(const ConvShape& s, const Dense& x, const Dense* cache, const Dense& w,
                           const std::vector<double>& bias, Dense& y) {
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t o = 0; o < s.O; ++o)
      for (int64_t t = 0; t < s.To; ++t)
        for (int64_t h = 0; h < s.Ho; ++h)
          for (int64_t q = 0; q < s.Wo; ++q) {
            double acc = bias[o];
            for (int64_t c = 0; c < s.C; ++c)
              for (int64_t it = 0; it < s.kt; ++it)
                for (int64_t ih = 0; ih < s.kh; ++ih)
                  for (int64_t iw = 0; iw < s.kw; ++iw)
                    acc += w(o, c, it, ih, iw) * padded(s, x, cache, b, c, t * s.st + it * s.dt,
                                                        h * s.sh + ih * s.dh - s.ph, q * s.sw + iw * s.dw - s.pw);
            y(b, o, t, h, q) = acc;
          }
}

// Gradients by the chain rule over the same loops: scatter dy into the padded input.
static void direct_backward(const ConvShape& s, const Dense& x, const Dense* cache, const Dense& w, const Dense& dy,
                            Dense& dxp /* (B, C, P+T, H, W) */, Dense& dw) {
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t o = 0; o < s.O; ++o)
      for (int64_t t = 0; t < s.To; ++t)
        for (int64_t h = 0; h < s.Ho; ++h)
          for (int64_t q = 0; q < s.Wo; ++q)
            for (int64_t c = 0; c < s.C; ++c)
              for (int64_t it = 0; it < s.kt; ++it)
                for (int64_t ih = 0; ih < s.kh; ++ih)
                  for (int64_t iw = 0; iw < s.kw; ++iw) {
                    const int64_t p = t * s.st + it * s.dt, hi = h * s.sh + ih * s.dh - s.ph,
                                  wi = q * s.sw + iw * s.dw - s.pw;
                    const double g = dy(b, o, t, h, q);
                    dw(o, c, it, ih, iw) += g * padded(s, x, cache, b, c, p, hi, wi);
                    if (hi >= 0 && hi < s.H && wi >= 0 && wi < s.W) dxp(b, c, p, hi, wi) += g * w(o, c, it, ih, iw);
                  }
}

template <DType D>
struct Buffer {
  using Fm = Format<D>;
  std::vector<typename Fm::bits> bits;
  explicit Buffer(const Dense& d) : bits(d.v.size()) {
    for (size_t i = 0; i < d.v.size(); ++i) bits[i] = Fm::store((typename Fm::work)d.v[i]);
  }
  explicit Buffer(size_t n) : bits(n, 0) {}
  double get(size_t i) const { return (double)Fm::load(bits[i]); }
};

static View5 view(const Dense& d, const void* data) {
  View5 v{data, {0, 0, 0, 0, 0}};
  d.strides(v.stride);
  return v;
}

static MutView5 mut_view(const Dense& d, void* data) {
  MutView5 v{data, {0, 0, 0, 0, 0}};
  d.strides(v.stride);
  return v;
}

static double max_abs_diff(const Dense& want, const std::vector<double>& got) {
  double e = 0;
  for (size_t i = 0; i < want.v.size(); ++i) e = std::fmax(e, std::fabs(want.v[i] - got[i]));
  return e;
}

// Rounds every value through format D (so the direct loop sees the kernel's inputs).
template <DType D>
static void round_to(Dense& d) {
  for (double& v : d.v) v = (double)Format<D>::load(Format<D>::store((typename Format<D>::work)v));
}

template <DType D>
static void check_geometry(const Geometry& g, bool channels_last, double tol, std::mt19937& rng) {
  using Acc = typename Format<D>::work;
  const ConvShape s = shape_of(g);
  Dense x(s.B, s.C, s.T, s.H, s.W, channels_last), w(s.O, s.C, s.kt, s.kh, s.kw, false);
  Dense cache(s.B, s.C, s.P, s.H, s.W, !channels_last);  // the other layout: strides are per tensor
  fill_random(x, rng), fill_random(w, rng), fill_random(cache, rng);
  round_to<D>(x), round_to<D>(w), round_to<D>(cache);
  std::vector<double> bias(s.O);
  for (int64_t o = 0; o < s.O; ++o) bias[o] = 0.25 * (double)o - 0.5;

  Dense want(s.B, s.O, s.To, s.Ho, s.Wo, channels_last);
  direct_forward(s, x, g.cache ? &cache : nullptr, w, bias, want);

  Buffer<D> xb(x), wb(w), cb(cache), yb(want.v.size());
  std::vector<Acc> packed(packed_weight_elements(s)), bias_acc(bias.begin(), bias.end());
  const GemmKernels gemm = portable_gemm_kernels();
  const bool vnni = forward_uses_bf16_vnni(D, s, gemm);  // even C in bfloat16: bf16 operands
  CHECK(vnni == (D == DType::BF16 && s.C % 2 == 0));
  pack_weight_forward(D, s, view(w, wb.bits.data()), packed.data(), vnni);
  const ForwardArgs fa{D, s, view(x, xb.bits.data()), view(cache, g.cache ? cb.bits.data() : nullptr),
                       packed.data(), bias_acc.data(), mut_view(want, yb.bits.data())};
  const int64_t tiles = forward_tiles(s);
  causal_conv3d_forward_cpu(fa, gemm, 0, tiles / 2);  // two ranges, as two threads would
  causal_conv3d_forward_cpu(fa, gemm, tiles / 2, tiles);
  std::vector<double> got(want.v.size());
  for (size_t i = 0; i < got.size(); ++i) got[i] = yb.get(i);
  const double fwd_err = max_abs_diff(want, got);
  CHECK(fwd_err <= tol);

  // the Winograd F(2x2, 3x3) forward where the geometry allows it (forced: any dtype)
  CHECK(forward_uses_winograd(D, s, ConvAlgo::Winograd) == winograd_geometry(s));
  CHECK(!forward_uses_winograd(D, s, ConvAlgo::Direct));
  if (winograd_geometry(s)) {
    std::vector<Acc> wino(winograd_weight_elements(s));
    pack_weight_winograd(D, s, view(w, wb.bits.data()), wino.data());
    Buffer<D> yw(want.v.size());
    const ForwardArgs wa{D, s, view(x, xb.bits.data()), view(cache, g.cache ? cb.bits.data() : nullptr),
                         wino.data(), bias_acc.data(), mut_view(want, yw.bits.data())};
    const int64_t tasks = winograd_forward_tiles(s);
    causal_conv3d_forward_winograd_cpu(wa, gemm, 0, tasks / 2);
    causal_conv3d_forward_winograd_cpu(wa, gemm, tasks / 2, tasks);
    for (size_t i = 0; i < got.size(); ++i) got[i] = yw.get(i);
    CHECK(max_abs_diff(want, got) <= tol);
  }

  // backward
  Dense dy(s.B, s.O, s.To, s.Ho, s.Wo, channels_last);
  fill_random(dy, rng);
  round_to<D>(dy);
  Dense dxp(s.B, s.C, s.P + s.T, s.H, s.W, false), dw(s.O, s.C, s.kt, s.kh, s.kw, false);
  direct_backward(s, x, g.cache ? &cache : nullptr, w, dy, dxp, dw);

  Buffer<D> dyb(dy);
  Dense gx_layout(s.B, s.C, s.T, s.H, s.W, channels_last), gp_layout(s.B, s.C, s.P, s.H, s.W, channels_last);
  Buffer<D> gxb(gx_layout.v.size()), gpb(gp_layout.v.size());
  std::vector<Acc> packed_t(packed_weight_elements(s));
  pack_weight_input_grad(D, s, view(w, wb.bits.data()), packed_t.data());
  const InputGradArgs ia{D, s, view(dy, dyb.bits.data()), packed_t.data(), mut_view(gx_layout, gxb.bits.data()),
                         mut_view(gp_layout, gpb.bits.data())};
  causal_conv3d_input_grad_cpu(ia, gemm, 0, input_grad_rows(s));
  double dx_err = 0;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t c = 0; c < s.C; ++c)
      for (int64_t p = 0; p < s.P + s.T; ++p)
        for (int64_t h = 0; h < s.H; ++h)
          for (int64_t q = 0; q < s.W; ++q) {
            const double got_v = p < s.P ? gpb.get(gp_layout.at(b, c, p, h, q)) : gxb.get(gx_layout.at(b, c, p - s.P, h, q));
            dx_err = std::fmax(dx_err, std::fabs(got_v - dxp(b, c, p, h, q)));
          }
  CHECK(dx_err <= tol);

  std::vector<Acc> accum(weight_grad_elements(s), Acc(0));
  const WeightGradArgs wa{D, s, view(x, xb.bits.data()), view(cache, g.cache ? cb.bits.data() : nullptr),
                          view(dy, dyb.bits.data())};
  const int64_t rows = weight_grad_rows(s);
  causal_conv3d_weight_grad_cpu(wa, gemm, 0, rows / 3, accum.data());
  causal_conv3d_weight_grad_cpu(wa, gemm, rows / 3, rows, accum.data());
  Buffer<D> dwb(dw.v.size());
  store_weight_grad(D, s, accum.data(), mut_view(dw, dwb.bits.data()));
  std::vector<double> got_dw(dw.v.size());
  for (size_t i = 0; i < got_dw.size(); ++i) got_dw[i] = dwb.get(i);
  const double dw_err = max_abs_diff(dw, got_dw);
  CHECK(dw_err <= tol * 4);
  if (fwd_err > tol || dx_err > tol || dw_err > tol * 4)
    std::fprintf(stderr, "  geometry k=(%lld,%lld,%lld) s=(%lld,%lld,%lld) d=(%lld,%lld,%lld) %s: "
                 "errors %g %g %g\n", (long long)g.kt, (long long)g.kh, (long long)g.kw, (long long)g.st,
                 (long long)g.sh, (long long)g.sw, (long long)g.dt, (long long)g.dh, (long long)g.dw,
                 dtype_name(D), fwd_err, dx_err, dw_err);
}

static const Geometry kGeometries[] = {
    {2, 3, 4, 4, 5, 7, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, TimePad::Zeros, false},
    {2, 3, 4, 4, 5, 7, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, TimePad::Replicate, true},
    {1, 5, 3, 6, 6, 9, 3, 1, 1, 2, 1, 1, 1, 1, 1, 0, 0, TimePad::Zeros, true},       // Wan time downsampling
    {1, 2, 3, 2, 7, 6, 4, 2, 5, 2, 2, 1, 2, 1, 2, 1, 2, TimePad::Replicate, false},
    {2, 4, 2, 1, 4, 4, 5, 3, 1, 1, 1, 2, 1, 2, 1, 2, 0, TimePad::Replicate, true},   // chunk shorter than P
    {1, 3, 2, 3, 3, 5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, TimePad::Zeros, false},      // P = 0
    {2, 6, 5, 4, 6, 5, 2, 3, 3, 2, 1, 1, 2, 1, 1, 0, 2, TimePad::Zeros, true},       // Winograd: odd Wo, pad 0/2
    {1, 4, 3, 3, 1, 4, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, TimePad::Replicate, false},  // Winograd: H = 1
};

static void test_shapes() {
  ConvShape s = shape_of(kGeometries[0]);
  CHECK(s.P == 2 && s.To == 4 && s.Ho == 5 && s.Wo == 7);
  s = shape_of(kGeometries[2]);
  CHECK(s.P == 1 && s.To == 3);
  Geometry bad = kGeometries[2];
  bad.T = 5;  // not a multiple of the temporal stride
  ConvShape b = {bad.B, bad.C, bad.O, bad.T, bad.H, bad.W, bad.kt, bad.kh, bad.kw, bad.st, bad.sh, bad.sw, bad.dt,
                 bad.dh, bad.dw, bad.ph, bad.pw, bad.mode, bad.cache, 0, 0, 0, 0};
  CHECK(!make_conv_shape(b));
  b.T = 6, b.kt = 1;  // P = 1 - 2 < 0
  CHECK(!make_conv_shape(b));
  // zero-sized dimensions: an empty reduction or output axis is invalid (it divided by zero
  // in the CUDA launcher's split of the reduction), an empty batch is not
  const ConvShape good = shape_of(kGeometries[0]);
  for (int64_t ConvShape::*field : {&ConvShape::C, &ConvShape::O, &ConvShape::H, &ConvShape::W, &ConvShape::kt,
                                   &ConvShape::kh, &ConvShape::kw}) {
    ConvShape z = good;
    z.*field = 0;
    CHECK(!make_conv_shape(z));
  }
  ConvShape empty_batch = good;
  empty_batch.B = 0;
  CHECK(make_conv_shape(empty_batch) && empty_batch.To == good.To && empty_batch.Ho == good.Ho);
}

static void test_padded_frame() {
  ConvShape s = shape_of(kGeometries[0]);  // P = 2, zeros, no cache
  CHECK(padded_frame(s, 0).kind == FrameKind::Zero && padded_frame(s, 1).kind == FrameKind::Zero);
  CHECK(padded_frame(s, 2).kind == FrameKind::Input && padded_frame(s, 2).frame == 0);
  s.time_pad = TimePad::Replicate;
  CHECK(padded_frame(s, 1).kind == FrameKind::Input && padded_frame(s, 1).frame == 0);
  s.has_cache = true;
  CHECK(padded_frame(s, 1).kind == FrameKind::Cache && padded_frame(s, 1).frame == 1);
  CHECK(padded_frame(s, 5).kind == FrameKind::Input && padded_frame(s, 5).frame == 3);
}

int main() {
  test_shapes();
  test_padded_frame();
  std::mt19937 rng(7);
  for (const Geometry& g : kGeometries)
    for (bool cl : {false, true}) {
      check_geometry<DType::F64>(g, cl, 1e-11, rng);
      check_geometry<DType::F32>(g, cl, 1e-4, rng);
      check_geometry<DType::BF16>(g, cl, 0.25, rng);  // output rounding to bf16: |y| < 16 -> 2^-4
    }
  return finish("test_causal_conv3d");
}
