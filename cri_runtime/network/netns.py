"""Pinned pod namespaces: a pod's network, IPC and UTS namespaces, kept alive by bind mounts.

A namespace lives as long as a process is in it or a file refers to it. pycri pins each
pod namespace by bind-mounting ``/proc/.../ns/<kind>`` onto an empty file in the pod's
state directory, so the namespaces outlive every process and containers join them by path.

How the namespaces are made. CRI-O's ``pinns`` unshares in a short-lived process and
bind-mounts ``/proc/self/ns/*``; containerd unshares in a dedicated OS thread and mounts
``/proc/<pid>/task/<tid>/ns/net``. pycri does the latter: namespaces of these three kinds
belong to a thread, not to the whole process, so a fresh ``threading.Thread`` can unshare
them, set the hostname, bring ``lo`` up (over netlink, with pyroute2), pin its own
``/proc/thread-self/ns/*`` and end. The daemon never changes namespace, and there is no
``fork()`` of a multi-threaded gRPC process (whose locks a child could inherit held) and no
subprocess: creating a pod's namespaces takes a few milliseconds.

Netlink in a pod's namespace. A netlink socket belongs to the network namespace of the thread
that opens it. pyroute2's ``IPRoute(netns=...)`` gets there by forking a child per socket
(about 25 ms, and a fork of this multi-threaded process); pycri instead opens a plain
``IPRoute`` (:func:`netlink`) in a thread that entered the namespace (:func:`enter_netns`),
which costs about a millisecond and leaves no process or thread behind.

Mount propagation. The pins are ordinary bind mounts on whatever mount holds
``directory``; pycri does not make that mount private. A private parent would not stop a
mount namespace cloned later (a container, a systemd service) from copying the pin; it
would only stop our unmount from reaching those copies, keeping the namespace (and its
veth and IP) alive. Shared or slave copies receive the unmount: that is why iproute2
makes /run/netns shared, and why pycri leaves propagation as the host set it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cri_runtime.errors import (
    AlreadyExists,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PycriError,
)
from cri_runtime.host import sysctl
from cri_runtime.host.sysctl import Sysctl

# <sched.h>, <sys/mount.h>, <linux/nsfs.h>, <linux/netdevice.h>
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000
MS_BIND = 0x1000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
NS_GET_NSTYPE = 0xB703
LOOPBACK_IFINDEX = 1  # the kernel gives lo this index in every network namespace
HOST_NAME_MAX = 64

NAMESPACE_FLAGS = {"net": CLONE_NEWNET, "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]

T = TypeVar("T")


@dataclass(frozen=True)
class PodNamespaces:
    net: Path | None  # bind-mounted namespace file; None means the host's namespace
    ipc: Path | None
    uts: Path | None


def _os_error(call: str, target: object) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call} {target}: {os.strerror(err)}")


def _domain_error(what: str, exc: OSError) -> PycriError:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return PermissionDenied(f"{what}: {exc.strerror or exc} (pycri needs CAP_SYS_ADMIN)")
    return Internal(f"{what}: {exc}")


def netlink() -> IPRoute:
    """A route-netlink socket in the calling thread's network namespace, joined to no event group.

    Close it (``with netlink() as ipr:``). pyroute2's synchronous API runs an asyncio loop of
    its own, so call this from a worker thread, never from a thread with a running loop.
    """
    return IPRoute(groups=0)


def in_thread(work: Callable[[], T], name: str) -> T:
    """``work()`` run in a new OS thread, its result or exception handed back.

    For namespace changes that must not touch the caller's thread, and for pyroute2 calls
    from code that may run on the event loop's thread.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _set_loopback_up() -> None:
    # Here, not by the CNI loopback plugin: that runs later, if at all.
    try:
        with netlink() as ipr:
            ipr.link("set", index=LOOPBACK_IFINDEX, state="up")
    except NetlinkError as exc:
        raise OSError(exc.code, f"cannot bring lo up: {os.strerror(exc.code)}") from exc


def _bind_mount(source: str, target: Path) -> None:
    if _libc.mount(source.encode(), os.fsencode(target), None, MS_BIND, None) != 0:
        raise _os_error("bind mount onto", target)


def _unshare_and_pin(
    pins: dict[str, Path], hostname: bytes | None, mounted: list[Path], sysctls: Sequence[Sysctl] = ()
) -> None:
    """Runs in a thread of its own, which ends with the namespaces it unshared: no undo needed."""
    flags = 0
    for kind in pins:
        flags |= NAMESPACE_FLAGS[kind]
    if _libc.unshare(flags) != 0:
        raise _os_error("unshare", "(" + ", ".join(pins) + ")")
    if hostname is not None and _libc.sethostname(hostname, len(hostname)) != 0:
        raise _os_error("sethostname", hostname.decode())
    if "net" in pins:
        _set_loopback_up()
    for setting in sysctls:
        # /proc/sys answers for the namespaces of the thread that opens it: these new ones.
        sysctl.write(setting)
    for kind, path in pins.items():
        # thread-self, not self: /proc/self/ns is the main thread's, still the host's.
        _bind_mount(f"/proc/thread-self/ns/{kind}", path)
        mounted.append(path)


def create_pod_namespaces(
    directory: Path, *, net: bool, ipc: bool, uts: bool, hostname: str, sysctls: Sequence[Sysctl] = ()
) -> PodNamespaces:
    """New namespaces of the kinds asked for, pinned at ``directory/{net,ipc,uts}``.

    ``hostname`` is set in the new UTS namespace (ignored when ``uts`` is false), then
    ``sysctls`` (checked by :func:`sysctl.pod_sysctls` to be in the new namespaces) are set. The new
    network namespace has ``lo`` up and nothing else. On failure nothing is left: no
    mount, no pin file (``directory`` itself is created if needed and left in place).
    """
    wanted = [kind for kind, asked in (("net", net), ("ipc", ipc), ("uts", uts)) if asked]
    name: bytes | None = None
    if uts and hostname:
        name = hostname.encode()
        if len(name) > HOST_NAME_MAX or b"\0" in name:
            raise InvalidArgument(f"hostname {hostname!r} is longer than {HOST_NAME_MAX} bytes or has a NUL")
    if not wanted:
        return PodNamespaces(None, None, None)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o711)
    except OSError as exc:
        raise _domain_error(f"cannot create the namespace directory {directory}", exc) from exc
    created: list[Path] = []
    mounted: list[Path] = []
    try:
        for kind in wanted:
            path = directory / kind
            try:
                os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
            except FileExistsError:
                raise AlreadyExists(f"namespace pin {path} already exists") from None
            except OSError as exc:
                raise _domain_error(f"cannot create namespace pin {path}", exc) from exc
            created.append(path)
        pins = {kind: directory / kind for kind in wanted}
        try:
            in_thread(lambda: _unshare_and_pin(pins, name, mounted, sysctls), "pycri-unshare")
        except OSError as exc:
            raise _domain_error(f"cannot create the pod's {'/'.join(wanted)} namespaces", exc) from exc
    except BaseException:
        for path in reversed(mounted):
            _unmount(path)
        for path in created:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise
    pinned = {kind: directory / kind for kind in wanted}
    return PodNamespaces(pinned.get("net"), pinned.get("ipc"), pinned.get("uts"))


def _unmount(path: Path) -> None:
    """Take every mount off ``path``; a path that is not (or no longer) a mount point is fine."""
    # A loop, because a crash between two pycri runs could have left pins stacked on one file.
    for _ in range(16):
        if _libc.umount2(os.fsencode(path), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
            err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.ENOENT):
                return
            raise _domain_error(f"cannot unmount namespace pin {path}", OSError(err, os.strerror(err)))
    raise Internal(f"namespace pin {path} is still mounted after 16 unmounts")


def remove_pod_namespaces(ns: PodNamespaces) -> None:
    """Unpin and delete the pod's namespace files; repeating it, or a pin already gone, is fine.

    The kernel frees a namespace once no pin and no process holds it; a network
    namespace takes its interfaces (the pod end of a veth, and so the pair) with it.
    """
    errors: list[str] = []
    for path in (ns.net, ns.ipc, ns.uts):
        if path is None:
            continue
        try:
            _unmount(path)
            path.unlink(missing_ok=True)
        except (PycriError, OSError) as exc:
            errors.append(str(exc))  # go on: the other pins must still be released
    if errors:
        raise Internal("; ".join(errors))


def namespace_type(path: Path) -> int | None:
    """The CLONE_NEW* kind of the namespace file at ``path``; None if it is not one (or is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        return None  # ENOTTY: a plain file, e.g. a pin whose mount is gone
    finally:
        os.close(fd)


def is_network_namespace(path: Path) -> bool:
    return namespace_type(path) == CLONE_NEWNET


def _setns(fd: int, what: object) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL:
            raise InvalidArgument(f"{what} is not a network namespace")
        raise _domain_error(f"cannot enter network namespace {what}", OSError(err, os.strerror(err)))


@contextlib.contextmanager
def enter_netns(path: Path) -> Iterator[None]:
    """Run the body in the network namespace pinned at ``path``, then return to the original one.

    Only the calling OS thread moves: threads already running, and so the rest of pycri,
    stay put. Threads (and processes) started inside the block inherit the pod's
    namespace. Do not await inside it on an event-loop thread, or other coroutines would
    run in the pod's namespace. Sockets opened inside stay in the pod's namespace after
    the block, which is what port forwarding wants.
    """
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"network namespace {path} does not exist") from None
        try:
            _setns(target, path)
        finally:
            os.close(target)
        try:
            yield
        finally:
            # If this fails the thread is stranded in the pod; say so loudly rather than go on.
            _setns(original, "(the original network namespace)")
    finally:
        os.close(original)
