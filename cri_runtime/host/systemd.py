"""systemd cgroup driver: pods are slices, containers and their conmons transient scopes.

As with CRI-O and containerd: kubelet (``cgroupDriver: systemd``) passes a pod's cgroup parent
as a slice name, ``kubepods-burstable-pod<uid>.slice``, which systemd places at
``/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice``. The OCI runtime,
run with its systemd cgroup manager (``--systemd-cgroup``), makes each container's scope
``pycri-<id>.scope`` in that slice from the spec's ``cgroupsPath`` ``<slice>:pycri:<id>``. pycri
itself asks systemd, over D-Bus, for what the runtime does not make: the pod slice when it does
not exist yet (kubelet makes its own), and a ``pycri-conmon-<id>.scope`` in the pod slice for each
container's conmon, so that the monitor's memory is charged to the pod (CRI-O's
``conmon_cgroup = "pod"``).

The D-Bus connection (dbus-fast, asyncio) lives on a thread of its own with its own event loop;
the managers' worker threads call into it and wait for systemd's answer with a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import threading
from collections.abc import Coroutine, Iterable
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypeVar

import structlog
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from cri_runtime.errors import FailedPrecondition, InvalidArgument, PycriError, Unavailable
from cri_runtime.host import cgroups

log = structlog.get_logger("pycri.systemd")

SCOPE_PREFIX = "pycri"
CONMON_SCOPE_PREFIX = "pycri-conmon"
# The pod slice of a pod nobody gave a parent (crictl): pycri-pod<id>.slice in pycri.slice.
DEFAULT_SLICE_PREFIX = "pycri-pod"
SYSTEM_BUS_SOCKET = "/run/dbus/system_bus_socket"
SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
# systemd answers in milliseconds; a slow answer means it is wedged or restarting.
CALL_TIMEOUT = 30.0
# Errors after which a retry may work: systemd (or the bus) is gone or busy.
_TRANSIENT_ERRORS = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected",
    "org.freedesktop.DBus.Error.Timeout",
    "org.freedesktop.DBus.Error.TimedOut",
    "org.freedesktop.DBus.Error.LimitsExceeded",
}
_NO_SUCH_UNIT = ("org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.systemd1.LoadFailed")
# A unit name systemd accepts for a slice: no path, no doubled, leading or trailing dash.
_SLICE_NAME = re.compile(r"(?:-|[A-Za-z0-9:_.\\]+(?:-[A-Za-z0-9:_.\\]+)*)\.slice")

T = TypeVar("T")


# --- names and paths (pure) -----------------------------------------------------------------------


def validate_slice(name: str) -> str:
    """``name`` if it is a slice unit name systemd accepts; ValueError saying why not."""
    if not name.endswith(".slice"):
        raise ValueError(
            f"{name!r} is not a systemd slice name (with the systemd cgroup driver kubelet passes "
            "one such as kubepods-besteffort-pod<uid>.slice)"
        )
    if len(name) > 255 or not _SLICE_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid systemd slice name")
    return name


def slice_path(name: str) -> str:
    """Where systemd puts slice ``name`` in the cgroup tree: each dash opens a level.

    ``a-b-c.slice`` -> ``/a.slice/a-b.slice/a-b-c.slice``; the root slice ``-.slice`` -> ``/``.
    """
    validate_slice(name)
    stem = name.removesuffix(".slice")
    if stem == "-":
        return "/"
    parts = stem.split("-")
    return "/" + "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def parent_slice(name: str) -> str:
    """The slice holding ``name``: ``a-b.slice`` for ``a-b-c.slice``, ``-.slice`` for ``a.slice``."""
    stem = validate_slice(name).removesuffix(".slice")
    return stem.rpartition("-")[0] + ".slice" if "-" in stem.strip("-") else "-.slice"


def container_scope(container_id: str) -> str:
    return f"{SCOPE_PREFIX}-{container_id}.scope"


def conmon_scope(container_id: str) -> str:
    return f"{CONMON_SCOPE_PREFIX}-{container_id}.scope"


def cgroups_path(slice_name: str, container_id: str) -> str:
    """The OCI ``linux.cgroupsPath`` crun and runc read under their systemd cgroup manager."""
    return f"{validate_slice(slice_name)}:{SCOPE_PREFIX}:{container_id}"


def systemd_running(root: Path = Path("/")) -> bool:
    """systemd's own test (sd_booted): it made /run/systemd/system."""
    return (root / "run/systemd/system").is_dir()


# --- D-Bus ----------------------------------------------------------------------------------------


class DBusCallError(Exception):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


def _prop(name: str, signature: str, value: Any) -> list[Any]:
    return [name, Variant(signature, value)]


class SystemdBus:
    """systemd's manager over the system bus, from any thread.

    One connection, owned by a thread running its own event loop; reconnected when it was lost
    (systemd or the bus restarted). Job completion is learnt from the JobRemoved signal.
    """

    def __init__(self, address: str | None = None, timeout: float = CALL_TIMEOUT) -> None:
        self.address = (
            address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or f"unix:path={SYSTEM_BUS_SOCKET}"
        )
        self.timeout = timeout
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bus: MessageBus | None = None
        self._connecting: asyncio.Lock | None = None
        self._jobs: dict[str, asyncio.Future[str]] = {}
        # Results of jobs that ended before their caller started waiting (the signal can
        # overtake the caller's resumption); bounded.
        self._finished: collections.OrderedDict[str, str] = collections.OrderedDict()

    # --- the loop thread ---

    def _run(self, coro: Coroutine[Any, Any, T], what: str) -> T:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="pycri-dbus", daemon=True).start()
                self._loop = loop
            loop = self._loop
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(self.timeout + 5)
        except FutureTimeout:
            future.cancel()
            raise Unavailable(f"{what}: systemd did not answer within {self.timeout:g}s") from None

    def close(self) -> None:
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is None:
            return

        async def disconnect() -> None:
            if self._bus is not None:
                self._bus.disconnect()
                self._bus = None

        asyncio.run_coroutine_threadsafe(disconnect(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)

    # --- on the loop ---

    def _on_message(self, message: Message) -> None:
        if message.message_type != MessageType.SIGNAL or message.member != "JobRemoved":
            return
        _id, job, _unit, result = message.body
        waiter = self._jobs.pop(job, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(result)
        else:
            self._finished[job] = result
            while len(self._finished) > 256:
                self._finished.popitem(last=False)

    async def _connected(self) -> MessageBus:
        if self._bus is not None and self._bus.connected:
            return self._bus
        if self._connecting is None:
            self._connecting = asyncio.Lock()  # made on the loop, used only there
        async with self._connecting:
            if self._bus is not None and self._bus.connected:
                return self._bus
            self._bus = None
            return await self._connect()

    async def _connect(self) -> MessageBus:
        try:
            bus = await asyncio.wait_for(
                MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM).connect(), self.timeout
            )
        except (TimeoutError, OSError, EOFError) as exc:
            raise Unavailable(
                f"systemd is not reachable over D-Bus ({self.address}): {exc or type(exc).__name__}"
            ) from None
        bus.add_message_handler(self._on_message)
        for member, signature, body, destination, path, interface in (
            (
                "AddMatch",
                "s",
                [f"type='signal',sender='{SYSTEMD}',interface='{MANAGER}',member='JobRemoved'"],
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
            ),
            ("Subscribe", "", [], SYSTEMD, MANAGER_PATH, MANAGER),
        ):
            reply = await bus.call(
                Message(
                    destination=destination,
                    path=path,
                    interface=interface,
                    member=member,
                    signature=signature,
                    body=body,
                )
            )
            if reply.message_type == MessageType.ERROR:
                bus.disconnect()
                raise Unavailable(f"systemd is not usable over D-Bus: {member}: {reply.body}")
        self._bus = bus
        return bus

    async def _call(
        self,
        member: str,
        signature: str,
        body: list[Any],
        *,
        path: str = MANAGER_PATH,
        interface: str = MANAGER,
    ) -> list[Any]:
        bus = await self._connected()
        try:
            reply = await asyncio.wait_for(
                bus.call(
                    Message(
                        destination=SYSTEMD,
                        path=path,
                        interface=interface,
                        member=member,
                        signature=signature,
                        body=body,
                    )
                ),
                self.timeout,
            )
        except TimeoutError:
            raise Unavailable(f"systemd did not answer {member} within {self.timeout:g}s") from None
        except (OSError, EOFError) as exc:
            self._bus = None
            raise Unavailable(f"lost the D-Bus connection to systemd during {member}: {exc}") from None
        if reply is None:  # the bus was closed under the call (dbus-fast answers None then)
            self._bus = None
            raise Unavailable(f"lost the D-Bus connection to systemd during {member}")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else ""
            raise DBusCallError(reply.error_name or "unknown", str(text))
        return list(reply.body)

    async def _job(self, member: str, signature: str, body: list[Any], unit: str) -> str:
        """Call a manager method that queues a job on ``unit`` and wait for the job's result.

        The result comes with the JobRemoved signal. The signal is not what correctness rests on:
        while waiting, the job object is looked at every second, and a job that is gone without a
        signal seen is judged by the unit's state (active after a start, not active after a stop).
        """
        loop = asyncio.get_running_loop()
        (job,) = await self._call(member, signature, body)
        result = self._finished.pop(job, None)
        if result is not None:
            return result
        waiter: asyncio.Future[str] = loop.create_future()
        self._jobs[job] = waiter
        deadline = loop.time() + self.timeout
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(waiter), min(1.0, deadline - loop.time()))
                except TimeoutError:
                    if loop.time() >= deadline:
                        raise Unavailable(
                            f"systemd did not finish {member} of {unit} within {self.timeout:g}s"
                        ) from None
                if await self._job_exists(job):
                    continue
                if waiter.done():
                    return waiter.result()
                state = await self._active_state(unit)
                log.warning("no JobRemoved signal for a finished job", job=job, unit=unit, state=state)
                if member == "StopUnit":
                    return "done" if state in (None, "inactive", "failed") else "failed"
                return "done" if state in ("active", "reloading") else "failed"
        finally:
            self._jobs.pop(job, None)

    async def _job_exists(self, job: str) -> bool:
        try:
            await self._call(
                "Get", "ss", ["org.freedesktop.systemd1.Job", "State"], path=job,
                interface="org.freedesktop.DBus.Properties",
            )  # fmt: skip
        except DBusCallError:
            return False  # UnknownObject / UnknownMethod: the job is gone
        return True

    async def _active_state(self, unit: str) -> str | None:
        try:
            (path,) = await self._call("GetUnit", "s", [unit])
        except DBusCallError as exc:
            if exc.name in _NO_SUCH_UNIT:
                return None
            raise
        (value,) = await self._call(
            "Get", "ss", ["org.freedesktop.systemd1.Unit", "ActiveState"], path=path,
            interface="org.freedesktop.DBus.Properties",
        )  # fmt: skip
        return str(value.value)

    # --- what the driver asks (from any thread) ---

    def start_transient(self, unit: str, properties: list[list[Any]]) -> None:
        """StartTransientUnit and wait until the unit runs; a refusal is FailedPrecondition."""
        what = f"cannot start systemd unit {unit}"
        try:
            result = self._run(
                self._job("StartTransientUnit", "ssa(sv)a(sa(sv))", [unit, "fail", properties, []], unit),
                what,
            )
        except DBusCallError as exc:
            raise _refusal(what, exc) from None
        if result != "done":
            # The unit may exist now in a failed state: take it away, as a failed create must.
            self.stop(unit)
            raise FailedPrecondition(
                f"{what}: systemd's start job ended with {result!r} (journalctl -u {unit})"
            )

    def set_properties(self, unit: str, properties: list[list[Any]]) -> None:
        what = f"cannot set properties of systemd unit {unit}"
        try:
            self._run(self._call("SetUnitProperties", "sba(sv)", [unit, True, properties]), what)
        except DBusCallError as exc:
            raise _refusal(what, exc) from None

    def stop(self, unit: str) -> None:
        """Stop ``unit`` and forget a failed state; a unit that is not there is fine."""
        what = f"cannot stop systemd unit {unit}"
        try:
            self._run(self._job("StopUnit", "ss", [unit, "replace"], unit), what)
        except DBusCallError as exc:
            if exc.name not in _NO_SUCH_UNIT:
                raise _refusal(what, exc) from None
        try:
            self._run(self._call("ResetFailedUnit", "s", [unit]), what)
        except DBusCallError as exc:
            if exc.name not in _NO_SUCH_UNIT:
                log.debug("reset-failed refused", unit=unit, error=str(exc))

    def active_state(self, unit: str) -> str | None:
        """The unit's ActiveState, or None when systemd has no such unit loaded."""
        what = f"cannot read the state of systemd unit {unit}"
        try:
            return self._run(self._active_state(unit), what)
        except DBusCallError as exc:
            raise _refusal(what, exc) from None

    def list_units(self, patterns: list[str]) -> list[tuple[str, str]]:
        """(name, ActiveState) of the loaded units matching the glob ``patterns``."""
        what = "cannot list systemd units"
        try:
            (units,) = self._run(self._call("ListUnitsByPatterns", "asas", [[], patterns]), what)
        except DBusCallError as exc:
            raise _refusal(what, exc) from None
        return [(str(u[0]), str(u[3])) for u in units]

    def version(self) -> str:
        """systemd's version (the manager's Version property): proof that it answers."""

        async def read() -> str:
            (value,) = await self._call(
                "Get",
                "ss",
                [MANAGER, "Version"],
                interface="org.freedesktop.DBus.Properties",
            )
            return str(value.value)

        try:
            return self._run(read(), "cannot ask systemd its version")
        except DBusCallError as exc:
            raise _refusal("cannot ask systemd its version", exc) from None


def _refusal(what: str, exc: DBusCallError) -> PycriError:
    if exc.name in _TRANSIENT_ERRORS:
        return Unavailable(f"{what}: {exc.text} ({exc.name})")
    if exc.name == "org.freedesktop.systemd1.UnitExists":
        return FailedPrecondition(f"{what}: a unit of that name exists already ({exc.text})")
    return FailedPrecondition(f"{what}: systemd refused: {exc.text} ({exc.name})")


# --- the driver -----------------------------------------------------------------------------------


class SystemdDriver(cgroups.CgroupDriver):
    name = "systemd"
    # crun and runc: make container cgroups as systemd scopes; conmon: find them that way.
    runtime_args = ("--systemd-cgroup",)
    conmon_args = ("--systemd-cgroup",)

    def __init__(self, bus: SystemdBus | None = None) -> None:
        self.bus = bus or SystemdBus()

    def close(self) -> None:
        self.bus.close()

    def require(self) -> str:
        """systemd's version, or the reason this driver cannot work here (FailedPrecondition)."""
        if not systemd_running():
            raise FailedPrecondition(MISSING_SYSTEMD)
        try:
            return self.bus.version()
        except Unavailable as exc:
            raise FailedPrecondition(f"{exc}; {MISSING_BUS_FIX}") from None

    @staticmethod
    def _slice(pod_path: str) -> str:
        return validate_slice(os.path.basename(pod_path.rstrip("/")))

    def pod_cgroup(self, sandbox_id: str, cgroup_parent: str) -> str:
        name = cgroup_parent or f"{DEFAULT_SLICE_PREFIX}{sandbox_id}.slice"
        try:
            if "/" in name:
                raise ValueError(
                    f"{name!r} is a cgroupfs path, but pycri's cgroup_driver is systemd: kubelet passes a "
                    "slice name when its cgroupDriver is systemd; set both to the same driver"
                )
            path = slice_path(name)
        except ValueError as exc:
            raise InvalidArgument(f"pod linux.cgroup_parent: {exc}") from None
        if path == "/" or name in ("system.slice", "user.slice", "init.scope", "machine.slice"):
            raise InvalidArgument(f"pod linux.cgroup_parent {name!r}: systemd's own slice cannot be a pod's")
        return path

    def pod_missing(self, pod_path: str) -> list[str]:
        name = self._slice(pod_path)
        return [] if self.bus.active_state(name) in ("active", "activating", "reloading") else [name]

    def create_pod(self, pod_path: str, description: str = "") -> list[str]:
        name = self._slice(pod_path)
        if not self.pod_missing(pod_path):
            return []  # kubelet's own pod slice
        self.bus.start_transient(
            name,
            [
                _prop("Description", "s", description or f"pycri pod {name}"),
                _prop("DefaultDependencies", "b", False),
                # Gone from systemd's memory once stopped, failed or not.
                _prop("CollectMode", "s", "inactive-or-failed"),
                _prop("MemoryAccounting", "b", True),
                _prop("CPUAccounting", "b", True),
                _prop("IOAccounting", "b", True),
                _prop("TasksAccounting", "b", True),
            ],
        )
        return [name]

    def apply_pod_limits(
        self, pod_path: str, *, cpu_shares: int = 0, cpu_quota: int = 0, cpu_period: int = 0, memory: int = 0
    ) -> None:
        properties: list[list[Any]] = []
        if cpu_shares:
            properties.append(_prop("CPUWeight", "t", cgroups.shares_to_weight(cpu_shares)))
        if cpu_quota:
            period = cpu_period or 100_000
            # systemd keeps the quota per second of time and writes cpu.max from it and the period.
            per_second = cpu_quota * 1_000_000 // period if cpu_quota > 0 else (1 << 64) - 1
            properties.append(_prop("CPUQuotaPerSecUSec", "t", per_second))
            properties.append(_prop("CPUQuotaPeriodUSec", "t", period))
        if memory:
            cgroups.check_memory_fits(pod_path, memory, f"pod slice {self._slice(pod_path)}")
            properties.append(_prop("MemoryMax", "t", memory))
        if properties:
            self.bus.set_properties(self._slice(pod_path), properties)
            # systemd writes the cgroup files when it next realizes the unit, after its answer; as
            # runc's systemd manager does, write them now too, so that the limits hold when
            # UpdatePodSandboxResources returns (the values are the ones systemd will write).
            cgroups.apply_limits(
                slice_path(self._slice(pod_path)),
                cpu_shares=cpu_shares,
                cpu_quota=cpu_quota,
                cpu_period=cpu_period,
                memory=memory,
                existing_only=True,
            )

    def remove_pod(self, pod_path: str, created: list[str]) -> None:
        if not pod_path.endswith(".slice"):
            cgroups.CgroupfsDriver().remove_pod(pod_path, created)  # a pod of the cgroupfs driver
            return
        if self._slice(pod_path) in created:
            self.bus.stop(self._slice(pod_path))

    def container_cgroups_path(self, pod_path: str, container_id: str) -> str:
        return cgroups_path(self._slice(pod_path), container_id)

    def conmon_cgroup(self, pod_path: str) -> str | None:
        return self._slice(pod_path)

    def enter_conmon(self, pid: int, conmon_cgroup: str, container_id: str, created: list[str]) -> None:
        unit = conmon_scope(container_id)
        self.bus.start_transient(
            unit,
            [
                _prop("Description", "s", f"pycri conmon of container {container_id}"),
                _prop("Slice", "s", validate_slice(conmon_cgroup)),
                _prop("PIDs", "au", [pid]),
                _prop("DefaultDependencies", "b", False),
                _prop("CollectMode", "s", "inactive-or-failed"),
                # As CRI-O's conmon scope: systemd leaves the cgroup below it alone.
                _prop("Delegate", "b", True),
            ],
        )
        created.append(unit)

    def remove_conmon_cgroup(self, created: list[str]) -> None:
        for unit in created:
            self.bus.stop(unit)

    def remove_container(self, pod_path: str, container_id: str, timeout: float = 5.0) -> None:
        self.release_container(container_id)

    def release_container(self, container_id: str) -> None:
        # The runtime's delete stops the container's scope, and the conmon scope ends with
        # conmon; a crash in between (or a scope that failed) leaves a unit: none stays.
        for unit in (container_scope(container_id), conmon_scope(container_id)):
            self.bus.stop(unit)

    def sweep(self, orphan_pods: Iterable[str], orphan_containers: Iterable[str]) -> list[str]:
        """Stop the scopes of orphaned containers and pycri's own slices of orphaned pods. Only
        these IDs: the units of another pycri on the same host (its own state) are never touched,
        and kubelet's slices are kubelet's."""
        names = [f"{DEFAULT_SLICE_PREFIX}{pod_id}.slice" for pod_id in sorted(orphan_pods)]
        for container_id in sorted(orphan_containers):
            names += [container_scope(container_id), conmon_scope(container_id)]
        if not names:
            return []
        swept: list[str] = []
        for unit, _state in self.bus.list_units(names):
            try:
                self.bus.stop(unit)
                swept.append(unit)
            except PycriError as exc:
                log.warning("cannot stop an orphaned unit", unit=unit, error=str(exc))
        return swept


MISSING_SYSTEMD_WHAT = 'cgroup_driver = "systemd" but systemd is not running here (no /run/systemd/system)'
MISSING_SYSTEMD_FIX = (
    'set cgroup_driver = "cgroupfs" in /etc/pycri/pycri.toml and cgroupDriver: cgroupfs in kubelet, '
    "or run pycri on a host booted with systemd"
)
MISSING_SYSTEMD = f"{MISSING_SYSTEMD_WHAT}: {MISSING_SYSTEMD_FIX}"
MISSING_BUS_FIX = (
    "the systemd cgroup driver talks to systemd over the system bus: install and start dbus "
    '(apt-get install dbus), or set cgroup_driver = "cgroupfs" (and cgroupDriver: cgroupfs in kubelet)'
)
