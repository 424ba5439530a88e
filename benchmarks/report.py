"""pytest-benchmark JSON -> rows appended to benchmarks/results/<op>.csv + Markdown tables.

usage: python benchmarks/report.py RESULTS.json [--results-dir DIR] [--no-csv]

Per benchmark group (one op and shape, all providers side by side) it derives:
  gb_per_s / gflop_per_s  from extra_info bytes / flops and the median time;
  frac_of_baseline        achieved rate / the rate of the group's `baseline` provider
                          (e.g. clone = the copy bandwidth roofline), same run;
  speedup_vs_peer         peer median time / this provider's median time;
  speedup_vs_reference    reference median time / this provider's median time.
Tables are printed and written to <results-dir>/<op>.md; CSV rows are appended.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import sys
from collections import defaultdict

FIELDS = ["date", "commit", "machine", "torch", "triton", "cuda", "op", "group", "provider", "shape", "dtype",
          "layout", "median_ms", "min_ms", "gb_per_s", "gflop_per_s", "frac_of_baseline", "speedup_vs_peer",
          "speedup_vs_reference", "tokens_per_s", "frames_per_s", "peak_mb"]


def _fmt(v, digits=2):
    return "" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def rows_from_json(data: dict) -> list[dict]:
    machine = data.get("pyratok_machine", {})
    date = data.get("datetime", dt.datetime.now(dt.timezone.utc).isoformat())[:19]
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    rows = []
    for group, benches in groups.items():
        med = {b["extra_info"]["provider"]: b["stats"]["median"] for b in benches}
        for b in benches:
            info, stats = b["extra_info"], b["stats"]
            t = stats["median"]
            rate = lambda key: info[key] / t / 1e9 if info.get(key) else None  # noqa: E731
            base = info.get("baseline")
            frac = None
            if base in med and info.get("bytes"):
                base_bench = next(x for x in benches if x["extra_info"]["provider"] == base)
                frac = (info["bytes"] / t) / (base_bench["extra_info"]["bytes"] / med[base])
            peer = info.get("peer")
            rows.append({
                "date": date, "commit": machine.get("commit", ""), "machine": machine.get("machine", ""),
                "torch": machine.get("torch", ""), "triton": machine.get("triton", ""),
                "cuda": machine.get("cuda", ""), "op": info.get("op", ""), "group": group,
                "provider": info["provider"], "shape": info.get("shape", ""), "dtype": info.get("dtype", ""),
                "layout": info.get("layout", ""), "median_ms": t * 1e3, "min_ms": stats["min"] * 1e3,
                "gb_per_s": rate("bytes"), "gflop_per_s": rate("flops"), "frac_of_baseline": frac,
                "speedup_vs_peer": med[peer] / t if peer in med else None,
                "speedup_vs_reference": med["reference"] / t if "reference" in med else None,
                "tokens_per_s": info["tokens"] / t if info.get("tokens") else None,
                "frames_per_s": info["frames"] / t if info.get("frames") else None,
                "peak_mb": info["peak_bytes"] / 2**20 if info.get("peak_bytes", -1) >= 0 else None,
            })
    return rows


def markdown(rows: list[dict]) -> str:
    cols = [("provider", "provider", 0), ("median_ms", "median ms", 2), ("gb_per_s", "GB/s", 1),
            ("gflop_per_s", "GFLOP/s", 1), ("frac_of_baseline", "of baseline", 2),
            ("speedup_vs_peer", "x peer", 1), ("speedup_vs_reference", "x reference", 1),
            ("tokens_per_s", "tokens/s", 0), ("frames_per_s", "frames/s", 2), ("peak_mb", "peak MB", 0)]
    used = [c for c in cols if any(r[c[0]] is not None for r in rows)]
    out = []
    for group in dict.fromkeys(r["group"] for r in rows):
        out.append(f"\n**{group}**\n")
        out.append("| " + " | ".join(c[1] for c in used) + " |")
        out.append("|" + "---|" * len(used))
        for r in (r for r in rows if r["group"] == group):
            out.append("| " + " | ".join(_fmt(r[c[0]], c[2]) if c[2] else _fmt(r[c[0]]) for c in used) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--results-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--no-csv", action="store_true", help="print tables only")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        rows = rows_from_json(json.load(f))
    if not rows:
        print("no benchmarks in", args.json, file=sys.stderr)
        return 1
    os.makedirs(args.results_dir, exist_ok=True)
    machine = f"{rows[0]['machine']}; torch {rows[0]['torch']}, triton {rows[0]['triton']}, commit {rows[0]['commit']}"
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        table = f"Measured {rows[0]['date']} on {machine}.\n" + markdown(op_rows)
        print(f"## {op}\n{table}")
        suffix = "" if rows[0]["cuda"] in ("", "-") or "cpu" in rows[0]["machine"].lower() else "_gpu"
        with open(os.path.join(args.results_dir, f"{op}{suffix}.md"), "w") as f:
            f.write(table)
        if not args.no_csv:
            append_rows(os.path.join(args.results_dir, f"{op}{suffix}.csv"),
                        [{k: (_fmt(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in op_rows])
    return 0


def append_rows(path: str, rows: list[dict]) -> None:
    """Appends rows to a results CSV.  A file written under an older FIELDS list is first rewritten
    with the current header: each old row is read by the header whose length it has (rows that
    were appended under a stale header have the current length), columns it lacks stay empty."""
    if os.path.exists(path):
        with open(path, newline="") as f:
            table = list(csv.reader(f))
        header = table[0] if table else FIELDS
        if header != FIELDS:
            old = [dict(zip(FIELDS if len(r) == len(FIELDS) else header, r)) for r in table[1:] if r]
            tmp = path + ".tmp"
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS, restval="", extrasaction="ignore")
                w.writeheader()
                w.writerows(old)
            os.replace(tmp, path)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    raise SystemExit(main())
