"""benchmarks/mutation/run.py's report merge: a run of some modules replaces their score rows and
survivor rows and keeps the other modules' rows, survivor tables and the notes as they were."""

import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "mutation"))
import run  # noqa: E402

ORDER = ["tokens", "masking", "prior"]
FILES = {"tokens": "pyratok/tokens.py", "masking": "pyratok/models/masking.py", "prior": "pyratok/models/prior.py"}
OLD = """# Mutation testing

mutmut 3.8.1, `make mutation` (...).  Written 2026-01-01.

Score = ...

| module | files | mutants | killed | survived | equivalent | no tests | score |
|---|---|---:|---:|---:|---:|---:|---:|
| tokens | pyratok/tokens.py | 10 | 10 | 0 | 0 | 0 | 100.0% |
| masking | pyratok/models/masking.py | 20 | 17 | 1 | 2 | 0 | 94.4% |
| prior | pyratok/models/prior.py | not run yet | | | | | |

The masking row is after triage by hand.

A second note | with a bar.

## Mutants not killed

| module | mutant | status | change |
|---|---|---|---|
| masking | `m.x_a__mutmut_1` | open | `- a / + b` |
| masking | `m.x_a__mutmut_2` | killed by tests/test_masking.py::test_a | `- c / + d` |
"""


def test_merge_keeps_the_rows_and_notes_of_modules_not_run():
    prior_row = "| prior | pyratok/models/prior.py | 5 | 4 | 1 | 0 | 0 | 80.0% |"
    prior_survivor = "| prior | `p.x_f__mutmut_3` | open | `- e / + f` |"
    text = run.merge_report(OLD, ORDER, FILES, {"prior": prior_row}, {"prior": [prior_survivor]}, "2026-12-05")
    lines = text.splitlines()
    assert "Written 2026-12-05." in text and "2026-01-01" not in text
    table = [l for l in lines if l.startswith("| ") and "`" not in l and not l.startswith("| module")]
    assert table == [OLD.splitlines()[8], OLD.splitlines()[9], prior_row]
    assert "The masking row is after triage by hand." in lines and "A second note | with a bar." in lines
    assert lines.index("A second note | with a bar.") < lines.index(run.SURVIVOR_HEADING)
    survivors = lines[lines.index(run.SURVIVOR_HEAD[1]) + 1:]
    assert [l for l in survivors if l] == [OLD.splitlines()[-2], OLD.splitlines()[-1], prior_survivor]


def test_merge_replaces_the_survivors_of_a_module_run_again():
    masking_row = "| masking | pyratok/models/masking.py | 20 | 18 | 0 | 2 | 0 | 100.0% |"
    text = run.merge_report(OLD, ORDER, FILES, {"masking": masking_row}, {"masking": []}, "2026-12-05")
    assert masking_row in text.splitlines() and "94.4%" not in text
    assert "mutmut_1" not in text and "mutmut_2" not in text
    assert run.SURVIVOR_HEADING not in text                       # no survivor left anywhere
    assert "| prior | pyratok/models/prior.py | not run yet | | | | | |" in text.splitlines()


def test_merge_with_nothing_new_reproduces_the_report_in_the_repository():
    with open(run.REPORT) as f:
        current = f.read()
    modules = run.load("modules.toml")
    date = re.search(r"Written (\S+)\.", current).group(1)
    again = run.merge_report(current, list(modules), {n: ", ".join(e["mutate"]) for n, e in modules.items()},
                             {}, {}, date)
    assert again == current
    assert run.merge_report(None, ORDER, FILES, {}, {}, "2026-01-01").count("not run yet") == 3


def test_module_rows_score_only_the_mutants_checked():
    found = {"m.a_1": "killed", "m.a_2": "timeout", "m.a_3": "survived", "m.a_4": "survived", "m.a_5": "no tests",
             "m.a_6": "not checked", "m.a_7": "not checked", "m.a_8": "suspicious"}
    row, listed = run.module_rows("prior", "pyratok/models/prior.py", found, {"m.a_4": "same thing"},
                                  lambda k: f"- x / + y|{k}")
    # 8 mutants, 2 not checked, 1 equivalent, 1 without tests: 2 killed of 4 -> 50%
    assert row == "| prior | pyratok/models/prior.py | 8 (2 not checked) | 2 | 1 | 1 | 1 | 50.0% |"
    assert listed == ["| prior | `m.a_3` | open | `- x / + y/m.a_3` |",
                      "| prior | `m.a_4` | equivalent: same thing | `- x / + y/m.a_4` |",
                      "| prior | `m.a_5` | no tests | `- x / + y/m.a_5` |",
                      "| prior | `m.a_8` | suspicious | `- x / + y/m.a_8` |"]
    row, _ = run.module_rows("prior", "p.py", {"m.a_1": "killed"}, {}, str)
    assert row == "| prior | p.py | 1 | 1 | 0 | 0 | 0 | 100.0% |"
