VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup demo test lint clean

$(VENV)/.pl_optim_installed: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh

setup: $(VENV)/.pl_optim_installed

## Train the digits ConvNet through LightningCLI (float, then 1cycle + decoupled decay +
## self-compression with channel removal) and print what each achieved.
demo: setup
	WANDB_MODE=offline $(PYTHON) -m examples.cli fit --config examples/configs/digits_convnet.yaml
	WANDB_MODE=offline $(PYTHON) -m examples.cli fit --config examples/configs/digits_self_compression.yaml

## Lint + the whole test suite (what CI runs).
test: setup
	$(VENV)/bin/ruff check .
	WANDB_MODE=offline $(PYTHON) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) lightning_logs wandb .pytest_cache build *.egg-info
