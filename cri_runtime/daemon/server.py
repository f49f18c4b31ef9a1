"""The pycri daemon: gRPC on a unix socket, the servicers wrapped for logging and error mapping (cri.rpc)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import ssl
import stat
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from cri_runtime.cri import convert
from cri_runtime.cri.runtime_service import RuntimeService
from cri_runtime.cri.servicers import add_servicers
from cri_runtime.cri.status import status_code
from cri_runtime.daemon import metrics
from cri_runtime.daemon.config import Config
from cri_runtime.daemon.images_api import ImagesAPI
from cri_runtime.errors import FailedPrecondition, InvalidArgument, PycriError
from cri_runtime.host import apparmor, cgroups, systemd
from cri_runtime.network.cni import CNI
from cri_runtime.nri.adaptation import ContainerControl, Nri
from cri_runtime.oci import runtimes as oci_runtimes
from cri_runtime.oci.conmon import Executor
from cri_runtime.runtime import recovery
from cri_runtime.runtime.containers import ContainerManager, ContainerSettings
from cri_runtime.runtime.pods import Pods
from cri_runtime.runtime.sandboxes import DEFAULT_CGROUP_PARENT, SandboxManager, SandboxSettings
from cri_runtime.runtime.state import Container, LegacyConfigs, Sandbox, StateDB
from cri_runtime.streaming import StreamingServer
from imageservice.importer import import_archive
from imageservice.service import ImageService
from imageservice.store import ImageStore

log = structlog.get_logger("pycri.server")

MAX_MESSAGE = 16 * 1024 * 1024 + 1024 * 1024  # ExecSync output cap plus framing
ADMIN_SERVICE = "pycri.v1.Admin"


def prepare_socket(path: Path) -> None:
    """Replace a stale socket file; refuse when a live server owns the path."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FailedPrecondition(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket", socket=str(path))
        path.unlink(missing_ok=True)
        return
    except OSError as exc:
        raise FailedPrecondition(f"cannot tell whether {path} is in use: {exc}") from exc
    finally:
        probe.close()
    raise FailedPrecondition(f"another server is listening on {path}; stop it or choose another --socket")


def _admin_handler(store: ImageStore) -> grpc.GenericRpcHandler:
    """A private service for pycri's own CLI (``pycri image import``), JSON over gRPC."""

    async def import_image(request: dict, context: grpc.aio.ServicerContext) -> dict:
        archive = request.get("path")
        if not isinstance(archive, str) or not archive:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ImportImage needs a path")
        loop = asyncio.get_running_loop()
        try:
            records = await loop.run_in_executor(None, import_archive, store, Path(archive))
        except PycriError as exc:
            await context.abort(status_code(exc), str(exc))
        return {"images": [{"id": r.id, "repo_tags": r.repo_tags} for r in records]}

    return grpc.method_handlers_generic_handler(
        ADMIN_SERVICE,
        {
            "ImportImage": grpc.unary_unary_rpc_method_handler(
                import_image,
                request_deserializer=json.loads,
                response_serializer=lambda d: json.dumps(d).encode(),
            )
        },
    )


async def serve(
    config: Config,
    ready: Callable[[], None] | None = None,
    stopping: Callable[[], None] | None = None,
) -> None:
    socket_path = config.socket_path
    loop = asyncio.get_running_loop()
    _prepare_loop(loop)
    # Before anything is made: a systemd driver without a reachable systemd refuses to start.
    cgroup_driver = await loop.run_in_executor(None, make_cgroup_driver, config)
    # Start-up touches the disk, runs the runtimes' --version and recovers state: off the loop.
    await loop.run_in_executor(None, prepare_socket, socket_path)
    for directory in (Path(config.root), Path(config.state)):
        directory.mkdir(parents=True, exist_ok=True, mode=0o711)
    runtimes = await loop.run_in_executor(None, oci_runtimes.detect)
    default, why = oci_runtimes.choose_default(config.default_runtime, runtimes)
    (log.info if default else log.warning)("oci runtime", decision=why)
    store = await loop.run_in_executor(None, ImageStore, Path(config.root), config.image)
    store.pull_observer = metrics.METRICS
    runtime = await loop.run_in_executor(None, build_runtime, config, store, runtimes, default, cgroup_driver)
    image_service = ImageService(store, container_fs=runtime.containers.writable_layers_usage)
    runtime.containers.start_watcher(loop)
    nri_service = None
    if config.nri.enable:
        control = ContainerControl(
            find=runtime.containers.find,
            update=runtime.pods.apply_container_resources,
            evict=functools.partial(_evict, runtime.pods),
        )
        nri_service = Nri(
            config.nri, functools.partial(_nri_snapshot, runtime), runtime.sandboxes.find, control
        )
        await nri_service.start()
        runtime.pods.set_hooks(nri_service)
    metrics.METRICS.watch_runtime(runtime.sandboxes.all, runtime.containers.all)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    runtime_service = RuntimeService(config, runtimes, default, why, runtime.pods, runtime.cni)
    streaming = StreamingServer(
        runtime.containers,
        runtime.sandboxes,
        config.streaming.address,
        config.streaming.port,
        ssl_context=_streaming_tls(config),
    )
    await streaming.start()
    metrics_server = await metrics.start_server(config.metrics_address)
    runtime_service.streaming = streaming
    add_servicers(server, runtime_service, image_service, metrics.METRICS.observe_rpc)
    server.add_generic_rpc_handlers(
        (_admin_handler(store), ImagesAPI(store, runtime.containers, runtime.pods).handler())
    )
    # The socket is born 0660 (umask) so there is no moment when others may connect.
    old_umask = os.umask(0o117)
    try:
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(socket_path, 0o660)
    log.info("serving", socket=str(socket_path), root=config.root, state=config.state)
    if ready:
        ready()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        if stopping:
            stopping()
    finally:
        log.info("shutting down")
        await server.stop(grace=5)
        if nri_service is not None:
            await nri_service.stop()
        await streaming.stop()
        if metrics_server is not None:
            await metrics_server.stop()
        runtime.containers.close()
        image_service.close()
        store.close()
        runtime.db.close()
        cgroup_driver.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        log.info("stopped")


# Worker threads do bounded work only (file system, SQLite, runtime calls with timeouts): waits of
# unbounded length (stop grace periods, exec timeouts, exits) are awaited on the loop. Sized so that
# many pods set up at once do not queue behind each other on two cores.
WORKER_THREADS = 32


def _prepare_loop(loop: asyncio.AbstractEventLoop) -> None:
    loop.set_default_executor(ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="cri"))
    if sys.version_info < (3, 12):
        # 3.11's default child watcher parks a thread in waitpid() per subprocess (each ExecSync);
        # a pidfd watcher waits on the loop instead (3.12 does this by itself).
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(loop)
        asyncio.set_child_watcher(watcher)


def _streaming_tls(config: Config) -> ssl.SSLContext | None:
    cert, key = config.streaming.tls_cert_file, config.streaming.tls_key_file
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"streaming TLS: cannot load {cert} / {key}: {exc}") from exc
    return context


@dataclass
class Runtime:
    db: StateDB
    cni: CNI
    pods: Pods

    @property
    def sandboxes(self) -> SandboxManager:
        return self.pods.sandboxes

    @property
    def containers(self) -> ContainerManager:
        return self.pods.containers


def oom_score_adj_floor() -> int | None:
    """pycri's own oom_score_adj when it cannot go lower (no CAP_SYS_RESOURCE), else None."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                if int(line.split()[1], 16) & (1 << 24):
                    return None
                break
    with open("/proc/self/oom_score_adj") as fh:
        return int(fh.read().strip())


def load_apparmor_profile(state: Path) -> None:
    """Load pycri-default where AppArmor is on; a failure is said once here, and every container
    that needs the profile is refused with the reason (it never runs unconfined instead)."""
    if not apparmor.enabled():
        log.info("AppArmor is not enabled on this host: containers get no AppArmor profile")
        return
    try:
        loaded = apparmor.ensure_default(state / "apparmor" / apparmor.DEFAULT_PROFILE)
    except FailedPrecondition as exc:
        log.error("AppArmor default profile not loaded; containers that need it are refused", error=str(exc))
        return
    log.info("AppArmor default profile", profile=apparmor.DEFAULT_PROFILE, loaded_now=loaded)


def make_cgroup_driver(config: Config) -> cgroups.CgroupDriver:
    """The configured cgroup driver, checked usable on this host (FailedPrecondition if not)."""
    version = (
        "v2"
        if cgroups.is_cgroup2_only()
        else "hybrid"
        if (cgroups.CGROUP_ROOT / "unified" / "cgroup.controllers").exists()
        else "v1"
    )
    if config.cgroup_driver == "systemd":
        driver = systemd.SystemdDriver()
        try:
            systemd_version = driver.require()
        except BaseException:
            driver.close()
            raise
        log.info("cgroups", version=version, driver="systemd", systemd=systemd_version)
        return driver
    log.info("cgroups", version=version, driver="cgroupfs")
    return cgroups.CgroupfsDriver(DEFAULT_CGROUP_PARENT)


def build_runtime(
    config: Config,
    store: ImageStore,
    runtimes: dict[str, oci_runtimes.RuntimeInfo],
    default: oci_runtimes.RuntimeInfo | None,
    cgroup_driver: cgroups.CgroupDriver | None = None,
) -> Runtime:
    """The pod and container side: state DB, CNI, executors, managers, restored state."""
    cgroup_driver = cgroup_driver or cgroups.CgroupfsDriver(DEFAULT_CGROUP_PARENT)
    root, state = Path(config.root), Path(config.state)
    load_apparmor_profile(state)
    # A DB of an older pycri holds configs as the CRI schema's bytes, which only cri/ can read.
    legacy = LegacyConfigs(sandbox=convert.legacy_sandbox_config, container=convert.legacy_container_config)
    db = StateDB(root / "runtime.db", legacy)
    network = config.network
    cni = CNI(
        Path(network.conf_dir),
        [Path(d) for d in network.bin_dirs],
        state / "cni",
        builtin_subnet=network.pod_subnet,
        builtin_bridge=network.bridge,
    )
    usable = {name: info for name, info in runtimes.items() if info.usable}
    executors = {
        name: Executor(name, info.path, state / "exec", cgroup_driver=cgroup_driver)
        for name, info in usable.items()
    }
    sandboxes = SandboxManager(
        SandboxSettings(
            state / "sandboxes", default.name if default else "", tuple(usable), cgroup_driver, root_dir=root
        ),
        db,
        cni,
    )
    containers = ContainerManager(
        ContainerSettings(
            root / "containers", state / "containers", oom_score_adj_floor(), cgroup_driver, config.pids_limit
        ),
        db,
        store,
        executors,
        default.name if default else "",
    )
    pods = Pods(sandboxes, containers)
    recover(db, root, state, pods, executors, cni, cgroup_driver)
    store.collect_unused()
    return Runtime(db, cni, pods)


def _evict(pods: Pods, container_id: str) -> None:
    """An NRI plugin's eviction: the container is stopped at once, as containerd does."""
    pods.stop_container(container_id, 0)


def _nri_snapshot(runtime: Runtime) -> tuple[list[Sandbox], list[Container], dict[str, dict[str, Any]]]:
    """What NRI's Synchronize tells a new plugin: ready pods, their containers, and their specs."""
    sandboxes = [s for s in runtime.sandboxes.all() if s.state == "ready" and not s.pending]
    ready = {s.id for s in sandboxes}
    containers = [c for c in runtime.containers.all() if c.pod_id in ready and not c.pending]
    specs: dict[str, dict[str, Any]] = {}
    for container in containers:
        with contextlib.suppress(OSError, ValueError):
            specs[container.id] = json.loads((container.bundle_dir / "config.json").read_text())
    return sandboxes, containers, specs


def recover(
    db: StateDB,
    root: Path,
    state: Path,
    pods: Pods,
    executors: dict[str, Executor],
    cni: CNI,
    cgroup_driver: cgroups.CgroupDriver | None = None,
) -> None:
    """Bring the host and the records into agreement after a restart or a crash."""
    started = time.perf_counter()
    sandboxes, containers = pods.sandboxes, pods.containers
    saved_sandboxes, saved_containers = db.load()
    usable = [c for c in saved_containers if c.runtime in executors]
    for container in saved_containers:
        if container.runtime not in executors:
            # Kept on record and on disk (the sweep spares them) but not served: its runtime
            # is not usable now; it comes back when the runtime does.
            log.warning(
                "container's runtime is not usable; not restoring it",
                id=container.id,
                runtime=container.runtime,
            )
    pods.restore(saved_sandboxes, usable)
    known = recovery.Known(
        sandboxes={s.id for s in sandboxes.all()},
        containers={c.id for c in saved_containers if c.runtime not in executors}
        | {c.id for c in containers.all()},
        pod_cgroups=[s.cgroup_path for s in sandboxes.all() if s.cgroup_path],
    )
    recovery.sweep(state, root, executors, cni, known, DEFAULT_CGROUP_PARENT, cgroup_driver)
    log.info(
        "state restored",
        pods=len(known.sandboxes),
        containers=len(known.containers),
        ms=round((time.perf_counter() - started) * 1000, 1),
    )


def validate_paths(config: Config) -> None:
    for name in ("root", "state"):
        if not os.path.isabs(getattr(config, name)):
            raise InvalidArgument(f"--{name} must be an absolute path, got {getattr(config, name)!r}")
    if not os.path.isabs(str(config.socket_path)):
        raise InvalidArgument(f"--socket must be an absolute path, got {config.socket!r}")
