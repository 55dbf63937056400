#!/usr/bin/env bash
# Does each shipped preference set carry a signal the embedded model can learn? (issue 16; docs/evidence.md,
# "the data check"). `tsdpo data signal` on every data variant the shipped and tried directions were trained on, split
# as `make demo-directions` splits them (35% held out, seed 0; 64 held-out pairs measured; prompts and replies cut at
# 96 tokens, as in training). About 2.5 s a pair on 2 cores: 60-70 minutes for all six.
# Usage: bash tests/benchmarks/evidence_signal.sh OUT_DIR
set -euo pipefail
out=${1:-/tmp/tsdpo-evidence-signal}
mkdir -p "$out"
T=.venv/bin/tsdpo
A=assets/data
UF=../shared/data/ultrafeedback_binarized_train1000.jsonl
common="--val-fraction 0.35 --seed 0 --heldout 64 --max-prompt-tokens 96 --max-response-tokens 96 --json"
check() {  # NAME FILE ARGS...
  local name=$1; shift
  [ -f "$out/$name.json" ] || $T data signal "$@" $common >"$out/$name.json" 2>"$out/$name.log"
}
check verbosity $A/ultrafeedback_helpfulness_400.jsonl --objective verbosity
check helpfulness-matched $A/ultrafeedback_length_matched_1.25.jsonl --objective helpfulness
check harmlessness-matched $A/hh_rlhf_harmless_length_matched_1.25.jsonl --objective harmlessness
check helpfulness-balanced $A/ultrafeedback_length_balanced_2.jsonl --objective helpfulness
# the first 900 rows (the evaluation prompts come from rows 900+), pairs rated at least 1.5 apart, then length-balanced
[ -f $UF ] && check helpfulness-gap1.5-balanced $UF --objective helpfulness --limit 900 --min-score-gap 1.5 --length-balanced 2
check harmlessness-balanced $A/hh_rlhf_harmless_length_balanced_2.jsonl --objective harmlessness
echo "outputs in $out"
