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


def hand_keep(B, T, H, W, cfg, seed):
    """The keep mask from the generator's draws in order, written out: frame drops (B, T) when
    frame_ratio > 0 and T > 1 (frame 0 kept), then per frame u (B, T) with r = max_ratio cos(pi u / 2),
    then per frame and cell a score (B, T, cells); a cell is hidden when its score < r."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(B, 1, T, H, W, dtype=torch.bool)
    if cfg.frame_ratio > 0 and T > 1:
        drop = torch.rand(B, T, generator=g) < cfg.frame_ratio
        drop[:, 0] = False
        keep &= ~drop[:, None, :, None, None]
    gh, gw = -(-H // cfg.patch), -(-W // cfg.patch)
    u = torch.rand(B, T, generator=g)
    scores = torch.rand(B, T, gh * gw, generator=g)
    hidden = scores < (torch.cos(math.pi / 2 * u) * cfg.max_spatial_ratio)[..., None]
    for b in range(B):
        for t in range(T):
            for cell in range(gh * gw):
                if hidden[b, t, cell]:
                    y, x = divmod(cell, gw)
                    keep[b, 0, t, y * cfg.patch:(y + 1) * cfg.patch, x * cfg.patch:(x + 1) * cfg.patch] = False
    return keep


@pytest.mark.parametrize("B, T, frame_ratio", [(3, 1, 0.5), (3, 2, 0.5), (2, 5, 0.5), (2, 5, 0.0)])
def test_the_keep_mask_is_the_generators_draws_in_order(B, T, frame_ratio):
    cfg = MaskingConfig(frame_ratio=frame_ratio, patch=3, max_spatial_ratio=0.6)
    _, keep = VideoMasking(cfg)(torch.rand(B, 2, T, 7, 8), torch.Generator().manual_seed(7))
    assert torch.equal(keep, hand_keep(B, T, 7, 8, cfg, 7))


def test_outputs_stay_on_the_videos_device():
    video = torch.empty(2, 3, 5, 16, 16, device="meta")
    masked, keep = VideoMasking()(video, torch.Generator().manual_seed(0))
    assert masked.device.type == "meta" and keep.device.type == "meta" and keep.shape == (2, 1, 5, 16, 16)
