"""The OCI runtime spec (config.json) of a CRI container, built the way containerd's CRI plugin builds it.

:func:`build_container_spec` is a pure function of the container's config (pycri's
cri_runtime.model.ContainerConfig, converted from the CRI request by the servicer), the
image config, the pod's context and the mounted root file system. It reads only the image's /etc/passwd and
/etc/group (resolved inside the root file system, never following a symlink out of it), the
seccomp profile a Localhost profile names, the stat of host device nodes, and whether the host
has AppArmor (and which profiles it has loaded) and SELinux (and its policy's container contexts).
What it cannot do purely is left to the caller, through small helpers: :func:`host_paths_to_create`
(host paths of mounts that do not exist yet), :func:`relabel_targets` (volumes to relabel for
SELinux) and :func:`ensure_working_dir` (the working directory inside the root file system).

Choices worth knowing, each where containerd makes the same one:
- process.oomScoreAdj is always set (0 included): a container that inherited conmon's score of
  -1000 could never be chosen by the OOM killer.
- net.* sysctls are passed through with host networking; kubelet refuses such pods before they
  reach a runtime, and the OCI runtime would refuse them again.
- no rlimits are set: CRI has no field for them and the container inherits the runtime's limits.
- a seccomp profile that is absent from the config (neither ``seccomp`` nor the deprecated
  ``seccomp_profile_path``) means unconfined; kubelet says RuntimeDefault when it wants it.
- masked and read-only paths from the config replace the defaults only when non-empty: the CRI
  schema (proto3) cannot tell an empty list from an absent one, so "unmasked" /proc is not
  expressible there.
- memory swap is set only when memory_swap_limit_in_bytes is; swap accounting is a host probe.
- AppArmor: process.apparmorProfile as cri_runtime.oci.apparmor decides (pycri-default unless
  the config says otherwise or the container is privileged; nothing where AppArmor is off).
- SELinux: process.selinuxLabel and linux.mountLabel only where SELinux is on
  (cri_runtime.oci.selinux) and the container is not privileged; elsewhere no label, as the OCI
  runtime could not apply one.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import re
import stat
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cri_runtime.errors import InvalidArgument
from cri_runtime.host import selinux as host_selinux
from cri_runtime.model import (
    Capabilities,
    ContainerConfig,
    ContainerSecurity,
    Device,
    EnvVar,
    LinuxResources,
    Mount,
    SELinuxOptions,
)
from cri_runtime.oci import apparmor, seccomp, selinux

OCI_VERSION = "1.1.0"
DEFAULT_PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Every capability of Linux 5.9+, in kernel order (CAP_CHOWN is 0): the names a config may use.
ALL_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
_CAPABILITY_ORDER = {name: position for position, name in enumerate(ALL_CAPABILITIES)}

DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

DEFAULT_MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
DEFAULT_READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

# The device cgroup of an unprivileged container: nothing, except mknod of any node (creating one
# is harmless while opening it is denied) and the pseudo-devices every program expects.
DEFAULT_DEVICE_RULES: tuple[dict[str, Any], ...] = (
    {"allow": False, "access": "rwm"},
    {"allow": True, "type": "c", "access": "m"},
    {"allow": True, "type": "b", "access": "m"},
    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},  # /dev/null
    {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"},  # /dev/zero
    {"allow": True, "type": "c", "major": 1, "minor": 7, "access": "rwm"},  # /dev/full
    {"allow": True, "type": "c", "major": 1, "minor": 8, "access": "rwm"},  # /dev/random
    {"allow": True, "type": "c", "major": 1, "minor": 9, "access": "rwm"},  # /dev/urandom
    {"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"},  # /dev/tty
    {"allow": True, "type": "c", "major": 5, "minor": 1, "access": "rwm"},  # /dev/console
    {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},  # /dev/ptmx
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},  # /dev/pts/*
)

SHM_SIZE = "65536k"  # 64 MiB, Docker's and containerd's private /dev/shm
ETC_HOSTS = "/etc/hosts"
ETC_RESOLV_CONF = "/etc/resolv.conf"
ETC_HOSTNAME = "/etc/hostname"
DEV_SHM = "/dev/shm"

# IDs are uint32 and (uid_t)-1 means "no change" to the kernel, so it cannot name a user.
MAX_ID = 2**32 - 2
# The image's passwd and group files are read whole; anything larger is not a real one.
MAX_ACCOUNT_FILE = 16 * 1024 * 1024
_MAX_SYMLINKS = 40  # as the kernel's path walk, so a loop fails the same way
# Directories of /dev that hold no device a container should get: they are mounted anew inside.
_SKIPPED_DEVICE_DIRS = frozenset({"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"})

# Files below /proc that runc and crun let a bind mount cover (what lxcfs provides).
PROC_BIND_TARGETS = frozenset(
    {
        "/proc/cpuinfo",
        "/proc/diskstats",
        "/proc/meminfo",
        "/proc/stat",
        "/proc/swaps",
        "/proc/uptime",
        "/proc/loadavg",
        "/proc/slabinfo",
        "/proc/sys/kernel/ns_last_pid",
    }
)

# What the OCI runtime reads inside the container to start and exec processes there.
_RUNTIME_NEEDS = re.compile(r"/|/proc|/proc/(self|thread-self|[0-9]+)(/.*)?|/dev|/dev/null")

_PROPAGATION = {
    "private": "rprivate",
    "host_to_container": "rslave",
    "bidirectional": "rshared",
}

PidMode = Literal["pod", "container", "node", "target"]


@dataclass(frozen=True)
class SandboxContext:
    """What the spec needs to know of the pod a container joins."""

    pod_id: str
    hostname: str
    netns_path: str | None  # None: host network
    ipc_ns_path: str | None  # None: host IPC
    uts_ns_path: str | None  # None: host UTS
    # The PID namespace to join (the pod's shared one, or a TARGET container's); None with pid_mode
    # "node" (the host's) or "container" (a new one).
    pid_ns_path: str | None
    pid_mode: PidMode
    hosts_path: str | None  # pod files bound over the image's; None: leave the image's
    resolv_path: str | None
    hostname_path: str | None
    shm_path: str | None  # the pod's /dev/shm to bind; None: a private 64M tmpfs
    sysctls: Mapping[str, str]
    privileged: bool  # the pod may hold privileged containers
    selinux_options: SELinuxOptions | None = None  # the pod's
    # The pod's pinned user namespace and its (container ID, host ID, length) mappings; None: the
    # host's user namespace.
    userns_path: str | None = None
    uid_mappings: tuple[tuple[int, int, int], ...] = ()
    gid_mappings: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class _PasswdEntry:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class _GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


# --- the spec -------------------------------------------------------------------------------------


def build_container_spec(
    *,
    container_id: str,
    config: ContainerConfig,
    image_config: Mapping[str, Any],
    sandbox: SandboxContext,
    rootfs: Path,
    cgroups_path: str,
    oom_score_adj_floor: int | None,
    seccomp_profile_root: Path | None = None,
    cgroup_namespace: bool = False,
    host_capabilities: Collection[str] | None = None,
    apparmor_enabled: bool | None = None,
    selinux_enabled: bool | None = None,
    pids_limit: int = 0,
) -> dict[str, Any]:
    """The OCI config.json of a container, as a JSON-serialisable dict.

    ``image_config`` is the image's OCI config JSON (with its ``config`` object), ``rootfs`` the
    mounted root file system, ``cgroups_path`` the cgroupfs path of the container.
    ``oom_score_adj_floor`` is the lowest oom_score_adj pycri can grant (its own, when it lacks
    CAP_SYS_RESOURCE). ``seccomp_profile_root`` is the base of relative legacy ``localhost/``
    profiles. ``cgroup_namespace`` gives the container a cgroup namespace of its own, which only
    makes sense on a cgroup v2 host. ``host_capabilities`` is what "all capabilities" means (for
    privileged containers and "ALL"): the capabilities pycri itself holds, which
    :func:`current_capabilities` reads when it is None, because the OCI runtime cannot grant a
    capability its caller lacks. ``apparmor_enabled`` and ``selinux_enabled`` say whether the
    host has these LSMs on (None: ask the kernel). Raises InvalidArgument, naming the field, for
    bad input, and FailedPrecondition for confinement the host cannot give.
    """
    security = config.security
    privileged = security.privileged
    if privileged and not sandbox.privileged:
        raise InvalidArgument(
            "linux.security_context.privileged: a privileged container needs a privileged pod sandbox"
        )
    _check_user_namespace(security, sandbox)
    image = _image_section(image_config)

    everything = _ordered(host_capabilities if host_capabilities is not None else current_capabilities())
    capabilities = _capabilities(security.capabilities, privileged, everything)
    uid, gid, additional_gids = resolve_user(
        rootfs,
        str(image.get("User") or ""),
        security.run_as_user,
        security.run_as_username,
        security.run_as_group,
        list(security.supplemental_groups),
        merge_image_groups=security.supplemental_groups_policy != "strict",
    )
    resources, oom_score_adj = _resources(config.resources or LinuxResources(), oom_score_adj_floor)
    mounts, rootfs_propagation = _mounts(config, sandbox, privileged)
    devices, device_rules = _devices(config.devices, privileged)
    resources["devices"] = device_rules

    process: dict[str, Any] = {
        "terminal": config.tty,
        "user": {"uid": uid, "gid": gid, "additionalGids": additional_gids},
        "args": resolve_command(image, list(config.command), list(config.args)),
        "env": _environment(image.get("Env"), config.envs, sandbox.hostname),
        "cwd": _working_dir(config.working_dir, image.get("WorkingDir")),
        "capabilities": capabilities,
        "noNewPrivileges": security.no_new_privs,
        "oomScoreAdj": oom_score_adj,
    }
    linux_spec: dict[str, Any] = {
        "cgroupsPath": cgroups_path,
        "resources": resources,
        "namespaces": _namespaces(sandbox, cgroup_namespace),
    }
    if sandbox.userns_path:
        # The namespace exists (pinned by the pod); runc wants its mappings all the same.
        linux_spec["uidMappings"] = _oci_id_mappings(sandbox.uid_mappings)
        linux_spec["gidMappings"] = _oci_id_mappings(sandbox.gid_mappings)
    apparmor_profile = apparmor.container_profile(security, enabled=apparmor_enabled)
    if apparmor_profile is not None:
        process["apparmorProfile"] = apparmor_profile
    # A privileged container is not labelled (as with Docker's --privileged: label=disable).
    if not privileged and (selinux_enabled if selinux_enabled is not None else host_selinux.enabled()):
        process_context, file_context = host_selinux.container_contexts()
        labels = selinux.container_labels(
            sandbox.pod_id,
            sandbox.selinux_options,
            security.selinux_options,
            process_context=process_context,
            file_context=file_context,
        )
        process["selinuxLabel"] = labels.process
        linux_spec["mountLabel"] = labels.mount
    if devices:
        linux_spec["devices"] = devices
    if not privileged:
        for name in ("masked_paths", "readonly_paths"):
            for position, path in enumerate(getattr(security, name)):
                if not path.startswith("/") or "\0" in path:
                    raise InvalidArgument(
                        f"linux.security_context.{name}[{position}] {path!r} is not an absolute path"
                    )
                if name == "masked_paths" and _RUNTIME_NEEDS.fullmatch(_clean(path)):
                    # Hidden, the OCI runtime cannot set the process up or exec into it.
                    raise InvalidArgument(
                        f"linux.security_context.masked_paths[{position}] {path!r}: the OCI runtime "
                        "needs it inside the container"
                    )
        linux_spec["maskedPaths"] = list(security.masked_paths) or list(DEFAULT_MASKED_PATHS)
        linux_spec["readonlyPaths"] = list(security.readonly_paths) or list(DEFAULT_READONLY_PATHS)
        profile = _seccomp(security, capabilities["bounding"], seccomp_profile_root)
        if profile is not None:
            linux_spec["seccomp"] = profile
    if sandbox.sysctls:
        linux_spec["sysctl"] = dict(sandbox.sysctls)
    if rootfs_propagation:
        linux_spec["rootfsPropagation"] = rootfs_propagation

    if pids_limit > 0:
        # The node's setting (pycri.toml pids_limit): CRI has no field for it.
        resources["pids"] = {"limit": pids_limit}
    annotations = _annotations(container_id, config, sandbox)
    if _SYSTEMD_CGROUPS_PATH.fullmatch(cgroups_path):
        # Under its systemd manager crun puts the process in a "container" subgroup of the scope on
        # cgroup v2, runc in the scope itself. One layout for both, runc's: the limits, the stats
        # and the memory.events conmon watches for OOM kills are the scope's own.
        annotations["run.oci.systemd.subgroup"] = ""
    # No "hostname": the container never gets a UTS namespace of its own. It joins the pod's, whose
    # hostname the sandbox already set, or the host's, whose name it must not change.
    return {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": str(rootfs), "readonly": security.readonly_rootfs},
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux_spec,
    }


def relabel_targets(config: ContainerConfig, oci_spec: Mapping[str, Any]) -> list[tuple[Path, str]]:
    """The host paths of mounts that ask for selinux_relabel, with the label they get (the
    container's mount label); none where the spec carries no mount label (SELinux off)."""
    label = oci_spec.get("linux", {}).get("mountLabel")
    if not label:
        return []
    return [(Path(m.host_path), label) for m in config.mounts if m.selinux_relabel and not m.image]


def _image_section(image_config: Mapping[str, Any]) -> Mapping[str, Any]:
    section = image_config.get("config")
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise InvalidArgument("image config: 'config' is not an object")
    return section


def _check_user_namespace(security: ContainerSecurity, sandbox: SandboxContext) -> None:
    """A container is in its pod's user namespace (mode POD, which kubelet repeats from the pod)
    or the node's; it cannot have one of its own nor another container's."""
    userns = security.namespace_options.userns
    field = "linux.security_context.namespace_options.userns_options"
    if userns is None:
        return
    if userns.mode == "pod":
        if sandbox.userns_path is None:
            raise InvalidArgument(f"{field}: mode POD, but the pod sandbox has no user namespace")
        return
    if userns.mode == "node":
        if sandbox.userns_path is not None:
            raise InvalidArgument(f"{field}: mode NODE, but the pod sandbox has a user namespace")
        return
    raise InvalidArgument(f"{field}: mode {userns.mode.upper()} is not supported (POD or NODE)")


def _oci_id_mappings(mappings: Iterable[tuple[int, int, int]]) -> list[dict[str, int]]:
    return [{"containerID": c, "hostID": h, "size": n} for c, h, n in mappings]


# linux.cgroupsPath for an OCI runtime's systemd cgroup manager: "<slice>:<prefix>:<name>".
_SYSTEMD_CGROUPS_PATH = re.compile(r"[^/:]+\.slice:[^/:]+:[^/:]+")


def _annotations(container_id: str, config: ContainerConfig, sandbox: SandboxContext) -> dict[str, str]:
    annotations = dict(config.annotations)
    # Ours last, so that a config cannot pose as another sandbox's container.
    annotations.update(
        {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-id": container_id,
            "io.kubernetes.cri.container-name": config.metadata.name,
            "io.kubernetes.cri.sandbox-id": sandbox.pod_id,
        }
    )
    if config.image:
        annotations["io.kubernetes.cri.image-name"] = config.image
    return annotations


# --- process: command, environment, working directory ---------------------------------------------


def resolve_command(
    image_config: Mapping[str, Any], command: Sequence[str], args: Sequence[str]
) -> list[str]:
    """process.args as Docker and containerd compute them.

    CRI ``command`` replaces the image's Entrypoint and drops its Cmd (the Cmd was written as
    arguments for that Entrypoint); CRI ``args`` replaces the Cmd. ``image_config`` is either the
    whole image config or its ``config`` section.
    """
    image = _image_section(image_config) if "config" in image_config else image_config
    entrypoint = _string_list(image.get("Entrypoint"), "image config Entrypoint")
    cmd = _string_list(image.get("Cmd"), "image config Cmd")
    if command:
        entrypoint, cmd = list(command), []
    if args:
        cmd = list(args)
    result = entrypoint + cmd
    if not result:
        raise InvalidArgument("no command specified: neither the container config nor the image has one")
    if not result[0]:
        raise InvalidArgument("the command's first word (the program) is empty")
    if any("\0" in word for word in result):
        raise InvalidArgument("the command holds a NUL byte, which no argument can")
    return result


def _string_list(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # a hand-written image config; Docker treats it as one word
        return [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidArgument(f"{what} must be a list of strings")
    return list(value)


def _environment(image_env: object, config_envs: Iterable[EnvVar], hostname: str) -> list[str]:
    # Keyed by name so a later value replaces an earlier one where it stood, as containerd does:
    # defaults first, then the image, then the container config.
    env: dict[str, str] = {"PATH": f"PATH={DEFAULT_PATH_ENV}"}
    if hostname:
        env["HOSTNAME"] = f"HOSTNAME={hostname}"
    for item in _string_list(image_env, "image config Env"):
        env[item.partition("=")[0]] = item
    for position, pair in enumerate(config_envs):
        if not pair.key:
            raise InvalidArgument(f"envs[{position}].key is empty")
        if "\0" in pair.key or "\0" in pair.value:
            raise InvalidArgument(f"envs[{position}] holds a NUL byte, which an environment cannot")
        if "=" in pair.key:
            raise InvalidArgument(
                f"envs[{position}].key {pair.key!r} holds '=', which ends a variable's name"
            )
        env[pair.key] = f"{pair.key}={pair.value}"
    return list(env.values())


def _working_dir(config_dir: str, image_dir: object) -> str:
    if config_dir:
        if not config_dir.startswith("/") or "\0" in config_dir:
            raise InvalidArgument(f"working_dir {config_dir!r} must be an absolute path")
        return _clean(config_dir)
    if isinstance(image_dir, str) and image_dir:
        # A relative WORKDIR in a hand-made image config can only mean from the root.
        return _clean("/" + image_dir)
    return "/"


def _clean(path: str) -> str:
    """An absolute, normalised container path (posixpath keeps a leading '//', we do not)."""
    return "/" + posixpath.normpath("/" + path).lstrip("/")


# --- users and groups -----------------------------------------------------------------------------


def resolve_user(
    rootfs: Path,
    image_user: str,
    run_as_user: int | None,
    run_as_username: str,
    run_as_group: int | None,
    supplemental: Sequence[int],
    *,
    merge_image_groups: bool = True,
) -> tuple[int, int, list[int]]:
    """(uid, gid, additional gids) of the container's process.

    The user comes from ``run_as_username``, else ``run_as_user``, else the image's USER (``name``,
    ``uid``, ``name:group``, ``uid:gid``); names are looked up in the image's /etc/passwd and
    /etc/group. The primary gid comes from the group given, else the passwd entry, else 0. The
    additional gids are the primary gid (so that no group of the runtime is kept), the groups of
    /etc/group that list the user (unless ``merge_image_groups`` is false: the Strict policy), and
    ``supplemental``.
    """
    if run_as_username:
        user_part: str = run_as_username
        group_part = None if run_as_group is None else str(run_as_group)
    elif run_as_user is not None:
        user_part = str(_checked_id(run_as_user, "linux.security_context.run_as_user"))
        group_part = None if run_as_group is None else str(run_as_group)
    else:
        if run_as_group is not None:
            raise InvalidArgument(
                "linux.security_context.run_as_group is set without run_as_user or run_as_username"
            )
        user_part, _, group_text = image_user.strip().partition(":")
        user_part = user_part or "0"
        group_part = group_text or None

    passwd: list[_PasswdEntry] | None = None
    entry: _PasswdEntry | None
    if _is_number(user_part):
        uid = _checked_id(int(user_part), f"user {user_part}")
        passwd = _read_passwd(rootfs)
        entry = next((e for e in passwd if e.uid == uid), None)
    else:
        passwd = _read_passwd(rootfs)
        entry = next((e for e in passwd if e.name == user_part), None)
        if entry is None:
            raise InvalidArgument(f"user {user_part!r} is not in the image's /etc/passwd")
        uid = entry.uid

    groups: list[_GroupEntry] | None = None
    if group_part is None:
        gid = entry.gid if entry else 0
    elif _is_number(group_part):
        gid = _checked_id(int(group_part), f"group {group_part}")
    else:
        groups = _read_group(rootfs)
        found = next((g for g in groups if g.name == group_part), None)
        if found is None:
            raise InvalidArgument(f"group {group_part!r} is not in the image's /etc/group")
        gid = found.gid

    additional = [gid]
    if merge_image_groups and entry is not None:
        groups = groups if groups is not None else _read_group(rootfs)
        additional += [g.gid for g in groups if entry.name in g.members]
    for position, extra in enumerate(supplemental):
        additional.append(_checked_id(extra, f"linux.security_context.supplemental_groups[{position}]"))
    return uid, gid, list(dict.fromkeys(additional))


def _is_number(text: str) -> bool:
    return re.fullmatch(r"[0-9]+", text) is not None


def _checked_id(value: int, what: str) -> int:
    if not 0 <= value <= MAX_ID:
        raise InvalidArgument(f"{what}: {value} is not a valid user or group ID")
    return value


def _read_passwd(rootfs: Path) -> list[_PasswdEntry]:
    entries = []
    for fields in _account_lines(rootfs, "/etc/passwd"):
        if len(fields) >= 4 and _is_number(fields[2]) and _is_number(fields[3]):
            entries.append(_PasswdEntry(fields[0], int(fields[2]), int(fields[3])))
    return entries


def _read_group(rootfs: Path) -> list[_GroupEntry]:
    entries = []
    for fields in _account_lines(rootfs, "/etc/group"):
        if len(fields) >= 3 and _is_number(fields[2]):
            members = fields[3] if len(fields) > 3 else ""
            names = tuple(m.strip() for m in members.split(",") if m.strip())
            entries.append(_GroupEntry(fields[0], int(fields[2]), names))
    return entries


def _account_lines(rootfs: Path, path: str) -> Iterator[list[str]]:
    """The colon-separated fields of each entry of an account file; nothing when it is absent."""
    try:
        data = read_file_in_root(rootfs, path, MAX_ACCOUNT_FILE)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise InvalidArgument(f"the image's {path} cannot be read: {exc.strerror or exc}") from None
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        # Skip comments and NIS "+"/"-" compat entries, as libc's files backend does.
        if line and not line.startswith(("#", "+", "-")):
            yield line.split(":")


# --- scoped access to the root file system --------------------------------------------------------


def _open_in_root(root_fd: int, path: str, *, create: tuple[int, int] | None = None) -> int:
    """An O_PATH descriptor of ``path`` resolved inside the tree of ``root_fd`` as if it were '/'.

    Symlinks are followed by hand, absolute ones from the root and '..' stopping at the root, so
    that nothing the image contains can point the walk at the host. With ``create`` = (uid, gid),
    missing components are made as directories (0755) owned by that user.
    """
    stack = [os.dup(root_fd)]
    todo = deque(part for part in path.split("/") if part)
    links = 0
    try:
        while todo:
            name = todo.popleft()
            if name == ".":
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            try:
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            except FileNotFoundError:
                if create is None:
                    raise
                os.mkdir(name, 0o755, dir_fd=stack[-1])
                # mkdir honours the umask; the mode must not depend on the daemon's.
                os.chmod(name, 0o755, dir_fd=stack[-1])
                os.chown(name, create[0], create[1], dir_fd=stack[-1], follow_symlinks=False)
                fd = os.open(
                    name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=stack[-1]
                )
            try:
                mode = os.fstat(fd).st_mode
                if stat.S_ISLNK(mode):
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                    target = os.readlink(name, dir_fd=stack[-1])
                    if target.startswith("/"):
                        while len(stack) > 1:
                            os.close(stack.pop())
                    todo.extendleft(reversed([part for part in target.split("/") if part]))
                    os.close(fd)
                    continue
                if todo and not stat.S_ISDIR(mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            except BaseException:
                os.close(fd)
                raise
            stack.append(fd)
        return stack.pop()
    finally:
        for fd in stack:
            os.close(fd)


def read_file_in_root(rootfs: Path, path: str, limit: int) -> bytes:
    """The content of the regular file ``path`` inside ``rootfs`` (scoped), at most ``limit`` bytes."""
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _open_in_root(root_fd, path)
    finally:
        os.close(root_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            # A FIFO or device planted in the image must not block or reach the host.
            raise OSError(errno.EINVAL, "not a regular file", path)
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        # Reopening the O_PATH descriptor through /proc reads exactly the file resolved above.
        reader = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)
    with os.fdopen(reader, "rb") as handle:
        return handle.read(limit + 1)[:limit]


def ensure_working_dir(rootfs: Path, cwd: str, uid: int, gid: int) -> None:
    """Create the working directory ``cwd`` inside ``rootfs`` (scoped) if it is missing.

    Components that are created belong to the container's user, so that a non-root process can
    write where it starts, as Docker does for a WORKDIR it creates. InvalidArgument when a
    component exists and is not a directory.
    """
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _open_in_root(root_fd, cwd, create=(uid, gid))
    except (NotADirectoryError, FileExistsError) as exc:
        raise InvalidArgument(f"working directory {cwd!r}: {exc.strerror}") from None
    finally:
        os.close(root_fd)
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise InvalidArgument(f"working directory {cwd!r} exists in the image and is not a directory")
    finally:
        os.close(fd)


# --- capabilities ---------------------------------------------------------------------------------


def _capabilities(config: Capabilities, privileged: bool, everything: Sequence[str]) -> dict[str, list[str]]:
    if privileged:
        return {name: list(everything) for name in ("bounding", "effective", "permitted")}
    add = [_capability(name, f"capabilities.add_capabilities[{i}]") for i, name in enumerate(config.add)]
    drop = [_capability(name, f"capabilities.drop_capabilities[{i}]") for i, name in enumerate(config.drop)]
    ambient = [
        _capability(name, f"capabilities.add_ambient_capabilities[{i}]")
        for i, name in enumerate(config.add_ambient)
    ]
    # containerd's order, so that "ALL" composes with single names: add ALL, drop ALL, then add
    # single names, then drop single names (a name both added and dropped ends up dropped).
    held = set(DEFAULT_CAPABILITIES)
    if "ALL" in add:
        held = set(everything)
    if "ALL" in drop:
        held = set()
    held |= {name for name in add if name != "ALL"}
    held -= {name for name in drop if name != "ALL"}
    ambient_set = set(everything) if "ALL" in ambient else {name for name in ambient if name != "ALL"}
    # The kernel raises an ambient capability only if it is permitted and inheritable too.
    held |= ambient_set
    result = {"bounding": _ordered(held), "effective": _ordered(held), "permitted": _ordered(held)}
    if ambient_set:
        result["inheritable"] = _ordered(ambient_set)
        result["ambient"] = _ordered(ambient_set)
    return result


@functools.cache
def current_capabilities(status: Path = Path("/proc/self/status")) -> tuple[str, ...]:
    """The capabilities in this process's bounding set, by name, in kernel order.

    containerd gives privileged containers exactly these: a host (or a container pycri runs in)
    may withhold some, and asking the OCI runtime for one of those fails the container at capset.
    Falls back to every known capability when the status file cannot be read.
    """
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapBnd:"):
                mask = int(line.split(":", 1)[1], 16)
                return tuple(name for bit, name in enumerate(ALL_CAPABILITIES) if mask >> bit & 1)
    except (OSError, ValueError):
        pass
    return ALL_CAPABILITIES


def _capability(name: str, field: str) -> str:
    upper = name.strip().upper()
    if upper == "ALL":
        return upper
    canonical = upper if upper.startswith("CAP_") else "CAP_" + upper
    if canonical not in _CAPABILITY_ORDER:
        raise InvalidArgument(f"{field}: unknown capability {name!r}")
    return canonical


def _ordered(capabilities: Iterable[str]) -> list[str]:
    return sorted(capabilities, key=_CAPABILITY_ORDER.__getitem__)


# --- seccomp --------------------------------------------------------------------------------------


def _seccomp(
    security: ContainerSecurity, bounding: Sequence[str], profile_root: Path | None
) -> dict[str, Any] | None:
    if security.seccomp is not None:
        profile = security.seccomp
        kind = profile.kind
        if kind == "runtime_default":
            return seccomp.default_profile(bounding)
        if kind == "unconfined":
            return None
        if kind == "localhost":
            ref = profile.localhost_ref
            if not ref.startswith("/"):
                raise InvalidArgument(
                    f"linux.security_context.seccomp.localhost_ref {ref!r} must be an absolute path"
                )
            return _localhost_profile(Path(ref), bounding)
        raise InvalidArgument(f"linux.security_context.seccomp.profile_type {kind} is unknown")

    legacy = security.seccomp_profile_path
    if legacy in ("", "unconfined"):
        return None
    if legacy in ("runtime/default", "docker/default"):
        return seccomp.default_profile(bounding)
    if legacy.startswith("localhost/"):
        name = legacy.removeprefix("localhost/")
        if name.startswith("/"):
            return _localhost_profile(Path(name), bounding)
        relative = posixpath.normpath(name)
        if profile_root is None or not name or relative == ".." or relative.startswith("../"):
            raise InvalidArgument(
                f"linux.security_context.seccomp_profile_path {legacy!r}: a relative profile needs a "
                "profile root and must stay inside it"
            )
        return _localhost_profile(profile_root / relative, bounding)
    raise InvalidArgument(f"linux.security_context.seccomp_profile_path {legacy!r} is not a known profile")


def _localhost_profile(path: Path, bounding: Sequence[str]) -> dict[str, Any]:
    return seccomp.to_oci(seccomp.load_profile(path), bounding, source=f"seccomp profile {path}")


# --- mounts ---------------------------------------------------------------------------------------


def host_paths_to_create(config: ContainerConfig) -> list[Path]:
    """Host paths of the config's bind mounts that do not exist: the caller makes them directories
    before the spec is built, as containerd and kubelet's hostPath DirectoryOrCreate expect."""
    missing: list[Path] = []
    for mount in config.mounts:
        if mount.image or not mount.host_path.startswith("/") or "\0" in mount.host_path:
            continue  # refused by build_container_spec with a reason
        path = Path(mount.host_path)
        if not os.path.lexists(path) and path not in missing:
            missing.append(path)
    return missing


def _mounts(
    config: ContainerConfig, sandbox: SandboxContext, privileged: bool
) -> tuple[list[dict[str, Any]], str | None]:
    """The spec's mounts, parents before children, and the root's propagation when a mount needs one."""
    readonly_rootfs = config.security.readonly_rootfs
    requested = [_config_mount(position, mount) for position, mount in enumerate(config.mounts)]
    destinations = {m["destination"] for m in requested}

    chosen: dict[str, dict[str, Any]] = {}
    for mount in _default_mounts(sandbox, privileged):
        destination = mount["destination"]
        # A /dev of the config's own takes the place of everything the defaults put under /dev.
        if destination in destinations or ("/dev" in destinations and destination.startswith("/dev/")):
            continue
        chosen[destination] = mount
    for mount in _pod_mounts(sandbox, readonly_rootfs):
        if mount["destination"] not in destinations:
            chosen[mount["destination"]] = mount
    for mount in requested:
        # A later mount at the same destination replaces an earlier one, and moves to its place.
        chosen.pop(mount["destination"], None)
        chosen[mount["destination"]] = mount

    # A stable sort by depth mounts a parent before anything inside it, keeping the order otherwise.
    mounts = sorted(chosen.values(), key=lambda m: _depth(m["destination"]))
    options = {option for m in requested for option in m["options"]}
    propagation = "rshared" if "rshared" in options else "rslave" if "rslave" in options else None
    return mounts, propagation


def _depth(destination: str) -> int:
    return len([part for part in destination.split("/") if part])


def _default_mounts(sandbox: SandboxContext, privileged: bool) -> list[dict[str, Any]]:
    # A privileged container may write to sysfs and cgroupfs (to load modules, manage devices,
    # create cgroups), as in containerd.
    writable = "rw" if privileged else "ro"
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", f"size={SHM_SIZE}"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", writable],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", writable],
        },
    ]
    if sandbox.shm_path is None:
        mounts.append(
            {
                "destination": DEV_SHM,
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={SHM_SIZE}"],
            }
        )
    return mounts


def _pod_mounts(sandbox: SandboxContext, readonly_rootfs: bool) -> list[dict[str, Any]]:
    """The pod's shared files. /etc files are read-only with a read-only root, as in containerd."""
    mounts = []
    if sandbox.shm_path is not None:
        mounts.append(_bind(DEV_SHM, sandbox.shm_path, readonly=False))
    for destination, source in (
        (ETC_HOSTS, sandbox.hosts_path),
        (ETC_RESOLV_CONF, sandbox.resolv_path),
        (ETC_HOSTNAME, sandbox.hostname_path),
    ):
        if source is not None:
            mounts.append(_bind(destination, source, readonly=readonly_rootfs))
    return mounts


def _bind(destination: str, source: str, *, readonly: bool) -> dict[str, Any]:
    return {
        "destination": destination,
        "type": "bind",
        "source": source,
        "options": ["rbind", "rprivate", "ro" if readonly else "rw"],
    }


def _config_mount(position: int, mount: Mount) -> dict[str, Any]:
    field = f"mounts[{position}]"
    if mount.image:
        # The container manager mounts image volumes and hands them over as host paths.
        raise InvalidArgument(f"{field}.image: an image volume must be mounted before the spec is built")
    if mount.uid_mappings or mount.gid_mappings:
        raise InvalidArgument(f"{field}: ID-mapped mounts need user namespaces, which are not supported")
    if not mount.container_path.startswith("/"):
        raise InvalidArgument(f"{field}.container_path {mount.container_path!r} must be an absolute path")
    if not mount.host_path.startswith("/"):
        raise InvalidArgument(f"{field}.host_path {mount.host_path!r} must be an absolute path")
    if "\0" in mount.host_path or "\0" in mount.container_path:
        raise InvalidArgument(f"{field}: a path holds a NUL byte")
    destination = _clean(mount.container_path)
    if (destination == "/proc" or destination.startswith("/proc/")) and destination not in PROC_BIND_TARGETS:
        # The OCI runtimes refuse to cover /proc with anything but procfs (CVE-2019-19921).
        raise InvalidArgument(
            f"{field}.container_path {mount.container_path!r}: /proc cannot be bind-mounted over"
        )
    propagation = _PROPAGATION.get(mount.propagation)
    if propagation is None:
        raise InvalidArgument(f"{field}.propagation {mount.propagation} is unknown")
    options = ["rbind", propagation]
    if mount.recursive_read_only:
        # Recursive read-only is applied to the whole tree once; a mount propagated in later
        # would arrive writable, so it is only meaningful on a private read-only mount.
        if not mount.readonly:
            raise InvalidArgument(f"{field}.recursive_read_only needs readonly")
        if mount.propagation != "private":
            raise InvalidArgument(f"{field}.recursive_read_only needs PROPAGATION_PRIVATE")
        options += ["ro", "rro"]
    else:
        options.append("ro" if mount.readonly else "rw")
    # selinux_relabel is the caller's to do (relabel_targets). mount_options are not passed on: they
    # are for image volumes, which are refused above.
    return {
        "destination": destination,
        "type": "bind",
        "source": mount.host_path,
        "options": options,
    }


# --- devices --------------------------------------------------------------------------------------


def _devices(
    requested: Iterable[Device], privileged: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """linux.devices and the device cgroup rules."""
    devices: dict[str, dict[str, Any]] = {}
    if privileged:
        for device in _devices_under(Path("/dev"), "/dev"):
            devices[device["path"]] = device
        rules: list[dict[str, Any]] = [{"allow": True, "access": "rwm"}]
    else:
        rules = [dict(rule) for rule in DEFAULT_DEVICE_RULES]
    for position, wanted in enumerate(requested):
        field = f"devices[{position}]"
        permissions = wanted.permissions or "rwm"
        if not set(permissions) <= set("rwm"):
            raise InvalidArgument(f"{field}.permissions {wanted.permissions!r} may hold only r, w and m")
        if not wanted.host_path.startswith("/"):
            raise InvalidArgument(f"{field}.host_path {wanted.host_path!r} must be an absolute path")
        container_path = wanted.container_path or wanted.host_path
        if not container_path.startswith("/"):
            raise InvalidArgument(f"{field}.container_path {container_path!r} must be an absolute path")
        container_path = _clean(container_path)
        try:
            info = os.stat(wanted.host_path)
        except FileNotFoundError:
            raise InvalidArgument(f"{field}.host_path {wanted.host_path!r} does not exist") from None
        except OSError as exc:
            raise InvalidArgument(f"{field}.host_path {wanted.host_path!r}: {exc.strerror}") from None
        except ValueError:  # a NUL byte
            raise InvalidArgument(f"{field}.host_path {wanted.host_path!r} is not a path") from None
        if stat.S_ISDIR(info.st_mode):
            found = list(_devices_under(Path(wanted.host_path), container_path))
        elif stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
            found = [_device(container_path, info)]
        else:
            raise InvalidArgument(f"{field}.host_path {wanted.host_path!r} is not a device")
        for device in found:
            devices[device["path"]] = device
            if not privileged:
                rules.append(
                    {
                        "allow": True,
                        "type": device["type"],
                        "major": device["major"],
                        "minor": device["minor"],
                        "access": permissions,
                    }
                )
    return list(devices.values()), rules


def _device(container_path: str, info: os.stat_result) -> dict[str, Any]:
    return {
        "path": container_path,
        "type": "b" if stat.S_ISBLK(info.st_mode) else "c",
        "major": os.major(info.st_rdev),
        "minor": os.minor(info.st_rdev),
        "fileMode": stat.S_IMODE(info.st_mode),
        "uid": info.st_uid,
        "gid": info.st_gid,
    }


def _devices_under(directory: Path, container_directory: str) -> Iterator[dict[str, Any]]:
    """The character and block devices below a host directory; symlinks are not followed."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        target = posixpath.join(container_directory, entry.name)
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # gone while we looked
        if stat.S_ISDIR(info.st_mode):
            if entry.name not in _SKIPPED_DEVICE_DIRS:
                yield from _devices_under(Path(entry.path), target)
        elif (stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)) and entry.name != "console":
            # /dev/console is the runtime's to set up (the terminal of the container).
            yield _device(target, info)


# --- namespaces -----------------------------------------------------------------------------------


def _namespaces(sandbox: SandboxContext, cgroup_namespace: bool) -> list[dict[str, str]]:
    namespaces: list[dict[str, str]] = []
    if sandbox.userns_path:
        # First: the runtimes join it before the namespaces it owns.
        namespaces.append({"type": "user", "path": sandbox.userns_path})
    if sandbox.pid_mode in ("pod", "target"):
        if not sandbox.pid_ns_path:
            raise InvalidArgument(f"PID namespace mode {sandbox.pid_mode!r} needs a namespace to join")
        namespaces.append({"type": "pid", "path": sandbox.pid_ns_path})
    elif sandbox.pid_mode == "container":
        namespaces.append({"type": "pid"})
    elif sandbox.pid_mode != "node":
        raise InvalidArgument(f"PID namespace mode {sandbox.pid_mode!r} is unknown")
    # Network, IPC and UTS are the pod's, pinned by the sandbox; no path means the host's.
    for kind, path in (
        ("network", sandbox.netns_path),
        ("ipc", sandbox.ipc_ns_path),
        ("uts", sandbox.uts_ns_path),
    ):
        if path:
            namespaces.append({"type": kind, "path": path})
    namespaces.append({"type": "mount"})
    if cgroup_namespace:
        namespaces.append({"type": "cgroup"})
    return namespaces


# --- resources ------------------------------------------------------------------------------------

_CPU_LIST = re.compile(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*")
_PAGE_SIZE = re.compile(r"[1-9][0-9]*[KMGTP]B")
MIN_CPU_QUOTA = 1000  # microseconds
MIN_CPU_PERIOD = 1000
MAX_CPU_PERIOD = 1_000_000
MIN_MEMORY = 4 * 1024 * 1024
# The kernel's range for cpu.shares (MIN_SHARES, MAX_SHARES); runc refuses values above it.
MIN_CPU_SHARES, MAX_CPU_SHARES = 2, 262144
_PAGE_UNITS = {"K": 1, "M": 1024, "G": 1024**2, "T": 1024**3, "P": 1024**4}


def _cpu_ranges(text: str) -> list[tuple[int, int]]:
    """The ranges of a list such as 0-3,6; a caller's 0-99999999999 stays a range, not a set."""
    ranges = []
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            ranges.append((int(first), int(last or first)))
    return ranges


def _within(ranges: list[tuple[int, int]], online: set[int]) -> bool:
    return all(
        low <= high and high - low < len(online) and all(n in online for n in range(low, high + 1))
        for low, high in ranges
    )


def check_resources_on_host(
    resources: Mapping[str, Any], sys_root: Path = Path("/sys"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> None:
    """Refuse OCI linux.resources this host cannot grant, which the OCI runtime would refuse later
    (and as its own failure) or silently not enforce: CPUs and memory nodes it lacks, huge page
    sizes it has no pool or no hugetlb controller for, a swap limit without swap accounting,
    unified keys that are no cgroup v2 file of an available controller, or any on a v1 host. Each
    message names the field and what this host has. Called before anything is made."""
    cpu = resources.get("cpu") or {}
    for key, online_file in (("cpus", "devices/system/cpu/online"), ("mems", "devices/system/node/online")):
        if key not in cpu:
            continue
        try:
            text = (sys_root / online_file).read_text().strip()
        except OSError:
            text = "0"  # no NUMA directory: one memory node
        ranges = _cpu_ranges(text)
        online = {n for low, high in ranges for n in range(low, high + 1)}
        if not _within(_cpu_ranges(cpu[key]), online):
            what = "CPUs" if key == "cpus" else "memory nodes"
            raise InvalidArgument(
                f"linux.resources.cpuset_{key} {cpu[key]!r} is not a set of this host's {what} "
                f"(this host has {what} {text})"
            )
    v2 = (cgroup_root / "cgroup.controllers").exists()
    controllers = _v2_controllers(cgroup_root) if v2 else set()
    hugepages = resources.get("hugepageLimits") or []
    if hugepages:
        pools = sorted(
            (
                int(d.name[len("hugepages-") : -len("kB")])
                for d in (sys_root / "kernel/mm/hugepages").glob("hugepages-*kB")
            ),
        )
        have = ", ".join(_page_size_name(kib) for kib in pools) or "none"
        if not (("hugetlb" in controllers) if v2 else (cgroup_root / "hugetlb").is_dir()):
            raise InvalidArgument(
                "linux.resources.hugepage_limits: this host has no hugetlb cgroup controller "
                f"(its huge page sizes: {have})"
            )
        for hugepage in hugepages:
            size = hugepage["pageSize"]
            kib = int(size[:-2]) * _PAGE_UNITS[size[-2]]
            if kib not in pools:
                raise InvalidArgument(
                    f"linux.resources.hugepage_limits: this host has no {size} huge pages "
                    f"(its huge page sizes: {have})"
                )
    memory = resources.get("memory") or {}
    swap = memory.get("swap")
    if swap not in (None, -1, memory.get("limit")) and not _swap_accounting(cgroup_root, v2):
        # swap == limit is "no swap beyond memory", which kubelet sets on cgroup v1 for every
        # container with a memory limit; without swap accounting it is left out, as containerd does.
        raise InvalidArgument(
            f"linux.resources.memory_swap_limit_in_bytes {swap}: this host has no swap accounting "
            "(no memory.swap.max / memory.memsw.limit_in_bytes; boot with swapaccount=1 or leave it unset)"
        )
    unified = resources.get("unified") or {}
    if unified and not v2:
        raise InvalidArgument(
            f"linux.resources.unified {sorted(unified)}: cgroup v2 settings need a cgroup v2 host; "
            f"{cgroup_root} is cgroup v1 here"
        )
    for key in unified:
        controller, dot, rest = key.partition(".")
        if not dot or not rest or "/" in key or key.startswith("."):
            raise InvalidArgument(
                f"linux.resources.unified key {key!r} is not a cgroup v2 file name such as memory.high"
            )
        if controller != "cgroup" and controller not in controllers:
            raise InvalidArgument(
                f"linux.resources.unified key {key!r}: this host has no {controller} cgroup v2 controller "
                f"(it has {' '.join(sorted(controllers)) or 'none'})"
            )


def _v2_controllers(cgroup_root: Path) -> set[str]:
    try:
        return set((cgroup_root / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _page_size_name(kib: int) -> str:
    for unit, size in (("GB", 1 << 20), ("MB", 1 << 10)):
        if kib % size == 0:
            return f"{kib // size}{unit}"
    return f"{kib}KB"


def _swap_accounting(cgroup_root: Path, v2: bool) -> bool:
    if not v2:
        return (cgroup_root / "memory" / "memory.memsw.limit_in_bytes").exists()
    # The root has no memory.* files; any child with the memory controller shows memory.swap.max
    # when the kernel accounts swap.
    for child in cgroup_root.iterdir():
        if (child / "memory.max").exists():
            return (child / "memory.swap.max").exists()
    return True  # no child to tell by: leave it to the OCI runtime


def linux_resources(config: LinuxResources, oom_score_adj_floor: int | None) -> tuple[dict[str, Any], int]:
    """Validated OCI linux.resources (without devices) and oomScoreAdj, for create and update."""
    return _resources(config, oom_score_adj_floor)


def _resources(config: LinuxResources, oom_score_adj_floor: int | None) -> tuple[dict[str, Any], int]:
    """linux.resources (without devices) and process.oomScoreAdj. Zero means unset."""
    field = "linux.resources"
    cpu: dict[str, Any] = {}
    if config.cpu_shares:
        if not MIN_CPU_SHARES <= config.cpu_shares <= MAX_CPU_SHARES:
            bounds = f"between {MIN_CPU_SHARES} and {MAX_CPU_SHARES}"
            raise InvalidArgument(f"{field}.cpu_shares {config.cpu_shares} must be {bounds}")
        cpu["shares"] = config.cpu_shares
    if config.cpu_quota:
        # The kernel's bounds (kernel/sched/core.c): at least 1ms of CPU time per period.
        if config.cpu_quota < -1 or 0 < config.cpu_quota < MIN_CPU_QUOTA:
            raise InvalidArgument(
                f"{field}.cpu_quota {config.cpu_quota} must be at least {MIN_CPU_QUOTA} or -1 (no limit)"
            )
        cpu["quota"] = config.cpu_quota
    if config.cpu_period:
        if not MIN_CPU_PERIOD <= config.cpu_period <= MAX_CPU_PERIOD:
            raise InvalidArgument(
                f"{field}.cpu_period {config.cpu_period} must be between {MIN_CPU_PERIOD} "
                f"and {MAX_CPU_PERIOD}"
            )
        cpu["period"] = config.cpu_period
    for name, value in (("cpus", config.cpuset_cpus), ("mems", config.cpuset_mems)):
        if value:
            compact = value.replace(" ", "")
            if not _CPU_LIST.fullmatch(compact):
                raise InvalidArgument(f"{field}.cpuset_{name} {value!r} is not a list such as 0-3,6")
            cpu[name] = compact

    memory: dict[str, Any] = {}
    limit = config.memory_limit_in_bytes
    if limit:
        if limit < MIN_MEMORY:
            # Below this the OCI runtime's own init does not fit and the create fails in it.
            raise InvalidArgument(f"{field}.memory_limit_in_bytes {limit} must be at least {MIN_MEMORY}")
        memory["limit"] = limit
    swap = config.memory_swap_limit_in_bytes
    if swap:
        # Swap is memory plus swap in cgroup v1 terms, so it cannot be below the memory limit,
        # and it bounds nothing without one (the kernel refuses it).
        if swap < -1 or (swap > 0 and (limit <= 0 or swap < limit)):
            raise InvalidArgument(
                f"{field}.memory_swap_limit_in_bytes {swap} must be -1, or at least a memory_limit_in_bytes "
                "that is set"
            )
        memory["swap"] = swap

    resources: dict[str, Any] = {}
    if cpu:
        resources["cpu"] = cpu
    if memory:
        resources["memory"] = memory
    hugepages = []
    for position, hugepage in enumerate(config.hugepage_limits):
        if not _PAGE_SIZE.fullmatch(hugepage.page_size):
            raise InvalidArgument(
                f"{field}.hugepage_limits[{position}].page_size {hugepage.page_size!r} "
                "is not a size such as 2MB"
            )
        hugepages.append({"pageSize": hugepage.page_size, "limit": hugepage.limit})
    if hugepages:
        resources["hugepageLimits"] = hugepages
    if config.unified:
        # cgroup v2 keys; on a v1 host the OCI runtime refuses them, which is the honest answer.
        resources["unified"] = dict(config.unified)

    adj = config.oom_score_adj
    if not -1000 <= adj <= 1000:
        raise InvalidArgument(f"{field}.oom_score_adj {adj} must be between -1000 and 1000")
    if oom_score_adj_floor is not None:
        # Without CAP_SYS_RESOURCE the kernel refuses a lower score than our own; ask for what it
        # will grant instead of failing the container.
        adj = max(adj, oom_score_adj_floor)
    return resources, adj
