# Two commands: `make repro` runs the whole tiny pipeline, `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup repro study study-queue readme test lock clean s3-server mlflow-server prefect-server deploy worker

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --no-deps -r requirements.lock
	$(VENV)/bin/pip check
	touch $@

repro: setup
	dvc repro

# The tiny study (params/study.yaml: every strategy at 25%, the uniform layer-count sweep, importance-based runs, the
# pruning curves) as one DVC experiment `tiny-study`, through the Prefect pipeline flow (ephemeral without a server).
# Results: `dvc exp show`, `dvc exp apply tiny-study` (params.yaml itself goes back to the committed default).
study: setup
	python -m flows.pipeline --params-file params/study.yaml --experiment tiny-study --no-pull --no-push

# The same study with each selection its own DVC experiment (study-<run>, with the `all` baseline beside it), queued
# and run one at a time: `dvc exp show` lists them. flows/queue.py.
study-queue: setup
	python -m flows.queue --params-file params/study.yaml

# The README's study section from the committed study report (after copying a new `make study` into reports/study).
readme: setup
	python -m pipeline.readme README.md reports/study

test: setup
	python -m pytest -q

# Re-resolve requirements.in into requirements.lock (maintainers only; set-up never resolves).
lock:
	rm -rf /tmp/vr-lock && $(PYTHON) -m venv /tmp/vr-lock && /tmp/vr-lock/bin/pip install --quiet -r requirements.in
	/tmp/vr-lock/bin/pip freeze --all --exclude pip | sed 's/^torch==\(.*\)+cpu/torch==\1/' > requirements.lock

clean:
	rm -rf $(VENV)

# Orchestration and artifacts (README): local services on 127.0.0.1, each in the foreground until Ctrl-C; data in .services/.
# s3-server needs AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (any values: the local store's only identity).
S3_PORT ?= 8333
MLFLOW_PORT ?= 5000
PREFECT_PORT ?= 4200
POOL ?= gpu
PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api

s3-server: setup
	python -m flows.services s3 --port $(S3_PORT)

mlflow-server: setup
	AWS_ENDPOINT_URL_S3=$${AWS_ENDPOINT_URL_S3:-http://127.0.0.1:$(S3_PORT)} python -m flows.services mlflow --port $(MLFLOW_PORT)

prefect-server: setup
	python -m flows.services prefect --port $(PREFECT_PORT)

# Register prefect.yaml's deployments (work pool $(POOL), process type) with the Prefect server at PREFECT_API_URL.
# They run in a workspace of their own, never in this checkout: DEPLOY_WORKSPACE, a clone of this checkout's HEAD
# commit with its .dvc/config.local (flows/workspace.py prepare; `make deploy` again moves it to a new commit).
# DEPLOY_WORKSPACE= (empty): VR_WORKSPACE is left to each worker's environment (workers on other machines).
DEPLOY_WORKSPACE ?= $(CURDIR)/.services/workspace
deploy: setup
	PREFECT_API_URL=$(PREFECT_API_URL) prefect work-pool inspect $(POOL) >/dev/null 2>&1 || \
		PREFECT_API_URL=$(PREFECT_API_URL) prefect work-pool create $(POOL) --type process
ifneq ($(DEPLOY_WORKSPACE),)
	python -m flows.workspace prepare $(DEPLOY_WORKSPACE)
	PREFECT_API_URL=$(PREFECT_API_URL) VR_WORKSPACE=$(DEPLOY_WORKSPACE) prefect deploy --all
else
	PREFECT_API_URL=$(PREFECT_API_URL) env -u VR_WORKSPACE prefect deploy --all
endif

# A process worker for pool $(POOL): run it on the GPU machine, in its clone (CUDA_VISIBLE_DEVICES per deployment).
worker: setup
	PREFECT_API_URL=$(PREFECT_API_URL) prefect worker start --pool $(POOL) --type process

# The layer-selection sweep (flows/sweep/; README "A layer-selection sweep across machines"; `make deploy` once first):
# this shell runs the parent (the shared stages, then the report); one child flow run per selection goes to the workers.
SWEEP_PARAMS ?= params/study.yaml
.PHONY: sweep sweep-worker
sweep: setup
	PREFECT_API_URL=$(PREFECT_API_URL) python -m flows.sweep --params-file $(SWEEP_PARAMS)

# A worker for sweep children: one flow run at a time, on the GPU(s) in CUDA_VISIBLE_DEVICES (one worker per GPU).
sweep-worker: setup
	PREFECT_API_URL=$(PREFECT_API_URL) prefect worker start --pool $(POOL) --type process --work-queue default --limit 1
