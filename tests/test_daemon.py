"""The daemon itself: socket handling, Version/Status/RuntimeConfig, unimplemented RPCs, shutdown."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from cri_runtime.api import api_pb2 as pb
from cri_runtime.daemon.client import CRIClient
from tests.support.daemon import TEST_CGROUP_DRIVER, Daemon
from tests.support.wait import wait_for

pytestmark = pytest.mark.root


def test_version_names_pycri_and_api_v1(cri: CRIClient) -> None:
    version = cri.version()
    assert version.runtime_name == "pycri"
    assert version.runtime_api_version == "v1"
    assert version.runtime_version == "0.1.0"


def test_socket_is_owner_and_group_only(daemon: Daemon) -> None:
    mode = daemon.socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


def test_status_reports_runtime_and_network_conditions(cri: CRIClient) -> None:
    status = cri.status(verbose=True)
    conditions = {c.type: c for c in status.status.conditions}
    assert conditions["RuntimeReady"].status is True
    assert "NetworkReady" in conditions
    handlers = {h.name: h for h in status.runtime_handlers}
    assert "" in handlers and "runc" in handlers
    assert handlers["runc"].features.recursive_read_only_mounts is True
    # The test's root (ext4 or tmpfs) takes idmapped mounts: runc can run user-namespace pods.
    assert handlers["runc"].features.user_namespaces is True
    info = json.loads(status.info["config"])
    assert info["defaultRuntime"] in ("crun", "runc")
    assert info["runtimes"]["runc"]["usable"] is True
    if not info["runtimes"]["crun"]["usable"]:
        # The reason says why, and pycri fell back to runc.
        assert "cgroup" in info["runtimes"]["crun"]["reason"]
        assert info["defaultRuntime"] == "runc"


def test_runtime_config_reports_cgroupfs_explicitly(cri: CRIClient) -> None:
    # CGROUPFS must be on the wire: an empty answer means SYSTEMD (enum value 0) to kubelet.
    # (Under PYCRI_TEST_CGROUP_DRIVER=systemd, the VM guest's, the daemon runs that driver.)
    config = cri.runtime_config()
    assert config.HasField("linux")
    expected = pb.CgroupDriver.SYSTEMD if TEST_CGROUP_DRIVER == "systemd" else pb.CgroupDriver.CGROUPFS
    assert config.linux.cgroup_driver == expected


def test_unimplemented_rpc_answers_unimplemented_with_its_name(cri: CRIClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        cri.runtime.CheckpointPod(pb.CheckpointPodRequest(pod_sandbox_id="x"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CheckpointPod" in (err.value.details() or "")
    # The daemon keeps serving.
    assert cri.version().runtime_name == "pycri"


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    workdir = tmp_path / "d"
    workdir.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(workdir / "pycri.sock"))
    stale.close()  # the file stays, nobody listens
    daemon = Daemon(workdir).start()
    try:
        with daemon.client() as client:
            assert client.version().runtime_name == "pycri"
    finally:
        daemon.stop()


def test_live_socket_is_refused_with_a_clear_error(daemon: Daemon, tmp_path: Path) -> None:
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "cri_runtime.daemon.cli",
            "serve",
            "--socket",
            str(daemon.socket),
            "--root",
            str(tmp_path / "r2"),
            "--state",
            str(tmp_path / "s2"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode != 0
    assert "another server is listening" in second.stderr
    with daemon.client() as client:
        assert client.version().runtime_name == "pycri"


def test_sigterm_shuts_down_cleanly_and_removes_the_socket(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(name="term")
    assert daemon.stop() == 0
    assert not daemon.socket.exists()
    assert "stopped" in daemon.log_tail()


def test_every_rpc_is_logged_with_method_and_status(daemon: Daemon) -> None:
    with daemon.client() as client:
        client.version()
        with pytest.raises(grpc.RpcError):
            client.runtime.CheckpointPod(pb.CheckpointPodRequest(pod_sandbox_id="abc"), timeout=5)

    def logged_rpcs() -> list[dict]:
        """The rpc events in the daemon's log, once the failed call's is among them."""
        lines = daemon.log_path.read_text().splitlines()
        rpcs = [
            e for e in (json.loads(line) for line in lines if line.startswith("{")) if e.get("event") == "rpc"
        ]
        return rpcs if any(e["method"].endswith("/CheckpointPod") for e in rpcs) else []

    # The event is written as the call completes, which may be just after the client has its answer.
    rpcs = wait_for(logged_rpcs)
    failed = [e for e in rpcs if e["method"].endswith("/CheckpointPod")]
    assert any(e["method"].endswith("/Version") and e["code"] == "OK" and "ms" in e for e in rpcs)
    assert failed and failed[0]["code"] == "UNIMPLEMENTED" and failed[0]["pod_sandbox_id"] == "abc"


def test_config_command_layers_file_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "pycri.toml"
    config.write_text(
        'root = "/srv/pycri"\nlog_level = "warning"\n\n[image]\nmax_concurrent_downloads = 5\n\n'
        '[registries."registry.k8s.io"]\nmirrors = ["http://127.0.0.1:5000"]\n'
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cri_runtime.daemon.cli",
            "config",
            "--config",
            str(config),
            "--log-level",
            "debug",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'root = "/srv/pycri"' in out
    assert 'log_level = "debug"' in out  # the flag beats the file
    assert "max_concurrent_downloads = 5" in out
    assert 'mirrors = ["http://127.0.0.1:5000"]' in out


def test_config_command_output_loads_back_as_the_same_config(tmp_path: Path) -> None:
    config = tmp_path / "pycri.toml"
    config.write_text(
        '[streaming]\nport = 10010\n\n[network]\npod_subnet = "198.18.130.0/24"\n\n'
        '[registries."registry.k8s.io"]\nmirrors = ["http://127.0.0.1:5000"]\n'
    )

    def effective(path: Path) -> str:
        return subprocess.run(
            [sys.executable, "-m", "cri_runtime.daemon.cli", "config", "--config", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    printed = effective(config)
    assert "[streaming]\n" in printed and "port = 10010" in printed
    again = tmp_path / "again.toml"
    again.write_text(printed)
    assert effective(again) == printed


def test_bad_config_is_refused_with_the_key_named(tmp_path: Path) -> None:
    config = tmp_path / "pycri.toml"
    config.write_text("[image]\nmax_concurent_downloads = 5\n")
    out = subprocess.run(
        [sys.executable, "-m", "cri_runtime.daemon.cli", "config", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "max_concurent_downloads" in out.stderr


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="this host runs systemd")
def test_systemd_cgroup_driver_without_systemd_is_refused_at_start(tmp_path: Path) -> None:
    config = tmp_path / "pycri.toml"
    config.write_text('cgroup_driver = "systemd"\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cri_runtime.daemon.cli",
            "serve",
            "--config",
            str(config),
            "--socket",
            str(tmp_path / "s.sock"),
            "--root",
            str(tmp_path / "root"),
            "--state",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert 'cgroup_driver = "systemd" but systemd is not running here' in result.stderr
    assert 'set cgroup_driver = "cgroupfs"' in result.stderr
    # Refused before anything is made.
    assert not (tmp_path / "s.sock").exists() and not (tmp_path / "state").exists()
    assert not (tmp_path / "s.sock").exists()
