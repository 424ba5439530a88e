"""Small shared helpers."""

from __future__ import annotations

import contextlib
import os
import tempfile

# Bounds on sizes a user controls (CLI options, TOML, model config.json), checked before any
# allocation so that a typo fails in one line instead of exhausting memory (issue 19):
MAX_SIDE = 8192                 # pixels, height or width of a clip
MAX_FRAMES = 4097               # frames of one clip (1 + 4k)
MAX_CLIP_PIXELS = 1 << 30       # frames x height x width of one decoded clip (12 GiB as float32 RGB)
MAX_TILE = 1024                 # latent pixels per spatial tile
MAX_MODEL_PARAMS = 4 * 10 ** 9  # estimated parameters of a model built from a config (16 GB fp32)


def check_clip_pixels(frames: int, height: int, width: int, what: str) -> None:
    """ValueError when a clip of frames x height x width would exceed MAX_CLIP_PIXELS."""
    pixels = frames * height * width
    if pixels > MAX_CLIP_PIXELS:
        raise ValueError(f"{what}: {frames} frames of {height}x{width} = {pixels / 2 ** 30:.1f} Gi pixels, "
                         f"more than the {MAX_CLIP_PIXELS / 2 ** 30:.0f} Gi pixel limit "
                         f"({12 * pixels / 2 ** 30:.0f} GiB as float32); use fewer frames or a smaller size")


def error_summary(err: BaseException, limit: int = 200) -> str:
    """``"Type: first line"`` of an exception for a one-line error message, the line cut at
    ``limit`` characters (an empty message gives ``"Type: "``)."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:limit] if lines else ''}"


def default_file_mode() -> int:
    """0666 minus the process umask: the mode open() gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Writes ``path`` through a temporary file in the same folder, renamed into place on
    success: readers never see a partial file and a failure leaves the old file intact.
    The file gets the permissions a plain open() would give (0666 minus the umask), not
    mkstemp's private 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
