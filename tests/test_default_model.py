"""The bundled default model (pyratok/assets/default, trained by scripts/train_default.sh) and
`make demo` on it: it ships in the package at its two operating points (self-contained folders),
loads, is the documented config, and reconstructs held-out real clips at the figures recorded by
the training run (benchmarks/results/default_model.json, also in the model card).  Encoding and
decoding are deterministic on this CPU, so the recorded figures are checked tightly, and against
fixed floors that an untrained model (~12 dB) or a broken one cannot reach."""

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pyratok.data import bundled_clip_path
from pyratok.demo import held_out_clip, main as demo_main
from pyratok.metrics import psnr, ssim
from pyratok.pretrained import RATES, default_model_path, load_default_model

RESULTS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "default_model.json")
BITS = {"low": 16, "high": 48}
# mean bits per pixel on the held-out real clips (17 frames; 4 pyramid levels): K x tokens / pixels
BITS_PER_PIXEL = {"low": 0.0992, "high": 2.1146}
# fixed floors on the held-out real clips (mean PSNR dB, SSIM), far above an untrained model
FLOORS = {"low": (22.0, 0.6), "high": (29.5, 0.86)}


def recorded():
    with open(RESULTS) as f:
        return json.load(f)


def test_the_default_model_ships_with_the_package():
    root = os.path.dirname(default_model_path())
    assert sorted(f for f in os.listdir(root) if not f.startswith(".")) == ["README.md", "high", "low"]
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)
    assert size <= 20 * 2**20
    models = {}
    for rate in RATES:
        path = default_model_path(rate)
        assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
        meta = json.load(open(os.path.join(path, "config.json")))
        assert meta["includes_backbone"] is True and not meta["config"]["backbone_path"]
        model = models[rate] = load_default_model(rate=rate)
        assert model.num_bits == BITS[rate] and model.config.lapq.levels == 4
        assert model.text_encoder is None and not model.training
        assert model.model_id == recorded()["points_model_id"][rate]
    # each point its own backbone: low on a 4x8x8 grid, high on the finer 2x4x4 one (time x height x width)
    assert (models["low"].vae.temporal_factor, models["low"].vae.spatial_factor) == (4, 8)
    assert (models["high"].vae.temporal_factor, models["high"].vae.spatial_factor) == (2, 4)
    assert recorded()["train"]["grids"] == {"low": "4x8x8", "high": "2x4x4"}
    assert load_default_model().model_id == models["low"].model_id                    # low is the default
    with pytest.raises(ValueError, match="rate='mid'"):
        default_model_path("mid")


def test_held_out_frames_are_the_last_fifth_of_the_clip():
    clip, first, fps = held_out_clip(bundled_clip_path("carphone_pristine.mp4"), 17)
    assert clip.shape == (1, 3, 17, 144, 176)
    assert first == 96                     # 120 frames, the last 20% held out
    with pytest.raises(ValueError, match="held-out frames"):
        held_out_clip(bundled_clip_path("carphone_pristine.mp4"), 33)


@pytest.mark.parametrize("rate", RATES)
def test_held_out_real_clips_give_the_recorded_figures(rate):
    from pyratok.study import held_out_sets

    model = load_default_model(rate=rate)
    want = recorded()["points"][rate]["real"]
    rows = []
    with torch.no_grad():
        for name, clip, _ in held_out_sets()["real"]:
            tokens = model.encode(clip)
            recon = model.decode(tokens)
            rows.append((name, float(psnr(recon, clip)), float(ssim(recon, clip)), tokens.bits_per_pixel()))
    assert [r[0] for r in rows] == [c["clip"] for c in want["clips"]]
    for (name, p, s, bpp), w in zip(rows, want["clips"]):
        assert p == pytest.approx(w["psnr"], abs=0.02) and s == pytest.approx(w["ssim"], abs=0.002), name
        assert bpp == pytest.approx(w["bits_per_pixel"])
    mean_psnr, mean_ssim = statistics.fmean(r[1] for r in rows), statistics.fmean(r[2] for r in rows)
    assert mean_psnr == pytest.approx(want["psnr"], abs=0.02)
    assert mean_psnr > FLOORS[rate][0] and mean_ssim > FLOORS[rate][1]
    assert statistics.fmean(r[3] for r in rows) == pytest.approx(BITS_PER_PIXEL[rate], abs=5e-4)


def test_demo_reconstructs_a_held_out_real_clip_at_both_operating_points(tmp_path):
    # in a fresh interpreter with make demo's environment: import order matters (Triton's CPU
    # interpreter has to be chosen before anything imports triton)
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYRATOK_BACKEND")}
    res = subprocess.run([sys.executable, "-m", "pyratok.demo", "--out", str(out)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "PSNR" in res.stdout and "bits/px" in res.stdout and str(out) in res.stdout
    assert sorted(os.listdir(out)) == ["frames.png", "metrics.json", "reconstruction_high.mp4", "reconstruction_low.mp4",
                                       "side_by_side.mp4", "tokens_high.safetensors", "tokens_low.safetensors"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ok"] and list(metrics["points"]) == ["low", "high"]
    record = recorded()
    want = record["demo"]["points"]
    for rate, m in metrics["points"].items():
        assert m["backends_agree"] and m["decode_from_file_exact"]
        assert m["psnr"] == pytest.approx(want[rate]["psnr"], abs=0.02)
        assert m["ssim"] == pytest.approx(want[rate]["ssim"], abs=0.002)
        assert m["bits_per_pixel"] == pytest.approx(want[rate]["bits_per_pixel"])
        assert m["num_bits"] == BITS[rate] and m["model_id"] == want[rate]["model_id"]
    # the high point (its own finer-grid backbone) is well above the low one on this clip and over the
    # three real clips, in both measures
    assert min(m["psnr"] for m in metrics["points"].values()) > FLOORS["low"][0] - 2
    assert metrics["points"]["high"]["psnr"] > metrics["points"]["low"]["psnr"] + 3
    assert metrics["points"]["high"]["ssim"] > metrics["points"]["low"]["ssim"]
    means = {rate: record["points"][rate]["real"] for rate in RATES}
    assert means["high"]["psnr"] > means["low"]["psnr"] and means["high"]["ssim"] > means["low"]["ssim"]
    grid = Image.open(out / "frames.png")
    assert grid.size == (6 * 176, 3 * 144)                    # rows: original, low, high; 6 frames each


def test_demo_bad_arguments():
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        demo_main(["--frames", "4"])
    assert demo_main(["--model", "/nonexistent/model"]) == 2
    assert demo_main(["--bundle", "/nonexistent/bundle"]) == 2
    with pytest.raises(SystemExit):
        demo_main(["--model", "a", "--bundle", "b"])


def _training_script(name="default_model"):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_curve_takes_the_last_reports_points_only_for_stages_not_run_in_work(tmp_path, monkeypatch):
    # scripts/default_model.py report: a stage retrained in WORK (checkpoints there) is evaluated
    # again, even where the last report's curve has points at the same steps (a point retrained
    # from a new backbone restarts its step count); stages not run in WORK keep the report's points
    script = _training_script()
    evaluated = []

    class Loaded:
        def __init__(self, path):
            self.path = path

        def eval(self):
            return self

    def evaluate(model, sets, tokens=True):
        evaluated.append(os.path.relpath(model.path, tmp_path))
        return {"real": {"psnr": 30.0}, "photos": {"psnr": 25.0}}

    monkeypatch.setattr(script, "PyraTok", type("P", (), {"from_pretrained": staticmethod(Loaded)}))
    monkeypatch.setattr(script, "_evaluate", evaluate)
    for step in (250, 300):
        (tmp_path / "stage1f_high" / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
    (tmp_path / "fit_high").mkdir()
    (tmp_path / "fit_high" / "config.json").write_text("{}")
    old = {"real_psnr": 26.1, "photos_psnr": 21.5}
    seed = {"stage1f_high": {"0": old, "250": old, "300": old}, "stage1f_low": {"1500": old}}
    curve = script.curve(str(tmp_path), {}, seed=seed)
    new = {"real_psnr": 30.0, "photos_psnr": 25.0, "model_id": None}
    assert curve["stage1f_high"] == {"0": new, "250": new, "300": new}
    assert sorted(evaluated) == ["fit_high", "stage1f_high/checkpoints/step-00000250",
                                 "stage1f_high/checkpoints/step-00000300"]
    assert curve["stage1f_low"] == {"1500": old}                         # not run here: the report's
    assert json.loads((tmp_path / "curve.json").read_text())["stage1f_high"]["250"] == new
    # the cache in WORK/curve.json: a re-run measures only the checkpoints that changed (another
    # model id at the same step: the stage run again in this WORK)
    evaluated.clear()
    assert script.curve(str(tmp_path), {}) == curve and evaluated == []
    (tmp_path / "stage1f_high" / "checkpoints" / "step-00000300" / "config.json").write_text('{"model_id": "b"}')
    assert script.curve(str(tmp_path), {})["stage1f_high"]["300"] == {**new, "model_id": "b"}
    assert evaluated == ["stage1f_high/checkpoints/step-00000300"]


def test_the_stage1f_validation_split_holds_out_whole_windows_and_photographs(tmp_path):
    # scripts/stage1f_validation.py: the validation clips are the last training window of each real
    # clip and three training photographs, and none of their rows stays in the training manifest
    script = _training_script("stage1f_validation")
    from pyratok.study import PHOTOS as EVALUATION_PHOTOS

    stems = {script._stem(*p) for p in script.VALIDATION_PHOTOS}
    assert stems == {"camera", "rocket", "grace_hopper"}
    assert set(script.VALIDATION_PHOTOS) <= set(_training_script("make_default_data").PHOTOS)   # training photographs
    assert not stems & set(EVALUATION_PHOTOS)
    clips = [{"path": f"clips/{c}.mp4", "start": float(s), "end": float(s + 1)} for c in ("a", "b", "c")
             for s in range(3)]
    photos = [{"path": f"photos/{p}-{m}.mp4"} for p in ("camera", "rocket", "grace_hopper", "brick")
              for m in range(4)]
    rows = [r for r in clips for _ in range(4)] + photos
    manifest, out = tmp_path / "train.jsonl", tmp_path / "split.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    windows = script.split(str(manifest), str(out))
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((w["path"], w["start"]) for w in windows) == [(f"clips/{c}.mp4", 2.0) for c in "abc"]
    assert len(kept) == len(rows) - 24 and not any(r in windows for r in kept)
    assert [r["path"] for r in kept if r["path"].startswith("photos/")] == [f"photos/brick-{m}.mp4" for m in range(4)]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows[:-16]))   # no validation photographs
    with pytest.raises(SystemExit, match="not the full run's manifest"):
        script.split(str(manifest), str(out))


def test_fast_camera_moves_cross_the_photograph_as_fast_as_the_protocols_pans():
    # scripts/make_default_data.py fast_move: on a photograph whose red and green channels are its x and y
    # coordinates, a frame's mean red / green is its window's centre and their spread its width, so
    # the window's speed in output pixels a frame can be read off the frames
    script = _training_script("make_default_data")
    H, W = 300, 400
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    photo = torch.stack([xs / W * 255, ys / H * 255, torch.zeros(H, W)], -1).round().to(torch.uint8)
    ways = set()
    for seed in range(12):
        video = script.fast_move(photo, torch.Generator().manual_seed(seed))
        assert video.shape == (script.FAST_FRAMES, *script.PHOTO_SIZE, 3) and video.dtype == torch.uint8
        assert torch.equal(video, script.fast_move(photo, torch.Generator().manual_seed(seed)))
        rg = video[..., :2].float()
        centre = rg.mean((1, 2)) / 255 * torch.tensor([W, H])                     # (T, 2) source pixels
        width = (rg[:, :, -1, 0] - rg[:, :, 0, 0]).mean() / 255 * W * script.PHOTO_SIZE[1] / (script.PHOTO_SIZE[1] - 1)
        steps = (centre[1:] - centre[:-1]) * script.PHOTO_SIZE[1] / width          # output pixels a frame
        speed = steps.norm(dim=1)
        assert speed.min() > 0.9 * speed.max() and speed.mean() >= 4, (seed, speed)  # steady, and fast
        moved = (centre[-1] - centre[0]).abs() > 10
        ways.add((bool(moved[0]), bool(moved[1])))
    assert ways == {(True, False), (False, True), (True, True)}                      # across, down, corner to corner
    slow = script.camera_move(photo, torch.Generator().manual_seed(0))
    assert slow.shape == (script.PHOTO_FRAMES, *script.PHOTO_SIZE, 3)


def test_the_fast_split_adds_the_other_photographs_fast_moves(tmp_path):
    script = _training_script("stage1f_validation")
    kept = [{"path": "clips/a.mp4", "start": 0.0, "end": 1.0}, {"path": "photos/brick-0.mp4"}]
    fast = [{"path": f"photos/{p}-fast{m}.mp4"} for p in ("camera", "rocket", "grace_hopper", "brick", "cell")
            for m in range(2)]
    (tmp_path / script.SPLIT).write_text("".join(json.dumps(r) + "\n" for r in kept))
    (tmp_path / "fast_moves.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fast))
    script.fast_split(str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / script.FAST_SPLIT).read_text().splitlines()]
    assert rows == kept + fast[6:]
    (tmp_path / "fast_moves.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fast[2:]))   # camera's gone
    with pytest.raises(SystemExit, match="not the full run's"):
        script.fast_split(str(tmp_path))


def test_the_stage1f_validation_runs_take_the_shipped_settings(tmp_path, monkeypatch):
    # each arm's TOML is the shipped stage 1f's with only the named keys changed; a TOML without
    # one of them is refused rather than run with the shipped value
    script = _training_script("stage1f_validation")
    started = []
    monkeypatch.setattr(script.subprocess, "Popen", lambda cmd, **kw: started.append(cmd) or "proc")
    shipped = tmp_path / "stage1f_high.toml"
    shipped.write_text('[model]\npretrained = "/a/fit_high"\n\n[data]\nsource = "data/train.jsonl"\n\n[train]\n'
                       'out_dir = "stage1f_high"\nsteps = 300\nseed = 12\n\n[loss]\nhierarchy = 0.0\nentropy = 0.1\n')
    changes = {"pretrained": '"/b/fit"', "source": '"../data/split.jsonl"', "entropy": "0.0"}
    assert script.stage1f(str(tmp_path), "arm", str(shipped), changes, 40, threads=1) == "proc"
    written = (tmp_path / "arm.toml").read_text()
    assert written == shipped.read_text().replace('"/a/fit_high"', '"/b/fit"').replace(
        '"data/train.jsonl"', '"../data/split.jsonl"').replace('"stage1f_high"', '"arm"').replace(
        "steps = 300", "steps = 40").replace("entropy = 0.1", "entropy = 0.0")
    assert started[0][-2:] == ["train", str(tmp_path / "arm.toml")]          # a fresh run: no --resume
    shipped.write_text(shipped.read_text().replace("entropy = 0.1\n", ""))
    with pytest.raises(SystemExit, match="no \\['entropy'\\] to change"):
        script.stage1f(str(tmp_path), "arm2", str(shipped), changes, 40, threads=1)
    (tmp_path / "arm" / "checkpoints" / "step-00000040").mkdir(parents=True)
    assert script.stage1f(str(tmp_path), "arm", str(shipped), changes, 40, threads=1) is None   # done: skipped
    # each point's fit and stage 1f take train_default.sh's lengths (the defaults in its
    # `declare -A fitsteps=([low]=${FIT_STEPS:-1500} [high]=${FIT_STEPS_HIGH:-${FIT_STEPS:-3000}})`)
    import re

    with open(os.path.join(os.path.dirname(__file__), "..", "scripts", "train_default.sh")) as f:
        sh = f.read()

    def defaults(name):
        entries = re.search(rf"declare -A {name}=\((.*)\)", sh)[1]
        return {p: int(n) for p, n in re.findall(r"\[(\w+)\]=\S*?(\d+)\}", entries)}

    fit, steps = defaults("fitsteps"), defaults("steps1f")
    assert {p: (fit[p], steps[p]) for p in fit} == script.LENGTHS


def test_the_backbone_length_check_measures_the_clip_parts(tmp_path):
    # scripts/backbone_length.py: on a causal backbone, frames 0-8 of a 17-frame clip are
    # reconstructed exactly as when the first 9 frames are encoded alone; frames 8-16 alone are a clip
    # of their own; the four figures are those of the parts they name
    script = _training_script("backbone_length")
    default_model = _training_script("default_model")
    from pyratok.models.pyratok import PyraTok

    torch.manual_seed(0)
    model = PyraTok(default_model.config("low")).eval()
    clip = torch.rand(1, 3, 17, 32, 32) * 2 - 1
    got = script.measure(model, clip)
    with torch.no_grad():
        head = model.vae.decode(model.vae.encode(clip[:, :, :9]).mode())
        tail = model.vae.decode(model.vae.encode(clip[:, :, 8:]).mode())
        whole = model.vae.decode(model.vae.encode(clip).mode())
    assert got["frames_0_8"] == pytest.approx(float(psnr(head, clip[:, :, :9])), abs=1e-3)
    assert got["frames_8_16_alone"] == pytest.approx(float(psnr(tail, clip[:, :, 8:])), abs=1e-4)
    assert got["frames_8_16"] == pytest.approx(float(psnr(whole[:, :, 8:], clip[:, :, 8:])), abs=1e-4)
    assert got["clip_17"] == pytest.approx(float(psnr(whole, clip)), abs=1e-4)
    with pytest.raises(ValueError, match="expected 17 frames"):
        script.measure(model, clip[:, :, :13])
    with pytest.raises(SystemExit, match="NAME=CHECKPOINT"):
        script.main([str(tmp_path), str(tmp_path / "r.csv"), f"x={tmp_path}"])


def test_the_lapq_capacity_study_fits_each_variant_of_a_point(tmp_path, monkeypatch):
    # scripts/lapq_capacity.py: a variant that is no valid LaPQ for the point's K is refused before the
    # minutes of encoding; each valid one is fitted from the same latents and gets its rows in the CSV
    script = _training_script("lapq_capacity")
    from pyratok.models.pyratok import PyraTok

    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    PyraTok(script.default_model.config("low")).save_pretrained(str(model_dir))
    missing = str(tmp_path / "no_manifest.jsonl")           # never read when a variant is refused
    for bad, match in (("3:64", "divide K = 16"), ("2", "substeps:hidden"), ("0:64", ">= 1")):
        with pytest.raises(SystemExit, match=match):
            script.main([str(model_dir), missing, str(tmp_path / "r.csv"), "--point", "low", "--variants", bad])
    with pytest.raises(SystemExit, match="--crops"):
        script.main([str(model_dir), missing, str(tmp_path / "r.csv"), "--crops", "2"])

    def random_crops(model, manifest, n):                   # the real encoder on random clips
        with torch.no_grad():
            outs = [model._encode_latent(torch.rand(1, 3, 9, 32, 32) * 2 - 1) for _ in range(n)]
        return (torch.cat([o[0] for o in outs]),
                [torch.cat([o[1][j] for o in outs]) for j in range(len(outs[0][1]))])

    monkeypatch.setattr(script.default_model, "encode_crops", random_crops)
    out = tmp_path / "r.csv"
    script.main([str(model_dir), missing, str(out), "--point", "low", "--crops", "10", "--steps", "2",
                 "--variants", "1:16", "4:16"])
    import csv

    rows = list(csv.DictReader(open(out)))
    assert [(r["substeps"], r["step"]) for r in rows] == [("1", "0"), ("1", "2"), ("4", "0"), ("4", "2")]
    assert {r["K"] for r in rows} == {"16"} and {r["crops"] for r in rows} == {"10"}
    assert int(rows[2]["parameters"]) > int(rows[0]["parameters"])        # 3 substep blocks more
    assert all(float(r["latent_error"]) > 0 for r in rows)


def test_the_continuation_rule_ships_only_a_clear_validation_gain(tmp_path):
    # scripts/stage1f_validation.py --continuation: the rule written before the runs
    # (benchmarks/results/rules/stage1f17_low*.md) takes the best checkpoint over all validation clips, and
    # only if it is >= 0.10 dB above the starting point there and no more than 0.10 dB below it on the real
    # windows
    script = _training_script("stage1f_validation")

    def row(step, all_clips, real, arm="a"):
        return {"arm": arm, "stage1f_steps": step, "all_clips_psnr": all_clips, "real_psnr": real}

    start = row(0, 20.0, 24.0, "start")
    rows = [start, row(500, 20.2, 24.0), row(1000, 20.4, 23.95), row(500, 20.3, 24.1, "b")]
    assert script.choose(rows) is rows[2]
    assert script.choose([start, row(500, 20.05, 24.5)]) is None                # under the margin
    assert script.choose([start, row(500, 20.10, 24.0)])["stage1f_steps"] == 500   # at it
    assert script.choose([start, row(500, 20.5, 23.8), row(1000, 20.3, 24.0)]) is None   # the best loses on real
    with pytest.raises(SystemExit, match="no checkpoint"):
        script.choose([start])
    with pytest.raises(SystemExit, match="holds no stage1f17_low run"):
        script.main(["--continuation", str(tmp_path), str(tmp_path / "r.csv")])
    # runs from different starting points have no common baseline: refused before any measuring
    for run, start_model in (("a", "/m/one"), ("b", "/m/two")):
        (tmp_path / f"{run}.toml").write_text(f'[model]\npretrained = "{start_model}"\n')
        (tmp_path / run / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit, match="different models"):
        script.main(["--continuation", "--runs", "a,b", str(tmp_path), str(tmp_path / "r.csv")])
    with pytest.raises(SystemExit, match="name RESULT_CSV"):               # no default path for several runs
        script.main(["--continuation", "--runs", "a,b", str(tmp_path)])
    with pytest.raises(SystemExit, match="--every"):
        script.main(["--continuation", "--every", "0", str(tmp_path), str(tmp_path / "r.csv")])


def test_the_backbone_check_measures_a_stage0_run_on_continuous_latents(tmp_path, monkeypatch):
    # scripts/stage1f_validation.py --backbone: the run's starting point (its TOML's pretrained, relative to WORK)
    # and its checkpoints every --every steps, the backbone alone (no quantizer); it chooses nothing
    script = _training_script("stage1f_validation")
    for step in (250, 500, 750):
        (tmp_path / "b0" / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
    (tmp_path / "b0.toml").write_text('[model]\npretrained = "start"\n')
    seen = {}

    def measure(data_dir, windows, todo, tokens=True):
        seen.update(data_dir=data_dir, todo=todo, tokens=tokens)
        return [{"arm": arm, "stage1f_steps": step} for arm, step, _ in todo]

    monkeypatch.setattr(script, "split", lambda manifest, out: ["windows"])
    monkeypatch.setattr(script, "measure", measure)
    out = tmp_path / "b.csv"
    script.main(["--backbone", "b0", "--every", "500", str(tmp_path), str(out)])
    assert seen["tokens"] is False and seen["data_dir"] == os.path.join(str(tmp_path), "data")
    assert [(arm, step, os.path.basename(path)) for arm, step, path in seen["todo"]] == [
        ("starting point", 0, "start"), ("b0", 500, "step-00000500"), ("b0", 750, "step-00000750")]
    assert seen["todo"][0][2] == os.path.abspath(tmp_path / "start")
    assert out.read_text().splitlines()[0] == "arm,stage1f_steps"
    with pytest.raises(SystemExit, match="name RESULT_CSV"):
        script.main(["--backbone", "b0", str(tmp_path)])
    with pytest.raises(SystemExit, match="holds no b1 run"):
        script.main(["--backbone", "b1", str(tmp_path), str(out)])


def test_a_report_without_training_needs_the_last_reports_records(tmp_path):
    # scripts/default_model.py report WORK DEST RESULT -: no training ran, so the last run's wall time and points
    # come from RESULT; without one it is refused before anything is measured
    script = _training_script()
    with pytest.raises(SystemExit, match="START_TIME '-'"):
        script.report(str(tmp_path), str(tmp_path / "model"), str(tmp_path / "none.json"), "-")


def test_the_continuation_rule_can_compare_with_a_baseline_other_than_the_start(tmp_path, monkeypatch):
    # scripts/stage1f_validation.py --continuation --baseline MODEL: a run that starts from a fit competes with the
    # shipped point (rules/backbone_fast_low.md): MODEL's row comes first and is what the rule compares with
    script = _training_script("stage1f_validation")
    for step in (500, 1000):
        (tmp_path / "r" / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
    (tmp_path / "r.toml").write_text(f'[model]\npretrained = "{tmp_path / "fit"}"\n')
    figures = {"shipped": (23.27, 25.25), "step-00000500": (23.30, 25.30), "step-00001000": (23.40, 25.20)}
    seen = []

    def measure(data_dir, windows, todo, tokens=True):
        seen.extend(todo)
        return [{"arm": arm, "stage1f_steps": step, "all_clips_psnr": figures[os.path.basename(path)][0],
                 "real_psnr": figures[os.path.basename(path)][1]} for arm, step, path in todo]

    monkeypatch.setattr(script, "split", lambda manifest, out: ["windows"])
    monkeypatch.setattr(script, "measure", measure)
    out = tmp_path / "v.csv"
    script.main(["--continuation", "--runs", "r", "--baseline", str(tmp_path / "shipped"), str(tmp_path), str(out)])
    assert seen[0] == ("baseline", 0, str(tmp_path / "shipped")) and len(seen) == 3     # the fit is not measured
    rows = out.read_text().splitlines()
    assert rows[0].endswith(",chosen") and rows[3].endswith(",yes")                      # step 1000: +0.13, real -0.05
    figures["step-00001000"] = (23.40, 25.10)                                           # real -0.15: the baseline stays
    seen.clear()
    script.main(["--continuation", "--runs", "r", "--baseline", str(tmp_path / "shipped"), str(tmp_path), str(out)])
    assert not any(line.endswith(",yes") for line in out.read_text().splitlines())


@pytest.mark.parametrize("rate", ["low", "high"])
def test_a_widened_decoder_decodes_as_before_and_its_new_channels_learn(rate):
    dm = _training_script()
    torch.manual_seed(0)
    model = dm.PyraTok(dm.config(rate)).eval()
    with torch.no_grad():                                  # norm gains and biases away from their initial values
        for name, p in model.vae.decoder.named_parameters():
            p.add_(0.1 * torch.randn_like(p) * (1 if name.endswith(("gamma", "bias")) else p.std()))
    old = model.config.backbone.decoder_base_dim or model.config.backbone.base_dim
    wide = dm.widen_decoder(model, old + 8).eval()
    assert wide.config.backbone.decoder_base_dim == old + 8
    z = torch.randn(1, dm.Z, 3, 4, 4)
    with torch.no_grad():
        want = model.vae.decode(z)
    for p in wide.vae.decoder.parameters():               # (the backbone is frozen in a PyraTok)
        p.requires_grad_(True)
    got = wide.vae.decode(z)
    assert got.shape == want.shape and float((got - want).abs().max()) < 1e-4
    for mine, theirs in ((wide.vae.encoder, model.vae.encoder), (wide.lapq, model.lapq)):
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
    # the new channels start at zero but learn: the weights producing them get a gradient
    (got - torch.rand_like(got)).pow(2).mean().backward()
    dec = wide.vae.decoder
    assert float(dec.conv_in.weight.grad[-8:].abs().sum()) > 0
    qkv = dec.mid_block.attentions[0].to_qkv.weight
    width = qkv.shape[0] // 3
    assert float(qkv.grad[2 * width - 8:2 * width].abs().sum()) > 0      # k's new channels (q's start random)
    with pytest.raises(ValueError, match="expected an int above the decoder's width"):
        dm.widen_decoder(model, old)


def test_the_validation_measures_named_model_folders(tmp_path, monkeypatch):
    # scripts/stage1f_validation.py --models: e.g. a point stored in 8 bits beside its checkpoint
    script = _training_script("stage1f_validation")
    seen = []

    def measure(data_dir, windows, todo, tokens=True):
        seen.extend(todo)
        return [{"arm": arm, "all_clips_psnr": 23.0} for arm, _, _ in todo]

    monkeypatch.setattr(script, "split", lambda manifest, out: ["windows"])
    monkeypatch.setattr(script, "measure", measure)
    out = tmp_path / "m.csv"
    script.main(["--models", "a=/x/a,b 8-bit=/x/b", str(tmp_path), str(out)])
    assert seen == [("a", 0, "/x/a"), ("b 8-bit", 0, "/x/b")]
    assert out.read_text().splitlines() == ["arm,all_clips_psnr", "a,23.0", "b 8-bit,23.0"]
    for bad in (["--models", "a", str(tmp_path), str(out)], ["--models", "a=/x/a", str(tmp_path)]):
        with pytest.raises(SystemExit, match="--models: expected NAME=MODEL"):
            script.main(bad)


def test_the_frame_place_check_groups_frames_as_the_backbone_codes_them(tmp_path, monkeypatch):
    # scripts/stage1f_validation.py --frames: frame 0 alone, then groups of the temporal factor (4 on the low grid)
    script = _training_script("stage1f_validation")
    dm = _training_script()
    torch.manual_seed(0)
    dm.PyraTok(dm.config("low")).save_pretrained(str(tmp_path / "m"))
    clip = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    monkeypatch.setattr(script, "split", lambda manifest, out: ["windows"])
    monkeypatch.setattr(script, "validation_sets", lambda data_dir, windows: {"real": [("r", clip, None)],
                                                                             "photos": [("p", clip, None)]})
    out = tmp_path / "f.csv"
    script.main(["--frames", str(tmp_path / "m"), "--backbone-only", str(tmp_path), str(out)])
    rows = [line.split(",") for line in out.read_text().splitlines()]
    assert rows[0] == ["part", "clip", "frame", "place", "psnr"]
    assert [r[3] for r in rows[1:10]] == ["0", "1", "2", "3", "4", "1", "2", "3", "4"]
    means = {(r[0], r[3]): float(r[4]) for r in rows if r[1] == "mean"}
    assert len(means) == 10
    frames = {int(r[2]): float(r[4]) for r in rows[1:10]}
    assert means[("real", "1")] == pytest.approx((frames[1] + frames[5]) / 2, abs=1e-3)
    with pytest.raises(SystemExit, match="--frames: name RESULT_CSV"):
        script.main(["--frames", str(tmp_path / "m"), str(tmp_path)])


def test_regrid_keeps_every_weight_but_the_dropped_time_convolutions(tmp_path):
    dm = _training_script()
    torch.manual_seed(0)
    src = dm.PyraTok(dm.config("low"))
    with torch.no_grad():                                  # a trained-looking backbone, its encoder LoRA non-zero
        for name, p in src.vae.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    src.save_pretrained(tmp_path / "src")
    dm.regrid(str(tmp_path / "src"), "low_t2", str(tmp_path / "out"))
    out = dm.PyraTok.from_pretrained(str(tmp_path / "out"))
    assert out.config.backbone.temperal_downsample == (False, True)
    merged = dm.PyraTok.from_pretrained(str(tmp_path / "src")).vae
    merged.merge_lora()
    theirs, mine = merged.backbone_state_dict(), out.vae.backbone_state_dict()
    dropped = set(theirs) - set(mine)
    assert dropped and all(".time_conv." in k for k in dropped) and not set(mine) - set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # the merged LoRA is in the weights: not the source's base weights alone
    assert any(not torch.equal(theirs[k], v) for k, v in src.vae.backbone_state_dict().items() if k in theirs)
    with torch.no_grad():                                   # 17 frames -> 9 latent frames on the finer grid
        assert out.vae.encode(torch.rand(1, 3, 17, 32, 32)).mean.shape[2] == 9
    with pytest.raises(ValueError, match="weights do not fit the config"):
        dm.regrid(str(tmp_path / "src"), "high", str(tmp_path / "other"))    # another width layout: refused
