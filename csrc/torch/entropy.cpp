// torch bindings for the entropy and alignment losses: schemas of the private kernel ops
// pyratok::_<name> and their CPU (and, in CUDA builds, CUDA) implementations.
//
// The half-split codebook statistics are tiled over tokens: per bit group g and tile,
// csrc/core builds the code-probability tiles P_A (rows, 2^KA) and P_B (rows, 2^KB) and
// ATen's GEMM (MKL on the CPU, cuBLAS on CUDA; fp32 unless torch's TF32 switch for matmul
// is on) accumulates Q_g += P_A^T P_B.  The backward rebuilds the tiles and runs two GEMMs,
// P_B G^T and P_A G.  Memory: tile * (2^KA + 2^KB) work elements (x2 in the backward) plus
// the 2^K counts, whatever N is.
//
// Argument checking for users lives in pyratok/ops/entropy.py; the checks here only keep a
// misuse from reaching the kernels.
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>

#include "../core/entropy.h"
#include "common.h"

#ifdef PYRATOK_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace pyratok {
namespace {

// Elements per task of the elementwise ops: ~1 ms of work, so that small inputs run without
// a parallel region (each region is a barrier; see CpuDevice).
constexpr int64_t kElementGrain = int64_t(1) << 18;

at::ScalarType work_scalar_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor checked_tokens(const at::Tensor& x) {
  core_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a (tokens, K) tensor, got ", x.dim(), " dims");
  return x.contiguous();
}

int64_t checked_group_total(at::IntArrayRef sizes, int64_t K) {
  int64_t bits = 0, total = 0;
  for (int64_t g : sizes) {
    TORCH_CHECK_VALUE(g >= 1 && g <= 2 * kMaxHalfBits, "group_sizes: each group needs 1..",
                      2 * kMaxHalfBits, " bits, got ", g);
    bits += g;
    total += int64_t(1) << g;
  }
  TORCH_CHECK_VALUE(bits == K, "group_sizes: the groups cover ", bits, " bits, x has K=", K);
  return total;
}

CodeProbsArgs half_args(const at::Tensor& x, int64_t bit0, int bits, double coef, int64_t first) {
  return {core_dtype(x, "x"), x.data_ptr(), x.size(1), bit0, bits, coef, first};
}

// Tokens per tile so that the two probability tiles hold about `budget` elements.
int64_t tile_tokens(int64_t N, int ka, int kb, int64_t budget) {
  const int64_t width = (int64_t(1) << ka) + (int64_t(1) << kb);
  return std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(N, 1), budget / width));
}

struct Group {
  int ka, kb;
  int64_t bit0, offset;
};

template <typename Fn>
void for_each_group(at::IntArrayRef sizes, const Fn& fn) {
  int64_t bit0 = 0, offset = 0;
  for (int64_t g : sizes) {
    fn(Group{int(g / 2), int(g - g / 2), bit0, offset});
    bit0 += g;
    offset += int64_t(1) << g;
  }
}

// Device policy D: D::kTileBudget; D::code_probs(A, tile_a, B, tile_b, rows) builds the tiles
// of both halves; D::code_probs_backward(A, probs_a, grad_a, B, probs_b, grad_b, dx, rows)
// writes d x for the bits of both halves (a half of 0 bits is skipped).
template <typename D>
at::Tensor soft_code_counts_impl(const at::Tensor& x_in, double coef, at::IntArrayRef sizes) {
  const at::Tensor x = checked_tokens(x_in);
  const int64_t N = x.size(0);
  const int64_t total = checked_group_total(sizes, x.size(1));
  at::Tensor counts = at::zeros({total}, x.options().dtype(work_scalar_type(x)));
  for_each_group(sizes, [&](const Group& g) {
    at::Tensor Q = counts.narrow(0, g.offset, int64_t(1) << (g.ka + g.kb)).view({int64_t(1) << g.ka, int64_t(1) << g.kb});
    const int64_t tile = tile_tokens(N, g.ka, g.kb, D::kTileBudget);
    at::Tensor pa = at::empty({tile, int64_t(1) << g.ka}, counts.options());
    at::Tensor pb = at::empty({tile, int64_t(1) << g.kb}, counts.options());
    for (int64_t n0 = 0; n0 < N; n0 += tile) {
      const int64_t rows = std::min(tile, N - n0);
      at::Tensor ta = pa.narrow(0, 0, rows), tb = pb.narrow(0, 0, rows);
      D::code_probs(half_args(x, g.bit0, g.ka, coef, n0), ta, half_args(x, g.bit0 + g.ka, g.kb, coef, n0), tb,
                    rows);
      Q.addmm_(ta.t(), tb);
    }
  });
  return counts;
}

template <typename D>
at::Tensor soft_code_counts_backward_impl(const at::Tensor& x_in, double coef, at::IntArrayRef sizes,
                                          const at::Tensor& grad_counts) {
  const at::Tensor x = checked_tokens(x_in);
  const int64_t N = x.size(0);
  const int64_t total = checked_group_total(sizes, x.size(1));
  TORCH_CHECK_VALUE(grad_counts.dim() == 1 && grad_counts.size(0) == total,
                    "grad_counts: expected ", total, " values, got shape ", grad_counts.sizes());
  const auto work = x.options().dtype(work_scalar_type(x));
  const at::Tensor G_all = grad_counts.to(work).contiguous();
  at::Tensor dx = at::empty_like(x);  // the groups cover every channel: each column is written once
  for_each_group(sizes, [&](const Group& g) {
    const int64_t wa = int64_t(1) << g.ka, wb = int64_t(1) << g.kb;
    const at::Tensor G = G_all.narrow(0, g.offset, wa * wb).view({wa, wb});
    const int64_t tile = tile_tokens(N, g.ka, g.kb, D::kTileBudget);
    at::Tensor pa = at::empty({tile, wa}, work), pb = at::empty({tile, wb}, work);
    at::Tensor ga = at::empty({tile, wa}, work), gb = at::empty({tile, wb}, work);
    for (int64_t n0 = 0; n0 < N; n0 += tile) {
      const int64_t rows = std::min(tile, N - n0);
      at::Tensor ta = pa.narrow(0, 0, rows), tb = pb.narrow(0, 0, rows);
      at::Tensor tga = ga.narrow(0, 0, rows), tgb = gb.narrow(0, 0, rows);
      const CodeProbsArgs A = half_args(x, g.bit0, g.ka, coef, n0);
      const CodeProbsArgs B = half_args(x, g.bit0 + g.ka, g.kb, coef, n0);
      D::code_probs(A, ta, B, tb, rows);
      if (g.ka > 0) at::mm_out(tga, tb, G.t());  // d loss / d P_A
      at::mm_out(tgb, ta, G);                    // d loss / d P_B
      D::code_probs_backward(A, ta, tga, B, tb, tgb, dx, rows);
    }
  });
  return dx;
}

void check_same(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), "r_logits: shape ", b.sizes(), " differs from p_logits ",
                    a.sizes());
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), "r_logits: dtype ", b.scalar_type(),
                    " differs from p_logits ", a.scalar_type());
}

void check_histogram_input(const at::Tensor& idx, int64_t K) {
  TORCH_CHECK_VALUE(K >= 1 && K <= 24, "K=", K, ": the dense histogram needs 1 <= K <= 24");
  core_index_type(idx, "indices");
  if (idx.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(idx);
  TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < (int64_t(1) << K),
                    "indices: values must lie in [0, 2^", K, ")");
}

// ---- CPU ----------------------------------------------------------------------------

// Few, large parallel regions: each region is a barrier, and on a loaded machine a barrier
// can wait a whole scheduler time slice for a descheduled thread.
struct CpuDevice {
  static constexpr int64_t kTileBudget = int64_t(1) << 24;

  static int64_t grain(const CodeProbsArgs& a, const CodeProbsArgs& b) {
    return std::max<int64_t>(1, 65536 / ((int64_t(1) << a.bits) + (int64_t(1) << b.bits)));
  }

  static void code_probs(const CodeProbsArgs& a, at::Tensor& probs_a, const CodeProbsArgs& b,
                         at::Tensor& probs_b, int64_t rows) {
    at::parallel_for(0, rows, grain(a, b), [&](int64_t s, int64_t e) {
      code_probs_cpu(a, probs_a.data_ptr(), a.first_token + s, a.first_token + e);
      code_probs_cpu(b, probs_b.data_ptr(), b.first_token + s, b.first_token + e);
    });
  }

  static void code_probs_backward(const CodeProbsArgs& a, const at::Tensor& probs_a, const at::Tensor& grad_a,
                                  const CodeProbsArgs& b, const at::Tensor& probs_b, const at::Tensor& grad_b,
                                  at::Tensor& dx, int64_t rows) {
    at::parallel_for(0, rows, grain(a, b), [&](int64_t s, int64_t e) {
      if (a.bits > 0)
        code_probs_backward_cpu(a, probs_a.data_ptr(), grad_a.data_ptr(), dx.data_ptr(), a.first_token + s,
                                a.first_token + e);
      code_probs_backward_cpu(b, probs_b.data_ptr(), grad_b.data_ptr(), dx.data_ptr(), b.first_token + s,
                              b.first_token + e);
    });
  }
};

template <typename Fn>
double parallel_sum(int64_t numel, const Fn& partial) {
  return at::parallel_reduce(
      0, numel, kElementGrain, 0.0,
      [&](int64_t b, int64_t e, double acc) { return acc + partial(b, e); }, std::plus<double>());
}

at::Tensor bit_probs_cpu_op(const at::Tensor& x_in, double coef) {
  const at::Tensor x = x_in.contiguous();
  const DType dt = core_dtype(x, "x");
  at::Tensor probs = at::empty(x.sizes(), x.options().dtype(work_scalar_type(x)));
  at::parallel_for(0, x.numel(), kElementGrain, [&](int64_t b, int64_t e) {
    bit_probs_cpu(dt, x.data_ptr(), coef, probs.data_ptr(), b, e);
  });
  return probs;
}

at::Tensor binary_entropy_sum_cpu_op(const at::Tensor& x_in, double coef) {
  const at::Tensor x = x_in.contiguous();
  const DType dt = core_dtype(x, "x");
  const double total = parallel_sum(
      x.numel(), [&](int64_t b, int64_t e) { return binary_entropy_sum_cpu(dt, x.data_ptr(), coef, b, e); });
  return at::scalar_tensor(total, x.options().dtype(work_scalar_type(x)));
}

at::Tensor binary_entropy_backward_cpu_op(const at::Tensor& x_in, double coef, const at::Tensor& grad) {
  const at::Tensor x = x_in.contiguous();
  const DType dt = core_dtype(x, "x");
  const double g = grad.item<double>();
  at::Tensor dx = at::empty_like(x);
  at::parallel_for(0, x.numel(), kElementGrain, [&](int64_t b, int64_t e) {
    binary_entropy_backward_cpu(dt, x.data_ptr(), coef, g, dx.data_ptr(), b, e);
  });
  return dx;
}

at::Tensor bernoulli_kl_sum_cpu_op(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_same(a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const DType dt = core_dtype(a, "p_logits");
  const double total = parallel_sum(
      a.numel(), [&](int64_t s, int64_t e) { return bernoulli_kl_sum_cpu(dt, a.data_ptr(), b.data_ptr(), s, e); });
  return at::scalar_tensor(total, a.options().dtype(work_scalar_type(a)));
}

std::tuple<at::Tensor, at::Tensor> bernoulli_kl_backward_cpu_op(const at::Tensor& a_in, const at::Tensor& b_in,
                                                                const at::Tensor& grad) {
  check_same(a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const DType dt = core_dtype(a, "p_logits");
  const double g = grad.item<double>();
  at::Tensor da = at::empty_like(a), db = at::empty_like(b);
  at::parallel_for(0, a.numel(), kElementGrain, [&](int64_t s, int64_t e) {
    bernoulli_kl_backward_cpu(dt, a.data_ptr(), b.data_ptr(), g, da.data_ptr(), db.data_ptr(), s, e);
  });
  return {da, db};
}

at::Tensor code_histogram_cpu_op(const at::Tensor& indices, int64_t K) {
  check_histogram_input(indices, K);
  const at::Tensor idx = indices.contiguous();
  const IndexType it = core_index_type(idx, "indices");
  at::Tensor counts = at::zeros({int64_t(1) << K}, idx.options().dtype(at::kLong));
  at::parallel_for(0, idx.numel(), 65536, [&](int64_t b, int64_t e) {
    code_histogram_cpu(idx.data_ptr(), it, counts.data_ptr<int64_t>(), b, e);
  });
  return counts;
}

#ifdef PYRATOK_WITH_CUDA
// ---- CUDA ---------------------------------------------------------------------------

void* stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

struct CudaDevice {
  static constexpr int64_t kTileBudget = int64_t(1) << 25;

  static void code_probs(const CodeProbsArgs& a, at::Tensor& probs_a, const CodeProbsArgs& b,
                         at::Tensor& probs_b, int64_t rows) {
    code_probs_cuda(a, probs_a.data_ptr(), rows, stream_of(probs_a));
    code_probs_cuda(b, probs_b.data_ptr(), rows, stream_of(probs_b));
  }

  static void code_probs_backward(const CodeProbsArgs& a, const at::Tensor& probs_a, const at::Tensor& grad_a,
                                  const CodeProbsArgs& b, const at::Tensor& probs_b, const at::Tensor& grad_b,
                                  at::Tensor& dx, int64_t rows) {
    code_probs_backward_cuda(a, probs_a.data_ptr(), grad_a.data_ptr(), dx.data_ptr(), rows, stream_of(dx));
    code_probs_backward_cuda(b, probs_b.data_ptr(), grad_b.data_ptr(), dx.data_ptr(), rows, stream_of(dx));
  }
};

at::Tensor soft_code_counts_cuda_op(const at::Tensor& x, double coef, at::IntArrayRef sizes) {
  c10::cuda::CUDAGuard guard(x.device());
  return soft_code_counts_impl<CudaDevice>(x, coef, sizes);
}

at::Tensor soft_code_counts_backward_cuda_op(const at::Tensor& x, double coef, at::IntArrayRef sizes,
                                             const at::Tensor& grad_counts) {
  c10::cuda::CUDAGuard guard(x.device());
  return soft_code_counts_backward_impl<CudaDevice>(x, coef, sizes, grad_counts);
}

at::Tensor bit_probs_cuda_op(const at::Tensor& x_in, double coef) {
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor probs = at::empty(x.sizes(), x.options().dtype(work_scalar_type(x)));
  bit_probs_cuda(core_dtype(x, "x"), x.data_ptr(), coef, probs.data_ptr(), x.numel(), stream_of(x));
  return probs;
}

at::Tensor binary_entropy_sum_cuda_op(const at::Tensor& x_in, double coef) {
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor total = at::zeros({}, x.options().dtype(at::kDouble));
  binary_entropy_sum_cuda(core_dtype(x, "x"), x.data_ptr(), coef, total.data_ptr<double>(), x.numel(),
                          stream_of(x));
  return total.to(work_scalar_type(x));
}

at::Tensor binary_entropy_backward_cuda_op(const at::Tensor& x_in, double coef, const at::Tensor& grad) {
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad.to(x.options().dtype(work_scalar_type(x))).contiguous();
  at::Tensor dx = at::empty_like(x);
  binary_entropy_backward_cuda(core_dtype(x, "x"), x.data_ptr(), coef, g.data_ptr(), dx.data_ptr(),
                               x.numel(), stream_of(x));
  return dx;
}

at::Tensor bernoulli_kl_sum_cuda_op(const at::Tensor& a_in, const at::Tensor& b_in) {
  c10::cuda::CUDAGuard guard(a_in.device());
  check_same(a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor total = at::zeros({}, a.options().dtype(at::kDouble));
  bernoulli_kl_sum_cuda(core_dtype(a, "p_logits"), a.data_ptr(), b.data_ptr(), total.data_ptr<double>(),
                        a.numel(), stream_of(a));
  return total.to(work_scalar_type(a));
}

std::tuple<at::Tensor, at::Tensor> bernoulli_kl_backward_cuda_op(const at::Tensor& a_in, const at::Tensor& b_in,
                                                                 const at::Tensor& grad) {
  c10::cuda::CUDAGuard guard(a_in.device());
  check_same(a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor g = grad.to(a.options().dtype(work_scalar_type(a))).contiguous();
  at::Tensor da = at::empty_like(a), db = at::empty_like(b);
  bernoulli_kl_backward_cuda(core_dtype(a, "p_logits"), a.data_ptr(), b.data_ptr(), g.data_ptr(),
                             da.data_ptr(), db.data_ptr(), a.numel(), stream_of(a));
  return {da, db};
}

at::Tensor code_histogram_cuda_op(const at::Tensor& indices, int64_t K) {
  c10::cuda::CUDAGuard guard(indices.device());
  check_histogram_input(indices, K);
  const at::Tensor idx = indices.contiguous();
  at::Tensor counts = at::zeros({int64_t(1) << K}, idx.options().dtype(at::kLong));
  code_histogram_cuda(idx.data_ptr(), core_index_type(idx, "indices"), counts.data_ptr<int64_t>(),
                      idx.numel(), stream_of(idx));
  return counts;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyratok, m) {
  m.def("_bit_probs(Tensor x, float coef) -> Tensor");
  m.def("_binary_entropy_sum(Tensor x, float coef) -> Tensor");
  m.def("_binary_entropy_backward(Tensor x, float coef, Tensor grad) -> Tensor");
  m.def("_soft_code_counts(Tensor x, float coef, int[] group_sizes) -> Tensor");
  m.def("_soft_code_counts_backward(Tensor x, float coef, int[] group_sizes, Tensor grad_counts) -> Tensor");
  m.def("_bernoulli_kl_sum(Tensor p_logits, Tensor r_logits) -> Tensor");
  m.def("_bernoulli_kl_backward(Tensor p_logits, Tensor r_logits, Tensor grad) -> (Tensor, Tensor)");
  m.def("_code_histogram(Tensor indices, int K) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyratok, CPU, m) {
  m.impl("_bit_probs", &bit_probs_cpu_op);
  m.impl("_binary_entropy_sum", &binary_entropy_sum_cpu_op);
  m.impl("_binary_entropy_backward", &binary_entropy_backward_cpu_op);
  m.impl("_soft_code_counts", &soft_code_counts_impl<CpuDevice>);
  m.impl("_soft_code_counts_backward", &soft_code_counts_backward_impl<CpuDevice>);
  m.impl("_bernoulli_kl_sum", &bernoulli_kl_sum_cpu_op);
  m.impl("_bernoulli_kl_backward", &bernoulli_kl_backward_cpu_op);
  m.impl("_code_histogram", &code_histogram_cpu_op);
}

#ifdef PYRATOK_WITH_CUDA
TORCH_LIBRARY_IMPL(pyratok, CUDA, m) {
  m.impl("_bit_probs", &bit_probs_cuda_op);
  m.impl("_binary_entropy_sum", &binary_entropy_sum_cuda_op);
  m.impl("_binary_entropy_backward", &binary_entropy_backward_cuda_op);
  m.impl("_soft_code_counts", &soft_code_counts_cuda_op);
  m.impl("_soft_code_counts_backward", &soft_code_counts_backward_cuda_op);
  m.impl("_bernoulli_kl_sum", &bernoulli_kl_sum_cuda_op);
  m.impl("_bernoulli_kl_backward", &bernoulli_kl_backward_cuda_op);
  m.impl("_code_histogram", &code_histogram_cuda_op);
}
#endif

}  // namespace pyratok
