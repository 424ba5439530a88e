"""Does stage 1f help an operating point, and with which entropy weight?  Decided on a validation
split of the TRAINING data.

Each point ships its fitted LaPQ after a stage 1f (the paper's stage 1 losses, the LaPQ, LoRA and
decoder trained; scripts/train_default.sh: 300 steps at the high point, 1,500 at the low).  With the
entropy term at 0.1, as the low point ran it until 2026-12-07, that stage lowered the high point's
PSNR on the held-out evaluation set each time it ran, but the evaluation set may not choose the
recipe.  This study splits the training manifest instead (its results,
benchmarks/results/stage1f_validation_{high,low}.csv, are why both points now run stage 1f without
the entropy term):

  validation: the last training window of each real clip (bikes, bigbuckbunny, carphone), 17 frames
              at 144x176 as in the README's protocol, and pan and zoom moves (17 frames, 128x128, the
              protocol's photo_pan_zoom) over three TRAINING photographs (camera, rocket,
              grace_hopper), whose camera-move clips are taken out of the training manifest;
  training:   every other row of the manifest (112 of 136).

On the training rows it fits a fresh LaPQ to the point's frozen stage-0 backbone (default_model
fit, the point's settings and length) and runs stage 1f from it twice at the point's full length,
with the entropy term at 0.1 and at 0; then it measures every arm on the validation clips.  The
backbone itself (stage 0) did see the validation rows: it is the same in every arm, and the
question is only what stage 1f adds to it.

  .venv/bin/python scripts/stage1f_validation.py [--point high|low] [WORK] [RESULT_CSV]
  .venv/bin/python scripts/stage1f_validation.py --continuation [--runs RUN,...] [--every N] [--baseline MODEL] [WORK] [RESULT_CSV]
  .venv/bin/python scripts/stage1f_validation.py --backbone RUN [--every N] WORK RESULT_CSV
  .venv/bin/python scripts/stage1f_validation.py --split [WORK]
  .venv/bin/python scripts/stage1f_validation.py --models NAME=MODEL,... WORK RESULT_CSV
  .venv/bin/python scripts/stage1f_validation.py --frames MODEL [--backbone-only] WORK RESULT_CSV

``--continuation`` measures continuations of a point's stage 1f on 17-frame crops (WORK/<run>,
default stage1f17_low, trained on the training rows only; several runs from one starting point) on the
same validation clips, from that starting point through their checkpoints, and applies the rule written
before they ran (benchmarks/results/rules/stage1f17_*.md): RESULT_CSV (for one run stage1f17_<point>
benchmarks/results/stage1f17_validation_<point>.csv by default; several runs need it named) marks the
checkpoint that ships, if one does.
``--split`` only writes the training rows without the validation ones (WORK/data/train_val1f.jsonl, which
those runs train on; scripts/train_default.sh) and those rows with the other photographs' fast camera moves
(WORK/data/train_val1f_fast.jsonl).

WORK (default outputs/default_train) must hold the full run's data/, init_<point>/ (the branch of
the point's stage-0 backbone with a fresh LaPQ) and stage1f_<point>.toml (the point's stage-1f
settings, which every arm takes with only the manifest and the entropy weight changed): both are
written by scripts/train_default.sh.  The study writes WORK/val1f_<point>/ and RESULT_CSV (default
benchmarks/results/stage1f_validation_<point>.csv).  Each step is skipped when its output exists,
so an interrupted run continues where it stopped.  About an hour on 2 cores for the high point.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default_model  # noqa: E402
from make_default_data import load_photo  # noqa: E402

VALIDATION_PHOTOS = (("skimage", "camera"), ("skimage", "rocket"), ("matplotlib", "grace_hopper.jpg"))
ARMS = {"entropy": 0.1, "no_entropy": 0.0}     # stage 1f's entropy weight: the one both points ran before, and none
# each point's fit and stage-1f steps, as scripts/train_default.sh runs them (FIT_STEPS / STEPS1F / FIT_CROPS in
# the environment: a smoke run)
LENGTHS = {"low": (3000, 1500), "high": (3000, 300)}
EVERY = 250
# a point's stage 1f continued on 17-frame crops, measured at its checkpoints and chosen by a rule written before it
# ran (benchmarks/results/rules/stage1f17_*.md): ``--continuation``
CONTINUATION, CONTINUATION_EVERY, CONTINUATION_MARGIN = "stage1f17_low", 500, 0.10
SPLIT = "train_val1f.jsonl"   # in WORK/data: the training rows without the validation ones
FAST_SPLIT = "train_val1f_fast.jsonl"   # and those rows with the training photographs' fast moves (fast_moves.jsonl)


def _stem(source: str, name: str) -> str:
    return os.path.splitext(name)[0]


def split(manifest: str, out: Optional[str]) -> list[dict]:
    """Writes the training rows without the validation ones to ``out`` (next to ``manifest``, whose
    relative paths it keeps; None: not written); returns the real clips' validation windows (the last of
    each clip)."""
    from pyratok.utils import atomic_write

    with open(manifest) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    last = {}
    for r in rows:
        if r["path"].startswith("clips/") and r["start"] >= last.get(r["path"], {"start": -1})["start"]:
            last[r["path"]] = r
    photos = {_stem(*p) for p in VALIDATION_PHOTOS}
    keep = [r for r in rows if r not in last.values()
            and not (r["path"].startswith("photos/") and os.path.basename(r["path"]).rsplit("-", 1)[0] in photos)]
    if len(last) != 3 or len(rows) - len(keep) != 4 * (len(last) + len(photos)):
        raise SystemExit(f"split: {manifest} is not the full run's manifest (3 clips and 4 rows per window and "
                         f"photograph expected; {len(rows)} rows, {len(rows) - len(keep)} taken out)")
    if out is not None:
        with atomic_write(out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        print(f"split: {len(keep)} training rows -> {out}; validation: {sorted(last)} last windows, {sorted(photos)}")
    return list(last.values())


def fast_split(data_dir: str) -> None:
    """Writes data_dir/FAST_SPLIT: the rows of data_dir/SPLIT and the fast camera moves
    (data_dir/fast_moves.jsonl, scripts/make_default_data.py) of every photograph but the validation ones."""
    from pyratok.utils import atomic_write

    rows = []
    for name in (SPLIT, "fast_moves.jsonl"):
        with open(os.path.join(data_dir, name)) as f:
            rows.append([json.loads(line) for line in f if line.strip()])
    photos = {_stem(*p) for p in VALIDATION_PHOTOS}
    stems = [os.path.basename(r["path"]).rsplit("-", 1)[0] for r in rows[1]]
    if not photos <= set(stems) or not set(stems) - photos:
        raise SystemExit(f"fast_split: {data_dir}/fast_moves.jsonl is not the full run's (the moves of "
                         f"{sorted(set(stems))}; the validation photographs {sorted(photos)} and others expected)")
    fast = [r for r, stem in zip(rows[1], stems) if stem not in photos]
    with atomic_write(os.path.join(data_dir, FAST_SPLIT), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[0] + fast)
    print(f"split: {len(rows[0])} training rows and {len(fast)} fast moves -> {data_dir}/{FAST_SPLIT}")


def validation_sets(data_dir: str, windows: list[dict]) -> dict:
    """The validation clips in held_out_sets' form, made as the evaluation protocol makes its clips:
    {"real": [(name, clip, None)], "photos": [...]}."""
    from pyratok.data import VideoInfo
    from pyratok.study import protocol_clip, protocol_photo_moves

    real = []
    for w in windows:
        path = os.path.join(data_dir, w["path"])
        real.append((os.path.basename(path).removesuffix(".mp4"),
                     protocol_clip(path, round(w["start"] * VideoInfo(path).fps)), None))
    photos = [move for p in VALIDATION_PHOTOS for move in protocol_photo_moves(_stem(*p), load_photo(*p))]
    return {"real": real, "photos": photos}


def stage1f(work: str, name: str, shipped: str, changes: dict, steps: int, threads: int) -> Optional[subprocess.Popen]:
    """Starts a ``steps``-step stage-1f run with the settings of the shipped one (``shipped``: the TOML
    that scripts/train_default.sh wrote), ``changes`` ({key: TOML value}) replacing some of them;
    returns the process (None when the run is already complete)."""
    from pyratok.utils import atomic_write

    out = os.path.join(work, name)
    if os.path.isdir(os.path.join(out, "checkpoints", f"step-{steps:08d}")):
        print(f"{name}: already done")
        return None
    changes = {**changes, "out_dir": json.dumps(name), "steps": str(steps)}
    with open(shipped) as f:
        lines = f.read().splitlines()
    found = set()
    for i, line in enumerate(lines):
        key = line.split("=", 1)[0].strip()
        if "=" in line and key in changes:
            lines[i] = f"{key} = {changes[key]}"
            found.add(key)
    if found != set(changes):
        raise SystemExit(f"{shipped}: no {sorted(set(changes) - found)} to change (not a stage-1f run's settings)")
    toml = os.path.join(work, f"{name}.toml")
    with atomic_write(toml, "w") as f:
        f.write("\n".join(lines) + "\n")
    resume = ["--resume"] if os.path.isfile(os.path.join(out, "checkpoints", "latest")) else []
    print(f"{name}: stage 1f ({', '.join(f'{k} = {v}' for k, v in changes.items())}) -> {out}", flush=True)
    with open(os.path.join(work, f"{name}.out"), "a") as log:   # the child keeps its own copy of the file
        return subprocess.Popen([sys.executable, "-m", "pyratok.cli", "train", toml, *resume], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--point", choices=sorted(LENGTHS), default="high")
    parser.add_argument("work", nargs="?", default="outputs/default_train")
    parser.add_argument("result", nargs="?", help="default: benchmarks/results/stage1f_validation_<point>.csv "
                        "(--continuation: benchmarks/results/stage1f17_validation_<point>.csv for the run stage1f17_<point>)")
    parser.add_argument("--continuation", action="store_true",
                        help="measure continuations of a point's stage 1f on 17-frame crops instead")
    parser.add_argument("--runs", default=CONTINUATION, help="--continuation: the runs in WORK, comma-separated")
    parser.add_argument("--baseline", metavar="MODEL",
                        help="--continuation: compare the checkpoints with MODEL instead of their starting point")
    parser.add_argument("--every", type=int, default=CONTINUATION_EVERY, help="--continuation, --backbone: checkpoint spacing")
    parser.add_argument("--backbone", metavar="RUN",
                        help="measure the backbone alone of the stage-0 run RUN in WORK (its start and checkpoints "
                        "every --every steps) into RESULT_CSV; chooses nothing")
    parser.add_argument("--models", metavar="NAME=MODEL,...",
                        help="measure these model folders (e.g. a point as stored in 8 bits beside its checkpoint) "
                        "into RESULT_CSV; chooses nothing")
    parser.add_argument("--frames", metavar="MODEL",
                        help="per-frame PSNR of MODEL on the validation clips by the frame's place in its latent "
                        "group into RESULT_CSV (--backbone-only: the backbone alone); chooses nothing")
    parser.add_argument("--backbone-only", action="store_true", help="--frames: the continuous latents, no quantizer")
    parser.add_argument("--split", action="store_true",
                        help=f"only write WORK/data/{SPLIT} (the training rows without the validation ones) and "
                        f"{FAST_SPLIT} (with the fast moves)")
    args = parser.parse_args(argv)
    work, point = args.work, args.point
    if args.split:
        split(os.path.join(work, "data", "train.jsonl"), os.path.join(work, "data", SPLIT))
        fast_split(os.path.join(work, "data"))
        return
    if args.every < 1:
        raise SystemExit(f"--every: expected a positive number of steps, got {args.every}")
    if args.frames:
        if args.result is None:
            raise SystemExit("--frames: name RESULT_CSV")
        write_rows(frames(*_validation_windows(work), args.frames, not args.backbone_only), args.result)
        return
    if args.models:
        pairs = [m.split("=", 1) for m in args.models.split(",")]
        if args.result is None or any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
            raise SystemExit(f"--models: expected NAME=MODEL,... and RESULT_CSV, got {args.models!r} and "
                             f"{args.result!r}")
        write_rows(measure(*_validation_windows(work), [(name, 0, path) for name, path in pairs]), args.result)
        return
    if args.backbone:
        if args.result is None:
            raise SystemExit("--backbone: name RESULT_CSV")
        backbone(work, args.backbone, args.result, args.every)
        return
    if args.continuation:
        runs = tuple(args.runs.split(","))
        point = next((p for p in LENGTHS if runs == (f"stage1f17_{p}",)), None)
        if args.result is None and point is None:
            raise SystemExit(f"--continuation: name RESULT_CSV for the runs {runs} (no default beside one "
                             f"stage1f17_<point> run)")
        continuation(work, args.result or f"benchmarks/results/stage1f17_validation_{point}.csv", runs, args.every,
                     args.baseline)
        return
    result = args.result or f"benchmarks/results/stage1f_validation_{point}.csv"
    fit_steps, steps = (int(os.environ.get(k, n)) for k, n in zip(("FIT_STEPS", "STEPS1F"), LENGTHS[point]))
    study = os.path.join(work, f"val1f_{point}")
    os.makedirs(study, exist_ok=True)
    manifest = os.path.join(work, "data", SPLIT)
    windows = split(os.path.join(work, "data", "train.jsonl"), manifest)
    fitted = os.path.join(study, f"fit_{point}")
    default_model.fit(os.path.join(work, f"init_{point}"), manifest, fitted, steps=fit_steps)

    shipped = os.path.join(work, f"stage1f_{point}.toml")
    runs = {arm: stage1f(study, f"stage1f_{arm}", shipped, {"pretrained": json.dumps(os.path.abspath(fitted)),
                                                            "source": json.dumps(os.path.relpath(manifest, study)),
                                                            "entropy": str(weight)}, steps, threads=1)
            for arm, weight in ARMS.items()}
    for arm, proc in runs.items():
        if proc is not None and proc.wait() != 0:
            raise SystemExit(f"stage1f_{arm} failed: {os.path.join(study, f'stage1f_{arm}.out')}")

    todo = [("fit only", 0, fitted)]
    for arm in ARMS:
        todo += [(f"stage 1f, entropy {ARMS[arm]}", s, p)
                 for s, p in default_model._checkpoints(study, f"stage1f_{arm}", EVERY)]
    write_rows(measure(os.path.join(work, "data"), windows, todo), result)


def measure(data_dir: str, windows: list[dict], todo: list[tuple[str, int, str]], tokens: bool = True) -> list[dict]:
    """A row of figures for each (arm, step, model folder) of ``todo``, measured on the validation clips
    (``tokens``: through the quantizer; else the backbone alone on its continuous latents)."""
    from pyratok.models.pyratok import PyraTok

    sets = validation_sets(data_dir, windows)
    rows = []
    for arm, step, path in todo:
        r = default_model._evaluate(PyraTok.from_pretrained(path).eval(), sets, tokens)
        rows.append({"arm": arm, "stage1f_steps": step, "real_psnr": r["real"]["psnr"], "real_ssim": r["real"]["ssim"],
                     "photos_psnr": r["photos"]["psnr"], "photos_ssim": r["photos"]["ssim"],
                     "all_clips_psnr": round(default_model._all_clips(r), 3),
                     "clips": " ".join(f"{c['clip']}={c['psnr']}" for part in ("real", "photos")
                                       for c in r[part]["clips"])})
        print(f"{arm} @ {step}: real {rows[-1]['real_psnr']:.2f}, photos {rows[-1]['photos_psnr']:.2f}, "
              f"all {rows[-1]['all_clips_psnr']:.2f} dB", flush=True)
    return rows


def frames(data_dir: str, windows: list[dict], model_dir: str, tokens: bool = True) -> list[dict]:
    """Per-frame PSNR of a model on the validation clips, with each frame's place in its latent frame's group:
    frame 0 is coded alone (place 0), the others in groups of the backbone's temporal factor (places 1..t).
    A row per clip and frame, and the mean per part (real windows, photo moves) and place."""
    import statistics

    import torch

    from pyratok.metrics import psnr
    from pyratok.models.pyratok import PyraTok

    model = PyraTok.from_pretrained(model_dir).eval()
    factor = model.vae.temporal_factor
    sets = validation_sets(data_dir, windows)
    rows = []
    with torch.no_grad():
        for part in ("real", "photos"):
            for name, clip, _ in sets[part]:
                recon = model.decode(model.encode(clip)) if tokens else model.vae(clip)
                for t in range(clip.shape[2]):
                    rows.append({"part": part, "clip": name, "frame": t, "place": 0 if t == 0 else (t - 1) % factor + 1,
                                 "psnr": round(float(psnr(recon[:, :, t:t + 1], clip[:, :, t:t + 1])), 3)})
    for part in ("real", "photos"):
        means = {place: statistics.fmean(r["psnr"] for r in rows if r["part"] == part and r["place"] == place)
                 for place in range(factor + 1)}
        print(f"{part}: mean PSNR by place in the group (0 = frame 0): "
              + ", ".join(f"{k}: {v:.2f}" for k, v in means.items()), flush=True)
        rows += [{"part": part, "clip": "mean", "frame": "", "place": k, "psnr": round(v, 3)} for k, v in means.items()]
    return rows


def write_rows(rows: list[dict], result: str) -> None:
    from pyratok.utils import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(result)), exist_ok=True)
    with atomic_write(result, "w") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    print(f"-> {result}")


def _validation_windows(work: str) -> tuple[str, list[dict]]:
    """WORK's data folder and the validation windows of its training manifest (``split``, writing nothing)."""
    return os.path.join(work, "data"), split(os.path.join(work, "data", "train.jsonl"), None)


def _run_start(work: str, run: str, caller: str) -> str:
    """The model a training run in WORK started from: the ``pretrained`` of WORK/<run>.toml, resolved as the
    trainer resolves it (relative to the TOML's folder); the run and its checkpoints must exist."""
    import tomllib

    toml = os.path.join(work, f"{run}.toml")
    if not os.path.isfile(toml) or not os.path.isdir(os.path.join(work, run, "checkpoints")):
        raise SystemExit(f"{caller}: {work} holds no {run} run ({run}.toml and its checkpoints)")
    with open(toml, "rb") as f:
        return os.path.abspath(os.path.join(work, tomllib.load(f)["model"]["pretrained"]))


def backbone(work: str, run: str, result: str, every: int = 250) -> list[dict]:
    """The backbone alone (continuous latents) of a stage-0 run in WORK on the validation clips: its starting
    point (the ``pretrained`` of WORK/<run>.toml) and its checkpoints every ``every`` steps -> RESULT_CSV.
    Chooses nothing (benchmarks/results/rules/backbone_fast_low.md)."""
    start = _run_start(work, run, "backbone")
    todo = [("starting point", 0, start)] + [(run, s, p) for s, p in default_model._checkpoints(work, run, every)]
    rows = measure(*_validation_windows(work), todo, tokens=False)
    write_rows(rows, result)
    return rows


def choose(rows: list[dict], margin: float = CONTINUATION_MARGIN) -> Optional[dict]:
    """The rule written before the continuations ran (benchmarks/results/rules/stage1f17_*.md): ``rows[0]``
    is their starting point, the others their checkpoints.  The checkpoint with the best mean PSNR over all
    validation clips is chosen if that mean is >= ``margin`` dB above the starting point's and its real
    windows' mean no more than ``margin`` below; returns its row, or None (the starting point stays)."""
    start, *checkpoints = rows
    if not checkpoints:
        raise SystemExit("choose: no checkpoint of a continuation to compare with its starting point")
    best = max(checkpoints, key=lambda r: r["all_clips_psnr"])
    if (best["all_clips_psnr"] >= start["all_clips_psnr"] + margin
            and best["real_psnr"] >= start["real_psnr"] - margin):
        return best
    return None


def continuation(work: str, result: str, runs: tuple[str, ...] = (CONTINUATION,),
                 every: int = CONTINUATION_EVERY, baseline: Optional[str] = None) -> Optional[dict]:
    """Measures continuations of a point's stage 1f (WORK/<run> for each of ``runs``, all from one
    starting point: the ``pretrained`` of their WORK/<run>.toml) on the validation clips, the starting point
    and each run's checkpoints every ``every`` steps; applies ``choose`` and writes RESULT_CSV with a
    ``chosen`` column; returns the chosen row (None: the starting point stays).  ``baseline``: the model
    the checkpoints are compared with instead of their starting point (a run that starts from a fit
    competes with the shipped point: benchmarks/results/rules/backbone_fast_low.md)."""
    starts, todo = {}, []
    for run in runs:
        starts[run] = _run_start(work, run, "continuation")
        todo += [(run, s, p) for s, p in default_model._checkpoints(work, run, every)]
    if len(set(starts.values())) != 1:
        raise SystemExit(f"continuation: the runs start from different models ({starts}): no common baseline")
    first = ("baseline", 0, os.path.abspath(baseline)) if baseline else ("starting point", 0, next(iter(starts.values())))
    rows = measure(*_validation_windows(work), [first] + todo)
    chosen = choose(rows)
    for r in rows:
        r["chosen"] = "yes" if r is chosen else ""
    write_rows(rows, result)
    print("continuation: " + (f"{chosen['arm']} step {chosen['stage1f_steps']} ships" if chosen
                              else f"the {rows[0]['arm']} stays"))
    return chosen


if __name__ == "__main__":
    main()
