"""Build script for pyratok.

The extension pyratok._C holds the C++ CPU kernels (csrc/core/*_cpu.cpp) and the torch
bindings (csrc/torch/*.cpp).  Build switches (environment variables):

  PYRATOK_BUILD_EXT=0    pure-Python install: every op still runs on its reference path
                         (and on Triton where Triton is installed).
  PYRATOK_BUILD_CUDA=0/1 force the CUDA kernels (csrc/core/*.cu) off/on.  Default: on when
                         the installed torch has CUDA and nvcc is found.
  PYRATOK_CUDA_ARCH      TORCH_CUDA_ARCH_LIST for the CUDA build (default "9.0").
  MAX_JOBS               parallel compile jobs (ninja), as for any torch extension.

torch must be importable at build time: install with `pip install --no-build-isolation`
(the Makefile does), so that pip does not fetch a second torch into a build sandbox.
"""

import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted(torch_cuda: bool) -> bool:
    flag = os.environ.get("PYRATOK_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    return torch_cuda and (shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME"))


def _extensions():
    if os.environ.get("PYRATOK_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/core/*_cpu.cpp") + rel("csrc/torch/*.cpp")
    cxx = ["-O3", "-std=c++20", "-fopenmp"]  # torch >= 2.10 headers are C++20
    macros = []
    if _cuda_wanted(torch.version.cuda is not None):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("PYRATOK_CUDA_ARCH", "9.0"))
        macros.append(("PYRATOK_WITH_CUDA", None))
        ext = CUDAExtension(
            "pyratok._C",
            sources + rel("csrc/core/*.cu"),
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("pyratok._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=[
        "pyratok",
        "pyratok.reference",
        "pyratok.ops",
        "pyratok.nn",
        "pyratok.data",
        "pyratok.models",
        "pyratok.models.wan",
        "pyratok.io",
        "pyratok.interop",
        "pyratok.train",
        "pyratok.kernels",
    ],
    package_dir={"pyratok.kernels": "kernels"},
    # the embedded default model (scripts/train_default.sh)
    package_data={"pyratok": ["assets/default/README.md",
                              *(f"assets/default/{rate}/{f}" for rate in ("low", "high")
                                for f in ("config.json", "model.safetensors"))]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
