# The three commands of the README. Everything goes into .venv; nothing is installed system-wide.
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines and CI take the CPU build that pip finds locally; on a GPU node pass the build you use,
# e.g. `make setup TORCH=` to keep whatever torch the venv already has.
TORCH ?= torch==2.13.0

.PHONY: setup quickstart check lint test

setup:
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install --quiet '$(TORCH)')
	$(BIN)/python -m pip install --quiet -e '.[dev,mpi]'
	@echo "set up: activate with '. $(BIN)/activate'"

# The tiny preset on the built-in corpus (the Python standard library's source), 2 processes.
# run.overwrite=true: running the quickstart again replaces its previous run.
quickstart:
	PATH=$(CURDIR)/$(BIN):$$PATH deepspeed --num_gpus 2 pretrain/main.py --config configs/tiny.yaml \
		run.dir=runs/quickstart run.overwrite=true

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test:
	$(BIN)/python -m pytest -q --durations=10

# Every check: lint, format, types, tests.
check: lint test
