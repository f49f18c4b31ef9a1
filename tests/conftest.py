"""Shared fixtures: a real pycri daemon and a real registry on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri_runtime.daemon.client import CRIClient
from tests.support.daemon import Daemon
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
