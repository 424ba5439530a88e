"""Chunk plans: how WanVAE splits a clip in time.

All temporal state lives in one :class:`~pyratok.nn.StreamCache` per clip, keyed by module: each
CausalConv3d keeps its last P input frames there, and the blocks that treat a clip's first chunk
specially (pyratok.models.wan.blocks) count the frames they have been fed there.  The network
is causal, so every chunk plan gives the whole-clip result; a plan only trades passes for
activation memory.
"""

from __future__ import annotations

from typing import Optional

import torch

from pyratok.nn.causal_conv3d import StreamCache


def chunk_plan(total: int, first: int, size: Optional[int]) -> list[int]:
    """Chunk lengths covering ``total``: ``first``, then ``size`` at a time (None: all at once)."""
    if size is None or total <= first:
        return [total]
    plan = [first]
    while sum(plan) < total:
        plan.append(min(size, total - sum(plan)))
    return plan


def latent_plan(plan: list[int], temporal_factor: int) -> list[int]:
    """The latent frames an encoder makes of each chunk of a video chunk plan: 1 + (n - 1) / tf
    for the first chunk, n / tf for later ones."""
    return [1 + (n - 1) // temporal_factor for n in plan[:1]] + [n // temporal_factor for n in plan[1:]]


def stream_cache(plan: list[int]) -> Optional[StreamCache]:
    """A cache for a stream of several chunks; None for a single chunk, which then keeps no
    history frames (they would only be needed by a next chunk)."""
    return StreamCache() if len(plan) > 1 else None


def split_chunks(x: torch.Tensor, plan: list[int]) -> tuple[torch.Tensor, ...]:
    """Consecutive time chunks (dim 2) of x with the lengths in ``plan``."""
    return torch.split(x, plan, dim=2)
