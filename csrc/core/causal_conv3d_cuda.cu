// CUDA kernels for causal 3D convolution; contract in causal_conv3d.h.
//
// One implicit-GEMM kernel template serves the three problems:
//   forward      y (M x O)  = A (M x K) W (K x O),  M = (b, t, h, w), K = (it, ih, iw, c)
//   input_grad   dx (M' x C) = A' (M' x K') W' (K' x C), M' = padded input positions
//                (b, p, h, w), K' = (it, ih, iw, o), A' = dy where t = (p - it*dt)/st,
//                ho, wo divide exactly (so any stride works); rows p < P -> grad_past
//   weight_grad  dW (O x K) = dy^T (O x M) A (M x K), the M reduction split over
//                gridDim.z and summed with atomics into a compute-type accumulator.
// A is never materialised: each K step gathers its BM x BK tile with the causal frame
// choice (padded_frame) and the spatial zero border in the index math, int64 offsets.
// A block computes a 64 x 64 tile with 256 threads; fp16/bf16 tiles are staged in
// shared memory in their own format and multiplied on tensor cores (WMMA 16x16x16,
// fp32 accumulate), fp32/fp64 with a 4x4 register tile per thread (FMA).
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
constexpr int kLoadsA = BM * BK / kThreads;   // A elements per thread per K step
constexpr int kLoadsB = BK * BN / kThreads;

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

template <typename F>
__device__ __forceinline__ typename F::bits load_bits(const void* base, int64_t off) {
  return static_cast<const typename F::bits*>(base)[off];
}

// x padded causally in time and with zeros in space; raw bits (0 = +0.0).
template <typename F>
__device__ __forceinline__ typename F::bits padded_input(const CudaConvArgs& a, int64_t b, int64_t c, int64_t p,
                                                         int64_t hi, int64_t wi) {
  const ConvShape& s = a.shape;
  if (hi < 0 || hi >= s.H || wi < 0 || wi >= s.W) return 0;
  const FrameSource src = padded_frame(s, p);
  if (src.kind == FrameKind::Zero) return 0;
  const View5& v = src.kind == FrameKind::Cache ? a.cache : a.x;
  return load_bits<F>(v.data, v.offset(b, c, src.frame, hi, wi));
}

struct Taps {
  int64_t it, ih, iw, ch;   // ch: the channel running fastest in K
};

__device__ __forceinline__ Taps split_taps(int64_t k, const ConvShape& s, int64_t channels) {
  Taps t;
  t.ch = k % channels;
  int64_t q = k / channels;
  t.iw = q % s.kw;
  q /= s.kw;
  t.ih = q % s.kh;
  t.it = q / s.kh;
  return t;
}

struct Position {
  int64_t b, t, h, w;
};

__device__ __forceinline__ Position split_position(int64_t m, int64_t T, int64_t H, int64_t W) {
  Position p;
  p.w = m % W;
  int64_t q = m / W;
  p.h = q % H;
  q /= H;
  p.t = q % T;
  p.b = q / T;
  return p;
}

// ---- the three problems: rows x cols, reduction K; row context cached per thread ----

struct ForwardProblem {
  CudaConvArgs a;
  using Row = Position;
  __device__ int64_t rows() const { return a.shape.B * a.shape.To * a.shape.Ho * a.shape.Wo; }
  __device__ int64_t cols() const { return a.shape.O; }
  __device__ int64_t reduction() const { return a.shape.kt * a.shape.kh * a.shape.kw * a.shape.C; }
  __device__ Row row(int64_t m) const { return split_position(m, a.shape.To, a.shape.Ho, a.shape.Wo); }
  template <typename F>
  __device__ typename F::bits load_a(const Row& r, int64_t k) const {
    const ConvShape& s = a.shape;
    const Taps t = split_taps(k, s, s.C);
    return padded_input<F>(a, r.b, t.ch, r.t * s.st + t.it * s.dt, r.h * s.sh + t.ih * s.dh - s.ph,
                           r.w * s.sw + t.iw * s.dw - s.pw);
  }
  template <typename F>
  __device__ typename F::bits load_b(int64_t k, int64_t n) const {
    const Taps t = split_taps(k, a.shape, a.shape.C);
    return load_bits<F>(a.weight.data, a.weight.offset(n, t.ch, t.it, t.ih, t.iw));
  }
  template <typename F>
  __device__ void store(const Row& r, int64_t n, typename F::work v) const {
    if (a.bias) v += F::load(load_bits<F>(a.bias, n));
    static_cast<typename F::bits*>(a.y.data)[a.y.offset(r.b, n, r.t, r.h, r.w)] = F::store(v);
  }
};

struct InputGradProblem {
  CudaConvArgs a;
  int64_t p_begin;   // 0 when grad_past is written, else P
  using Row = Position;  // t holds the padded frame p - p_begin
  __device__ int64_t frames() const { return a.shape.P + a.shape.T - p_begin; }
  __device__ int64_t rows() const { return a.shape.B * frames() * a.shape.H * a.shape.W; }
  __device__ int64_t cols() const { return a.shape.C; }
  __device__ int64_t reduction() const { return a.shape.kt * a.shape.kh * a.shape.kw * a.shape.O; }
  __device__ Row row(int64_t m) const { return split_position(m, frames(), a.shape.H, a.shape.W); }
  template <typename F>
  __device__ typename F::bits load_a(const Row& r, int64_t k) const {
    const ConvShape& s = a.shape;
    const Taps t = split_taps(k, s, s.O);
    const int64_t tn = r.t + p_begin - t.it * s.dt, hn = r.h + s.ph - t.ih * s.dh, wn = r.w + s.pw - t.iw * s.dw;
    if (tn < 0 || hn < 0 || wn < 0 || tn % s.st || hn % s.sh || wn % s.sw) return 0;
    const int64_t to = tn / s.st, ho = hn / s.sh, wo = wn / s.sw;
    if (to >= s.To || ho >= s.Ho || wo >= s.Wo) return 0;
    return load_bits<F>(a.grad_y.data, a.grad_y.offset(r.b, t.ch, to, ho, wo));
  }
  template <typename F>
  __device__ typename F::bits load_b(int64_t k, int64_t n) const {
    const Taps t = split_taps(k, a.shape, a.shape.O);
    return load_bits<F>(a.weight.data, a.weight.offset(t.ch, n, t.it, t.ih, t.iw));
  }
  template <typename F>
  __device__ void store(const Row& r, int64_t n, typename F::work v) const {
    const int64_t p = r.t + p_begin;
    const MutView5& dst = p < a.shape.P ? a.grad_past : a.grad_x;
    if (!dst.data) return;
    const int64_t frame = p < a.shape.P ? p : p - a.shape.P;
    static_cast<typename F::bits*>(dst.data)[dst.offset(r.b, n, frame, r.h, r.w)] = F::store(v);
  }
};

struct WeightGradProblem {
  CudaConvArgs a;
  using Row = int64_t;  // output channel
  __device__ int64_t rows() const { return a.shape.O; }
  __device__ int64_t cols() const { return a.shape.kt * a.shape.kh * a.shape.kw * a.shape.C; }
  __device__ int64_t reduction() const { return a.shape.B * a.shape.To * a.shape.Ho * a.shape.Wo; }
  __device__ Row row(int64_t m) const { return m; }
  template <typename F>
  __device__ typename F::bits load_a(const Row& o, int64_t k) const {
    const Position q = split_position(k, a.shape.To, a.shape.Ho, a.shape.Wo);
    return load_bits<F>(a.grad_y.data, a.grad_y.offset(q.b, o, q.t, q.h, q.w));
  }
  template <typename F>
  __device__ typename F::bits load_b(int64_t k, int64_t n) const {
    const ConvShape& s = a.shape;
    const Position q = split_position(k, s.To, s.Ho, s.Wo);
    const Taps t = split_taps(n, s, s.C);
    return padded_input<F>(a, q.b, t.ch, q.t * s.st + t.it * s.dt, q.h * s.sh + t.ih * s.dh - s.ph,
                           q.w * s.sw + t.iw * s.dw - s.pw);
  }
  template <typename F>
  __device__ void store(const Row& o, int64_t n, typename F::work v) const {
    const Taps t = split_taps(n, a.shape, a.shape.C);
    atomicAdd(static_cast<typename F::work*>(a.grad_weight.data) + a.grad_weight.offset(o, t.ch, t.it, t.ih, t.iw), v);
  }
};

// ---- the kernel ---------------------------------------------------------------------

template <typename F>
constexpr bool kTensorCores =
    std::is_same<F, Format<DType::F16>>::value || std::is_same<F, Format<DType::BF16>>::value;

// Shared-memory operand type: the half format itself for tensor cores, else the work type.
template <typename F, bool TC = kTensorCores<F>>
struct Staged {
  using type = typename F::work;
  static __device__ __forceinline__ type from_bits(typename F::bits b) { return F::load(b); }
};
template <>
struct Staged<Format<DType::F16>, true> {
  using type = __half;
  static __device__ __forceinline__ type from_bits(uint16_t b) { return __ushort_as_half(b); }
};
template <>
struct Staged<Format<DType::BF16>, true> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ type from_bits(uint16_t b) { return __ushort_as_bfloat16(b); }
};

template <typename F, typename Problem>
__global__ void __launch_bounds__(kThreads) implicit_gemm_kernel(Problem pb, int64_t reduction_per_split) {
  using Acc = typename F::work;
  using S = Staged<F>;
  using Stage = typename S::type;
  constexpr bool TC = kTensorCores<F>;
  __shared__ __align__(32) Stage As[BM][BK + 8];
  __shared__ __align__(32) Stage Bs[BK][BN + 8];

  const int tid = threadIdx.x;
  const int64_t M = pb.rows(), N = pb.cols(), K = pb.reduction();
  const int64_t m0 = (int64_t)blockIdx.x * BM, n0 = (int64_t)blockIdx.y * BN;
  const int64_t k_begin = (int64_t)blockIdx.z * reduction_per_split;
  const int64_t k_end = k_begin + reduction_per_split < K ? k_begin + reduction_per_split : K;

  // A tile loads: this thread's K column is fixed (tid % BK), its rows fixed too.
  const int a_k = tid % BK;
  typename Problem::Row a_rows[kLoadsA];
  bool a_valid[kLoadsA];
#pragma unroll
  for (int i = 0; i < kLoadsA; ++i) {
    const int64_t m = m0 + tid / BK + i * (kThreads / BK);
    a_valid[i] = m < M;
    a_rows[i] = pb.row(a_valid[i] ? m : 0);
  }
  const int b_n = tid % BN;

  Acc acc[4][4] = {};
  using namespace nvcuda;
  // tensor cores: 8 warps, each owns two 16x16 fragments of the 64x64 tile
  const int warp = tid / 32;
  const int frag_row = warp / 2, frag_col = (warp % 2) * 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c_frag[2];
  if constexpr (TC) {
    wmma::fill_fragment(c_frag[0], 0.0f);
    wmma::fill_fragment(c_frag[1], 0.0f);
  }
  const int ty = tid / 16, tx = tid % 16;   // FMA path: rows ty*4.., cols tx*4..

  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    const int64_t ka = k0 + a_k;
#pragma unroll
    for (int i = 0; i < kLoadsA; ++i) {
      const typename F::bits v = a_valid[i] && ka < k_end ? pb.template load_a<F>(a_rows[i], ka) : 0;
      As[tid / BK + i * (kThreads / BK)][a_k] = S::from_bits(v);
    }
#pragma unroll
    for (int i = 0; i < kLoadsB; ++i) {
      const int kk = tid / BN + i * (kThreads / BN);
      const int64_t kb = k0 + kk, n = n0 + b_n;
      const typename F::bits v = kb < k_end && n < N ? pb.template load_b<F>(kb, n) : 0;
      Bs[kk][b_n] = S::from_bits(v);
    }
    __syncthreads();
    if constexpr (TC) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
      wmma::fragment<wmma::matrix_a, 16, 16, 16, Stage, wmma::row_major> a_frag;
      wmma::load_matrix_sync(a_frag, &As[frag_row * 16][0], BK + 8);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, Stage, wmma::row_major> b_frag;
        wmma::load_matrix_sync(b_frag, &Bs[0][(frag_col + j) * 16], BN + 8);
        wmma::mma_sync(c_frag[j], a_frag, b_frag, c_frag[j]);
      }
#endif
    } else {
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        Acc av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = As[ty * 4 + i][kk];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx * 4 + j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
      }
    }
    __syncthreads();
  }

  if constexpr (TC) {
    // accumulators -> shared fp32 tile -> epilogue
    __shared__ __align__(32) float Cs[BM][BN + 4];
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&Cs[frag_row * 16][(frag_col + j) * 16], c_frag[j], BN + 4, wmma::mem_row_major);
    __syncthreads();
    for (int e = tid; e < BM * BN; e += kThreads) {
      const int64_t m = m0 + e / BN, n = n0 + e % BN;
      if (m < M && n < N) pb.template store<F>(pb.row(m), n, Cs[e / BN][e % BN]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + ty * 4 + i;
      if (m >= M) continue;
      const typename Problem::Row r = pb.row(m);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + tx * 4 + j;
        if (n < N) pb.template store<F>(r, n, acc[i][j]);
      }
    }
  }
}

template <typename F, typename Problem>
void launch(const Problem& pb, int64_t M, int64_t N, int64_t K, int64_t splits, void* stream, const char* what) {
  if (M == 0 || N == 0) return;
  const int64_t per_split = ((K + splits - 1) / splits + BK - 1) / BK * BK;
  const dim3 grid((unsigned)((M + BM - 1) / BM), (unsigned)((N + BN - 1) / BN),
                  (unsigned)((K + per_split - 1) / per_split));
  implicit_gemm_kernel<F, Problem><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(pb, per_split);
  check_launch(what);
}

}  // namespace

void causal_conv3d_forward_cuda(const CudaConvArgs& a, void* stream) {
  const ConvShape& s = a.shape;
  const ForwardProblem pb{a};
  PYRATOK_DISPATCH_DTYPE(a.dtype, launch<F>(pb, s.B * s.To * s.Ho * s.Wo, s.O, s.kt * s.kh * s.kw * s.C, 1,
                                            stream, "causal_conv3d_forward_cuda"));
}

void causal_conv3d_input_grad_cuda(const CudaConvArgs& a, void* stream) {
  const ConvShape& s = a.shape;
  const InputGradProblem pb{a, a.grad_past.data ? 0 : s.P};
  PYRATOK_DISPATCH_DTYPE(a.dtype, launch<F>(pb, s.B * (s.P + s.T - pb.p_begin) * s.H * s.W, s.C,
                                            s.kt * s.kh * s.kw * s.O, 1, stream, "causal_conv3d_input_grad_cuda"));
}

void causal_conv3d_weight_grad_cuda(const CudaConvArgs& a, void* stream) {
  const ConvShape& s = a.shape;
  const WeightGradProblem pb{a};
  const int64_t positions = s.B * s.To * s.Ho * s.Wo;
  const int64_t taps = s.kt * s.kh * s.kw * s.C;
  // enough blocks to fill the device: split the position reduction, >= 1024 per split
  const int64_t tiles = ((s.O + BM - 1) / BM) * ((taps + BN - 1) / BN);
  int64_t splits = (1024 + tiles - 1) / tiles;
  splits = splits < 1 ? 1 : splits;
  splits = splits > (positions + 1023) / 1024 ? (positions + 1023) / 1024 : splits;
  splits = splits < 1 ? 1 : splits;
  PYRATOK_DISPATCH_DTYPE(a.dtype, launch<F>(pb, s.O, taps, positions, splits, stream,
                                            "causal_conv3d_weight_grad_cuda"));
}

}  // namespace pyratok
