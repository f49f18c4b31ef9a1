"""ContainerManager: containers as an overlay root file system, an OCI spec, and a conmon
monitor running the OCI runtime.

Exits are noticed by cri_runtime.runtime.exits (a pidfd per running container's conmon, on the
event loop), so that ContainerStatus and ListContainers answer from memory without a subprocess
per call, and nothing polls while containers run.

The manager knows nothing of pods beyond the Sandbox record it is handed: cri_runtime.runtime.pods
checks that the pod is ready and holds the pod's lock around each call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import stat
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from cri_runtime import errors, failpoints
from cri_runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PycriError,
    ResourceExhausted,
)
from cri_runtime.host import cgroups, idmap, mounts, selinux
from cri_runtime.model import ContainerConfig, LinuxResources, Mount
from cri_runtime.oci import apparmor, spec
from cri_runtime.oci.conmon import ExecResult, Executor
from cri_runtime.runtime import checkpoint
from cri_runtime.runtime.events import EventHub
from cri_runtime.runtime.exits import ExitWatcher
from cri_runtime.runtime.hooks import NO_HOOKS, LifecycleHooks
from cri_runtime.runtime.locks import KeyedLocks
from cri_runtime.runtime.names import NameIndex
from cri_runtime.runtime.state import Container, Sandbox, StateDB
from imageservice.diskusage import disk_usage
from imageservice.store import FsUsage, ImageStore

log = structlog.get_logger("pycri.container")

EXEC_OUTPUT_CAP = 16 * 1024 * 1024
# After SIGKILL, how long a stop waits for conmon to report the exit before recording it itself.
KILL_WAIT = 10.0
# A container whose start failed is exited with this code and reason StartError (containerd's).
START_ERROR_EXIT_CODE = 128
# Threads for removed containers' file work, and how long shutdown waits for what is queued.
CLEANUP_THREADS = 2
CLEANUP_DRAIN_TIMEOUT = 10.0


@dataclass(frozen=True)
class ContainerSettings:
    root_dir: Path  # <root>/containers: upper and work directories
    state_dir: Path  # <state>/containers: rootfs mount points and bundles
    oom_score_adj_floor: int | None
    cgroup_driver: cgroups.CgroupDriver = field(default_factory=cgroups.CgroupfsDriver)
    pids_limit: int = 0  # each container's pids.max; 0: none


# What "no limit" is for each cgroup setting, to undo a partial update of one that was unset.
_UNSET = {
    "cpu": {"shares": 1024, "quota": -1, "period": 100000},
    "memory": {"limit": -1, "swap": -1},
}


def _restorable(current: dict, update: dict) -> dict:
    """The settings that undo ``update``: the current values, or "no limit" where none was set."""
    out: dict = {}
    for key, value in update.items():
        if not isinstance(value, dict):
            if key in current:
                out[key] = current[key]
            continue
        section = {}
        for name in value:
            if name in current.get(key, {}):
                section[name] = current[key][name]
            elif name in _UNSET.get(key, {}):
                section[name] = _UNSET[key][name]
        if key == "cpu" and "cpus" in value and "cpus" not in section:
            section["cpus"] = _host_cpus()
        if section:
            out[key] = section
    return out


def _host_cpus() -> str:
    try:
        return Path("/sys/fs/cgroup/cpuset/cpuset.cpus").read_text().strip()
    except OSError:
        return f"0-{(os.cpu_count() or 1) - 1}"


def _process_start_ns(pid: int) -> int:
    """When ``pid`` started, as wall-clock nanoseconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
    except (OSError, IndexError, StopIteration, ValueError):
        return 0
    ticks = os.sysconf("SC_CLK_TCK")
    # Field 22 of stat, the 20th after the command name: start time in clock ticks since boot.
    return (boot * ticks + int(fields[19])) * (1_000_000_000 // ticks)


def _kill_pid_namespace(pid: int, container_id: str) -> bool:
    """SIGKILL a container whose first process is the init of its own PID namespace, which takes
    every process of the namespace with it (the kernel's doing): no ``<runtime> kill --all``
    subprocess. The process is held by a pidfd before it is checked to be that init and in the
    container's cgroup, so a recycled PID is never signalled. False: not such a container (a shared
    pod PID namespace, or gone); the caller asks the runtime."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/status") as fh:
            nspid = next((line.split()[1:] for line in fh if line.startswith("NSpid:")), [])
        with open(f"/proc/{pid}/cgroup") as fh:
            in_container = container_id in fh.read()
        if len(nspid) < 2 or nspid[-1] != "1" or not in_container:
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)


def _userns_context(sandbox: Sandbox) -> dict[str, Any]:
    """The SandboxContext fields of a pod's user namespace (none for the node's)."""
    userns = sandbox.config.security.namespace_options.userns
    if not sandbox.userns_path or userns is None:
        return {}
    return {
        "userns_path": sandbox.userns_path,
        "uid_mappings": tuple((m.container_id, m.host_id, m.length) for m in userns.uids),
        "gid_mappings": tuple((m.container_id, m.host_id, m.length) for m in userns.gids),
    }


def _idmapped_layers(
    layers: list[Path], upper: Path, staging: Path, sandbox: Sandbox, undo: contextlib.ExitStack
) -> list[Path]:
    """Idmapped clones (through the pod's user namespace) of the image's layers, attached under
    ``staging``: an overlay of these shows the files of host ID 0 as the pod's root. The layers on
    disk are untouched (other pods share them).

    The upper directory is not idmapped: overlayfs writes it with the mounter's credentials
    (pycri's, host root), which an idmapped mount cannot map (EOVERFLOW, and a read-only overlay).
    It is the container's own and empty, so it is given to the pod's root instead (as
    containerd's remapped snapshots are); what the container writes lands there with host IDs.
    """
    userns = Path(sandbox.userns_path)
    context = _userns_context(sandbox)
    try:
        os.chown(upper, _host_id(context["uid_mappings"], 0), _host_id(context["gid_mappings"], 0))
        staging.mkdir(mode=0o711)  # the pod's root (not the host's) walks through it
        clones: list[Path] = []
        for position, layer in enumerate(layers):
            target = staging / f"l{position}"
            target.mkdir()
            idmap.idmapped_clone(layer, target, userns)
            undo.callback(idmap.unmount, target)
            clones.append(target)
    except OSError as exc:
        raise errors.from_os_error(
            exc, "cannot idmap the container's layers for its pod's user namespace"
        ) from exc
    return clones


def _idmap_volumes(
    oci_spec: dict[str, Any], own: tuple[Path, Path], userns: Path, undo: contextlib.ExitStack
) -> None:
    """The container's volumes (kubelet's private bind mounts) swapped for idmapped clones, so
    that the pod's root owns what the host's root owns, as on the root file system. Made by pycri:
    Debian's runc 1.1 and crun 1.8 cannot idmap a bind mount. Mounts with propagation (rslave,
    rshared) are left as they are: a detached clone would not receive the host's mounts. Image
    volumes (overlays, which cannot be idmapped) and the pod's own files (under ``own``: the
    container's and the pod's directories) stay too."""
    staging = own[0] / "idmap-volumes"
    for position, mount in enumerate(oci_spec.get("mounts", [])):
        source = mount.get("source", "")
        options = mount.get("options", [])
        if mount.get("type") != "bind" or "rprivate" not in options or not os.path.isabs(source):
            continue
        if any(Path(source).is_relative_to(directory) for directory in own):
            continue
        target = staging / str(position)
        try:
            staging.mkdir(mode=0o711, exist_ok=True)
            if os.path.isdir(source):
                target.mkdir()
            else:
                target.touch(mode=0o600)
            idmap.idmapped_clone(Path(source), target, userns)
        except OSError as exc:
            raise errors.from_os_error(
                exc,
                f"cannot idmap the volume {source} for {mount.get('destination')} (a user-namespace pod)",
            ) from exc
        undo.callback(idmap.unmount, target)
        mount["source"] = str(target)


def _host_id(mappings: tuple[tuple[int, int, int], ...], inside: int) -> int:
    for container_id, host_id, length in mappings:
        if container_id <= inside < container_id + length:
            return host_id + inside - container_id
    raise errors.InvalidArgument(f"ID {inside} is not mapped by the pod's user namespace")


def _signal_number(name: str) -> int:
    if not name:
        return signal.SIGTERM
    text = name.upper()
    if text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(signal.Signals[text])
    except KeyError:
        return signal.SIGTERM


def _image_sub_path(root: Path, sub_path: str, field: str) -> Path:
    """``sub_path`` inside the image volume mounted at ``root``, which must be a directory there.

    The path is the image's content, so it is hostile: ``..`` and symlinks are followed as if
    ``root`` were ``/``, and anything that leads outside (an absolute path, a climb above the
    top, an absolute symlink) is refused rather than followed."""
    escape = f"{field}.image_sub_path {sub_path!r}: path escapes from parent (the image volume)"
    if sub_path.startswith("/") or "\0" in sub_path:
        raise InvalidArgument(escape)
    pending = [part for part in sub_path.split("/") if part not in ("", ".")]
    current: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if not current:
                raise InvalidArgument(escape)
            current.pop()
            continue
        path = root.joinpath(*current, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise NotFound(
                f"{field}.image_sub_path {sub_path!r}: no such file or directory in the image"
            ) from None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            target = os.readlink(path)
            if target.startswith("/") or links > 40:
                raise InvalidArgument(escape)
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            continue
        current.append(part)
    found = root.joinpath(*current)
    if not found.is_dir() or found.is_symlink():
        raise InvalidArgument(f"{field}.image_sub_path {sub_path!r}: only directory subpath is supported")
    return found


class ContainerManager:
    def __init__(
        self,
        settings: ContainerSettings,
        db: StateDB,
        images: ImageStore,
        executors: dict[str, Executor],
        default_runtime: str,
    ) -> None:
        self.settings = settings
        self.db = db
        self.images = images
        self.executors = executors
        self.default_runtime = default_runtime
        self.containers: dict[str, Container] = {}
        self.names = NameIndex()
        # Each container's reservation in ``names``, kept from its creation: the key names its
        # pod, which may be gone by the time the container is.
        self._name_keys: dict[str, str] = {}
        self.locks = KeyedLocks()
        self._guard = threading.Lock()
        self.exits = ExitWatcher(self._check_exit)
        self.events = EventHub()
        self.hooks: LifecycleHooks = NO_HOOKS
        # RemoveContainer's file work (conmon's files, the rootfs mount, the directories) runs here
        # after the record is gone, as containerd removes snapshots after the fact; a crash before
        # it is done leaves only what the start-up sweep collects.
        self._cleanup = ThreadPoolExecutor(CLEANUP_THREADS, thread_name_prefix="cleanup")
        self._cleanups: set[Future[None]] = set()
        for directory in (settings.root_dir, settings.state_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o711)

    def restore(self, containers: list[Container], sandboxes: Mapping[str, Sandbox]) -> None:
        """Take the records of a previous run; ``sandboxes`` are the pods they belong to."""
        for container in containers:
            self.containers[container.id] = container
            self._reserve_name(container, sandboxes.get(container.pod_id))
            try:
                self.images.hold_chains(container.layers)
            except Exception as exc:
                # The layers stay unheld: an image removal could take them from under the
                # container's overlay. Its rootfs mount keeps working until then.
                log.error(
                    "cannot hold a restored container's layers",
                    id=container.id,
                    image=container.image_id,
                    layers=container.layers,
                    error=str(exc),
                )

    def recover(self, sandboxes: Mapping[str, Sandbox]) -> None:
        """Reconcile the restored records with what the host has, before pycri serves.

        A create that a crash interrupted is undone; a removal is finished; a container
        recorded as created that the runtime reports running (the crash fell between the
        runtime's start and the record) is running; a running one whose exit conmon wrote
        while pycri was down is exited, with conmon's code and time.
        """
        for container in self.all():
            try:
                if container.pending == "creating":
                    self._discard(container, sandboxes.get(container.pod_id))
                elif container.pending == "removing":
                    self._remove(container)
                    log.info("finished removing a container after a crash", id=container.id)
                elif container.state == "created":
                    self._reconcile_created(container)
                elif container.state == "running":
                    info = self.executor(container).exit_info(container.id)
                    if info is not None:
                        self._record_exit(container, info)
            except Exception as exc:
                log.error("cannot reconcile a container", id=container.id, error=str(exc))

    def _discard(self, container: Container, sandbox: Sandbox | None) -> None:
        """A container whose CreateContainer never returned: nothing of it stays."""
        self.executor(container).delete(container.id)
        if sandbox is not None:
            cgroup = cgroups.container_path(sandbox.cgroup_path, container.id)
            try:
                self.settings.cgroup_driver.remove_container(sandbox.cgroup_path, container.id, timeout=1.0)
            except (OSError, ValueError, PycriError) as exc:
                # The start-up sweep removes container cgroups below known pods.
                log.warning(
                    "cannot remove a discarded container's cgroup",
                    id=container.id,
                    cgroup=cgroup,
                    error=str(exc),
                )
        if container.run_dir:
            mounts.unmount_all_under(Path(container.run_dir))
            shutil.rmtree(container.run_dir, ignore_errors=True)
        if container.dir:
            shutil.rmtree(container.dir, ignore_errors=True)
        if container.log_path:
            try:
                Path(container.log_path).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning(
                    "cannot remove a discarded container's log",
                    id=container.id,
                    path=container.log_path,
                    error=str(exc),
                )
        self._forget_record(container)
        self._release_name(container)
        self.images.release_layers(container.layers)
        log.info("took away a container whose creation a crash interrupted", id=container.id)

    def _reconcile_created(self, container: Container) -> None:
        executor = self.executor(container)
        current = executor.state(container.id)
        status = current.get("status") if current else None
        if not container.pid and status in (None, "created"):
            # Recorded before StartContainer made it in the runtime; a runtime create that a
            # crash interrupted is undone, and the container can be started again.
            executor.delete(container.id)
            return
        if status == "created":
            return
        if status == "running":
            pid = int((current or {}).get("pid") or 0)
            container.state = "running"
            container.pid = pid
            container.started_at_ns = _process_start_ns(pid) or time.time_ns()
            self.db.save(container)
            log.info("container was started before a crash", id=container.id)
            return
        info = executor.exit_info(container.id)
        self._record_exit(container, info)

    def start_watcher(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch every running container's exit on ``loop`` from now on."""
        self.exits.start(loop)
        for container in self.all():
            if container.state == "running":
                self.exits.watch(container.id, self.executor(container).conmon_pid(container.id))

    def close(self, timeout: float = CLEANUP_DRAIN_TIMEOUT) -> None:
        self.exits.close()
        with self._guard:
            pending = list(self._cleanups)
        _, not_done = futures_wait(pending, timeout=timeout)
        if not_done:
            log.warning("removed containers' files left for the next start's sweep", count=len(not_done))
        self._cleanup.shutdown(wait=False, cancel_futures=True)

    def drain_cleanups(self, timeout: float = CLEANUP_DRAIN_TIMEOUT) -> None:
        """Wait until the file work of every RemoveContainer so far is done (bounded)."""
        with self._guard:
            pending = list(self._cleanups)
        futures_wait(pending, timeout=timeout)

    def _check_exit(self, container_id: str) -> bool | int | None:
        """Called by the exit watcher, on a worker thread, when a monitor ended: record the exit.

        No per-container lock here: a StopContainer may hold it, and recording the same exit twice
        is harmless (the code comes from the same file). Returns True once exited, None if the
        container is gone, else the pid to watch next (the monitor died, the container runs on).
        """
        container = self.find(container_id)
        if container is None:
            return None
        if container.state != "running":
            return True
        executor = self.executor(container)
        info = executor.exit_info(container.id)
        if info is not None:
            if container.state == "running":
                self._record_exit(container, info)
                log.info("container exited", id=container.id, exit_code=container.exit_code)
            return True
        monitor = executor.conmon_pid(container.id)
        if monitor is not None:
            return monitor
        log.warning("container's monitor is gone; watching its process", id=container.id, pid=container.pid)
        return container.pid or None

    # --- lookups -----------------------------------------------------------------

    def get(self, container_id: str) -> Container:
        if not container_id:
            raise InvalidArgument("container id is empty")
        with self._guard:
            found = self.containers.get(container_id)
            if found is None:
                matches = [c for c in self.containers.values() if c.id.startswith(container_id)]
                if len(matches) == 1:
                    found = matches[0]
        if found is None:
            raise NotFound(f"container {container_id!r} not found")
        return found

    def find(self, container_id: str) -> Container | None:
        try:
            return self.get(container_id)
        except NotFound:
            return None

    def all(self) -> list[Container]:
        with self._guard:
            return list(self.containers.values())

    def in_pod(self, pod_id: str) -> list[Container]:
        with self._guard:
            return [c for c in self.containers.values() if c.pod_id == pod_id]

    def executor(self, container: Container) -> Executor:
        return self.executors[container.runtime]

    def _reserve_name(self, container: Container, sandbox: Sandbox | None) -> None:
        pod = f"{sandbox.name}_{sandbox.namespace}_{sandbox.uid}" if sandbox else container.pod_id
        key = f"{container.name}_{pod}_{container.attempt}"
        self.names.reserve(key, container.id, "container")
        with self._guard:
            self._name_keys[container.id] = key

    def _release_name(self, container: Container) -> None:
        with self._guard:
            key = self._name_keys.pop(container.id, None)
        if key is not None:
            self.names.release(key, container.id)

    # --- CreateContainer -----------------------------------------------------------

    def create(self, sandbox: Sandbox, config: ContainerConfig) -> Container:
        """CreateContainer in ``sandbox``, which the caller checked is ready (and keeps so). An
        image.image naming a checkpoint archive, or a checkpoint OCI image in the store, creates
        the container to restore from it (CRI-O's rules)."""
        # Named like a container: after a crash, the start-up sweep takes it as an orphan's.
        scratch = self.settings.root_dir / secrets.token_hex(32)
        if checkpoint.is_archive_reference(config.image):
            source = checkpoint.open_archive(Path(config.image), scratch)
        else:
            record = self.images.resolve(config.image) if config.image else None
            if record is None or not checkpoint.is_checkpoint_image(record):
                return self._create_container(sandbox, config, None)
            source = checkpoint.open_image(self.images, record, scratch)
        try:
            base = source.image
            with contextlib.suppress(InvalidArgument):  # (a name that is no reference: not the base)
                if self.images.resolve(base) is None and self.images.resolve(source.image_name):
                    base = source.image_name  # the same image by name, under another ID here
            return self._create_container(sandbox, replace(config, image=base), source)
        finally:
            # On success its CRIU images were moved into the container's directory already.
            shutil.rmtree(source.directory, ignore_errors=True)

    def _create_container(
        self, sandbox: Sandbox, config: ContainerConfig, restore: checkpoint.RestoreSource | None
    ) -> Container:
        if not config.metadata.name:
            raise InvalidArgument("container metadata.name is empty")
        if not config.image:
            raise InvalidArgument("container image.image is empty")
        image = self.images.resolve(config.image)
        if image is None:
            raise NotFound(f"image {config.image!r} is not present; pull it first")
        container_id = secrets.token_hex(32)
        runtime = sandbox.runtime_handler or self.default_runtime
        if runtime not in self.executors:
            raise FailedPrecondition(f"runtime {runtime!r} is not usable on this host")
        log_path = ""
        if config.log_path:
            if not sandbox.log_directory:
                raise InvalidArgument("container log_path is set but the pod has no log_directory")
            # Relative to the pod's log directory and inside it: kubelet says "<name>/<n>.log";
            # an absolute or climbing path would have conmon append to any file on the host.
            log_directory = os.path.normpath(sandbox.log_directory)
            log_path = os.path.normpath(os.path.join(log_directory, config.log_path))
            if (
                os.path.isabs(config.log_path)
                or "\0" in config.log_path
                or not log_path.startswith(log_directory.rstrip("/") + "/")
            ):
                raise InvalidArgument(
                    f"container log_path {config.log_path!r} must be a relative path inside the pod's "
                    "log directory"
                )
        container = Container(
            id=container_id,
            pod_id=sandbox.id,
            name=config.metadata.name,
            attempt=config.metadata.attempt,
            labels=dict(config.labels),
            annotations=dict(config.annotations),
            image=config.image,
            image_id=image.id,
            image_ref=image.repo_digests[0] if image.repo_digests else image.id,
            created_at_ns=time.time_ns(),
            config=config,
            log_path=log_path,
            runtime=runtime,
            # The config's own stop signal, else the image's (STOPSIGNAL), else SIGTERM.
            stop_signal=config.stop_signal or str((image.config.get("config") or {}).get("StopSignal") or ""),
        )
        self.executor(container).check_create(
            container_id,
            Path(log_path) if log_path else self.settings.state_dir / container_id / "console.log",
        )
        if restore is not None:
            checkpoint.require_available(self.executor(container))
        self._reserve_name(container, sandbox)
        try:
            with self.locks.hold(container_id), contextlib.ExitStack() as undo:
                self._create(container, sandbox, config, image.config, undo, restore)
                undo.pop_all()
        except BaseException:
            self._release_name(container)
            raise
        log.info("container created", id=container_id, pod=sandbox.id, name=container.name, runtime=runtime)
        self.events.publish("created", container)
        return container

    def _create(
        self,
        container: Container,
        sandbox: Sandbox,
        config: ContainerConfig,
        image_config: dict,
        undo: contextlib.ExitStack,
        restore: checkpoint.RestoreSource | None = None,
    ) -> None:
        chains = self.images.hold_layers(container.image_id)
        undo.callback(self.images.release_layers, chains)
        container.layers = chains
        persistent = self.settings.root_dir / container.id
        volatile = self.settings.state_dir / container.id
        rootfs = volatile / "rootfs"
        container.dir, container.rootfs, container.run_dir = str(persistent), str(rootfs), str(volatile)
        container.pending = "creating"
        # On record before the first step: after a crash from here on, start-up finds the
        # pending record and takes away whatever of the container exists.
        self.db.save(container)
        undo.callback(self.db.delete, container)
        failpoints.hit("container.recorded")
        (persistent / "upper").mkdir(parents=True, mode=0o755)
        (persistent / "work").mkdir(mode=0o700)
        undo.callback(shutil.rmtree, persistent, True)
        if restore is not None:
            # The checkpointed writable layer (checked and unpacked already) is the upper
            # directory; StartContainer restores from the CRIU images kept beside it.
            (persistent / "upper").rmdir()
            os.rename(restore.upper, persistent / "upper")
            os.rename(restore.images, persistent / checkpoint.CHECKPOINT_DIRECTORY)
        rootfs.mkdir(parents=True, mode=0o755)
        undo.callback(shutil.rmtree, volatile, True)
        layers, upper, work = (
            self.images.layer_dirs(container.image_id),
            persistent / "upper",
            persistent / "work",
        )
        if sandbox.userns_path:
            layers = _idmapped_layers(layers, upper, volatile / "idmap", sandbox, undo)
        mounts.mount_overlay(layers, upper, work, rootfs)
        undo.callback(mounts.unmount, rootfs)
        failpoints.hit("container.after_mount")
        if any(m.image for m in config.mounts):
            # The spec binds each image volume's mount like any host path.
            config = self._mount_image_volumes(container, config, volatile / "volumes", undo)
        context = spec.SandboxContext(
            pod_id=sandbox.id,
            hostname=sandbox.hostname,
            netns_path=sandbox.netns_path or None,
            ipc_ns_path=sandbox.ipcns_path or None,
            uts_ns_path=sandbox.utsns_path or None,
            pid_ns_path=self._pid_ns_path(sandbox, config),
            pid_mode=self._pid_mode(sandbox, config),
            hosts_path=str(Path(sandbox.dir) / "hosts"),
            resolv_path=str(Path(sandbox.dir) / "resolv.conf"),
            hostname_path=str(Path(sandbox.dir) / "hostname"),
            shm_path=sandbox.shm_path or None,
            # Set once in the pod's namespaces, which the container joins (cri_runtime.host.sysctl).
            sysctls={},
            privileged=sandbox.config.security.privileged,
            selinux_options=sandbox.config.security.selinux_options,
            **_userns_context(sandbox),
        )
        if config.security.privileged and not context.privileged:
            raise InvalidArgument("a privileged container needs a privileged pod sandbox")
        oci_spec = spec.build_container_spec(
            container_id=container.id,
            config=config,
            image_config=image_config,
            sandbox=context,
            rootfs=rootfs,
            cgroups_path=self.settings.cgroup_driver.container_cgroups_path(
                sandbox.cgroup_path, container.id
            ),
            oom_score_adj_floor=self.settings.oom_score_adj_floor,
            pids_limit=self.settings.pids_limit,
        )
        self.hooks.create_container(sandbox, container, oci_spec)  # NRI adjustments; raising undoes
        spec.check_resources_on_host(oci_spec["linux"]["resources"])
        # After the spec is built: a config it refuses makes no directory on the host.
        for host_path in spec.host_paths_to_create(config):
            try:
                host_path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InvalidArgument(
                    f"mount host path {str(host_path)!r} cannot be made: {exc.strerror}"
                ) from None
        for host_path, label in spec.relabel_targets(config, oci_spec):
            selinux.relabel(host_path, label)
        if sandbox.userns_path:
            _idmap_volumes(oci_spec, (volatile, Path(sandbox.dir)), Path(sandbox.userns_path), undo)
        apparmor.ensure_loaded(oci_spec["process"].get("apparmorProfile"))
        process = oci_spec["process"]
        user = process.get("user", {})
        container.user = [int(user.get("uid", 0)), int(user.get("gid", 0)), *user.get("additionalGids", [])]
        if not sandbox.userns_path:
            # Through an idmapped root the daemon's own root is not mapped: the runtime makes it.
            spec.ensure_working_dir(rootfs, process.get("cwd", "/"), container.user[0], container.user[1])
        bundle = container.bundle_dir
        bundle.mkdir(mode=0o700)
        (bundle / "config.json").write_text(json.dumps(oci_spec))
        if container.log_path:
            Path(container.log_path).parent.mkdir(parents=True, exist_ok=True)
        # The runtime's own create (conmon, `<runtime> create`) waits for StartContainer, as with
        # containerd: a created container is its record, root file system and bundle.
        container.pending = ""
        self.db.save(container)
        with self._guard:
            self.containers[container.id] = container

    def _mount_image_volumes(
        self, container: Container, config: ContainerConfig, base: Path, undo: contextlib.ExitStack
    ) -> ContainerConfig:
        """Mount each image volume (KEP-4639) read-only under ``base``, holding its image's layers
        for the container's life; the config returned names those mounts as host paths."""
        resolved: list[Mount] = []
        for position, mount in enumerate(config.mounts):
            if not mount.image:
                resolved.append(mount)
                continue
            field = f"mounts[{position}]"
            if not mount.readonly:
                raise InvalidArgument(f"{field}: an image volume is read-only; set readonly")
            image = self.images.resolve(mount.image)
            if image is None:
                raise NotFound(f"{field}.image {mount.image!r} is not present; pull it first")
            chains = self.images.hold_layers(image.id)
            undo.callback(self.images.release_layers, chains)
            container.layers = [*container.layers, *chains]
            target = base / str(position)
            target.mkdir(parents=True, mode=0o755)
            mounts.mount_layers_readonly(self.images.layer_dirs(image.id), target)
            undo.callback(mounts.unmount, target)
            source = _image_sub_path(target, mount.image_sub_path, field) if mount.image_sub_path else target
            container.image_volumes[mount.container_path] = image.id
            resolved.append(replace(mount, image="", image_sub_path="", host_path=str(source)))
        return replace(config, mounts=tuple(resolved))

    def _pid_mode(self, sandbox: Sandbox, config: ContainerConfig) -> spec.PidMode:
        mode = config.security.namespace_options.pid
        if mode == "pod" and not sandbox.init_pid:
            # The pod has no shared PID namespace (kubelet's default): one of its own, as
            # with containerd, whose pause container would otherwise be the one shared.
            return "container"
        return mode

    def _pid_ns_path(self, sandbox: Sandbox, config: ContainerConfig) -> str | None:
        options = config.security.namespace_options
        if options.pid == "pod":
            return f"/proc/{sandbox.init_pid}/ns/pid" if sandbox.init_pid else None
        if options.pid == "target":
            target = self.get(options.target_id)
            if target.state != "running" or not target.pid:
                raise FailedPrecondition(f"target container {options.target_id} is not running")
            return f"/proc/{target.pid}/ns/pid"
        return None

    # --- Start / Stop ----------------------------------------------------------------

    def start(self, container_id: str, sandbox: Sandbox) -> None:
        """conmon runs ``<runtime> create``, then ``<runtime> start``. A failure leaves the
        container exited with code 128 and reason StartError (as containerd does), and nothing
        of the runtime's behind; kubelet removes it and creates the next attempt."""
        container = self.get(container_id)
        with self.locks.hold(container.id):
            if container.state != "created":
                raise FailedPrecondition(f"container {container.id} is {container.state}, not created")
            executor = self.executor(container)
            restore_images = Path(container.dir) / checkpoint.CHECKPOINT_DIRECTORY
            restoring = not container.pid and restore_images.is_dir()
            try:
                if not container.pid:
                    # (A container created by an older pycri was created in the runtime already.)
                    container.pid = executor.create(
                        container.id,
                        container.bundle_dir,
                        Path(container.log_path)
                        if container.log_path
                        else Path(container.run_dir) / "console.log",
                        terminal=container.config.tty,
                        stdin=container.config.stdin,
                        stdin_once=container.config.stdin_once,
                        conmon_cgroup=self.settings.cgroup_driver.conmon_cgroup(sandbox.cgroup_path),
                        restore_from=restore_images if restoring else None,
                    )
                    failpoints.hit("container.after_conmon")
                started = time.time_ns()  # before: a quick process may exit before start returns
                if not restoring:  # a restored container runs already
                    executor.start(container.id)
                else:
                    shutil.rmtree(restore_images, ignore_errors=True)
            except Exception as exc:
                self._start_failed(container, exc)
                raise
            failpoints.hit("container.after_start")
            container.started_at_ns = started
            container.state = "running"
            self.db.save(container)
            self.exits.watch(container.id, executor.conmon_pid(container.id))
        log.info("container started", id=container.id)
        self.events.publish("started", container)

    def _start_failed(self, container: Container, error: Exception) -> None:
        try:
            self.executor(container).delete(container.id)
        except Exception as exc:
            # The start-up sweep collects a runtime state or conmon that no live container owns.
            log.error("cannot undo a failed start", id=container.id, error=str(exc))
        now = time.time_ns()
        container.state = "exited"
        container.pid = 0
        container.started_at_ns = container.started_at_ns or now
        container.finished_at_ns = now
        container.exit_code = START_ERROR_EXIT_CODE
        container.reason = "StartError"
        container.message = str(error)
        self.db.save(container)
        log.warning("container failed to start", id=container.id, error=str(error))
        self.events.publish("stopped", container)
        self.hooks.container_stopped(container)

    def stop(self, container_id: str, timeout: float) -> None:
        container = self.find(container_id)
        if container is None:
            return  # CRI: stopping a container that is gone is not an error
        self._stop(container, timeout)

    def _stop(self, container: Container, timeout: float) -> None:
        """Stop and wait on this thread (pod stop and removal, recovery: timeout 0, bounded)."""
        if self.stop_begin(container, timeout) == "signalled":
            self.executor(container).wait_exit(container.id, timeout)
        self.stop_finish(container)

    def stop_begin(self, container: Container, timeout: float) -> str:
        """The first, bounded, step of a stop: "done" (it was not running), "signalled" (the stop
        signal was sent: wait up to ``timeout`` for the exit, then ``stop_finish``), or "killed"
        (SIGKILL sent: ``stop_finish``). The grace period is waited for by the caller, off this
        thread when it can (cri_runtime.runtime.pods)."""
        with self.locks.hold(container.id):
            if container.state == "exited":
                return "done"
            executor = self.executor(container)
            if container.state == "created":
                # Never started: there is nothing to signal; it is exited as far as CRI goes.
                if container.pid:  # created in the runtime by an older pycri
                    executor.kill(container.id, signal.SIGKILL)
                    self._record_exit(container, executor.wait_exit(container.id, KILL_WAIT))
                else:
                    self._record_exit(container, None)
                return "done"
            if timeout > 0:
                executor.kill(container.id, _signal_number(container.stop_signal))
                failpoints.hit("container.stop_after_kill")
                return "signalled"
            self._kill_all(container, executor)
            return "killed"

    def _kill_all(self, container: Container, executor: Executor) -> None:
        """SIGKILL everything the container runs."""
        if not (container.pid and _kill_pid_namespace(container.pid, container.id)):
            executor.kill(container.id, signal.SIGKILL, all_processes=True)

    def stop_kill(self, container: Container) -> str:
        """After the grace period: SIGKILL everything the container runs ("killed"), unless it
        exited meanwhile ("done"). The caller then waits for the exit and calls ``stop_finish``."""
        with self.locks.hold(container.id):
            if container.state == "exited":
                return "done"
            executor = self.executor(container)
            if executor.exit_info(container.id) is not None:
                return "killed"  # exited; the watcher records it, or stop_finish does
            self._kill_all(container, executor)
            return "killed"

    def stop_finish(self, container: Container, wait: float = KILL_WAIT) -> None:
        """The last step of a stop: SIGKILL what still runs, wait (bounded) and record the exit."""
        with self.locks.hold(container.id):
            if container.state == "exited":
                return
            executor = self.executor(container)
            if executor.exit_info(container.id) is None:
                self._kill_all(container, executor)
            self._record_exit(container, executor.wait_exit(container.id, wait))

    def _record_exit(self, container: Container, info: object) -> None:
        exit_code = getattr(info, "exit_code", 137)
        finished = getattr(info, "finished_at_ns", 0) or time.time_ns()
        # The exit file's mtime comes from the kernel's coarse clock (up to a tick behind), and a
        # quick command can end within that tick of its start: an exit never precedes its start.
        finished = max(finished, container.started_at_ns)
        oom = bool(getattr(info, "oom_killed", False))
        # The runtime's state of an exited container is dropped now, not at RemoveContainer; before
        # the exit is visible, so that a RemoveContainer right after the stop has no runtime call
        # left to make (or race).
        self.executor(container).forget_stopped(container.id)
        was_exited = container.state == "exited"
        container.state = "exited"
        container.exit_code = exit_code
        container.finished_at_ns = finished
        container.reason = "OOMKilled" if oom else ("Completed" if exit_code == 0 else "Error")
        container.pid = 0
        with self._guard:
            # The exit watcher records without the container's lock: a RemoveContainer may have
            # taken the record away meanwhile, and saving would bring it back at the next start.
            if container.id not in self.containers:
                return
            self.db.save(container)
        self.exits.exited(container.id)
        if not was_exited:
            self.events.publish("stopped", container)
            self.hooks.container_stopped(container)

    def stop_all_in_pod(self, pod_id: str) -> None:
        for container in self.in_pod(pod_id):
            self._stop(container, 0)

    # --- Remove ----------------------------------------------------------------------

    def remove(self, container_id: str) -> None:
        """RemoveContainer: the record goes at once; the files follow on the cleanup pool."""
        container = self.find(container_id)
        if container is None:
            return  # CRI: removing a removed container succeeds
        self._remove(container, defer_files=True)

    def _remove(self, container: Container, *, defer_files: bool = False) -> None:
        if container.state in ("running", "created"):
            self._stop(container, 0)
        with self.locks.hold(container.id):
            if container.id not in self.containers:
                return  # removed meanwhile
            # The commit point: once the record is gone, so is the container; what of it is left
            # on the host belongs to no record, and the start-up sweep collects it after a crash.
            self._forget_record(container)
            failpoints.hit("container.remove_recorded")
            self._release_name(container)
            self.exits.forget(container.id)
            if defer_files:
                future = self._cleanup.submit(self._remove_files, container)
                with self._guard:
                    self._cleanups.add(future)
                future.add_done_callback(self._cleanup_done)
            else:
                self._remove_files(container)
        log.info("container removed", id=container.id)
        self.events.publish("deleted", container)

    def _forget_record(self, container: Container) -> None:
        """Delete the container's record and drop it from memory, as one step against
        ``_record_exit``'s save (which checks, under the same guard, that it is still here)."""
        with self._guard:
            self.db.delete(container)
            self.containers.pop(container.id, None)

    def _cleanup_done(self, future: Future[None]) -> None:
        with self._guard:
            self._cleanups.discard(future)

    def _remove_files(self, container: Container) -> None:
        """A removed container's monitor files, runtime state, rootfs mount and directories, then its
        layers (after the unmount: an image removal may then delete them). Never raises."""
        try:
            self.executor(container).delete(container.id)
            failpoints.hit("container.remove_after_delete")
            self.settings.cgroup_driver.release_container(container.id)
            mounts.unmount_all_under(Path(container.run_dir))
        except Exception as exc:
            log.error("cannot clean up a removed container", id=container.id, error=str(exc))
            return  # its layers stay held; the next start's sweep takes the rest
        shutil.rmtree(container.run_dir, ignore_errors=True)
        shutil.rmtree(container.dir, ignore_errors=True)
        self.images.release_layers(container.layers)

    def remove_all_in_pod(self, pod_id: str) -> list[Container]:
        """Remove the pod's containers; the answer is those removed."""
        removed = list(self.in_pod(pod_id))
        for container in removed:
            self._remove(container)
        return removed

    def writable_layers_usage(self) -> FsUsage:
        """What the containers' own layers (upper and work directories) cost on disk: the container
        filesystem of ImageFsInfo, apart from the image layers. Walks the disk: a worker thread's job."""
        used, inodes = disk_usage(self.settings.root_dir)
        return FsUsage(str(self.settings.root_dir), used, inodes, time.time_ns())

    # --- UpdateContainerResources --------------------------------------------------------

    def update_resources(self, container_id: str, wanted: LinuxResources) -> None:
        """Change a container's cgroup limits, all or nothing.

        The runtime writes one cgroup file after another; when a later one is refused (a memory
        limit below what the container already uses), the earlier ones are put back.
        """
        container = self.get(container_id)
        resources, adj = spec.linux_resources(wanted, self.settings.oom_score_adj_floor)
        spec.check_resources_on_host(resources)
        with self.locks.hold(container.id):
            if container.state not in ("created", "running"):
                raise FailedPrecondition(
                    f"container {container.id} is {container.state}; only a live container can be updated"
                )
            bundle_config = container.bundle_dir / "config.json"
            oci_spec = json.loads(bundle_config.read_text())
            current = oci_spec.get("linux", {}).get("resources", {})
            previous = _restorable(current, resources)
            executor = self.executor(container)
            limit = resources.get("memory", {}).get("limit", 0)
            cgroup = cgroups.v2_cgroup_of(container.pid) if limit and container.pid else None
            if cgroup is not None:
                # cgroup v2 would OOM-kill the container to meet the limit; v1 refuses it (EBUSY).
                cgroups.check_memory_fits(cgroup, limit, f"container {container.id}")
            try:
                if container.state == "running" or container.pid:
                    executor.update_resources(container.id, resources)
                # else: not in the runtime yet; the bundle below is what StartContainer creates.
            except Exception as failure:
                try:
                    executor.update_resources(container.id, previous)
                except Exception as exc:
                    # The cgroup may now hold some of the new limits and some of the old.
                    log.error(
                        "cannot roll back a failed resource update",
                        id=container.id,
                        update_error=str(failure),
                        rollback=previous,
                        error=str(exc),
                    )
                raise
            merged = dict(current)
            for key, value in resources.items():
                merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
            oci_spec.setdefault("linux", {})["resources"] = merged
            oci_spec["process"]["oomScoreAdj"] = adj
            tmp = bundle_config.with_suffix(".tmp")
            tmp.write_text(json.dumps(oci_spec))
            os.replace(tmp, bundle_config)
            container.config = replace(container.config, resources=wanted)
            self.db.save(container)
        log.info("container resources updated", id=container.id, resources=resources)

    # --- ExecSync, logs ---------------------------------------------------------------

    async def exec_async(self, container_id: str, cmd: list[str], timeout: float | None) -> ExecResult:
        """ExecSync awaited on the event loop: no thread waits while the command runs."""
        container = self._exec_target(container_id, cmd)
        result = await self.executor(container).exec_async(
            container.id, cmd, timeout, max_output=EXEC_OUTPUT_CAP
        )
        return self._exec_outcome(container, cmd, timeout, result)

    def _exec_target(self, container_id: str, cmd: list[str]) -> Container:
        container = self.get(container_id)
        if not cmd:
            raise InvalidArgument("ExecSync: cmd is empty")
        if container.state != "running":
            raise FailedPrecondition(f"container {container.id} is {container.state}, not running")
        return container

    @staticmethod
    def _exec_outcome(
        container: Container, cmd: list[str], timeout: float | None, result: ExecResult
    ) -> ExecResult:
        if result.timed_out:
            raise DeadlineExceeded(
                f"ExecSync {cmd[0]!r} in container {container.id} exceeded its {timeout:g}s timeout; killed"
            )
        if result.truncated:
            raise ResourceExhausted(
                f"ExecSync {cmd[0]!r} in container {container.id}: output exceeds "
                f"{EXEC_OUTPUT_CAP // (1024 * 1024)} MiB"
            )
        return result

    def reopen_log(self, container_id: str) -> None:
        container = self.get(container_id)
        if container.state != "running":
            raise FailedPrecondition(
                f"container {container.id} is {container.state}; its log cannot be reopened"
            )
        self.executor(container).reopen_log(container.id)
