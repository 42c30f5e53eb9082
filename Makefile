# Two commands on a fresh machine (Python >= 3.10 and make):
#   make demo   set up .venv once, then run the offline demo: extract, fit every method x 5 seeds, report
#   make test   set up .venv once, then run the README's test command
# A second call reuses .venv (reinstalling only when pyproject.toml changes) and skips finished work.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch pinned to the CPU-usable wheels; a bare `torch` could pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/w2s-run experiments/demo.toml

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest --durations=10

clean-demo:
	rm -rf experiments-out/demo
