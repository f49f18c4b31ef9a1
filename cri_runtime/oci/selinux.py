"""The SELinux labels of a container (the spec's ``process.selinuxLabel`` and ``linux.mountLabel``).

As containerd does: only where SELinux is on (elsewhere no label goes into the spec, since the
OCI runtime would fail to apply one); the process label starts from the policy's container
process context and the mount label from its container file context; the options' ``user`` and
``level`` go into both, ``role`` and ``type`` into the process label only. A part the container's
options leave empty comes from the pod's options. The containers of a pod share one MCS level:
the pod's ``level`` when it names one, else a pair of categories derived from the pod's ID, so
that every container of the pod (and only rarely a container of another pod) gets the same one
without pycri keeping any state for it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from cri_runtime.errors import InvalidArgument
from cri_runtime.model import SELinuxOptions

CATEGORIES = 1024
_PART = re.compile(r"[A-Za-z0-9_.-]+")
_LEVEL = re.compile(r"[A-Za-z0-9_.:,-]+")


@dataclass(frozen=True)
class Labels:
    process: str
    mount: str


def pod_level(pod_id: str, pod_options: SELinuxOptions | None) -> str:
    """The MCS level every container of the pod shares."""
    if pod_options is not None and pod_options.level:
        return pod_options.level
    digest = hashlib.sha256(pod_id.encode()).digest()
    first = int.from_bytes(digest[:4], "big") % CATEGORIES
    second = int.from_bytes(digest[4:8], "big") % (CATEGORIES - 1)
    if second >= first:
        second += 1  # two different categories
    low, high = sorted((first, second))
    return f"s0:c{low},c{high}"


def _validate(options: SELinuxOptions, field: str) -> None:
    for part in ("user", "role", "type"):
        value = getattr(options, part)
        if value and not _PART.fullmatch(value):
            raise InvalidArgument(f"{field}.{part} {value!r} is not an SELinux {part} name")
    if options.level and not _LEVEL.fullmatch(options.level):
        raise InvalidArgument(f"{field}.level {options.level!r} is not an SELinux level")


def container_labels(
    pod_id: str,
    pod_options: SELinuxOptions | None,
    container_options: SELinuxOptions | None,
    *,
    process_context: str,
    file_context: str,
) -> Labels:
    """The labels of a container of the pod; ``process_context`` and ``file_context`` are the
    policy's defaults (cri_runtime.host.selinux.container_contexts)."""
    pod = pod_options or SELinuxOptions()
    mine = container_options or SELinuxOptions()
    _validate(pod, "linux.security_context.selinux_options (pod)")
    _validate(mine, "linux.security_context.selinux_options")
    user = mine.user or pod.user
    role = mine.role or pod.role
    kind = mine.type or pod.type
    level = mine.level or pod_level(pod_id, pod_options)
    p_user, p_role, p_type, _ = _split(process_context)
    f_user, f_role, f_type, _ = _split(file_context)
    process = ":".join((user or p_user, role or p_role, kind or p_type, level))
    mount = ":".join((user or f_user, f_role, f_type, level))
    return Labels(process, mount)


def _split(context: str) -> tuple[str, str, str, str]:
    parts = context.split(":", 3)
    if len(parts) < 3:
        raise InvalidArgument(f"SELinux context {context!r} is not user:role:type[:level]")
    return parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else ""
