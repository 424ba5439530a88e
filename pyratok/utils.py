"""Small shared helpers."""

from __future__ import annotations

import contextlib
import os
import tempfile


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
