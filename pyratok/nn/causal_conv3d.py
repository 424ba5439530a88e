"""CausalConv3d module and the explicit StreamCache a network threads through.

A network streams a clip by calling every forward with the same :class:`StreamCache`
on consecutive chunks (:func:`run_chunked` does the loop); each CausalConv3d keeps the
last P input frames of its previous chunk under its own key, so modules that are skipped
or reordered never read another layer's frames.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from pyratok.ops._checks import pair, triple
from pyratok.ops.causal_conv3d import causal_conv3d


class StreamCache:
    """Per-module streaming state, keyed by module (not by call order).

    Pass one StreamCache to every forward call of a network while feeding it consecutive
    chunks of a clip.  It holds two kinds of entries, each under the module it belongs to:

    * history frames (``get`` / ``set``): each CausalConv3d reads and replaces the last P
      input frames of its previous chunk;
    * frame counts (``frames_seen`` / ``add_frames``): a module whose first chunk of a clip
      differs from the later ones (Wan's temporal resampling) counts the frames it has been
      fed, and ``frames_seen(module) == 0`` tells it the clip starts.  Counts are Python ints
      (known from shapes), so reading one is not a ``.item()`` or a graph break under
      torch.compile.

    A module applied at two places of one forward pass (shared weights) needs a CausalConv3d per
    place, as the entry is per module.  ``reset()`` before the next clip.
    """

    def __init__(self):
        self._state: dict[int, tuple[nn.Module, torch.Tensor]] = {}
        self._frames: dict[int, tuple[nn.Module, int]] = {}

    def get(self, module: nn.Module) -> Optional[torch.Tensor]:
        """The history frames ``module`` stored with its previous chunk; None before its first."""
        entry = self._state.get(id(module))
        return None if entry is None else entry[1]

    def set(self, module: nn.Module, value: torch.Tensor) -> None:
        self._state[id(module)] = (module, value)  # keep the module alive so its id stays unique

    def frames_seen(self, module: nn.Module) -> int:
        """The frames counted for ``module`` with :meth:`add_frames` so far: 0 until its first chunk."""
        entry = self._frames.get(id(module))
        return 0 if entry is None else entry[1]

    def add_frames(self, module: nn.Module, frames: int) -> None:
        """Counts ``frames`` more input frames for ``module`` (call once per chunk it is fed)."""
        self._frames[id(module)] = (module, self.frames_seen(module) + frames)

    def reset(self) -> None:
        self._state.clear()
        self._frames.clear()

    def __contains__(self, module: nn.Module) -> bool:
        """Whether ``module`` has history frames here."""
        return id(module) in self._state

    def __len__(self) -> int:
        """The number of modules with history frames."""
        return len(self._state)


class CausalConv3d(nn.Module):
    """Conv3d that only looks into the past along time (see pyratok.ops.causal_conv3d).

    Parameters ``weight`` (out, in, kt, kh, kw) and ``bias`` have nn.Conv3d's names and
    shapes, so the state dict of an nn.Conv3d or of diffusers' WanCausalConv3d loads as
    is; that of a CogVideoXCausalConv3d (``conv.weight``, ``conv.bias``) too.
    ``padding`` is the spatial zero padding (ph, pw); the temporal padding is always
    causal: ``time_pad_mode="zeros"`` matches WanCausalConv3d, ``"replicate"``
    CogVideoXCausalConv3d (whose default pad_mode="constant" replicates frame 0 in time
    and zero-pads in space).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, dilation=1, padding=0,
                 bias: bool = True, time_pad_mode: str = "zeros", backend: Optional[str] = None):
        super().__init__()
        self.kernel_size = triple(kernel_size, "kernel_size")
        self.stride = triple(stride, "stride")
        self.dilation = triple(dilation, "dilation")
        self.padding = pair(padding, "padding")
        self.time_pad_mode = time_pad_mode
        self.backend = backend
        conv = nn.Conv3d(in_channels, out_channels, self.kernel_size, bias=bias)  # default init
        self.weight = conv.weight
        self.bias = conv.bias

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("weight", "bias"):  # CogVideoXCausalConv3d keeps its nn.Conv3d as .conv
            nested = f"{prefix}conv.{name}"
            if nested in state_dict and f"{prefix}{name}" not in state_dict:
                state_dict[f"{prefix}{name}"] = state_dict.pop(nested)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, cache: Optional[StreamCache] = None) -> torch.Tensor:
        """x (B, C, T, H, W) -> (B, O, T/st, Ho, Wo).  With ``cache``, x is the next chunk
        of a clip: the layer's past frames come from the cache, which it then updates."""
        prev = cache.get(self) if cache is not None else None
        y, new = causal_conv3d(x, self.weight, self.bias, self.stride, self.dilation, self.padding,
                               self.time_pad_mode, prev, self.backend)
        if cache is not None:
            cache.set(self, new)
        return y

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, padding={self.padding}, "
                f"time_pad_mode={self.time_pad_mode!r}")


def run_chunked(module: nn.Module, x: torch.Tensor, chunks: Sequence[int], cache: Optional[StreamCache] = None,
                dim: int = 2) -> torch.Tensor:
    """Runs ``module(chunk, cache=cache)`` over consecutive chunks of x along ``dim`` (time)
    and concatenates the outputs; equals the whole-clip output for causal modules.  Pass
    a ``cache`` to continue a stream across calls (e.g. Wan's chunks: 1 frame, then 4)."""
    if any(not isinstance(n, int) or n < 1 for n in chunks):
        raise ValueError(f"chunks: expected positive frame counts, got {list(chunks)}")
    if sum(chunks) != x.shape[dim]:
        raise ValueError(f"chunks: {list(chunks)} sum to {sum(chunks)}, but x has {x.shape[dim]} frames")
    cache = StreamCache() if cache is None else cache
    outs, start = [], 0
    for n in chunks:
        outs.append(module(x.narrow(dim, start, n), cache=cache))
        start += n
    return torch.cat(outs, dim=dim)
