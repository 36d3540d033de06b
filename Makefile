# Two commands: `make repro` runs the whole tiny pipeline, `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup repro test lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --no-deps -r requirements.lock
	$(VENV)/bin/pip check
	touch $@

repro: setup
	dvc repro

test: setup
	python -m pytest -q

# Re-resolve requirements.in into requirements.lock (maintainers only; set-up never resolves).
lock:
	rm -rf /tmp/vr-lock && $(PYTHON) -m venv /tmp/vr-lock && /tmp/vr-lock/bin/pip install --quiet -r requirements.in
	/tmp/vr-lock/bin/pip freeze --all --exclude pip | sed 's/^torch==\(.*\)+cpu/torch==\1/' > requirements.lock

clean:
	rm -rf $(VENV)
