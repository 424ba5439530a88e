"""Build checks that need no GPU: the CUDA branch of every torch binding must compile.

The CUDA kernels themselves (csrc/core/*.cu) are compiled by nvcc in the CMake build
(`make cpp-test`); this test covers the other half of a CUDA build, the bindings under
PYRATOK_WITH_CUDA, with the torch headers of this machine's (CPU) wheel.
"""

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension as cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_include():
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    return None


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None,
                    reason="needs g++ and the CUDA headers (nvcc's toolkit) on this machine")
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "torch", "*.cpp"))),
                         ids=os.path.basename)
def test_cuda_bindings_compile(source, tmp_path):
    # The CPU wheel omits the one generated c10 CUDA header; it only sets an export macro.
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{tmp_path}"] + [f"-I{p}" for p in cpp_extension.include_paths()]
    includes += [f"-I{_cuda_include()}", f"-I{sysconfig.get_paths()['include']}"]
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-DPYRATOK_WITH_CUDA", *includes, source]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]


def test_the_checkout_root_on_sys_path_does_not_shadow_the_pypi_kernels_package():
    """``python -m ...`` from a checkout puts its root on sys.path, where the Triton folder
    ``kernels/`` would shadow the PyPI package ``kernels`` that transformers imports (import peft
    failed with "cannot import name 'CUDAProperties' from 'kernels'")."""
    import sys

    # transformers (pinned, through peft) requires the PyPI package kernels, so it is installed
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import kernels, pyratok.kernels, peft; "
            "print(kernels.__file__); print(pyratok.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code, ROOT], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    theirs, ours = out.stdout.split()
    assert theirs != ours and ours == os.path.join(ROOT, "kernels", "__init__.py")


def test_setup_installs_every_package_and_the_bundled_model():
    # a non-editable install only has what setup.py lists: every package folder of pyratok/ and
    # every file of the bundled model (pyratok.interop was once missing)
    import ast
    import glob

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = ast.parse(open(os.path.join(root, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    listed = set(ast.literal_eval(kw["packages"]))
    found = {os.path.relpath(os.path.dirname(f), root).replace(os.sep, ".")
             for f in glob.glob(os.path.join(root, "pyratok", "**", "__init__.py"), recursive=True)}
    assert found <= listed, sorted(found - listed)
    # package_data is a literal with one generator expression: evaluated on its own, no builtins
    data = set(eval(compile(ast.Expression(kw["package_data"]), "setup.py", "eval"), {"__builtins__": {}})["pyratok"])
    shipped = {os.path.relpath(f, os.path.join(root, "pyratok")).replace(os.sep, "/")
               for f in glob.glob(os.path.join(root, "pyratok", "assets", "**", "*"), recursive=True)
               if os.path.isfile(f) and not os.path.basename(f).startswith(".")}
    assert shipped and shipped == data, (sorted(shipped - data), sorted(data - shipped))
