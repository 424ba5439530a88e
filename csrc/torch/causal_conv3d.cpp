// torch bindings for causal 3D convolution: the private kernel ops
// pyratok::_causal_conv3d(_backward).out, each one function over a device policy (CpuDevice /
// CudaDevice), writing into the outputs allocated in pyratok/ops/causal_conv3d.py (which
// decides their shapes and layouts; the kernels follow the strides they are given).
// User-facing argument checks live there too; the checks here keep a misuse from reaching
// the kernels.
//
// On the CPU the GEMM hook of the core is oneDNN's brgemm ukernel (exported by ATen as
// at::native::cpublas::brgemm; it falls back to MKL sgemm when oneDNN is disabled), in
// fp32, and for bfloat16 forwards with bf16 operands (VNNI) where the CPU has the
// instructions; float64 uses the core's portable GEMM.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <array>
#include <limits>
#include <optional>

#include "../core/causal_conv3d.h"
#include "common.h"

namespace pyratok {
namespace {

void brgemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

void brgemm_bf16_vnni(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                      int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, reinterpret_cast<const at::BFloat16*>(A),
                              reinterpret_cast<const at::BFloat16*>(B), C, /*is_vnni=*/true);
}

// oneDNN's bf16 ukernel needs an AVX-512 (or AMX) CPU; ATen raises where it has none.
bool bf16_vnni_available() {
  static const bool available = [] {
    try {
      const uint16_t a[2] = {0, 0}, b[32] = {};
      float c[16];
      brgemm_bf16_vnni(1, 16, 2, a, 2, b, 16, c, 16, false);
      at::native::cpublas::brgemm_release(true);
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return available;
}

GemmKernels cpu_gemm() {
  return {&brgemm_f32, &gemm_portable<double>, bf16_vnni_available() ? &brgemm_bf16_vnni : nullptr};
}

View5 view5(const at::Tensor& t) {
  View5 v{t.defined() ? t.data_ptr() : nullptr, {0, 0, 0, 0, 0}};
  if (t.defined())
    for (int d = 0; d < 5; ++d) v.stride[d] = t.stride(d);
  return v;
}

MutView5 mut_view5(const at::Tensor& t) {
  MutView5 v{t.defined() && t.numel() ? t.data_ptr() : nullptr, {0, 0, 0, 0, 0}};
  if (t.defined())
    for (int d = 0; d < 5; ++d) v.stride[d] = t.stride(d);
  return v;
}

at::ScalarType compute_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

ConvShape conv_shape(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& cache,
                     at::IntArrayRef stride, at::IntArrayRef dilation, at::IntArrayRef padding, bool replicate) {
  TORCH_CHECK_VALUE(x.dim() == 5, "x: expected a 5-D tensor (B, C, T, H, W), got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(weight.dim() == 5, "weight: expected (O, C, kt, kh, kw), got ", weight.dim(), "-D");
  TORCH_CHECK_VALUE(stride.size() == 3 && dilation.size() == 3 && padding.size() == 2,
                    "stride and dilation need 3 values, padding 2");
  core_dtype(x, "x");
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "weight: dtype ", weight.scalar_type(),
                    " differs from x's ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), "x: has ", x.size(1), " channels but weight expects ",
                    weight.size(1));
  // zero-sized dimensions: an empty batch is fine (empty output); an empty reduction or output
  // channel axis, or an empty frame, is rejected here for every backend (as in pyratok.ops)
  TORCH_CHECK_VALUE(x.size(1) > 0 && weight.size(0) > 0, "causal_conv3d: x has ", x.size(1),
                    " channels and weight ", weight.size(0), " output channels; both must be >= 1");
  TORCH_CHECK_VALUE(x.size(3) > 0 && x.size(4) > 0 && weight.size(2) > 0 && weight.size(3) > 0 && weight.size(4) > 0,
                    "causal_conv3d: empty frame or kernel: x ", x.sizes(), ", weight ", weight.sizes());
  ConvShape s{x.size(0), x.size(1), weight.size(0), x.size(2), x.size(3), x.size(4),
              weight.size(2), weight.size(3), weight.size(4),
              stride[0], stride[1], stride[2], dilation[0], dilation[1], dilation[2], padding[0], padding[1],
              replicate ? TimePad::Replicate : TimePad::Zeros, cache.has_value(),
              0, 0, 0, 0};
  TORCH_CHECK_VALUE(make_conv_shape(s), "causal_conv3d: invalid geometry for x ", x.sizes(), ", weight ",
                    weight.sizes(), ", stride ", stride, ", dilation ", dilation, ", padding ", padding);
  if (cache) {
    const std::array<int64_t, 5> want{s.B, s.C, s.P, s.H, s.W};
    TORCH_CHECK_VALUE(cache->dim() == 5 && std::equal(want.begin(), want.end(), cache->sizes().begin()),
                      "cache: shape ", cache->sizes(), " does not fit this layer and input; expected ",
                      at::IntArrayRef(want.data(), 5));
    TORCH_CHECK_VALUE(cache->scalar_type() == x.scalar_type(), "cache: dtype ", cache->scalar_type(),
                      " differs from x's ", x.scalar_type());
  }
  return s;
}

void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t O) {
  if (!bias) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == O, "bias: expected shape (", O, "), got ", bias->sizes());
  TORCH_CHECK_VALUE(bias->scalar_type() == x.scalar_type(), "bias: dtype ", bias->scalar_type(),
                    " differs from x's ", x.scalar_type());
}

void check_grad_y(const at::Tensor& grad_y, const ConvShape& s) {
  const std::array<int64_t, 5> y_shape{s.B, s.O, s.To, s.Ho, s.Wo};
  TORCH_CHECK_VALUE(grad_y.dim() == 5 && std::equal(y_shape.begin(), y_shape.end(), grad_y.sizes().begin()),
                    "grad_y: shape ", grad_y.sizes(), ", expected ", at::IntArrayRef(y_shape.data(), 5));
}

constexpr View5 kNoView{nullptr, {0, 0, 0, 0, 0}};
constexpr MutView5 kNoMutView{nullptr, {0, 0, 0, 0, 0}};

// ---- device policies: the kernel launches and their workspaces ---------------------------

struct CpuDevice {
  using Guard = NoGuard;

  static void check_extents(const ConvShape&, const at::Tensor&) {}

  static void forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& cache, ConvAlgo algo,
                      at::Tensor& y) {
    const DType dt = core_dtype(x, "x");
    const GemmKernels gemm = cpu_gemm();
    const bool winograd = forward_uses_winograd(dt, s, algo);
    const bool vnni = !winograd && forward_uses_bf16_vnni(dt, s, gemm);
    auto packed = at::empty({winograd ? winograd_weight_elements(s) : packed_weight_elements(s)},
                            x.options().dtype(vnni ? at::kBFloat16 : compute_type(x)));
    if (winograd)
      pack_weight_winograd(dt, s, view5(weight), packed.data_ptr());
    else
      pack_weight_forward(dt, s, view5(weight), packed.data_ptr(), vnni);
    at::Tensor bias_acc = bias ? bias->to(compute_type(x)).contiguous() : at::Tensor();
    const ForwardArgs args{dt, s, view5(x), cache ? view5(*cache) : kNoView,
                           packed.data_ptr(), bias ? bias_acc.data_ptr() : nullptr, mut_view5(y)};
    at::parallel_for(0, winograd ? winograd_forward_tiles(s) : forward_tiles(s), 1, [&](int64_t begin, int64_t end) {
      if (winograd)
        causal_conv3d_forward_winograd_cpu(args, gemm, begin, end);
      else
        causal_conv3d_forward_cpu(args, gemm, begin, end);
      at::native::cpublas::brgemm_release(vnni);
    });
  }

  static at::Tensor staged_grad_y(const at::Tensor& grad_y, const at::Tensor& x) { return grad_y.to(x.scalar_type()); }

  // grad_x and grad_past (the gradient of the P past frames: cache or replicated frame 0)
  static void input_grad(const ConvShape& s, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>&, const at::Tensor& grad_y, MutView5 grad_x,
                         MutView5 grad_past) {
    const DType dt = core_dtype(x, "x");
    auto packed = at::empty({packed_weight_elements(s)}, x.options().dtype(compute_type(x)));
    pack_weight_input_grad(dt, s, view5(weight), packed.data_ptr());
    const InputGradArgs args{dt, s, view5(grad_y), packed.data_ptr(), grad_x, grad_past};
    const GemmKernels gemm = cpu_gemm();
    at::parallel_for(0, input_grad_rows(s), 1, [&](int64_t begin, int64_t end) {
      causal_conv3d_input_grad_cpu(args, gemm, begin, end);
      at::native::cpublas::brgemm_release(false);
    });
  }

  static void weight_grad(const ConvShape& s, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& cache, const at::Tensor& grad_y, at::Tensor& grad_weight) {
    // one accumulator per chunk of rows (not per thread id, which nesting can repeat)
    const DType dt = core_dtype(x, "x");
    const GemmKernels gemm = cpu_gemm();
    const int64_t rows = weight_grad_rows(s);
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
    const int64_t per_chunk = (rows + chunks - 1) / chunks;
    auto accum = at::zeros({chunks, weight_grad_elements(s)}, x.options().dtype(compute_type(x)));
    const WeightGradArgs args{dt, s, view5(x), cache ? view5(*cache) : kNoView, view5(grad_y)};
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c)
        causal_conv3d_weight_grad_cpu(args, gemm, c * per_chunk, std::min(rows, (c + 1) * per_chunk),
                                      accum[c].data_ptr());
      at::native::cpublas::brgemm_release(false);
    });
    const at::Tensor total = accum.sum(0);
    store_weight_grad(dt, s, total.data_ptr(), mut_view5(grad_weight));
  }
};

#ifdef PYRATOK_WITH_CUDA
CudaConvArgs cuda_args(const at::Tensor& x, const std::optional<at::Tensor>& cache, const ConvShape& s) {
  CudaConvArgs a{};
  a.dtype = core_dtype(x, "x");
  a.shape = s;
  a.x = view5(x);
  a.cache = cache ? view5(*cache) : kNoView;
  return a;
}

struct CudaDevice {
  using Guard = DeviceGuard;

  // The kernels walk coordinates in int32 (offsets stay int64).
  static void check_extents(const ConvShape& s, const at::Tensor& weight) {
    constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
    for (int64_t v : {s.B, s.C, s.O, s.P + s.T, s.H + 2 * s.ph, s.W + 2 * s.pw})
      TORCH_CHECK_VALUE(v <= kMax, "causal_conv3d (cuda): every extent must be < 2^31, got x/weight/padding ",
                        "making ", v, " (weight ", weight.sizes(), ")");
  }

  // One algorithm (the implicit GEMM): `algo` chooses among the CPU's.
  static void forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& cache, ConvAlgo,
                      at::Tensor& y) {
    at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
    // (kt, kh, kw, C, O): the B operand's rows are contiguous runs of output channels
    const at::Tensor packed = weight.permute({2, 3, 4, 1, 0}).contiguous();
    CudaConvArgs a = cuda_args(x, cache, s);
    a.packed_weight = packed.data_ptr();
    a.bias = bias ? bias_c.data_ptr() : nullptr;
    a.y = mut_view5(y);
    causal_conv3d_forward_cuda(a, cuda_stream(x));
  }

  // grad_y in x's layout, so that the gathers and the stores run along the same axis (a
  // workspace: the outputs' layouts are the ones they were allocated with)
  static at::Tensor staged_grad_y(const at::Tensor& grad_y, const at::Tensor& x) {
    const bool cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
    return grad_y.to(x.scalar_type()).contiguous(cl ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous);
  }

  static void input_grad(const ConvShape& s, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& cache, const at::Tensor& grad_y, MutView5 grad_x,
                         MutView5 grad_past) {
    CudaConvArgs a = cuda_args(x, cache, s);
    a.grad_y = view5(grad_y);
    a.grad_x = grad_x;
    a.grad_past = grad_past;
    // (kt, kh, kw, O, C)
    const at::Tensor packed = weight.permute({2, 3, 4, 0, 1}).contiguous();
    a.packed_weight = packed.data_ptr();
    causal_conv3d_input_grad_cuda(a, cuda_stream(x));
  }

  static void weight_grad(const ConvShape& s, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& cache, const at::Tensor& grad_y, at::Tensor& grad_weight) {
    CudaConvArgs a = cuda_args(x, cache, s);
    a.grad_y = view5(grad_y);
    // one partial per split of the position reduction, summed in a fixed order: the same
    // bits on every run (torch.use_deterministic_algorithms needs nothing more)
    const int64_t taps = s.kt * s.kh * s.kw;
    at::Tensor partial = at::empty({causal_conv3d_weight_grad_splits(s), s.O, taps * s.C},
                                   weight.options().dtype(compute_type(x)));
    a.grad_weight_partial = partial.data_ptr();
    causal_conv3d_weight_grad_cuda(a, cuda_stream(x));
    // (O, kt, kh, kw, C) -> (O, C, kt, kh, kw)
    grad_weight.copy_(partial.sum(0).view({s.O, s.kt, s.kh, s.kw, s.C}).permute({0, 4, 1, 2, 3}));
  }
};
#endif

// ---- the ops: one function each, over the device policy D ------------------------------

// algorithm: the CPU forward's (pyratok.ops._checks.ConvAlgorithm: 0 auto, 1 direct, 2 Winograd).
template <typename D>
void causal_conv3d_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& cache, at::IntArrayRef stride, at::IntArrayRef dilation,
                      at::IntArrayRef padding, bool replicate, int64_t algorithm, at::Tensor& y) {
  const typename D::Guard guard(x);
  TORCH_CHECK_VALUE(algorithm >= 0 && algorithm <= 2, "algorithm: expected 0 (auto), 1 (direct) or 2 (winograd), got ",
                    algorithm);
  const ConvShape s = conv_shape(x, weight, cache, stride, dilation, padding, replicate);
  check_bias(bias, x, s.O);
  D::check_extents(s, weight);
  check_out_shape(y, "y", x, {s.B, s.O, s.To, s.Ho, s.Wo}, x.scalar_type());
  D::forward(s, x, weight, bias, cache, ConvAlgo(algorithm), y);
}

// output_mask: (grad_x, grad_past, grad_weight, grad_bias); the outputs not asked for are
// empty tensors and stay untouched.  grad_past is the gradient of the P past frames (cache or
// replicated frame 0); routing it is the caller's business.
template <typename D>
void causal_conv3d_backward_op(const at::Tensor& grad_y_in, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& cache, at::IntArrayRef stride,
                               at::IntArrayRef dilation, at::IntArrayRef padding, bool replicate,
                               std::array<bool, 4> output_mask, at::Tensor& grad_x, at::Tensor& grad_past,
                               at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const typename D::Guard guard(x);
  const ConvShape s = conv_shape(x, weight, cache, stride, dilation, padding, replicate);
  check_grad_y(grad_y_in, s);
  D::check_extents(s, weight);
  if (output_mask[0]) check_out_shape(grad_x, "grad_x", x, x.sizes(), x.scalar_type());
  if (output_mask[1]) check_out_shape(grad_past, "grad_past", x, {s.B, s.C, s.P, s.H, s.W}, x.scalar_type());
  if (output_mask[2]) check_out_shape(grad_weight, "grad_weight", weight, weight.sizes(), weight.scalar_type());
  if (output_mask[3]) check_out(grad_bias, "grad_bias", x, s.O, x.scalar_type());
  const at::Tensor grad_y = D::staged_grad_y(grad_y_in, x);
  if (output_mask[0] || (output_mask[1] && s.P > 0))
    D::input_grad(s, x, weight, cache, grad_y, output_mask[0] ? mut_view5(grad_x) : kNoMutView,
                  output_mask[1] ? mut_view5(grad_past) : kNoMutView);
  if (output_mask[2]) D::weight_grad(s, x, weight, cache, grad_y, grad_weight);
  if (output_mask[3]) grad_bias.copy_(at::sum(grad_y, {0, 2, 3, 4}, false, compute_type(grad_y)));
}

}  // namespace

// Each schema is the allocate signature in pyratok/ops/causal_conv3d.py followed by the outputs.
TORCH_LIBRARY_FRAGMENT(pyratok, m) {
  m.def("_causal_conv3d.out(Tensor x, Tensor weight, Tensor? bias, Tensor? cache, int[3] stride, int[3] dilation, "
        "int[2] padding, bool replicate, int algorithm, Tensor(a!) y) -> ()");
  m.def("_causal_conv3d_backward.out(Tensor grad_y, Tensor x, Tensor weight, Tensor? cache, int[3] stride, "
        "int[3] dilation, int[2] padding, bool replicate, bool[4] output_mask, Tensor(a!) grad_x, "
        "Tensor(b!) grad_past, Tensor(c!) grad_weight, Tensor(d!) grad_bias) -> ()");
}

TORCH_LIBRARY_IMPL(pyratok, CPU, m) {
  m.impl("_causal_conv3d.out", &causal_conv3d_op<CpuDevice>);
  m.impl("_causal_conv3d_backward.out", &causal_conv3d_backward_op<CpuDevice>);
}

#ifdef PYRATOK_WITH_CUDA
TORCH_LIBRARY_IMPL(pyratok, CUDA, m) {
  m.impl("_causal_conv3d.out", &causal_conv3d_op<CudaDevice>);
  m.impl("_causal_conv3d_backward.out", &causal_conv3d_backward_op<CudaDevice>);
}
#endif

}  // namespace pyratok
