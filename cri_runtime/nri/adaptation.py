"""The runtime side of NRI: the socket, the plugins, and the lifecycle hooks that call them.

Flow (facts from containerd/nri's adaptation and stub): a plugin connects (or is started from
``plugin_path`` with its end of a socket pair as fd 3 in NRI_PLUGIN_SOCKET), calls
Runtime.RegisterPlugin; the runtime then calls Plugin.Configure (the answer is the plugin's event
mask, bit ``event - 1``) and Plugin.Synchronize with the current pods and containers, and from then
on calls it for the events it subscribed to, plugins in (index, name) order. Registration and
synchronisation hold the plugins' write lock, lifecycle events its read lock: a pod or container
made while a plugin synchronises is reported to it afterwards, never lost.

Failures: a plugin that errors on RunPodSandbox, UpdatePodSandbox, CreateContainer, StartContainer
or UpdateContainer fails that call; a plugin that times out or breaks the protocol is dropped (and
the call goes on without it); errors from notification events are logged. A validator plugin
(subscribed to ValidateContainerAdjustment) that rejects, errs or times out fails CreateContainer.

Container updates and evictions: a plugin may ask for updates in its answers to Synchronize,
CreateContainer, UpdateContainer and StopContainer (merged with the adjustments' one-owner-per-field
rule), for evictions in its answers to CreateContainer and UpdateContainer, and for both unsolicited,
through the runtime service's UpdateContainers. Each update is applied as UpdateContainerResources
is, all or nothing, without asking the plugins again; an eviction stops the container at once
(timeout 0), as containerd does. The updates an event's answers ask for are applied after the event,
off the calling thread (which holds its pod's lock); UpdateContainers answers the plugin with the
updates that failed (an unknown container, a value the kernel or the CRI refuses), leaving out
those marked ignore_failure.

The runtime calls the hooks from its worker threads; the plugins are served on the daemon's event
loop, and each hook waits there for its answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import subprocess
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from cri_runtime import __version__
from cri_runtime.errors import FailedPrecondition, InvalidArgument
from cri_runtime.model import LinuxResources
from cri_runtime.nri import adjust
from cri_runtime.nri.api import api_pb2 as nri
from cri_runtime.nri.resources import from_nri, to_nri, unsupported
from cri_runtime.nri.settings import NriConfig
from cri_runtime.nri.ttrpc import CODE_UNIMPLEMENTED, MuxChannel, TtrpcError
from cri_runtime.runtime.hooks import LifecycleHooks
from cri_runtime.runtime.state import Container, Sandbox

log = structlog.get_logger("pycri.nri")

T = TypeVar("T")

PLUGIN_SERVICE = "nri.pkg.api.v1alpha1.Plugin"
RUNTIME_SERVICE = "nri.pkg.api.v1alpha1.Runtime"
NRI_VERSION = "v0.12.1"
RUNTIME_NAME = "pycri"

StateSnapshot = Callable[[], tuple[list[Sandbox], list[Container], dict[str, dict[str, Any]]]]
"""Pods, containers and each container's OCI spec (by id), for Synchronize."""


@dataclass(frozen=True)
class ContainerControl:
    """What plugins' container updates and evictions need from the runtime; blocking calls, made
    from worker threads that hold no pod lock."""

    find: Callable[[str], Container | None]
    update: Callable[[str, LinuxResources], None]  # all or nothing; raises a CRI error
    evict: Callable[[str], None]  # stop now


def _mask(event: int) -> int:
    return 1 << (event - 1)


_CONTAINER_STATE = {
    "created": nri.CONTAINER_CREATED,
    "running": nri.CONTAINER_RUNNING,
    "exited": nri.CONTAINER_STOPPED,
}


def pod_message(sandbox: Sandbox) -> Any:
    pod = nri.PodSandbox(
        id=sandbox.id,
        name=sandbox.name,
        uid=sandbox.uid,
        namespace=sandbox.namespace,
        labels=sandbox.labels,
        annotations=sandbox.annotations,
        runtime_handler=sandbox.runtime_handler,
        ips=[ip for ip in [sandbox.ip, *sandbox.additional_ips] if ip],
    )
    pod.linux.cgroups_path = sandbox.cgroup_path
    pod.linux.cgroup_parent = sandbox.config.cgroup_parent
    for kind, path in (
        ("network", sandbox.netns_path),
        ("ipc", sandbox.ipcns_path),
        ("uts", sandbox.utsns_path),
    ):
        if path:
            pod.linux.namespaces.add(type=kind, path=path)
    return pod


def container_message(container: Container, oci_spec: dict[str, Any] | None) -> Any:
    msg = nri.Container(
        id=container.id,
        pod_sandbox_id=container.pod_id,
        name=container.name,
        state=_CONTAINER_STATE.get(container.state, nri.CONTAINER_UNKNOWN),
        labels=container.labels,
        annotations=container.annotations,
        pid=container.pid,
        created_at=container.created_at_ns,
        started_at=container.started_at_ns,
        finished_at=container.finished_at_ns,
        exit_code=container.exit_code,
        status_reason=container.reason,
        status_message=container.message,
    )
    if oci_spec:
        _spec_resources(msg.linux.resources, oci_spec.get("linux", {}).get("resources", {}))
        process = oci_spec.get("process", {})
        msg.args.extend(process.get("args", []))
        msg.env.extend(process.get("env", []))
        for mount in oci_spec.get("mounts", []):
            msg.mounts.add(
                destination=mount.get("destination", ""),
                type=mount.get("type", ""),
                source=mount.get("source", ""),
                options=mount.get("options", []),
            )
        msg.linux.cgroups_path = oci_spec.get("linux", {}).get("cgroupsPath", "")
    return msg


def _spec_resources(out: Any, resources: dict[str, Any]) -> None:
    """OCI linux.resources (memory and CPU) into NRI's LinuxResources."""
    memory, cpu = resources.get("memory", {}), resources.get("cpu", {})
    for name in ("limit", "reservation", "swap"):
        if isinstance(memory.get(name), int):
            getattr(out.memory, name).value = memory[name]
    for name in ("shares", "quota", "period"):
        if isinstance(cpu.get(name), int):
            getattr(out.cpu, name).value = cpu[name]
    out.cpu.cpus = str(cpu.get("cpus", ""))
    out.cpu.mems = str(cpu.get("mems", ""))
    if isinstance(resources.get("unified"), dict):
        out.unified.update({str(k): str(v) for k, v in resources["unified"].items()})


@dataclass(eq=False)  # identity: plugins are kept in sets
class Plugin:
    channel: MuxChannel
    name: str = ""
    idx: str = ""
    events: int = 0
    registered: asyncio.Event = field(default_factory=asyncio.Event)
    process: subprocess.Popen[bytes] | None = None

    @property
    def label(self) -> str:
        return f"{self.idx}-{self.name}" if self.name else "unregistered plugin"

    def wants(self, event: int) -> bool:
        return bool(self.events & _mask(event))


class RWLock:
    """Many readers (events) or one writer (a plugin's registration), on the event loop."""

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def read(self) -> Any:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def write(self) -> Any:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()


class Nri(LifecycleHooks):
    """NRI for one daemon: call :meth:`start` on the daemon's loop, :meth:`stop` on shutdown."""

    def __init__(
        self,
        config: NriConfig,
        snapshot: StateSnapshot,
        find_pod: Callable[[str], Sandbox | None],
        control: ContainerControl | None = None,
    ) -> None:
        self.config = config
        self.snapshot = snapshot
        self.find_pod = find_pod
        self.control = control
        # StopContainer notifications in flight or sent, by container: each is sent once, and
        # RemoveContainer (or the pod's StopPodSandbox) waits for it, keeping NRI's order.
        self._stops: dict[str, asyncio.Task[Any]] = {}
        self.plugins: list[Plugin] = []
        # Plugins between Configure and the end of their Synchronize: an event made meanwhile must
        # wait for the synchronisation (the read lock) and then reach them, not skip them.
        self._registering = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._lock: RWLock | None = None
        self._connections: set[Plugin] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- life of the service ---------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._lock = RWLock()
        if not self.config.disable_connections:
            path = Path(self.config.socket_path)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
            self._server = await asyncio.start_unix_server(self._accept, path=str(path))
            os.chmod(path, 0o600)
            log.info("NRI socket serving", path=str(path))
        await self._start_preinstalled()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                Path(self.config.socket_path).unlink()
        for plugin in list(self._connections):
            await self._drop(plugin, "runtime shutting down")
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_preinstalled(self) -> None:
        directory = Path(self.config.plugin_path)
        if not directory.is_dir():
            return
        for entry in sorted(directory.iterdir()):
            idx, _, name = entry.name.partition("-")
            if not (len(idx) == 2 and idx.isdigit() and name) or not os.access(entry, os.X_OK):
                log.warning("NRI: ignoring plugin file (want an executable named NN-name)", path=str(entry))
                continue
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            # NRI_PLUGIN_SOCKET names the inherited fd of the plugin's end of the connection.
            env = dict(
                os.environ, NRI_PLUGIN_NAME=name, NRI_PLUGIN_IDX=idx, NRI_PLUGIN_SOCKET=str(theirs.fileno())
            )
            config_file = Path(self.config.plugin_config_path) / f"{entry.name}.conf"
            if not config_file.exists():
                config_file = Path(self.config.plugin_config_path) / f"{name}.conf"
            try:
                process = subprocess.Popen(
                    [str(entry)],
                    env=env,
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                )
            except OSError as exc:
                log.error("NRI: cannot start plugin", path=str(entry), error=str(exc))
                ours.close()
                theirs.close()
                continue
            theirs.close()
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            plugin = self._connect(reader, writer)
            plugin.process = process
            plugin.name, plugin.idx = name, idx
            plugin.config_file = config_file  # type: ignore[attr-defined]

    # --- connections --------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connect(reader, writer)

    def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Plugin:
        holder: list[Plugin] = []

        async def handle(service: str, method: str, payload: bytes) -> bytes:
            return await self._serve(holder[0], service, method, payload)

        channel = MuxChannel.runtime_side(reader, writer, handle)
        plugin = Plugin(channel)
        holder.append(plugin)
        self._connections.add(plugin)
        channel.start()
        self._spawn(self._watch(plugin))
        return plugin

    async def _watch(self, plugin: Plugin) -> None:
        """Registration within its timeout, then until the connection ends."""
        try:
            await asyncio.wait_for(plugin.registered.wait(), self.config.plugin_registration_timeout)
        except TimeoutError:
            await self._drop(plugin, "did not register in time")
            return
        await plugin.channel.closed.wait()
        await self._drop(plugin, plugin.channel.close_reason)

    async def _drop(self, plugin: Plugin, reason: str) -> None:
        if plugin not in self._connections:
            return
        self._connections.discard(plugin)
        if plugin in self.plugins:
            self.plugins.remove(plugin)
        log.warning("NRI plugin removed", plugin=plugin.label, reason=reason)
        await plugin.channel.close(reason)
        if plugin.process is not None:
            process = plugin.process
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.get_running_loop().run_in_executor(None, process.wait)

    async def _serve(self, plugin: Plugin, service: str, method: str, payload: bytes) -> bytes:
        if service != RUNTIME_SERVICE:
            raise TtrpcError(CODE_UNIMPLEMENTED, f"service {service} is not served here")
        if method == "RegisterPlugin":
            request = nri.RegisterPluginRequest.FromString(payload)
            if plugin.registered.is_set():
                raise TtrpcError(9, "plugin is already registered")
            if not request.plugin_name or not (len(request.plugin_idx) == 2 and request.plugin_idx.isdigit()):
                raise TtrpcError(3, "plugin name must be set and plugin index must be two digits")
            plugin.name, plugin.idx = request.plugin_name, request.plugin_idx
            plugin.registered.set()
            self._spawn(self._register(plugin))
            return nri.Empty().SerializeToString()
        if method == "UpdateContainers":
            if not plugin.registered.is_set():
                raise TtrpcError(9, "plugin is not registered")
            request = nri.UpdateContainersRequest.FromString(payload)
            log.info(
                "NRI plugin asks for container updates",
                plugin=plugin.label,
                update=[u.container_id for u in request.update],
                evict=[e.container_id for e in request.evict],
            )
            failed = await asyncio.get_running_loop().run_in_executor(
                None, self._apply, list(request.update), list(request.evict), plugin.label
            )
            return nri.UpdateContainersResponse(failed=failed).SerializeToString()
        raise TtrpcError(CODE_UNIMPLEMENTED, f"method {method} is not served here")

    async def _register(self, plugin: Plugin) -> None:
        assert self._lock is not None
        timeout = self.config.plugin_registration_timeout
        try:
            config_text = ""
            config_file = getattr(plugin, "config_file", None)
            if config_file is not None and config_file.exists():
                config_text = config_file.read_text()
            configure = nri.ConfigureRequest(
                config=config_text,
                runtime_name=RUNTIME_NAME,
                runtime_version=__version__,
                registration_timeout=int(self.config.plugin_registration_timeout * 1000),
                request_timeout=int(self.config.plugin_request_timeout * 1000),
                NRI_version=NRI_VERSION,
            )
            reply = nri.ConfigureResponse.FromString(
                await plugin.channel.call(PLUGIN_SERVICE, "Configure", configure.SerializeToString(), timeout)
            )
            plugin.events = reply.events if reply.events else (1 << (nri.LAST - 1)) - 1
            self._registering += 1
            try:
                await self._synchronize(plugin, timeout)
            finally:
                self._registering -= 1
            log.info("NRI plugin registered", plugin=plugin.label, events=hex(plugin.events))
        except (TtrpcError, Exception) as exc:
            await self._drop(plugin, f"registration failed: {exc}")

    async def _synchronize(self, plugin: Plugin, timeout: float) -> None:
        """Synchronize under the write lock; the plugin gets events once this is done."""
        assert self._lock is not None
        async with self._lock.write():
            pods, containers, specs = await asyncio.get_running_loop().run_in_executor(None, self.snapshot)
            request = nri.SynchronizeRequest(
                pods=[pod_message(s) for s in pods],
                containers=[container_message(c, specs.get(c.id)) for c in containers],
            )
            synced = nri.SynchronizeResponse.FromString(
                await plugin.channel.call(PLUGIN_SERVICE, "Synchronize", request.SerializeToString(), timeout)
            )
            if plugin in self._connections:
                self.plugins.append(plugin)
                self.plugins.sort(key=lambda p: (p.idx, p.name))
        if synced.update and plugin in self._connections:
            # The plugin's updates to existing containers (containerd: "post-sync updates").
            self._spawn(self._apply_async(list(synced.update), [], plugin.label))

    def _idle(self) -> bool:
        """No plugin registered or registering: the events have no one to go to."""
        return not self.plugins and not self._registering

    # --- calls to plugins ----------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the daemon's loop from a runtime worker thread and wait for it."""
        if self._loop is None:
            coro.close()
            raise FailedPrecondition("NRI is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _call_each(
        self, event: int, method: str, request: Any, response_type: Any
    ) -> list[tuple[str, Any]]:
        """Call ``method`` on each subscribed plugin in order; raise on a plugin's error."""
        assert self._lock is not None
        answers = []
        async with self._lock.read():
            for plugin in list(self.plugins):
                if not plugin.wants(event):
                    continue
                try:
                    payload = await plugin.channel.call(
                        PLUGIN_SERVICE,
                        method,
                        request.SerializeToString(),
                        self.config.plugin_request_timeout,
                    )
                    answers.append((plugin.label, response_type.FromString(payload)))
                except TtrpcError as exc:
                    if exc.code in (4, 14):  # deadline exceeded, unavailable: the plugin is dropped
                        await self._drop(plugin, str(exc))
                        continue
                    raise FailedPrecondition(f"NRI plugin {plugin.label} failed {method}: {exc}") from None
                except Exception as exc:  # a malformed answer
                    await self._drop(plugin, f"malformed {method} answer: {exc}")
        return answers

    def _notify(self, event: int, method: str, request: Any, response_type: Any, fail: bool = False) -> None:
        if self._idle():
            return
        try:
            self._run(self._call_each(event, method, request, response_type))
        except FailedPrecondition as exc:
            if fail:
                raise
            log.warning("NRI event failed", method=method, error=str(exc))

    # --- container updates and evictions asked for by plugins -----------------------------------

    def _apply(self, updates: list[Any], evictions: list[Any], source: str) -> list[Any]:
        """Evict, then update (containerd's order); the answer is the updates that failed and
        were not marked ignore_failure. Blocking: a worker thread's job, holding no pod lock."""
        control = self.control
        failed: list[Any] = []
        for eviction in evictions:
            container = control.find(eviction.container_id) if control else None
            if control is None or container is None:
                log.warning("NRI eviction of an unknown container", plugin=source, id=eviction.container_id)
                continue
            try:
                control.evict(container.id)
                log.info(
                    "NRI plugin evicted a container", plugin=source, id=container.id, reason=eviction.reason
                )
            except Exception as exc:
                log.error("NRI eviction failed", plugin=source, id=container.id, error=str(exc))
        for update in updates:
            cid = update.container_id
            container = control.find(cid) if control and cid else None
            try:
                if control is None or container is None:
                    raise LookupError(f"container {cid!r} not found")
                ignored = unsupported(update.linux.resources)
                if ignored:
                    log.warning("NRI update fields pycri cannot apply", plugin=source, id=cid, fields=ignored)
                base = container.config.resources or LinuxResources()
                control.update(container.id, from_nri(update.linux.resources, base))
                log.info("NRI plugin updated a container", plugin=source, id=cid)
            except Exception as exc:
                log.warning(
                    "NRI container update failed",
                    plugin=source,
                    id=cid,
                    error=str(exc),
                    ignore_failure=update.ignore_failure,
                )
                if not update.ignore_failure:
                    failed.append(update)
        return failed

    async def _apply_async(self, updates: list[Any], evictions: list[Any], source: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._apply, updates, evictions, source)

    def _apply_later(self, updates: list[Any], evictions: list[Any], source: str) -> None:
        """Apply an event's updates and evictions once the event's call has let go of its pod's
        lock (they may be for containers of the same pod): on a worker thread of their own."""
        if (not updates and not evictions) or self._loop is None:
            return
        loop = self._loop

        def schedule() -> None:
            self._spawn(self._apply_async(updates, evictions, source))

        loop.call_soon_threadsafe(schedule)

    async def _validate(self, request: Any) -> None:
        """ValidateContainerAdjustment to every validator at once; any rejection, error or
        timeout fails the creation (containerd/nri: a validator's failure is the call's)."""
        assert self._lock is not None
        async with self._lock.read():
            validators = [p for p in self.plugins if p.wants(nri.VALIDATE_CONTAINER_ADJUSTMENT)]
            payload = request.SerializeToString()

            async def one(plugin: Plugin) -> str:
                try:
                    answer = await plugin.channel.call(
                        PLUGIN_SERVICE,
                        "ValidateContainerAdjustment",
                        payload,
                        self.config.plugin_request_timeout,
                    )
                    reply = nri.ValidateContainerAdjustmentResponse.FromString(answer)
                except TtrpcError as exc:
                    if exc.code in (4, 14):
                        await self._drop(plugin, str(exc))
                    return f"NRI validator {plugin.label} failed: {exc}"
                except Exception as exc:  # a malformed answer
                    await self._drop(plugin, f"malformed ValidateContainerAdjustment answer: {exc}")
                    return f"NRI validator {plugin.label} failed: malformed answer"
                if reply.reject:
                    reason = reply.reason or "unknown rejection reason"
                    return f"NRI validator {plugin.label} rejected the container adjustment: {reason}"
                return ""

            errors = [e for e in await asyncio.gather(*(one(p) for p in validators)) if e]
        if errors:
            raise FailedPrecondition("; ".join(errors))

    # --- LifecycleHooks ------------------------------------------------------------------------

    def run_pod(self, sandbox: Sandbox) -> None:
        request = nri.RunPodSandboxRequest(pod=pod_message(sandbox))
        self._notify(nri.RUN_POD_SANDBOX, "RunPodSandbox", request, nri.RunPodSandboxResponse, fail=True)

    def update_pod(
        self, sandbox: Sandbox, resources: LinuxResources | None, overhead: LinuxResources | None
    ) -> None:
        request = nri.UpdatePodSandboxRequest(pod=pod_message(sandbox))
        if resources is not None:
            request.linux_resources.CopyFrom(to_nri(resources))
        if overhead is not None:
            request.overhead_linux_resources.CopyFrom(to_nri(overhead))
        self._notify(
            nri.UPDATE_POD_SANDBOX, "UpdatePodSandbox", request, nri.UpdatePodSandboxResponse, fail=True
        )

    def post_update_pod(self, sandbox: Sandbox) -> None:
        request = nri.PostUpdatePodSandboxRequest(pod=pod_message(sandbox))
        self._notify(
            nri.POST_UPDATE_POD_SANDBOX, "PostUpdatePodSandbox", request, nri.PostUpdatePodSandboxResponse
        )

    def stop_pod(self, sandbox: Sandbox) -> None:
        if self._idle():
            return
        request = nri.StopPodSandboxRequest(pod=pod_message(sandbox))
        call = self._call_each(nri.STOP_POD_SANDBOX, "StopPodSandbox", request, nri.StopPodSandboxResponse)
        try:
            self._run(self._after_stops(None, call))
        except FailedPrecondition as exc:
            log.warning("NRI event failed", method="StopPodSandbox", error=str(exc))

    def remove_pod(self, sandbox: Sandbox) -> None:
        request = nri.RemovePodSandboxRequest(pod=pod_message(sandbox))
        self._notify(nri.REMOVE_POD_SANDBOX, "RemovePodSandbox", request, nri.RemovePodSandboxResponse)

    def create_container(self, sandbox: Sandbox, container: Container, oci_spec: dict[str, Any]) -> None:
        if self._idle():
            return
        request = nri.CreateContainerRequest(
            pod=pod_message(sandbox), container=container_message(container, oci_spec)
        )
        answers = self._run(
            self._call_each(nri.CREATE_CONTAINER, "CreateContainer", request, nri.CreateContainerResponse)
        )
        owners = adjust.Owners()
        merged = nri.ContainerAdjustment()
        updates = adjust.Updates(target=container.id, creating=True)
        for label, answer in answers:
            if answer.HasField("adjust"):
                try:
                    adjust.apply(oci_spec, answer.adjust, label, owners)
                except (ValueError, TypeError) as exc:
                    raise InvalidArgument(
                        f"NRI plugin {label}: adjustment cannot be applied: {exc}"
                    ) from None
                merged.MergeFrom(answer.adjust)  # no field is set twice: the owners saw to it
            updates.add(answer.update, label)
            updates.evict(answer.evict)
        if any(p.wants(nri.VALIDATE_CONTAINER_ADJUSTMENT) for p in self.plugins):
            validate = nri.ValidateContainerAdjustmentRequest(
                pod=request.pod,
                container=request.container,  # as it was before the adjustments
                adjust=merged,
                update=list(updates.others.values()),
                plugins=[nri.PluginInstance(name=p.name, index=p.idx) for p in self.plugins],
            )
            validate.owners.owners[container.id].CopyFrom(owners.field_owners())
            for cid, update_owners in updates.owners.items():
                validate.owners.owners[cid].CopyFrom(update_owners.field_owners())
            self._run(self._validate(validate))
        container.annotations = dict(oci_spec.get("annotations", container.annotations))
        self._apply_later(list(updates.others.values()), updates.evictions, "CreateContainer")

    def post_create_container(self, sandbox: Sandbox, container: Container) -> None:
        request = nri.PostCreateContainerRequest(
            pod=pod_message(sandbox), container=container_message(container, None)
        )
        self._notify(
            nri.POST_CREATE_CONTAINER, "PostCreateContainer", request, nri.PostCreateContainerResponse
        )

    def start_container(self, sandbox: Sandbox, container: Container) -> None:
        request = nri.StartContainerRequest(
            pod=pod_message(sandbox), container=container_message(container, None)
        )
        self._notify(nri.START_CONTAINER, "StartContainer", request, nri.StartContainerResponse, fail=True)

    def post_start_container(self, sandbox: Sandbox, container: Container) -> None:
        request = nri.PostStartContainerRequest(
            pod=pod_message(sandbox), container=container_message(container, None)
        )
        self._notify(nri.POST_START_CONTAINER, "PostStartContainer", request, nri.PostStartContainerResponse)

    def update_container(
        self, sandbox: Sandbox, container: Container, resources: LinuxResources
    ) -> LinuxResources:
        if self._idle():
            return resources
        request = nri.UpdateContainerRequest(
            pod=pod_message(sandbox),
            container=container_message(container, _bundle_spec(container)),
            linux_resources=to_nri(resources),
        )
        answers = self._run(
            self._call_each(nri.UPDATE_CONTAINER, "UpdateContainer", request, nri.UpdateContainerResponse)
        )
        updates = adjust.Updates(target=container.id, requested=request.linux_resources)
        for label, answer in answers:
            updates.add(answer.update, label)
            updates.evict(answer.evict)
        ignored = unsupported(updates.requested)
        if ignored:
            log.warning("NRI update fields pycri cannot apply", id=container.id, fields=ignored)
        self._apply_later(list(updates.others.values()), updates.evictions, "UpdateContainer")
        return from_nri(updates.requested, resources)

    def post_update_container(self, sandbox: Sandbox, container: Container) -> None:
        request = nri.PostUpdateContainerRequest(
            pod=pod_message(sandbox), container=container_message(container, _bundle_spec(container))
        )
        self._notify(
            nri.POST_UPDATE_CONTAINER, "PostUpdateContainer", request, nri.PostUpdateContainerResponse
        )

    def container_stopped(self, container: Container) -> None:
        loop = self._loop
        if loop is None or self._idle():
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._schedule_stop(container)
        else:
            loop.call_soon_threadsafe(self._schedule_stop, container)

    def _schedule_stop(self, container: Container) -> None:
        if container.id in self._stops:
            return
        sandbox = self.find_pod(container.pod_id)
        if sandbox is None:
            return
        request = nri.StopContainerRequest(
            pod=pod_message(sandbox), container=container_message(container, None)
        )
        task = asyncio.get_running_loop().create_task(self._send_stop(request))
        self._stops[container.id] = task

    async def _send_stop(self, request: Any) -> None:
        try:
            answers = await self._call_each(
                nri.STOP_CONTAINER, "StopContainer", request, nri.StopContainerResponse
            )
        except FailedPrecondition as exc:
            log.warning("NRI event failed", method="StopContainer", error=str(exc))
            return
        updates = adjust.Updates()
        try:
            for label, answer in answers:
                updates.add(answer.update, label)
        except (FailedPrecondition, InvalidArgument) as exc:
            log.warning("NRI: container updates from StopContainer not applied", error=str(exc))
            return
        if updates.others:
            self._spawn(self._apply_async(list(updates.others.values()), [], "StopContainer"))

    async def _after_stops(self, container_ids: list[str] | None, coro: Coroutine[Any, Any, T]) -> T:
        """``coro`` once the StopContainer notifications of ``container_ids`` (None: all) are sent."""
        ids = list(self._stops) if container_ids is None else container_ids
        tasks = {self._stops[cid] for cid in ids if cid in self._stops}
        if tasks:
            await asyncio.wait(tasks)
        return await coro

    def remove_container(self, sandbox: Sandbox | None, container: Container) -> None:
        if self._loop is None:
            return
        if sandbox is None or self._idle():
            self._loop.call_soon_threadsafe(self._stops.pop, container.id, None)
            return
        request = nri.RemoveContainerRequest(
            pod=pod_message(sandbox), container=container_message(container, None)
        )
        call = self._call_each(nri.REMOVE_CONTAINER, "RemoveContainer", request, nri.RemoveContainerResponse)
        try:
            self._run(self._after_stops([container.id], call))
        except FailedPrecondition as exc:
            log.warning("NRI event failed", method="RemoveContainer", error=str(exc))
        finally:
            self._loop.call_soon_threadsafe(self._stops.pop, container.id, None)


def _bundle_spec(container: Container) -> dict[str, Any] | None:
    """The container's OCI spec as its bundle holds it (None if unreadable)."""
    try:
        spec = json.loads((container.bundle_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None
