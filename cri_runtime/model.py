"""What the runtime reads from a CRI request: pycri's own types for a pod's and a container's config.

The servicers convert the CRI schema into these (cri_runtime.cri.convert); nothing below them sees
protobuf. They are frozen, hold tuples where the schema has repeated fields, and are stored in the
state DB as plain JSON (:func:`to_json` and :func:`from_json`).

Field names follow the CRI schema where they mean the same, so that an error message naming
``linux.security_context.run_as_user`` still points the caller at the field it sent. Numbers that
the schema leaves at zero for "unset" stay zero here; fields whose presence matters to the schema
(``run_as_user``, ``seccomp``, resources) are None when absent.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

# The schema's enums as the runtime names them.
NamespaceMode = Literal["pod", "container", "node", "target"]
Protocol = Literal["tcp", "udp", "sctp"]
MountPropagation = Literal["private", "host_to_container", "bidirectional"]
ProfileType = Literal["runtime_default", "unconfined", "localhost"]
SupplementalGroupsPolicy = Literal["merge", "strict"]


@dataclass(frozen=True)
class IDMapping:
    host_id: int
    container_id: int
    length: int


@dataclass(frozen=True)
class UserNamespace:
    mode: NamespaceMode = "pod"
    uids: tuple[IDMapping, ...] = ()
    gids: tuple[IDMapping, ...] = ()


@dataclass(frozen=True)
class NamespaceOptions:
    network: NamespaceMode = "pod"
    pid: NamespaceMode = "pod"
    ipc: NamespaceMode = "pod"
    target_id: str = ""
    userns: UserNamespace | None = None  # None: not asked for (the schema's absent message)


@dataclass(frozen=True)
class SecurityProfile:
    kind: ProfileType = "runtime_default"
    localhost_ref: str = ""


@dataclass(frozen=True)
class SELinuxOptions:
    """An SELinux context's parts; empty ones are taken from the pod, then the policy's default."""

    user: str = ""
    role: str = ""
    type: str = ""
    level: str = ""


@dataclass(frozen=True)
class HugepageLimit:
    page_size: str
    limit: int


@dataclass(frozen=True)
class LinuxResources:
    """Linux cgroup settings; zero (or empty) means unset."""

    cpu_period: int = 0
    cpu_quota: int = 0
    cpu_shares: int = 0
    memory_limit_in_bytes: int = 0
    oom_score_adj: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    hugepage_limits: tuple[HugepageLimit, ...] = ()
    unified: Mapping[str, str] = field(default_factory=dict)
    memory_swap_limit_in_bytes: int = 0


# --- pods ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodMetadata:
    name: str = ""
    uid: str = ""
    namespace: str = ""
    attempt: int = 0


@dataclass(frozen=True)
class DNSConfig:
    servers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class PortMapping:
    protocol: Protocol = "tcp"
    container_port: int = 0
    host_port: int = 0
    host_ip: str = ""


@dataclass(frozen=True)
class PodSecurity:
    """The pod's LinuxSandboxSecurityContext."""

    namespace_options: NamespaceOptions = NamespaceOptions()
    run_as_user: int | None = None
    run_as_group: int | None = None
    readonly_rootfs: bool = False
    supplemental_groups: tuple[int, ...] = ()
    supplemental_groups_policy: SupplementalGroupsPolicy = "merge"
    privileged: bool = False
    seccomp: SecurityProfile | None = None
    apparmor: SecurityProfile | None = None
    seccomp_profile_path: str = ""
    selinux_options: SELinuxOptions | None = None


@dataclass(frozen=True)
class PodSandboxConfig:
    metadata: PodMetadata = PodMetadata()
    hostname: str = ""
    log_directory: str = ""
    dns: DNSConfig = DNSConfig()
    port_mappings: tuple[PortMapping, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    # linux
    cgroup_parent: str = ""
    security: PodSecurity = PodSecurity()
    sysctls: Mapping[str, str] = field(default_factory=dict)
    overhead: LinuxResources | None = None
    resources: LinuxResources | None = None


# --- containers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerMetadata:
    name: str = ""
    attempt: int = 0


@dataclass(frozen=True)
class EnvVar:
    key: str
    value: str


@dataclass(frozen=True)
class Mount:
    container_path: str = ""
    host_path: str = ""
    readonly: bool = False
    selinux_relabel: bool = False
    propagation: MountPropagation = "private"
    uid_mappings: tuple[IDMapping, ...] = ()
    gid_mappings: tuple[IDMapping, ...] = ()
    recursive_read_only: bool = False
    image: str = ""  # an image volume's reference (kubelet sends the image ID); "" for a bind mount
    image_user_specified: str = ""  # the image volume's reference as the user wrote it
    image_sub_path: str = ""
    mount_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Device:
    container_path: str = ""
    host_path: str = ""
    permissions: str = ""


@dataclass(frozen=True)
class Capabilities:
    add: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    add_ambient: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContainerSecurity:
    """The container's LinuxContainerSecurityContext."""

    capabilities: Capabilities = Capabilities()
    privileged: bool = False
    namespace_options: NamespaceOptions = NamespaceOptions()
    run_as_user: int | None = None
    run_as_group: int | None = None
    run_as_username: str = ""
    readonly_rootfs: bool = False
    supplemental_groups: tuple[int, ...] = ()
    supplemental_groups_policy: SupplementalGroupsPolicy = "merge"
    no_new_privs: bool = False
    masked_paths: tuple[str, ...] = ()
    readonly_paths: tuple[str, ...] = ()
    seccomp: SecurityProfile | None = None
    apparmor: SecurityProfile | None = None
    apparmor_profile: str = ""  # deprecated in the schema
    seccomp_profile_path: str = ""  # deprecated in the schema; read when seccomp is None
    selinux_options: SELinuxOptions | None = None


@dataclass(frozen=True)
class ContainerConfig:
    metadata: ContainerMetadata = ContainerMetadata()
    image: str = ""
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    working_dir: str = ""
    envs: tuple[EnvVar, ...] = ()
    mounts: tuple[Mount, ...] = ()
    devices: tuple[Device, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    log_path: str = ""
    stdin: bool = False
    stdin_once: bool = False
    tty: bool = False
    # linux
    resources: LinuxResources | None = None
    security: ContainerSecurity = ContainerSecurity()
    stop_signal: str = ""  # "SIGTERM" and so on; "" leaves it to the image


# --- JSON ---------------------------------------------------------------------------------------

T = TypeVar("T")


def to_json(value: Any) -> Any:
    """A dataclass of this module (or any JSON value holding them) as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_json(item) for item in value]
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    return value


def from_json(cls: type[T], data: Any) -> T:
    """The inverse of :func:`to_json` for a dataclass type; keys it does not know are ignored,
    missing ones take their defaults."""
    return typing.cast(T, _decode(cls, data))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode(hint: Any, data: Any) -> Any:
    if data is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _decode(options[0], data) if len(options) == 1 else data
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return tuple(_decode(item, v) for v in data)
    if origin is list:
        item = typing.get_args(hint)[0]
        return [_decode(item, v) for v in data]
    if origin in (dict, Mapping) or hint is Mapping:
        args = typing.get_args(hint)
        value_hint = args[1] if len(args) == 2 else Any
        return {k: _decode(value_hint, v) for k, v in data.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        hints = _hints(hint)
        known = {f.name for f in dataclasses.fields(hint) if f.init}
        return hint(**{k: _decode(hints[k], v) for k, v in data.items() if k in known})
    return data
