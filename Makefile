# Developer entry points. `make test` is the test command (CI runs it too).
#   make test PYTEST_ARGS='-x -k codec'
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv rabbitmq node test demo lint typecheck bench clean

# compat mode puts the repo root on sys.path (a .pth file), so Twisted's plugin
# discovery finds twisted/plugins/callme_plugin.py from the editable install.
venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[test,dev,bench]' --config-settings editable_mode=compat
	touch $@

rabbitmq:
	scripts/ensure-rabbitmq

# node and amqplib for the Node.js interop test (tests/foreign/node)
node:
	scripts/ensure-node

test: rabbitmq node venv
	$(BIN)/pytest $(PYTEST_ARGS)

demo: rabbitmq venv
	$(BIN)/python examples/demo.py

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy --strict txcallme

bench: rabbitmq venv
	$(BIN)/python -m benchmarks

clean:
	rm -rf build/ *.egg-info $(VENV)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
