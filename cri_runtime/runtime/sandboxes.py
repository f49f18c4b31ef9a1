"""SandboxManager: pods as pinned namespaces, a cgroup, a CNI network and a few files.

Each step of RunPodSandbox pushes its undo; a failure unwinds them so that nothing
half-made survives (no mount, netns, cgroup, CNI allocation, directory or DB row).

The manager knows nothing of containers: cri_runtime.runtime.pods stops and removes a pod's
containers before it asks for the pod's own stop or removal, and holds the pod's lock meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog

from cri_runtime import errors, failpoints
from cri_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, PycriError
from cri_runtime.host import cgroups, idmap, mounts, sysctl
from cri_runtime.model import IDMapping, LinuxResources, NamespaceOptions, PodMetadata, PodSandboxConfig
from cri_runtime.network import netns
from cri_runtime.network.cni import CNI, PortMapping
from cri_runtime.oci import podinit, spec
from cri_runtime.runtime.hooks import NO_HOOKS, LifecycleHooks
from cri_runtime.runtime.names import NameIndex
from cri_runtime.runtime.state import Sandbox, StateDB

log = structlog.get_logger("pycri.sandbox")

DEFAULT_CGROUP_PARENT = "/pycri"
SHM_SIZE = 64 * 1024 * 1024


@dataclass(frozen=True)
class SandboxSettings:
    state_dir: Path  # <state>/sandboxes
    default_runtime: str
    runtimes: tuple[str, ...]
    cgroup_driver: cgroups.CgroupDriver = field(default_factory=cgroups.CgroupfsDriver)
    # Where the layers and containers live: user-namespace pods need it idmappable.
    root_dir: Path = Path("/var/lib")


def _metadata_name(meta: PodMetadata) -> str:
    return f"{meta.name}_{meta.namespace}_{meta.uid}_{meta.attempt}"


class SandboxManager:
    def __init__(self, settings: SandboxSettings, db: StateDB, cni: CNI) -> None:
        self.settings = settings
        self.db = db
        self.cni = cni
        self.sandboxes: dict[str, Sandbox] = {}
        self.names = NameIndex()
        self._guard = threading.Lock()
        self.hooks: LifecycleHooks = NO_HOOKS
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o711)

    def restore(self, sandboxes: list[Sandbox]) -> None:
        for sandbox in sandboxes:
            self.sandboxes[sandbox.id] = sandbox
            self.names.reserve(sandbox_name(sandbox), sandbox.id, "pod sandbox")

    # --- lookups -------------------------------------------------------------------

    def get(self, sandbox_id: str) -> Sandbox:
        if not sandbox_id:
            raise InvalidArgument("pod sandbox id is empty")
        with self._guard:
            found = self.sandboxes.get(sandbox_id)
            if found is None:
                matches = [s for s in self.sandboxes.values() if s.id.startswith(sandbox_id)]
                if len(matches) == 1:
                    found = matches[0]
        if found is None:
            raise NotFound(f"pod sandbox {sandbox_id!r} not found")
        return found

    def find(self, sandbox_id: str) -> Sandbox | None:
        try:
            return self.get(sandbox_id)
        except NotFound:
            return None

    def all(self) -> list[Sandbox]:
        with self._guard:
            return list(self.sandboxes.values())

    # --- RunPodSandbox --------------------------------------------------------------

    def run(self, sandbox_id: str, config: PodSandboxConfig, runtime_handler: str) -> Sandbox:
        """RunPodSandbox under the ID the caller chose (and holds the pod's lock for)."""
        meta = config.metadata
        for field_name in ("name", "namespace", "uid"):
            if not getattr(meta, field_name):
                raise InvalidArgument(f"pod sandbox metadata.{field_name} is empty")
        if config.log_directory and (not os.path.isabs(config.log_directory) or "\0" in config.log_directory):
            raise InvalidArgument(f"pod log_directory {config.log_directory!r} must be an absolute path")
        if runtime_handler and runtime_handler not in self.settings.runtimes:
            raise NotFound(
                f"runtime handler {runtime_handler!r} is not configured; "
                f"available: {', '.join(self.settings.runtimes)}"
            )
        if user_namespace(config.security.namespace_options) is not None:
            why = idmap.support(self.settings.root_dir)
            if why:
                raise FailedPrecondition(
                    f"user namespaces need idmapped mounts on {self.settings.root_dir}, which this "
                    f"host cannot make ({why}); see `pycri check`"
                )
            for directory in (self.settings.state_dir, self.settings.root_dir):
                closed = idmap.unsearchable(directory)
                if closed is not None:
                    raise FailedPrecondition(
                        f"user namespaces need {closed} searchable by others (the pod's root is not "
                        f"the host's): chmod o+x {closed}"
                    )
        name = _metadata_name(meta)
        self.names.reserve(name, sandbox_id, "pod sandbox")
        try:
            with contextlib.ExitStack() as undo:
                sandbox = self._create(sandbox_id, config, runtime_handler, undo)
                undo.pop_all()
        except BaseException:
            self.names.release(name, sandbox_id)
            raise
        log.info("pod sandbox ready", id=sandbox_id, name=meta.name, namespace=meta.namespace, ip=sandbox.ip)
        return sandbox

    def _create(
        self, sandbox_id: str, config: PodSandboxConfig, runtime_handler: str, undo: contextlib.ExitStack
    ) -> Sandbox:
        meta = config.metadata
        options = config.security.namespace_options
        host_network = options.network == "node"
        host_ipc = options.ipc == "node"
        pod_sysctls = sysctl.pod_sysctls(
            config.sysctls, own_net=not host_network, own_ipc=not host_ipc, own_uts=not host_network
        )
        driver = self.settings.cgroup_driver
        cgroup_path = driver.pod_cgroup(sandbox_id, config.cgroup_parent)
        directory = self.settings.state_dir / sandbox_id
        sandbox = Sandbox(
            id=sandbox_id,
            name=meta.name,
            namespace=meta.namespace,
            uid=meta.uid,
            attempt=meta.attempt,
            labels=dict(config.labels),
            annotations=dict(config.annotations),
            runtime_handler=runtime_handler,
            created_at_ns=time.time_ns(),
            config=config,
            state="ready",
            # As containerd and CRI-O: no hostname asked for means the node's.
            hostname=config.hostname or os.uname().nodename,
            log_directory=config.log_directory,
            dir=str(directory),
            cgroup_path=cgroup_path,
            # The directories the cgroup step will make, known before it makes them.
            cgroup_created=driver.pod_missing(cgroup_path),
            pending="creating",
        )
        # On record before the first step: after a crash from here on, start-up finds the
        # pending record and takes away whatever of the pod exists.
        self.db.save(sandbox)
        undo.callback(self.db.delete, sandbox)
        failpoints.hit("sandbox.recorded")
        directory.mkdir(mode=0o711)
        undo.callback(shutil.rmtree, directory, True)
        # Namespaces: the pod's own net, IPC and UTS, pinned so they outlive any process; with a
        # user namespace, made inside it (owned by it) and pinned with it.
        mappings = user_namespace(options)
        if mappings is None:
            pinned = netns.create_pod_namespaces(
                directory / "ns",
                net=not host_network,
                ipc=not host_ipc,
                uts=not host_network,
                hostname=sandbox.hostname,
                sysctls=pod_sysctls,
            )
        else:
            pinned = self._create_userns(
                directory / "ns", sandbox, mappings, host_network, host_ipc, pod_sysctls
            )
            undo.callback(_remove_userns, sandbox.userns_path)
        undo.callback(netns.remove_pod_namespaces, pinned)
        sandbox.netns_path = str(pinned.net or "")
        sandbox.ipcns_path = str(pinned.ipc or "")
        sandbox.utsns_path = str(pinned.uts or "")
        failpoints.hit("sandbox.after_netns")
        # The pod cgroup: kubelet names it; crictl users often don't.
        created = driver.create_pod(
            sandbox.cgroup_path, f"pycri pod {meta.namespace}/{meta.name} {sandbox_id}"
        )
        undo.callback(driver.remove_pod, sandbox.cgroup_path, created)
        self._apply_pod_limits(sandbox.cgroup_path, config.resources, config.overhead)
        failpoints.hit("sandbox.after_cgroup")
        if options.pid == "pod":
            sandbox.init_pid = self._start_pod_init(pinned, directory, sandbox.userns_path)
            undo.callback(_kill_init, sandbox.init_pid)
            failpoints.hit("sandbox.after_init")
        # Network: CNI ADD in the pinned netns, unless the pod asked for none (``pycri build``'s
        # RUN steps): then its namespace keeps only ``lo``.
        if not host_network and config.annotations.get(NETWORK_ANNOTATION) != "none":
            ports = [
                PortMapping(p.protocol, p.container_port, p.host_port, p.host_ip)
                for p in config.port_mappings
                if p.host_port
            ]
            result = self.cni.add(
                sandbox_id,
                Path(sandbox.netns_path),
                pod_name=meta.name,
                pod_namespace=meta.namespace,
                pod_uid=meta.uid,
                port_mappings=ports,
            )
            undo.callback(self._cni_delete, sandbox)
            sandbox.network_ready = True
            if result.ips:
                sandbox.ip = result.ips[0]
                sandbox.additional_ips = list(result.ips[1:])
            failpoints.hit("sandbox.after_cni")
        # Files every container binds in.
        self._write_pod_files(sandbox, config, directory, host_network)
        shm = directory / "shm"
        shm.mkdir()
        if host_ipc:
            sandbox.shm_path = "/dev/shm"
        else:
            mounts.mount_tmpfs(shm, size=SHM_SIZE)
            undo.callback(mounts.unmount, shm)
            sandbox.shm_path = str(shm)
        failpoints.hit("sandbox.after_shm")
        self.hooks.run_pod(sandbox)  # NRI RunPodSandbox: before the pod is listed; raising undoes it
        sandbox.pending = ""
        self.db.save(sandbox)
        with self._guard:
            self.sandboxes[sandbox_id] = sandbox
        return sandbox

    def _apply_pod_limits(
        self, cgroup_path: str, resources: LinuxResources | None, overhead: LinuxResources | None
    ) -> None:
        """The pod's resources plus its overhead, as kubelet sizes a pod cgroup."""
        if resources is None and overhead is None:
            return
        resources = resources or LinuxResources()
        overhead = overhead or LinuxResources()
        for name in ("cpu_shares", "cpu_quota", "cpu_period", "memory_limit_in_bytes"):
            if getattr(resources, name) < 0 and name != "cpu_quota":
                raise InvalidArgument(f"pod linux.resources.{name} must not be negative")
        quota = resources.cpu_quota + overhead.cpu_quota if resources.cpu_quota > 0 else resources.cpu_quota
        memory = resources.memory_limit_in_bytes
        if memory and memory + overhead.memory_limit_in_bytes < spec.MIN_MEMORY:
            # The child cgroup of every container is charged to it: below this none can be made.
            raise InvalidArgument(f"pod memory limit {memory} (with overhead) is below {spec.MIN_MEMORY}")
        # A refused write is already the domain error its errno calls for (cgroups.apply_limits).
        self.settings.cgroup_driver.apply_pod_limits(
            cgroup_path,
            cpu_shares=resources.cpu_shares + overhead.cpu_shares if resources.cpu_shares else 0,
            cpu_quota=quota,
            cpu_period=resources.cpu_period,
            memory=memory + overhead.memory_limit_in_bytes if memory else 0,
        )

    def update_resources(
        self, sandbox: Sandbox, resources: LinuxResources | None, overhead: LinuxResources | None
    ) -> None:
        """UpdatePodSandboxResources (pod-level in-place resize): the pod cgroup sized anew, all or
        nothing: a limit the kernel refuses (memory below what the pod holds) puts back the
        previous ones. The caller holds the pod's lock exclusively."""
        if sandbox.state != "ready" or sandbox.pending:
            raise FailedPrecondition(
                f"pod sandbox {sandbox.id} is not ready; its resources cannot be updated"
            )
        before = (sandbox.config.resources, sandbox.config.overhead)
        try:
            self._apply_pod_limits(sandbox.cgroup_path, resources, overhead)
        except Exception as failure:
            try:
                self._apply_pod_limits(sandbox.cgroup_path, *before)
            except Exception as exc:
                # The cgroup may now hold some of the new limits and some of the old.
                log.error(
                    "cannot roll back a failed pod resource update",
                    id=sandbox.id,
                    update_error=str(failure),
                    error=str(exc),
                )
            raise
        sandbox.config = replace(sandbox.config, resources=resources, overhead=overhead)
        self.db.save(sandbox)
        log.info("pod sandbox resources updated", id=sandbox.id)

    def _create_userns(
        self,
        directory: Path,
        sandbox: Sandbox,
        mappings: tuple[tuple[IDMapping, ...], tuple[IDMapping, ...]],
        host_network: bool,
        host_ipc: bool,
        pod_sysctls: list[sysctl.Sysctl],
    ) -> netns.PodNamespaces:
        def triples(found: tuple[IDMapping, ...]) -> list[tuple[int, int, int]]:
            return [(m.container_id, m.host_id, m.length) for m in found]

        try:
            pins = idmap.create_pod_namespaces(
                directory,
                uids=triples(mappings[0]),
                gids=triples(mappings[1]),
                net=not host_network,
                ipc=not host_ipc,
                uts=not host_network,
                hostname=sandbox.hostname,
                sysctls=[(s.path, s.value) for s in pod_sysctls],
            )
        except OSError as exc:
            raise errors.from_os_error(exc, "cannot create the pod's user namespace") from exc
        sandbox.userns_path = str(pins["user"])
        return netns.PodNamespaces(pins.get("net"), pins.get("ipc"), pins.get("uts"))

    def _start_pod_init(self, pinned: netns.PodNamespaces, directory: Path, userns: str = "") -> int:
        return podinit.start(
            str(directory),
            net=pinned.net,
            ipc=pinned.ipc,
            uts=pinned.uts,
            user=Path(userns) if userns else None,
        )

    def _cni_delete(self, sandbox: Sandbox) -> None:
        self.cni.delete(
            sandbox.id,
            Path(sandbox.netns_path) if sandbox.netns_path else None,
            pod_name=sandbox.name,
            pod_namespace=sandbox.namespace,
            pod_uid=sandbox.uid,
        )

    def _write_pod_files(
        self, sandbox: Sandbox, config: PodSandboxConfig, directory: Path, host_network: bool
    ) -> None:
        (directory / "hostname").write_text(sandbox.hostname + "\n")
        if host_network:
            shutil.copyfile("/etc/hosts", directory / "hosts")
        else:
            lines = [
                "127.0.0.1\tlocalhost",
                "::1\tlocalhost ip6-localhost ip6-loopback",
                "fe00::0\tip6-localnet",
                "fe00::0\tip6-mcastprefix",
                "fe00::1\tip6-allnodes",
                "fe00::2\tip6-allrouters",
            ]
            if sandbox.ip:
                lines.append(f"{sandbox.ip}\t{sandbox.hostname}")
            (directory / "hosts").write_text("\n".join(lines) + "\n")
        dns = config.dns
        if dns.servers or dns.searches or dns.options:
            text = "".join(f"nameserver {s}\n" for s in dns.servers)
            if dns.searches:
                text += "search " + " ".join(dns.searches) + "\n"
            if dns.options:
                text += "options " + " ".join(dns.options) + "\n"
            (directory / "resolv.conf").write_text(text)
        elif os.path.exists("/etc/resolv.conf"):
            shutil.copyfile("/etc/resolv.conf", directory / "resolv.conf")
        else:
            (directory / "resolv.conf").write_text("")

    # --- StopPodSandbox / RemovePodSandbox ------------------------------------------
    # Called by cri_runtime.runtime.pods with the pod's lock held exclusive: begin_* records the
    # intent, the pod's containers are stopped or removed, then finish_* does the pod's part.

    def begin_stop(self, sandbox: Sandbox) -> None:
        if sandbox.state == "ready" and not sandbox.pending:
            # Recorded first: a crash half-way leaves a pod that start-up stops again,
            # never one that says ready with its network gone.
            sandbox.pending = "stopping"
            sandbox.state = "notready"
            self.db.save(sandbox)
            failpoints.hit("sandbox.stop_recorded")

    def finish_stop(self, sandbox: Sandbox) -> None:
        self._teardown(sandbox)
        if sandbox.pending == "stopping":
            sandbox.pending = ""
        self.db.save(sandbox)
        log.info("pod sandbox stopped", id=sandbox.id)

    def _teardown(self, sandbox: Sandbox) -> None:
        """Release what a stopped pod no longer needs; every step tolerates being repeated."""
        failures: list[PycriError] = []
        if sandbox.network_ready:
            try:
                self._cni_delete(sandbox)
                failpoints.hit("sandbox.stop_after_cni")
                sandbox.network_ready = False
                self.db.save(sandbox)
            except PycriError as exc:
                failures.append(exc)
        if sandbox.init_pid:
            _kill_init(sandbox.init_pid)
            sandbox.init_pid = 0
        directory = Path(sandbox.dir)
        try:
            mounts.unmount(directory / "shm")
        except OSError as exc:
            # Not mounted (host IPC, or a teardown repeated after a crash) is the usual case.
            log.debug("pod shm not unmounted", id=sandbox.id, path=str(directory / "shm"), error=str(exc))
        netns.remove_pod_namespaces(
            netns.PodNamespaces(
                Path(sandbox.netns_path) if sandbox.netns_path else None,
                Path(sandbox.ipcns_path) if sandbox.ipcns_path else None,
                Path(sandbox.utsns_path) if sandbox.utsns_path else None,
            )
        )
        # Last: the other namespaces are owned by it (the kernel keeps it while they live anyway).
        _remove_userns(sandbox.userns_path)
        if failures:
            # The first failure's kind (a missing plugin is FailedPrecondition, a plugin error
            # Unavailable) is what the caller can act on.
            raise type(failures[0])("; ".join(map(str, failures)))

    def begin_remove(self, sandbox: Sandbox) -> None:
        if sandbox.pending != "removing":
            sandbox.pending = "removing"
            sandbox.state = "notready"
            self.db.save(sandbox)
            failpoints.hit("sandbox.remove_recorded")

    def finish_remove(self, sandbox: Sandbox) -> None:
        """Everything of the pod goes; each step tolerates having been done before a crash."""
        self._teardown(sandbox)
        failpoints.hit("sandbox.remove_after_teardown")
        self.settings.cgroup_driver.remove_pod(sandbox.cgroup_path, sandbox.cgroup_created)
        directory = Path(sandbox.dir)
        mounts.unmount_all_under(directory)
        shutil.rmtree(directory, ignore_errors=True)
        self.db.delete(sandbox)
        with self._guard:
            self.sandboxes.pop(sandbox.id, None)
        self.names.release(sandbox_name(sandbox), sandbox.id)
        log.info("pod sandbox removed", id=sandbox.id)

    # --- start-up -------------------------------------------------------------------------

    def check_intact(self, sandbox: Sandbox) -> None:
        """A ready pod whose namespaces or init are gone (a reboot, someone's umount) cannot run
        containers any more: record it as being stopped, so that start-up frees what it held."""
        if sandbox.state == "ready" and not sandbox.pending and not _intact(sandbox):
            log.warning("pod lost its namespaces or init; marking it not ready", id=sandbox.id)
            sandbox.state = "notready"
            sandbox.pending = "stopping"
            self.db.save(sandbox)

    def discard(self, sandbox: Sandbox) -> None:
        """A pod whose RunPodSandbox never returned: CNI DEL if the ADD began, then what only
        the record knows (the cgroup directories it made). The start-up sweep takes the rest:
        the pod init, mounts, netns pins and the directory, all found by the pod's ID."""
        netns_path = Path(sandbox.dir) / "ns" / "net"
        try:
            self.cni.delete(sandbox.id, netns_path if netns_path.exists() else None)
        except PycriError as exc:
            # The sweep removes the pin and the CNI cache; an IPAM lease may stay behind.
            log.warning(
                "CNI DEL of a pod whose creation a crash interrupted failed",
                id=sandbox.id,
                netns=str(netns_path),
                error=str(exc),
            )
        self.settings.cgroup_driver.remove_pod(sandbox.cgroup_path, sandbox.cgroup_created)
        self.db.delete(sandbox)
        with self._guard:
            self.sandboxes.pop(sandbox.id, None)
        self.names.release(sandbox_name(sandbox), sandbox.id)
        log.info("took away a pod whose creation a crash interrupted", id=sandbox.id)


# A pod annotated ``pycri.io/network: none`` gets its own network namespace with only ``lo`` and
# no CNI network (as ``docker build``'s RUN steps have none unless asked).
NETWORK_ANNOTATION = "pycri.io/network"


def user_namespace(
    options: NamespaceOptions,
) -> tuple[tuple[IDMapping, ...], tuple[IDMapping, ...]] | None:
    """The (uid, gid) mappings of a pod asking for a user namespace of its own (mode POD); None
    for the node's. Modes CONTAINER and TARGET, and mappings that kubelet would never send (none,
    several, one not starting at container ID 0, empty or beyond 32 bits) are InvalidArgument,
    as with containerd and CRI-O."""
    userns = options.userns
    if userns is None or userns.mode == "node":
        if userns is not None and (userns.uids or userns.gids):
            raise InvalidArgument("userns_options: mode NODE takes no uids or gids mappings")
        return None
    if userns.mode != "pod":
        raise InvalidArgument(
            f"userns_options: mode {userns.mode.upper()} is not supported; "
            "a user namespace is the pod's (POD) or the node's (NODE)"
        )
    for what, found in (("uids", userns.uids), ("gids", userns.gids)):
        if len(found) != 1:
            raise InvalidArgument(
                f"userns_options.{what}: exactly one mapping is supported, got {len(found)}"
            )
        m = found[0]
        if m.container_id != 0:
            raise InvalidArgument(
                f"userns_options.{what}[0] ({m.container_id}->{m.host_id}, {m.length}): "
                "it must map container ID 0"
            )
        if m.length <= 0 or m.host_id + m.length > 2**32 - 1:
            raise InvalidArgument(
                f"userns_options.{what}[0] ({m.container_id}->{m.host_id}, {m.length}): "
                "the host range must be non-empty and within 32 bits"
            )
    return userns.uids, userns.gids


def _remove_userns(path: str) -> None:
    if path:
        idmap.unmount(Path(path))
        Path(path).unlink(missing_ok=True)


def sandbox_name(sandbox: Sandbox) -> str:
    return f"{sandbox.name}_{sandbox.namespace}_{sandbox.uid}_{sandbox.attempt}"


def _intact(sandbox: Sandbox) -> bool:
    for path in (sandbox.netns_path, sandbox.ipcns_path, sandbox.utsns_path, sandbox.userns_path):
        # A pinned namespace is a bind mount of an nsfs inode: another device than its directory.
        try:
            if path and os.stat(path).st_dev == os.stat(os.path.dirname(path)).st_dev:
                return False
        except OSError:
            return False
    if sandbox.init_pid:
        try:
            with open(f"/proc/{sandbox.init_pid}/cmdline", "rb") as fh:
                return b"catatonit" in fh.read()
        except OSError:
            return False
    return True


def _kill_init(pid: int) -> None:
    """SIGKILL the pod's init (catatonit), which takes its PID namespace down with it."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if b"catatonit" not in fh.read():
                return  # the PID was reused by something else
        os.kill(pid, signal.SIGKILL)
    except OSError:  # gone (no file, or ESRCH on the read or the kill)
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(") ", 1)[1].startswith("Z"):
                    break  # a zombie of our own or of init's: it is dead
        except (OSError, IndexError):
            # Gone: reaped between the open and the read, the kernel answers ESRCH to the read.
            break
        time.sleep(0.01)
