"""benchmarks/report.py's results CSV: appending under a stale header rewrites the file with the
current one, reading every old row by the header whose length it has."""

import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import report  # noqa: E402


def test_append_rows_migrates_a_stale_header(tmp_path):
    path = tmp_path / "op.csv"
    old_header = [f for f in report.FIELDS if f not in ("tokens_per_s", "frames_per_s")]
    old_row = {f: f"old-{f}" for f in old_header}
    misaligned = {f: f"mid-{f}" for f in report.FIELDS}           # appended later under the old header
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(old_header)
        w.writerow([old_row[f] for f in old_header])
        w.writerow([misaligned[f] for f in report.FIELDS])
    new_row = {f: f"new-{f}" for f in report.FIELDS}
    report.append_rows(str(path), [new_row])
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == report.FIELDS
    assert rows[0]["peak_mb"] == "old-peak_mb" and rows[0]["tokens_per_s"] == ""
    assert rows[1] == misaligned and rows[2] == new_row
    report.append_rows(str(path), [new_row])                    # current header: plain append
    assert len(list(csv.DictReader(open(path)))) == 4
