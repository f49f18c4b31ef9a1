"""SELinux on this host: is it on and enforcing, the policy's container contexts, relabelling.

SELinux is on when selinuxfs is mounted (``/sys/fs/selinux/enforce`` exists); "1" in that file
means enforcing, "0" permissive. The loaded policy names the contexts of container processes and
files in ``contexts/lxc_contexts`` (``process = "..."``, ``file = "..."``); without one, pycri uses
the contexts container-selinux ships (``container_t`` and ``container_file_t``).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from cri_runtime.errors import InvalidArgument, from_os_error

SELINUXFS = Path("/sys/fs/selinux")
CONFIG = Path("/etc/selinux/config")
XATTR = "security.selinux"
DEFAULT_PROCESS_CONTEXT = "system_u:system_r:container_t:s0"
DEFAULT_FILE_CONTEXT = "system_u:object_r:container_file_t:s0"
# Relabelling one of these would break the host (containerd and CRI-O refuse them too).
PROTECTED = frozenset(
    {"/", "/bin", "/boot", "/dev", "/etc", "/etc/passwd", "/etc/shadow", "/home", "/lib", "/lib64",
     "/media", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var"}
)  # fmt: skip


def enabled(selinuxfs: Path = SELINUXFS) -> bool:
    return (selinuxfs / "enforce").exists()


def enforcing(selinuxfs: Path = SELINUXFS) -> bool:
    try:
        return (selinuxfs / "enforce").read_text().strip() == "1"
    except OSError:
        return False


def container_contexts(config: Path = CONFIG) -> tuple[str, str]:
    """The policy's (process, file) contexts for containers, or container-selinux's defaults."""
    process, file = DEFAULT_PROCESS_CONTEXT, DEFAULT_FILE_CONTEXT
    try:
        policy = re.search(r"^\s*SELINUXTYPE\s*=\s*(\S+)", config.read_text(), re.M)
        text = (config.parent / policy.group(1) / "contexts" / "lxc_contexts").read_text() if policy else ""
    except OSError:
        text = ""
    for key, value in re.findall(r'^\s*(process|file)\s*=\s*"([^"]+)"', text, re.M):
        if key == "process":
            process = value
        else:
            file = value
    return process, file


def relabel(path: Path, label: str) -> None:
    """Give ``path`` and everything below it the file context ``label`` (a volume kubelet asked to
    have relabelled), without following symbolic links."""
    resolved = os.path.realpath(path)
    if resolved in PROTECTED:
        raise InvalidArgument(f"mount host path {str(path)!r}: relabelling {resolved} would break the host")
    value = label.encode()

    def set_label(target: str) -> None:
        try:
            os.setxattr(target, XATTR, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENOTSUP:
                return  # a file system without labels (proc, a FUSE mount): nothing to set
            raise from_os_error(exc, f"cannot relabel {target} as {label}") from exc

    set_label(resolved)
    if os.path.isdir(resolved) and not os.path.islink(resolved):
        for directory, dirnames, filenames in os.walk(resolved):
            for name in dirnames + filenames:
                set_label(os.path.join(directory, name))
