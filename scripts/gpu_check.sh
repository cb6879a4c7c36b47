#!/usr/bin/env bash
# The GPU path in one time-boxed run (issue 19): GPU-marked tests, the factored backward per layer, the adapter
# benchmark at 128^3 in bf16 autocast, and a short `medlora fit` (bf16-mixed on the GPU) followed by
# `medlora infer --device cuda` on a few phantom cases. Every number goes to $OUT (six files: summary.txt, log.txt
# with every step's output and the tables, bench.json, fit_metrics.csv, infer_volumes.csv, infer_provenance.json);
# nothing else is written outside $OUT and a temporary folder.
#
#   OUT=/path/to/results bash scripts/gpu_check.sh             # on a machine with a CUDA GPU, from the repo root
#   OUT=/tmp/gpu_dry DRY_RUN=1 bash scripts/gpu_check.sh       # the same steps on CPU, small (a check of the script)
#
# PYTHON (default python3) must import medlora's dependencies and its test extra (torch with CUDA, monai, lightning,
# peft, pytest, ...: pip install -e ".[test]" or the same packages on PYTHONPATH); the repository root is put first
# on PYTHONPATH.
# Each step has its own time limit; the whole script stays under about 7 minutes plus the machine's start.
# The exit code is 0 when every step ran; $OUT/summary.txt lists each step with its status and duration.

set -u -o pipefail

OUT=${OUT:?set OUT to a folder for the results}
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/medlora_gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MEDLORA=("$PYTHON" -m medlora.cli)

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu; ACCEL=cpu; PRECISION=32-true; AMP=none; SIZE=32; CASES=3; THREADS=${THREADS:-1}
else
    DEVICE=cuda; ACCEL=gpu; PRECISION=bf16-mixed; AMP=bf16; SIZE=128; CASES=4; THREADS=4
fi

FAILED=0
: > "$OUT/summary.txt"
: > "$OUT/log.txt"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, append its output to log.txt, record status and time
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS status
    echo "== $name (limit ${limit}s)"
    printf '\n===== %s: %s\n' "$name" "$*" >> "$OUT/log.txt"
    timeout --kill-after=10 "$limit" "$@" > "$WORK/step.log" 2>&1
    status=$?
    cat "$WORK/step.log" >> "$OUT/log.txt"
    [ $status -eq 0 ] || FAILED=1
    printf '%-12s exit %-3s %4ss  %s\n' "$name" "$status" "$((SECONDS - start))" "$*" >> "$OUT/summary.txt"
    tail -n 3 "$WORK/step.log"
}

step environment 60 bash -c "
    date -u; nvidia-smi || echo 'no nvidia-smi'
    $PYTHON -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\",
        torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\");
        print(\"bf16 supported\", torch.cuda.is_available() and torch.cuda.is_bf16_supported())'"

# GPU-marked tests (factored gradients on CUDA in float32 and bf16 autocast); skipped, not failed, without CUDA.
step tests_gpu 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/

# Cost-model calibration: each adapted layer alone, dense vs factored (COST_RATIO in medlora/adapters/factored.py).
step per_layer 90 "$PYTHON" scripts/bench_adapters.py --per-layer --device "$DEVICE" --amp "$AMP" \
    --sizes "$SIZE" --models monai mv --methods lora dora --steps 3 --threads "$THREADS"

# Step time and peak memory against full fine-tuning and PEFT, both networks, side by side.
step bench 240 "$PYTHON" scripts/bench_adapters.py --device "$DEVICE" --amp "$AMP" --sizes "$SIZE" \
    --models monai mv --methods lora:dense lora dora:dense dora lora_c --rounds 1 --steps 4 --warmup 2 \
    --threads "$THREADS" --memory-runs 0 --json "$OUT/bench.json"

# The README's main job, short: phantoms -> adapter fine-tuning (bf16-mixed on the GPU) -> inference on CUDA.
step phantoms 60 "${MEDLORA[@]}" data phantoms --out "$WORK/sah" --domain sah --cases "$CASES" --seed 1
step fit 150 "${MEDLORA[@]}" fit --config configs/finetune_sah_3d.yaml --config configs/adapters/dora.yaml \
    --model.pretrained null --data.data_dir "$WORK/sah" --data.num_folds 2 --data.samples_per_volume 1 \
    --trainer.max_epochs 2 --trainer.check_val_every_n_epoch 1 --trainer.log_every_n_steps 1 \
    --trainer.accelerator "$ACCEL" --trainer.precision "$PRECISION" --trainer.default_root_dir "$WORK/run" \
    --trainer.logger.init_args.save_dir "$WORK/run" --checkpoint.dirpath "$WORK/run/checkpoints"
step infer 90 "${MEDLORA[@]}" infer --model "$WORK/run/checkpoints/last.ckpt" --device "$DEVICE" \
    --out "$WORK/preds" "$WORK/sah/imagesTr"

# Keep the small result files: training metrics, predicted volumes, provenance.
find "$WORK/run" -name metrics.csv -exec cp {} "$OUT/fit_metrics.csv" \; 2>/dev/null
for f in volumes.csv provenance.json; do cp "$WORK/preds/$f" "$OUT/infer_$f" 2>/dev/null; done

echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
exit $FAILED
