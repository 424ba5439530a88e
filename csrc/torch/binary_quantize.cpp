// torch bindings for bit-plane binary quantization: schemas of the private kernel
// ops pyratok::_<name> and their CPU (and, in CUDA builds, CUDA) implementations.
// Argument checking for users lives in pyratok/ops/binary_quantize.py; the checks
// here only keep a misuse from reaching the kernels.
#include <ATen/Parallel.h>

#include <vector>

#include "../core/binary_quantize.h"
#include "common.h"

#ifdef PYRATOK_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace pyratok {
namespace {

int64_t wrap_dim(int64_t dim, int64_t ndim) {
  TORCH_CHECK_VALUE(ndim >= 1, "x: expected at least one dimension");
  TORCH_CHECK_VALUE(dim >= -ndim && dim < ndim, "dim=", dim, " out of range for a ", ndim,
                    "-D tensor");
  return dim < 0 ? dim + ndim : dim;
}

// Views x as (outer, K, inner).  Channel-first-contiguous and channel-last-dense
// tensors are used in place; anything else is made contiguous first.
at::Tensor channel_view(const at::Tensor& x, int64_t dim, ChannelLayout& L) {
  const int64_t K = x.size(dim);
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= x.size(d);
  for (int64_t d = dim + 1; d < x.dim(); ++d) inner *= x.size(d);
  at::Tensor v = x;
  if (!x.is_contiguous() && x.movedim(dim, -1).is_contiguous()) {
    L = {outer, K, inner, inner * K, 1, K};
    return v;
  }
  v = x.contiguous();
  L = {outer, K, inner, K * inner, inner, 1};
  return v;
}

std::vector<int64_t> shape_without(const at::Tensor& x, int64_t dim) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.erase(s.begin() + dim);
  return s;
}

struct QuantizePlan {
  at::Tensor xv, codes, indices, labels;
  QuantizeArgs args;
};

QuantizePlan plan_quantize(const at::Tensor& x, int64_t dim, double scale, bool want_codes,
                           int64_t index_kind) {
  QuantizePlan p;
  dim = wrap_dim(dim, x.dim());
  const int64_t K = x.size(dim);
  TORCH_CHECK_VALUE(K >= 1 && K <= 64, "x: channel axis has K=", K, ", expected 1..64");
  TORCH_CHECK_VALUE(index_kind >= 0 && index_kind <= 2, "index_kind must be 0, 1 or 2");
  TORCH_CHECK_VALUE(index_kind != 1 || K <= 63, "indices need K <= 63, got K=", K);
  ChannelLayout L;
  p.xv = channel_view(x, dim, L);
  const auto opts = x.options();
  auto rest = shape_without(x, dim);
  p.codes = want_codes ? at::empty_like(p.xv) : at::empty({0}, opts);
  p.indices = index_kind == 1 ? at::empty(rest, opts.dtype(index_scalar_type(K)))
                              : at::empty({0}, opts.dtype(index_scalar_type(std::min<int64_t>(K, 63))));
  auto lshape = rest;
  lshape.push_back(K);
  p.labels = index_kind == 2 ? at::empty(lshape, opts.dtype(at::kByte)) : at::empty({0}, opts.dtype(at::kByte));
  p.args = {core_dtype(x, "x"),
            p.xv.data_ptr(),
            L,
            scale,
            want_codes ? p.codes.data_ptr() : nullptr,
            index_kind == 1 ? p.indices.data_ptr() : nullptr,
            K <= 31 ? IndexType::I32 : IndexType::I64,
            index_kind == 2 ? p.labels.data_ptr<uint8_t>() : nullptr};
  return p;
}

std::tuple<at::Tensor, at::Tensor> quantize_outputs(QuantizePlan& p, int64_t index_kind) {
  return {p.codes, index_kind == 2 ? p.labels : p.indices};
}

struct ResidualPlan {
  at::Tensor xv, codes, indices;
  ResidualArgs args;
};

ResidualPlan plan_residual(const at::Tensor& x, int64_t levels, int64_t dim) {
  ResidualPlan p;
  dim = wrap_dim(dim, x.dim());
  const int64_t K = x.size(dim);
  TORCH_CHECK_VALUE(K >= 1 && K <= 63, "x: channel axis has K=", K, ", expected 1..63");
  TORCH_CHECK_VALUE(levels >= 1 && levels <= 32, "levels=", levels, ", expected 1..32");
  ChannelLayout L;
  p.xv = channel_view(x, dim, L);
  p.codes = at::empty_like(p.xv);
  auto shape = shape_without(x, dim);
  shape.insert(shape.begin(), levels);
  p.indices = at::empty(shape, x.options().dtype(index_scalar_type(K)));
  p.args = {core_dtype(x, "x"), p.xv.data_ptr(), L, (int)levels, p.codes.data_ptr(),
            p.indices.data_ptr(), K <= 31 ? IndexType::I32 : IndexType::I64};
  return p;
}

struct CodesPlan {
  at::Tensor idx, codes;
  IndicesToCodesArgs args;
};

CodesPlan plan_indices_to_codes(const at::Tensor& indices, int64_t K, int64_t dim, double scale,
                                at::ScalarType dtype) {
  CodesPlan p;
  TORCH_CHECK_VALUE(K >= 1 && K <= 63, "K=", K, ", expected 1..63");
  const IndexType it = core_index_type(indices, "indices");
  const int64_t nd = indices.dim() + 1;
  TORCH_CHECK_VALUE(dim >= -nd && dim < nd, "dim=", dim, " out of range");
  if (dim < 0) dim += nd;
  p.idx = indices.contiguous();
  std::vector<int64_t> shape(indices.sizes().begin(), indices.sizes().end());
  shape.insert(shape.begin() + dim, K);
  p.codes = at::empty(shape, indices.options().dtype(dtype));
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= shape[d];
  for (int64_t d = dim + 1; d < nd; ++d) inner *= shape[d];
  p.args = {p.idx.data_ptr(), it, core_dtype(p.codes, "dtype"),
            ChannelLayout{outer, K, inner, K * inner, inner, 1}, scale, p.codes.data_ptr()};
  return p;
}

at::Tensor bits_shape_out(const at::Tensor& like, int64_t K) {
  std::vector<int64_t> s(like.sizes().begin(), like.sizes().end());
  s.push_back(K);
  return at::empty(s, like.options().dtype(at::kByte));
}

at::Tensor check_bits(const at::Tensor& bits, const char* arg) {
  TORCH_CHECK_VALUE(bits.scalar_type() == at::kByte || bits.scalar_type() == at::kBool, arg,
                    ": expected a uint8 or bool tensor, got ", bits.scalar_type());
  TORCH_CHECK_VALUE(bits.dim() >= 1, arg, ": expected at least one dimension");
  return bits.contiguous();
}

template <typename Fn>
void parallel_tokens(int64_t tokens, int64_t K, const Fn& fn) {
  at::parallel_for(0, tokens, token_grain(K), fn);
}

// ---- CPU implementations --------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> binary_quantize_cpu_op(const at::Tensor& x, int64_t dim,
                                                          double scale, bool want_codes,
                                                          int64_t index_kind) {
  auto p = plan_quantize(x, dim, scale, want_codes, index_kind);
  parallel_tokens(p.args.layout.tokens(), p.args.layout.K,
                  [&](int64_t b, int64_t e) { binary_quantize_cpu(p.args, b, e); });
  return quantize_outputs(p, index_kind);
}

std::tuple<at::Tensor, at::Tensor> residual_binary_quantize_cpu_op(const at::Tensor& x,
                                                                   int64_t levels, int64_t dim) {
  auto p = plan_residual(x, levels, dim);
  parallel_tokens(p.args.layout.tokens(), p.args.layout.K * levels,
                  [&](int64_t b, int64_t e) { residual_binary_quantize_cpu(p.args, b, e); });
  return {p.codes, p.indices};
}

at::Tensor indices_to_codes_cpu_op(const at::Tensor& indices, int64_t K, int64_t dim, double scale,
                                   at::ScalarType dtype) {
  auto p = plan_indices_to_codes(indices, K, dim, scale, dtype);
  parallel_tokens(p.args.layout.tokens(), K,
                  [&](int64_t b, int64_t e) { indices_to_codes_cpu(p.args, b, e); });
  return p.codes;
}

at::Tensor indices_to_bits_cpu_op(const at::Tensor& indices, int64_t K) {
  TORCH_CHECK_VALUE(K >= 1 && K <= 63, "K=", K, ", expected 1..63");
  const IndexType it = core_index_type(indices, "indices");
  auto idx = indices.contiguous();
  auto out = bits_shape_out(indices, K);
  parallel_tokens(idx.numel(), K, [&](int64_t b, int64_t e) {
    indices_to_bits_cpu(idx.data_ptr(), it, K, out.data_ptr<uint8_t>(), b, e);
  });
  return out;
}

at::Tensor bits_to_indices_cpu_op(const at::Tensor& bits_in) {
  auto bits = check_bits(bits_in, "bits");
  const int64_t K = bits.size(-1);
  TORCH_CHECK_VALUE(K >= 1 && K <= 63, "bits: last axis K=", K, ", expected 1..63");
  auto out = at::empty(bits.sizes().slice(0, bits.dim() - 1), bits.options().dtype(index_scalar_type(K)));
  const IndexType it = K <= 31 ? IndexType::I32 : IndexType::I64;
  const auto* src = static_cast<const uint8_t*>(bits.data_ptr());
  parallel_tokens(out.numel(), K,
                  [&](int64_t b, int64_t e) { bits_to_indices_cpu(src, K, out.data_ptr(), it, b, e); });
  return out;
}

at::Tensor pack_bits_cpu_op(const at::Tensor& bits_in) {
  auto bits = check_bits(bits_in, "bits");
  const int64_t K = bits.size(-1);
  TORCH_CHECK_VALUE(K >= 1, "bits: the last axis is empty");
  std::vector<int64_t> s(bits.sizes().begin(), bits.sizes().end());
  s.back() = (K + 7) / 8;
  auto out = at::empty(s, bits.options().dtype(at::kByte));
  const auto* src = static_cast<const uint8_t*>(bits.data_ptr());
  parallel_tokens(bits.numel() / K, K,
                  [&](int64_t b, int64_t e) { pack_bits_cpu(src, K, out.data_ptr<uint8_t>(), b, e); });
  return out;
}

at::Tensor unpack_bits_cpu_op(const at::Tensor& packed_in, int64_t K) {
  TORCH_CHECK_VALUE(packed_in.scalar_type() == at::kByte, "packed: expected uint8");
  TORCH_CHECK_VALUE(K >= 1, "K=", K, ", expected >= 1");
  TORCH_CHECK_VALUE(packed_in.dim() >= 1 && packed_in.size(-1) == (K + 7) / 8,
                    "packed: last axis must have ceil(K/8) bytes");
  auto packed = packed_in.contiguous();
  std::vector<int64_t> s(packed.sizes().begin(), packed.sizes().end());
  s.back() = K;
  auto out = at::empty(s, packed.options());
  parallel_tokens(out.numel() / K, K, [&](int64_t b, int64_t e) {
    unpack_bits_cpu(packed.data_ptr<uint8_t>(), K, out.data_ptr<uint8_t>(), b, e);
  });
  return out;
}

at::Tensor reverse_bit_order_cpu_op(const at::Tensor& indices, int64_t K) {
  TORCH_CHECK_VALUE(K >= 1 && K <= 63, "K=", K, ", expected 1..63");
  const IndexType it = core_index_type(indices, "indices");
  auto idx = indices.contiguous();
  auto out = at::empty_like(idx);
  parallel_tokens(idx.numel(), K, [&](int64_t b, int64_t e) {
    reverse_bit_order_cpu(idx.data_ptr(), it, K, out.data_ptr(), b, e);
  });
  return out;
}

#ifdef PYRATOK_WITH_CUDA
// ---- CUDA implementations -------------------------------------------------------

void* current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

std::tuple<at::Tensor, at::Tensor> binary_quantize_cuda_op(const at::Tensor& x, int64_t dim,
                                                           double scale, bool want_codes,
                                                           int64_t index_kind) {
  c10::cuda::CUDAGuard guard(x.device());
  auto p = plan_quantize(x, dim, scale, want_codes, index_kind);
  binary_quantize_cuda(p.args, current_stream(x));
  return quantize_outputs(p, index_kind);
}

std::tuple<at::Tensor, at::Tensor> residual_binary_quantize_cuda_op(const at::Tensor& x,
                                                                    int64_t levels, int64_t dim) {
  c10::cuda::CUDAGuard guard(x.device());
  auto p = plan_residual(x, levels, dim);
  residual_binary_quantize_cuda(p.args, current_stream(x));
  return {p.codes, p.indices};
}

at::Tensor indices_to_codes_cuda_op(const at::Tensor& indices, int64_t K, int64_t dim,
                                    double scale, at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(indices.device());
  auto p = plan_indices_to_codes(indices, K, dim, scale, dtype);
  indices_to_codes_cuda(p.args, current_stream(indices));
  return p.codes;
}

at::Tensor indices_to_bits_cuda_op(const at::Tensor& indices, int64_t K) {
  c10::cuda::CUDAGuard guard(indices.device());
  TORCH_CHECK_VALUE(K >= 1 && K <= 63, "K=", K, ", expected 1..63");
  const IndexType it = core_index_type(indices, "indices");
  auto idx = indices.contiguous();
  auto out = bits_shape_out(indices, K);
  indices_to_bits_cuda(idx.data_ptr(), it, K, out.data_ptr<uint8_t>(), idx.numel(),
                       current_stream(indices));
  return out;
}

at::Tensor bits_to_indices_cuda_op(const at::Tensor& bits_in) {
  c10::cuda::CUDAGuard guard(bits_in.device());
  auto bits = check_bits(bits_in, "bits");
  const int64_t K = bits.size(-1);
  TORCH_CHECK_VALUE(K >= 1 && K <= 63, "bits: last axis K=", K, ", expected 1..63");
  auto out = at::empty(bits.sizes().slice(0, bits.dim() - 1), bits.options().dtype(index_scalar_type(K)));
  bits_to_indices_cuda(static_cast<const uint8_t*>(bits.data_ptr()), K, out.data_ptr(),
                       K <= 31 ? IndexType::I32 : IndexType::I64, out.numel(), current_stream(bits));
  return out;
}

at::Tensor pack_bits_cuda_op(const at::Tensor& bits_in) {
  c10::cuda::CUDAGuard guard(bits_in.device());
  auto bits = check_bits(bits_in, "bits");
  const int64_t K = bits.size(-1);
  TORCH_CHECK_VALUE(K >= 1, "bits: the last axis is empty");
  std::vector<int64_t> s(bits.sizes().begin(), bits.sizes().end());
  s.back() = (K + 7) / 8;
  auto out = at::empty(s, bits.options().dtype(at::kByte));
  pack_bits_cuda(static_cast<const uint8_t*>(bits.data_ptr()), K, out.data_ptr<uint8_t>(),
                 bits.numel() / K, current_stream(bits));
  return out;
}

at::Tensor unpack_bits_cuda_op(const at::Tensor& packed_in, int64_t K) {
  c10::cuda::CUDAGuard guard(packed_in.device());
  TORCH_CHECK_VALUE(packed_in.scalar_type() == at::kByte, "packed: expected uint8");
  TORCH_CHECK_VALUE(K >= 1, "K=", K, ", expected >= 1");
  TORCH_CHECK_VALUE(packed_in.dim() >= 1 && packed_in.size(-1) == (K + 7) / 8,
                    "packed: last axis must have ceil(K/8) bytes");
  auto packed = packed_in.contiguous();
  std::vector<int64_t> s(packed.sizes().begin(), packed.sizes().end());
  s.back() = K;
  auto out = at::empty(s, packed.options());
  unpack_bits_cuda(packed.data_ptr<uint8_t>(), K, out.data_ptr<uint8_t>(), out.numel() / K,
                   current_stream(packed));
  return out;
}

at::Tensor reverse_bit_order_cuda_op(const at::Tensor& indices, int64_t K) {
  c10::cuda::CUDAGuard guard(indices.device());
  TORCH_CHECK_VALUE(K >= 1 && K <= 63, "K=", K, ", expected 1..63");
  const IndexType it = core_index_type(indices, "indices");
  auto idx = indices.contiguous();
  auto out = at::empty_like(idx);
  reverse_bit_order_cuda(idx.data_ptr(), it, K, out.data_ptr(), idx.numel(), current_stream(indices));
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyratok, m) {
  m.def("_binary_quantize(Tensor x, int dim, float scale, bool want_codes, int index_kind) -> (Tensor, Tensor)");
  m.def("_residual_binary_quantize(Tensor x, int levels, int dim) -> (Tensor, Tensor)");
  m.def("_indices_to_codes(Tensor indices, int K, int dim, float scale, ScalarType dtype) -> Tensor");
  m.def("_indices_to_bits(Tensor indices, int K) -> Tensor");
  m.def("_bits_to_indices(Tensor bits) -> Tensor");
  m.def("_pack_bits(Tensor bits) -> Tensor");
  m.def("_unpack_bits(Tensor packed, int K) -> Tensor");
  m.def("_reverse_bit_order(Tensor indices, int K) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyratok, CPU, m) {
  m.impl("_binary_quantize", &binary_quantize_cpu_op);
  m.impl("_residual_binary_quantize", &residual_binary_quantize_cpu_op);
  m.impl("_indices_to_codes", &indices_to_codes_cpu_op);
  m.impl("_indices_to_bits", &indices_to_bits_cpu_op);
  m.impl("_bits_to_indices", &bits_to_indices_cpu_op);
  m.impl("_pack_bits", &pack_bits_cpu_op);
  m.impl("_unpack_bits", &unpack_bits_cpu_op);
  m.impl("_reverse_bit_order", &reverse_bit_order_cpu_op);
}

#ifdef PYRATOK_WITH_CUDA
TORCH_LIBRARY_IMPL(pyratok, CUDA, m) {
  m.impl("_binary_quantize", &binary_quantize_cuda_op);
  m.impl("_residual_binary_quantize", &residual_binary_quantize_cuda_op);
  m.impl("_indices_to_codes", &indices_to_codes_cuda_op);
  m.impl("_indices_to_bits", &indices_to_bits_cuda_op);
  m.impl("_bits_to_indices", &bits_to_indices_cuda_op);
  m.impl("_pack_bits", &pack_bits_cuda_op);
  m.impl("_unpack_bits", &unpack_bits_cuda_op);
  m.impl("_reverse_bit_order", &reverse_bit_order_cuda_op);
}
#endif

}  // namespace pyratok
