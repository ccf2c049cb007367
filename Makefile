VENV ?= .venv
PYTHON := $(VENV)/bin/python
VISION_VENV ?= .venv-vision
VISION_TESTS := $(VISION_VENV)/bin/python -m pytest tests/vision --confcutdir=tests/vision -q -p no:cacheprovider

.PHONY: setup demo test test-vision lint clean

$(VENV)/.pl_optim_installed: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh

setup: $(VENV)/.pl_optim_installed

## Train the digits ConvNet through LightningCLI (float, then 1cycle + decoupled decay +
## self-compression with channel removal) and print what each achieved.
demo: setup
	WANDB_MODE=offline $(PYTHON) -m examples.cli fit --config examples/configs/digits_convnet.yaml
	WANDB_MODE=offline $(PYTHON) -m examples.cli fit --config examples/configs/digits_self_compression.yaml

## Lint + the whole test suite (what CI runs), then tests/vision in .venv-vision if that venv can be set up.
test: setup
	$(VENV)/bin/ruff check .
	WANDB_MODE=offline $(PYTHON) -m pytest -q
	@if VISION_VENV=$(VISION_VENV) bash scripts/setup_vision_env.sh; then $(VISION_TESTS); \
	elif [ -n "$$CI" ]; then echo "[test] CI: the torchvision venv ($(VISION_VENV)) could not be set up"; exit 1; \
	else echo "[test] no working torchvision venv ($(VISION_VENV)): tests/vision NOT run"; fi

## Channel removal on torchvision's models, in its own venv (torch + torchvision, no lightning).
test-vision:
	VISION_VENV=$(VISION_VENV) bash scripts/setup_vision_env.sh
	$(VISION_TESTS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(VISION_VENV) lightning_logs wandb .pytest_cache build *.egg-info
