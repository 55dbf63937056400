#!/usr/bin/env bash
# Evidence for the steering and TS-DPO issues, on the embedded model (CPU), with the CLI only.
# Usage: bash tests/benchmarks/evidence.sh OUT_DIR   (about 40 minutes on 2 cores)
# The steering vectors are the shipped demo ones (`make demo-directions` rebuilds them the same way).
set -euo pipefail
out=${1:-/tmp/tsdpo-evidence}
mkdir -p "$out"
T=.venv/bin/tsdpo
UF=assets/data/ultrafeedback_helpfulness_400.jsonl
P=assets/data/eval_prompts.jsonl   # 20 UltraFeedback prompts (rows 900+ of the full file) that no direction saw
export TSDPO_DATA_DIR="$out/data"
N=${MAX_NEW_TOKENS:-200}

[ -n "${SKIP_STEERING:-}" ] || $T lengths --direction assets/directions/verbosity.steer.safetensors --prompts $P --weights -1,-0.5,0,0.5,1 \
   --max-new-tokens $N --no-store | tee "$out/lengths-steer-verbosity.txt"

# TS-DPO tangent directions (low-rank), a budget of minutes each; held-out accuracy in the final line.
# A JVP step over 8 sequences of up to 192 tokens takes about 10 s on 2 cores.
TRAIN="--limit 300 --steps ${STEPS:-40} --max-prompt-tokens 96 --max-response-tokens 96 --overwrite --no-store"
$T train --data $UF --objective verbosity $TRAIN --out "$out/verbosity.tsdpo.safetensors" | tee "$out/train-verbosity.txt"
$T train --data $UF --objective helpfulness $TRAIN --out "$out/helpfulness.tsdpo.safetensors" | tee "$out/train-helpfulness.txt"
$T lengths --direction "$out/verbosity.tsdpo.safetensors" --prompts $P --weights -1,0,1 --max-new-tokens $N --no-store | tee "$out/lengths-tsdpo-verbosity.txt"
