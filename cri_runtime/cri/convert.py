"""The CRI schema to pycri's own types and back: the only place the two meet.

Requests are converted as the servicers receive them (:func:`pod_sandbox_config`,
:func:`container_config`, :func:`linux_resources`); statuses are built from pycri's records
(:func:`sandbox_status`, :func:`container_status`, ...). An enum value the schema does not know is
refused here where pycri would refuse it anyway (a container's PID mode, a mount's propagation, a
seccomp profile type), and read as the schema's default elsewhere, as before.

:func:`legacy_sandbox_config` and :func:`legacy_container_config` read the serialized protobuf that
state DBs of older pycri versions hold; the daemon hands them to the state DB's migration.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError

from cri_runtime import model
from cri_runtime.api import api_pb2 as pb
from cri_runtime.errors import InvalidArgument
from cri_runtime.runtime.state import Container, Sandbox

K = TypeVar("K")

_NAMESPACE_MODES: dict[int, model.NamespaceMode] = {
    pb.NamespaceMode.POD: "pod",
    pb.NamespaceMode.CONTAINER: "container",
    pb.NamespaceMode.NODE: "node",
    pb.NamespaceMode.TARGET: "target",
}
_PROTOCOLS: dict[int, model.Protocol] = {
    pb.Protocol.TCP: "tcp",
    pb.Protocol.UDP: "udp",
    pb.Protocol.SCTP: "sctp",
}
_PROPAGATIONS: dict[int, model.MountPropagation] = {
    pb.MountPropagation.PROPAGATION_PRIVATE: "private",
    pb.MountPropagation.PROPAGATION_HOST_TO_CONTAINER: "host_to_container",
    pb.MountPropagation.PROPAGATION_BIDIRECTIONAL: "bidirectional",
}
_PROFILE_TYPES: dict[int, model.ProfileType] = {
    pb.SecurityProfile.ProfileType.RuntimeDefault: "runtime_default",
    pb.SecurityProfile.ProfileType.Unconfined: "unconfined",
    pb.SecurityProfile.ProfileType.Localhost: "localhost",
}
_GROUP_POLICIES: dict[int, model.SupplementalGroupsPolicy] = {
    pb.SupplementalGroupsPolicy.Merge: "merge",
    pb.SupplementalGroupsPolicy.Strict: "strict",
}


def _reverse(mapping: Mapping[int, K]) -> dict[K, int]:
    return {v: k for k, v in mapping.items()}


def _enum(mapping: Mapping[int, K], value: int, refusal: str | None = None) -> K:
    """The domain name of an enum value; an unknown one is refused with ``refusal``, or read as
    the schema's default (0) when there is none."""
    if value in mapping:
        return mapping[value]
    if refusal is not None:
        raise InvalidArgument(refusal)
    return mapping[0]


# --- requests -----------------------------------------------------------------------------------


def linux_resources(resources: pb.LinuxContainerResources) -> model.LinuxResources:
    return model.LinuxResources(
        cpu_period=resources.cpu_period,
        cpu_quota=resources.cpu_quota,
        cpu_shares=resources.cpu_shares,
        memory_limit_in_bytes=resources.memory_limit_in_bytes,
        oom_score_adj=resources.oom_score_adj,
        cpuset_cpus=resources.cpuset_cpus,
        cpuset_mems=resources.cpuset_mems,
        hugepage_limits=tuple(model.HugepageLimit(h.page_size, h.limit) for h in resources.hugepage_limits),
        unified=dict(resources.unified),
        memory_swap_limit_in_bytes=resources.memory_swap_limit_in_bytes,
    )


def _id_mappings(mappings: Iterable[pb.IDMapping]) -> tuple[model.IDMapping, ...]:
    return tuple(model.IDMapping(m.host_id, m.container_id, m.length) for m in mappings)


def _namespace_options(options: pb.NamespaceOption, *, strict_pid: bool) -> model.NamespaceOptions:
    userns = None
    if options.HasField("userns_options"):
        found = options.userns_options
        userns = model.UserNamespace(
            mode=_enum(_NAMESPACE_MODES, found.mode),
            uids=_id_mappings(found.uids),
            gids=_id_mappings(found.gids),
        )
    refusal = (
        f"linux.security_context.namespace_options.pid {options.pid} is not a known mode"
        if strict_pid
        else None
    )
    return model.NamespaceOptions(
        network=_enum(_NAMESPACE_MODES, options.network),
        pid=_enum(_NAMESPACE_MODES, options.pid, refusal),
        ipc=_enum(_NAMESPACE_MODES, options.ipc),
        target_id=options.target_id,
        userns=userns,
    )


def _profile(profile: pb.SecurityProfile, refusal: str | None) -> model.SecurityProfile:
    return model.SecurityProfile(
        kind=_enum(_PROFILE_TYPES, profile.profile_type, refusal), localhost_ref=profile.localhost_ref
    )


def _selinux(
    holder: pb.LinuxContainerSecurityContext | pb.LinuxSandboxSecurityContext,
) -> model.SELinuxOptions | None:
    if not holder.HasField("selinux_options"):
        return None
    options = holder.selinux_options
    return model.SELinuxOptions(options.user, options.role, options.type, options.level)


def _optional_id(
    holder: pb.LinuxContainerSecurityContext | pb.LinuxSandboxSecurityContext, name: str
) -> int | None:
    return getattr(holder, name).value if holder.HasField(name) else None  # type: ignore[arg-type]


def pod_sandbox_config(config: pb.PodSandboxConfig) -> model.PodSandboxConfig:
    meta, linux, dns = config.metadata, config.linux, config.dns_config
    security = linux.security_context
    return model.PodSandboxConfig(
        metadata=model.PodMetadata(
            name=meta.name, uid=meta.uid, namespace=meta.namespace, attempt=meta.attempt
        ),
        hostname=config.hostname,
        log_directory=config.log_directory,
        dns=model.DNSConfig(tuple(dns.servers), tuple(dns.searches), tuple(dns.options)),
        port_mappings=tuple(
            model.PortMapping(
                _enum(_PROTOCOLS, p.protocol, f"port_mappings: unknown protocol {p.protocol}"),
                p.container_port,
                p.host_port,
                p.host_ip,
            )
            for p in config.port_mappings
        ),
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        cgroup_parent=linux.cgroup_parent,
        security=model.PodSecurity(
            namespace_options=_namespace_options(security.namespace_options, strict_pid=False),
            run_as_user=_optional_id(security, "run_as_user"),
            run_as_group=_optional_id(security, "run_as_group"),
            readonly_rootfs=security.readonly_rootfs,
            supplemental_groups=tuple(security.supplemental_groups),
            supplemental_groups_policy=_enum(_GROUP_POLICIES, security.supplemental_groups_policy),
            privileged=security.privileged,
            seccomp=_profile(security.seccomp, None) if security.HasField("seccomp") else None,
            apparmor=_profile(security.apparmor, None) if security.HasField("apparmor") else None,
            seccomp_profile_path=security.seccomp_profile_path,
            selinux_options=_selinux(security),
        ),
        sysctls=dict(linux.sysctls),
        overhead=linux_resources(linux.overhead) if linux.HasField("overhead") else None,
        resources=linux_resources(linux.resources) if linux.HasField("resources") else None,
    )


def _env_value(value: bytes | str) -> str:
    # The generated module types KeyValue.value as bytes; upstream CRI says string. Both arrive.
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def _mount(position: int, mount: pb.Mount, strict: bool) -> model.Mount:
    refusal = f"mounts[{position}].propagation {mount.propagation} is unknown" if strict else None
    return model.Mount(
        container_path=mount.container_path,
        host_path=mount.host_path,
        readonly=mount.readonly,
        selinux_relabel=mount.selinux_relabel,
        propagation=_enum(_PROPAGATIONS, mount.propagation, refusal),
        uid_mappings=_id_mappings(mount.uidMappings),
        gid_mappings=_id_mappings(mount.gidMappings),
        recursive_read_only=mount.recursive_read_only,
        image=mount.image.image,
        image_user_specified=mount.image.user_specified_image,
        image_sub_path=mount.image_sub_path,
        mount_options=tuple(mount.mount_options),
    )


def _signal_name(value: int) -> str:
    if value == pb.Signal.SIGNAL_RUNTIME_DEFAULT:
        return ""
    try:
        name = pb.Signal.Name(value).removeprefix("SIGNAL_")  # type: ignore[arg-type]
    except ValueError:
        return ""  # unknown: the image's or the default, as with none
    return name if hasattr(signal, name) else ""


def signal_to_proto(name: str) -> pb.Signal:
    """The CRI Signal for a stop signal as pycri records it ("SIGQUIT", "QUIT" or "3", from the
    container's config or the image's StopSignal); SIGTERM when none is set, as StopContainer sends."""
    text = (name or "SIGTERM").upper()
    if text.isdigit():
        try:
            text = signal.Signals(int(text)).name
        except ValueError:
            return pb.Signal.SIGNAL_RUNTIME_DEFAULT
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return pb.Signal.Value("SIGNAL_" + text)  # type: ignore[return-value]
    except ValueError:
        return pb.Signal.SIGNAL_RUNTIME_DEFAULT


def container_config(config: pb.ContainerConfig, *, strict: bool = True) -> model.ContainerConfig:
    """The container's config; ``strict`` refuses enum values pycri cannot act on (off only for
    records an older pycri already accepted)."""
    linux = config.linux
    security = linux.security_context
    caps = security.capabilities
    seccomp_refusal = (
        f"linux.security_context.seccomp.profile_type {security.seccomp.profile_type} is unknown"
        if strict
        else None
    )
    return model.ContainerConfig(
        metadata=model.ContainerMetadata(name=config.metadata.name, attempt=config.metadata.attempt),
        image=config.image.image,
        command=tuple(config.command),
        args=tuple(config.args),
        working_dir=config.working_dir,
        envs=tuple(model.EnvVar(kv.key, _env_value(kv.value)) for kv in config.envs),
        mounts=tuple(_mount(i, m, strict) for i, m in enumerate(config.mounts)),
        devices=tuple(model.Device(d.container_path, d.host_path, d.permissions) for d in config.devices),
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        log_path=config.log_path,
        stdin=config.stdin,
        stdin_once=config.stdin_once,
        tty=config.tty,
        resources=linux_resources(linux.resources) if linux.HasField("resources") else None,
        security=model.ContainerSecurity(
            capabilities=model.Capabilities(
                add=tuple(caps.add_capabilities),
                drop=tuple(caps.drop_capabilities),
                add_ambient=tuple(caps.add_ambient_capabilities),
            ),
            privileged=security.privileged,
            namespace_options=_namespace_options(security.namespace_options, strict_pid=strict),
            run_as_user=_optional_id(security, "run_as_user"),
            run_as_group=_optional_id(security, "run_as_group"),
            run_as_username=security.run_as_username,
            readonly_rootfs=security.readonly_rootfs,
            supplemental_groups=tuple(security.supplemental_groups),
            supplemental_groups_policy=_enum(_GROUP_POLICIES, security.supplemental_groups_policy),
            no_new_privs=security.no_new_privs,
            masked_paths=tuple(security.masked_paths),
            readonly_paths=tuple(security.readonly_paths),
            seccomp=_profile(security.seccomp, seccomp_refusal) if security.HasField("seccomp") else None,
            apparmor=_profile(security.apparmor, None) if security.HasField("apparmor") else None,
            apparmor_profile=security.apparmor_profile,
            seccomp_profile_path=security.seccomp_profile_path,
            selinux_options=_selinux(security),
        ),
        stop_signal=_signal_name(config.stop_signal),
    )


def legacy_sandbox_config(data: bytes) -> model.PodSandboxConfig:
    """A PodSandboxConfig as an older pycri stored it (serialized protobuf); ValueError if it
    is not one."""
    try:
        return pod_sandbox_config(pb.PodSandboxConfig.FromString(data))
    except DecodeError as exc:
        raise ValueError(f"not a serialized PodSandboxConfig: {exc}") from exc


def legacy_container_config(data: bytes) -> model.ContainerConfig:
    """A ContainerConfig as an older pycri stored it (serialized protobuf), which it had accepted;
    ValueError if it is not one."""
    try:
        return container_config(pb.ContainerConfig.FromString(data), strict=False)
    except DecodeError as exc:
        raise ValueError(f"not a serialized ContainerConfig: {exc}") from exc


# --- answers ------------------------------------------------------------------------------------

_SANDBOX_STATES = {"ready": pb.PodSandboxState.SANDBOX_READY, "notready": pb.PodSandboxState.SANDBOX_NOTREADY}
CONTAINER_STATES = {
    "created": pb.ContainerState.CONTAINER_CREATED,
    "running": pb.ContainerState.CONTAINER_RUNNING,
    "exited": pb.ContainerState.CONTAINER_EXITED,
    "unknown": pb.ContainerState.CONTAINER_UNKNOWN,
}


def sandbox_state(sandbox: Sandbox) -> pb.PodSandboxState:
    return _SANDBOX_STATES[sandbox.state]


def resources_to_proto(resources: model.LinuxResources) -> pb.LinuxContainerResources:
    return pb.LinuxContainerResources(
        cpu_period=resources.cpu_period,
        cpu_quota=resources.cpu_quota,
        cpu_shares=resources.cpu_shares,
        memory_limit_in_bytes=resources.memory_limit_in_bytes,
        oom_score_adj=resources.oom_score_adj,
        cpuset_cpus=resources.cpuset_cpus,
        cpuset_mems=resources.cpuset_mems,
        hugepage_limits=[
            pb.HugepageLimit(page_size=h.page_size, limit=h.limit) for h in resources.hugepage_limits
        ],
        unified=dict(resources.unified),
        memory_swap_limit_in_bytes=resources.memory_swap_limit_in_bytes,
    )


def _id_mappings_to_proto(mappings: Iterable[model.IDMapping]) -> list[pb.IDMapping]:
    return [pb.IDMapping(host_id=m.host_id, container_id=m.container_id, length=m.length) for m in mappings]


def namespace_options_to_proto(options: model.NamespaceOptions) -> pb.NamespaceOption:
    modes = _reverse(_NAMESPACE_MODES)
    found = pb.NamespaceOption(
        network=modes[options.network],  # type: ignore[arg-type]
        pid=modes[options.pid],  # type: ignore[arg-type]
        ipc=modes[options.ipc],  # type: ignore[arg-type]
        target_id=options.target_id,
    )
    if options.userns is not None:
        found.userns_options.CopyFrom(
            pb.UserNamespace(
                mode=modes[options.userns.mode],  # type: ignore[arg-type]
                uids=_id_mappings_to_proto(options.userns.uids),
                gids=_id_mappings_to_proto(options.userns.gids),
            )
        )
    return found


def mount_to_proto(mount: model.Mount, image_id: str = "") -> pb.Mount:
    """``image_id``: for an image volume, the ID (digest) of the image mounted, which ContainerStatus
    reports in ``image_ref`` beside the reference as asked."""
    image = None
    if mount.image:
        image = pb.ImageSpec(
            image=mount.image, user_specified_image=mount.image_user_specified, image_ref=image_id
        )
    return pb.Mount(
        container_path=mount.container_path,
        host_path=mount.host_path,
        readonly=mount.readonly,
        selinux_relabel=mount.selinux_relabel,
        propagation=_reverse(_PROPAGATIONS)[mount.propagation],  # type: ignore[arg-type]
        uidMappings=_id_mappings_to_proto(mount.uid_mappings),
        gidMappings=_id_mappings_to_proto(mount.gid_mappings),
        recursive_read_only=mount.recursive_read_only,
        image=image,
        image_sub_path=mount.image_sub_path,
        mount_options=list(mount.mount_options),
    )


def sandbox_metadata(sandbox: Sandbox) -> pb.PodSandboxMetadata:
    return pb.PodSandboxMetadata(
        name=sandbox.name, uid=sandbox.uid, namespace=sandbox.namespace, attempt=sandbox.attempt
    )


def sandbox_to_proto(sandbox: Sandbox) -> pb.PodSandbox:
    return pb.PodSandbox(
        id=sandbox.id,
        metadata=sandbox_metadata(sandbox),
        state=sandbox_state(sandbox),
        created_at=sandbox.created_at_ns,
        labels=sandbox.labels,
        annotations=sandbox.annotations,
        runtime_handler=sandbox.runtime_handler,
    )


def container_to_proto(container: Container) -> pb.Container:
    return pb.Container(
        id=container.id,
        pod_sandbox_id=container.pod_id,
        metadata=pb.ContainerMetadata(name=container.name, attempt=container.attempt),
        image=pb.ImageSpec(image=container.image),
        image_ref=container.image_ref,
        image_id=container.image_id,
        state=CONTAINER_STATES[container.state],
        created_at=container.created_at_ns,
        labels=container.labels,
        annotations=container.annotations,
    )


def container_status(container: Container) -> pb.ContainerStatus:
    config = container.config
    status = pb.ContainerStatus(
        id=container.id,
        metadata=pb.ContainerMetadata(name=container.name, attempt=container.attempt),
        state=CONTAINER_STATES[container.state],
        created_at=container.created_at_ns,
        started_at=container.started_at_ns,
        finished_at=container.finished_at_ns,
        exit_code=container.exit_code,
        image=pb.ImageSpec(image=container.image),
        image_ref=container.image_ref,
        image_id=container.image_id,
        reason=container.reason,
        message=container.message,
        labels=container.labels,
        annotations=container.annotations,
        mounts=[mount_to_proto(m, container.image_volumes.get(m.container_path, "")) for m in config.mounts],
        log_path=container.log_path,
        stop_signal=signal_to_proto(container.stop_signal),
    )
    if config.resources is not None:
        status.resources.linux.CopyFrom(resources_to_proto(config.resources))
    if container.user:
        linux_user = status.user.linux
        linux_user.uid = container.user[0]
        linux_user.gid = container.user[1]
        linux_user.supplemental_groups.extend(container.user[2:])
    return status


def sandbox_status(sandbox: Sandbox) -> pb.PodSandboxStatus:
    options = namespace_options_to_proto(sandbox.config.security.namespace_options)
    return pb.PodSandboxStatus(
        id=sandbox.id,
        metadata=sandbox_metadata(sandbox),
        state=sandbox_state(sandbox),
        created_at=sandbox.created_at_ns,
        network=pb.PodSandboxNetworkStatus(
            ip=sandbox.ip, additional_ips=[pb.PodIP(ip=ip) for ip in sandbox.additional_ips]
        ),
        linux=pb.LinuxPodSandboxStatus(namespaces=pb.Namespace(options=options)),
        labels=sandbox.labels,
        annotations=sandbox.annotations,
        runtime_handler=sandbox.runtime_handler,
    )
