"""Start-up sweep: collect what a crashed pycri left on the host that no record owns.

After the managers have finished or undone their pending records (state.Pending), every pod and
container pycri knows is in the state DB. Anything else under pycri's own directories, cgroups
and processes belongs to an object that died with a crash: a conmon whose container record was
never committed (or already deleted), a pod init, an overlay or netns pin, a CNI attachment, a
cgroup, a veth left on pycri's bridge. The sweep is driven by IDs, so it needs no memory of what
the crashed run was doing.

Only what is provably pycri's is touched: processes whose argv or environment names pycri's state
directory, mounts and directories under it, cgroups under pycri's default parent or below a
known pod's cgroup, veths on pycri's built-in bridge (named for this instance; a conflist's
bridge may be shared with other runtimes, so its ports are left alone).

What cannot be collected is logged, with what it is and why, and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pyroute2.netlink.exceptions import NetlinkError

from cri_runtime.errors import PycriError
from cri_runtime.host import cgroups, mounts
from cri_runtime.network import netns
from cri_runtime.network.cni import CNI
from cri_runtime.oci.conmon import Executor

log = structlog.get_logger("pycri.recovery")

_OBJECT_ID = re.compile(r"[0-9a-f]{64}")
_NSID_NOT_ASSIGNED = 0xFFFFFFFF  # NETNSA_NSID as pyroute2 decodes it (u32) when there is none


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
    veths: list[str] = field(default_factory=list)  # host ends removed from pycri's bridge

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
                self.veths,
            )
        )


def _processes() -> list[tuple[int, list[bytes], bytes]]:
    """(pid, argv, environ) of live processes named conmon or catatonit: the only kinds pycri
    leaves running on its own."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        comm = b""
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
        except (FileNotFoundError, ProcessLookupError):
            continue  # it exited meanwhile: nothing left to collect
        except OSError as exc:
            log.warning(
                "cannot read a process to tell whether it is pycri's; leaving it",
                pid=int(entry.name),
                comm=comm.decode(errors="replace"),
                error=str(exc),
            )
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
    cgroup_driver: cgroups.CgroupDriver | None = None,
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
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # it exited meanwhile
            except OSError as exc:
                log.warning("cannot kill an orphaned pod init", pid=pid, pod=tagged.name, error=str(exc))
                continue
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
                # Left for the next start: the runtime keeps its state, the sweep finds it again.
                log.warning("cannot delete an orphaned container", id=cid, runtime=name, error=str(exc))
                continue
            (swept.conmons if cid in orphan_cids[name] else swept.runtime_states).append(cid)
    # 3. Network attachments of pods nothing records (before their netns pins go).
    for pod_id in cni.recorded_pods():
        if pod_id in known.sandboxes:
            continue
        pinned_netns = sandboxes_dir / pod_id / "ns" / "net"
        netns_arg = pinned_netns if pinned_netns.exists() else None
        try:
            cni.delete(pod_id, netns_arg)
            swept.networks.append(pod_id)
        except Exception as exc:
            # The CNI record stays, so the next start retries the DEL (IPAM, NAT rules); the
            # pod's veth goes with its netns when step 4 unpins it, or at step 6.
            log.warning(
                "cannot release an orphaned pod network (CNI DEL failed; record kept)",
                id=pod_id,
                netns=str(netns_arg or ""),
                error=str(exc),
            )
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
                shutil.rmtree(path, onerror=_log_rmtree_error(entry.name))
                if not path.exists():
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
    if cgroup_driver is not None:
        # The systemd driver's units (conmon and container scopes, pycri's own pod slices) of the
        # objects found above in this instance's own state: another pycri's are never touched.
        orphan_pods = set(swept.networks) | {
            Path(d).name for d in swept.directories if Path(d).parent == sandboxes_dir
        }
        orphan_containers = set(swept.conmons) | set(swept.runtime_states)
        orphan_containers |= {Path(d).name for d in swept.directories if Path(d).parent != sandboxes_dir}
        try:
            swept.cgroups += cgroup_driver.sweep(
                orphan_pods - known.sandboxes, orphan_containers - known.containers
            )
        except PycriError as exc:
            log.warning("cannot look for orphaned cgroup units", driver=cgroup_driver.name, error=str(exc))
    # 6. Veths on pycri's bridge whose pod is unknown (or whose netns is going away).
    known_pins = [sandboxes_dir / pod_id / "ns" / "net" for pod_id in sorted(known.sandboxes)]
    try:
        swept.veths = netns.in_thread(
            lambda: remove_stale_veths(cni.builtin_bridge, known_pins), "pycri-sweep-veths"
        )
    except (OSError, NetlinkError) as exc:
        log.warning("cannot look for stale veths", bridge=cni.builtin_bridge, error=str(exc))
    if swept.total():
        log.info(
            "collected leftovers of a crashed run",
            conmons=len(swept.conmons),
            inits=len(swept.inits),
            runtime_states=len(swept.runtime_states),
            networks=len(swept.networks),
            directories=len(swept.directories),
            cgroups=len(swept.cgroups),
            veths=len(swept.veths),
        )
    return swept


def _netnsid(ipr: Any, pin: Path) -> int | None:
    """The ID the current network namespace gives the namespace pinned at ``pin``; None if none."""
    try:
        fd = os.open(pin, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # a stopped pod: no namespace, so no veth of its own
    except OSError as exc:
        log.warning("cannot open a known pod's netns pin", path=str(pin), error=str(exc))
        return None
    try:
        reply = ipr.get_netnsid(fd=fd)
    except NetlinkError as exc:
        if exc.code != errno.EINVAL:  # EINVAL: a plain file, the pin's mount is gone
            log.warning("cannot get the ID of a known pod's netns", path=str(pin), error=str(exc))
        return None
    finally:
        os.close(fd)
    nsid = reply.get("nsid") if reply else None
    return None if nsid is None or nsid == _NSID_NOT_ASSIGNED else int(nsid)


def remove_stale_veths(bridge: str, known_pins: list[Path]) -> list[str]:
    """Delete the veths on ``bridge`` whose other end is not in a netns pinned at ``known_pins``.

    Runs in the host's network namespace, in a thread without an event loop (pyroute2's sync
    API runs one). A pod's veth has its other end in the pod's netns, which the kernel names
    by an ID (IFLA_LINK_NETNSID); a port whose peer lives elsewhere (a netns nothing pycri
    knows still holds, or one being torn down) is a leftover, and deleting one end takes the
    pair. Ports that are no veth, or whose peer is in this namespace, are not a pod's: kept.
    Returns the names removed.
    """
    removed: list[str] = []
    with netns.netlink() as ipr:
        found = ipr.link_lookup(ifname=bridge)
        if not found:
            return removed  # no bridge (a conflist network, or no pod yet): no ports
        # The dump comes first: it assigns the IDs of the peers' namespaces that lookups use.
        ports = [
            link
            for link in ipr.link("dump")
            if link.get("master") == found[0]
            and link.get(("linkinfo", "kind")) == "veth"
            and link.get("link_netnsid") is not None
        ]
        if not ports:
            return removed
        live = {nsid for pin in known_pins if (nsid := _netnsid(ipr, pin)) is not None}
        for port in ports:
            name = port.get("ifname")
            peer_nsid = port.get("link_netnsid")
            if peer_nsid in live:
                continue
            try:
                ipr.link("del", index=port["index"])
            except NetlinkError as exc:
                if exc.code == errno.ENODEV:
                    continue  # gone meanwhile, with its namespace
                log.warning("cannot delete a stale veth", veth=name, bridge=bridge, error=str(exc))
                continue
            log.info(
                "removed a stale veth from pycri's bridge", veth=name, bridge=bridge, peer_netnsid=peer_nsid
            )
            removed.append(name)
    return removed


def _ids_in(directory: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(directory) if _OBJECT_ID.fullmatch(e.name)}
    except FileNotFoundError:
        return set()


def _monitor_runtime(directory: Path) -> str | None:
    """The runtime a monitor directory names; None if it names none (each runtime then tries it)."""
    path = directory / "monitor.json"
    try:
        return str(json.loads(path.read_text())["runtime"])
    except FileNotFoundError:
        return None  # made before its monitor.json was written
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning(
            "unreadable monitor record; every runtime will try the container", path=str(path), error=repr(exc)
        )
        return None


def _log_rmtree_error(object_id: str) -> Callable[[Any, str, Any], None]:
    def report(function: Any, path: str, exc_info: Any) -> None:
        log.warning(
            "cannot remove part of an orphan's directory",
            id=object_id,
            path=path,
            call=getattr(function, "__name__", str(function)),
            error=str(exc_info[1]),
        )

    return report


def _cgroup_children(path: str, hierarchies: list[Path]) -> set[str]:
    relative = cgroups.normalize(path).lstrip("/")
    found: set[str] = set()
    for hierarchy in hierarchies:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            found.update(e.name for e in os.scandir(hierarchy / relative) if e.is_dir())
    return found
