# make demo: install into .venv and run the quickstart study on the embedded digits, then print its table.
# make test: install into .venv (with test extras) and run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/mae-lab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/mae-lab

demo: install
	$(BIN)/mae-lab run studies/quickstart.toml
	$(BIN)/mae-lab report quickstart

test: install
	$(BIN)/python -m pytest -q

.PHONY: install demo test
