"""A procedurally generated captioned video set: coloured shapes moving in named directions.

Each clip shows one object of a named colour and shape sliding in a named direction over a
textured background, and its caption says which ("a red circle moving left").  The captions mean
something a tokenizer can see, so the language-alignment terms have a signal to learn; every clip
is a pure function of (seed, index), so train and held-out splits are disjoint by index.

    videos, captions = moving_shapes(count=8, frames=9, size=32, seed=0)   # (8, 3, 9, 32, 32) in [-1, 1]
"""

from __future__ import annotations

import math

import torch

COLOURS = {"red": (1.0, -0.8, -0.8), "green": (-0.8, 1.0, -0.8), "blue": (-0.8, -0.8, 1.0),
           "yellow": (1.0, 1.0, -0.9)}
SHAPES = ("square", "circle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def caption_of(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def _background(size: int, generator: torch.Generator) -> torch.Tensor:
    """(3, size, size) low-contrast texture: smooth noise plus a random-phase stripe pattern."""
    coarse = torch.rand(3, 1, max(2, size // 8), max(2, size // 8), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    phase, freq = torch.rand(2, generator=generator)
    stripes = torch.sin(2 * math.pi * ((x + y) * (0.05 + 0.1 * freq) + phase))
    return (smooth - 0.5) * 0.6 + 0.15 * stripes


def moving_shape(colour: str, shape: str, direction: str, frames: int, size: int,
                 generator: torch.Generator) -> torch.Tensor:
    """One clip (3, frames, size, size) in [-1, 1]."""
    if colour not in COLOURS or shape not in SHAPES or direction not in DIRECTIONS:
        raise ValueError(f"({colour!r}, {shape!r}, {direction!r}): expected a colour in {sorted(COLOURS)}, "
                         f"a shape in {SHAPES} and a direction in {sorted(DIRECTIONS)}")
    if frames < 1 or size < 8:
        raise ValueError(f"frames={frames}, size={size}: expected frames >= 1 and size >= 8")
    background = _background(size, generator)
    radius = size / 5
    dy, dx = DIRECTIONS[direction]
    travel = size - 2 * radius - 2
    jitter = (torch.rand(2, generator=generator) - 0.5) * 0.2 * size
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    colour_value = torch.tensor(COLOURS[colour]).view(3, 1, 1)
    video = torch.empty(3, frames, size, size)
    for t in range(frames):
        s = t / max(1, frames - 1) - 0.5                                    # -0.5 .. 0.5 along the path
        cy = size / 2 + dy * s * travel + (jitter[0] if dy == 0 else 0)
        cx = size / 2 + dx * s * travel + (jitter[1] if dx == 0 else 0)
        if shape == "square":
            inside = ((y - cy).abs() <= radius) & ((x - cx).abs() <= radius)
        else:
            inside = (y - cy) ** 2 + (x - cx) ** 2 <= radius ** 2
        video[:, t] = torch.where(inside, colour_value, background)
    return video.clamp(-1, 1)


def moving_shapes(count: int, frames: int = 9, size: int = 32, seed: int = 0, start: int = 0
                  ) -> tuple[torch.Tensor, list[str]]:
    """Clips ``start`` .. ``start + count - 1`` of the set with this seed -> (videos (N, 3, T, S, S),
    captions).  Clip i cycles through every (colour, shape, direction) combination; its texture and
    jitter come from a generator seeded with (seed, i), so any index range is reproducible alone."""
    if count < 1:
        raise ValueError(f"count={count}: expected >= 1")
    combos = [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]
    videos, captions = [], []
    for i in range(start, start + count):
        colour, shape, direction = combos[i % len(combos)]
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        videos.append(moving_shape(colour, shape, direction, frames, size, g))
        captions.append(caption_of(colour, shape, direction))
    return torch.stack(videos), captions


def photo_pan_zoom(image: torch.Tensor, frames: int = 17, height: int = 128, width: int = 128,
                   mode: str = "pan") -> torch.Tensor:
    """A camera move over a still photograph (H, W, 3) uint8 -> (3, frames, height, width) in
    [-1, 1]: ``pan`` slides a window of 60% of the short side from the left to the right edge (the
    top-left to bottom-right diagonal on a square photo), ``zoom`` closes in from the whole short
    side to its middle 50%."""
    if mode not in ("pan", "zoom"):
        raise ValueError(f"mode={mode!r}: expected 'pan' or 'zoom'")
    if image.dim() != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected (H, W, 3), got {tuple(image.shape)}")
    photo = image.permute(2, 0, 1).float()[None] / 127.5 - 1                 # (1, 3, H, W)
    H, W = photo.shape[2:]
    short = min(H, W)
    out = []
    for t in range(frames):
        s = t / max(1, frames - 1)
        if mode == "pan":
            size = 0.6 * short
            y = (H - size) * (s if H == W else 0.5)
            x = (W - size) * s
        else:
            size = short * (1 - 0.5 * s)
            y, x = (H - size) / 2, (W - size) / 2
        box_h, box_w = size, size * width / height
        if box_w > W:
            box_w, box_h = W, W * height / width
        y0, x0 = int(round(min(y, H - box_h))), int(round(min(x, W - box_w)))
        crop = photo[:, :, y0:y0 + int(round(box_h)), x0:x0 + int(round(box_w))]
        out.append(torch.nn.functional.interpolate(crop, size=(height, width), mode="bilinear",
                                                   antialias=True, align_corners=False)[0])
    return torch.stack(out, dim=1).clamp(-1, 1)
