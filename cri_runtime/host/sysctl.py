"""Pod sysctls: which a pod may set, where they live under /proc/sys, and writing them.

A pod's sysctls belong to its namespaces, so pycri sets them once, in the pod's new network,
IPC and UTS namespaces as it makes them (as the pause container does for containerd and
CRI-O); every container joins those namespaces and sees them. Only sysctls that a namespace
scopes can be set: anything else would change the node. A bad name or value fails
RunPodSandbox with INVALID_ARGUMENT instead of failing every container later.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from cri_runtime.errors import InvalidArgument

Namespace = Literal["net", "ipc", "uts"]

# The IPC namespace's sysctls (ipc/ipc_sysctl.c), besides fs.mqueue.* (ipc/mq_sysctl.c).
IPC_SYSCTLS = frozenset(
    {
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.msg_next_id",
        "kernel.sem",
        "kernel.sem_next_id",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_next_id",
        "kernel.shm_rmid_forced",
    }
)
UTS_SYSCTLS = frozenset({"kernel.hostname", "kernel.domainname"})
# One path component: no '.' or '..', nothing that could walk out of /proc/sys. Dots are
# allowed inside a component only in the slash form ("net/ipv4/conf/eth0.100/forwarding").
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@+-]*")
MAX_VALUE = 4096  # the kernel reads at most a page


@dataclass(frozen=True)
class Sysctl:
    name: str  # as the pod config gave it
    path: str  # below /proc/sys
    namespace: Namespace
    value: str


def _components(name: str) -> list[str]:
    parts = name.split("/") if "/" in name else name.split(".")
    if len(parts) < 2 or not all(_COMPONENT.fullmatch(p) for p in parts):
        raise InvalidArgument(f"sysctl {name!r} is not a name such as net.core.somaxconn")
    return parts


def pod_sysctls(sysctls: Mapping[str, str], *, own_net: bool, own_ipc: bool, own_uts: bool) -> list[Sysctl]:
    """The pod's sysctls, checked: namespaced, in a namespace the pod has of its own."""
    own = {"net": own_net, "ipc": own_ipc, "uts": own_uts}
    checked = []
    for name, value in sorted(sysctls.items()):
        parts = _components(name)
        dotted = ".".join(parts)
        namespace: Namespace
        if parts[0] == "net":
            namespace = "net"
        elif dotted in IPC_SYSCTLS or dotted.startswith("fs.mqueue."):
            namespace = "ipc"
        elif dotted in UTS_SYSCTLS:
            namespace = "uts"
        else:
            raise InvalidArgument(
                f"sysctl {name!r} is not namespaced: a pod may set net.*, the IPC sysctls "
                "(kernel.shm*, kernel.msg*, kernel.sem, fs.mqueue.*) and kernel.hostname/domainname"
            )
        if not own[namespace]:
            raise InvalidArgument(
                f"sysctl {name!r} belongs to the {namespace} namespace, and the pod uses the node's"
            )
        if "\0" in value or len(value.encode()) > MAX_VALUE:
            raise InvalidArgument(f"sysctl {name!r}: the value holds a NUL or exceeds {MAX_VALUE} bytes")
        checked.append(Sysctl(name, "/".join(parts), namespace, value))
    return checked


def write(sysctl: Sysctl) -> None:
    """Set ``sysctl`` in the namespaces of the calling thread (the pod's, while they are made)."""
    path = f"/proc/sys/{sysctl.path}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise InvalidArgument(f"sysctl {sysctl.name!r} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"sysctl {sysctl.name!r} cannot be set: {exc.strerror}") from None
    try:
        os.write(fd, sysctl.value.encode())
    except OSError as exc:
        reason = "not a valid value" if exc.errno == errno.EINVAL else exc.strerror
        raise InvalidArgument(f"sysctl {sysctl.name} = {sysctl.value!r}: {reason}") from None
    finally:
        os.close(fd)
