"""Start a pod's PID-namespace holder: catatonit as PID 1 of a new PID namespace.

Run as its own short-lived process (``python -S podinit.py ...``), because setns and
unshare change the calling process, which must not be the multi-threaded daemon. It joins
the pod's network, IPC and UTS namespaces, unshares a PID namespace, forks the init into
it, prints the init's host PID and exits; the init is reparented and lives on.
"""

import ctypes
import os
import sys

CLONE_NEWPID = 0x20000000
NAMESPACE_FLAGS = {"--net": 0x40000000, "--ipc": 0x08000000, "--uts": 0x04000000}


def main(argv: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    args = list(argv)
    joins: list[tuple[str, int]] = []
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    while args and args[0] != "--":
        flag, value = args[0], args[1]
        if flag == "--tag":
            # Marks the init as this pod's, so cleanup after a crash can find it.
            environment["PYCRI_SANDBOX"] = value
        else:
            joins.append((value, NAMESPACE_FLAGS[flag]))
        args = args[2:]
    command = args[1:]
    for path, nstype in joins:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if libc.setns(fd, nstype) != 0:
            err = ctypes.get_errno()
            sys.stderr.write(f"setns {path}: {os.strerror(err)}\n")
            return 1
        os.close(fd)
    if libc.unshare(CLONE_NEWPID) != 0:
        sys.stderr.write(f"unshare(CLONE_NEWPID): {os.strerror(ctypes.get_errno())}\n")
        return 1
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        os.setsid()
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        try:
            os.execve(command[0], command, environment)
        except OSError as exc:
            os.write(write_end, str(exc).encode())
        os._exit(127)
    os.close(write_end)
    failure = os.read(read_end, 4096)  # EOF at exec (close-on-exec), or the exec error
    if failure:
        sys.stderr.write(f"exec {command[0]}: {failure.decode(errors='replace')}\n")
        return 1
    print(child)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
