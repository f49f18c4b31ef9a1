# pycri: `make run` serves on /run/pycri/pycri.sock, `make test` runs the suite.
# Both install what they need on a fresh Debian 12 machine (as root).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := crun runc conmon catatonit containernetworking-plugins iptables nftables iproute2 procps make \
                docker-registry busybox-static apache2-utils openssl zstd systemd criu util-linux-extra
BENCH_PACKAGES := containerd
PYTEST_ARGS ?=
RUN_ARGS ?=

.PHONY: deps apt-deps run test lint proto nri-proto bench bench-images clean install uninstall runtime-deps check

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
	$(VENV)/bin/lint-imports

test: deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Regenerate the CRI modules from proto/api.proto (tests/test_proto.py fails when stale).
proto: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Icri_runtime/api=proto --python_out=. --pyi_out=. --grpc_python_out=. \
		cri_runtime/api/api.proto

# Regenerate the NRI messages (containerd/nri v0.12.1 and ttrpc's envelope; ttrpc, so no gRPC stubs).
# No .pyi for api.proto: its enum value named None makes the stub invalid Python (mypy skips the module).
nri-proto: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Icri_runtime/nri/api=proto/nri --python_out=. \
		cri_runtime/nri/api/api.proto
	$(PY) -m grpc_tools.protoc -Icri_runtime/nri/api=proto/nri --python_out=. --pyi_out=. \
		cri_runtime/nri/api/ttrpc.proto

bench: deps
	@for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$p; done
	$(PY) -m bench.run $(BENCH_ARGS)

# Issue 15's targets alone: commit of 100 MiB of changes vs tar -czf + sha256sum, unchanged rebuild.
bench-images: deps
	$(PY) -m bench.run --only images --skip-containerd $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# --- node installation (see README "Install on a node") ---------------------------------
# Overridable so that tests (and packagers) can install elsewhere: make install PYCRI_HOME=/tmp/x/opt ...
INSTALL_PYTHON ?= /usr/bin/python3
# e.g. --system-site-packages, to use Debian's python3-grpcio where PyPI has no wheel (the s390x VM test)
INSTALL_VENV_ARGS ?=
PYCRI_HOME ?= /opt/pycri
BINDIR ?= /usr/local/bin
SYSCONFDIR ?= /etc/pycri
UNITDIR ?= /etc/systemd/system
CRICTL_CONFIG ?= /etc/crictl.yaml
DATADIR ?= /var/lib/pycri
MODULESLOADDIR ?= /etc/modules-load.d
# systemd-udevd's link files: ours keeps udev from changing pod veths' MAC addresses (see the file).
NETWORKDIR ?= /etc/systemd/network
SKIP_MODULES ?=
SKIP_APT ?=
PURGE ?=
CHECK_ARGS ?=
RUNTIME_PACKAGES := crun runc conmon catatonit containernetworking-plugins iptables python3-venv dbus

# apparmor (apparmor_parser, to load pycri's default profile) only where the kernel has AppArmor on.
runtime-deps:
	@if [ -z "$(SKIP_APT)" ]; then \
		wanted="$(RUNTIME_PACKAGES)"; \
		if [ "$$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" = Y ]; then wanted="$$wanted apparmor"; fi; \
		missing=""; for p in $$wanted; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		fi; \
	fi

# pycri in its own venv, built from a copy of the sources (nothing is written into this tree).
install: runtime-deps
	@set -e; src=$$(mktemp -d); trap 'rm -rf "$$src"' EXIT; \
	cp -r pyproject.toml README.md cri_runtime imageservice "$$src"/; \
	find "$$src" -name __pycache__ -prune -exec rm -rf {} +; \
	rm -rf $(PYCRI_HOME); \
	$(INSTALL_PYTHON) -m venv $(INSTALL_VENV_ARGS) $(PYCRI_HOME); \
	$(PYCRI_HOME)/bin/python -m pip install -q "$$src"; \
	install -d -m 0755 $(BINDIR); \
	ln -sfn $(PYCRI_HOME)/bin/pycri $(BINDIR)/pycri; \
	install -d -m 0755 $(SYSCONFDIR); \
	if [ -e $(SYSCONFDIR)/pycri.toml ]; then echo "keeping $(SYSCONFDIR)/pycri.toml"; \
	else install -m 0644 manifests/pycri.toml $(SYSCONFDIR)/pycri.toml; fi; \
	if [ -e $(CRICTL_CONFIG) ]; then echo "keeping $(CRICTL_CONFIG)"; \
	else install -D -m 0644 manifests/crictl.yaml $(CRICTL_CONFIG); fi; \
	install -D -m 0644 manifests/pycri.service $(UNITDIR)/pycri.service; \
	install -D -m 0644 manifests/90-pycri-veth.link $(NETWORKDIR)/90-pycri-veth.link; \
	if [ -d /run/udev ] && command -v udevadm >/dev/null; then udevadm control --reload || true; fi; \
	if [ -z "$(SKIP_MODULES)" ]; then \
		install -d -m 0755 $(MODULESLOADDIR); echo overlay > $(MODULESLOADDIR)/pycri.conf; \
		grep -qw overlay /proc/filesystems || modprobe overlay || echo "could not load overlay: pycri check will say why"; \
	fi; \
	if [ -d /run/systemd/system ] && [ "$(UNITDIR)" = /etc/systemd/system ]; then \
		systemctl daemon-reload; systemctl enable pycri.service; \
		echo "enabled pycri.service: systemctl start pycri"; \
	else echo "systemd is not running here: start pycri with $(BINDIR)/pycri serve"; fi; \
	echo "installed; run $(BINDIR)/pycri check"

# Reverses install. Keeps $(DATADIR) (images, layers) and an edited pycri.toml unless PURGE=1.
# Debian packages stay: other software may use them.
uninstall:
	@set -e; \
	if [ -d /run/systemd/system ] && [ "$(UNITDIR)" = /etc/systemd/system ] && [ -e $(UNITDIR)/pycri.service ]; then \
		systemctl disable --now pycri.service || true; fi; \
	rm -f $(UNITDIR)/pycri.service $(MODULESLOADDIR)/pycri.conf $(NETWORKDIR)/90-pycri-veth.link; \
	if [ -d /run/udev ] && command -v udevadm >/dev/null; then udevadm control --reload || true; fi; \
	if [ -d /run/systemd/system ] && [ "$(UNITDIR)" = /etc/systemd/system ]; then systemctl daemon-reload; fi; \
	if [ -L $(BINDIR)/pycri ] && [ "$$(readlink $(BINDIR)/pycri)" = "$(PYCRI_HOME)/bin/pycri" ]; then \
		rm -f $(BINDIR)/pycri; fi; \
	rm -rf $(PYCRI_HOME); \
	if [ -e $(CRICTL_CONFIG) ] && { [ -n "$(PURGE)" ] || cmp -s manifests/crictl.yaml $(CRICTL_CONFIG); }; then \
		rm -f $(CRICTL_CONFIG); fi; \
	if [ -e $(SYSCONFDIR)/pycri.toml ]; then \
		if [ -n "$(PURGE)" ] || cmp -s manifests/pycri.toml $(SYSCONFDIR)/pycri.toml; then rm -f $(SYSCONFDIR)/pycri.toml; \
		else echo "keeping the edited $(SYSCONFDIR)/pycri.toml (PURGE=1 removes it)"; fi; fi; \
	rmdir $(SYSCONFDIR) 2>/dev/null || true; \
	if [ -n "$(PURGE)" ]; then rm -rf $(DATADIR); \
	elif [ -e $(DATADIR) ]; then echo "keeping $(DATADIR) (PURGE=1 removes it)"; fi; \
	echo "uninstalled"

# The node preflight, from this tree's venv (an installed pycri: pycri check).
check: $(VENV)/.installed
	$(VENV)/bin/pycri check $(CHECK_ARGS)

# --- full-system tests in a VM (see vm/README.md) -----------------------------------------
# `make vm-test` builds (once; cached under VM_CACHE) a Debian bookworm guest that boots systemd on
# cgroup v2 only, boots it under qemu (TCG) with this tree on a second disk, runs vm/guest-test in it
# (make install, systemctl start pycri, the CRI checks, make uninstall) and reports. Not part of `make test`.
ARCH ?= amd64
VM_CACHE ?= /var/cache/pycri-vm
VM_PACKAGES := debootstrap qemu-system-x86 qemu-utils e2fsprogs python3 python3-venv
# s390x: qemu-system-s390x, and qemu-user (binfmt_misc) for debootstrap's second stage and apt in the chroot.
VM_PACKAGES_s390x := debootstrap qemu-system-misc qemu-user-static binfmt-support qemu-utils e2fsprogs python3 python3-venv busybox-static

.PHONY: vm-deps vm-image vm-test vm-clean

vm-deps:
	@case "$(ARCH)" in amd64|s390x) ;; *) echo "ARCH=$(ARCH): unknown; the VM test knows amd64 and s390x" >&2; exit 2;; esac
	@missing=""; for p in $(if $(filter s390x,$(ARCH)),$(VM_PACKAGES_s390x),$(VM_PACKAGES)); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@if [ "$(ARCH)" = s390x ]; then \
		[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; \
		update-binfmts --enable qemu-s390x 2>/dev/null || true; \
		grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-s390x || { echo "qemu-s390x is not registered in binfmt_misc" >&2; exit 2; }; \
	fi

# The cached guest image alone (debootstrap + packages + kernel + initramfs).
vm-image: vm-deps
	ARCH=$(ARCH) VM_CACHE=$(VM_CACHE) vm/build-guest

vm-test: vm-deps
	ARCH=$(ARCH) VM_CACHE=$(VM_CACHE) vm/run-guest

vm-clean:
	rm -rf $(VM_CACHE)
