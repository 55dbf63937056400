#!/usr/bin/env bash
# Evidence for the shipped demo directions (issue 16), on the embedded model (CPU), with the CLI only.
# Usage: bash tests/benchmarks/evidence_directions.sh OUT_DIR   (after `make demo-directions`)
# 1. the linearization-gap map the studio draws at first launch (helpfulness x verbosity; ~3 minutes on 2 cores);
# 2. each shipped TS-DPO direction alone at weights -1..+1 against the held-out pairs of all three objectives (the
#    35% split `make demo-directions` held out, 64 pairs each): own effect, cross-effects, 95% intervals (~25 min;
#    each point scores 3 x 64 pairs of up to 192 tokens, about 110 s on 2 cores);
# STEERING=1 adds the three steering vectors (another ~26 min; docs/directions/effects-steering.md); LENGTHS=1 adds reply lengths on the 20 evaluation
# prompts at a 384-token cap for both verbosity directions (~10 min each).
set -euo pipefail
out=${1:-/tmp/tsdpo-evidence-directions}
mkdir -p "$out"
T=.venv/bin/tsdpo
D=assets/directions
P=assets/data/eval_prompts.jsonl
export TSDPO_DATA_DIR="$out/data"
[ -f "$out/helpfulness-verbosity.gap.json" ] || $T gap-map --no-store --x $D/helpfulness.tsdpo.safetensors \
  --y $D/verbosity.tsdpo.safetensors --grid 7 --pairs 4 --out "$out/helpfulness-verbosity.gap.json" 2>"$out/gap.log"
directions="--direction $D/helpfulness.tsdpo.safetensors --direction $D/verbosity.tsdpo.safetensors \
  --direction $D/harmlessness.tsdpo.safetensors"
if [ -n "${STEERING:-}" ]; then
  directions="$directions --direction $D/helpfulness.steer.safetensors --direction $D/verbosity.steer.safetensors \
    --direction $D/harmlessness.steer.safetensors"
fi
[ -f "$out/effects.json" ] || $T effects --no-store --pairs ${PAIRS:-64} --val-fraction 0.35 --seed 0 --no-lin-gap \
  --max-prompt-tokens 96 --max-response-tokens 96 \
  --data verbosity=assets/data/ultrafeedback_helpfulness_400.jsonl \
  --data helpfulness=assets/data/ultrafeedback_length_balanced_2.jsonl \
  --data harmlessness=assets/data/hh_rlhf_harmless_length_matched_1.25.jsonl \
  $directions --out "$out/effects.json" 2>"$out/effects.log"
if [ -n "${LENGTHS:-}" ]; then
  for v in verbosity.steer verbosity.tsdpo; do
    [ -f "$out/lengths-$v.json" ] || $T lengths --no-store --direction $D/$v.safetensors --prompts $P \
      --max-new-tokens ${CAP:-384} --json-out "$out/lengths-$v.json" > "$out/lengths-$v.txt" 2>"$out/lengths-$v.log"
  done
fi
echo "done: $out"
