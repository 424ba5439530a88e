// torch bindings for the entropy and alignment losses: the private kernel ops
// pyratok::_<name>.out, each one function over a device policy (CpuDevice / CudaDevice),
// writing into the outputs allocated by the op's allocate function in pyratok/ops/entropy.py.
//
// The half-split codebook statistics are tiled over tokens: per bit group g and tile,
// csrc/core builds the code-probability tiles P_A (rows, 2^KA) and P_B (rows, 2^KB) and
// ATen's GEMM (MKL on the CPU, cuBLAS on CUDA; fp32 unless torch's TF32 switch for matmul
// is on) accumulates Q_g += P_A^T P_B.  The backward rebuilds the tiles and runs two GEMMs,
// P_B G^T and P_A G.  Memory: a tile holds budget / (2^KA + 2^KB) tokens (budget: 2^24 work
// elements on the CPU, 64 MiB in fp32; 2^25 on CUDA), twice that in the backward, plus the 2^K
// counts, whatever N is.
//
// Argument checking for users lives in pyratok/ops/entropy.py; the checks here only keep a
// misuse from reaching the kernels.
#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <functional>
#include <mutex>
#include <vector>

#include "../core/entropy.h"
#include "common.h"

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

// A run of R consecutive bit groups of the same size g = KA + KB ("bits": one run of K groups
// of 1 bit).  Its counts are one contiguous block viewed as (R, 2^KA, 2^KB), so each tile is
// one parallel region and one batched GEMM whatever R is.
struct Run {
  int ka, kb;
  int64_t groups, bit0, offset;  // first channel and first count of the run
};

std::vector<Run> runs_of(at::IntArrayRef sizes) {
  std::vector<Run> runs;
  int64_t bit0 = 0, offset = 0;
  for (int64_t g : sizes) {
    if (!runs.empty() && runs.back().ka + runs.back().kb == g) {
      ++runs.back().groups;
    } else {
      runs.push_back(Run{int(g / 2), int(g - g / 2), 1, bit0, offset});
    }
    bit0 += g;
    offset += int64_t(1) << g;
  }
  return runs;
}

// The A (most significant) or B half of group r of a run, for the tile starting at token n0.
CodeProbsArgs half_args(const at::Tensor& x, const Run& run, int64_t r, bool half_b, double coef,
                        int64_t n0) {
  const int64_t bit0 = run.bit0 + r * (run.ka + run.kb) + (half_b ? run.ka : 0);
  return {core_dtype(x, "x"), x.data_ptr(), x.size(1), bit0, half_b ? run.kb : run.ka, coef, n0};
}

// Group r's (rows, width) block of a contiguous (R, rows, width) tile tensor.
void* group_block(const at::Tensor& tiles, int64_t r) {
  return static_cast<char*>(tiles.data_ptr()) + r * tiles.stride(0) * tiles.element_size();
}

// Tokens per tile so that the probability tiles of a run hold about `budget` elements.
int64_t tile_tokens(int64_t N, const Run& run, int64_t budget) {
  const int64_t width = run.groups * ((int64_t(1) << run.ka) + (int64_t(1) << run.kb));
  return std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(N, 1), budget / width));
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

// FlushDenormals (csrc/core/entropy.h) on the calling thread and on the other threads of its
// OpenMP team, where ATen's parallel_for and MKL's GEMM run, for the lifetime of the object; the
// calling thread gets its previous mode back exactly, the team threads get FTZ/DAZ cleared
// (their default).  The GEMMs of the half-split counts are where denormals cost most (MKL's
// sgemm took 2.3 s instead of 24 ms on probabilities ~1e-20), and MKL's threads only see a mode
// set on them.
class TeamFlushDenormals {
 public:
  TeamFlushDenormals() { set_on_team(true); }
  ~TeamFlushDenormals() { set_on_team(false); }
  TeamFlushDenormals(const TeamFlushDenormals&) = delete;
  TeamFlushDenormals& operator=(const TeamFlushDenormals&) = delete;

 private:
  const FlushDenormals own_;

  static void set_on_team(bool on) {
#if (defined(__SSE__) || defined(__x86_64__)) && defined(_OPENMP) && !defined(__CUDACC__)
    const int threads = at::get_num_threads();
    if (threads <= 1 || omp_in_parallel()) return;
#pragma omp parallel num_threads(threads)
    if (omp_get_thread_num() != 0) {
      const unsigned csr = _mm_getcsr();
      _mm_setcsr(on ? csr | FlushDenormals::kBits : csr & ~FlushDenormals::kBits);
    }
#else
    (void)on;
#endif
  }
};


template <typename Fn>
double parallel_sum(int64_t numel, const Fn& partial, int64_t grain = kElementGrain) {
  return at::parallel_reduce(
      0, numel, grain, 0.0,
      [&](int64_t b, int64_t e, double acc) { return acc + partial(b, e); }, std::plus<double>());
}

// ---- CPU ----------------------------------------------------------------------------

// Few, large parallel regions: each region is a barrier, and on a loaded machine a barrier
// can wait a whole scheduler time slice for a descheduled thread.
struct CpuDevice {
  using Guard = NoGuard;
  using Flush = TeamFlushDenormals;  // around the code-count GEMMs
  static constexpr int64_t kTileBudget = int64_t(1) << 24;

  static int64_t grain(const Run& run) {
    return std::max<int64_t>(1, 65536 / (run.groups * ((int64_t(1) << run.ka) + (int64_t(1) << run.kb))));
  }

  static void code_probs(const at::Tensor& x, const Run& run, double coef, int64_t n0, at::Tensor& probs_a,
                         at::Tensor& probs_b) {
    at::parallel_for(0, probs_a.size(1), grain(run), [&](int64_t s, int64_t e) {
      for (int64_t r = 0; r < run.groups; ++r) {
        code_probs_cpu(half_args(x, run, r, false, coef, n0), group_block(probs_a, r), n0 + s, n0 + e);
        code_probs_cpu(half_args(x, run, r, true, coef, n0), group_block(probs_b, r), n0 + s, n0 + e);
      }
    });
  }

  static void code_probs_backward(const at::Tensor& x, const Run& run, double coef, int64_t n0,
                                  const at::Tensor& probs_a, const at::Tensor& grad_a, const at::Tensor& probs_b,
                                  const at::Tensor& grad_b, at::Tensor& dx) {
    at::parallel_for(0, probs_a.size(1), grain(run), [&](int64_t s, int64_t e) {
      for (int64_t r = 0; r < run.groups; ++r) {
        if (run.ka > 0)
          code_probs_backward_cpu(half_args(x, run, r, false, coef, n0), group_block(probs_a, r),
                                  group_block(grad_a, r), dx.data_ptr(), n0 + s, n0 + e);
        code_probs_backward_cpu(half_args(x, run, r, true, coef, n0), group_block(probs_b, r),
                                group_block(grad_b, r), dx.data_ptr(), n0 + s, n0 + e);
      }
    });
  }
  static void bit_probs(DType dt, const at::Tensor& x, double coef, at::Tensor& probs) {
    at::parallel_for(0, x.numel(), kElementGrain, [&](int64_t b, int64_t e) {
      bit_probs_cpu(dt, x.data_ptr(), coef, probs.data_ptr(), b, e);
    });
  }

  static void binary_entropy_sum(DType dt, const at::Tensor& x, double coef, at::Tensor& total) {
    total.fill_(parallel_sum(x.numel(), [&](int64_t b, int64_t e) {
      return binary_entropy_sum_cpu(dt, x.data_ptr(), coef, b, e);
    }));
  }

  static void binary_entropy_backward(DType dt, const at::Tensor& x, double coef, const at::Tensor& grad,
                                      at::Tensor& dx) {
    const double g = grad.item<double>();
    at::parallel_for(0, x.numel(), kElementGrain, [&](int64_t b, int64_t e) {
      binary_entropy_backward_cpu(dt, x.data_ptr(), coef, g, dx.data_ptr(), b, e);
    });
  }

  static void bernoulli_kl_sum(DType dt, const at::Tensor& a, const at::Tensor& b, at::Tensor& total) {
    total.fill_(parallel_sum(a.numel(), [&](int64_t s, int64_t e) {
      return bernoulli_kl_sum_cpu(dt, a.data_ptr(), b.data_ptr(), s, e);
    }));
  }

  static void bernoulli_kl_backward(DType dt, const at::Tensor& a, const at::Tensor& b, const at::Tensor& grad,
                                    at::Tensor& da, at::Tensor& db) {
    const double g = grad.item<double>();
    at::parallel_for(0, a.numel(), kElementGrain, [&](int64_t s, int64_t e) {
      bernoulli_kl_backward_cpu(dt, a.data_ptr(), b.data_ptr(), g, da.data_ptr(), db.data_ptr(), s, e);
    });
  }

  static void code_histogram(const at::Tensor& idx, IndexType it, at::Tensor& counts) {
    at::parallel_for(0, idx.numel(), 65536, [&](int64_t b, int64_t e) {
      code_histogram_cpu(idx.data_ptr(), it, counts.data_ptr<int64_t>(), b, e);
    });
  }
};

#ifdef PYRATOK_WITH_CUDA
// ---- CUDA ---------------------------------------------------------------------------

struct CudaDevice {
  using Guard = DeviceGuard;
  struct Flush {};  // the GPU path leaves the floating-point mode as it is
  static constexpr int64_t kTileBudget = int64_t(1) << 25;

  static void code_probs(const at::Tensor& x, const Run& run, double coef, int64_t n0, at::Tensor& probs_a,
                         at::Tensor& probs_b) {
    const int64_t rows = probs_a.size(1);
    for (int64_t r = 0; r < run.groups; ++r) {
      code_probs_cuda(half_args(x, run, r, false, coef, n0), group_block(probs_a, r), rows, cuda_stream(x));
      code_probs_cuda(half_args(x, run, r, true, coef, n0), group_block(probs_b, r), rows, cuda_stream(x));
    }
  }

  static void code_probs_backward(const at::Tensor& x, const Run& run, double coef, int64_t n0,
                                  const at::Tensor& probs_a, const at::Tensor& grad_a, const at::Tensor& probs_b,
                                  const at::Tensor& grad_b, at::Tensor& dx) {
    const int64_t rows = probs_a.size(1);
    for (int64_t r = 0; r < run.groups; ++r) {
      code_probs_backward_cuda(half_args(x, run, r, false, coef, n0), group_block(probs_a, r), group_block(grad_a, r),
                               dx.data_ptr(), rows, cuda_stream(x));
      code_probs_backward_cuda(half_args(x, run, r, true, coef, n0), group_block(probs_b, r), group_block(grad_b, r),
                               dx.data_ptr(), rows, cuda_stream(x));
    }
  }
  static void bit_probs(DType dt, const at::Tensor& x, double coef, at::Tensor& probs) {
    bit_probs_cuda(dt, x.data_ptr(), coef, probs.data_ptr(), x.numel(), cuda_stream(x));
  }

  // one partial per block, summed in a fixed order: deterministic
  static void binary_entropy_sum(DType dt, const at::Tensor& x, double coef, at::Tensor& total) {
    at::Tensor partial = at::zeros({sum_partials_cuda(x.numel())}, x.options().dtype(at::kDouble));
    binary_entropy_sum_cuda(dt, x.data_ptr(), coef, partial.data_ptr<double>(), x.numel(), cuda_stream(x));
    total.copy_(partial.sum());
  }

  static void binary_entropy_backward(DType dt, const at::Tensor& x, double coef, const at::Tensor& grad,
                                      at::Tensor& dx) {
    const at::Tensor g = grad.to(x.options().dtype(work_scalar_type(x))).contiguous();
    binary_entropy_backward_cuda(dt, x.data_ptr(), coef, g.data_ptr(), dx.data_ptr(), x.numel(), cuda_stream(x));
  }

  static void bernoulli_kl_sum(DType dt, const at::Tensor& a, const at::Tensor& b, at::Tensor& total) {
    at::Tensor partial = at::zeros({sum_partials_cuda(a.numel())}, a.options().dtype(at::kDouble));
    bernoulli_kl_sum_cuda(dt, a.data_ptr(), b.data_ptr(), partial.data_ptr<double>(), a.numel(), cuda_stream(a));
    total.copy_(partial.sum());
  }

  static void bernoulli_kl_backward(DType dt, const at::Tensor& a, const at::Tensor& b, const at::Tensor& grad,
                                    at::Tensor& da, at::Tensor& db) {
    const at::Tensor g = grad.to(a.options().dtype(work_scalar_type(a))).contiguous();
    bernoulli_kl_backward_cuda(dt, a.data_ptr(), b.data_ptr(), g.data_ptr(), da.data_ptr(), db.data_ptr(),
                               a.numel(), cuda_stream(a));
  }

  static void code_histogram(const at::Tensor& idx, IndexType it, at::Tensor& counts) {
    code_histogram_cuda(idx.data_ptr(), it, counts.data_ptr<int64_t>(), counts.numel(), idx.numel(),
                        cuda_stream(idx));
  }
};
#endif

// ---- the ops: one function each, over the device policy D ------------------------------

// Device policy D (CpuDevice, CudaDevice): D::Guard (the device guard), D::Flush (denormals
// flushed around the code-count GEMMs), D::kTileBudget;
//   D::code_probs(x, run, coef, n0, probs_a (R, rows, 2^KA), probs_b (R, rows, 2^KB)) builds
//   the tiles of both halves of every group of the run;
//   D::code_probs_backward(x, run, coef, n0, probs_a, grad_a, probs_b, grad_b, dx) writes
//   d x for their bits (a half of 0 bits is skipped);
//   D::<elementwise op>(...) runs that kernel over the whole (contiguous) input.
template <typename D>
void soft_code_counts_op(const at::Tensor& x_in, double coef, at::IntArrayRef sizes, at::Tensor& counts) {
  const typename D::Guard guard(x_in);
  [[maybe_unused]] const typename D::Flush flush{};
  const at::Tensor x = checked_tokens(x_in);
  const int64_t N = x.size(0);
  const int64_t total = checked_group_total(sizes, x.size(1));
  const auto work = x.options().dtype(work_scalar_type(x));
  check_out(counts, "counts", x, total, work_scalar_type(x));
  counts.zero_();
  for (const Run& run : runs_of(sizes)) {
    const int64_t wa = int64_t(1) << run.ka, wb = int64_t(1) << run.kb;
    at::Tensor Q = counts.narrow(0, run.offset, run.groups * wa * wb).view({run.groups, wa, wb});
    const int64_t tile = tile_tokens(N, run, D::kTileBudget);
    for (int64_t n0 = 0; n0 < N; n0 += tile) {
      const int64_t rows = std::min(tile, N - n0);
      at::Tensor pa = at::empty({run.groups, rows, wa}, work), pb = at::empty({run.groups, rows, wb}, work);
      D::code_probs(x, run, coef, n0, pa, pb);
      Q.baddbmm_(pa.transpose(1, 2), pb);
    }
  }
}

template <typename D>
void soft_code_counts_backward_op(const at::Tensor& x_in, double coef, at::IntArrayRef sizes,
                                  const at::Tensor& grad_counts, at::Tensor& dx) {
  const typename D::Guard guard(x_in);
  [[maybe_unused]] const typename D::Flush flush{};
  const at::Tensor x = checked_tokens(x_in);
  const int64_t N = x.size(0);
  const int64_t total = checked_group_total(sizes, x.size(1));
  TORCH_CHECK_VALUE(grad_counts.dim() == 1 && grad_counts.size(0) == total,
                    "grad_counts: expected ", total, " values, got shape ", grad_counts.sizes());
  check_out(dx, "dx", x, x.numel(), x.scalar_type());  // the groups cover every channel: each column is written once
  const auto work = x.options().dtype(work_scalar_type(x));
  const at::Tensor G_all = grad_counts.to(work).contiguous();
  for (const Run& run : runs_of(sizes)) {
    const int64_t wa = int64_t(1) << run.ka, wb = int64_t(1) << run.kb;
    const at::Tensor G = G_all.narrow(0, run.offset, run.groups * wa * wb).view({run.groups, wa, wb});
    const int64_t tile = tile_tokens(N, run, D::kTileBudget);
    for (int64_t n0 = 0; n0 < N; n0 += tile) {
      const int64_t rows = std::min(tile, N - n0);
      at::Tensor pa = at::empty({run.groups, rows, wa}, work), pb = at::empty({run.groups, rows, wb}, work);
      D::code_probs(x, run, coef, n0, pa, pb);
      at::Tensor ga = run.ka > 0 ? at::bmm(pb, G.transpose(1, 2)) : pa;  // d loss / d P_A
      at::Tensor gb = at::bmm(pa, G);                                        // d loss / d P_B
      D::code_probs_backward(x, run, coef, n0, pa, ga, pb, gb, dx);
    }
  }
}

template <typename D>
void bit_probs_op(const at::Tensor& x_in, double coef, at::Tensor& probs) {
  const typename D::Guard guard(x_in);
  const at::Tensor x = x_in.contiguous();
  const DType dt = core_dtype(x, "x");
  check_out(probs, "probs", x, x.numel(), work_scalar_type(x));
  D::bit_probs(dt, x, coef, probs);
}

template <typename D>
void binary_entropy_sum_op(const at::Tensor& x_in, double coef, at::Tensor& total) {
  const typename D::Guard guard(x_in);
  const at::Tensor x = x_in.contiguous();
  const DType dt = core_dtype(x, "x");
  check_out(total, "total", x, 1, work_scalar_type(x));
  D::binary_entropy_sum(dt, x, coef, total);
}

template <typename D>
void binary_entropy_backward_op(const at::Tensor& x_in, double coef, const at::Tensor& grad, at::Tensor& dx) {
  const typename D::Guard guard(x_in);
  const at::Tensor x = x_in.contiguous();
  const DType dt = core_dtype(x, "x");
  check_out(dx, "dx", x, x.numel(), x.scalar_type());
  D::binary_entropy_backward(dt, x, coef, grad, dx);
}

template <typename D>
void bernoulli_kl_sum_op(const at::Tensor& a_in, const at::Tensor& b_in, at::Tensor& total) {
  const typename D::Guard guard(a_in);
  check_same(a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const DType dt = core_dtype(a, "p_logits");
  check_out(total, "total", a, 1, work_scalar_type(a));
  D::bernoulli_kl_sum(dt, a, b, total);
}

template <typename D>
void bernoulli_kl_backward_op(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& grad,
                              at::Tensor& da, at::Tensor& db) {
  const typename D::Guard guard(a_in);
  check_same(a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const DType dt = core_dtype(a, "p_logits");
  check_out(da, "grad_p", a, a.numel(), a.scalar_type());
  check_out(db, "grad_r", b, b.numel(), b.scalar_type());
  D::bernoulli_kl_backward(dt, a, b, grad, da, db);
}

template <typename D>
void code_histogram_op(const at::Tensor& indices, int64_t K, at::Tensor& counts) {
  const typename D::Guard guard(indices);
  check_histogram_input(indices, K);
  const at::Tensor idx = indices.contiguous();
  check_out(counts, "counts", idx, int64_t(1) << K, at::kLong);
  counts.zero_();
  D::code_histogram(idx, core_index_type(idx, "indices"), counts);
}

// ---- fused exact entropy for few tokens and many codes (CPU) ---------------------------
//
// When N is small next to 2^K (LaPQ's coarse levels at K = 24: N ~ 10..1000 tokens, 2^24
// codes), the counts path is dominated by elementwise passes over the 2^K counts (divide,
// clamp, log, multiply, sum; the backward's G; zeroing), each a trip through memory.  Here the
// counts never exist as a whole: with P_A (N, 2^KA) and P_B (N, 2^KB) of all N tokens built
// once, each tile of TA codes of the A half gives
//   Q_t = P_A[:, t]^T P_B   (TA x 2^KB, a GEMM into a cache-sized buffer)
//   S  += sum Q_t log(max(Q_t / N, tiny));   H(q_g) = -S / N
// and, when the gradient is wanted, in the same pass (one log per count) Q_t becomes
//   G_t = -(log(Q_t / N) + 1) / N = d H / d Q_t,  d P_A[:, t] = P_B G_t^T,  d P_B += P_A[:, t] G_t
// so the op returns H and d H / d x together (as fused linear-cross-entropy kernels do): three
// GEMMs and one pass of logs in all, the autograd backward only scales the saved d H / d x.
// Memory: N * (2^KA + 2^KB) per group of a run (twice with the gradient), a tile and a
// d P_B partial per thread; the caller (pyratok/ops/entropy.py) takes this path only for
// small N.

// Codes of the A half per tile: TA * 2^KB ~ 2^18 elements (1 MiB in fp32).  Smaller tiles
// starve the rank-TA update of d P_B (N x 2^KB per tile: 2 TA / 4 flop per byte); measured
// at K = 24, N = 192 on 2 cores: 2^15 -> 247 ms, 2^17 -> 127 ms, 2^18 -> 123 ms (that
// version's backward).
// At most a thread's share of the A codes per tile, so that small groups still use every thread.
int64_t fused_tile_rows(int64_t wa, int64_t wb) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_cache = std::max<int64_t>(1, (int64_t(1) << 18) / wb);
  return std::max<int64_t>(1, std::min({wa, by_cache, (wa + threads - 1) / threads}));
}

void soft_code_entropy_cpu_op(const at::Tensor& x_in, double coef, at::IntArrayRef sizes, bool with_grad,
                              at::Tensor& value, at::Tensor& dx) {
  const TeamFlushDenormals flush;
  const at::Tensor x = checked_tokens(x_in);
  const int64_t N = x.size(0);
  checked_group_total(sizes, x.size(1));
  TORCH_CHECK_VALUE(N > 0, "x: no tokens");
  const auto work = x.options().dtype(work_scalar_type(x));
  check_out(value, "value", x, 1, work_scalar_type(x));
  if (with_grad) check_out(dx, "dx", x, x.numel(), x.scalar_type());
  const bool f64 = work_scalar_type(x) == at::kDouble;
  const double inv_n = 1.0 / double(N);
  double total = 0;
  for (const Run& run : runs_of(sizes)) {
    const int64_t wa = int64_t(1) << run.ka, wb = int64_t(1) << run.kb;
    const int64_t ta = fused_tile_rows(wa, wb), tiles = (wa + ta - 1) / ta;
    at::Tensor pa = at::empty({run.groups, N, wa}, work), pb = at::empty({run.groups, N, wb}, work);
    CpuDevice::code_probs(x, run, coef, 0, pa, pb);
    at::Tensor ga = with_grad ? at::empty_like(pa) : at::Tensor();
    at::Tensor gb = with_grad ? at::zeros_like(pb) : at::Tensor();
    std::mutex gb_lock;
    for (int64_t r = 0; r < run.groups; ++r) {
      const at::Tensor pa_r = pa[r], pb_r = pb[r];
      total -= inv_n * parallel_sum(tiles, [&](int64_t s, int64_t e) {
        at::Tensor q = at::empty({ta, wb}, work);
        at::Tensor gb_part = with_grad ? at::zeros({N, wb}, work) : at::Tensor();
        double acc = 0;
        for (int64_t t = s; t < e; ++t) {
          const int64_t a0 = t * ta, rows = std::min(ta, wa - a0);
          at::Tensor qt = q.narrow(0, 0, rows);
          const at::Tensor pa_t = pa_r.narrow(1, a0, rows);
          at::mm_out(qt, pa_t.t(), pb_r);
          acc += count_entropy_tile_cpu(f64, qt.data_ptr(), qt.numel(), inv_n, with_grad, -inv_n);
          if (with_grad) {  // qt holds G_t now
            ga[r].narrow(1, a0, rows).copy_(at::mm(pb_r, qt.t()));
            gb_part.addmm_(pa_t, qt);
          }
        }
        if (with_grad) {
          std::lock_guard<std::mutex> guard(gb_lock);
          gb[r].add_(gb_part);
        }
        return acc;
      }, /*grain=*/1);
    }
    if (with_grad) CpuDevice::code_probs_backward(x, run, coef, 0, pa, ga, pb, gb, dx);
  }
  value.fill_(total);
}

template <typename D>
void register_impls(torch::Library& m) {
  m.impl("_bit_probs.out", &bit_probs_op<D>);
  m.impl("_binary_entropy_sum.out", &binary_entropy_sum_op<D>);
  m.impl("_binary_entropy_backward.out", &binary_entropy_backward_op<D>);
  m.impl("_soft_code_counts.out", &soft_code_counts_op<D>);
  m.impl("_soft_code_counts_backward.out", &soft_code_counts_backward_op<D>);
  m.impl("_bernoulli_kl_sum.out", &bernoulli_kl_sum_op<D>);
  m.impl("_bernoulli_kl_backward.out", &bernoulli_kl_backward_op<D>);
  m.impl("_code_histogram.out", &code_histogram_op<D>);
}

}  // namespace

// Each schema is the op's allocate signature in pyratok/ops/entropy.py followed by the outputs
// allocate returns.
TORCH_LIBRARY_FRAGMENT(pyratok, m) {
  m.def("_bit_probs.out(Tensor x, float coef, Tensor(a!) probs) -> ()");
  m.def("_binary_entropy_sum.out(Tensor x, float coef, Tensor(a!) total) -> ()");
  m.def("_binary_entropy_backward.out(Tensor x, float coef, Tensor grad, Tensor(a!) dx) -> ()");
  m.def("_soft_code_counts.out(Tensor x, float coef, int[] group_sizes, Tensor(a!) counts) -> ()");
  m.def("_soft_code_counts_backward.out(Tensor x, float coef, int[] group_sizes, Tensor grad_counts, "
        "Tensor(a!) dx) -> ()");
  m.def("_soft_code_entropy.out(Tensor x, float coef, int[] group_sizes, bool with_grad, Tensor(a!) value, "
        "Tensor(b!) dx) -> ()");
  m.def("_bernoulli_kl_sum.out(Tensor p_logits, Tensor r_logits, Tensor(a!) total) -> ()");
  m.def("_bernoulli_kl_backward.out(Tensor p_logits, Tensor r_logits, Tensor grad, Tensor(a!) grad_p, "
        "Tensor(b!) grad_r) -> ()");
  m.def("_code_histogram.out(Tensor indices, int K, Tensor(a!) counts) -> ()");
}

TORCH_LIBRARY_IMPL(pyratok, CPU, m) {
  register_impls<CpuDevice>(m);
  m.impl("_soft_code_entropy.out", &soft_code_entropy_cpu_op);  // CPU only: CUDA composes the counts ops
}

#ifdef PYRATOK_WITH_CUDA
TORCH_LIBRARY_IMPL(pyratok, CUDA, m) { register_impls<CudaDevice>(m); }
#endif

}  // namespace pyratok
