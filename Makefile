# kennel: one entry per job. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
# Two environments, both with scripts/kennel_ops installed editable (pyproject.toml):
# .venv, the dev one (torch and the images' packages): the tests and the benchmarks;
# .venv-ops, the light one (boto3, requests, pillow, locust; no torch): demo, smoke, loadtest, AWS.
VENV := .venv
OPS_VENV := .venv-ops
# PEM bundle that pip trusts inside image builds only (see containers/build-ca/README.md).
EXTRA_CA_BUNDLE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
export DOCKER_BUILDKIT := 0
PY := $(VENV)/bin/python
OPS := $(OPS_VENV)/bin
COMPOSE ?= docker compose
TRAIN_IMAGE ?= kennel-train:latest
SERVE_IMAGE ?= kennel-serve:latest
# The commit the images are built from (their org.opencontainers.image.revision label; the
# push tags with it); -dirty when tracked files differ from it; empty outside a git checkout.
REVISION := $(shell git rev-parse --short=12 HEAD 2>/dev/null)$(shell git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo -dirty)
# Empty: PyPI's torch (CPU and GPU). https://download.pytorch.org/whl/cpu: the slim CPU-only image.
TORCH_INDEX_URL ?=
# Containers started by make write files as the person running make.
AS_ME := KENNEL_UID=$(shell id -u) KENNEL_GID=$(shell id -g)
# Host dataset for `make train` (compose mounts it read-only); empty: the bundled sample.
KENNEL_DATA_DIR ?=
# Folder with the architecture's torchvision ImageNet .pth (pretrained=true); empty: none.
KENNEL_PRETRAINED_DIR ?=
# The Lambda deployment package (kennel-lambda-zip; the AWS deploy reads it here).
LAMBDA_ZIP ?= build/lambda.zip

.PHONY: help setup setup-test venv ops-venv build-ca test test-host images image-train image-serve train train-distributed
.PHONY: sample data demo clean lambda-zip smoke loadtest serve bench-serve bench-budget bench-train bench-int8 bench-overhead
help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

setup: ## the Docker engine, compose plugin and base image: installed and started where missing (seconds when ready)
	bash scripts/setup-docker.sh

setup-test: ## setup, plus the host packages the test suite drives (docker-registry, a JDK)
	bash scripts/setup-docker.sh --test-tools

# A venv: pinned pip, the lock, then this checkout's kennel_ops editable (no dependencies:
# the lock has them). Rebuilt when its lock or pyproject.toml changes.
define make-venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade 'pip==25.3'
	$(1)/bin/pip install -q -r $(2)
	$(1)/bin/pip install -q --no-deps -e .
	touch $(1)/.installed
endef

venv: $(VENV)/.installed ## .venv: the dev environment for the tests and benchmarks (requirements-dev.lock, torch)
$(VENV)/.installed: requirements-dev.lock pyproject.toml
	$(call make-venv,$(VENV),requirements-dev.lock)

ops-venv: $(OPS_VENV)/.installed ## .venv-ops: the operator commands without torch (requirements-ops.lock)
$(OPS_VENV)/.installed: requirements-ops.lock pyproject.toml
	$(call make-venv,$(OPS_VENV),requirements-ops.lock)

build-ca: ## copy EXTRA_CA_BUNDLE into the build context (empty file when unset)
	@if [ -n "$(EXTRA_CA_BUNDLE)" ]; then cmp -s "$(EXTRA_CA_BUNDLE)" containers/build-ca/extra-ca.crt \
	  || cp "$(EXTRA_CA_BUNDLE)" containers/build-ca/extra-ca.crt; \
	else : > containers/build-ca/extra-ca.crt; fi

# A rebuild moves the tag and leaves the previous image untagged: several GB each
# time for the training image. Remove those (and only those) after each build.
prune-superseded = @docker image prune --force --filter dangling=true \
	  --filter label=org.opencontainers.image.title=$(1) | sed -n 's/^Total reclaimed space: /pruned superseded $(1) images: /p'

images: image-train image-serve ## build both images

image-train: build-ca ## build kennel-train (TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu: slim CPU-only)
	docker build -f containers/train/Dockerfile -t $(TRAIN_IMAGE) --build-arg KENNEL_REVISION=$(REVISION) \
	  $(if $(TORCH_INDEX_URL),--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL)) .
	$(call prune-superseded,kennel-train)

image-serve: build-ca ## build kennel-serve
	docker build -f containers/serve/Dockerfile -t $(SERVE_IMAGE) --build-arg KENNEL_REVISION=$(REVISION) .
	$(call prune-superseded,kennel-serve)

serve: image-serve ## serve ./model on 127.0.0.1:8080 with docker compose (KENNEL_MODEL_DIR=dir: another model)
	$(if $(KENNEL_MODEL_DIR),KENNEL_MODEL_DIR=$(abspath $(KENNEL_MODEL_DIR))) KENNEL_SERVE_IMAGE=$(SERVE_IMAGE) \
	  $(COMPOSE) up serve

# Extra flags for kennel-bench-serve, e.g. BENCH_SERVE_ARGS='--layouts 1x2,2x1,1x1 --json bench.json'.
BENCH_SERVE_ARGS ?=
bench-serve: venv image-serve ## serving benchmark: latency and throughput vs in-process and the original, cold start, size
	$(VENV)/bin/kennel-bench-serve --image $(SERVE_IMAGE) $(BENCH_SERVE_ARGS)

# MODEL=dir (holding model.int8.onnx) and DATA=dataset compare a trained model, its accuracy
# included; without MODEL a random-weight ResNet-50 of the original's shape.
# Extra flags for kennel-bench-int8, e.g. BENCH_INT8_ARGS='--layouts 2x1/2 --rounds 4'.
BENCH_INT8_ARGS ?=
bench-int8: venv image-serve ## INT8 against FP32 side by side: accuracy, engine and served throughput and p50 per layout
	$(VENV)/bin/kennel-bench-int8 --image $(SERVE_IMAGE) $(if $(MODEL),--model $(MODEL),--random resnet50) \
	  $(if $(DATA),--data $(DATA)) $(BENCH_INT8_ARGS)

# Extra flags for kennel-bench-overhead, e.g. BENCH_OVERHEAD_ARGS='--rounds 10 --requests 200'.
BENCH_OVERHEAD_ARGS ?=
bench-overhead: venv image-serve ## serving's metrics and logging: served p50 on vs off, side by side (target < 2%)
	$(VENV)/bin/kennel-bench-overhead --image $(SERVE_IMAGE) $(BENCH_OVERHEAD_ARGS)

# Extra flags for kennel-bench-multi-model, e.g. BENCH_MME_ARGS='--models 10 --json mme.json'.
BENCH_MME_ARGS ?=
bench-multi-model: venv image-serve ## multi-model endpoint: the Nth model's load and memory with its backbone resident, invoke vs /invocations
	$(VENV)/bin/kennel-bench-multi-model --image $(SERVE_IMAGE) $(BENCH_MME_ARGS)

bench-budget: venv ## request budget: memory and time of each hostile request on a worker's own path (ResNet-50)
	$(VENV)/bin/kennel-bench-budget

# Extra flags for kennel-bench-train, e.g. BENCH_TRAIN_ARGS='--accuracy-epochs 4 --json bench-train.json'.
BENCH_TRAIN_ARGS ?=
bench-train: venv ## training benchmark: the training loop against its baselines (ResNet-50, generated JPEGs)
	$(VENV)/bin/kennel-bench-train $(BENCH_TRAIN_ARGS)

train: image-train ## train with docker compose (KENNEL_DATA_DIR=path/to/dogImages; default: the bundled sample)
	mkdir -p model output checkpoints
	$(AS_ME) $(if $(KENNEL_DATA_DIR),KENNEL_DATA_DIR=$(abspath $(KENNEL_DATA_DIR))) \
	  $(if $(KENNEL_PRETRAINED_DIR),KENNEL_PRETRAINED_DIR=$(abspath $(KENNEL_PRETRAINED_DIR))) \
	  KENNEL_TRAIN_IMAGE=$(TRAIN_IMAGE) $(COMPOSE) run --rm train

train-distributed: image-train ## train ONE model on two hosts, algo-1 and algo-2, with compose (data-parallel; KENNEL_DATA_DIR as for train)
	mkdir -p model output/algo-1 output/algo-2 checkpoints/distributed
	rm -f output/algo-1/failure output/algo-2/failure
	@export $(AS_ME) $(if $(KENNEL_DATA_DIR),KENNEL_DATA_DIR=$(abspath $(KENNEL_DATA_DIR))) KENNEL_TRAIN_IMAGE=$(TRAIN_IMAGE); \
	$(COMPOSE) --profile distributed up algo-1 algo-2; \
	codes=$$($(COMPOSE) --profile distributed ps --all --format '{{.Service}}={{.ExitCode}}' algo-1 algo-2); \
	$(COMPOSE) --profile distributed rm --force algo-1 algo-2 >/dev/null 2>&1; \
	echo "exit codes:" $$codes; \
	case "$$codes" in *=[1-9]*) for host in algo-1 algo-2; do \
	  [ -f output/$$host/failure ] && echo "$$host: $$(cat output/$$host/failure)"; done; exit 1;; esac

sample: image-train ## write the bundled sample dataset to data/sample (generated, no download)
	mkdir -p data/sample
	docker run --rm $(AS_ME:%=-e %) -v "$(CURDIR)/data/sample:/sample" $(TRAIN_IMAGE) sample /sample

data: ops-venv ## download dogImages to data/dogImages and check it (133 breeds, 6680/835/836 images)
	$(OPS)/kennel-download-data --dest data

demo: setup ops-venv ## on a fresh host too: build, train on the bundled sample, then serve ./model and answer smoke requests
	$(MAKE) --no-print-directory train
	$(MAKE) --no-print-directory smoke

clean: ## remove model/ output/ checkpoints/ data/sample and the compose containers and sample volume
	$(COMPOSE) down --volumes --remove-orphans
	rm -rf model output checkpoints data/sample

# Extra flags for kennel-loadtest, e.g. LOADTEST_ARGS='--workers 1,2 --threads 1,2'
# (sweep), LOADTEST_ARGS='--url http://127.0.0.1:8080/invocations' (a running endpoint),
# LOADTEST_ARGS='--endpoint kennel --own-endpoint' (a SageMaker endpoint) or
# LOADTEST_ARGS='--locustfile my_users.py' (Locust users of your own). Only the
# compose service needs the image built.
LOADTEST_ARGS ?=
loadtest: ops-venv $(if $(findstring --url,$(LOADTEST_ARGS))$(findstring --endpoint,$(LOADTEST_ARGS)),,image-serve) ## load-test serve on ./model (or --url/--endpoint) on Locust: max requests/s, latency per step, auto-scaling target (LOADTEST_ARGS=...)
	KENNEL_SERVE_IMAGE=$(SERVE_IMAGE) $(OPS)/kennel-loadtest $(LOADTEST_ARGS)

lambda-zip: ops-venv ## build/lambda.zip (LAMBDA_ZIP=...): the Lambda package, handler kennel_lambda.handler, same bytes every build
	$(OPS)/kennel-lambda-zip $(LAMBDA_ZIP)

smoke: ops-venv image-serve ## end to end on this host: serve ./model (MODEL_DIR=...), classify the sample as JPEG, base64 JSON, URL, then via the Lambda handler
	KENNEL_SERVE_IMAGE=$(SERVE_IMAGE) $(OPS)/kennel-smoke $(if $(MODEL_DIR),--model-dir $(MODEL_DIR))

# Flags for `kennel-aws push`, e.g. AWS_ARGS='--region eu-west-1' or AWS_ARGS='--registry host:5000'.
AWS_ARGS ?=
.PHONY: push aws-test
push: ops-venv images ## push both images to ECR, repositories created when missing (AWS_ARGS='--region ...')
	$(OPS)/kennel-aws push --train-image $(TRAIN_IMAGE) --serve-image $(SERVE_IMAGE) $(AWS_ARGS)

aws-test: setup-test venv ## the AWS operator tests: moto in server mode and a local OCI registry
	$(PY) -m pytest tests/aws

# ops-venv too: `make lambda-zip` is one of the tests.
test: setup-test venv ops-venv ## on a fresh host too: the whole suite, unit, contract, containers (real engine), aws (moto + local registry)
	$(PY) -m pytest tests

test-host: venv ops-venv ## everything that needs no Docker engine
	$(PY) -m pytest tests -m 'not container'
