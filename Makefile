# The three commands of the README. Everything goes into .venv; nothing is installed system-wide.
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines and CI take the CPU build that pip finds locally; on a GPU node pass the build you use,
# e.g. `make setup TORCH=` to keep whatever torch the venv already has.
TORCH ?= torch==2.13.0
# The lowest transformers pyproject.toml allows, with the tokenizers and huggingface_hub it needs (the venv's
# are too new for it): tests/test_transformers_lowest.py loads exports with it, first on PYTHONPATH.
TRANSFORMERS_LOWEST := transformers==4.45.2 tokenizers==0.20.3 huggingface_hub==0.26.5

.PHONY: setup quickstart check lint test check-gpu

setup:
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install --quiet '$(TORCH)')
	$(BIN)/python -m pip install --quiet -e '.[dev,mpi,remote]'
	$(BIN)/python -m pip install --quiet --upgrade --no-deps --target $(VENV)/transformers-lowest $(TRANSFORMERS_LOWEST)
	@echo "set up: activate with '. $(BIN)/activate'"

# The whole path on the built-in corpus (the Python standard library's source): train a BPE tokenizer,
# prepare Megatron-format shards, inspect them, train the tiny preset on them with 2 processes, export
# the run to Hugging Face (verified against transformers) and generate a line with transformers.
# Re-running reuses the prepared shards; run.overwrite=true replaces the previous training run.
QUICKSTART_DATA := runs/quickstart-data
quickstart:
	$(BIN)/python -m pretrain.data export-stdlib --output $(QUICKSTART_DATA)/stdlib.jsonl
	$(BIN)/python -m pretrain.data train-tokenizer --input $(QUICKSTART_DATA)/stdlib.jsonl --vocab-size 4096 \
		--output $(QUICKSTART_DATA)/tokenizer
	$(BIN)/python -m pretrain.data prepare --input $(QUICKSTART_DATA)/stdlib.jsonl \
		--tokenizer $(QUICKSTART_DATA)/tokenizer --output $(QUICKSTART_DATA)/stdlib
	$(BIN)/python -m pretrain.data inspect $(QUICKSTART_DATA)/stdlib
	PATH=$(CURDIR)/$(BIN):$$PATH deepspeed --num_gpus 2 pretrain/main.py --config configs/tiny.yaml \
		data.paths='[$(QUICKSTART_DATA)/stdlib]' model.vocab_size=4096 run.dir=runs/quickstart run.overwrite=true
	$(BIN)/python -m pretrain.convert to-hf --checkpoint runs/quickstart --output runs/quickstart-hf --overwrite
	$(BIN)/python -c "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer, logging; \
		logging.disable_progress_bar(); torch.manual_seed(0); \
		tok = AutoTokenizer.from_pretrained('runs/quickstart-hf'); model = AutoModelForCausalLM.from_pretrained('runs/quickstart-hf'); \
		ids = tok('def ', return_tensors='pt').input_ids; \
		print(tok.decode(model.generate(ids, max_new_tokens=32, do_sample=True, top_k=20)[0]))"

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test:
	$(BIN)/python -m pytest -q --durations=10

# Every check: lint, format, types, tests.
check: lint test

# The tests marked gpu on the visible CUDA devices, with DeepSpeed's own accelerator and NCCL (tests/conftest.py:
# PRETRAIN_TEST_GPU=1 runs only them). Without CUDA they are skipped, each with its reason.
check-gpu:
	env -u DS_ACCELERATOR PRETRAIN_TEST_GPU=1 $(BIN)/python -m pytest -m gpu -rsP --durations=10
