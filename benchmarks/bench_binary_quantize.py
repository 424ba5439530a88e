"""Benchmark: binary_quantize, each backend vs vector-quantize-pytorch vs a plain copy.

Memory bound: the op reads N*K elements and writes N*K codes and N int32 indices.  The
roofline is the copy bandwidth measured in the same run (torch.clone of x: N*K read +
N*K written), so `frac_of_copy_bw` = (op bytes / op time) / (clone bytes / clone time).
The peer is vector-quantize-pytorch's LFQ with the entropy loss off (its quantization
path: codes + indices), in eval mode.
"""

import pytest
import torch

import pyratok
from pyratok import ops
from _common import DEVICE, run

K = 16
# (label, shape (B, K, T, H, W), dtype, layout, rounds)
CASES = [
    ("2^20", (1, K, 16, 64, 64), torch.float32, "channel-first", 10),
    ("2^24", (1, K, 16, 256, 256), torch.float32, "channel-first", 5),
    ("2^28", (1, K, 64, 512, 512), torch.float32, "channel-first", 3),
    ("2^24", (1, K, 16, 256, 256), torch.float32, "channels-last", 5),
    ("2^24", (1, K, 16, 256, 256), torch.bfloat16, "channel-first", 5),
]
OURS = [b for b in pyratok.available_backends(DEVICE) if b != "reference" and not (b == "triton" and DEVICE == "cpu")]
PROVIDERS = ["clone"] + OURS + ["reference", "vector-quantize-pytorch"]


def make_input(shape, dtype, layout):
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    return x.to(memory_format=torch.channels_last_3d) if layout == "channels-last" else x


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[2]}-{c[3]}".replace("torch.", "").replace("^", "p"))
def test_binary_quantize(benchmark, case, provider):
    label, shape, dtype, layout, rounds = case
    if provider == "vector-quantize-pytorch" and layout != "channel-first":
        pytest.skip("the peer takes channel-first input only")
    x = make_input(shape, dtype, layout)
    n = x.numel() // K
    es = x.element_size()
    if provider == "clone":
        fn, nbytes = (lambda: x.clone(memory_format=torch.preserve_format)), 2 * x.numel() * es
    elif provider == "vector-quantize-pytorch":
        LFQ = pytest.importorskip("vector_quantize_pytorch", reason="the peer is not installed here").LFQ

        lfq = LFQ(dim=K, codebook_size=2**K, entropy_loss_weight=0.0).to(DEVICE).eval()
        fn, nbytes = (lambda: lfq(x)), 2 * x.numel() * es + 4 * n
    else:
        fn, nbytes = (lambda: ops.binary_quantize(x, backend=provider)), 2 * x.numel() * es + 4 * n
    benchmark.group = f"binary_quantize K={K} N*K={label} {str(dtype)[6:]} {layout}"
    run(benchmark, fn, rounds=rounds, op="binary_quantize", provider=provider, shape=str(tuple(shape)),
        dtype=str(dtype)[6:], layout=layout, bytes=nbytes, baseline="clone", peer="vector-quantize-pytorch",
        ours=provider in OURS)
