"""NRI container adjustments applied to an OCI spec, with NRI's rule that no two plugins touch one field.

Plugins answer CreateContainer in index order; each answer is merged into the spec in that order.
An owner table records which plugin set each field (an annotation key, an env name, a mount
destination, a device path, an rlimit type, the args, each resource); a second plugin setting an owned
field is an error that fails the CreateContainer call, as in containerd/nri's adaptation. A key or
destination with a leading ``-`` removes the entry (and claims it).
"""

from __future__ import annotations

import copy
from typing import Any

from cri_runtime.errors import FailedPrecondition, InvalidArgument
from cri_runtime.nri.api import api_pb2 as nri

Spec = dict[str, Any]


# (kind, key) of a claim -> NRI's Field and whether it is compound (owned entry by entry, the key
# naming the entry) or simple; the names of containerd/nri's api.Field, for ValidateContainerAdjustment.
_COMPOUND = {
    "annotation": "Annotations",
    "mount": "Mounts",
    "env": "Env",
    "rlimit": "Rlimits",
    "device": "Devices",
    "unified": "CgroupsUnified",
    "hugepage limit": "HugepageLimits",
    "namespace": "Namespace",
    "sysctl": "Sysctl",
}
_SIMPLE = {
    ("args", ""): "Args",
    ("cgroups path", ""): "CgroupsPath",
    ("oom score adj", ""): "OomScoreAdj",
    ("memory", "limit"): "MemLimit",
    ("memory", "reservation"): "MemReservation",
    ("memory", "swap"): "MemSwapLimit",
    ("cpu", "shares"): "CPUShares",
    ("cpu", "quota"): "CPUQuota",
    ("cpu", "period"): "CPUPeriod",
    ("cpu", "cpus"): "CPUSetCPUs",
    ("cpu", "mems"): "CPUSetMems",
    ("pids", "limit"): "PidsLimit",
    ("memory", "swappiness"): "MemSwappiness",
    ("memory", "disable_oom_killer"): "MemDisableOomKiller",
    ("cpu", "realtime_runtime"): "CPURealtimeRuntime",
    ("cpu", "realtime_period"): "CPURealtimePeriod",
    ("seccomp policy", ""): "SeccompPolicy",
    ("rdt", "clos id"): "RdtClosID",
    ("rdt", "schemata"): "RdtSchemata",
    ("rdt", "monitoring"): "RdtEnableMonitoring",
}

# Adjustments whose OCI fields (runtime-spec 1.2+) Debian bookworm's crun 1.8.1 and runc 1.1.5 do not
# know: they would ignore them without a word, so a container would run without what the plugin
# asked for. Refused instead, naming the field.
_NOT_APPLIED = {
    "io_priority": "process.ioPriority",
    "scheduler": "process.scheduler",
    "memory_policy": "linux.memoryPolicy",
    "net_devices": "linux.netDevices",
}


class Owners:
    """Which plugin claimed which field of one container's spec."""

    def __init__(self) -> None:
        self._owner: dict[tuple[str, str], str] = {}
        self._hooks: list[str] = []

    def claim(self, kind: str, key: str, plugin: str) -> None:
        owner = self._owner.get((kind, key))
        if owner is not None and owner != plugin:
            raise FailedPrecondition(
                f"NRI plugins {owner} and {plugin} both adjust {kind} {key!r}: conflicting adjustments"
            )
        self._owner[(kind, key)] = plugin

    def add_hooks(self, plugin: str) -> None:
        """OCI hooks accumulate: every plugin adding some is recorded, none conflicts."""
        if plugin not in self._hooks:
            self._hooks.append(plugin)

    def field_owners(self) -> nri.FieldOwners:
        """The claims as NRI's FieldOwners (simple fields by Field number, compound ones by entry)."""
        owners = nri.FieldOwners()
        for (kind, key), plugin in self._owner.items():
            if kind in _COMPOUND:
                number = nri.Field.Value(_COMPOUND[kind])
                owners.compound[number].owners[key] = plugin
            elif (kind, key) in _SIMPLE:
                owners.simple[nri.Field.Value(_SIMPLE[(kind, key)])] = plugin
        if self._hooks:
            owners.simple[nri.Field.Value("OciHooks")] = ",".join(self._hooks)
        return owners


def _split_removal(key: str) -> tuple[str, bool]:
    return (key[1:], True) if key.startswith("-") else (key, False)


def apply(spec: Spec, adjust: nri.ContainerAdjustment, plugin: str, owners: Owners) -> None:
    """Merge ``plugin``'s adjustment into ``spec`` (the OCI runtime spec as a dict)."""
    if adjust.annotations:
        annotations = spec.setdefault("annotations", {})
        for raw, value in adjust.annotations.items():
            key, remove = _split_removal(raw)
            owners.claim("annotation", key, plugin)
            if remove:
                annotations.pop(key, None)
            else:
                annotations[key] = value
    if adjust.mounts:
        mounts = spec.setdefault("mounts", [])
        for mount in adjust.mounts:
            destination, remove = _split_removal(mount.destination)
            owners.claim("mount", destination, plugin)
            mounts[:] = [m for m in mounts if m.get("destination") != destination]
            if not remove:
                entry: dict[str, Any] = {"destination": destination, "type": mount.type or "bind"}
                entry["source"] = mount.source
                entry["options"] = list(mount.options)
                mounts.append(entry)
        # Parents before children, as the runtime mounts them in order.
        mounts.sort(key=lambda m: str(m.get("destination", "")).rstrip("/").count("/"))
    process = spec.setdefault("process", {})
    if adjust.env:
        env = list(process.get("env", []))
        for kv in adjust.env:
            name, remove = _split_removal(kv.key)
            owners.claim("env", name, plugin)
            env = [e for e in env if e.split("=", 1)[0] != name]
            if not remove:
                env.append(f"{name}={kv.value}")
        process["env"] = env
    if adjust.args:
        owners.claim("args", "", plugin)
        process["args"] = list(adjust.args)
    for rlimit in adjust.rlimits:
        owners.claim("rlimit", rlimit.type, plugin)
        limits = [r for r in process.get("rlimits", []) if r.get("type") != rlimit.type]
        limits.append({"type": rlimit.type, "hard": rlimit.hard, "soft": rlimit.soft})
        process["rlimits"] = limits
    if adjust.HasField("hooks"):
        _apply_hooks(spec, adjust.hooks)
        owners.add_hooks(plugin)
    if adjust.CDI_devices:
        names = ", ".join(d.name for d in adjust.CDI_devices)
        raise FailedPrecondition(
            f"NRI plugin {plugin} asks for CDI devices ({names}): "
            "pycri has no CDI registry (/etc/cdi) support"
        )
    if adjust.HasField("linux"):
        _apply_linux(spec, adjust.linux, plugin, owners)


_HOOK_KINDS = {
    "prestart": "prestart",
    "create_runtime": "createRuntime",
    "create_container": "createContainer",
    "start_container": "startContainer",
    "poststart": "poststart",
    "poststop": "poststop",
}


def _apply_hooks(spec: Spec, hooks: nri.Hooks) -> None:
    """Hooks are appended: several plugins may each add theirs."""
    for field, oci_name in _HOOK_KINDS.items():
        for hook in getattr(hooks, field):
            if not hook.path.startswith("/"):
                raise FailedPrecondition(f"NRI hook path {hook.path!r} is not absolute")
            entry: dict[str, Any] = {"path": hook.path}
            if hook.args:
                entry["args"] = list(hook.args)
            if hook.env:
                entry["env"] = list(hook.env)
            if hook.HasField("timeout"):
                entry["timeout"] = hook.timeout.value
            spec.setdefault("hooks", {}).setdefault(oci_name, []).append(entry)


def _apply_linux(spec: Spec, linux: nri.LinuxContainerAdjustment, plugin: str, owners: Owners) -> None:
    oci_linux = spec.setdefault("linux", {})
    for device in linux.devices:
        path, remove = _split_removal(device.path)
        owners.claim("device", path, plugin)
        devices = [d for d in oci_linux.get("devices", []) if d.get("path") != path]
        if not remove:
            entry: dict[str, Any] = {
                "path": path,
                "type": device.type,
                "major": device.major,
                "minor": device.minor,
            }
            if device.HasField("file_mode"):
                entry["fileMode"] = device.file_mode.value
            if device.HasField("uid"):
                entry["uid"] = device.uid.value
            if device.HasField("gid"):
                entry["gid"] = device.gid.value
            devices.append(entry)
            allow = oci_linux.setdefault("resources", {}).setdefault("devices", [])
            allow.append(
                {
                    "allow": True,
                    "type": device.type,
                    "major": device.major,
                    "minor": device.minor,
                    "access": "rwm",
                }
            )
        oci_linux["devices"] = devices
    if linux.cgroups_path:
        owners.claim("cgroups path", "", plugin)
        oci_linux["cgroupsPath"] = linux.cgroups_path
    if linux.HasField("oom_score_adj"):
        owners.claim("oom score adj", "", plugin)
        spec.setdefault("process", {})["oomScoreAdj"] = linux.oom_score_adj.value
    if linux.HasField("resources"):
        _apply_resources(oci_linux.setdefault("resources", {}), linux.resources, plugin, owners)
    for field, oci_name in _NOT_APPLIED.items():
        if linux.HasField(field) if field != "net_devices" else bool(linux.net_devices):
            raise FailedPrecondition(
                f"NRI plugin {plugin} adjusts {oci_name}, which the OCI runtimes here (crun 1.8.1, "
                "runc 1.1.5) would ignore: refused rather than run the container without it"
            )
    for ns in linux.namespaces:
        kind, remove = _split_removal(ns.type)
        owners.claim("namespace", kind, plugin)
        namespaces = [n for n in oci_linux.get("namespaces", []) if n.get("type") != kind]
        if not remove:
            entry = {"type": kind}
            if ns.path:
                entry["path"] = ns.path
            namespaces.append(entry)
        oci_linux["namespaces"] = namespaces
    for raw, value in linux.sysctl.items():
        key, remove = _split_removal(raw)
        owners.claim("sysctl", key, plugin)
        sysctl = oci_linux.setdefault("sysctl", {})
        if remove:
            sysctl.pop(key, None)
        else:
            sysctl[key] = value
    if linux.HasField("seccomp_policy"):
        owners.claim("seccomp policy", "", plugin)
        oci_linux["seccomp"] = _seccomp(linux.seccomp_policy)
    if linux.HasField("rdt"):
        _apply_rdt(oci_linux, linux.rdt, plugin, owners)


def _seccomp(policy: nri.LinuxSeccomp) -> Spec:
    """NRI's LinuxSeccomp as the OCI ``linux.seccomp`` object (the whole policy is replaced)."""
    out: Spec = {"defaultAction": policy.default_action}
    if policy.HasField("default_errno"):
        out["defaultErrnoRet"] = policy.default_errno.value
    if policy.architectures:
        out["architectures"] = list(policy.architectures)
    if policy.flags:
        out["flags"] = list(policy.flags)
    if policy.listener_path:
        out["listenerPath"] = policy.listener_path
    if policy.listener_metadata:
        out["listenerMetadata"] = policy.listener_metadata
    syscalls = []
    for rule in policy.syscalls:
        entry: Spec = {"names": list(rule.names), "action": rule.action}
        if rule.HasField("errno_ret"):
            entry["errnoRet"] = rule.errno_ret.value
        if rule.args:
            entry["args"] = [
                {"index": a.index, "value": a.value, "valueTwo": a.value_two, "op": a.op} for a in rule.args
            ]
        syscalls.append(entry)
    if syscalls:
        out["syscalls"] = syscalls
    if not out["defaultAction"]:
        raise InvalidArgument("NRI seccomp policy without a default action")
    return out


def _apply_rdt(oci_linux: Spec, rdt: nri.LinuxRdt, plugin: str, owners: Owners) -> None:
    if rdt.remove:
        for key in ("clos id", "schemata", "monitoring"):
            owners.claim("rdt", key, plugin)
        oci_linux.pop("intelRdt", None)
        return
    intel = oci_linux.setdefault("intelRdt", {})
    if rdt.HasField("clos_id"):
        owners.claim("rdt", "clos id", plugin)
        intel["closID"] = rdt.clos_id.value
    if rdt.HasField("schemata"):
        owners.claim("rdt", "schemata", plugin)
        intel["schemata"] = list(rdt.schemata.value)
    if rdt.HasField("enable_monitoring"):
        owners.claim("rdt", "monitoring", plugin)
        intel["enableMonitoring"] = rdt.enable_monitoring.value


def _apply_resources(resources: Spec, adj: nri.LinuxResources, plugin: str, owners: Owners) -> None:
    if adj.HasField("memory"):
        memory = resources.setdefault("memory", {})
        for field, oci_name in (
            ("limit", "limit"),
            ("reservation", "reservation"),
            ("swap", "swap"),
            ("swappiness", "swappiness"),
            ("disable_oom_killer", "disableOOMKiller"),
        ):
            if adj.memory.HasField(field):
                owners.claim("memory", field, plugin)
                memory[oci_name] = getattr(adj.memory, field).value
    if adj.HasField("cpu"):
        cpu = resources.setdefault("cpu", {})
        for field, oci_name in (
            ("shares", "shares"),
            ("quota", "quota"),
            ("period", "period"),
            ("realtime_runtime", "realtimeRuntime"),
            ("realtime_period", "realtimePeriod"),
        ):
            if adj.cpu.HasField(field):
                owners.claim("cpu", field, plugin)
                cpu[oci_name] = getattr(adj.cpu, field).value
        for field in ("cpus", "mems"):
            value = getattr(adj.cpu, field)
            if value:
                owners.claim("cpu", field, plugin)
                cpu[field] = value
    if adj.HasField("pids"):
        owners.claim("pids", "limit", plugin)
        resources["pids"] = {"limit": adj.pids.limit}
    for key, value in adj.unified.items():
        owners.claim("unified", key, plugin)
        resources.setdefault("unified", {})[key] = value
    for limit in adj.hugepage_limits:
        owners.claim("hugepage limit", limit.page_size, plugin)
        kept = [h for h in resources.get("hugepageLimits", []) if h.get("pageSize") != limit.page_size]
        resources["hugepageLimits"] = [*kept, {"pageSize": limit.page_size, "limit": limit.limit}]
    for rule in adj.devices:  # NRI v1 emulation: device cgroup rules
        entry: Spec = {"allow": rule.allow, "type": rule.type or "a", "access": rule.access or "rwm"}
        if rule.HasField("major"):
            entry["major"] = rule.major.value
        if rule.HasField("minor"):
            entry["minor"] = rule.minor.value
        resources.setdefault("devices", []).append(entry)
    for field, what in (("blockio_class", "a block I/O class"), ("rdt_class", "an RDT class")):
        if adj.HasField(field):
            raise FailedPrecondition(
                f"NRI plugin {plugin} assigns {what} ({getattr(adj, field).value!r}): pycri has no "
                "class configuration for it"
            )


# --- container updates -------------------------------------------------------------------------


class Updates:
    """The container updates plugins answered to one event (CreateContainer, UpdateContainer,
    StopContainer), merged in plugin order with the same one-owner-per-field rule as adjustments,
    per container. ``target`` is the container the event is about: for UpdateContainer its requested
    resources are the starting point and plugins may change them; for CreateContainer plugins may
    not update it (it is being adjusted); for StopContainer there is none.

    An update with ``ignore_failure`` that conflicts is dropped whole (nothing of it merged); one
    without fails the event, as in containerd/nri's result.
    """

    def __init__(self, target: str = "", requested: nri.LinuxResources | None = None, creating: bool = False):
        self.target = target
        self.creating = creating
        self.requested = nri.LinuxResources()
        if requested is not None:
            self.requested.CopyFrom(requested)
        self.owners: dict[str, Owners] = {}
        self.others: dict[str, nri.ContainerUpdate] = {}  # by container id, in first-asked order
        self.evictions: list[nri.ContainerEviction] = []

    def add(self, updates: Any, plugin: str) -> None:
        for update in updates:
            cid = update.container_id
            if not cid:
                raise InvalidArgument(f"NRI plugin {plugin} sent a container update without a container id")
            if self.creating and cid == self.target:
                raise FailedPrecondition(
                    f"NRI plugin {plugin} asked to update container {cid} during its creation"
                )
            if cid == self.target:
                merged = self.requested
            else:
                entry = self.others.get(cid)
                if entry is None:
                    entry = nri.ContainerUpdate(container_id=cid, ignore_failure=update.ignore_failure)
                    self.others[cid] = entry
                else:
                    entry.ignore_failure = entry.ignore_failure and update.ignore_failure
                merged = entry.linux.resources
            if not update.linux.HasField("resources"):
                continue
            owners = self.owners.setdefault(cid, Owners())
            trial_owners = copy.deepcopy(owners)
            trial = nri.LinuxResources()
            trial.CopyFrom(merged)
            try:
                merge_resources(trial, update.linux.resources, plugin, trial_owners)
            except FailedPrecondition:
                if update.ignore_failure:
                    continue
                raise
            merged.CopyFrom(trial)
            self.owners[cid] = trial_owners

    def evict(self, evictions: Any) -> None:
        self.evictions.extend(evictions)


def merge_resources(
    into: nri.LinuxResources, update: nri.LinuxResources, plugin: str, owners: Owners
) -> None:
    """Merge the fields ``update`` sets into ``into``, each claimed by ``plugin``."""
    for field in ("limit", "reservation", "swap"):
        if update.memory.HasField(field):
            owners.claim("memory", field, plugin)
            getattr(into.memory, field).value = getattr(update.memory, field).value
    for field in ("shares", "quota", "period"):
        if update.cpu.HasField(field):
            owners.claim("cpu", field, plugin)
            getattr(into.cpu, field).value = getattr(update.cpu, field).value
    for field in ("cpus", "mems"):
        value = getattr(update.cpu, field)
        if value:
            owners.claim("cpu", field, plugin)
            setattr(into.cpu, field, value)
    for limit in update.hugepage_limits:
        owners.claim("hugepage limit", limit.page_size, plugin)
        kept = [h for h in into.hugepage_limits if h.page_size != limit.page_size]
        del into.hugepage_limits[:]
        into.hugepage_limits.extend([*kept, limit])
    for key, value in update.unified.items():
        owners.claim("unified", key, plugin)
        into.unified[key] = value
    if update.HasField("pids"):
        owners.claim("pids", "limit", plugin)
        into.pids.limit = update.pids.limit
