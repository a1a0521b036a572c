# The two commands of the README. Each sets up .venv itself (scripts/setup_env.sh, idempotent).
PY := .venv/bin/python
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (0: one process); tests/conftest.py hands them whole
# modules (the two Ray modules as one unit, so their Ray clusters never overlap).
PYTEST_WORKERS ?= 2

.PHONY: setup serve generate test test-all

setup:
	@bash scripts/setup_env.sh

# The main job: the OpenAI-compatible server on the embedded default model (SmolLM2-135M-Instruct).
serve: setup
	$(PY) -m jaxllm.cli serve $(ARGS)

generate: setup
	$(PY) -m jaxllm.cli generate $(ARGS)

# The test suite, CPU only (GPU tests are skipped without a GPU).
test: setup
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m "not gpu" -n $(PYTEST_WORKERS) $(PYTEST_ARGS)
