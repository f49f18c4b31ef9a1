"""Start-up sweep: collect what a crashed pycri left on the host that no record owns.

After the managers have finished or undone their pending records (state.Pending), every pod and
container pycri knows is in the state DB. Anything else under pycri's own directories, cgroups
and processes belongs to an object that died with a crash: a conmon whose container record was
never committed (or already deleted), a pod init, an overlay or netns pin, a CNI attachment, a
cgroup. The sweep is driven by IDs, so it needs no memory of what the crashed run was doing.

Only what is provably pycri's is touched: processes whose argv or environment names pycri's state
directory, mounts and directories under it, cgroups under pycri's default parent or below a
known pod's cgroup.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from cri_runtime.host import cgroups, mounts
from cri_runtime.network.cni import CNI
from cri_runtime.oci.conmon import Executor

log = structlog.get_logger("pycri.recovery")

_OBJECT_ID = re.compile(r"[0-9a-f]{64}")


@dataclass
class Known:
    """What the state DB holds after the pending records were resolved."""

    sandboxes: set[str]
    containers: set[str]
    pod_cgroups: list[str]  # cgroup paths of known pods, whose children are containers


@dataclass
class Swept:
    """What the sweep collected, for the log and for tests."""

    conmons: list[str] = field(default_factory=list)
    inits: list[int] = field(default_factory=list)
    runtime_states: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)

    def total(self) -> int:
        return sum(
            len(x)
            for x in (
                self.conmons,
                self.inits,
                self.runtime_states,
                self.networks,
                self.directories,
                self.cgroups,
            )
        )


def _processes() -> list[tuple[int, list[bytes], bytes]]:
    """(pid, argv, environ) of live processes named conmon or catatonit: the only kinds pycri
    leaves running on its own."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm", "rb") as fh:
                comm = fh.read().strip()
            if comm not in (b"conmon", b"catatonit"):
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
            environ = b""
            if comm == b"catatonit":
                with open(f"/proc/{entry.name}/environ", "rb") as fh:
                    environ = fh.read()
        except OSError:
            continue
        if argv and argv[0]:  # a zombie has no argv: dead already
            found.append((int(entry.name), argv, environ))
    return found


def _argv_value(argv: list[bytes], flag: bytes) -> str | None:
    for i in range(len(argv) - 1):
        if argv[i] == flag:
            return argv[i + 1].decode(errors="replace")
    return None


def sweep(
    state_dir: Path,
    root_dir: Path,
    executors: dict[str, Executor],
    cni: CNI,
    known: Known,
    default_cgroup_parent: str,
) -> Swept:
    swept = Swept()
    sandboxes_dir = state_dir / "sandboxes"
    # 1. Processes: orphaned conmons (their containers), pod inits of unknown pods.
    orphan_cids: dict[str, set[str]] = {name: set() for name in executors}
    for pid, argv, environ in _processes():
        if os.path.basename(argv[0]) == b"conmon":
            cid = _argv_value(argv, b"--cid")
            exit_dir = _argv_value(argv, b"--exit-dir") or ""
            if cid is None or cid in known.containers:
                continue
            for name, executor in executors.items():
                ours = exit_dir.startswith(f"{executor.state_dir}/")
                if ours and f"--root={executor.runtime_root}".encode() in argv:
                    orphan_cids[name].add(cid)
            continue
        prefix = b"PYCRI_SANDBOX="
        tag = next((v[len(prefix) :] for v in environ.split(b"\0") if v.startswith(prefix)), None)
        if tag is None:
            continue
        tagged = Path(tag.decode(errors="replace"))
        if tagged.parent == sandboxes_dir and tagged.name not in known.sandboxes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            swept.inits.append(pid)
    # 2. Containers the OCI runtime or conmon still has: delete them (kills what runs).
    for name, executor in executors.items():
        candidates = set(orphan_cids[name]) | _ids_in(executor.runtime_root)
        # The monitor directories of all runtimes share one parent; each names its runtime.
        for cid in _ids_in(executor.state_dir):
            if _monitor_runtime(executor.state_dir / cid) in (name, None):
                candidates.add(cid)
        for cid in sorted(candidates - known.containers):
            try:
                executor.delete(cid)
            except Exception as exc:
                log.warning("cannot delete an orphaned container", id=cid, runtime=name, error=str(exc))
                continue
            (swept.conmons if cid in orphan_cids[name] else swept.runtime_states).append(cid)
    # 3. Network attachments of pods nothing records (before their netns pins go).
    for pod_id in cni.recorded_pods():
        if pod_id in known.sandboxes:
            continue
        netns = sandboxes_dir / pod_id / "ns" / "net"
        try:
            cni.delete(pod_id, netns if netns.exists() else None)
            swept.networks.append(pod_id)
        except Exception as exc:
            log.warning("cannot release an orphaned pod network", id=pod_id, error=str(exc))
    # 4. Mounts (overlays, netns pins, shm) and directories of unknown objects.
    for parent, ids in (
        (sandboxes_dir, known.sandboxes),
        (state_dir / "containers", known.containers),
        (root_dir / "containers", known.containers),
    ):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(parent):
                if entry.name in ids or not _OBJECT_ID.fullmatch(entry.name):
                    continue
                path = Path(entry.path)
                try:
                    mounts.unmount_all_under(path)
                except OSError as exc:
                    log.warning("cannot unmount an orphan's mounts", path=str(path), error=str(exc))
                    continue
                shutil.rmtree(path, ignore_errors=True)
                swept.directories.append(str(path))
    # 5. Cgroups: unknown pods under pycri's default parent, unknown containers under known pods.
    places = [(default_cgroup_parent, known.sandboxes)] + [(p, known.containers) for p in known.pod_cgroups]
    hierarchies = cgroups.hierarchies()
    for cgroup_parent, ids in places:
        for child in _cgroup_children(cgroup_parent, hierarchies):
            if child in ids or not _OBJECT_ID.fullmatch(child):
                continue
            cgroup = f"{cgroup_parent.rstrip('/')}/{child}"
            try:
                cgroups.remove(cgroup, timeout=2.0)
                swept.cgroups.append(cgroup)
            except OSError as exc:
                log.warning("cannot remove an orphaned cgroup", cgroup=cgroup, error=str(exc))
    if swept.total():
        log.info(
            "collected leftovers of a crashed run",
            conmons=len(swept.conmons),
            inits=len(swept.inits),
            runtime_states=len(swept.runtime_states),
            networks=len(swept.networks),
            directories=len(swept.directories),
            cgroups=len(swept.cgroups),
        )
    return swept


def _ids_in(directory: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(directory) if _OBJECT_ID.fullmatch(e.name)}
    except FileNotFoundError:
        return set()


def _monitor_runtime(directory: Path) -> str | None:
    try:
        return str(json.loads((directory / "monitor.json").read_text())["runtime"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cgroup_children(path: str, hierarchies: list[Path]) -> set[str]:
    relative = cgroups.normalize(path).lstrip("/")
    found: set[str] = set()
    for hierarchy in hierarchies:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            found.update(e.name for e in os.scandir(hierarchy / relative) if e.is_dir())
    return found
