"""Spatial tiling: running a convolutional part of the VAE on overlapping tiles and blending them.

``tile`` and ``overlap`` are in latent pixels.  The attention in the mid blocks sees the whole
frame, so it is never tiled: the part at latent resolution (decoder: conv_in + mid block;
encoder: mid block + head) runs on whole frames, and only the convolutional part above latent
resolution is tiled.  Each tile runs the whole temporal stream on its own; in the band two tiles
share, each tile's outer ``margin`` pixels get weight 0 and the rest is a linear ramp, normalised
to sum to one.  With margin >= the receptive-field radius R of the tiled part
(``WanVAE.receptive_field``, 12.25 latent pixels for the Wan 2.1 decoder), i.e. overlap >=
2 ceil(R) + 1 (the default is 2 ceil(R) + 2), tiled equals untiled up to fp32 rounding; a smaller
overlap is allowed with a warning (seamless, not exact).  Memory: the output, the latent-resolution
activations of the whole clip, and one tile's working set.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch


def overlap_and_margin(tile: int, overlap: Optional[int], radius: float, part: str,
                       stacklevel: int = 1) -> tuple[int, int]:
    """Checks ``tile`` and ``overlap`` for a tiled part of receptive-field radius ``radius``
    (``part`` names it in messages) -> (overlap, margin).  Exact tiling needs margin >= R, i.e.
    overlap >= 2 * ceil(R) + 1; overlap None gives 2 * ceil(R) + 2 (a 2-latent-pixel ramp).  A
    smaller overlap warns (``stacklevel`` as in warnings.warn, counted from the caller) and keeps
    the outer (overlap - 1) // 2 pixels out of the blend."""
    if not isinstance(tile, int) or tile < 4:
        raise ValueError(f"tile={tile!r}: expected an int >= 4 (latent pixels)")
    needed = 2 * math.ceil(radius) + 1 if math.isfinite(radius) else None
    if overlap is None:
        overlap = needed + 1 if needed is not None and needed + 1 < tile else tile // 2
    if not isinstance(overlap, int) or not 0 < overlap < tile:
        raise ValueError(f"overlap={overlap!r}: expected an int in [1, tile) latent pixels (tile={tile})")
    if needed is None or overlap < needed:
        warnings.warn(f"tile overlap {overlap} is below 2 x the {part}'s receptive-field radius + 1 "
                      f"({needed if needed is not None else 'unbounded: attention in the down blocks'}); tiles "
                      f"differ from the untiled result near their edges (the blend hides seams, but is not "
                      f"exact); use a larger tile and overlap for exact tiling", stacklevel=stacklevel + 1)
        return overlap, (overlap - 1) // 2
    return overlap, math.ceil(radius)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Origins of the fewest tiles of ``tile`` pixels that cover ``length`` with neighbours sharing
    at least ``overlap`` pixels, spread evenly."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def blend_weights(start: int, size: int, length: int, margin: int, ramp: int) -> torch.Tensor:
    """1-D weights of a tile covering [start, start + size) of an axis of ``length``.  On a side
    that borders another tile: 0 over the ``margin`` pixels at the edge (they saw the tile's zero
    padding), then a linear ramp over ``ramp`` pixels; 1 elsewhere and at the frame border."""
    w = torch.ones(size)
    rising = torch.cat([torch.zeros(margin), (torch.arange(ramp) + 0.5) / ramp])
    n = margin + ramp
    if start > 0:
        w[:n] = rising
    if start + size < length:
        w[size - n:] = torch.minimum(w[size - n:], rising.flip(0))
    return w


def run_tiled(x: torch.Tensor, in_scale: int, tile: int, overlap: int, margin: int,
              run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Runs ``run`` on overlapping spatial tiles of x (B, C, T, H * in_scale, W * in_scale) and
    blends the results (B, C', T', H * s, W * s, s read off the first tile); H, W count latent
    pixels.

    Neighbouring tiles share at least ``overlap`` latent pixels; there each tile's outer
    ``margin`` pixels get weight 0 and the rest ramps linearly, and the weights are
    normalised to sum to one.  Accumulates in fp32, returns the dtype ``run`` returns.
    """
    return run_tiled_many(x, in_scale, tile, overlap, margin, lambda piece: [run(piece)])[0]


def run_tiled_many(x: torch.Tensor, in_scale: int, tile: int, overlap: int, margin: int,
                   run: Callable[[torch.Tensor], list[torch.Tensor]]) -> list[torch.Tensor]:
    """``run_tiled`` for a ``run`` that returns a list of maps, each at its own whole number of
    output pixels per latent pixel (read off the first tile); each is blended at its scale."""
    H, W = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    outs = weights = scales = None
    for top in tile_starts(H, tile, overlap):
        for left in tile_starts(W, tile, overlap):
            th, tw = min(tile, H), min(tile, W)
            pieces = run(x[..., top * in_scale:(top + th) * in_scale, left * in_scale:(left + tw) * in_scale])
            if outs is None:
                scales = [p.shape[-1] // tw for p in pieces]
                outs = [p.new_zeros(*p.shape[:-2], H * s, W * s, dtype=torch.float32) for p, s in zip(pieces, scales)]
                weights = [torch.zeros(H * s, W * s, device=x.device) for s in scales]
            for piece, out, weight, s in zip(pieces, outs, weights, scales):
                if piece.shape[-2:] != (th * s, tw * s):
                    raise AssertionError(f"tiled part returned {tuple(piece.shape[-2:])} for a {th}x{tw} tile")
                ramp = (overlap - 2 * margin) * s
                w = (blend_weights(top * s, th * s, H * s, margin * s, ramp)[:, None]
                     * blend_weights(left * s, tw * s, W * s, margin * s, ramp)[None, :]).to(x.device)
                rows, cols = slice(top * s, (top + th) * s), slice(left * s, (left + tw) * s)
                out[..., rows, cols] += piece.float() * w
                weight[rows, cols] += w
    return [out.div_(weight).to(piece.dtype) for out, weight, piece in zip(outs, weights, pieces)]
