// The Python module pyratok._C: importing it registers the kernel ops (the
// TORCH_LIBRARY blocks in this extension) and exposes how it was built.
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyratok C++/CUDA kernels (ops are under torch.ops.pyratok)";
#ifdef PYRATOK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  m.attr("parallel_info") = at::get_parallel_info();
}
