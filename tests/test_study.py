"""The reproduction study's plumbing (pyratok.study, benchmarks/reproduce/run.py --quick): every arm
trains and evaluates on held-out data, bit budgets are matched, finished runs are skipped on a
re-run, and the report is written.  The numbers themselves come from the full run."""

import json
import os

import pytest

pytest.importorskip("skimage")

from pyratok.study import ARMS, SWEEP, StudyConfig, beyond_spread, planned_runs, run_file, run_study, write_report


def test_arms_are_matched_to_the_same_bit_budget():
    bits = {a.name: a.bits_on_training_grid() for a in ARMS}
    assert bits["pyratok"] == 3 * (1 + 4 + 16 + 64) * 16 == 4080
    for name, b in bits.items():
        assert abs(b - 4080) / 4080 < 0.06, (name, b)
    assert {a.name for a in ARMS} >= {"pyratok", "lfq", "residual-lfq", "no-taps", "no-text", "no-hierarchy",
                                      "no-ar-drift"}
    # the sweep's K=16, L=4 point is the pyratok arm itself (same config and seed 0)
    assert {(a.num_bits, a.levels) for a in SWEEP} == {(k, l) for k in (8, 16, 32) for l in (1, 2, 4)} - {(16, 4)}
    pyratok = next(a for a in ARMS if a.name == "pyratok")
    assert (pyratok.num_bits, pyratok.levels, pyratok.stages, pyratok.text) == (16, 4, (1, 2, 3), True)
    assert all(a.stages == pyratok.stages and a.text and a.lateral and a.hierarchy for a in SWEEP)
    cfg = StudyConfig(out="x", seeds=(0, 1, 2), sweep=True)
    assert len(planned_runs(cfg)) == 3 * len(ARMS) + len(SWEEP)
    with pytest.raises(ValueError, match="arms: unknown"):
        StudyConfig(arms=("nope",))


def test_quick_study_runs_every_arm_resumes_and_reports(tmp_path):
    cfg = StudyConfig(out=str(tmp_path / "runs"), steps=2, seeds=(0,), sweep=False, quick=True)
    results = run_study(cfg, progress=False)
    assert [r["arm"] for r in results] == [a.name for a in ARMS]
    for r in results:
        for part in ("real", "photos", "captioned"):
            assert 0 < r["eval"][part]["psnr"] < 60 and r["eval"][part]["bits_per_pixel"] > 0
        assert len(r["eval"]["real"]["usage"]) == r["levels"]
        assert ("text_margin" in r["eval"]) == (r["arm"] not in ("lfq", "residual-lfq", "no-text"))
    stamps = {a.name: os.path.getmtime(run_file(cfg, a, 0)) for a in ARMS}
    again = run_study(cfg, progress=False)                       # everything finished: nothing re-runs
    assert again == results
    assert stamps == {a.name: os.path.getmtime(run_file(cfg, a, 0)) for a in ARMS}
    paths = write_report(results, str(tmp_path / "report"), "python benchmarks/reproduce/run.py --quick")
    table = open(paths["md"]).read()
    assert all(f"| {a.name} |" in table for a in ARMS)
    assert open(paths["csv"]).read().count("\n") == 1 + len(ARMS)
    assert os.path.getsize(paths["png"]) > 10_000
    json.dumps(results)


def test_differences_beyond_the_seed_spread():
    a = {"real_psnr": (20.0, 0.2)}
    assert beyond_spread(a, {"real_psnr": (20.5, 0.2)}, "real_psnr")
    assert not beyond_spread(a, {"real_psnr": (20.3, 0.2)}, "real_psnr")


def _fake_run(arm: str, seed: int, bits: int, levels: int, psnr: float) -> dict:
    part = {"psnr": psnr, "ssim": 0.5, "bits_per_pixel": 0.01 * bits * levels, "usage": [0.1] * levels,
            "perplexity": [10.0] * levels}
    return {"arm": arm, "seed": seed, "note": "", "num_bits": bits, "levels": levels, "steps": 1,
            "bits_on_training_grid": 4080, "train_seconds": 60.0,
            "eval": {"real": part, "photos": part, "captioned": part}}


def test_report_sweep_takes_the_pyratok_arm_as_its_K16_L4_point(tmp_path):
    results = [_fake_run("pyratok", s, 16, 4, 20.0 + s) for s in range(3)]
    results += [_fake_run(f"sweep-K{k}-L{l}", 0, k, l, 10.0 + k / 8 + l) for k in (8, 32) for l in (1, 4)]
    md = open(write_report(results, str(tmp_path))["md"]).read()
    sweep = md.split("Rate-distortion sweep")[1].splitlines()
    rows = [line for line in sweep if line.startswith("| ") and line[2].isdigit()]
    assert [tuple(int(x) for x in r.split("|")[1:3]) for r in rows] == [(8, 1), (8, 4), (16, 4), (32, 1), (32, 4)]
    assert "| 16 | 4 | 0.6400 | 20.00 |" in md                   # seed 0 of pyratok, not the seed mean (21.0)


def test_lpips_joins_the_evaluation_when_a_weights_file_is_given(tmp_path):
    from conftest import lpips_weights_file

    weights = lpips_weights_file(tmp_path / "lpips_vgg.pth")
    cfg = StudyConfig(out=str(tmp_path / "runs"), steps=1, seeds=(0,), arms=("lfq",), sweep=False, quick=True,
                      lpips=weights)
    (result,) = run_study(cfg, progress=False)
    for part in ("real", "photos", "captioned"):
        assert result["eval"][part]["lpips"] > 0
        assert all(c["lpips"] > 0 for c in result["eval"][part]["clips"])
    md = open(write_report([result], str(tmp_path / "report"))["md"]).read()
    header = next(line for line in md.splitlines() if line.startswith("| arm |"))
    row = next(line for line in md.splitlines() if line.startswith("| lfq |"))
    assert "real LPIPS" in header and header.count("|") == row.count("|")
    assert f"{result['eval']['real']['lpips']:.3f} ± 0.000" in row
