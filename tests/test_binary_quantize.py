"""Bit-plane binary quantization: every backend bit-exact against the reference, the
round trips, the straight-through gradient, opcheck, bad input, and vector-quantize-pytorch
LFQ as an outside oracle."""

import math

import numpy as np
import pytest
import torch

from pyratok import ops
from pyratok.nn import BinaryQuantizer
from pyratok.reference import binary_quantize as ref
import oracles as oracle
from conftest import CPU_BACKENDS, CUDA_BACKENDS, backend_dtypes, requires_cuda

KS = [1, 7, 8, 16, 17, 18, 31, 32, 33, 63, 64]


def special_input(shape, dim, dtype, seed=0):
    """Random values with +0, -0, NaN, +-inf and tiny subnormals planted along the channel axis."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    flat = x.movedim(dim, -1).reshape(-1, shape[dim])
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, -1e-40],
                            dtype=torch.float64)
    n = min(flat.shape[0], len(specials))
    for j in range(n):
        flat[j, j % shape[dim]] = specials[j]
    x = flat.reshape(x.movedim(dim, -1).shape).movedim(-1, dim)
    return x.to(dtype)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor):
    """Bitwise equality (NaN-safe and distinguishing -0 from +0)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.is_floating_point():
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.contiguous().view(width), b.contiguous().view(width)
    assert torch.equal(a.cpu(), b.cpu())


def check_against_reference(x, dim, backend, spherical=False):
    """Every backend, the reference included, against the numpy oracle of tests/oracles.py."""
    K = x.shape[dim]
    scale = 1 / math.sqrt(K) if spherical else 1.0
    want_codes, want_idx, want_bits = oracle.binary_quantize(x, dim, scale)
    if K <= 63:
        out = ops.binary_quantize(x, dim, spherical=spherical, backend=backend)
        assert_same_bits(out.codes, want_codes)
        assert_same_bits(out.indices, want_idx)
        assert out.indices.dtype == (torch.int32 if K <= 31 else torch.int64)
    labels = ops.binary_quantize(x, dim, bit_labels=True, return_codes=False, backend=backend).bits
    assert_same_bits(labels, want_bits)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("K", KS)
def test_channel_first_all_dtypes(backend, K):
    for dtype in backend_dtypes(backend):
        x = special_input((2, K, 3, 5, 7), 1, dtype, seed=K)
        check_against_reference(x, 1, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("K", [1, 8, 17, 33, 64])
def test_channels_last_and_views(backend, K):
    for dtype in backend_dtypes(backend):
        base = special_input((2, K, 3, 4, 5), 1, dtype, seed=K + 1)
        check_against_reference(base.to(memory_format=torch.channels_last_3d), 1, backend)
        check_against_reference(special_input((3, 5, K), 2, dtype), -1, backend)
        # non-contiguous views: a strided slice and a permutation
        check_against_reference(base[:, :, ::2, 1:, ::3], 1, backend)
        check_against_reference(base.permute(0, 2, 1, 4, 3), 2, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_odd_shapes_and_spherical(backend):
    for shape, dim in [((1, 5, 1, 1, 1), 1), ((7, 3), 1), ((13,), 0), ((3, 2, 1031), 1), ((0, 4, 3), 1)]:
        x = torch.randn(shape)
        check_against_reference(x, dim, backend)
        check_against_reference(x, dim, backend, spherical=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_codes_preserve_channels_last_layout(backend):
    x = torch.randn(2, 8, 3, 4, 5).to(memory_format=torch.channels_last_3d)
    out = ops.binary_quantize(x, backend=backend)
    assert out.codes.stride() == x.stride()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("K", [1, 5, 16, 31, 32, 63])
def test_round_trips(backend, K):
    g = torch.Generator().manual_seed(K)
    x = torch.randn(3, K, 2, 3, 5, generator=g)
    out = ops.binary_quantize(x, backend=backend)
    # index -> code
    assert_same_bits(ops.indices_to_codes(out.indices, K, backend=backend), out.codes)
    # index -> bits -> index, bits -> packed -> bits
    bits = ops.indices_to_bits(out.indices, K, backend=backend)
    assert_same_bits(bits, torch.from_numpy(oracle.index_to_bits(out.indices, K)))
    assert_same_bits(ops.bits_to_indices(bits, backend=backend), out.indices)
    packed = ops.pack_bits(bits, backend=backend)
    assert packed.shape[-1] == (K + 7) // 8
    np.testing.assert_array_equal(packed.numpy(), np.packbits(bits.numpy(), axis=-1, bitorder="big"))
    assert_same_bits(ops.unpack_bits(packed, K, backend=backend), bits)
    # bit planes: pack the transposed (K, N) bits
    planes = ops.pack_bits(bits.reshape(-1, K).T.contiguous(), backend=backend)
    assert_same_bits(ops.unpack_bits(planes, bits.numel() // K, backend=backend).T, bits.reshape(-1, K))
    # MSB <-> LSB
    lsb = ops.msb_to_lsb(out.indices, K, backend=backend)
    assert_same_bits(lsb, torch.from_numpy(oracle.bits_to_index(oracle.index_to_bits(out.indices, K)[..., ::-1]))
                     .to(out.indices.dtype))
    assert_same_bits(ops.lsb_to_msb(lsb, K, backend=backend), out.indices)
    lsb_sum = sum(bits[..., k].to(torch.int64) << k for k in range(K))  # Open-MAGVIT2: bit k -> 2^k
    assert torch.equal(lsb.to(torch.int64), lsb_sum)
    # bool bits are accepted
    assert_same_bits(ops.bits_to_indices(bits.bool(), backend=backend), out.indices)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_indices_to_codes_dtypes_and_spherical(backend):
    idx = torch.randint(0, 2**17, (2, 3, 4), dtype=torch.int32)
    for dtype in backend_dtypes(backend):
        got = ops.indices_to_codes(idx, 17, spherical=True, dtype=dtype, backend=backend)
        assert_same_bits(got, oracle.indices_to_codes(idx, 17, 1, 1 / math.sqrt(17), dtype).contiguous())
        got_last = ops.indices_to_codes(idx, 17, dim=-1, dtype=dtype, backend=backend)
        assert_same_bits(got_last, oracle.indices_to_codes(idx, 17, 3, 1.0, dtype).contiguous())
    big = torch.randint(0, 2**62, (5, 7), dtype=torch.int64) * 2 + 1
    assert_same_bits(ops.indices_to_codes(big, 63, backend=backend), oracle.indices_to_codes(big, 63, 1, 1.0, torch.float32))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("levels", [1, 4, 9])
def test_residual_binary_quantize(backend, levels):
    for dtype in backend_dtypes(backend):
        for K, layout in [(16, "first"), (17, "last"), (33, "first")]:
            x = special_input((2, K, 3, 4, 5), 1, dtype, seed=levels) * 1.7
            if layout == "last":
                x = x.to(memory_format=torch.channels_last_3d)
            codes, idx = ops.residual_binary_quantize(x, levels, backend=backend)
            want_codes, want_idx = oracle.residual_binary_quantize(x, levels)
            assert codes.stride() == x.stride()
            assert_same_bits(codes, want_codes)
            assert_same_bits(idx, want_idx)
    # the levels are the binary expansion: in (-2, 2) the sum approximates x to 2^-(levels-1)
    x = torch.rand(4, 8, 9, dtype=torch.float64) * 3.8 - 1.9
    codes, _ = ops.residual_binary_quantize(x, levels, backend=backend)
    assert (codes - x).abs().max() <= 2.0 ** -(levels - 1) + 1e-12


def test_residual_level_zero_equals_binary_quantize():
    x = torch.randn(2, 12, 3, 3)
    _, idx = ops.residual_binary_quantize(x, 3)
    assert torch.equal(idx[0], ops.binary_quantize(x).indices)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_straight_through_gradient(backend):
    x = torch.randn(2, 10, 3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    out = ops.binary_quantize(x, backend=backend)
    (out.codes * g).sum().backward()
    assert torch.equal(x.grad, g)
    x.grad = None
    codes, _ = ops.residual_binary_quantize(x, 3, backend=backend)
    (codes * g).sum().backward()
    assert torch.equal(x.grad, g)
    # spherical: the gradient is that of the L2 normalisation
    x.grad = None
    out = ops.binary_quantize(x, spherical=True, backend=backend)
    (out.codes * g).sum().backward()
    xr = x.detach().clone().requires_grad_()
    (torch.nn.functional.normalize(xr, dim=1) * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    assert_same_bits(out.codes.detach(), oracle.binary_quantize(x.detach(), 1, 1 / math.sqrt(10))[0])


def test_module_soft_activation_gradient():
    q = BinaryQuantizer(8, straight_through_activation=torch.tanh)
    x = torch.randn(2, 8, 5, requires_grad=True)
    out = q(x)
    out.codes.sum().backward()
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()) ** 2)
    assert torch.equal(out.codes.detach().abs(), torch.ones_like(x))
    assert torch.equal(q.indices_to_codes(out.indices), out.codes.detach())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    x = torch.randn(2, 9, 3, 4, requires_grad=True)
    idx = torch.randint(0, 2**9, (2, 3, 4), dtype=torch.int32)
    bits = torch.randint(0, 2, (2, 3, 9), dtype=torch.uint8)
    cases = [
        (torch.ops.pyratok.binary_quantize, (x, 1, 1.0, True, 1, backend)),
        (torch.ops.pyratok.binary_quantize, (x, 1, 0.5, True, 2, backend)),
        (torch.ops.pyratok.binary_quantize, (x.detach().to(memory_format=torch.channels_last), 1, 1.0, True, 1, backend)),
        (torch.ops.pyratok.residual_binary_quantize, (x, 3, 1, backend)),
        (torch.ops.pyratok.indices_to_codes, (idx, 9, 1, 1.0, torch.float32, backend)),
        (torch.ops.pyratok.indices_to_bits, (idx, 9, backend)),
        (torch.ops.pyratok.bits_to_indices, (bits, -1, backend)),
        (torch.ops.pyratok.pack_bits, (bits, -1, backend)),
        (torch.ops.pyratok.unpack_bits, (torch.randint(0, 255, (4, 2), dtype=torch.uint8), 9, backend)),
        (torch.ops.pyratok.reverse_bit_order, (idx, 9, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    q = BinaryQuantizer(12)
    x = torch.randn(2, 12, 3, 4)
    compiled = torch.compile(lambda t: ops.binary_quantize(t, backend="reference").codes * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), q(x).codes * 2)


@pytest.mark.parametrize("K", [4, 10, 16])
def test_matches_vector_quantize_pytorch_lfq(K):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    for spherical in (False, True):
        lfq = vqp.LFQ(dim=K, codebook_size=2**K, entropy_loss_weight=0.0, spherical=spherical).eval()
        x = torch.randn(2, K, 3, 5, 6)
        want_codes, want_idx, _ = lfq(x)
        out = ops.binary_quantize(x, spherical=spherical)
        torch.testing.assert_close(out.codes, want_codes, rtol=0, atol=1e-7)
        assert torch.equal(out.indices.long(), want_idx.long())
        torch.testing.assert_close(ops.indices_to_codes(out.indices, K, spherical=spherical),
                                   lfq.indices_to_codes(want_idx), rtol=0, atol=1e-7)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("K", KS)
def test_cuda_backends_match_reference(backend, K):
    for dtype in backend_dtypes(backend):
        x = special_input((2, K, 3, 5, 7), 1, dtype, seed=K).cuda()
        check_against_reference(x, 1, backend)
        check_against_reference(x.to(memory_format=torch.channels_last_3d), 1, backend)
        if K <= 63:
            idx = ops.binary_quantize(x, backend=backend).indices
            assert_same_bits(ops.indices_to_codes(idx, K, dtype=dtype, backend=backend),
                             ref.indices_to_codes(idx.cpu(), K, 1, 1.0, dtype).contiguous())
            bits = ops.indices_to_bits(idx, K, backend=backend)
            assert_same_bits(ops.bits_to_indices(bits, backend=backend), idx)
            assert_same_bits(ops.unpack_bits(ops.pack_bits(bits, backend=backend), K, backend=backend), bits)
            assert_same_bits(ops.msb_to_lsb(idx, K, backend=backend), ref.reverse_bit_order(idx.cpu(), K))
            codes, lidx = ops.residual_binary_quantize(x, 4, backend=backend)
            want_codes, want_lidx = ref.residual_binary_quantize(x.cpu(), 4)
            assert_same_bits(codes, want_codes)
            assert_same_bits(lidx, want_lidx)


# ---- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_input(backend):
    with pytest.raises(TypeError, match="x: expected a float16"):
        ops.binary_quantize(torch.ones(2, 4, dtype=torch.int64), backend=backend)
    with pytest.raises(ValueError, match=r"x.shape\[1\] \(K\)=65"):
        ops.binary_quantize(torch.randn(2, 65), backend=backend)
    with pytest.raises(ValueError, match="bit_labels=True"):
        ops.binary_quantize(torch.randn(2, 64), backend=backend)
    with pytest.raises(ValueError, match="dim=3"):
        ops.binary_quantize(torch.randn(2, 4), dim=3, backend=backend)
    with pytest.raises(ValueError, match=r"K=0"):
        ops.indices_to_codes(torch.zeros(3, dtype=torch.int32), 0, backend=backend)
    with pytest.raises(ValueError, match=r"indices: values must lie in \[0, 2\^4\)"):
        ops.indices_to_codes(torch.tensor([0, 16], dtype=torch.int32), 4, backend=backend)
    with pytest.raises(ValueError, match="indices: values must lie"):
        ops.indices_to_bits(torch.tensor([-1]), 4, backend=backend)
    with pytest.raises(TypeError, match="indices: expected an int32 or int64"):
        ops.indices_to_codes(torch.zeros(3), 4, backend=backend)
    with pytest.raises(ValueError, match=r"packed: last axis must hold ceil\(K/8\)=2 bytes"):
        ops.unpack_bits(torch.zeros(3, 3, dtype=torch.uint8), 9, backend=backend)
    with pytest.raises(TypeError, match="bits: expected a uint8 or bool"):
        ops.pack_bits(torch.zeros(3, 4), backend=backend)
    with pytest.raises(ValueError, match=r"bits.shape\[-1\] \(K\)=64"):
        ops.bits_to_indices(torch.zeros(3, 64, dtype=torch.uint8), backend=backend)
    with pytest.raises(ValueError, match="levels=0"):
        ops.residual_binary_quantize(torch.randn(2, 4), 0, backend=backend)


def test_unknown_or_unavailable_backend():
    from pyratok import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="unknown backend 'fast'"):
        ops.binary_quantize(torch.randn(2, 4), backend="fast")
    if not CUDA_BACKENDS:
        with pytest.raises(BackendUnavailable, match="cuda"):
            ops.binary_quantize(torch.randn(2, 4), backend="cuda")


def test_env_backend_selection(monkeypatch):
    monkeypatch.setenv("PYRATOK_BACKEND", "reference")
    x = torch.randn(2, 5, 3)
    assert torch.equal(ops.binary_quantize(x).indices, ref.binary_quantize(x, 1)[1])
    monkeypatch.setenv("PYRATOK_BACKEND", "nope")
    with pytest.raises(Exception, match="unknown backend 'nope'"):
        ops.binary_quantize(x)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="pyratok._C is not built (PYRATOK_BUILD_EXT=0)")
def test_cpp_kernel_op_rejects_bad_input_cleanly():
    # the private kernel ops check their own arguments too: a Python error, never a crash
    with pytest.raises(ValueError, match="K=70"):
        torch.ops.pyratok._binary_quantize(torch.randn(2, 70), 1, 1.0, True, 1)
    with pytest.raises(ValueError, match="float16/bfloat16/float32/float64"):
        torch.ops.pyratok._binary_quantize(torch.ones(2, 3, dtype=torch.int32), 1, 1.0, True, 1)
    with pytest.raises(ValueError, match="ceil"):
        torch.ops.pyratok._unpack_bits(torch.zeros(2, 5, dtype=torch.uint8), 9)


def test_works_without_the_extension():
    """PYRATOK_NO_EXT=1 behaves like a PYRATOK_BUILD_EXT=0 install: the reference path runs."""
    import subprocess
    import sys

    code = (
        "import torch, pyratok\n"
        "from pyratok import ops\n"
        "assert 'cpu' not in pyratok.available_backends('cpu'), pyratok.available_backends('cpu')\n"
        "x = torch.randn(2, 9, 3)\n"
        "out = ops.binary_quantize(x)\n"
        "assert torch.equal(ops.indices_to_codes(out.indices, 9), out.codes)\n"
        "print(out.indices.sum().item())\n"
    )
    env = dict(__import__("os").environ, PYRATOK_NO_EXT="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
