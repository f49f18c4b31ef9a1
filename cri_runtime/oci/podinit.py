"""Start a pod's PID-namespace holder: catatonit as PID 1 of a new PID namespace.

The daemon calls :func:`start`. It runs this file as its own short-lived process
(``python -S podinit.py ...``), because setns and unshare change the calling process, which
must not be the multi-threaded daemon. That process joins the pod's network, IPC and UTS
namespaces, unshares a PID namespace, forks the init into it, prints the init's host PID and
exits; the init is reparented and lives on.

Run as a script, this file sees neither site-packages nor pycri (``-S``, and its directory is
the only one on its path): the script part uses the standard library only, and the daemon's
part imports pycri inside :func:`start`.
"""

import ctypes
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

CLONE_NEWPID = 0x20000000
NAMESPACE_FLAGS = {"--user": 0x10000000, "--net": 0x40000000, "--ipc": 0x08000000, "--uts": 0x04000000}
# Where Debian's catatonit package installs it.
CATATONIT = "/usr/bin/catatonit"
START_TIMEOUT = 30.0


def start(
    tag: str,
    *,
    net: Path | None = None,
    ipc: Path | None = None,
    uts: Path | None = None,
    user: Path | None = None,
    catatonit: str = CATATONIT,
    timeout: float = START_TIMEOUT,
) -> int:
    """Start ``catatonit`` as PID 1 of a new PID namespace that joins the given namespaces;
    return its host PID. ``tag`` (the pod's directory) marks the init as the pod's, so that
    cleanup after a crash can find it.

    A missing or unrunnable catatonit is the host's problem and says what to install
    (FailedPrecondition); a refused namespace operation is classified by its errno.
    """
    from cri_runtime import errors  # not at the top: the script part runs without pycri

    doing = "cannot start the pod's PID namespace init"
    _check_catatonit(catatonit, doing)
    args = [sys.executable, "-S", "-E", str(Path(__file__).absolute()), "--tag", tag]
    # The user namespace first: the others are owned by it, and joining them needs its root.
    for flag, path in (("--user", user), ("--net", net), ("--ipc", ipc), ("--uts", uts)):
        if path is not None:
            args += [flag, str(path)]
    args += ["--", catatonit, "-P"]
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise errors.DeadlineExceeded(f"{doing}: no answer within {timeout:g}s") from None
    except OSError as exc:
        raise errors.from_os_error(exc, f"{doing} (running {sys.executable})") from exc
    if result.returncode == 0:
        try:
            return int(result.stdout.strip())
        except ValueError:
            printed = result.stdout.strip()
            raise errors.Internal(f"{doing}: the helper printed {printed!r}, not a PID") from None
    failure = _reported_failure(result.stderr)
    if failure is None:
        raise errors.Internal(f"{doing}: exit status {result.returncode}: {result.stderr.strip()}")
    step, number, message = failure
    if step == "exec" and number in _UNRUNNABLE:
        raise errors.FailedPrecondition(f"{doing}: {message}; {_INSTALL}")
    raise errors.from_os_error(OSError(number, message), f"{doing}: {step}")


_INSTALL = "install it with: apt-get install catatonit"
# exec(2) errnos that mean the binary itself is missing or unusable.
_UNRUNNABLE = frozenset((errno.ENOENT, errno.ENOEXEC, errno.EACCES, errno.ENOTDIR, errno.ELOOP))


def _check_catatonit(catatonit: str, doing: str) -> None:
    from cri_runtime.errors import FailedPrecondition

    if not os.path.exists(catatonit):
        raise FailedPrecondition(
            f"{doing}: catatonit is not installed at {catatonit} "
            f"(pods that share a PID namespace need it); {_INSTALL}"
        )
    if not os.path.isfile(catatonit) or not os.access(catatonit, os.X_OK):
        raise FailedPrecondition(f"{doing}: {catatonit} is not an executable file; {_INSTALL}")


def _reported_failure(stderr: str) -> tuple[str, int, str] | None:
    """The (step, errno, message) the script reported on its last stderr line, if it did."""
    lines = stderr.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    if not isinstance(report, dict) or not isinstance(report.get("errno"), int):
        return None
    return str(report.get("step")), report["errno"], str(report.get("error"))


# --- the script -----------------------------------------------------------------------


def _fail(step: str, number: int, detail: str) -> int:
    """Report a failed step as one JSON line on stderr, for start() to classify."""
    sys.stderr.write(json.dumps({"step": step, "errno": number, "error": detail}) + "\n")
    return 1


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
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            return _fail("open namespace", exc.errno or 0, f"{path}: {exc.strerror}")
        if libc.setns(fd, nstype) != 0:
            err = ctypes.get_errno()
            return _fail("setns", err, f"{path}: {os.strerror(err)}")
        os.close(fd)
        if nstype == NAMESPACE_FLAGS["--user"]:
            # Root of the pod's user namespace (the host's root is not mapped in it).
            try:
                os.setgroups([])
                os.setresgid(0, 0, 0)
                os.setresuid(0, 0, 0)
            except OSError as exc:
                return _fail("setuid in the user namespace", exc.errno or 0, str(exc))
    if libc.unshare(CLONE_NEWPID) != 0:
        err = ctypes.get_errno()
        return _fail("unshare(CLONE_NEWPID)", err, os.strerror(err))
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
            os.write(write_end, f"{exc.errno} {exc.strerror}".encode())
        os._exit(127)
    os.close(write_end)
    failure = os.read(read_end, 4096)  # EOF at exec (close-on-exec), or the exec error
    if failure:
        number, _, reason = failure.decode(errors="replace").partition(" ")
        return _fail("exec", int(number) if number.isdigit() else 0, f"{command[0]}: {reason}")
    print(child)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
