"""User namespaces for pods (KEP-127) and the idmapped mounts that let them see their files.

A pod with a user namespace. The daemon runs this file as a short-lived process
(``python -S idmap.py ...``): it unshares a user namespace and says so; the daemon writes the
pod's ``uid_map`` and ``gid_map`` (root of the host may write any mapping); the process then
becomes root of that namespace, unshares the pod's network, IPC and UTS namespaces (which the
user namespace therefore owns, so that the containers, root in it, can use them: sysfs,
mqueue, sysctls), sets the hostname, brings ``lo`` up and sets the pod's sysctls. The daemon
bind-mounts its ``/proc/<pid>/ns/{user,net,ipc,uts}`` onto the pins and lets it exit. A
multi-threaded process cannot join a user namespace (setns answers EINVAL), which is why this
is a process of its own and not a thread as in :mod:`cri_runtime.network.netns`.

Idmapped mounts. ``open_tree(2)`` clones a directory's mount as a detached mount,
``mount_setattr(2)`` with ``MOUNT_ATTR_IDMAP`` and the pod's user namespace makes it show the
files of host ID ``k`` as ``mapping(k)``, and ``move_mount(2)`` attaches it to a staging
directory. Files on disk keep their owners: image layers, shared by every pod, are never
chowned. An overlayfs mount itself cannot be idmapped (EINVAL), but its layers can: the
container's overlay is made of idmapped clones of its layers and upper/work directories.
Python has no wrappers for these calls: ctypes with the syscall numbers (the same on x86_64,
aarch64 and s390x: these calls came after the tables were unified).

Run as a script, this file uses the standard library only.
"""

import ctypes
import errno
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = 0o2000000
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_IDMAP = 0x100000
MS_BIND = 0x1000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
HELPER_TIMEOUT = 30.0
NAMESPACE_KINDS = ("user", "net", "ipc", "uts")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, call: str, target: object) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{call} {target}: {os.strerror(err)}")
    return result


def idmapped_clone(source: Path, target: Path, userns: Path) -> None:
    """Attach at ``target`` (an existing directory) a clone of ``source``'s mount tree, idmapped
    through the user namespace at ``userns``. Undo with :func:`unmount`."""
    tree = _check(
        _libc.syscall(
            SYS_OPEN_TREE,
            ctypes.c_int(-100),  # AT_FDCWD
            os.fsencode(source),
            ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
        ),
        "open_tree",
        source,
    )
    try:
        ns_fd = os.open(userns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, ns_fd)
            _check(
                _libc.syscall(
                    SYS_MOUNT_SETATTR,
                    ctypes.c_int(tree),
                    b"",
                    ctypes.c_uint(AT_EMPTY_PATH),
                    ctypes.byref(attr),
                    ctypes.c_size_t(ctypes.sizeof(attr)),
                ),
                "mount_setattr(MOUNT_ATTR_IDMAP)",
                source,
            )
        finally:
            os.close(ns_fd)
        _check(
            _libc.syscall(
                SYS_MOVE_MOUNT,
                ctypes.c_int(tree),
                b"",
                ctypes.c_int(-100),
                os.fsencode(target),
                ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
            ),
            "move_mount onto",
            target,
        )
    finally:
        os.close(tree)


def unmount(path: Path) -> None:
    """Detach whatever is mounted on ``path``; not mounted (or gone) is fine."""
    for _ in range(16):
        if _libc.umount2(os.fsencode(path), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
            err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.ENOENT):
                return
            raise OSError(err, f"umount {path}: {os.strerror(err)}")


def can_idmap(path: Path) -> str:
    """ "" when the file system holding ``path`` can be idmapped, else why not."""
    helper = subprocess.Popen(
        [sys.executable, "-S", "-E", str(Path(__file__).absolute()), "hold"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    watchdog = threading.Timer(HELPER_TIMEOUT, helper.kill)
    watchdog.start()
    try:
        assert helper.stdout is not None and helper.stdin is not None
        if helper.stdout.readline().strip() != b"user":
            return "cannot create a user namespace"
        Path(f"/proc/{helper.pid}/uid_map").write_text("0 1000000 65536\n")
        Path(f"/proc/{helper.pid}/gid_map").write_text("0 1000000 65536\n")
        tree = _libc.syscall(
            SYS_OPEN_TREE,
            ctypes.c_int(-100),
            os.fsencode(path),
            ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
        )
        if tree < 0:
            return f"open_tree {path}: {os.strerror(ctypes.get_errno())}"
        try:
            ns_fd = os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            try:
                attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, ns_fd)
                done = _libc.syscall(
                    SYS_MOUNT_SETATTR,
                    ctypes.c_int(tree),
                    b"",
                    ctypes.c_uint(AT_EMPTY_PATH),
                    ctypes.byref(attr),
                    ctypes.c_size_t(ctypes.sizeof(attr)),
                )
                if done < 0:
                    return f"mount_setattr(MOUNT_ATTR_IDMAP) on {path}: {os.strerror(ctypes.get_errno())}"
            finally:
                os.close(ns_fd)
        finally:
            os.close(tree)
        return ""
    except OSError as exc:
        return str(exc)
    finally:
        watchdog.cancel()
        helper.kill()
        helper.wait(timeout=HELPER_TIMEOUT)


_SUPPORT: dict[str, str] = {}


def support(path: Path) -> str:
    """:func:`can_idmap`, asked once per path in the daemon's life (the kernel does not change)."""
    key = str(path)
    if key not in _SUPPORT:
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent  # not made yet: its file system is its nearest ancestor's
        _SUPPORT[key] = can_idmap(probe)
    return _SUPPORT[key]


def unsearchable(path: Path) -> Path | None:
    """The first directory from ``/`` down to ``path`` that others cannot search (no o+x), if any:
    the OCI runtime works on the container's root file system as root of the pod's user
    namespace, to whom the host's root-owned directories are "others"."""
    for directory in [*reversed(path.parents), path]:
        try:
            if not os.stat(directory).st_mode & 0o001:
                return directory
        except FileNotFoundError:
            return None  # made later, by pycri, searchable
    return None


def mapping_lines(mappings: list[tuple[int, int, int]]) -> str:
    """``uid_map`` text for (container ID, host ID, length) triples."""
    return "".join(f"{inside} {outside} {length}\n" for inside, outside, length in mappings)


def create_pod_namespaces(
    directory: Path,
    *,
    uids: list[tuple[int, int, int]],
    gids: list[tuple[int, int, int]],
    net: bool,
    ipc: bool,
    uts: bool,
    hostname: str,
    sysctls: list[tuple[str, str]],
) -> dict[str, Path]:
    """A user namespace with these mappings and, owned by it, the net/IPC/UTS namespaces asked
    for, pinned at ``directory/<kind>``; returns the pins by kind. On failure nothing is left.

    Raises OSError (the step in its message); the caller classifies it.
    """
    kinds = ["user"] + [k for k, asked in (("net", net), ("ipc", ipc), ("uts", uts)) if asked]
    directory.mkdir(parents=True, exist_ok=True, mode=0o711)
    args = [
        sys.executable,
        "-S",
        "-E",
        str(Path(__file__).absolute()),
        "pod",
        json.dumps({"kinds": kinds[1:], "hostname": hostname if uts else "", "sysctls": sysctls}),
    ]
    helper = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # A helper that hangs is killed: its pipes then end, and the reads below fail.
    watchdog = threading.Timer(HELPER_TIMEOUT, helper.kill)
    watchdog.start()
    pinned: list[Path] = []
    created: list[Path] = []
    try:
        assert helper.stdout is not None and helper.stdin is not None
        if helper.stdout.readline().strip() != b"user":
            raise OSError(errno.EPERM, f"cannot create the pod's user namespace: {_helper_error(helper)}")
        # setgroups stays "allow": the daemon writes the gid_map with CAP_SETGID of the host.
        Path(f"/proc/{helper.pid}/uid_map").write_text(mapping_lines(uids))
        Path(f"/proc/{helper.pid}/gid_map").write_text(mapping_lines(gids))
        helper.stdin.write(b"go\n")
        helper.stdin.flush()
        if helper.stdout.readline().strip() != b"ready":
            raise OSError(errno.EINVAL, f"cannot create the pod's namespaces: {_helper_error(helper)}")
        for kind in kinds:
            pin = directory / kind
            os.close(os.open(pin, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
            created.append(pin)
            source = f"/proc/{helper.pid}/ns/{kind}"
            if _libc.mount(source.encode(), os.fsencode(pin), None, ctypes.c_ulong(MS_BIND), None) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"bind mount {source} onto {pin}: {os.strerror(err)}")
            pinned.append(pin)
    except BaseException:
        for pin in pinned:
            unmount(pin)
        for pin in created:
            pin.unlink(missing_ok=True)
        raise
    finally:
        watchdog.cancel()
        helper.kill()
        helper.wait(timeout=HELPER_TIMEOUT)
    return {kind: directory / kind for kind in kinds}


def _helper_error(helper: "subprocess.Popen[bytes]") -> str:
    helper.kill()
    assert helper.stderr is not None
    _, err = helper.communicate(timeout=HELPER_TIMEOUT)
    return err.decode(errors="replace").strip() or f"exit status {helper.returncode}"


# --- the script -----------------------------------------------------------------------


def _unshare(flags: int, what: str) -> None:
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({what}): {os.strerror(err)}")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def main(argv: list[str]) -> int:
    try:
        _unshare(CLONE_NEWUSER, "CLONE_NEWUSER")
        print("user", flush=True)
        if argv[0] == "hold":
            sys.stdin.read()
            return 0
        plan = json.loads(argv[1])
        if sys.stdin.readline().strip() != "go":
            return 1
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        flags = 0
        for kind in plan["kinds"]:
            flags |= {"net": CLONE_NEWNET, "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS}[kind]
        if flags:
            _unshare(flags, "/".join(plan["kinds"]))
        if plan["hostname"]:
            socket.sethostname(plan["hostname"])
        if "net" in plan["kinds"]:
            _loopback_up()
        for path, value in plan["sysctls"]:
            with open(f"/proc/sys/{path}", "w") as fh:
                fh.write(value)
        print("ready", flush=True)
        sys.stdin.read()  # the daemon pins the namespaces, then kills this process
        return 0
    except OSError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
