"""NRI container adjustments applied to an OCI spec, with NRI's rule that no two plugins touch one field.

Plugins answer CreateContainer in index order; each answer is merged into the spec in that order.
An owner table records which plugin set each field (an annotation key, an env name, a mount
destination, a device path, an rlimit type, the args, each resource); a second plugin setting an owned
field is an error that fails the CreateContainer call, as in containerd/nri's adaptation. A key or
destination with a leading ``-`` removes the entry (and claims it).
"""

from __future__ import annotations

from typing import Any

from cri_runtime.errors import FailedPrecondition
from cri_runtime.nri.api import api_pb2 as nri

Spec = dict[str, Any]


class Owners:
    """Which plugin claimed which field of one container's spec."""

    def __init__(self) -> None:
        self._owner: dict[tuple[str, str], str] = {}

    def claim(self, kind: str, key: str, plugin: str) -> None:
        owner = self._owner.get((kind, key))
        if owner is not None and owner != plugin:
            raise FailedPrecondition(
                f"NRI plugins {owner} and {plugin} both adjust {kind} {key!r}: conflicting adjustments"
            )
        self._owner[(kind, key)] = plugin


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


def _apply_resources(resources: Spec, adj: nri.LinuxResources, plugin: str, owners: Owners) -> None:
    if adj.HasField("memory"):
        memory = resources.setdefault("memory", {})
        for field, oci_name in (("limit", "limit"), ("reservation", "reservation"), ("swap", "swap")):
            if adj.memory.HasField(field):
                owners.claim("memory", field, plugin)
                memory[oci_name] = getattr(adj.memory, field).value
    if adj.HasField("cpu"):
        cpu = resources.setdefault("cpu", {})
        for field in ("shares", "quota", "period"):
            if adj.cpu.HasField(field):
                owners.claim("cpu", field, plugin)
                cpu[field] = getattr(adj.cpu, field).value
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
