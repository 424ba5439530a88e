"""Video input and output: clip datasets, decoding with decord, writing with PyAV."""

from pyratok.data.dataset import (
    BucketBatchSampler,
    ClipConfig,
    NoUsableClipError,
    VideoClipDataset,
    collate_clips,
    read_manifest,
    resize_and_crop,
)
from pyratok.data.video import VideoInfo, bundled_clip_path, open_video, read_video, write_video

__all__ = [
    "BucketBatchSampler",
    "ClipConfig",
    "NoUsableClipError",
    "VideoClipDataset",
    "VideoInfo",
    "bundled_clip_path",
    "collate_clips",
    "open_video",
    "read_manifest",
    "read_video",
    "resize_and_crop",
    "write_video",
]
