"""Causal 3D convolution: every backend against the F.pad + F.conv3d reference (float64 over
kernel sizes 1..5, strides, dilations, both time pad modes, odd sizes, B > 1,
channels_last_3d, caches), half precision by the flash-attention rule, gradients,
chunk-plan invariance of streaming, diffusers' Wan and CogVideoX causal convs as outside
oracles, opcheck, torch.compile, and bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from pyratok import ops
from pyratok.nn import CausalConv3d, StreamCache, run_chunked
from pyratok.reference import causal_conv3d as ref
import oracles as oracle
from conftest import CPU_BACKENDS, CUDA_BACKENDS, backend_dtypes, requires_cuda

F64 = torch.float64


def geometry_cases():
    """(kernel, stride, dilation, padding, time_pad_mode, with_cache, channels_last): every
    kernel size 1..5 in each axis, strides and dilations 1..2 in each axis, both modes and
    layouts, with and without a cache; invalid geometries (P < 0) are left out."""
    cases = []
    for i, (k, s, d, mode) in enumerate(itertools.product(range(1, 6), (1, 2), (1, 2), ("zeros", "replicate"))):
        kernel = (k, k % 5 + 1, (k + 2) % 5 + 1)
        stride = (s, (i // 2) % 2 + 1, s)
        dilation = (d, d, (i // 3) % 2 + 1)
        if ref.past_frames(kernel[0], stride[0], dilation[0]) < 0:
            continue
        padding = (kernel[1] // 2, i % 3)
        cases.append((kernel, stride, dilation, padding, mode, i % 3 == 0, (i // 2) % 2 == 0))
    return cases


GEOMETRIES = geometry_cases()


def geometry_id(case):
    kernel, stride, dilation, padding, mode, cache, cl = case
    return f"k{''.join(map(str, kernel))}-s{''.join(map(str, stride))}-d{''.join(map(str, dilation))}-{mode}" \
           f"{'-cache' if cache else ''}{'-cl' if cl else ''}"


def make_inputs(case, dtype=F64, B=2, C=3, O=4, frames_per_stride=2, H=7, W=9, seed=0):
    kernel, stride, dilation, padding, mode, with_cache, channels_last = case
    g = torch.Generator().manual_seed(seed)
    T = frames_per_stride * stride[0]
    P = ref.past_frames(kernel[0], stride[0], dilation[0])
    x = torch.randn(B, C, T, H, W, generator=g, dtype=F64)
    w = torch.randn(O, C, *kernel, generator=g, dtype=F64) / (C * kernel[0] * kernel[1] * kernel[2]) ** 0.5
    b = torch.randn(O, generator=g, dtype=F64)
    cache = torch.randn(B, C, P, H, W, generator=g, dtype=F64) if with_cache else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(x), cast(w), cast(b), cast(cache)


def conv_kwargs(case):
    kernel, stride, dilation, padding, mode, _, _ = case
    return dict(stride=stride, dilation=dilation, padding=padding, time_pad_mode=mode)


# ---- forward against the reference -----------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", GEOMETRIES, ids=geometry_id)
def test_forward_float64(backend, case):
    x, w, b, cache = make_inputs(case)
    y, new_cache = ops.causal_conv3d(x, w, b, cache=cache, backend=backend, **conv_kwargs(case))
    # every backend, the reference included, against the tap-by-tap sum of tests/oracles.py
    want_y, want_cache = oracle.causal_conv3d(x, w, b, case[1], case[2], case[3], case[4], cache)
    torch.testing.assert_close(y, want_y, rtol=0, atol=1e-12)
    assert torch.equal(new_cache, want_cache)
    fmt = torch.channels_last_3d if case[6] else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and new_cache.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_bias_single_frame_and_odd_sizes(backend):
    case = ((3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1), "zeros", False, False)
    for B, T, H, W in [(1, 1, 1, 1), (3, 1, 9, 13), (1, 5, 11, 3)]:
        x, w, _, _ = make_inputs(case, B=B, frames_per_stride=T, H=H, W=W)
        y, _ = ops.causal_conv3d(x, w, None, padding=1, backend=backend)
        want = oracle.causal_conv3d(x, w, None, (1, 1, 1), (1, 1, 1), (1, 1), "zeros", None)[0]
        torch.testing.assert_close(y, want, rtol=0, atol=1e-12)


def half_error_budget(case, dtype, backend, device="cpu"):
    """max |ours - fp64| and max |PyTorch in dtype - fp64| for one geometry."""
    x, w, b, cache = make_inputs(case, dtype, C=16, O=24, H=9, W=11)
    x, w, b = x.to(device), w.to(device), b.to(device)
    cache = None if cache is None else cache.to(device)
    kw = conv_kwargs(case)
    up = lambda t: None if t is None else t.double()
    exact, _ = ops.causal_conv3d(up(x), up(w), up(b), cache=up(cache), backend="reference", **kw)
    ours, _ = ops.causal_conv3d(x, w, b, cache=cache, backend=backend, **kw)
    torch_same_dtype, _ = ops.causal_conv3d(x, w, b, cache=cache, backend="reference", **kw)
    return (ours.double() - exact).abs().max().item(), (torch_same_dtype.double() - exact).abs().max().item()


HALF_CASES = [GEOMETRIES[0], GEOMETRIES[7], GEOMETRIES[17], GEOMETRIES[-1]]


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("case", HALF_CASES, ids=geometry_id)
def test_half_precision_flash_attention_rule(backend, case):
    for dtype in backend_dtypes(backend):
        if dtype in (torch.float16, torch.bfloat16):
            ours, pytorch = half_error_budget(case, dtype, backend)
            assert ours <= 2 * pytorch + 1e-6, (dtype, ours, pytorch)


# ---- gradients -------------------------------------------------------------------------


def flat_outputs(*outs):
    return torch.cat([o.flatten() for o in outs])


GRADCHECK_CASES = [GEOMETRIES[i] for i in (0, 5, 9, 12, 18, 23, 30)]


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=geometry_id)
def test_gradcheck(backend, case):
    x, w, b, cache = make_inputs(case, B=1, C=2, O=2, frames_per_stride=2, H=5, W=9)
    inputs = [t.requires_grad_() for t in (x, w, b) + ((cache,) if cache is not None else ())]

    def fn(x, w, b, *rest):
        return flat_outputs(*ops.causal_conv3d(x, w, b, cache=rest[0] if rest else None, backend=backend,
                                               **conv_kwargs(case)))

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def autograd_grads(backend, case, x, w, b, cache, device="cpu"):
    """Gradients of a random projection of (y, new cache); backend "oracle": tests/oracles.py."""
    leaves = [t.detach().to(device).requires_grad_() for t in (x, w, b)]
    c = None if cache is None else cache.detach().to(device).requires_grad_()
    if backend == "oracle":
        y, new_cache = oracle.causal_conv3d(*leaves, case[1], case[2], case[3], case[4], c)
    else:
        y, new_cache = ops.causal_conv3d(*leaves, cache=c, backend=backend, **conv_kwargs(case))
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype).to(device)).sum() + \
        (new_cache * torch.randn(new_cache.shape, generator=g, dtype=y.dtype).to(device)).sum()
    grads = torch.autograd.grad(loss, leaves + ([c] if c is not None else []), allow_unused=True)
    return [torch.zeros(0) if gr is None else gr.cpu() for gr in grads]


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("case", GEOMETRIES[::2], ids=geometry_id)
def test_gradients_match_reference(backend, case):
    x, w, b, cache = make_inputs(case)
    for got, want in zip(autograd_grads(backend, case, x, w, b, cache), autograd_grads("reference", case, x, w, b, cache)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_of_short_chunks_and_replicated_frame(backend):
    """T < P: the new cache keeps old cache frames; replicate sends the past's gradient to frame 0."""
    for mode, with_cache in itertools.product(("zeros", "replicate"), (False, True)):
        case = ((5, 1, 1), (1, 1, 1), (1, 1, 1), (0, 0), mode, with_cache, False)
        x, w, b, cache = make_inputs(case, frames_per_stride=1, H=2, W=3)
        for got, want in zip(autograd_grads(backend, case, x, w, b, cache),
                             autograd_grads("oracle", case, x, w, b, cache)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    if backend != "triton":
        case = ((3, 1, 1), (1, 1, 1), (1, 1, 1), (0, 0), "replicate", False, False)
        x, w, _, _ = make_inputs(case, B=1, C=1, O=1, frames_per_stride=1, H=2, W=2)
        assert torch.autograd.gradcheck(
            lambda x, w: flat_outputs(*ops.causal_conv3d(x, w, time_pad_mode="replicate", backend=backend)),
            (x.requires_grad_(), w.requires_grad_()), fast_mode=True)


# ---- the CPU forward's Winograd F(2x2, 3x3) path -------------------------------------------

needs_cpu_ext = pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="pyratok._C is not built (PYRATOK_BUILD_EXT=0)")
WINOGRAD_GEOMETRIES = [  # (kernel, stride, dilation, padding, mode, with_cache, channels_last)
    ((k, 3, 3), (st, 1, 1), (dt, 1, 1), pad, mode, cache, cl)
    for i, (k, st, dt, mode, pad) in enumerate(itertools.product(
        (1, 2, 3, 5), (1, 2), (1, 2), ("zeros", "replicate"), ((1, 1), (0, 2))))
    if ref.past_frames(k, st, dt) >= 0
    for cache, cl in [((i % 3 == 0), (i % 2 == 0))]
]


@needs_cpu_ext
@pytest.mark.parametrize("case", WINOGRAD_GEOMETRIES, ids=geometry_id)
def test_winograd_float64(case):
    # the algorithm itself, exact in float64: temporal kernels/strides/dilations, both modes,
    # caches, channels_last_3d, spatial padding 0..2, odd sizes (partial 2x2 tiles), B > 1
    for H, W in ((7, 9), (4, 5), (1, 3)):
        if H + 2 * case[3][0] < 3 or W + 2 * case[3][1] < 3:
            continue
        x, w, b, cache = make_inputs(case, B=2, C=5, O=6, H=H, W=W)
        want_y, want_cache = ref.causal_conv3d(x, w, b, cache=cache, **conv_kwargs(case))
        y, new_cache = ops.causal_conv3d(x, w, b, cache=cache, **conv_kwargs(case), backend="cpu:winograd")
        torch.testing.assert_close(y, want_y, rtol=0, atol=1e-12)
        torch.testing.assert_close(new_cache, want_cache, rtol=0, atol=0)


@needs_cpu_ext
def test_winograd_is_auto_for_wide_fp32_layers_and_within_2x_of_direct_error():
    case = ((3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1), "zeros", True, False)
    for C, layout in ((48, torch.contiguous_format), (64, torch.channels_last_3d)):
        x, w, b, cache = make_inputs(case, B=1, C=C, O=48, frames_per_stride=3, H=11, W=10, seed=C)
        want, _ = ref.causal_conv3d(x, w, b, padding=(1, 1), cache=cache)
        xf, wf, bf, cf = (t.float() for t in (x, w, b, cache))
        xf = xf.contiguous(memory_format=layout)
        outs = {}
        for algo, backend in (("auto", "cpu"), ("direct", "cpu:direct"), ("winograd", "cpu:winograd")):
            outs[algo], _ = ops.causal_conv3d(xf, wf, bf, cache=cf, padding=(1, 1), backend=backend)
        assert torch.equal(outs["auto"], outs["winograd"]) and not torch.equal(outs["auto"], outs["direct"])
        err = {k: (v.double() - want).abs().max().item() for k, v in outs.items()}
        assert err["winograd"] <= 2 * err["direct"], err
    # narrow layers (the encoder's first) and half precision keep the direct path under auto
    x, w, b, cache = make_inputs(case, B=1, C=3, O=48, H=6, W=6)
    direct, _ = ops.causal_conv3d(x.float(), w.float(), b.float(), cache=cache.float(), padding=(1, 1),
                                  backend="cpu:direct")
    assert torch.equal(ops.causal_conv3d(x.float(), w.float(), b.float(), cache=cache.float(), padding=(1, 1),
                                         backend="cpu")[0], direct)


@needs_cpu_ext
def test_winograd_streams_bit_identically():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 32, 17, 6, 7, generator=g).to(memory_format=torch.channels_last_3d)
    for mode in ("zeros", "replicate"):
        layer = CausalConv3d(32, 32, 3, padding=1, time_pad_mode=mode, backend="cpu:winograd")
        whole, *streamed = stream_outputs(layer, x, PLANS_17)
        assert all(torch.equal(out, whole) for out in streamed)


def test_flop_counter_sees_the_op():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 8, 4, 6, 7, requires_grad=True)
    w = torch.randn(4, 8, 3, 3, 3, requires_grad=True)
    forward = 2 * 2 * 4 * 6 * 7 * 4 * 8 * 27          # 2 B To Ho Wo O C kt kh kw
    with FlopCounterMode(display=False) as counter:
        y, _ = ops.causal_conv3d(x, w, padding=1)
    assert counter.get_total_flops() == forward
    with FlopCounterMode(display=False) as counter:
        y, _ = ops.causal_conv3d(x, w, padding=1)
        y.sum().backward()
    assert counter.get_total_flops() == 3 * forward     # forward, grad of x, grad of the weight
    # registered without importing the flop counter (which imports triton) at pyratok's import
    import subprocess
    import sys

    code = "import sys, pyratok.ops; assert 'torch.utils.flop_counter' not in sys.modules, 'imported'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_cpu_algorithm_rejects_unknown_names():
    # the algorithm is a backend variant ("cpu:direct", "cpu:winograd"), no longer a global switch
    from pyratok import BackendUnavailable

    with pytest.raises(BackendUnavailable, match=r"unknown backend 'cpu:fast'.*'cpu:direct', 'cpu:winograd'"):
        ops.causal_conv3d(torch.randn(1, 2, 3, 4, 4), torch.randn(2, 2, 3, 3, 3), backend="cpu:fast")
    assert not hasattr(ops, "cpu_algorithm")


# ---- streaming -------------------------------------------------------------------------


PLANS_17 = [[17], [1, 4, 4, 4, 4], [1, 8, 8], [1, 16], [5, 12]]
PLANS_16 = [[16], [2, 4, 4, 4, 2], [2, 6, 8], [2, 14], [6, 10]]


def stream_outputs(layer, x, plans):
    return [run_chunked(layer, x, plan) for plan in plans]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["zeros", "replicate"])
def test_chunk_plan_invariance(backend, mode):
    g = torch.Generator().manual_seed(0)
    x17 = torch.randn(1, 3, 17, 5, 6, generator=g, dtype=F64)
    x16 = x17[:, :, :16]
    layers = [
        (CausalConv3d(3, 4, 3, padding=1, time_pad_mode=mode, backend=backend), x17, PLANS_17),
        (CausalConv3d(3, 4, (4, 3, 1), dilation=(2, 1, 1), padding=(1, 0), time_pad_mode=mode, backend=backend),
         x17, PLANS_17),
        (CausalConv3d(3, 4, 3, stride=2, padding=1, time_pad_mode=mode, backend=backend), x16, PLANS_16),
        (CausalConv3d(3, 4, (3, 1, 1), stride=(2, 1, 1), time_pad_mode=mode, backend=backend), x16, PLANS_16),
    ]
    for layer, x, plans in layers:
        layer.double()
        whole, *streamed = stream_outputs(layer, x, plans)
        for out in streamed:
            torch.testing.assert_close(out, whole, rtol=0, atol=1e-13)
    if backend == "cpu":  # the production path: bit-identical in float32 and channels_last_3d
        layer = CausalConv3d(3, 8, 3, padding=1, time_pad_mode=mode, backend=backend)
        xf = x17.float().to(memory_format=torch.channels_last_3d)
        whole, *streamed = stream_outputs(layer, xf, PLANS_17)
        assert all(torch.equal(out, whole) for out in streamed)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_network_streams_with_one_stream_cache(backend):
    """A stack of convs (one with temporal stride 2, one skipped on odd chunks' path) streams
    through a single StreamCache keyed by module."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = CausalConv3d(2, 4, 3, padding=1, backend=backend)
            self.down = CausalConv3d(4, 4, (3, 1, 1), stride=(2, 1, 1), time_pad_mode="replicate", backend=backend)
            self.b = CausalConv3d(4, 3, (2, 3, 3), padding=1, backend=backend)
            self.unused = CausalConv3d(4, 4, 1, backend=backend)

        def forward(self, x, cache=None):
            return self.b(torch.relu(self.down(self.a(x, cache), cache)), cache)

    net = Net().double()
    x = torch.randn(1, 2, 16, 4, 5, dtype=F64)
    whole = net(x)
    cache = StreamCache()
    for plan in PLANS_16[1:]:
        cache.reset()
        torch.testing.assert_close(run_chunked(net, x, plan, cache=cache), whole, rtol=0, atol=1e-13)
        assert len(cache) == 3 and net.unused not in cache and net.down in cache


# ---- diffusers' causal convs as outside oracles ----------------------------------------


def wan_stream(wan, x, plan):
    """diffusers' AutoencoderKLWan cache protocol for one WanCausalConv3d (CACHE_T = 2)."""
    outs, start, feat = [], 0, None
    for n in plan:
        chunk = x[:, :, start:start + n]
        cache_x = chunk[:, :, -2:].clone()
        if cache_x.shape[2] < 2 and feat is not None:
            cache_x = torch.cat([feat[:, :, -1:], cache_x], dim=2)
        outs.append(wan(chunk, feat))
        feat, start = cache_x, start + n
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_diffusers_wan_causal_conv3d(backend):
    wan_module = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_wan")
    torch.manual_seed(0)
    for kernel, padding in [(3, 1), ((3, 1, 1), (1, 0, 0)), (1, 0)]:
        wan = wan_module.WanCausalConv3d(4, 6, kernel, padding=padding).double()
        pad = (padding, padding) if isinstance(padding, int) else padding[1:]
        ours = CausalConv3d(4, 6, kernel, padding=pad, backend=backend).double()
        ours.load_state_dict(wan.state_dict())
        x = torch.randn(1, 4, 17, 6, 7, dtype=F64)
        with torch.no_grad():
            want = wan(x)
            torch.testing.assert_close(ours(x), want, rtol=0, atol=1e-12)
            torch.testing.assert_close(run_chunked(ours, x, [1, 4, 4, 4, 4]), wan_stream(wan, x, [1, 4, 4, 4, 4]),
                                       rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_diffusers_cogvideox_causal_conv3d(backend):
    cog_module = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_cogvideox")
    torch.manual_seed(0)
    for kernel in [3, (3, 1, 1), (5, 3, 3)]:
        cog = cog_module.CogVideoXCausalConv3d(4, 6, kernel).double()
        k = (kernel,) * 3 if isinstance(kernel, int) else kernel
        ours = CausalConv3d(4, 6, kernel, padding=((k[1] - 1) // 2, (k[2] - 1) // 2), time_pad_mode="replicate",
                            backend=backend).double()
        ours.load_state_dict(cog.state_dict())
        x = torch.randn(2, 4, 17, 6, 7, dtype=F64)
        with torch.no_grad():
            want, _ = cog(x)
            torch.testing.assert_close(ours(x), want, rtol=0, atol=1e-12)
            # their conv_cache = our new cache; chunk by chunk
            cog_cache, cache, start = None, StreamCache(), 0
            for n in [1, 4, 4, 8]:
                chunk = x[:, :, start:start + n]
                want_chunk, cog_cache = cog(chunk, conv_cache=cog_cache)
                torch.testing.assert_close(ours(chunk, cache), want_chunk, rtol=0, atol=1e-12)
                torch.testing.assert_close(cache.get(ours), cog_cache, rtol=0, atol=0)
                start += n


def test_loads_nn_conv3d_state_dict():
    conv = torch.nn.Conv3d(3, 5, (3, 2, 1))
    ours = CausalConv3d(3, 5, (3, 2, 1))
    ours.load_state_dict(conv.state_dict())
    assert torch.equal(ours.weight, conv.weight) and torch.equal(ours.bias, conv.bias)
    x = torch.randn(1, 3, 4, 5, 5)
    torch.testing.assert_close(ours(x), conv(F.pad(x, (0, 0, 0, 0, 2, 0))))
    assert "kernel_size=(3, 2, 1)" in repr(ours)


# ---- registration ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    case = ((3, 2, 3), (1, 1, 2), (1, 1, 1), (1, 1), "zeros", True, False)
    x, w, b, cache = make_inputs(case, dtype=torch.float32, B=1, H=4, W=5)
    for xx, bb, cc, replicate in [(x, b, cache, False), (x.to(memory_format=torch.channels_last_3d), None, None, True)]:
        args = (xx.requires_grad_(), w.requires_grad_(), bb, cc, [1, 1, 2], [1, 1, 1], [1, 1], replicate, backend)
        torch.library.opcheck(torch.ops.pyratok.causal_conv3d, args)
        y = torch.ops.pyratok.causal_conv3d(*args)[0]
        torch.library.opcheck(torch.ops.pyratok.causal_conv3d_backward,
                              (torch.randn_like(y), xx.detach(), w.detach(), cc, [1, 1, 2], [1, 1, 1], [1, 1],
                               replicate, [True, cc is not None, True, bb is not None], backend))


def test_torch_compile_fullgraph():
    layer = CausalConv3d(3, 4, 3, padding=1, backend="reference")
    x = torch.randn(1, 3, 5, 4, 4)
    compiled = torch.compile(lambda t: layer(t) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x) * 2)


# ---- CUDA ------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("case", GEOMETRIES[::3], ids=geometry_id)
def test_cuda_backends_match_reference(backend, case):
    x, w, b, cache = make_inputs(case)
    want_y, want_cache = ref.causal_conv3d(x, w, b, case[1], case[2], case[3], case[4], cache)
    cuda = lambda t: None if t is None else t.cuda()
    y, new_cache = ops.causal_conv3d(cuda(x), cuda(w), cuda(b), cache=cuda(cache), backend=backend, **conv_kwargs(case))
    torch.testing.assert_close(y.cpu(), want_y, rtol=0, atol=1e-12)
    assert torch.equal(new_cache.cpu(), want_cache)
    for got, want in zip(autograd_grads(backend, case, x, w, b, cache, "cuda"),
                         autograd_grads("reference", case, x, w, b, cache)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    for dtype in (torch.float16, torch.bfloat16):
        ours, pytorch = half_error_budget(case, dtype, backend, "cuda")
        assert ours <= 2 * pytorch + 1e-6, (dtype, ours, pytorch)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_chunk_plan_invariance(backend):
    layer = CausalConv3d(8, 16, 3, padding=1, backend=backend).cuda().to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 8, 17, 12, 10, device="cuda").to(memory_format=torch.channels_last_3d)
    whole, *streamed = stream_outputs(layer, x, PLANS_17)
    for out in streamed:
        torch.testing.assert_close(out, whole, rtol=0, atol=1e-6)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_past_2_31_elements(backend):
    """int64 offsets: an fp16 activation of 2^31 + elements (4 GiB), checked on its last frames."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with >= 24 GiB")
    C, T, H, W = 8, 17, 1024, 15430  # 2.15e9 elements
    x = torch.randn(1, C, T, H, W, device="cuda", dtype=torch.float16)
    w = torch.randn(4, C, 3, 3, 3, device="cuda", dtype=torch.float16) / 15
    y, _ = ops.causal_conv3d(x, w, padding=1, backend=backend)
    tail = x[:, :, -3:, -4:].float()
    want = F.conv3d(tail, w.float(), padding=(0, 1, 1))[:, :, :, 1:-1]
    torch.testing.assert_close(y[:, :, -1:, -3:-1].float(), want, rtol=2e-2, atol=2e-2)
    del x, y


# ---- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_input(backend):
    x, w = torch.randn(1, 3, 4, 5, 5), torch.randn(4, 3, 3, 3, 3)
    conv = lambda *a, **k: ops.causal_conv3d(*a, backend=backend, **k)
    with pytest.raises(ValueError, match=r"x: expected a 5-D tensor \(B, C, T, H, W\)"):
        conv(x[0], w)
    with pytest.raises(ValueError, match="weight: expected"):
        conv(x, w[0])
    with pytest.raises(ValueError, match="x: has 3 channels but weight expects 2"):
        conv(x, w[:, :2])
    with pytest.raises(ValueError, match="x: chunk of 3 frames is not a positive multiple of the temporal stride 2"):
        conv(x[:, :, :3], w, stride=2)
    with pytest.raises(ValueError, match=r"cache: shape \(1, 3, 1, 5, 5\) does not fit this layer and input; "
                                         r"expected \(1, 3, 2, 5, 5\)"):
        conv(x, w, cache=torch.randn(1, 3, 1, 5, 5))
    with pytest.raises(ValueError, match="cache: shape"):  # a cache from a layer with other channels
        conv(x, w, cache=torch.randn(1, 4, 2, 5, 5))
    with pytest.raises(ValueError, match="cache: shape"):  # from another resolution
        conv(x, w, cache=torch.randn(1, 3, 2, 6, 5))
    with pytest.raises(TypeError, match="cache: expected torch.float32 on cpu like x"):
        conv(x, w, cache=torch.randn(1, 3, 2, 5, 5, dtype=F64))
    with pytest.raises(TypeError, match="weight: expected torch.float32"):
        conv(x, w.double())
    with pytest.raises(TypeError, match="x: expected a float16/bfloat16/float32/float64 tensor"):
        conv(x.long(), w)
    with pytest.raises(ValueError, match=r"bias: expected shape \(4,\)"):
        conv(x, w, torch.randn(3))
    with pytest.raises(ValueError, match="time_pad_mode='reflect'"):
        conv(x, w, time_pad_mode="reflect")
    with pytest.raises(ValueError, match="stride\\[0\\]=4 exceeds the temporal receptive field 3"):
        conv(x, w, stride=(4, 1, 1))
    with pytest.raises(ValueError, match="smaller than the kernel's extent"):
        conv(x[:, :, :, :2], w)
    with pytest.raises(ValueError, match="padding: expected a non-negative int"):
        conv(x, w, padding=-1)


def test_stream_cache_misuse_is_caught():
    layer = CausalConv3d(3, 4, 3, padding=1)
    cache = StreamCache()
    layer(torch.randn(1, 3, 4, 5, 5), cache)
    with pytest.raises(ValueError, match="cache: shape"):  # the next chunk has another resolution
        layer(torch.randn(1, 3, 4, 6, 5), cache)
    with pytest.raises(ValueError, match=r"chunks: \[4, 4\] sum to 8, but x has 9 frames"):
        run_chunked(layer, torch.randn(1, 3, 9, 5, 5), [4, 4])
    with pytest.raises(ValueError, match="chunks: expected positive frame counts"):
        run_chunked(layer, torch.randn(1, 3, 4, 5, 5), [0, 4])


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="pyratok._C is not built (PYRATOK_BUILD_EXT=0)")
def test_cpp_kernel_op_rejects_bad_input_cleanly():
    x, w = torch.randn(1, 3, 4, 5, 5), torch.randn(4, 3, 3, 3, 3)
    with pytest.raises(ValueError, match="x: has 3 channels but weight expects 2"):
        torch.ops.pyratok._causal_conv3d(x, w[:, :2], None, None, [1, 1, 1], [1, 1, 1], [1, 1], False)
    with pytest.raises(ValueError, match="invalid geometry"):
        torch.ops.pyratok._causal_conv3d(x[:, :, :3], w, None, None, [2, 1, 1], [1, 1, 1], [1, 1], False)
    with pytest.raises(ValueError, match="cache: shape"):
        torch.ops.pyratok._causal_conv3d(x, w, None, torch.randn(1, 3, 3, 5, 5), [1, 1, 1], [1, 1, 1], [1, 1], False)


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if torch.bfloat16 in backend_dtypes(b)])
def test_autocast_runs_the_convolution_in_the_autocast_dtype(backend):
    # like nn.Conv3d: under torch.autocast an fp32 input and fp32 weights give a bf16 output equal
    # to the convolution of the bf16-rounded operands (custom ops are opaque to autocast)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, 6, 7, generator=g)
    w = torch.randn(3, 4, 3, 3, 3, generator=g) * 0.2
    b = torch.randn(3, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, cache = ops.causal_conv3d(x, w, b, padding=1, backend=backend)
    assert y.dtype == torch.bfloat16 and cache.dtype == torch.bfloat16
    want, _ = oracle.causal_conv3d(x.bfloat16().double(), w.bfloat16().double(), b.bfloat16().double(),
                                   (1, 1, 1), (1, 1, 1), (1, 1), "zeros", None)
    assert torch.allclose(y.double(), want, atol=0.05, rtol=0.02)
    y32, _ = ops.causal_conv3d(x, w, b, padding=1, backend=backend)      # outside autocast: unchanged
    assert y32.dtype == torch.float32


def test_meta_tensors_give_shapes_without_autocast_errors():
    # "meta" has no autocast state (torch.is_autocast_enabled("meta") raises): the op and the
    # module must still give the output shape (benchmarks/bench_vae.py sizes models this way)
    x = torch.empty(1, 3, 17, 32, 32, device="meta")
    w = torch.empty(8, 3, 3, 3, 3, device="meta")
    y, cache = ops.causal_conv3d(x, w, None, padding=1)
    assert y.device.type == "meta" and y.shape == (1, 8, 17, 32, 32) and cache.shape == (1, 3, 2, 32, 32)
    from pyratok.nn import CausalConv3d

    conv = CausalConv3d(3, 8, 3, padding=1).to("meta")
    assert conv(x).shape == (1, 8, 17, 32, 32)
