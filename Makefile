# The two commands of the README. Both create .venv first when it is missing (scripts/bootstrap.sh).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: main test env

env:
	@bash scripts/bootstrap.sh

main: env
	$(PY) -m devis_core.main_job

test: env
	$(PY) -m pytest $(PYTEST_ARGS)
