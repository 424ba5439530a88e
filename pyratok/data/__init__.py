"""Video input: decoding with decord, bundled real clips for demos and tests."""

from pyratok.data.video import bundled_clip_path, read_video

__all__ = ["bundled_clip_path", "read_video"]
