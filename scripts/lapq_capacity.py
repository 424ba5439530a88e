"""How well LaPQ variants rebuild a frozen backbone's latents at the same K (an operating point's fit).

    python scripts/lapq_capacity.py MODEL MANIFEST OUT.csv [--point high|low] [--crops N] [--steps N]
                                    [--variants S:H ...]

MODEL is a branched model folder (scripts/default_model.py branch: a trained backbone and a fresh
LaPQ), MANIFEST the training manifest.  The backbone's latents of N training crops are encoded
once; each variant (``substeps:hidden``) is a fresh LaPQ (the seed of ``--point``'s own fit) fitted with
scripts/default_model.py's recipe (``fit_lapq``) for the same steps.  The figure is the latent
error of the held-back *training* crops (not trained on; no held-out clip is read), as a fraction
of the latent's mean square, written to OUT.csv (one row per variant and checkpoint).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import default_model  # noqa: E402
from pyratok.models.lapq import LaPQ  # noqa: E402
from pyratok.models.pyratok import PyraTok  # noqa: E402
from pyratok.utils import atomic_write  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("manifest")
    ap.add_argument("out")
    ap.add_argument("--point", choices=sorted(default_model.SEEDS), default="high",
                    help="the operating point whose fit seeds each fresh LaPQ (default: high)")
    ap.add_argument("--crops", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--variants", nargs="+", default=["1:64", "3:64"], help="substeps:hidden")
    args = ap.parse_args(argv)
    variants = []
    for v in args.variants:
        try:
            s, h = (int(x) for x in v.split(":"))
        except ValueError:
            raise SystemExit(f"--variants: expected substeps:hidden (e.g. 3:64), got {v!r}")
        variants.append((s, h))
    if args.crops < 5 or args.steps < 1:
        raise SystemExit(f"--crops {args.crops} / --steps {args.steps}: expected >= 5 crops and >= 1 step")
    torch.manual_seed(0)
    model = PyraTok.from_pretrained(args.model).eval()
    K = model.config.lapq.num_bits   # before the minutes of encoding: every variant must be a valid LaPQ
    bad = [f"{s}:{h}" for s, h in variants if s < 1 or h < 1 or K % s]
    if bad:
        raise SystemExit(f"--variants {' '.join(bad)}: substeps must be >= 1 and divide K = {K}, hidden >= 1")
    start = time.time()
    latents, taps = default_model.encode_crops(model, args.manifest, args.crops)
    print(f"encoded {args.crops} crops in {time.time() - start:.0f} s", flush=True)
    rows = []
    for s, h in variants:
        torch.manual_seed(default_model.SEEDS[args.point])
        lapq = LaPQ(dataclasses.replace(model.config.lapq, substeps=s, hidden=h))
        params = sum(p.numel() for p in lapq.parameters())
        start = time.time()
        errors = default_model.fit_lapq(model, lapq, latents, taps, args.steps)
        seconds = time.time() - start
        print(f"substeps {s}, hidden {h}: {params} parameters, error {errors[-1][1]:.4f}, {seconds:.0f} s", flush=True)
        rows += [dict(K=model.config.lapq.num_bits, substeps=s, hidden=h, parameters=params, crops=args.crops,
                      step=step, latent_error=round(e, 5), seconds=round(seconds)) for step, e in errors]
        with atomic_write(args.out, "w") as f:          # after every variant: nothing lost on interruption
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
