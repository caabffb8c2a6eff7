# `make test` on a fresh machine: makes .venv (unless a virtual environment is
# active), installs torch 2.13.0 only where torch is missing, then the package
# with its test extras, then runs the whole suite.

VENV ?= .venv
ifdef VIRTUAL_ENV
  BIN := $(VIRTUAL_ENV)/bin
else
  BIN := $(abspath $(VENV))/bin
endif
PYTHON := $(BIN)/python
STAMP := $(BIN)/../.e_dist-installed
# The environment's tools (ninja above all) before the system's.
export PATH := $(BIN):$(PATH)

.PHONY: setup test demo lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test,pretrain]"
	@touch $@

test: setup
	$(PYTHON) -m pytest -q tests

# The main job on 2 local CPU ranks: ALTO under DeepSpeed ZeRO-2 (bf16) on the
# embedded corpus; loss curves in runs/demo/curves.png.
DEMO_ARGS ?= --preset small --steps 300 --micro-batch 8 --accumulation 2 --warmup 20 \
	--eval-every 25 --checkpoint-every 100
demo: setup
	OMP_NUM_THREADS=1 $(PYTHON) -m torch.distributed.run --nproc_per_node 2 --master_port 29517 \
		-m e_dist.pretrain --backend deepspeed --ds-config ds_configs/alto_zero2_bf16.json \
		--optimizer ALTO --name demo $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(PYTHON) benchmarks/step_time.py

clean:
	rm -rf $(VENV) build *.egg-info
