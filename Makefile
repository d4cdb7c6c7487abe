# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned here, not in pyproject: 2.13.0 resolves to the CPU build on disk on the
# reference machine and to the normal wheel elsewhere; a range would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/safetylock demo

# mypy --strict on the lock package and the newer modules; the rest of the package is typed but not yet strict.
TYPED := src/safetylock/lock src/safetylock/gates.py src/safetylock/ood.py src/safetylock/ood_report.py \
	src/safetylock/prompt_attacks.py src/safetylock/screen.py src/safetylock/repair src/safetylock/guard.py \
	src/safetylock/deployment.py src/safetylock/arch.py src/safetylock/bench src/safetylock/calibrate.py \
	src/safetylock/baselines/fitting.py src/safetylock/baselines/lock_defenses.py src/safetylock/cli/defense_commands.py \
	src/safetylock/base_refusal.py src/safetylock/cli/options.py src/safetylock/cli/serve_commands.py src/safetylock/cli/model_commands.py \
	src/safetylock/cli/lock_commands.py src/safetylock/cli/eval_commands.py src/safetylock/cli/bench_commands.py

test: $(STAMP)
	$(BIN)/python -m mypy --strict $(TYPED)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build src/*.egg-info
