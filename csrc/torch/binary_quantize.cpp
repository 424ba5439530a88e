// torch bindings for bit-plane binary quantization: the private kernel ops
// pyratok::_<name>.out, each one function over a device policy (CpuDevice / CudaDevice).
// They write into the outputs they are given, allocated by the op's allocate function in
// pyratok/ops/binary_quantize.py (which decides shapes, dtypes and layouts); argument
// checking for users lives there too, the checks here only keep a misuse from reaching the
// kernels.
#include <ATen/Parallel.h>

#include "../core/binary_quantize.h"
#include "common.h"

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
  if (!x.is_contiguous() && x.movedim(dim, -1).is_contiguous()) {
    L = {outer, K, inner, inner * K, 1, K};
    return x;
  }
  L = {outer, K, inner, K * inner, inner, 1};
  return x.contiguous();
}

at::Tensor checked_bits(const at::Tensor& bits, const char* arg) {
  TORCH_CHECK_VALUE(bits.scalar_type() == at::kByte || bits.scalar_type() == at::kBool, arg,
                    ": expected a uint8 or bool tensor, got ", bits.scalar_type());
  TORCH_CHECK_VALUE(bits.dim() >= 1, arg, ": expected at least one dimension");
  return bits.contiguous();
}

// K of the ops that read it off the bits' last axis: K_FROM_INPUT (-1) or that length.
int64_t bits_K(const at::Tensor& bits, int64_t K) {
  TORCH_CHECK_VALUE(K == -1 || K == bits.size(-1), "K=", K, " differs from bits.shape[-1]=", bits.size(-1));
  return bits.size(-1);
}

const uint8_t* bytes(const at::Tensor& t) { return static_cast<const uint8_t*>(t.data_ptr()); }

// ---- device policies: the kernel launches, nothing else --------------------------------

struct CpuDevice {
  using Guard = NoGuard;

  template <typename Fn>
  static void tokens(int64_t tokens, int64_t K, const Fn& fn) {
    at::parallel_for(0, tokens, token_grain(K), fn);
  }
  static void quantize(const QuantizeArgs& a, const at::Tensor&) {
    tokens(a.layout.tokens(), a.layout.K, [&](int64_t b, int64_t e) { binary_quantize_cpu(a, b, e); });
  }
  static void residual(const ResidualArgs& a, const at::Tensor&) {
    tokens(a.layout.tokens(), a.layout.K * a.levels,
           [&](int64_t b, int64_t e) { residual_binary_quantize_cpu(a, b, e); });
  }
  static void indices_to_codes(const IndicesToCodesArgs& a, const at::Tensor&) {
    tokens(a.layout.tokens(), a.layout.K, [&](int64_t b, int64_t e) { indices_to_codes_cpu(a, b, e); });
  }
  static void indices_to_bits(const void* idx, IndexType it, int64_t K, uint8_t* bits, int64_t n, const at::Tensor&) {
    tokens(n, K, [&](int64_t b, int64_t e) { indices_to_bits_cpu(idx, it, K, bits, b, e); });
  }
  static void bits_to_indices(const uint8_t* bits, int64_t K, void* idx, IndexType it, int64_t n, const at::Tensor&) {
    tokens(n, K, [&](int64_t b, int64_t e) { bits_to_indices_cpu(bits, K, idx, it, b, e); });
  }
  static void pack_bits(const uint8_t* bits, int64_t K, uint8_t* packed, int64_t n, const at::Tensor&) {
    tokens(n, K, [&](int64_t b, int64_t e) { pack_bits_cpu(bits, K, packed, b, e); });
  }
  static void unpack_bits(const uint8_t* packed, int64_t K, uint8_t* bits, int64_t n, const at::Tensor&) {
    tokens(n, K, [&](int64_t b, int64_t e) { unpack_bits_cpu(packed, K, bits, b, e); });
  }
  static void reverse_bit_order(const void* in, IndexType it, int64_t K, void* out, int64_t n, const at::Tensor&) {
    tokens(n, K, [&](int64_t b, int64_t e) { reverse_bit_order_cpu(in, it, K, out, b, e); });
  }
};

#ifdef PYRATOK_WITH_CUDA
struct CudaDevice {
  using Guard = DeviceGuard;

  static void quantize(const QuantizeArgs& a, const at::Tensor& t) { binary_quantize_cuda(a, cuda_stream(t)); }
  static void residual(const ResidualArgs& a, const at::Tensor& t) {
    residual_binary_quantize_cuda(a, cuda_stream(t));
  }
  static void indices_to_codes(const IndicesToCodesArgs& a, const at::Tensor& t) {
    indices_to_codes_cuda(a, cuda_stream(t));
  }
  static void indices_to_bits(const void* idx, IndexType it, int64_t K, uint8_t* bits, int64_t n,
                              const at::Tensor& t) {
    indices_to_bits_cuda(idx, it, K, bits, n, cuda_stream(t));
  }
  static void bits_to_indices(const uint8_t* bits, int64_t K, void* idx, IndexType it, int64_t n,
                              const at::Tensor& t) {
    bits_to_indices_cuda(bits, K, idx, it, n, cuda_stream(t));
  }
  static void pack_bits(const uint8_t* bits, int64_t K, uint8_t* packed, int64_t n, const at::Tensor& t) {
    pack_bits_cuda(bits, K, packed, n, cuda_stream(t));
  }
  static void unpack_bits(const uint8_t* packed, int64_t K, uint8_t* bits, int64_t n, const at::Tensor& t) {
    unpack_bits_cuda(packed, K, bits, n, cuda_stream(t));
  }
  static void reverse_bit_order(const void* in, IndexType it, int64_t K, void* out, int64_t n, const at::Tensor& t) {
    reverse_bit_order_cuda(in, it, K, out, n, cuda_stream(t));
  }
};
#endif

// ---- the ops: one function each, over the device policy D ------------------------------

// index_kind: 0 none, 1 indices, 2 bit labels (pyratok.ops._checks.IndexKind); `second` holds
// the indices or the bit labels (an empty tensor for none), `codes` an empty tensor without codes.
template <typename D>
void binary_quantize_op(const at::Tensor& x, int64_t dim, double scale, bool want_codes, int64_t index_kind,
                        at::Tensor& codes, at::Tensor& second) {
  const typename D::Guard guard(x);
  dim = wrap_dim(dim, x.dim());
  const int64_t K = x.size(dim);
  TORCH_CHECK_VALUE(K >= 1 && K <= 64, "x: channel axis has K=", K, ", expected 1..64");
  TORCH_CHECK_VALUE(index_kind >= 0 && index_kind <= 2, "index_kind must be 0, 1 or 2");
  TORCH_CHECK_VALUE(index_kind != 1 || K <= 63, "indices need K <= 63, got K=", K);
  const DType dt = core_dtype(x, "x");
  ChannelLayout L;
  const at::Tensor xv = channel_view(x, dim, L);
  if (want_codes) check_out_like(codes, "codes", xv, x.scalar_type());
  if (index_kind == 1) check_out(second, "indices", x, L.tokens(), index_scalar_type(K));
  if (index_kind == 2) check_out(second, "bit labels", x, L.tokens() * K, at::kByte);
  const QuantizeArgs args{dt,
                          xv.data_ptr(),
                          L,
                          scale,
                          want_codes ? codes.data_ptr() : nullptr,
                          index_kind == 1 ? second.data_ptr() : nullptr,
                          index_type_for(K),
                          index_kind == 2 ? second.data_ptr<uint8_t>() : nullptr};
  D::quantize(args, x);
}

template <typename D>
void residual_binary_quantize_op(const at::Tensor& x, int64_t levels, int64_t dim, at::Tensor& codes,
                                 at::Tensor& indices) {
  const typename D::Guard guard(x);
  dim = wrap_dim(dim, x.dim());
  const int64_t K = x.size(dim);
  TORCH_CHECK_VALUE(K >= 1 && K <= 63, "x: channel axis has K=", K, ", expected 1..63");
  TORCH_CHECK_VALUE(levels >= 1 && levels <= 32, "levels=", levels, ", expected 1..32");
  const DType dt = core_dtype(x, "x");
  ChannelLayout L;
  const at::Tensor xv = channel_view(x, dim, L);
  check_out_like(codes, "codes", xv, x.scalar_type());
  check_out(indices, "indices", x, levels * L.tokens(), index_scalar_type(K));
  D::residual(ResidualArgs{dt, xv.data_ptr(), L, int(levels), codes.data_ptr(), indices.data_ptr(), index_type_for(K)},
              x);
}

template <typename D>
void indices_to_codes_op(const at::Tensor& indices, int64_t K, int64_t dim, double scale, at::ScalarType dtype,
                         at::Tensor& codes) {
  const typename D::Guard guard(indices);
  TORCH_CHECK_VALUE(K >= 1 && K <= 63, "K=", K, ", expected 1..63");
  const IndexType it = core_index_type(indices, "indices");
  const int64_t nd = indices.dim() + 1;
  TORCH_CHECK_VALUE(dim >= -nd && dim < nd, "dim=", dim, " out of range");
  if (dim < 0) dim += nd;
  const at::Tensor idx = indices.contiguous();
  check_out(codes, "codes", indices, idx.numel() * K, dtype);
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= indices.size(d);
  for (int64_t d = dim; d < indices.dim(); ++d) inner *= indices.size(d);
  D::indices_to_codes(IndicesToCodesArgs{idx.data_ptr(), it, core_dtype(codes, "dtype"),
                                         ChannelLayout{outer, K, inner, K * inner, inner, 1}, scale, codes.data_ptr()},
                      indices);
}

template <typename D>
void indices_to_bits_op(const at::Tensor& indices, int64_t K, at::Tensor& bits) {
  const typename D::Guard guard(indices);
  TORCH_CHECK_VALUE(K >= 1 && K <= 63, "K=", K, ", expected 1..63");
  const IndexType it = core_index_type(indices, "indices");
  const at::Tensor idx = indices.contiguous();
  check_out(bits, "bits", indices, idx.numel() * K, at::kByte);
  D::indices_to_bits(idx.data_ptr(), it, K, bits.data_ptr<uint8_t>(), idx.numel(), indices);
}

template <typename D>
void bits_to_indices_op(const at::Tensor& bits_in, int64_t K_arg, at::Tensor& indices) {
  const typename D::Guard guard(bits_in);
  const at::Tensor bits = checked_bits(bits_in, "bits");
  const int64_t K = bits_K(bits, K_arg);
  TORCH_CHECK_VALUE(K >= 1 && K <= 63, "bits: last axis K=", K, ", expected 1..63");
  const int64_t tokens = bits.numel() / K;
  check_out(indices, "indices", bits, tokens, index_scalar_type(K));
  D::bits_to_indices(bytes(bits), K, indices.data_ptr(), index_type_for(K), tokens, bits);
}

template <typename D>
void pack_bits_op(const at::Tensor& bits_in, int64_t K_arg, at::Tensor& packed) {
  const typename D::Guard guard(bits_in);
  const at::Tensor bits = checked_bits(bits_in, "bits");
  const int64_t K = bits_K(bits, K_arg);
  TORCH_CHECK_VALUE(K >= 1, "bits: the last axis is empty");
  const int64_t tokens = bits.numel() / K;
  check_out(packed, "packed", bits, tokens * ((K + 7) / 8), at::kByte);
  D::pack_bits(bytes(bits), K, packed.data_ptr<uint8_t>(), tokens, bits);
}

template <typename D>
void unpack_bits_op(const at::Tensor& packed_in, int64_t K, at::Tensor& bits) {
  const typename D::Guard guard(packed_in);
  TORCH_CHECK_VALUE(packed_in.scalar_type() == at::kByte, "packed: expected uint8");
  TORCH_CHECK_VALUE(K >= 1, "K=", K, ", expected >= 1");
  TORCH_CHECK_VALUE(packed_in.dim() >= 1 && packed_in.size(-1) == (K + 7) / 8,
                    "packed: last axis must have ceil(K/8) bytes");
  const at::Tensor packed = packed_in.contiguous();
  const int64_t tokens = packed.numel() / packed.size(-1);
  check_out(bits, "bits", packed, tokens * K, at::kByte);
  D::unpack_bits(bytes(packed), K, bits.data_ptr<uint8_t>(), tokens, packed);
}

template <typename D>
void reverse_bit_order_op(const at::Tensor& indices, int64_t K, at::Tensor& out) {
  const typename D::Guard guard(indices);
  TORCH_CHECK_VALUE(K >= 1 && K <= 63, "K=", K, ", expected 1..63");
  const IndexType it = core_index_type(indices, "indices");
  const at::Tensor idx = indices.contiguous();
  check_out(out, "out", indices, idx.numel(), indices.scalar_type());
  D::reverse_bit_order(idx.data_ptr(), it, K, out.data_ptr(), idx.numel(), indices);
}

template <typename D>
void register_impls(torch::Library& m) {
  m.impl("_binary_quantize.out", &binary_quantize_op<D>);
  m.impl("_residual_binary_quantize.out", &residual_binary_quantize_op<D>);
  m.impl("_indices_to_codes.out", &indices_to_codes_op<D>);
  m.impl("_indices_to_bits.out", &indices_to_bits_op<D>);
  m.impl("_bits_to_indices.out", &bits_to_indices_op<D>);
  m.impl("_pack_bits.out", &pack_bits_op<D>);
  m.impl("_unpack_bits.out", &unpack_bits_op<D>);
  m.impl("_reverse_bit_order.out", &reverse_bit_order_op<D>);
}

}  // namespace

// Each schema is the op's allocate signature in pyratok/ops/binary_quantize.py followed by the
// outputs allocate returns.
TORCH_LIBRARY_FRAGMENT(pyratok, m) {
  m.def("_binary_quantize.out(Tensor x, int dim, float scale, bool want_codes, int index_kind, "
        "Tensor(a!) codes, Tensor(b!) second) -> ()");
  m.def("_residual_binary_quantize.out(Tensor x, int levels, int dim, Tensor(a!) codes, Tensor(b!) indices) -> ()");
  m.def("_indices_to_codes.out(Tensor indices, int K, int dim, float scale, ScalarType dtype, "
        "Tensor(a!) codes) -> ()");
  m.def("_indices_to_bits.out(Tensor indices, int K, Tensor(a!) bits) -> ()");
  m.def("_bits_to_indices.out(Tensor bits, int K, Tensor(a!) indices) -> ()");
  m.def("_pack_bits.out(Tensor bits, int K, Tensor(a!) packed) -> ()");
  m.def("_unpack_bits.out(Tensor packed, int K, Tensor(a!) bits) -> ()");
  m.def("_reverse_bit_order.out(Tensor indices, int K, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(pyratok, CPU, m) { register_impls<CpuDevice>(m); }

#ifdef PYRATOK_WITH_CUDA
TORCH_LIBRARY_IMPL(pyratok, CUDA, m) { register_impls<CudaDevice>(m); }
#endif

}  // namespace pyratok
