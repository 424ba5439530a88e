// Helpers shared by the torch bindings: tensor -> core descriptors.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

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

inline at::ScalarType index_scalar_type(int64_t K) {
  return K <= 31 ? at::kInt : at::kLong;
}

// Grain size for at::parallel_for so that each task touches ~64K elements.
inline int64_t token_grain(int64_t K) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)); }

}  // namespace pyratok
