"""The reproduction study as one command (pyratok.study): trains every arm on the bundled model's
frozen backbone, evaluates on held-out clips, writes reproduce.md / .csv / .png.

    python benchmarks/reproduce/run.py                  # the full study (~2 hours on 2 CPU cores)
    python benchmarks/reproduce/run.py --quick          # every arm for a few steps: plumbing only

Finished (arm, seed) runs are kept under --out/runs and skipped when the command is run again.
"""

import argparse
import os
import shlex
import sys

from pyratok.study import ARMS, SWEEP, StudyConfig, run_study, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "outputs", "reproduce"), help="runs folder")
    p.add_argument("--results", default=None,
                   help="where reproduce.md/.csv/.png go (default: benchmarks/results; --quick: the runs folder)")
    p.add_argument("--backbone", default=None, help="a PyraTok model folder whose VAE is the frozen backbone")
    p.add_argument("--steps", type=int, default=300, help="training steps per run")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    p.add_argument("--arms", nargs="*", default=[a.name for a in ARMS],
                   help=f"arms to run (default: all); known: {' '.join(a.name for a in ARMS + SWEEP)}")
    p.add_argument("--lpips", default=None, help="an LPIPS (VGG) weights file: adds LPIPS to the evaluation")
    p.add_argument("--no-sweep", action="store_true", help="skip the K x L rate-distortion sweep")
    p.add_argument("--quick", action="store_true", help="3 steps, 1 seed, small eval clips: checks the plumbing")
    args = p.parse_args(argv)
    if args.quick:
        cfg = StudyConfig(out=args.out, backbone=args.backbone, steps=3, seeds=(0,), arms=tuple(args.arms),
                          sweep=False, quick=True, lpips=args.lpips)
    else:
        cfg = StudyConfig(out=args.out, backbone=args.backbone, steps=args.steps, seeds=tuple(range(args.seeds)),
                          arms=tuple(args.arms), sweep=not args.no_sweep, lpips=args.lpips)
    results = run_study(cfg)
    out = args.results or (args.out if args.quick else os.path.join(ROOT, "benchmarks", "results"))
    command = "python benchmarks/reproduce/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    paths = write_report(results, out, command.strip())
    print(f"{len(results)} runs -> {', '.join(paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
