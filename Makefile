# RLHF pipeline. Quick start:  make sft rm ppo      Tests:  make test
# Variables: MODEL=<registry name>  DATA=<task, hh-rlhf, or a YAML data file>  RUN=<run name>  STORE=<store root>
#            ARGS="key=value ..." (every stage named)  ARGS_<stage>="key=value ..." (that one)  CONFIG=<a stage YAML>
#            CHECKPOINTS=<run/stage,...> (make eval)   RESUME=0 (start a stage over instead of resuming)
#            NPROC=<processes>  ACCELERATE_CONFIG=<configs/accelerate/*.yaml> (multi-process / DeepSpeed)
#            NNODES=<machines> NODE_RANK=<this one's> MASTER_ADDR=<node 0's address> MASTER_PORT=<port> (NPROC each)
#            GPU_MEMORY=<GiB per GPU> (make plan, default 80)  TABLE=1 (make plan: the table of docs/memory-plan.md)
#            CPU_MEMORY=<GiB of CPU memory per process> (make plan: checks what is offloaded; unset: not checked)
PYTHON ?= python3
VENV   := .venv
PY     ?= $(VENV)/bin/python
MODEL  ?=
DATA   ?=
RUN    ?=
STORE  ?=
ARGS   ?=
CHECKPOINTS ?=
CONFIG ?=
RESUME ?= 1
NPROC  ?= 1
# Several machines: NPROC processes on each of NNODES, this one NODE_RANK (0 on the one at MASTER_ADDR)
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?=
MASTER_PORT ?= 29500
ACCELERATE_CONFIG ?=
# ARGS goes to every stage named; ARGS_<stage> to that one only, after ARGS (make sft rm ARGS_sft="sft.epochs=1")
STAGE_ARGS = $(if $(MODEL),model=$(MODEL)) $(if $(DATA),data=$(DATA)) $(if $(RUN),run=$(RUN)) $(if $(STORE),store=$(STORE)) \
             $(if $(filter 0,$(RESUME)),resume=false) $(ARGS) $(ARGS_$@)
# One process: plain python. Several: `accelerate launch --multi_gpu`, which really starts NPROC processes
# (NCCL on GPUs, gloo on CPUs); plain --num_processes or --cpu would quietly start one.
# Several machines: the same command on each, NODE_RANK apart; Accelerate's launcher starts the processes of its
# machine (torchrun's way, DeepSpeed's too: no ssh from node to node), which meet at MASTER_ADDR:MASTER_PORT.
ifeq ($(NPROC)$(NNODES)$(ACCELERATE_CONFIG),11)
LAUNCH = $(PY)
else
LAUNCH = $(PY) -m accelerate.commands.launch --quiet \
         $(if $(ACCELERATE_CONFIG),--config_file $(ACCELERATE_CONFIG),--multi_gpu) \
         --num_processes $(shell echo $$(( $(NPROC) * $(NNODES) ))) $(NODES)
endif
NODES = $(if $(filter-out 1,$(NNODES)),$(if $(MASTER_ADDR),,$(error NNODES=$(NNODES) needs MASTER_ADDR=<the address \
        of the machine with NODE_RANK=0>, the same on every machine)) --num_machines $(NNODES) \
        --machine_rank $(NODE_RANK) --main_process_ip $(MASTER_ADDR) --main_process_port $(MASTER_PORT) \
        --same_network --rdzv_backend static --deepspeed_multinode_launcher standard)
export TOKENIZERS_PARALLELISM = false
# DeepSpeed compiles its CPU ops (Adam for ZeRO offload) on first use into this folder, one per checkout: a shared
# one (~/.cache/torch_extensions) is rebuilt each time another checkout with other source paths uses it.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: help plan sft rm ppo grpo rloo reinforce dpo eval serve-rm test test-slow test-multiprocess test-docs lint store export data data-check install clean bench bench-memory gpu-check

help:
	@echo "Targets:"
	@echo "  make sft rm ppo     the three stages, in order (each: make <stage>)"
	@echo "  make grpo           stage 3 by GRPO (after sft rm): groups of responses per prompt, no critic"
	@echo "  make rloo           stage 3 by RLOO (after sft rm): each response's baseline the others to its prompt"
	@echo "  make reinforce      stage 3 by REINFORCE++ (after sft rm): returns normalised over the batch, no critic"
	@echo "  make dpo            stage 3 by DPO (after sft rm): trained on the preference pairs, the RM only judges"
	@echo "  make eval           the report: base, SFT, RM and every stage-3 method of a run on held-out data, side by side"
	@echo "  make plan           memory per process of every stage for MODEL, NPROC, ACCELERATE_CONFIG, GPU_MEMORY (GiB),"
	@echo "                      ARGS; whether it fits and the first change that makes it fit (docs/memory-plan.md)"
	@echo "  make store          the checkpoints in the store, with lineage and headline metrics"
	@echo "  make serve-rm       RUN=<run> [PORT=8100]: its reward model over HTTP, for rewards=[http://127.0.0.1:8100]"
	@echo "  make export         RUN=<run> STAGE=<sft|rm|ppo|dpo|grpo|rloo|reinforce> OUT=<folder> [MERGE=0]: a standalone"
	@echo "                      transformers folder"
	@echo "  make data-check     read every split of DATA without training: counts, skips, truncation, a first record"
	@echo "  make test           the test suite (installs what it needs; make test-multiprocess: more launches of"
	@echo "                      several processes; make test-slow: the slow checks; make lint)"
	@echo "  make bench          every stage against the peers (bench/README.md); make gpu-check on a CUDA machine"
	@echo "  make data           rewrite the embedded task from its seed;  make install;  make clean (removes store/)"
	@echo "Variables:"
	@echo "  MODEL=<registry name, model folder or hub id>   DATA=<task, hh-rlhf, or a YAML data file>   RUN=<run name>"
	@echo "  STORE=<store root>   CONFIG=<stage YAML of your own, instead of configs/[DATA/]<stage>.yaml>"
	@echo "  ARGS=\"key=value ...\"   any config key of the stage (python -m stages.<stage> --help lists them)"
	@echo "  ARGS_<stage>=\"key=value ...\"   for that stage only, after ARGS: make sft rm ppo ARGS_ppo=\"ppo.steps=10\""
	@echo "  RESUME=0   start a stage over, removing its resumable state;   CHECKPOINTS=run/stage,... (make eval)"
	@echo "  NPROC=<processes>   ACCELERATE_CONFIG=configs/accelerate/<ddp|zero2|zero3|zero3_offload|multinode>.yaml"
	@echo "  NNODES=<machines> NODE_RANK=<0..NNODES-1> MASTER_ADDR=<node 0> [MASTER_PORT=29500]: NPROC on each machine"

# torch is pinned first: 2.13.0 resolves to the local CPU wheel, and pyproject's range then adds nothing.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# DeepSpeed, on first use: by the tests, and by a stage launched with a DeepSpeed config. It builds from source
# (its ops are compiled just in time, the first time they are used).
$(VENV)/.deepspeed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[deepspeed]'
	touch $@
USES_DEEPSPEED = $(if $(ACCELERATE_CONFIG),$(if $(shell grep -l 'distributed_type: DEEPSPEED' $(ACCELERATE_CONFIG) 2>/dev/null),$(VENV)/.deepspeed))
# What a stage needs installed first; INSTALL= with PY=<python> uses an interpreter set up otherwise (the GPU check).
INSTALL ?= $(VENV)/.installed $(USES_DEEPSPEED)

# A built-in data name with stage configs of its own uses them (configs/hh-rlhf/<stage>.yaml); the embedded task
# and a YAML data file of yours use configs/<stage>.yaml. CONFIG=<file> replaces either.
CONFIGS = configs$(if $(and $(DATA),$(wildcard configs/$(DATA)/sft.yaml)),/$(DATA))

sft rm ppo grpo rloo reinforce dpo: $(INSTALL)
	$(LAUNCH) -m stages.$@ --config $(or $(CONFIG),$(CONFIGS)/$@.yaml) $(STAGE_ARGS)

# The memory each process holds in every stage, before renting GPUs (alignment/plan.py, docs/memory-plan.md): no
# weights, no training, and the base install only (INSTALL= with PY=<python>: none), even for a DeepSpeed launch file.
GPU_MEMORY ?= 80
plan: $(if $(INSTALL),$(VENV)/.installed)
	$(PY) -m alignment plan --nproc $(NPROC) $(if $(ACCELERATE_CONFIG),--accelerate-config $(ACCELERATE_CONFIG)) \
		--gpu-memory $(GPU_MEMORY) $(if $(CPU_MEMORY),--cpu-memory $(CPU_MEMORY)) --configs $(CONFIGS) $(if $(TABLE),--table) \
		$(if $(MODEL),model=$(MODEL)) $(if $(DATA),data=$(DATA)) $(ARGS)

# The run: RUN, else the one MODEL and DATA name (as the stages name it), else the latest run in the store.
DATA_NAME = $(basename $(notdir $(or $(DATA),task)))
EVAL_RUN = $(notdir $(or $(MODEL),tiny-llama))$(if $(filter-out task,$(DATA_NAME)),-$(DATA_NAME))
eval: $(VENV)/.installed
	$(PY) -m stages.eval --config $(or $(CONFIG),$(CONFIGS)/eval.yaml) $(if $(RUN),run=$(RUN),$(if $(MODEL)$(DATA),run=$(EVAL_RUN))) \
		$(if $(STORE),store=$(STORE)) \
		$(if $(CHECKPOINTS),eval.checkpoints=[$(CHECKPOINTS)]) $(ARGS) $(ARGS_eval)

store: $(VENV)/.installed
	$(PY) -m alignment store list $(if $(STORE),--root $(STORE))

# A store reward model over HTTP (alignment/serve.py), for RL stages rewarded by it: rewards=[http://host:PORT]
PORT ?= 8100
serve-rm: $(VENV)/.installed
	$(PY) -m alignment serve-rm $(or $(RUN),$(EVAL_RUN))/rm --port $(PORT) $(if $(STORE),--root $(STORE))

# A checkpoint as a standalone folder for plain transformers (alignment/export.py); MERGE=0 keeps a LoRA adapter apart.
export: $(VENV)/.installed
	$(if $(and $(RUN),$(STAGE),$(OUT)),,$(error make export needs RUN=<run> STAGE=<sft|rm|ppo|dpo|grpo|rloo|reinforce> OUT=<new folder>))
	$(PY) -m alignment export $(RUN)/$(STAGE) $(OUT) $(if $(filter 0,$(MERGE)),--no-merge) $(if $(STORE),--root $(STORE))

# Benchmark of every stage against the peers (bench/README.md). The PPO peer, TRL 1.12's PPOTrainer, gets a
# virtual environment of its own: TRL 1.16 no longer has PPO. Same torch (CPU wheel) and transformers as ours.
PEER_VENV := bench/.venv-trl112
$(PEER_VENV)/.installed:
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(PEER_VENV)/bin/python -m pip install --quiet trl==1.12.0 transformers==5.24.0 accelerate==1.15.0
	touch $@

bench: $(VENV)/.installed $(VENV)/.deepspeed $(PEER_VENV)/.installed
	$(PY) -m bench.run $(ARGS)

# Memory: PPO on an 85M LLaMA with 1 process and with 2 under ZeRO-3, each process's peak (bench/memory.py)
bench-memory: $(VENV)/.installed $(VENV)/.deepspeed
	$(PY) -m bench.memory $(ARGS)

# On a CUDA machine: the test suite, every stage under ZeRO-2/3 and QLoRA, a 0.5B model through the three stages,
# against TRL 1.12's PPO (bench/gpu_check.py says how to run it where the packages travel as wheels).
gpu-check: $(INSTALL)
	$(PY) -m bench.gpu_check $(ARGS)

test: $(VENV)/.installed $(VENV)/.deepspeed
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(ARGS)

# ruff's default rules, import order and 120 columns (pyproject.toml), on the whole tree; CI runs it before the tests
lint: $(VENV)/.installed
	$(PY) -m ruff check .

test-slow: $(VENV)/.installed $(VENV)/.deepspeed
	$(PY) -m pytest -q -m slow $(ARGS)

# The launches of several processes beyond the default suite's: DDP, ZeRO-2 and ZeRO-3 with offload in every stage,
# two machines simulated on this one, a machine killed, kill and resume, non-finite steps (.ci/run runs it)
test-multiprocess: $(VENV)/.installed $(VENV)/.deepspeed
	$(PY) -m pytest -q -m multiprocess $(ARGS)

# Every command README.md and docs/ show, run with tiny settings or allowlisted with a reason (tests/test_docs_commands.py)
test-docs: $(VENV)/.installed $(VENV)/.deepspeed
	$(PY) -m pytest -q -s -m docs $(ARGS)

# Reads every split DATA names, as the stages would, and reports per split; exit 1 on an error.
data-check: $(VENV)/.installed
	$(PY) -m alignment.data_check $(or $(DATA),task) $(if $(MODEL),model=$(MODEL)) $(ARGS)

# Rewrites data/task from its seed; the tests check the committed files match.
data: $(VENV)/.installed
	$(PY) -m alignment.task

clean:
	rm -rf store
