"""Benchmark: the Wan causal video VAE, pyratok (pyratok.models.WanVAE) vs diffusers'
AutoencoderKLWan on the same random weights, encode and decode, time and peak memory.

Both run the same chunk plan (encode 1 frame then 4, decode one latent frame at a time), so
they hold the same activations; the work is the same convolutions, about 2 * C_in * C_out * 27
FLOPs per output voxel per 3x3x3 conv, so the comparison is compute-bound and the difference
is what each implementation does around the convolutions (copies, elementwise passes, fresh
allocations).  Target: pyratok <= 0.9x diffusers' time and <= its peak memory.

Cases: a small config (base_dim 32, one residual block per stage) at 17x256x256 and the full
Wan 2.1 config at 17x128x128 (CPU) or 17x720x1280 with a bf16 decoder (GPU); and one frame at
1080p tiled (pyratok: exact tiling with the default overlap, tile 64 latent pixels; diffusers:
its enable_tiling defaults, 256-pixel tiles at a 192-pixel stride), pyratok with diffusers' tile
geometry (tile 32, overlap 8 latent pixels: seamless but not exact) and pyratok untiled.

Every case makes one untimed warm-up call first (oneDNN/cuDNN set up per shape once per
process, about 45 MB on CPU, which would otherwise land on whichever provider runs first).  Peak
memory is measured over the timed rounds themselves: CUDA, the caching allocator's peak; CPU,
the peak resident set (VmHWM, reset through /proc/self/clear_refs) above the resident set before
the round.  On CPU glibc's malloc is told to map every block above 64 KiB and trim freed memory
at once, so that a freed activation leaves the resident set and each case's peak is its own (by
default a later, smaller run reuses pages an earlier one left behind and reads as ~0).
rounds=1 for the heavy cases.

    python -m pytest benchmarks/bench_vae.py --benchmark-only --benchmark-json=/tmp/vae.json
"""

import copy
import ctypes
import ctypes.util
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pyratok.models import WanVAE
from pyratok.nn import StreamCache

diffusers = pytest.importorskip("diffusers", reason="the peer (diffusers' AutoencoderKLWan) is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(-3, 1 << 16)                                             # M_MMAP_THRESHOLD (fixed, not dynamic)
    libc.mallopt(-1, 1 << 16)                                             # M_TRIM_THRESHOLD
SMALL = dict(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
FULL = {}                                                                 # diffusers' defaults: Wan 2.1
# (label, config, frames, height, width, decoder dtype, rounds)
if DEVICE == "cuda":
    CASES = [("small", SMALL, 17, 256, 256, torch.float32, 5),
             ("wan2.1", FULL, 17, 720, 1280, torch.bfloat16, 3)]
    TILED = ("wan2.1", FULL, torch.bfloat16, 2)
else:
    CASES = [("small", SMALL, 17, 256, 256, torch.float32, 2),
             ("wan2.1", FULL, 17, 128, 128, torch.float32, 1)]
    TILED = ("small", SMALL, torch.float32, 1)
TILE = 64                                                                 # latent pixels (512 video pixels)


def _vmhwm_and_rss() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024


class PeakMemory:
    """Peak extra memory over the timed rounds (see the module docstring)."""

    def __init__(self):
        self.peak, self._before = 0, 0

    def reset(self):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
            return
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self._before = _vmhwm_and_rss()[1]

    def record(self):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _vmhwm_and_rss()[0]
        self.peak = max(self.peak, peak - self._before)


def measure(benchmark, fn, rounds, peer="diffusers", **info):
    memory = PeakMemory()

    def timed():
        fn()
        memory.record()

    fn()                                                                  # warm-up, untimed
    benchmark.pedantic(timed, setup=memory.reset, rounds=rounds, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(info, device=DEVICE, peak_bytes=memory.peak, op="vae", peer=peer,
                                ours=info["provider"].startswith("pyratok"))


_MODELS = {}


def models(label, config, decoder_dtype):
    """(diffusers model, diffusers model for decoding in decoder_dtype, pyratok model with its decoder
    in decoder_dtype), all with the same random weights."""
    key = (label, decoder_dtype)
    if key not in _MODELS:
        _MODELS.clear()                                                   # keep one pair alive at a time
        torch.manual_seed(0)
        ref = diffusers.AutoencoderKLWan(**config).eval()
        ours = WanVAE(**config).eval()
        ours.load_backbone_state_dict(ref.state_dict())
        ours.set_precision(decoder=decoder_dtype)
        ref_decoder = copy.deepcopy(ref).to(decoder_dtype) if decoder_dtype != torch.float32 else ref
        _MODELS[key] = (ref.to(DEVICE), ref_decoder.to(DEVICE), ours.to(DEVICE))
    return _MODELS[key]


def count_flops(config, direction, frames, height, width) -> int:
    """FLOPs of one encode or decode (the same math for both providers), counted on the meta device."""
    with torch.device("meta"):
        vae = WanVAE(**config)
        video = torch.zeros(1, 3, frames, height, width)
        latent = torch.zeros(1, vae.config.z_dim, 1 + (frames - 1) // 4, height // 8, width // 8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if direction == "encode":
            vae.encode_stream(video, StreamCache())
        else:
            vae.decode_stream(latent, StreamCache())
    return counter.get_total_flops()


def video_and_latent(ours, frames, height, width):
    g = torch.Generator().manual_seed(1)
    video = (torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1).to(DEVICE)
    latent = torch.randn(1, ours.config.z_dim, 1 + (frames - 1) // 4, height // 8, width // 8, generator=g)
    return video, latent.to(DEVICE)


@pytest.mark.parametrize("provider", ["pyratok", "diffusers"])
@pytest.mark.parametrize("direction", ["encode", "decode"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}x{c[3]}x{c[4]}")
@torch.no_grad()
def test_vae(benchmark, case, direction, provider):
    label, config, frames, height, width, decoder_dtype, rounds = case
    ref, ref_decoder, ours = models(label, config, decoder_dtype)
    video, latent = video_and_latent(ours, frames, height, width)
    if direction == "encode":
        dtype = torch.float32
        fn = (lambda: ours.encode(video)) if provider == "pyratok" else (lambda: ref.encode(video))
    else:
        dtype = decoder_dtype
        z = latent.to(dtype)
        fn = (lambda: ours.decode(latent)) if provider == "pyratok" else (lambda: ref_decoder.decode(z))
    benchmark.group = f"vae {direction} {label} {frames}x{height}x{width} {str(dtype)[6:]}"
    measure(benchmark, fn, rounds, provider=provider, shape=f"(1, 3, {frames}, {height}, {width})",
            dtype=str(dtype)[6:], frames=frames, flops=count_flops(config, direction, frames, height, width))


@pytest.mark.parametrize("provider", ["pyratok tiled", "pyratok tiled 32/8", "diffusers tiled", "pyratok untiled"])
@torch.no_grad()
def test_vae_tiled_1080p(benchmark, provider):
    label, config, decoder_dtype, rounds = TILED
    ref, ref_decoder, ours = models(label, config, decoder_dtype)
    latent = torch.randn(1, 16, 1, 1080 // 8, 1920 // 8, generator=torch.Generator().manual_seed(2))
    latent = latent.to(DEVICE)
    if provider == "pyratok tiled":
        fn = lambda: ours.decode(latent, tile=TILE)  # noqa: E731
    elif provider == "pyratok tiled 32/8":
        warnings.simplefilter("ignore")                                  # the overlap is knowingly below exact
        fn = lambda: ours.decode(latent, tile=32, overlap=8)  # noqa: E731
    elif provider == "pyratok untiled":
        fn = lambda: ours.decode(latent)  # noqa: E731
    else:
        ref_decoder.enable_tiling()
        fn = lambda: ref_decoder.decode(latent.to(decoder_dtype))  # noqa: E731
    benchmark.group = f"vae decode {label} 1x1080x1920 one frame chunk {str(decoder_dtype)[6:]}"
    measure(benchmark, fn, rounds, provider=provider, shape="(1, 3, 1, 1080, 1920)",
            dtype=str(decoder_dtype)[6:], frames=1, peer="diffusers tiled",
            flops=count_flops(config, "decode", 1, 1080, 1920))
    if provider == "diffusers tiled":
        ref_decoder.disable_tiling()
