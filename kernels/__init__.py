"""Triton kernels of pyratok, installed as ``pyratok.kernels``.

On a CPU machine they run under the Triton interpreter (``TRITON_INTERPRET=1`` set
before triton is imported); on CUDA they compile as usual.
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: a source checkout's root is on sys.path (``python -m ...``
    # run from it), and this folder shadows the PyPI package ``kernels`` that transformers imports
    # (``from kernels import CUDAProperties`` broke ``import peft`` there).  Load that package in
    # our place when it is installed; the Triton kernels are only ever imported as pyratok.kernels.
    def _load_the_real_kernels_package():
        import importlib.machinery
        import importlib.util
        import os
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module            # `import kernels` returns what sys.modules holds
        spec.loader.exec_module(module)

    _load_the_real_kernels_package()
