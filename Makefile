.PHONY: setup demo test test-all bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/knnformer demo

test: setup
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m "not slow and not gpu"

test-all: setup
	.venv/bin/python -m pytest -q -m "not gpu"
