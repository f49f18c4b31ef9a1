"""Shared fixtures: a real pycri daemon and a real registry on 127.0.0.1, and the pod
environment (a daemon with CNI and the test image pulled) for runc and for crun."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri_runtime.daemon.client import CRIClient
from cri_runtime.oci import runtimes as oci_runtimes
from tests.support.daemon import Daemon
from tests.support.images import Image, busybox_layer, layer_from_files, push_image
from tests.support.pods import RUNTIMES, Env, daemon_env
from tests.support.registry import Registry, start_registry


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root: real mounts, devices and registry")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: needs root privileges")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[object]:
    started: list[Daemon] = []

    def make(config_text: str = "", name: str = "pycri") -> Daemon:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        daemon = Daemon(workdir, config_text).start()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(daemon_factory) -> Daemon:  # type: ignore[no-untyped-def]
    return daemon_factory()


@pytest.fixture
def cri(daemon: Daemon) -> Iterator[CRIClient]:
    with daemon.client() as client:
        yield client


@pytest.fixture(scope="module")
def pod_image(registry: Registry) -> str:
    extra = layer_from_files([("www/index.html", "hello from the pod\n"), ("data/", "")])
    image = Image.build([busybox_layer(), extra], cmd=["sh"], env=["PATH=/bin:/usr/bin", "FROM_IMAGE=yes"])
    push_image(registry, "test/pods", "1", image)
    return f"{registry.host}/test/pods:1"


@pytest.fixture(params=RUNTIMES)
def env(request: pytest.FixtureRequest, daemon_factory, pod_image: str, tmp_path: Path) -> Iterator[Env]:  # type: ignore[no-untyped-def]
    """A daemon on its own bridge and subnet, the test image pulled; afterwards the host must hold
    nothing of it: no process, mount, bridge port or cgroup."""
    runtime = request.param
    if runtime == "crun" and not oci_runtimes.probe("crun").usable:
        pytest.skip(f"crun cannot run here: {oci_runtimes.probe('crun').reason}")
    third = 100 + RUNTIMES.index(runtime)
    bridge = f"pyt{secrets.token_hex(3)}"
    net_dir = tmp_path / "net.d"
    net_dir.mkdir()
    daemon = daemon_factory(
        f'default_runtime = "{runtime}"\n[network]\nconf_dir = "{net_dir}"\n'
        f'pod_subnet = "198.18.{third}.0/24"\nbridge = "{bridge}"\n',
        name=f"pods-{runtime}",
    )
    yield from daemon_env(daemon, pod_image, tmp_path / "logs", f"198.18.{third}.", bridge)
