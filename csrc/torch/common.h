// Helpers shared by the torch bindings: tensor -> core descriptors, the checks on the outputs
// a kernel op is given, and the device policies' shared parts (guard, CUDA stream).
//
// Every private kernel op pyratok::_<name>.out takes its outputs (`Tensor(a!)`), allocated by
// the op's allocate function in pyratok/ops (the only place output shapes and layouts are
// decided); the binding checks them only far enough that the kernel cannot write out of bounds.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#ifdef PYRATOK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "../core/dtype.h"

namespace pyratok {

inline DType core_dtype(const at::Tensor& t, const char* arg) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    default:
      TORCH_CHECK_VALUE(false, arg, ": expected a float16/bfloat16/float32/float64 tensor, got ",
                        t.scalar_type());
  }
  return DType::F32;
}

inline IndexType core_index_type(const at::Tensor& t, const char* arg) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, arg,
                    ": expected an int32 or int64 tensor, got ", t.scalar_type());
  return t.scalar_type() == at::kInt ? IndexType::I32 : IndexType::I64;
}

inline IndexType index_type_for(int64_t K) { return K <= 31 ? IndexType::I32 : IndexType::I64; }

inline at::ScalarType index_scalar_type(int64_t K) { return K <= 31 ? at::kInt : at::kLong; }

// Grain size for at::parallel_for so that each task touches ~64K elements.
inline int64_t token_grain(int64_t K) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)); }

// An output the kernel writes densely from data_ptr(): `numel` elements of `dtype`, contiguous,
// on `like`'s device.
inline void check_out(const at::Tensor& out, const char* arg, const at::Tensor& like, int64_t numel,
                      at::ScalarType dtype) {
  TORCH_CHECK_VALUE(out.device() == like.device() && out.scalar_type() == dtype && out.numel() == numel &&
                        out.is_contiguous(),
                    arg, ": expected a contiguous ", dtype, " output of ", numel, " elements on ", like.device(),
                    ", got ", out.scalar_type(), " ", out.sizes(), " on ", out.device());
}

// An output the kernel writes through the layout of `like` (a ChannelLayout taken from it):
// `like`'s shape, the same strides wherever a size exceeds 1, `dtype`, on `like`'s device.
inline void check_out_like(const at::Tensor& out, const char* arg, const at::Tensor& like, at::ScalarType dtype) {
  bool same = out.device() == like.device() && out.scalar_type() == dtype && out.sizes() == like.sizes();
  for (int64_t d = 0; same && d < like.dim(); ++d) same = like.size(d) <= 1 || out.stride(d) == like.stride(d);
  TORCH_CHECK_VALUE(same, arg, ": expected a ", dtype, " output of shape ", like.sizes(), " and strides ",
                    like.strides(), ", got ", out.scalar_type(), " ", out.sizes(), " strides ", out.strides());
}

// An output the kernel writes through its own strides (a View5): shape `sizes`, `dtype`, on
// `like`'s device, any non-overlapping dense layout.
inline void check_out_shape(const at::Tensor& out, const char* arg, const at::Tensor& like, at::IntArrayRef sizes,
                            at::ScalarType dtype) {
  TORCH_CHECK_VALUE(out.device() == like.device() && out.scalar_type() == dtype && out.sizes() == sizes &&
                        out.is_non_overlapping_and_dense(),
                    arg, ": expected a dense ", dtype, " output of shape ", sizes, " on ", like.device(), ", got ",
                    out.scalar_type(), " ", out.sizes(), " strides ", out.strides(), " on ", out.device());
}

// Device policies (one per file: the CPU one splits the work with at::parallel_for, the CUDA
// one launches on the current stream) share their guards: an op function template over the
// policy D opens `const typename D::Guard guard(x);` first.
struct NoGuard {
  explicit NoGuard(const at::Tensor&) {}
};

#ifdef PYRATOK_WITH_CUDA
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};

// The current CUDA stream of t's device, as the cudaStream_t (void*) the core's launchers take.
inline void* cuda_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
#endif

}  // namespace pyratok
