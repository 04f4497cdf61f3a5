# `make demo` and `make test` set everything up themselves: a virtualenv at .venv with the pinned
# requirements (torch 2.13.0 CPU build here; the Docker image brings its own CUDA build of it).
PYTHON ?= python3
# Where torch comes from. Empty: the default index (this project's machines carry a local CPU wheel of
# 2.13.0). Elsewhere, TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu avoids a multi-GB CUDA build.
TORCH_INDEX_URL ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo lint test test-fast bench gpu-check clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

lint: $(STAMP)  # ruff with ruff.toml's rules; `make test` and `make test-fast` run it first
	$(PY) -m ruff check .

test: $(STAMP) lint
	bash scripts/ensure_postgres.sh
	$(PY) -m pytest

test-fast: $(STAMP) lint  # the inner loop: every test but the slow and GPU ones (`make test` runs them all, as CI does)
	bash scripts/ensure_postgres.sh
	$(PY) -m pytest -m "not slow and not gpu"

bench: $(STAMP)
	$(PY) bench/bench_handler.py --json bench/results/handler-$$(date +%F).json
	$(PY) bench/bench_loader.py --mb 100 --json bench/results/loader-$$(date +%F).json
	$(PY) bench/bench_label.py --conversations 2000 --processes 1 2 --json bench/results/label-$$(date +%F).json
	CUDA_VISIBLE_DEVICES= $(PY) bench/bench_train.py --mode cpu
	CUDA_VISIBLE_DEVICES= $(PY) bench/bench_load.py --json bench/results/load-small-$$(date +%F).json
	@if $(PY) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(PY) bench/bench_train.py --mode gpu \
		&& $(PY) bench/bench_load.py --configs data/model-configs/qwen2.5-7b.json data/model-configs/mistral-7b-v0.1.json \
			--json bench/results/load-gpu-$$(date +%F).json; \
	else echo "no CUDA GPU here: GPU modes skipped (GPU figures: not yet measured)"; fi

# On a CUDA machine: versions, the GPU tests (tests/test_gpu.py) and one 7B job through the handler, with the
# runbook's figures (docs/BENCHMARKS.md); writes bench/results/gpu-check-<date>.json. Without a GPU: exit 2.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

clean:
	rm -rf .cache .pytest_cache .ruff_cache
