"""Seccomp profiles: pycri's built-in RuntimeDefault profile and the conversion of a profile to OCI form.

Profiles are written in the Docker profile format, because that is what cluster operators hand
over as Localhost profiles and what the default profile is most naturally expressed in: an
``archMap`` instead of a fixed architecture list, and syscall entries that apply only
``includes`` (all of the listed capabilities are in the bounding set, the host architecture is
listed, the kernel is at least ``minKernel``) or unless ``excludes`` (any listed capability is held,
or the host architecture is listed). :func:`to_oci` evaluates those conditions for one container
and returns the plain ``linux.seccomp`` object of the OCI runtime spec. A profile already in OCI form
(``architectures``, no conditions) passes through unchanged apart from validation.
"""

from __future__ import annotations

import functools
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cri_runtime.errors import InvalidArgument

ENOSYS = 38
# Docker's default profile is some 20 KiB; a "profile" beyond this is not one, and reading a
# device such as /dev/zero whole would never end.
MAX_PROFILE_BYTES = 1024 * 1024

# Every namespace flag clone(2) accepts. A clone without CAP_SYS_ADMIN may not create namespaces:
# they are the door to mount, sethostname and friends, which the profile otherwise withholds.
CLONE_NAMESPACE_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)

ACTIONS = frozenset(
    {
        "SCMP_ACT_KILL",
        "SCMP_ACT_KILL_PROCESS",
        "SCMP_ACT_KILL_THREAD",
        "SCMP_ACT_TRAP",
        "SCMP_ACT_ERRNO",
        "SCMP_ACT_TRACE",
        "SCMP_ACT_ALLOW",
        "SCMP_ACT_LOG",
        "SCMP_ACT_NOTIFY",
    }
)
OPERATORS = frozenset(
    {
        "SCMP_CMP_NE",
        "SCMP_CMP_LT",
        "SCMP_CMP_LE",
        "SCMP_CMP_EQ",
        "SCMP_CMP_GE",
        "SCMP_CMP_GT",
        "SCMP_CMP_MASKED_EQ",
    }
)

# What libseccomp (and so runc and crun) knows; anything else fails the container's create.
ARCHITECTURES = frozenset(
    f"SCMP_ARCH_{name}"
    for name in (
        *("X86", "X86_64", "X32", "ARM", "AARCH64", "MIPS", "MIPS64", "MIPS64N32", "MIPSEL"),
        *("MIPSEL64", "MIPSEL64N32", "PPC", "PPC64", "PPC64LE", "S390", "S390X", "PARISC"),
        *("PARISC64", "RISCV64", "LOONGARCH64", "M68K", "SH", "SHEB"),
    )
)
FLAGS = frozenset(
    {
        "SECCOMP_FILTER_FLAG_TSYNC",
        "SECCOMP_FILTER_FLAG_LOG",
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
        "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
    }
)
MAX_ARG_INDEX = 5  # a syscall has six arguments

# uname(2) machine -> (the architecture name conditions use, as Docker does with GOARCH; the
# native seccomp architecture). Conditions use the Go names so that Docker-format Localhost
# profiles written for Docker keep their meaning here.
_MACHINES: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", "SCMP_ARCH_X86_64"),
    "s390x": ("s390x", "SCMP_ARCH_S390X"),
    "aarch64": ("arm64", "SCMP_ARCH_AARCH64"),
    "ppc64le": ("ppc64le", "SCMP_ARCH_PPC64LE"),
}

# Allowed for every container: what ordinary programs (libc start-up, threads, files, sockets,
# timers, IPC inside the container's own namespaces) need, and nothing that reaches the host
# kernel's global state. Names the host's libseccomp does not know are skipped by crun and runc.
_ALWAYS_ALLOWED: tuple[str, ...] = (
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "get_robust_list",
    "get_thread_area",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "io_setup",
    "io_submit",
    "ioctl",
    "ioprio_get",
    "ioprio_set",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "set_robust_list",
    "set_thread_area",
    "set_tid_address",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "setsid",
    "setsockopt",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
)

# Tracing other processes of the container. Before 4.8 a ptrace'd process could use the tracer to
# skip its seccomp filter, so there it is allowed only with CAP_SYS_PTRACE.
_TRACING = ("kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev", "ptrace")

# What CAP_SYS_ADMIN buys: mounts, namespaces, host-wide names and tracing facilities. A container
# without the capability would get EPERM from the kernel anyway; the filter keeps the large attack
# surface of these syscalls out of reach of a container that does not need it.
_SYS_ADMIN = (
    "bpf",
    "clone",
    "clone3",
    "fanotify_init",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "perf_event_open",
    "quotactl",
    "quotactl_fd",
    "setdomainname",
    "sethostname",
    "setns",
    "syslog",
    "umount",
    "umount2",
    "unshare",
)

_S390 = ["s390", "s390x"]


def _allow(names: Iterable[str], **conditions: Any) -> dict[str, Any]:
    return {"names": list(names), "action": "SCMP_ACT_ALLOW", **conditions}


# Never allowed, whatever the capabilities (they are simply absent below, so the default action
# answers EPERM): kexec_load, kexec_file_load, swapon, swapoff, io_uring_*, keyctl and the key
# syscalls, userfaultfd, pivot_root, vm86, uselib, nfsservctl, _sysctl, ustat, sysfs and the other
# obsolete ones. Docker's default profile draws the same line.
DEFAULT_PROFILE: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 1,  # EPERM
    "archMap": [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
        {"architecture": "SCMP_ARCH_S390X", "subArchitectures": ["SCMP_ARCH_S390"]},
        {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
        {"architecture": "SCMP_ARCH_PPC64LE", "subArchitectures": []},
    ],
    "syscalls": [
        _allow(_ALWAYS_ALLOWED),
        _allow(_TRACING, includes={"minKernel": "4.8"}),
        # Any socket family but AF_VSOCK (40), which reaches the hypervisor's services.
        _allow(["socket"], args=[{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]),
        # personality(2) only for the harmless personas: Linux, UNAME26, ADDR_NO_RANDOMIZE (and
        # their combination), and the query 0xffffffff.
        *(
            _allow(["personality"], args=[{"index": 0, "value": persona, "op": "SCMP_CMP_EQ"}])
            for persona in (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF)
        ),
        # clone without namespace flags. On s390 the flags are the second argument.
        _allow(
            ["clone"],
            args=[{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
            excludes={"caps": ["CAP_SYS_ADMIN"], "arches": _S390},
        ),
        _allow(
            ["clone"],
            args=[{"index": 1, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
            includes={"arches": _S390},
            excludes={"caps": ["CAP_SYS_ADMIN"]},
        ),
        # clone3 passes its flags in memory, where a filter cannot look; answer ENOSYS so that libc
        # falls back to clone, whose flags the entries above check.
        {
            "names": ["clone3"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": ENOSYS,
            "excludes": {"caps": ["CAP_SYS_ADMIN"]},
        },
        _allow(["arch_prctl", "modify_ldt"], includes={"arches": ["amd64", "x32", "386"]}),
        _allow(
            ["s390_pci_mmio_read", "s390_pci_mmio_write", "s390_runtime_instr"], includes={"arches": _S390}
        ),
        _allow(["sync_file_range2"], includes={"arches": ["ppc64le"]}),
        _allow(
            [
                "arm_fadvise64_64",
                "arm_sync_file_range",
                "breakpoint",
                "cacheflush",
                "set_tls",
                "sync_file_range2",
            ],
            includes={"arches": ["arm", "arm64"]},
        ),
        _allow(["open_by_handle_at"], includes={"caps": ["CAP_DAC_READ_SEARCH"]}),
        _allow(_SYS_ADMIN, includes={"caps": ["CAP_SYS_ADMIN"]}),
        _allow(["reboot"], includes={"caps": ["CAP_SYS_BOOT"]}),
        _allow(["chroot"], includes={"caps": ["CAP_SYS_CHROOT"]}),
        _allow(["delete_module", "finit_module", "init_module"], includes={"caps": ["CAP_SYS_MODULE"]}),
        _allow(["acct"], includes={"caps": ["CAP_SYS_PACCT"]}),
        _allow(_TRACING, includes={"caps": ["CAP_SYS_PTRACE"]}),
        _allow(["ioperm", "iopl"], includes={"caps": ["CAP_SYS_RAWIO"]}),
        _allow(
            ["clock_settime", "clock_settime64", "settimeofday", "stime"], includes={"caps": ["CAP_SYS_TIME"]}
        ),
        _allow(["vhangup"], includes={"caps": ["CAP_SYS_TTY_CONFIG"]}),
        _allow(
            ["get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"],
            includes={"caps": ["CAP_SYS_NICE"]},
        ),
        _allow(["syslog"], includes={"caps": ["CAP_SYSLOG"]}),
        _allow(["bpf"], includes={"caps": ["CAP_BPF"]}),
        _allow(["perf_event_open"], includes={"caps": ["CAP_PERFMON"]}),
    ],
}


@functools.cache
def host_machine() -> str:
    return os.uname().machine


@functools.cache
def host_kernel() -> tuple[int, int]:
    return parse_kernel_version(os.uname().release)


def parse_kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a kernel release such as ``6.1.0-18-amd64``; (0, 0) when unreadable."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def default_profile(
    capabilities: Iterable[str], *, machine: str | None = None, kernel: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The RuntimeDefault profile in OCI form for a container with these bounding capabilities."""
    return to_oci(DEFAULT_PROFILE, capabilities, machine=machine, kernel=kernel, source="the default profile")


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def load_profile(path: Path) -> dict[str, Any]:
    """A Localhost profile file, parsed; InvalidArgument when it is missing or not a JSON object."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; a regular file ignores it.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InvalidArgument(f"seccomp profile {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"seccomp profile {str(path)!r} cannot be read: {_reason(exc)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(f"seccomp profile {path} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(MAX_PROFILE_BYTES + 1)
        except OSError as exc:
            raise InvalidArgument(f"seccomp profile {path} cannot be read: {_reason(exc)}") from None
    if len(data) > MAX_PROFILE_BYTES:
        raise InvalidArgument(f"seccomp profile {path} is larger than {MAX_PROFILE_BYTES} bytes")
    try:
        profile = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise InvalidArgument(f"seccomp profile {path} is not valid JSON: {exc}") from None
    if not isinstance(profile, dict):
        raise InvalidArgument(f"seccomp profile {path} is not a JSON object")
    return profile


def to_oci(
    profile: Mapping[str, Any],
    capabilities: Iterable[str],
    *,
    machine: str | None = None,
    kernel: tuple[int, int] | None = None,
    source: str = "seccomp profile",
) -> dict[str, Any]:
    """The OCI ``linux.seccomp`` object of a Docker- or OCI-format profile, for one container.

    ``capabilities`` is the container's bounding set, ``machine`` the uname machine (default: this
    host's) and ``kernel`` the (major, minor) kernel version (default: this host's). ``source``
    names the profile in errors.
    """
    machine = machine or host_machine()
    kernel = kernel or host_kernel()
    go_arch, native = _MACHINES.get(machine, (machine, ""))
    caps = set(capabilities)

    default_action = profile.get("defaultAction")
    if not _is_one_of(default_action, ACTIONS):
        raise InvalidArgument(f"{source}: defaultAction {default_action!r} is not a seccomp action")
    result: dict[str, Any] = {"defaultAction": default_action}
    if "defaultErrnoRet" in profile:
        result["defaultErrnoRet"] = _uint(profile["defaultErrnoRet"], f"{source}: defaultErrnoRet", 2**32)

    architectures = _architectures(profile, native, source)
    if architectures:
        result["architectures"] = architectures
    if profile.get("flags") is not None:
        result["flags"] = _names(profile["flags"], FLAGS, f"{source}: flags")
    if profile.get("listenerPath"):
        listener = profile["listenerPath"]
        # The runtime hands the notify descriptor to this socket; without one the create fails.
        if not isinstance(listener, str) or not listener.startswith("/") or not _is_socket(listener):
            raise InvalidArgument(f"{source}: listenerPath {listener!r} is not a listening socket's path")
        result["listenerPath"] = listener
    if profile.get("listenerMetadata") is not None:
        if not isinstance(profile["listenerMetadata"], str):
            raise InvalidArgument(f"{source}: listenerMetadata must be a string")
        result["listenerMetadata"] = profile["listenerMetadata"]

    syscalls: list[dict[str, Any]] = []
    entries = profile.get("syscalls") or []
    if not isinstance(entries, list):
        raise InvalidArgument(f"{source}: syscalls must be a list")
    for position, entry in enumerate(entries):
        where = f"{source}: syscalls[{position}]"
        if not isinstance(entry, dict):
            raise InvalidArgument(f"{where} is not an object")
        if not _applies(entry, caps, go_arch, kernel, where):
            continue
        syscalls.append(_syscall(entry, where))
    if syscalls:
        result["syscalls"] = syscalls
    return result


def _is_one_of(value: object, known: frozenset[str]) -> bool:
    return isinstance(value, str) and value in known


def _names(value: object, known: frozenset[str], what: str) -> list[str]:
    if not isinstance(value, list) or not all(_is_one_of(v, known) for v in value):
        raise InvalidArgument(f"{what} must be a list among {sorted(known)}, not {value!r}")
    return list(value)


def _strings(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{what} must be a list of strings, not {value!r}")
    return list(value)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _architectures(profile: Mapping[str, Any], native: str, source: str) -> list[str]:
    if "architectures" in profile and profile["architectures"] is not None:
        return _names(profile["architectures"], ARCHITECTURES, f"{source}: architectures")
    arch_map = profile.get("archMap") or []
    if not isinstance(arch_map, list):
        raise InvalidArgument(f"{source}: archMap must be a list")
    for entry in arch_map:
        if isinstance(entry, dict) and entry.get("architecture") == native:
            subs = entry.get("subArchitectures") or []
            return [native, *_names(subs, ARCHITECTURES, f"{source}: archMap subArchitectures")]
    # No entry for this host: the filter then covers the native architecture only, which is what
    # libseccomp does for a filter without architectures.
    return []


def _applies(
    entry: Mapping[str, Any], caps: set[str], go_arch: str, kernel: tuple[int, int], where: str
) -> bool:
    includes = entry.get("includes") or {}
    excludes = entry.get("excludes") or {}
    if not isinstance(includes, dict) or not isinstance(excludes, dict):
        raise InvalidArgument(f"{where}: includes and excludes must be objects")
    needed_caps = _strings(includes.get("caps"), f"{where}: includes.caps")
    if needed_caps and not all(cap in caps for cap in needed_caps):
        return False
    arches = _strings(includes.get("arches"), f"{where}: includes.arches")
    if arches and go_arch not in arches:
        return False
    min_kernel = includes.get("minKernel")
    if min_kernel:
        if not isinstance(min_kernel, str) or not re.fullmatch(r"\d+\.\d+.*", min_kernel):
            raise InvalidArgument(f"{where}: minKernel {min_kernel!r} is not a kernel version")
        if kernel < parse_kernel_version(min_kernel):
            return False
    if any(cap in caps for cap in _strings(excludes.get("caps"), f"{where}: excludes.caps")):
        return False
    return go_arch not in _strings(excludes.get("arches"), f"{where}: excludes.arches")


def _syscall(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
    names = entry.get("names")
    if names is None and "name" in entry:
        names = [entry["name"]]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise InvalidArgument(f"{where}: names must be a non-empty list of syscall names")
    action = entry.get("action")
    if not _is_one_of(action, ACTIONS):
        raise InvalidArgument(f"{where}: action {action!r} is not a seccomp action")
    result: dict[str, Any] = {"names": list(names), "action": action}
    if entry.get("errnoRet") is not None:
        result["errnoRet"] = _uint(entry["errnoRet"], f"{where}: errnoRet", 2**32)
    args = entry.get("args") or []
    if not isinstance(args, list):
        raise InvalidArgument(f"{where}: args must be a list")
    converted = []
    for arg in args:
        if not isinstance(arg, dict) or not _is_one_of(arg.get("op"), OPERATORS):
            raise InvalidArgument(f"{where}: argument {arg!r} needs an op among {sorted(OPERATORS)}")
        item: dict[str, Any] = {
            "index": _uint(arg.get("index", 0), f"{where}: args index", MAX_ARG_INDEX + 1),
            "value": _uint(arg.get("value", 0), f"{where}: args value"),
            "op": arg["op"],
        }
        if arg.get("valueTwo"):
            item["valueTwo"] = _uint(arg["valueTwo"], f"{where}: args valueTwo")
        converted.append(item)
    if converted:
        result["args"] = converted
    return result


def _uint(value: object, what: str, limit: int = 2**64) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        raise InvalidArgument(f"{what} must be an integer from 0 to {limit - 1}, not {value!r}")
    return value
