"""Pods and containers as pycri records them: domain objects, kept in memory and in SQLite.

Every change is committed before the RPC that made it returns. Reads (List*, *Status) come
from memory; kubelet polls them every second.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    config: bytes  # the serialized PodSandboxConfig, for status and for containers
    state: SandboxState = "ready"
    hostname: str = ""
    log_directory: str = ""
    cgroup_path: str = ""  # the pod cgroup (cgroupfs path)
    cgroup_created: list[str] = field(default_factory=list)  # directories pycri made, to remove
    network_mode: int = 0  # NamespaceMode values, as asked
    pid_mode: int = 0
    ipc_mode: int = 0
    netns_path: str = ""
    ipcns_path: str = ""
    utsns_path: str = ""
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
    config: bytes  # the serialized ContainerConfig
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
    dir: str = ""  # persistent: upper, work
    bundle: str = ""
    stop_signal: str = ""
    user: list[int] = field(default_factory=list)  # uid, gid, *supplemental
    mounts: list[dict[str, Any]] = field(default_factory=list)
    pending: Pending = ""


def _encode(obj: Sandbox | Container) -> str:
    doc = dataclasses.asdict(obj)
    doc["config"] = base64.b64encode(obj.config).decode()
    return json.dumps(doc)


def _decode(cls: type, text: str) -> Any:
    doc = json.loads(text)
    doc["config"] = base64.b64decode(doc["config"])
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in doc.items() if k in known})


class StateDB:
    """Rows of JSON documents keyed by (kind, id), in the runtime's SQLite file."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS runtime_objects ("
                " kind TEXT NOT NULL, id TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (kind, id))"
            )

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
