# pycri: `make run` serves on /run/pycri/pycri.sock, `make test` runs the suite.
# Both install what they need on a fresh Debian 12 machine (as root).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := crun runc conmon catatonit containernetworking-plugins iptables \
                docker-registry busybox-static apache2-utils openssl zstd
BENCH_PACKAGES := containerd
PYTEST_ARGS ?=
RUN_ARGS ?=

.PHONY: deps apt-deps run test lint proto bench clean

apt-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

deps: apt-deps $(VENV)/.installed

run: deps
	$(VENV)/bin/pycri serve $(RUN_ARGS)

lint: deps
	$(VENV)/bin/ruff check cri_runtime imageservice tests bench
	$(VENV)/bin/ruff format --check cri_runtime imageservice tests bench
	$(VENV)/bin/mypy cri_runtime imageservice

test: deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Regenerate the CRI modules from proto/api.proto (tests/test_proto.py fails when stale).
proto: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Icri_runtime/api=proto --python_out=. --pyi_out=. --grpc_python_out=. \
		cri_runtime/api/api.proto

bench: deps
	@for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$p; done
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
