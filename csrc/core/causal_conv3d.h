// Causal 3D convolution with implicit padding (DESIGN.md §2.3), framework-free.
//
// y[b, o, t, h, w] = bias[o] + sum_{c, it, ih, iw} weight[o, c, it, ih, iw] *
//                    xp[b, c, t*st + it*dt, h*sh + ih*dh - ph, w*sw + iw*dw - pw]
// where xp is x preceded by P = dt*(kt-1) + 1 - st past frames: the frames of `cache`
// when given, else zeros (TimePad::Zeros) or copies of frame 0 (TimePad::Replicate),
// and zero outside [0, H) x [0, W).  xp is never materialised: padded_frame() maps a
// padded frame index to its source, and spatial taps outside the image read zero.
// A chunk of T frames (T a multiple of st) gives To = T/st output frames.
//
// Every tensor is a 5-D strided view (B, C, T, H, W) in elements, so channels-first
// and channels_last_3d tensors (or any other strides) are read and written in place.
// Offsets are int64 throughout: tensors past 2^31 elements are fine.
//
// CPU (causal_conv3d_cpu.cpp): blocked implicit GEMM.  Work items are tiles of output
// rows; each packs the kt*(rows+halo) input rows it reads into a small channels-last
// slab (with the spatial zero border and the causal frame choice folded in), then
// accumulates one GEMM per (row, it, ih) tap, K = kw*C (the kw taps of a channels-last
// row are contiguous), into an fp32 (fp64 for fp64) tile, and stores tile + bias.
// Operands are fp32 for fp16/bf16/fp32 input (fp64 for fp64), or bf16 for a bf16
// forward where a bf16 GEMM exists.  The GEMM is a hook (GemmKernels): the torch
// binding plugs in oneDNN's brgemm ukernel, the C++ unit tests the portable GEMMs.
// Backward: input_grad is the same scheme in scatter form over input rows (any
// stride), weight_grad accumulates dy^T x per output row into a per-chunk
// (kt, kh, O, kw, C) buffer.
// Cost: 2*B*To*Ho*Wo*O*C*kt*kh*kw FLOPs; compute bound for C, O >= 16, judged
// against the peak FMA rate (benchmarks compare with oneDNN's conv3d).
//
// CUDA (causal_conv3d_cuda.cu): implicit GEMM, M = output positions, N = output
// channels, K = (it, ih, iw, c); padding is folded into the gather index math;
// tensor cores (WMMA) for fp16/bf16.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace pyratok {

enum class TimePad : int { Zeros = 0, Replicate = 1 };

// A 5-D strided view (B, C, T, H, W); strides in elements.
struct View5 {
  const void* data;
  int64_t stride[5];
  PYRATOK_HD int64_t offset(int64_t b, int64_t c, int64_t t, int64_t h, int64_t w) const {
    return b * stride[0] + c * stride[1] + t * stride[2] + h * stride[3] + w * stride[4];
  }
};

struct MutView5 {
  void* data;
  int64_t stride[5];
  PYRATOK_HD int64_t offset(int64_t b, int64_t c, int64_t t, int64_t h, int64_t w) const {
    return b * stride[0] + c * stride[1] + t * stride[2] + h * stride[3] + w * stride[4];
  }
};

struct ConvShape {
  int64_t B, C, O, T, H, W;         // x is (B, C, T, H, W), weight (O, C, kt, kh, kw)
  int64_t kt, kh, kw;
  int64_t st, sh, sw;
  int64_t dt, dh, dw;
  int64_t ph, pw;                   // spatial zero padding (both sides)
  TimePad time_pad;
  bool has_cache;                   // past frames come from a (B, C, P, H, W) cache
  // derived by make_conv_shape
  int64_t P;                        // past frames
  int64_t To, Ho, Wo;               // output frames / rows / columns
};

// Fills the derived fields; returns false when the geometry is invalid (P < 0, T not a
// multiple of st, empty output) or a reduction is empty (C, O, kt, kh, kw or the input's
// H, W of 0; an empty batch B = 0 is valid).
bool make_conv_shape(ConvShape& s);

PYRATOK_HD int64_t past_frames(int64_t kt, int64_t st, int64_t dt) { return dt * (kt - 1) + 1 - st; }

// Where padded frame p (0 <= p < P + T) of the causal input comes from.
enum class FrameKind : int { Input = 0, Cache = 1, Zero = 2 };
struct FrameSource {
  FrameKind kind;
  int64_t frame;
};

PYRATOK_HD FrameSource padded_frame(const ConvShape& s, int64_t p) {
  if (p >= s.P) return {FrameKind::Input, p - s.P};
  if (s.has_cache) return {FrameKind::Cache, p};
  if (s.time_pad == TimePad::Replicate) return {FrameKind::Input, 0};
  return {FrameKind::Zero, 0};
}

// ---- CPU ---------------------------------------------------------------------------

// C (M x N, row stride ldc) = [C +] A (M x K, row stride lda) * B (K x N, row stride ldb).
// Row strides may be smaller than the row length (overlapping sliding windows).
template <typename T>
using GemmFn = void (*)(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                        int64_t ldb, T* C, int64_t ldc, bool accumulate);

// bfloat16 operands (raw bits) with an fp32 C; B is in VNNI order: row pair k/2 holds
// (B[k][n], B[k+1][n]) next to each other, ldb counts columns (K even).
using GemmBf16Fn = void (*)(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda,
                            const uint16_t* B, int64_t ldb, float* C, int64_t ldc, bool accumulate);

struct GemmKernels {
  GemmFn<float> f32;
  GemmFn<double> f64;
  GemmBf16Fn bf16_vnni;     // or nullptr: bfloat16 then computes in fp32
};

// A straightforward register-friendly GEMM, used where no tuned kernel is plugged in.
template <typename T>
void gemm_portable(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                   T* C, int64_t ldc, bool accumulate);
void gemm_portable_bf16_vnni(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                             int64_t ldb, float* C, int64_t ldc, bool accumulate);

GemmKernels portable_gemm_kernels();

// Weights repacked once per call in the compute type (float for f16/bf16/f32, double
// for f64): forward (kt, kh, kw, C, O); input_grad (kt, kh, kw, O, C), or the forward
// order for layers with few input channels (their input gradient runs channels-first).
// A bfloat16 forward with a bf16_vnni GEMM and an even C keeps bfloat16 operands: its
// weights are the forward matrix (kt*kh*kw*C rows, O columns) in VNNI row pairs.
int64_t packed_weight_elements(const ConvShape& s);
bool forward_uses_bf16_vnni(DType dtype, const ConvShape& s, const GemmKernels& gemm);
void pack_weight_forward(DType dtype, const ConvShape& s, View5 weight, void* packed, bool vnni);
void pack_weight_input_grad(DType dtype, const ConvShape& s, View5 weight, void* packed);

struct ForwardArgs {
  DType dtype;
  ConvShape shape;
  View5 x;                  // (B, C, T, H, W)
  View5 cache;              // (B, C, P, H, W), data == nullptr when !shape.has_cache
  const void* weight;       // packed forward weights (compute type, or bf16 VNNI)
  const void* bias;         // (O,) compute type, or nullptr
  MutView5 y;               // (B, O, To, Ho, Wo)
};

// Output tiles: (b, t, block of rows); process tiles [begin, end).
int64_t forward_tiles(const ConvShape& s);
void causal_conv3d_forward_cpu(const ForwardArgs& a, const GemmKernels& gemm, int64_t begin,
                               int64_t end);

// Winograd F(2x2, 3x3) forward (Lavin & Gray 2016) for layers with a 3x3 spatial kernel,
// spatial stride and dilation 1 (any kt, st, dt, padding, time padding, cache): every
// frame's 4x4 input tiles (stride 2) are transformed, V = B^T d B, the weights once,
// U = G g G^T, and each of the 16 transform points is one GEMM per temporal tap
// (M = tiles, N = O, K = C), M += V U, followed by the output transform Y = A^T M A
// (2x2 outputs per tile).  That is 16 multiplies per 4 outputs instead of 36: 2.25x fewer
// GEMM FLOPs, for transforms that cost O(C + O) per tile.  fp32 error grows by a small
// constant factor (tests: at most 2x that of the direct path against fp64).
// `algo` Auto picks it for fp32 layers with C, O >= kWinogradMinChannels (measured on
// the benchmark's layers); Winograd forces it wherever the geometry allows (any dtype,
// computing in the work type: how the tests check it in fp64); Direct never.
enum class ConvAlgo : int { Auto = 0, Direct = 1, Winograd = 2 };
constexpr int64_t kWinogradMinChannels = 48;  // 48->48 at 64^2: 0.85-0.92x of direct; 32->32: 1.03-1.07x

bool winograd_geometry(const ConvShape& s);
bool forward_uses_winograd(DType dtype, const ConvShape& s, ConvAlgo algo);
// Transformed weights (kt, 16, C, O) in the compute type.
int64_t winograd_weight_elements(const ConvShape& s);
void pack_weight_winograd(DType dtype, const ConvShape& s, View5 weight, void* packed);
// Tasks: (b, t, block of tile rows); process [begin, end).  a.weight: the Winograd weights.
int64_t winograd_forward_tiles(const ConvShape& s);
void causal_conv3d_forward_winograd_cpu(const ForwardArgs& a, const GemmKernels& gemm, int64_t begin,
                                        int64_t end);

struct InputGradArgs {
  DType dtype;
  ConvShape shape;
  View5 grad_y;             // (B, O, To, Ho, Wo)
  const void* weight;       // packed input_grad weights (compute type)
  MutView5 grad_x;          // (B, C, T, H, W), or data == nullptr
  MutView5 grad_past;       // (B, C, P, H, W) gradient of the past frames, or data == nullptr
};

// Rows of the padded input (b, p, h), p in [0, P + T); rows whose destination is null
// are skipped.
int64_t input_grad_rows(const ConvShape& s);
void causal_conv3d_input_grad_cpu(const InputGradArgs& a, const GemmKernels& gemm, int64_t begin,
                                  int64_t end);

struct WeightGradArgs {
  DType dtype;
  ConvShape shape;
  View5 x;
  View5 cache;
  View5 grad_y;
};

// Output rows (b, t, h); accumulates into `accum` (compute type, (kt, kh, O, kw, C)),
// which the caller zeroes and later reduces across threads.
int64_t weight_grad_rows(const ConvShape& s);
int64_t weight_grad_elements(const ConvShape& s);
void causal_conv3d_weight_grad_cpu(const WeightGradArgs& a, const GemmKernels& gemm, int64_t begin,
                                   int64_t end, void* accum);
// accum (kt, kh, O, kw, C) compute type -> grad_weight (O, C, kt, kh, kw) in dtype.
void store_weight_grad(DType dtype, const ConvShape& s, const void* accum, MutView5 grad_weight);

// ---- CUDA (causal_conv3d_cuda.cu); `stream` is a cudaStream_t -----------------------

struct CudaConvArgs {
  DType dtype;
  ConvShape shape;          // every extent below 2^31 (the kernels walk coordinates in int32)
  View5 x;
  View5 cache;
  const void* packed_weight;  // forward: (kt, kh, kw, C, O), input_grad: (kt, kh, kw, O, C), contiguous
  const void* bias;         // (O,) contiguous, or nullptr
  View5 grad_y;
  MutView5 y;               // forward output
  MutView5 grad_x;          // input_grad outputs (data may be null)
  MutView5 grad_past;
  void* grad_weight_partial;  // (splits, O, kt*kh*kw*C) in the compute type, every element written
};

// Empty outputs launch nothing; an empty reduction (B = 0 in the weight gradient) stores
// zeros.  C, O >= 1 (make_conv_shape).
void causal_conv3d_forward_cuda(const CudaConvArgs& a, void* stream);
void causal_conv3d_input_grad_cuda(const CudaConvArgs& a, void* stream);
// Deterministic: split z of the position reduction stores partial z; the caller sums the
// `causal_conv3d_weight_grad_splits(shape)` partials in a fixed order.
int64_t causal_conv3d_weight_grad_splits(const ConvShape& s);
void causal_conv3d_weight_grad_cuda(const CudaConvArgs& a, void* stream);

}  // namespace pyratok
