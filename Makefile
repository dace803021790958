# One entry point for newcomers and CI. Every target installs what it needs.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTHON ?= python3

.PHONY: run serve test lint unit e2e control-plane node-packages bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint constraints.txt --editable '.[test,sim]'
	touch $@

## run: the demo: a real control plane on loopback, a borrow and a return step by step, with migchain status
run: $(STAMP) control-plane
	$(BIN)/python scripts/demo.py

## serve: the extender alone on 127.0.0.1:8888 with the shipped single-fleet chains (no cluster: Nodes mode)
serve: $(STAMP)
	$(BIN)/migchain chains validate chains/a100-40gb.yaml chains/a100-80gb.yaml chains/a30-24gb.yaml chains/h100-80gb.yaml chains/h200-141gb.yaml
	$(BIN)/migchain-extender --bind 127.0.0.1:8888 \
	  --chains chains/a100-40gb.yaml chains/a100-80gb.yaml chains/a30-24gb.yaml chains/h100-80gb.yaml chains/h200-141gb.yaml

## test: the whole suite: lint, types, import contracts, then every test (unit, property, e2e; the real-node ones as root)
test: lint control-plane node-packages
	$(BIN)/pytest

## control-plane: build kube-apiserver, kube-scheduler, kube-controller-manager, kubectl, etcd, kwok, and for the real node kubelet, migdeviceplugin, pause (cached)
control-plane:
	bash tests/e2e/kube/build.sh

## node-packages: as root, install containerd, runc, the CNI plugins and busybox-static from Debian when missing (the real-node tests; MIGCHAIN_E2E_REALNODE=0 turns them off)
node-packages:
	bash tests/e2e/kube/node-packages.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/pytest -m "not e2e"

e2e: $(STAMP) control-plane node-packages
	$(BIN)/pytest -m e2e

## bench: the efficiency benchmark (simulator: four traces, each on its fleet; about five minutes on 2 cores)
bench: $(STAMP)
	$(BIN)/python bench/efficiency.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache .hypothesis

## manifests: refresh the copies of chains/*.yaml and scheduler-config.yaml that manifests/ ships (kustomize reads no file outside its folder)
.PHONY: manifests
manifests:
	rm -rf manifests/copies
	mkdir -p manifests/copies/chains
	cp chains/*.yaml manifests/copies/chains/
	cp scheduler-config.yaml manifests/copies/

## lock: regenerate requirements.lock (hashed pins the Dockerfile installs with --require-hashes) after editing setup.cfg or constraints.txt
.PHONY: lock image-pin
lock:
	bash scripts/lock.sh

## image-pin: pin the Dockerfile's base image to the digest its tag points at now (TAG=... for another tag)
image-pin:
	bash scripts/pin-base-image.sh $(TAG)
