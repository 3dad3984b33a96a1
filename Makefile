# fedmeld: `make run` runs the default federated simulation, `make test` the test suite.
# Both create the virtual environment on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline machines: point at a folder holding the MedMNIST .npz files. A checkout beside
# ../shared (as in our CI) uses that; elsewhere medmnist downloads to ~/.medmnist.
MEDMNIST_ROOT ?= $(wildcard $(abspath ../shared/data/medmnist))
ifneq ($(MEDMNIST_ROOT),)
export MEDMNIST_ROOT
endif
export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1

.PHONY: setup run deploy test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv $(VENV)
	@echo "setting up $(VENV) (first use: a few minutes)"
	@# -qq: pip's errors only; its warnings (ignored index locations, the editable build's notice) drowned the run
	@$(PY) -m pip install -qq --upgrade pip
	@$(PY) -m pip install -qq -e '.[test]'
	@touch $@

run: setup  ## the default federated simulation; pass overrides as ARGS="key=value ..."
	$(VENV)/bin/fedmeld run $(ARGS)

deploy: setup  ## the same app under Flower's deployment runtime on localhost
	$(VENV)/bin/fedmeld deploy $(ARGS)

# pytest's own script, not `python -m pytest`: that would put the checkout on sys.path, where
# its peft/ folder would shadow Hugging Face's `peft` (fedmeld's is fedmeld.peft).
test: setup  ## the test suite (real MedMNIST files, tiny models, CPU)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
