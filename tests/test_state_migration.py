"""The state DB of an older pycri (configs as base64 of the serialized CRI protobuf, no schema
version) is converted at start-up into pycri's own JSON records, in one transaction, and a daemon
started on it answers for those pods and containers as before."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest

from cri_runtime import model
from cri_runtime.api import api_pb2 as pb
from cri_runtime.cri import convert
from cri_runtime.errors import FailedPrecondition
from cri_runtime.runtime.state import SCHEMA_VERSION, LegacyConfigs, StateDB
from tests.support.daemon import Daemon

POD_ID = "a" * 64
CONTAINER_ID = "b" * 64
LEGACY = LegacyConfigs(sandbox=convert.legacy_sandbox_config, container=convert.legacy_container_config)


def pod_config() -> pb.PodSandboxConfig:
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="web", uid="uid-1", namespace="shop", attempt=2),
        hostname="web-0",
        log_directory="/var/log/pods/shop_web_uid-1",
        dns_config=pb.DNSConfig(servers=["198.18.0.53"], searches=["shop.svc"], options=["ndots:5"]),
        port_mappings=[pb.PortMapping(protocol=pb.Protocol.UDP, container_port=53, host_port=5353)],
        labels={"app": "web"},
        annotations={"note": "old"},
    )
    linux = config.linux
    linux.cgroup_parent = "/kubepods/pod-uid-1"
    linux.sysctls["net.ipv4.ip_unprivileged_port_start"] = "0"
    linux.resources.cpu_shares = 512
    linux.resources.memory_limit_in_bytes = 256 * 1024 * 1024
    linux.overhead.memory_limit_in_bytes = 16 * 1024 * 1024
    security = linux.security_context
    security.namespace_options.pid = pb.NamespaceMode.POD
    security.namespace_options.network = pb.NamespaceMode.NODE
    security.run_as_user.value = 1000
    security.supplemental_groups.extend([44, 50])
    security.seccomp.profile_type = pb.SecurityProfile.ProfileType.RuntimeDefault
    return config


def container_config() -> pb.ContainerConfig:
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="app", attempt=1),
        image=pb.ImageSpec(image="registry.test/app:1"),
        command=["/bin/sh", "-c"],
        args=["sleep 1000"],
        working_dir="/srv",
        envs=[pb.KeyValue(key="MODE", value=b"prod")],
        mounts=[
            pb.Mount(
                container_path="/data",
                host_path="/srv/data",
                readonly=True,
                propagation=pb.MountPropagation.PROPAGATION_HOST_TO_CONTAINER,
            )
        ],
        devices=[pb.Device(container_path="/dev/fuse", host_path="/dev/fuse", permissions="rw")],
        labels={"io.kubernetes.container.name": "app"},
        annotations={"restart": "3"},
        log_path="app/1.log",
        tty=True,
        stdin=True,
    )
    resources = config.linux.resources
    resources.cpu_quota = 50_000
    resources.cpu_period = 100_000
    resources.memory_limit_in_bytes = 64 * 1024 * 1024
    resources.oom_score_adj = 500
    resources.hugepage_limits.add(page_size="2MB", limit=0)
    resources.unified["memory.high"] = "50000000"
    security = config.linux.security_context
    security.capabilities.add_capabilities.append("NET_ADMIN")
    security.capabilities.drop_capabilities.append("MKNOD")
    security.run_as_user.value = 1000
    security.run_as_group.value = 1000
    security.readonly_rootfs = True
    security.no_new_privs = True
    security.masked_paths.append("/proc/kcore")
    security.seccomp.profile_type = pb.SecurityProfile.ProfileType.Localhost
    security.seccomp.localhost_ref = "/etc/seccomp/app.json"
    security.supplemental_groups_policy = pb.SupplementalGroupsPolicy.Strict
    return config


def old_sandbox_doc(state: Path, config: pb.PodSandboxConfig, **changes: Any) -> dict[str, Any]:
    """A Sandbox row exactly as pycri wrote it before the schema was versioned."""
    doc = {
        "id": POD_ID,
        "name": "web",
        "namespace": "shop",
        "uid": "uid-1",
        "attempt": 2,
        "labels": {"app": "web"},
        "annotations": {"note": "old"},
        "runtime_handler": "",
        "created_at_ns": 1_700_000_000_000_000_000,
        "config": base64.b64encode(config.SerializeToString()).decode(),
        "state": "notready",
        "hostname": "web-0",
        "log_directory": "/var/log/pods/shop_web_uid-1",
        "cgroup_path": "",
        "cgroup_created": [],
        "network_mode": 2,
        "pid_mode": 0,
        "ipc_mode": 0,
        "netns_path": "",
        "ipcns_path": "",
        "utsns_path": "",
        "init_pid": 0,
        "ip": "",
        "additional_ips": [],
        "network_ready": False,
        "shm_path": "",
        "dir": str(state / "sandboxes" / POD_ID),
        "pending": "",
    }
    doc.update(changes)
    return doc


def old_container_doc(root: Path, state: Path, config: pb.ContainerConfig) -> dict[str, Any]:
    return {
        "id": CONTAINER_ID,
        "pod_id": POD_ID,
        "name": "app",
        "attempt": 1,
        "labels": {"io.kubernetes.container.name": "app"},
        "annotations": {"restart": "3"},
        "image": "registry.test/app:1",
        "image_id": "c" * 64,
        "image_ref": "registry.test/app@sha256:" + "d" * 64,
        "created_at_ns": 1_700_000_001_000_000_000,
        "config": base64.b64encode(config.SerializeToString()).decode(),
        "log_path": "/var/log/pods/shop_web_uid-1/app/1.log",
        "runtime": "runc",
        "state": "exited",
        "started_at_ns": 1_700_000_002_000_000_000,
        "finished_at_ns": 1_700_000_003_000_000_000,
        "exit_code": 3,
        "reason": "Error",
        "message": "",
        "pid": 0,
        "layers": [],
        "rootfs": str(state / "containers" / CONTAINER_ID / "rootfs"),
        "dir": str(root / "containers" / CONTAINER_ID),
        "bundle": str(state / "containers" / CONTAINER_ID),
        "stop_signal": "SIGQUIT",
        "user": [1000, 1000, 1000],
        "mounts": [{"container_path": "/data", "host_path": "/srv/data", "readonly": True, "propagation": 1}],
        "pending": "",
    }


def write_old_db(path: Path, *docs: tuple[str, dict[str, Any]]) -> None:
    """The table and rows as the old StateDB made them (no user_version)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS runtime_objects ("
            " kind TEXT NOT NULL, id TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (kind, id))"
        )
        for kind, doc in docs:
            conn.execute(
                "INSERT INTO runtime_objects (kind, id, doc) VALUES (?, ?, ?)",
                (kind, doc["id"], json.dumps(doc)),
            )
    conn.close()


def test_old_rows_are_migrated_to_json_records_with_the_same_configs(tmp_path: Path) -> None:
    root, state = tmp_path / "root", tmp_path / "state"
    db_path = root / "runtime.db"
    write_old_db(
        db_path,
        ("sandbox", old_sandbox_doc(state, pod_config())),
        ("container", old_container_doc(root, state, container_config())),
    )

    db = StateDB(db_path, LEGACY)
    [sandbox], [container] = db.load()
    db.close()

    assert sandbox.config == convert.pod_sandbox_config(pod_config())
    assert container.config == convert.container_config(container_config())
    # The converted records say what the protobuf said, field by field where it matters.
    pod = sandbox.config
    assert pod.metadata == model.PodMetadata(name="web", uid="uid-1", namespace="shop", attempt=2)
    assert pod.security.namespace_options.network == "node"
    assert pod.security.namespace_options.pid == "pod"
    assert pod.security.run_as_user == 1000 and pod.security.run_as_group is None
    assert pod.security.seccomp == model.SecurityProfile("runtime_default", "")
    assert pod.port_mappings == (model.PortMapping("udp", 53, 5353, ""),)
    assert pod.resources is not None and pod.resources.memory_limit_in_bytes == 256 * 1024 * 1024
    assert pod.overhead is not None and pod.overhead.memory_limit_in_bytes == 16 * 1024 * 1024
    assert pod.sysctls == {"net.ipv4.ip_unprivileged_port_start": "0"}
    ctr = container.config
    assert ctr.mounts == (
        model.Mount(
            container_path="/data", host_path="/srv/data", readonly=True, propagation="host_to_container"
        ),
    )
    assert ctr.envs == (model.EnvVar("MODE", "prod"),)
    assert ctr.tty and ctr.stdin and not ctr.stdin_once
    assert ctr.resources is not None
    assert (ctr.resources.cpu_quota, ctr.resources.memory_limit_in_bytes) == (50_000, 64 * 1024 * 1024)
    assert ctr.resources.hugepage_limits == (model.HugepageLimit("2MB", 0),)
    assert ctr.resources.unified == {"memory.high": "50000000"}
    assert ctr.security.capabilities == model.Capabilities(add=("NET_ADMIN",), drop=("MKNOD",))
    assert ctr.security.seccomp == model.SecurityProfile("localhost", "/etc/seccomp/app.json")
    assert ctr.security.supplemental_groups_policy == "strict"
    assert ctr.security.readonly_rootfs and ctr.security.no_new_privs
    # The rest of the records is kept; the bundle's parent is now called what it is.
    assert container.run_dir == str(state / "containers" / CONTAINER_ID)
    assert container.bundle_dir == state / "containers" / CONTAINER_ID / "bundle"
    assert (container.exit_code, container.stop_signal, container.user) == (3, "SIGQUIT", [1000, 1000, 1000])
    assert (sandbox.hostname, sandbox.created_at_ns) == ("web-0", 1_700_000_000_000_000_000)

    # On disk: versioned, plain JSON (no protobuf bytes), the old keys gone.
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        docs = {kind: json.loads(doc) for kind, doc in conn.execute("SELECT kind, doc FROM runtime_objects")}
    conn.close()
    assert docs["sandbox"]["config"]["metadata"]["name"] == "web"
    assert docs["container"]["config"]["mounts"][0]["propagation"] == "host_to_container"
    assert "bundle" not in docs["container"] and "mounts" not in docs["container"]
    assert "network_mode" not in docs["sandbox"]

    # Opening again changes nothing, and needs no reader of the old format.
    again = StateDB(db_path)
    assert again.load() == ([sandbox], [container])
    again.close()


def test_old_db_without_a_reader_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    db_path = tmp_path / "runtime.db"
    old = old_sandbox_doc(tmp_path, pod_config())
    write_old_db(db_path, ("sandbox", old))
    with pytest.raises(FailedPrecondition, match="schema 0"):
        StateDB(db_path)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        assert json.loads(conn.execute("SELECT doc FROM runtime_objects").fetchone()[0]) == old
    conn.close()


def test_a_migration_that_fails_half_way_changes_no_row(tmp_path: Path) -> None:
    db_path = tmp_path / "runtime.db"
    good = old_sandbox_doc(tmp_path, pod_config())
    broken = {**old_sandbox_doc(tmp_path, pod_config()), "id": "e" * 64, "config": "not base64!"}
    write_old_db(db_path, ("sandbox", good), ("sandbox", broken))
    with pytest.raises(Exception, match="cannot be read"):
        StateDB(db_path, LEGACY)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        docs = [json.loads(doc) for (doc,) in conn.execute("SELECT doc FROM runtime_objects ORDER BY id")]
    conn.close()
    assert docs == [good, broken]


def test_a_db_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db_path = tmp_path / "runtime.db"
    StateDB(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(FailedPrecondition, match="newer"):
        StateDB(db_path)


@pytest.mark.root
def test_daemon_started_on_an_old_state_db_serves_its_pods_and_containers(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "pycri", 'default_runtime = "runc"\n')
    daemon.workdir.mkdir()
    write_old_db(
        daemon.root / "runtime.db",
        ("sandbox", old_sandbox_doc(daemon.state, pod_config())),
        ("container", old_container_doc(daemon.root, daemon.state, container_config())),
    )
    daemon.start()
    try:
        with daemon.client() as cri:
            pod = cri.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=POD_ID), timeout=10)
            assert pod.status.metadata == pod_config().metadata
            assert pod.status.state == pb.PodSandboxState.SANDBOX_NOTREADY
            assert (
                pod.status.linux.namespaces.options == pod_config().linux.security_context.namespace_options
            )
            assert dict(pod.status.labels) == {"app": "web"}
            assert [c.id for c in pod.containers_statuses] == [CONTAINER_ID]

            found = cri.runtime.ContainerStatus(
                pb.ContainerStatusRequest(container_id=CONTAINER_ID), timeout=10
            )
            status = found.status
            assert status.state == pb.ContainerState.CONTAINER_EXITED
            assert status.exit_code == 3
            assert list(status.mounts) == list(container_config().mounts)
            assert status.resources.linux == container_config().linux.resources
            assert status.metadata == container_config().metadata
            assert status.log_path == "/var/log/pods/shop_web_uid-1/app/1.log"
            assert list(status.user.linux.supplemental_groups) == [1000]

            cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=POD_ID), timeout=30)
            listed = cri.runtime.ListContainers(pb.ListContainersRequest(), timeout=10)
            assert list(listed.containers) == []
            with pytest.raises(grpc.RpcError) as gone:
                cri.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=POD_ID), timeout=10)
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        daemon.stop()
