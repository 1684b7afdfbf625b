# RLHF pipeline. Quick start:  make sft rm ppo      Tests:  make test
# Variables: MODEL=<registry name>  RUN=<run name>  STORE=<store root>  ARGS="key=value ..."
#            CHECKPOINTS=<run/stage,...> (make eval)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MODEL  ?=
RUN    ?=
STORE  ?=
ARGS   ?=
CHECKPOINTS ?=
STAGE_ARGS = $(if $(MODEL),model=$(MODEL)) $(if $(RUN),run=$(RUN)) $(if $(STORE),store=$(STORE)) $(ARGS)
export TOKENIZERS_PARALLELISM = false

.PHONY: sft rm ppo eval test test-slow store data install clean

# torch is pinned first: 2.13.0 resolves to the local CPU wheel, and pyproject's range then adds nothing.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

sft rm ppo: $(VENV)/.installed
	$(PY) stages/$@.py --config configs/$@.yaml $(STAGE_ARGS)

# The run: RUN, else the MODEL name, else the latest run in the store.
eval: $(VENV)/.installed
	$(PY) stages/eval.py --config configs/eval.yaml $(if $(RUN),run=$(RUN),$(if $(MODEL),run=$(notdir $(MODEL)))) $(if $(STORE),store=$(STORE)) \
		$(if $(CHECKPOINTS),eval.checkpoints=[$(CHECKPOINTS)]) $(ARGS)

store: $(VENV)/.installed
	$(PY) -m alignment store list $(if $(STORE),--root $(STORE))

test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS)

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow $(ARGS)

# Rewrites data/task from its seed; the tests check the committed files match.
data: $(VENV)/.installed
	$(PY) -m alignment.task

clean:
	rm -rf store
