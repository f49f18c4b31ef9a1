"""Pods and containers as pycri records them: domain objects, kept in memory and in SQLite.

Every change is committed before the RPC that made it returns. Reads (List*, *Status) come
from memory; kubelet polls them every second.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog

from cri_runtime.errors import DataLoss, FailedPrecondition
from cri_runtime.model import ContainerConfig, PodSandboxConfig, from_json, to_json

log = structlog.get_logger("pycri.state")

# user_version of the SQLite file. 0: rows written before pycri versioned its DB, whose config is
# the serialized protobuf of the CRI request (base64); 1: configs as pycri's own JSON records.
SCHEMA_VERSION = 1

SandboxState = Literal["ready", "notready"]
ContainerState = Literal["created", "running", "exited", "unknown"]
# An operation that changes the host in several steps is recorded before its first step and
# cleared after its last: a record still pending at start-up was cut short by a crash, and is
# finished ("stopping", "removing") or undone ("creating") before pycri serves.
Pending = Literal["", "creating", "stopping", "removing"]


@dataclass
class Sandbox:
    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    labels: dict[str, str]
    annotations: dict[str, str]
    runtime_handler: str
    created_at_ns: int
    config: PodSandboxConfig  # as asked, for status and for the pod's containers
    state: SandboxState = "ready"
    hostname: str = ""
    log_directory: str = ""
    cgroup_path: str = ""  # the pod cgroup (cgroupfs path)
    cgroup_created: list[str] = field(default_factory=list)  # directories pycri made, to remove
    netns_path: str = ""
    ipcns_path: str = ""
    utsns_path: str = ""
    userns_path: str = ""  # the pod's pinned user namespace (userns mode POD); "" for the host's
    init_pid: int = 0  # catatonit holding the pod's PID namespace (pid mode POD)
    ip: str = ""
    additional_ips: list[str] = field(default_factory=list)
    network_ready: bool = False  # CNI ADD done and not yet deleted
    shm_path: str = ""
    dir: str = ""
    pending: Pending = ""


@dataclass
class Container:
    id: str
    pod_id: str
    name: str
    attempt: int
    labels: dict[str, str]
    annotations: dict[str, str]
    image: str  # as the caller named it
    image_id: str
    image_ref: str  # repo digest when known, else the image ID
    created_at_ns: int
    config: ContainerConfig  # as asked; UpdateContainerResources replaces its resources
    log_path: str
    runtime: str
    state: ContainerState = "created"
    started_at_ns: int = 0
    finished_at_ns: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    pid: int = 0
    layers: list[str] = field(default_factory=list)  # chain ids held in the image store
    rootfs: str = ""
    dir: str = ""  # persistent (<root>/containers/<id>): upper, work
    # Volatile (<state>/containers/<id>): the rootfs mount point and the OCI bundle directory.
    run_dir: str = ""
    stop_signal: str = ""
    user: list[int] = field(default_factory=list)  # uid, gid, *supplemental
    # Image volumes: container path -> the ID of the image mounted there.
    image_volumes: dict[str, str] = field(default_factory=dict)
    pending: Pending = ""

    @property
    def bundle_dir(self) -> Path:
        """The OCI bundle: config.json, as the runtime got it and as updates changed it."""
        return Path(self.run_dir) / "bundle"


def _encode(obj: Sandbox | Container) -> str:
    return json.dumps(to_json(obj))


def _decode(cls: type[Sandbox] | type[Container], text: str) -> Any:
    return from_json(cls, json.loads(text))


@dataclass(frozen=True)
class LegacyConfigs:
    """Readers of the serialized protobuf configs of a version-0 DB. The runtime does not know
    the CRI schema; the daemon passes these in from cri_runtime.cri.convert."""

    sandbox: Callable[[bytes], PodSandboxConfig]
    container: Callable[[bytes], ContainerConfig]


def _migrate_doc(kind: str, text: str, legacy: LegacyConfigs) -> str:
    doc = json.loads(text)
    raw = doc.get("config")
    if isinstance(raw, str):
        try:
            data = base64.b64decode(raw, validate=True)
            config: Any = legacy.sandbox(data) if kind == "sandbox" else legacy.container(data)
        except (binascii.Error, ValueError) as exc:
            raise DataLoss(f"state DB: the config of {kind} {doc.get('id')} cannot be read: {exc}") from exc
        doc["config"] = to_json(config)
    if kind == "sandbox":
        for gone in ("network_mode", "pid_mode", "ipc_mode"):  # in the config now
            doc.pop(gone, None)
    else:
        if "bundle" in doc:
            doc["run_dir"] = doc.pop("bundle")
        doc.pop("mounts", None)  # in the config now
    # Through the record type, so that a migrated row is exactly what this version writes.
    return _encode(_decode(Sandbox if kind == "sandbox" else Container, json.dumps(doc)))


class StateDB:
    """Rows of JSON documents keyed by (kind, id), in the runtime's SQLite file.

    Opening a DB written by an older pycri converts its rows, in one transaction, to the current
    schema (``PRAGMA user_version``); ``legacy`` reads what only the CRI schema can.
    """

    def __init__(self, path: Path, legacy: LegacyConfigs | None = None) -> None:
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS runtime_objects ("
                " kind TEXT NOT NULL, id TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (kind, id))"
            )
            self._upgrade(legacy)

    def _upgrade(self, legacy: LegacyConfigs | None) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"the state DB is of schema {version}, newer than this pycri's {SCHEMA_VERSION}"
                )
            if version == 0:
                rows = conn.execute("SELECT kind, id, doc FROM runtime_objects").fetchall()
                if rows and legacy is None:
                    raise FailedPrecondition(
                        "the state DB is of schema 0 and no reader of its configs was given"
                    )
                for kind, object_id, doc in rows:
                    assert legacy is not None
                    conn.execute(
                        "UPDATE runtime_objects SET doc = ? WHERE kind = ? AND id = ?",
                        (_migrate_doc(kind, doc, legacy), kind, object_id),
                    )
                if rows:
                    log.info("state DB migrated", from_version=0, to_version=SCHEMA_VERSION, rows=len(rows))
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def save(self, obj: Sandbox | Container) -> None:
        kind = "sandbox" if isinstance(obj, Sandbox) else "container"
        doc = _encode(obj)
        with self._lock:
            self._conn.execute(
                "INSERT INTO runtime_objects (kind, id, doc) VALUES (?, ?, ?) "
                "ON CONFLICT(kind, id) DO UPDATE SET doc = excluded.doc",
                (kind, obj.id, doc),
            )

    def delete(self, obj: Sandbox | Container) -> None:
        kind = "sandbox" if isinstance(obj, Sandbox) else "container"
        with self._lock:
            self._conn.execute("DELETE FROM runtime_objects WHERE kind = ? AND id = ?", (kind, obj.id))

    def load(self) -> tuple[list[Sandbox], list[Container]]:
        with self._lock:
            rows = self._conn.execute("SELECT kind, doc FROM runtime_objects").fetchall()
        sandboxes = [_decode(Sandbox, doc) for kind, doc in rows if kind == "sandbox"]
        containers = [_decode(Container, doc) for kind, doc in rows if kind == "container"]
        return sandboxes, containers
