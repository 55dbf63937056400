#!/usr/bin/env bash
# Evidence for the sweep issue, on the embedded model (CPU), with the CLI only.
# Usage: bash tests/benchmarks/evidence_sweep.sh OUT_DIR
# Needs OUT_DIR/{helpfulness,verbosity}.tsdpo.safetensors from tests/benchmarks/evidence.sh. Trains the
# scalarized-DPO baseline at three shares with the same budget (about 6 minutes each on 2 cores), then
# sweeps a 5x5 grid of tangent and steering mixes (about 25 minutes).
set -euo pipefail
out=${1:-/tmp/tsdpo-evidence}
T=.venv/bin/tsdpo
UF=assets/data/ultrafeedback_helpfulness_400.jsonl
P=assets/data/eval_prompts.jsonl
export TSDPO_DATA_DIR="$out/data"
TRAIN="--limit 300 --steps ${STEPS:-40} --max-prompt-tokens 96 --max-response-tokens 96 --overwrite --no-store"
for w in 0.25 0.5 0.75; do
  [ -f "$out/scalarized-$w.safetensors" ] || \
    $T train-scalarized --data helpfulness=$UF --data verbosity=$UF --weight $w $TRAIN \
       --out "$out/scalarized-$w.safetensors" | tee "$out/train-scalarized-$w.txt"
done
$T sweep --x "$out/helpfulness.tsdpo.safetensors" --y "$out/verbosity.tsdpo.safetensors" \
   --steer-x assets/directions/helpfulness.steer.safetensors --steer-y assets/directions/verbosity.steer.safetensors \
   --scalarized "$out/scalarized-0.25.safetensors" --scalarized "$out/scalarized-0.5.safetensors" \
   --scalarized "$out/scalarized-0.75.safetensors" \
   --data helpfulness=$UF --data verbosity=$UF --limit 300 --pairs ${PAIRS:-12} \
   --prompts $P --n-prompts ${PROMPTS:-4} --max-new-tokens ${MAX_NEW_TOKENS:-48} --grid ${GRID:-5} \
   --out "$out/sweep" --no-store | tee "$out/sweep.txt"
