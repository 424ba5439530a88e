"""pyratok.models.masking on its own: the config's bounds, the fill value, patches at frame edges,
frame masking off for one-frame clips, and the generator deciding everything (the schedule's
statistics are in test_tokenizer.py)."""

import math

import pytest
import torch

from pyratok.models.masking import MaskingConfig, VideoMasking


def test_config_bounds():
    MaskingConfig(frame_ratio=0.0, max_spatial_ratio=0.0)
    MaskingConfig(frame_ratio=0.999, max_spatial_ratio=0.999, spatial="none")
    for bad, match in (({"frame_ratio": 1.0}, "frame_ratio=1.0: expected 0 <= ratio < 1"),
                       ({"frame_ratio": -0.1}, "frame_ratio=-0.1"),
                       ({"max_spatial_ratio": 1.0}, "max_spatial_ratio=1.0: expected 0 <= ratio < 1"),
                       ({"max_spatial_ratio": -0.5}, "max_spatial_ratio=-0.5"),
                       ({"spatial": "random"}, "spatial='random': expected 'cosine' or 'none'")):
        with pytest.raises(ValueError, match=match):
            MaskingConfig(**bad)
    assert MaskingConfig() == MaskingConfig(0.3, "cosine", 16, 0.5, 0.0)


def test_fill_patches_at_the_edges_and_the_returned_keep_mask():
    masking = VideoMasking(MaskingConfig(frame_ratio=0.0, spatial="cosine", patch=3, max_spatial_ratio=0.9,
                                         fill=0.25))
    video = torch.rand(8, 2, 3, 7, 8) * 2 - 1
    masked, keep = masking(video, torch.Generator().manual_seed(1))
    assert keep.shape == (8, 1, 3, 7, 8) and keep.dtype == torch.bool
    assert torch.equal(masked, torch.where(keep, video, torch.full_like(video, 0.25)))
    assert (~keep).any() and keep.any()
    # masked cells are whole 3x3 patches (cut at the right and bottom edges): constant on each cell
    hidden = ~keep[:, 0]
    for y0 in range(0, 7, 3):
        for x0 in range(0, 8, 3):
            cell = hidden[:, :, y0:y0 + 3, x0:x0 + 3].flatten(2)
            assert torch.equal(cell.all(2), cell.any(2))
    # the default config fills with 0 (mid-grey)
    masked, keep = VideoMasking()(torch.ones(2, 3, 5, 32, 32), torch.Generator().manual_seed(0))
    assert set(masked.unique().tolist()) <= {0.0, 1.0} and (masked == 0).sum() == (~keep).sum() * 3


def test_frame_masking_needs_frames_and_a_ratio():
    video = torch.rand(64, 1, 1, 4, 4)
    _, keep = VideoMasking(MaskingConfig(frame_ratio=0.9, spatial="none"))(video, torch.Generator().manual_seed(0))
    assert keep.all()                                                  # one frame: frame 0, always kept
    _, keep = VideoMasking(MaskingConfig(frame_ratio=0.0, spatial="none"))(torch.rand(64, 1, 5, 4, 4))
    assert keep.all()
    _, keep = VideoMasking(MaskingConfig(frame_ratio=0.9, spatial="none"))(torch.rand(64, 1, 5, 4, 4),
                                                                          torch.Generator().manual_seed(0))
    dropped = (~keep).flatten(3).all(3)[:, 0]
    assert not dropped[:, 0].any() and dropped[:, 1:].float().mean() > 0.8
    assert torch.equal(dropped, (~keep).flatten(3).any(3)[:, 0])    # whole frames, nothing spatial


def test_the_generator_decides_and_the_schedule():
    masking = VideoMasking(MaskingConfig(frame_ratio=0.3, patch=2, max_spatial_ratio=0.2))
    video = torch.rand(16, 3, 5, 8, 8)
    a = masking(video, torch.Generator().manual_seed(3))[1]
    assert torch.equal(a, masking(video, torch.Generator().manual_seed(3))[1])
    assert not torch.equal(a, masking(video, torch.Generator().manual_seed(4))[1])
    # cells are hidden with probability r <= 0.2: on average about 0.2 * 2 / pi of a frame
    frames = (~a)[:, 0]
    dropped = frames.flatten(2).all(2)
    fraction = frames.flatten(2).float().mean(2)[~dropped]
    assert 0.06 < fraction.mean() < 0.2
    # the schedule: r = max_ratio * cos(pi u / 2) per frame, from the generator's draws in order
    g = torch.Generator().manual_seed(5)
    _, keep = VideoMasking(MaskingConfig(frame_ratio=0.0, patch=8, max_spatial_ratio=0.5))(torch.rand(1, 1, 2, 8, 16), g)
    g = torch.Generator().manual_seed(5)
    u = torch.rand(1, 2, generator=g)
    scores = torch.rand(1, 2, 2, generator=g)
    want = scores < (torch.cos(math.pi / 2 * u) * 0.5)[..., None]
    assert torch.equal((~keep)[0, 0, :, ::8, ::8].flatten(1), want[0])
