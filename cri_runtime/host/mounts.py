"""Mounts: container root file systems as overlays, bind mounts, and their undoing.

Mounting goes through mount(2) directly (ctypes): one syscall, no subprocess per container.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
# mount(2) takes at most a page of option data; longer overlay options need relative paths.
_MAX_OPTIONS = 4000


class MountError(OSError):
    pass


def mount(source: str, target: Path, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    rc = _libc.mount(
        source.encode(),
        str(target).encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data is not None else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise MountError(
            err, f"mount {fstype or 'bind'} {source} on {target} ({data or ''}): {os.strerror(err)}"
        )


def unmount(target: Path, *, detach: bool = True) -> None:
    """Unmount ``target``; not an error when nothing is mounted there (or it is gone)."""
    rc = _libc.umount2(str(target).encode(), MNT_DETACH if detach else 0)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return
        raise MountError(err, f"umount {target}: {os.strerror(err)}")


def mounts_under(prefix: Path) -> list[str]:
    """Mount points at or below ``prefix``, deepest first (the order to unmount them)."""
    base = str(prefix).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = _unescape(line.split(" ", 5)[4])
            if point == base or point.startswith(base + "/"):
                found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_overlay(
    lower_dirs: list[Path], upper: Path, work: Path, target: Path, *, readonly: bool = False
) -> None:
    """Mount an overlay of ``lower_dirs`` (lowest first) with ``upper`` on ``target``.

    Images with many layers overflow mount(2)'s one-page option limit; then the lower
    directories are given relative to their common parent and mount(8) runs there.
    """
    lowers = [str(p) for p in reversed(lower_dirs)]  # overlayfs lists the top layer first
    flags = MS_RDONLY if readonly else 0
    if not lowers:
        raise ValueError("an overlay needs at least one lower layer")
    options = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
    if len(options) < _MAX_OPTIONS:
        mount("overlay", target, "overlay", flags, options)
        return
    common = Path(os.path.commonpath(lowers))
    relative = [os.path.relpath(p, common) for p in lowers]
    options = f"lowerdir={':'.join(relative)},upperdir={upper},workdir={work}"
    if len(options) >= _MAX_OPTIONS:
        raise MountError(errno.E2BIG, f"overlay of {len(lowers)} layers does not fit mount options")
    args = ["mount", "-t", "overlay", "overlay", "-o", options + (",ro" if readonly else ""), str(target)]
    result = subprocess.run(args, cwd=common, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise MountError(errno.EIO, f"mount overlay on {target}: {result.stderr.strip()}")


def mount_layers_readonly(lower_dirs: list[Path], target: Path) -> None:
    """Mount image layers (lowest first) read-only on ``target``, with no upper layer: an image
    volume. One layer is bound read-only (overlayfs needs two lower layers without an upper one)."""
    if not lower_dirs:
        raise ValueError("an image volume needs at least one layer")
    if len(lower_dirs) == 1:
        bind(lower_dirs[0], target, readonly=True)
        return
    lowers = ":".join(str(p) for p in reversed(lower_dirs))
    options = f"lowerdir={lowers}"
    if len(options) < _MAX_OPTIONS:
        mount("overlay", target, "overlay", MS_RDONLY | MS_NOSUID | MS_NODEV, options)
        return
    common = Path(os.path.commonpath([str(p) for p in lower_dirs]))
    relative = ":".join(os.path.relpath(p, common) for p in reversed(lower_dirs))
    args = ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={relative},ro,nosuid,nodev", str(target)]
    result = subprocess.run(args, cwd=common, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise MountError(errno.EIO, f"mount overlay on {target}: {result.stderr.strip()}")


def bind(source: Path, target: Path, *, readonly: bool = False, recursive: bool = False) -> None:
    mount(str(source), target, None, MS_BIND | (MS_REC if recursive else 0))
    if readonly:
        mount(str(source), target, None, MS_BIND | MS_RDONLY | 0x20)  # MS_REMOUNT


def mount_tmpfs(target: Path, *, size: int, mode: int = 0o1777) -> None:
    mount("shm", target, "tmpfs", MS_NOSUID | MS_NODEV | 0x8, f"mode={mode:o},size={size}")  # MS_NOEXEC


def unmount_all_under(prefix: Path) -> None:
    for point in mounts_under(prefix):
        unmount(Path(point))
