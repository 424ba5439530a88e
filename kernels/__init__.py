"""Triton kernels of pyratok, installed as ``pyratok.kernels``.

On a CPU machine they run under the Triton interpreter (``TRITON_INTERPRET=1`` set
before triton is imported); on CUDA they compile as usual.
"""
