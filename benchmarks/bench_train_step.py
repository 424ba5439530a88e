"""Training-step setups for the bundled model (issue #14): seconds per optimizer step of the
backbone stage (VAE reconstruction, forward + backward + AdamW) for candidate backbones and CPU
settings: threads, op backend, bf16 autocast (AMX on this CPU), channels-last-3d, torch.compile.

    python benchmarks/bench_train_step.py [--steps 6] [--out benchmarks/results/train_step.csv]

Each row: median seconds/step over --steps timed steps after 2 warm-up steps, input pixels/s,
and the PSNR after the timed steps (a sanity check that the setup trains at all, from the same
seed and data in every row).  Rewrites the CSV atomically after every row.  A setup that fails
is a row with its error (e.g. channels-last on a model with non-5-D weights).

Result here (benchmarks/results/train_step.csv, 2-core Xeon with AMX): bf16 autocast with
PyTorch's oneDNN convolution (backend "reference") is the fastest setup for every backbone
(0.36 vs 0.55 s/step fp32 for the Wan 2.2-layout b48; 0.62 vs 1.15 for b32); torch.compile
adds little over it for the tiny model and nothing for b32; channels-last is no faster; 2
threads are 1.7x one.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pyratok.metrics import psnr  # noqa: E402
from pyratok.models.pyratok import PyraTok, PyraTokConfig  # noqa: E402
from pyratok.models.vae import WanVAEConfig  # noqa: E402
from pyratok.utils import atomic_write  # noqa: E402

BACKBONES = {
    # the shipped tiny backbone
    "b16-z8": dict(base_dim=16, z_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    "b32-z16": dict(base_dim=32, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    # Wan 2.2 layout: 2x2 patchify first, so the widest layers run at half resolution
    # the bundled model's backbone (scripts/default_model.py)
    "p2-b40-z16": dict(base_dim=40, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, patch_size=2,
                       in_channels=12, out_channels=12, is_residual=True, temperal_downsample=(True, True)),
    "p2-b48-z16": dict(base_dim=48, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, patch_size=2,
                       in_channels=12, out_channels=12, is_residual=True, temperal_downsample=(True, True)),
    "p2-b64-z16": dict(base_dim=64, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, patch_size=2,
                       in_channels=12, out_channels=12, is_residual=True, temperal_downsample=(True, True)),
}


def build(name: str) -> PyraTok:
    kw = dict(BACKBONES[name])
    kw.setdefault("latents_mean", (0.0,) * kw["z_dim"])
    kw.setdefault("latents_std", (1.0,) * kw["z_dim"])
    torch.manual_seed(0)
    cfg = PyraTokConfig.tiny(text_encoder=None)
    return PyraTok(dataclasses.replace(cfg, backbone=WanVAEConfig(**kw),
                                       lapq=dataclasses.replace(cfg.lapq, latent_dim=kw["z_dim"])))


def run(name, threads, backend, amp, channels_last, compile_, batch, frames, size, steps):
    torch.set_num_threads(threads)
    if backend:
        os.environ["PYRATOK_BACKEND"] = backend
    else:
        os.environ.pop("PYRATOK_BACKEND", None)
    model = build(name)
    model.train()
    params = [p for p in model.vae.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    if channels_last:
        for p in model.vae.parameters():
            if p.dim() == 5:
                p.data = p.data.contiguous(memory_format=fmt)
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(batch, 3, frames, size, size, generator=g) * 2 - 1)
    video = torch.nn.functional.avg_pool3d(video, (1, 5, 5), 1, (0, 2, 2))  # some spatial correlation
    video = video.contiguous(memory_format=fmt)
    fwd = model.backbone_forward
    if compile_:
        fwd = torch.compile(fwd)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else nullcontext
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with ctx():
            recon, losses = fwd(video)
        losses.total.float().backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    nparams = sum(p.numel() for p in params)
    return dict(backbone=name, params_m=round(nparams / 1e6, 3), threads=threads, backend=backend or "auto",
                bf16_autocast=int(amp), channels_last=int(channels_last), compile=int(compile_), batch=batch,
                frames=frames, size=size, sec_per_step=round(sec, 4),
                mpix_per_s=round(batch * frames * size * size / sec / 1e6, 4),
                psnr_after=round(psnr(recon.detach().float(), video).item(), 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_step.csv"))
    ap.add_argument("--backbones", nargs="*", default=list(BACKBONES))
    ap.add_argument("--quick", action="store_true", help="settings sweep on the first backbone only")
    args = ap.parse_args()
    rows = []
    base = dict(threads=2, backend=None, amp=False, channels_last=False, compile_=False, batch=2, frames=9, size=64)
    setups = [{}]
    setups += [dict(threads=1), dict(backend="reference"), dict(amp=True), dict(backend="reference", amp=True),
               dict(backend="reference", channels_last=True), dict(backend="reference", amp=True, channels_last=True),
               dict(compile_=True), dict(amp=True, compile_=True), dict(backend="reference", amp=True, compile_=True),
               dict(batch=4), dict(batch=1, size=96)]
    short = [{}, dict(amp=True), dict(backend="reference", amp=True), dict(compile_=True), dict(amp=True, compile_=True)]
    for name in args.backbones:
        for s in (setups if name == args.backbones[0] else short if not args.quick else [{}]):
            kw = {**base, **s}
            try:
                row = run(name, steps=args.steps, **kw)
            except Exception as err:  # a setup that does not run is a result too
                row = dict(backbone=name, **{k: v for k, v in kw.items()}, error=f"{type(err).__name__}: {err}"[:200])
            print(row, flush=True)
            rows.append(row)
            write(rows, args.out)          # after every row: a cut run keeps what it measured
    print(f"wrote {args.out}")


def write(rows: list[dict], path: str) -> None:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


if __name__ == "__main__":
    main()
