"""Mutation testing of pyratok's model, training and I/O layer with mutmut (3.8.1), one module at a
time, and the report benchmarks/results/mutation.md (per-module scores and every surviving mutant).

    python benchmarks/mutation/run.py                      # every module of modules.toml
    python benchmarks/mutation/run.py tokens masking       # some
    python benchmarks/mutation/run.py --report-only        # re-read the last runs into the report
    python benchmarks/mutation/run.py train --mutants 'pyratok.train.config.*'   # some mutants of one module

Each module runs in its own scratch tree build/mutation/<name>/: a copy of pyratok/ with the
top-level kernels/ placed at pyratok/kernels (what setup.py's package_dir mapping does for an
install) and the compiled pyratok/_C*.so, a copy of tests/, and a pyproject.toml whose
[tool.mutmut] section mutates only that module and runs only its test files.  mutmut copies the tree
to mutants/, imports pyratok from there, collects which tests reach each function once, and then
runs each mutant against those tests only, in processes forked from a warm fork server (torch is
not fork-safe from a process that has run it).  Statuses: killed (a test failed), survived (all
passed), no tests (no selected test reaches the function), timeout, suspicious, and not checked
(a run stopped before it reached the mutant: the row gives the score of the mutants checked).

Survivors judged equivalent (no behaviour can tell them apart) are listed with their one-line
reason in benchmarks/mutation/equivalent.toml and counted apart in the report.

The report is merged, not rewritten: a run of some modules replaces their score rows and survivor
rows and keeps every other module's rows, their survivor tables and the notes under the score table
(such as a module's triage by hand) as they are in the file.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "benchmarks", "mutation")
SCRATCH = os.path.join(ROOT, "build", "mutation")
REPORT = os.path.join(ROOT, "benchmarks", "results", "mutation.md")


def load(name: str) -> dict:
    with open(os.path.join(HERE, name), "rb") as f:
        return tomllib.load(f)


def _toml_list(values) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def prepare(name: str, entry: dict) -> str:
    """A fresh scratch tree for one module -> its path."""
    tree = os.path.join(SCRATCH, name)
    shutil.rmtree(tree, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(os.path.join(ROOT, "pyratok"), os.path.join(tree, "pyratok"), ignore=ignore, symlinks=False)
    shutil.copytree(os.path.join(ROOT, "kernels"), os.path.join(tree, "pyratok", "kernels"), ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(tree, "tests"), ignore=ignore)
    shutil.copy2(os.path.join(ROOT, "README.md"), os.path.join(tree, "README.md"))   # tests parse its tables
    with open(os.path.join(tree, "pyproject.toml"), "w") as f:
        f.write(f"""[tool.pytest.ini_options]
testpaths = ["tests"]
markers = ["cuda: needs a CUDA device", "slow: longer than a few seconds"]

[tool.mutmut]
source_paths = ["pyratok"]
also_copy = ["README.md"]
only_mutate = {_toml_list(entry["mutate"])}
pytest_add_cli_args_test_selection = {_toml_list(entry["tests"])}
pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]
process_isolation = "forkserver"
use_git_change_detection = false
timeout_multiplier = 10.0
timeout_constant = 30.0
""")
    return tree


def run(name: str, entry: dict, jobs: int, mutants: Sequence[str] = ()) -> int:
    """Mutate one module in a fresh scratch tree and run its mutants (those matching the
    ``mutants`` patterns, such as "pyratok.train.config.*", when given; the rest stay not checked)."""
    tree = prepare(name, entry)
    # mutants/ must exist before Python starts: a PYTHONPATH entry that does not exist yet is cached
    # as "no finder", and pyratok would then be imported from the editable install, unmutated
    # (mutmut then reports that no test reaches any mutant)
    os.makedirs(os.path.join(tree, "mutants"), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.path.join(tree, "mutants"))      # subprocesses of the tests see the mutants too
    env.pop("PYRATOK_BACKEND", None)
    mutmut = [sys.executable, "-m", "mutmut"]
    print(f"== {name}: mutating {', '.join(entry['mutate'])}; tests {' '.join(entry['tests'])}", flush=True)
    return subprocess.call(mutmut + ["run", "--max-children", str(jobs), *mutants], cwd=tree, env=env)


def results(name: str) -> dict[str, str] | None:
    """{mutant name: status} of a module's last run, or None when it has not run."""
    tree = os.path.join(SCRATCH, name)
    if not os.path.isdir(os.path.join(tree, "mutants")):
        return None
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=tree,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.path.join(tree, "mutants")))
    found = {}
    for line in out.stdout.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def diff_of(name: str, mutant: str) -> str:
    tree = os.path.join(SCRATCH, name)
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=tree, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.path.join(tree, "mutants")))
    lines = [l for l in out.stdout.splitlines() if l.startswith(("+", "-")) and not l.startswith(("+++", "---"))]
    return " / ".join(l[:1] + " " + l[1:].strip() for l in lines)[:240]


TABLE_HEAD = ["| module | files | mutants | killed | survived | equivalent | no tests | score |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
SURVIVOR_HEADING = "## Mutants not killed"
SURVIVOR_HEAD = ["| module | mutant | status | change |", "|---|---|---|---|"]


def _row_module(line: str) -> str | None:
    m = re.match(r"\|\s*([^|`\s]+)\s*\|", line)
    return m.group(1) if m else None


def parse_report(text: str) -> tuple[dict[str, str], list[str], dict[str, list[str]]]:
    """An existing report -> (score row per module, the notes between the score table and the
    survivor table, the survivor rows per module, in their order)."""
    rows: dict[str, str] = {}
    notes: list[str] = []
    survivors: dict[str, list[str]] = {}
    lines = text.splitlines()
    section = "head"
    for line in lines:
        if section == "head":
            if line.strip() == TABLE_HEAD[0]:
                section = "table"
            continue
        if section == "table":
            if line.startswith("|"):
                name = _row_module(line)
                if name and not line.startswith("|---"):
                    rows[name] = line
                continue
            section = "notes"
        if section == "notes":
            if line.strip() == SURVIVOR_HEADING:
                section = "survivors"
            else:
                notes.append(line)
            continue
        if section == "survivors" and line.startswith("|") and line not in SURVIVOR_HEAD:
            name = _row_module(line)
            if name:
                survivors.setdefault(name, []).append(line)
    while notes and not notes[0].strip():
        notes.pop(0)
    while notes and not notes[-1].strip():
        notes.pop()
    return rows, notes, survivors


def merge_report(old: str | None, order: list[str], files: dict[str, str], rows: dict[str, str],
                 survivors: dict[str, list[str]], date: str) -> str:
    """The report text with the score rows and survivor rows of the modules in `rows` (those just
    run or re-read) replaced, and every other module's rows, survivor rows and the notes kept from
    `old` (the current report, or None).  Modules are listed in `order` (modules.toml's); one never
    run shows "not run yet"."""
    old_rows, notes, old_survivors = parse_report(old) if old else ({}, [], {})
    table = []
    for name in order:
        if name in rows:
            table.append(rows[name])
        elif name in old_rows:
            table.append(old_rows[name])
        else:
            table.append(f"| {name} | {files[name]} | not run yet | | | | | |")
    listed = []
    for name in order + sorted(set(old_survivors) - set(order)):
        listed += survivors.get(name, []) if name in rows else old_survivors.get(name, [])
    text = ["# Mutation testing", "",
            f"mutmut 3.8.1, `make mutation` (benchmarks/mutation/run.py; modules and their tests in "
            f"benchmarks/mutation/modules.toml).  Written {date}.", "",
            "Score = (killed + timeout) / (mutants - no tests - equivalent - not checked).  Target: >= 80% per module.", "",
            *TABLE_HEAD, *table, ""]
    if notes:
        text += [*notes, ""]
    if listed:
        text += [SURVIVOR_HEADING, "", *SURVIVOR_HEAD, *listed, ""]
    return "\n".join(text)


def module_rows(name: str, files: str, found: dict[str, str], equivalent: dict[str, str], diff) -> tuple[str, list[str]]:
    """A module's score row and its rows of mutants not killed, from {mutant: status} of its run;
    ``diff(mutant)`` gives a mutant's change.  Mutants a stopped run did not reach ("not checked")
    are counted apart and left out of the score."""
    counts = collections.Counter(found.values())
    equiv = {k for k, v in found.items() if v == "survived" and k in equivalent}
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    unchecked = counts.get("not checked", 0)
    tested = len(found) - counts.get("no tests", 0) - counts.get("skipped", 0) - len(equiv) - unchecked
    score = f"{100 * killed / tested:.1f}%" if tested else "-"
    total = f"{len(found)} ({unchecked} not checked)" if unchecked else f"{len(found)}"
    row = (f"| {name} | {files} | {total} | {killed} | {counts.get('survived', 0) - len(equiv)} | {len(equiv)} | "
           f"{counts.get('no tests', 0)} | {score} |")
    listed = []
    for k, v in sorted(found.items()):
        if v == "survived":
            listed.append(f"| {name} | `{k}` | {'equivalent: ' + equivalent[k] if k in equiv else 'open'} | "
                          f"`{diff(k).replace('|', '/')}` |")
        elif v not in ("killed", "timeout", "not checked"):
            listed.append(f"| {name} | `{k}` | {v} | `{diff(k).replace('|', '/')}` |")
    return row, listed


def report(names: list[str]) -> None:
    """Re-read the last runs of `names` and merge their rows into the report (a module whose
    scratch tree is gone keeps its rows)."""
    modules = load("modules.toml")
    equivalent = load("equivalent.toml") if os.path.isfile(os.path.join(HERE, "equivalent.toml")) else {}
    rows: dict[str, str] = {}
    survivors: dict[str, list[str]] = {}
    for name in names:
        found = results(name)
        if found is None:
            continue
        rows[name], survivors[name] = module_rows(name, ", ".join(modules[name]["mutate"]), found, equivalent,
                                                  lambda k, name=name: diff_of(name, k))
    old = open(REPORT).read() if os.path.isfile(REPORT) else None
    text = merge_report(old, list(modules), {n: ", ".join(e["mutate"]) for n, e in modules.items()}, rows, survivors,
                        datetime.date.today().isoformat())
    os.makedirs(os.path.dirname(REPORT), exist_ok=True)
    from pyratok.utils import atomic_write     # the report holds other modules' rows: never half-written

    with atomic_write(REPORT, "w") as f:
        f.write(text)
    print(f"wrote {REPORT} (rows of {', '.join(rows) or 'no module'} updated)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="entries of modules.toml (default: all)")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--mutants", nargs="+", default=[], metavar="PATTERN",
                        help="run only the mutants whose names match these fnmatch patterns "
                             "(e.g. 'pyratok.train.config.*'); the others are reported as not checked")
    args = parser.parse_args()
    modules = load("modules.toml")
    names = args.modules or list(modules)
    unknown = [n for n in names if n not in modules]
    if unknown:
        parser.error(f"unknown modules {unknown}; modules.toml has {list(modules)}")
    status = 0
    if not args.report_only:
        for name in names:
            status |= run(name, modules[name], args.jobs, args.mutants)
    report(names)
    return status


if __name__ == "__main__":
    sys.exit(main())
