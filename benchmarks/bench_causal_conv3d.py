"""Benchmark: causal_conv3d, each backend vs F.pad + F.conv3d vs diffusers' causal convs.

Compute bound: 2*B*To*Ho*Wo*O*C*kt*kh*kw FLOPs (`flops`, the direct algorithm's: for the
Winograd forward GFLOP/s is an effective rate, which may exceed the FMA ceiling); `bytes`
counts x, weight and y once.  Providers: ours ("cpu" = its default algorithm, "cpu-direct" =
the direct implicit GEMM, "cuda", "triton"), "reference" = F.pad + F.conv3d on an
explicitly padded copy (oneDNN on the CPU, cuDNN on the GPU), the peer
"diffusers-cogvideox" (CogVideoXCausalConv3d: cat of frame-0 copies, then conv3d) and
"diffusers-wan" (WanCausalConv3d: F.pad, then conv3d).  Groups:

  fwd / fwd+bwd   one VAE-like layer (k=3, 17 frames) in each layout (on the CPU the
                  fwd+bwd groups use smaller frames than the fwd groups)
  stream          the same layer over 17 frames in Wan's chunks [1, 4, 4, 4, 4], each
                  provider with its own cache protocol
  stream65        a small encoder stack over a 65-frame clip: whole clip, one 4-frame
                  chunk, and the clip streamed in chunks [1] + [4]*16 (outputs written
                  into a preallocated buffer): the streamed peak should stay within 1.5x
                  of one chunk's
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

import pyratok
from pyratok import ops
from pyratok.nn import CausalConv3d, StreamCache
from _common import DEVICE, _malloc_thresholds, peak_memory_bytes, run

OURS = [b for b in pyratok.available_backends(DEVICE) if b != "reference" and not (b == "triton" and DEVICE == "cpu")]
# "cpu" runs the default algorithm (Winograd F(2x2, 3x3) on wide fp32 layers); "cpu-direct" the
# direct implicit GEMM (backend "cpu:direct"), for the side-by-side ratio
DIRECT = ["cpu-direct"] if "cpu" in OURS else []
PEERS = ["diffusers-cogvideox", "diffusers-wan"]
LAYOUTS = ["channel-first", "channels-last"]

# (label, C, O, (T, H, W) forward, rounds, (T, H, W) forward+backward or None, dtype); the
# stream layer; the stream65 stack (C, (T, H, W)).  Sized for 2 CPU cores vs one GPU.
if DEVICE == "cpu":
    DTYPE = torch.float32
    LAYERS = [("3->96", 3, 96, (17, 256, 256), 3, (17, 128, 128), DTYPE),
              ("96->96", 96, 96, (17, 128, 128), 2, (17, 64, 64), DTYPE),
              ("192->192", 192, 192, (17, 64, 64), 2, None, DTYPE),
              ("384->384", 384, 384, (17, 32, 32), 2, None, DTYPE),
              ("96->96", 96, 96, (17, 128, 128), 2, None, torch.bfloat16)]
    STREAM_LAYER = ("96->96", 96, 96, (17, 64, 64), 3)
    STREAM65 = (3, (65, 96, 96))
else:
    DTYPE = torch.bfloat16
    LAYERS = [("3->96", 3, 96, (17, 256, 256), 10, (17, 256, 256), DTYPE),
              ("96->96", 96, 96, (17, 256, 256), 10, (17, 256, 256), DTYPE),
              ("192->192", 192, 192, (17, 128, 128), 10, (17, 128, 128), DTYPE),
              ("384->384", 384, 384, (17, 64, 64), 10, (17, 64, 64), DTYPE)]
    STREAM_LAYER = ("96->96", 96, 96, (17, 256, 256), 10)
    STREAM65 = (3, (65, 256, 256))
DTYPE_NAME = str(DTYPE)[6:]


def layer_inputs(C, O, thw, layout, requires_grad=False, dtype=DTYPE):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, C, *thw, generator=g).to(DEVICE, dtype)
    w = (torch.randn(O, C, 3, 3, 3, generator=g) / (27 * C) ** 0.5).to(DEVICE, dtype)
    b = torch.randn(O, generator=g).to(DEVICE, dtype)
    if layout == "channels-last":
        x, w = x.to(memory_format=torch.channels_last_3d), w.to(memory_format=torch.channels_last_3d)
    return [t.requires_grad_(requires_grad) for t in (x, w, b)]


def diffusers_layer(provider, C, O, w, b):
    """The peer module with our weights (and dtype): Cog replicates frame 0 in time, Wan pads zeros."""
    if provider == "diffusers-cogvideox":
        from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

        layer = CogVideoXCausalConv3d(C, O, 3)
        forward = lambda x, cache=None: layer(x, conv_cache=cache)  # noqa: E731  -> (y, cache)
    else:
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        layer = WanCausalConv3d(C, O, 3, padding=1)
        forward = lambda x, cache=None: (layer(x, cache), x[:, :, -2:])  # noqa: E731  Wan's CACHE_T = 2
    layer = layer.to(DEVICE, w.dtype)
    params = dict(layer.named_parameters())
    with torch.no_grad():
        params[next(k for k in params if k.endswith("weight"))].copy_(w)
        params[next(k for k in params if k.endswith("bias"))].copy_(b)
    return layer, forward


def layer_call(provider, C, O, x, w, b):
    """-> (a call doing one forward of the layer, the modules to keep alive)."""
    mode = "replicate" if provider == "diffusers-cogvideox" else "zeros"
    if provider == "cpu-direct":  # the cpu backend with its Winograd forward switched off
        return lambda: ops.causal_conv3d(x, w, b, padding=1, time_pad_mode=mode, backend="cpu:direct")[0]
    if provider in OURS:
        return lambda: ops.causal_conv3d(x, w, b, padding=1, time_pad_mode=mode, backend=provider)[0]
    if provider == "reference":
        return lambda: F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), w, b)
    layer, forward = diffusers_layer(provider, C, O, w.detach(), b.detach())
    if x.requires_grad:
        layer.requires_grad_(True)
    return lambda: forward(x)[0]


def flops(C, O, thw):
    T, H, W = thw
    return 2 * T * H * W * O * C * 27


def layer_bytes(C, O, thw, elem):
    T, H, W = thw
    return (C + O) * T * H * W * elem + O * C * 27 * elem


def providers_for(layout):
    return OURS + DIRECT + ["reference"] + (PEERS if layout == "channel-first" else [])


LAYER_CASES = [(layer, layout, provider) for layer in LAYERS for layout in LAYOUTS
               for provider in providers_for(layout)]


def case_id(case):
    (label, *_, dtype), layout, provider = case
    return f"{label}-{str(dtype)[6:]}-{layout}-{provider}"


@pytest.mark.parametrize("case", LAYER_CASES, ids=case_id)
def test_forward(benchmark, case):
    (label, C, O, thw, rounds, _, dtype), layout, provider = case
    if provider in PEERS:
        pytest.importorskip("diffusers")
    x, w, b = layer_inputs(C, O, thw, layout, dtype=dtype)
    with torch.no_grad():
        fn = layer_call(provider, C, O, x, w, b)
        benchmark.group = f"causal_conv3d fwd {label} {'x'.join(map(str, thw))} {str(dtype)[6:]} {layout}"
        run(benchmark, fn, rounds=rounds, op="causal_conv3d", provider=provider, shape=str((1, C, *thw)),
            dtype=str(dtype)[6:], layout=layout, flops=flops(C, O, thw),
            bytes=layer_bytes(C, O, thw, x.element_size()), peer="diffusers-cogvideox", ours=provider in OURS + DIRECT)


@pytest.mark.parametrize("case", [c for c in LAYER_CASES if c[0][5] and c[2] != "diffusers-wan"], ids=case_id)
def test_forward_backward(benchmark, case):
    (label, C, O, _, rounds, thw, _), layout, provider = case
    if provider in PEERS:
        pytest.importorskip("diffusers")
    x, w, b = layer_inputs(C, O, thw, layout, requires_grad=True)
    forward = layer_call(provider, C, O, x, w, b)
    grad = torch.randn_like(forward())

    def step():
        x.grad = w.grad = b.grad = None
        forward().backward(grad)

    benchmark.group = f"causal_conv3d fwd+bwd {label} {'x'.join(map(str, thw))} {DTYPE_NAME} {layout}"
    run(benchmark, step, rounds=max(1, rounds - 1), op="causal_conv3d", provider=provider, shape=str((1, C, *thw)),
        dtype=DTYPE_NAME, layout=layout, flops=3 * flops(C, O, thw), peer="diffusers-cogvideox",
        ours=provider in OURS + DIRECT)


WAN_CHUNKS = [1, 4, 4, 4, 4]


@pytest.mark.parametrize("provider", OURS + ["reference"] + PEERS)
def test_stream(benchmark, provider):
    """The layer over 17 frames in Wan's chunk plan, each provider with its own cache."""
    label, C, O, thw, rounds = STREAM_LAYER
    layout = "channel-first"
    if provider in PEERS:
        pytest.importorskip("diffusers")
    x, w, b = layer_inputs(C, O, thw, layout)
    starts = [sum(WAN_CHUNKS[:i]) for i in range(len(WAN_CHUNKS))]
    chunks = [x[:, :, s:s + n] for s, n in zip(starts, WAN_CHUNKS)]
    if provider in OURS:
        def forward(chunk, cache):
            return ops.causal_conv3d(chunk, w, b, padding=1, cache=cache, backend=provider)
    elif provider == "reference":
        def forward(chunk, cache):  # cat the cache (or zeros) in front, then conv3d
            past = cache if cache is not None else chunk.new_zeros(1, C, 2, *chunk.shape[3:])
            padded = torch.cat([past, chunk], dim=2)
            return F.conv3d(padded, w, b, padding=(0, 1, 1)), padded[:, :, -2:]
    else:
        _, forward = diffusers_layer(provider, C, O, w, b)

    def stream():
        cache, outs = None, []
        for chunk in chunks:
            y, cache = forward(chunk, cache)
            outs.append(y)
        return outs

    with torch.no_grad():
        benchmark.group = f"causal_conv3d stream {label} {'x'.join(map(str, thw))} chunks {WAN_CHUNKS} {DTYPE_NAME}"
        run(benchmark, stream, rounds=rounds, op="causal_conv3d", provider=provider, shape=str((1, C, *thw)),
            dtype=DTYPE_NAME, layout=layout, flops=flops(C, O, thw), peer="diffusers-cogvideox",
            ours=provider in OURS)


class EncoderStack(torch.nn.Module):
    """Four causal convs, the shape of a VAE encoder's first stage: 3 -> 32 -> 32 -> 64
    (spatial stride 2) -> 16 latent channels."""

    def __init__(self, C, backend):
        super().__init__()
        self.convs = torch.nn.ModuleList([
            CausalConv3d(C, 32, 3, padding=1, backend=backend),
            CausalConv3d(32, 32, 3, padding=1, backend=backend),
            CausalConv3d(32, 64, 3, stride=(1, 2, 2), padding=1, backend=backend),
            CausalConv3d(64, 16, 1, backend=backend),
        ])

    def forward(self, x, cache=None):
        for i, conv in enumerate(self.convs):
            x = conv(x, cache)
            if i < len(self.convs) - 1:
                x = torch.relu(x)
        return x


def stream65_call(backend, mode):
    """(the call of test_stream65's `mode`, its FLOPs per frame, frames): the encoder stack on a
    65-frame clip whole, one 4-frame chunk of it, or the clip streamed in chunks [1] + [4]*16
    into a preallocated output."""
    C, thw = STREAM65
    T, H, W = thw
    net = EncoderStack(C, backend).to(DEVICE, DTYPE).eval()
    x = torch.randn(1, C, *thw, device=DEVICE, dtype=DTYPE)
    out = torch.empty(1, 16, T, H // 2, W // 2, device=DEVICE, dtype=DTYPE)
    plan = [1] + [4] * ((T - 1) // 4)

    def streamed():
        cache, start = StreamCache(), 0
        for n in plan:
            out[:, :, start:start + n] = net(x[:, :, start:start + n], cache)
            start += n

    fn = {"whole-clip": lambda: out.copy_(net(x)), "one-chunk": lambda: net(x[:, :, :4]), "streamed": streamed}[mode]
    stack_flops = 2 * H * W * 27 * (C * 32 + 32 * 32 + 64 * 32 / 4) + 2 * H * W / 4 * 64 * 16
    return fn, stack_flops, 4 if mode == "one-chunk" else T


def fresh_process_peak(backend, mode) -> int:
    """test_stream65's peak memory measured in a fresh interpreter (CPU).

    In the benchmark process the heap keeps the free chunks of every earlier (timed) call, and
    malloc reuses them before it maps new memory, so the resident-set peak of a call counts every
    heap page the call touches, not its live memory: for the streamed stack that reads 2-3x high
    and grows with each repetition.  A fresh process with the 64 KB mmap threshold from its start
    maps every block of 64 KB and more on its own, as the streaming target needs."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, __file__, "peak65", backend, mode], capture_output=True, text=True,
                         timeout=600, cwd=os.path.dirname(os.path.abspath(__file__)))
    if res.returncode != 0:
        raise RuntimeError(f"fresh-process peak of stream65 {mode} failed:\n{res.stderr[-2000:]}")
    return int(res.stdout.split()[-1])


@pytest.mark.parametrize("mode", ["whole-clip", "one-chunk", "streamed"])
@pytest.mark.parametrize("backend", OURS)
def test_stream65(benchmark, backend, mode):
    C, (T, H, W) = STREAM65
    fn, stack_flops, frames = stream65_call(backend, mode)
    with torch.no_grad():
        benchmark.group = f"causal_conv3d stream65 encoder stack {C}x{T}x{H}x{W} chunks [1]+[4]*{(T - 1) // 4} {DTYPE_NAME}"
        run(benchmark, fn, rounds=2, op="causal_conv3d", provider=f"{backend} {mode}", shape=str((1, C, frames, H, W)),
            dtype=DTYPE_NAME, layout="channel-first", flops=int(stack_flops * frames), ours=True)
    if DEVICE == "cpu":
        benchmark.extra_info["peak_bytes"] = fresh_process_peak(backend, mode)


if __name__ == "__main__" and sys.argv[1:2] == ["peak65"]:
    # python bench_causal_conv3d.py peak65 BACKEND MODE: one warm-up call, then the peak of one call,
    # with the 64 KB mmap threshold from the start
    _malloc_thresholds(64 * 1024, 64 * 1024)
    call, _, _ = stream65_call(sys.argv[2], sys.argv[3])
    with torch.no_grad():
        call()
        print(peak_memory_bytes(call))
