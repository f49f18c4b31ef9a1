"""The executor adapter: containers run by an OCI runtime (crun or runc) under conmon.

One conmon per container, as CRI-O does it. conmon daemonises (so containers outlive a pycri
restart), asks the runtime to ``create`` the container, copies its stdout/stderr into the CRI
log file, and writes the exit code to a file when the container's init exits. Everything
pycri needs to find a container again after a restart lives in files under
``state_dir/<id>/``:

    monitor.json      bundle and log path, written by us (the ctl fifo lives in the bundle)
    conmon.pid        conmon's pid (-P; written by conmon's first process before it exits)
    pidfile           the container's init pid (-p; written by the runtime)
    exits/<id>        the exit code, decimal, no newline (--exit-dir; the last thing conmon writes)
    exit              the same code (--persist-dir)
    oom               exists if the container's memory cgroup reported an OOM kill
    exec-*.json/.pid  per-ExecSync process spec and pid file, removed afterwards

The runtime's own state goes under ``state_dir/runtime-<name>`` (its ``--root``).

conmon protocol facts this module relies on (conmon 2.1.6, src/conmon.c, parent_pipe_fd.c,
ctrl.c, ctr_logging.c, cgroup.c):

- ``_OCI_STARTPIPE=<fd>``: conmon blocks reading it before it forks, so the parent can move
  conmon into a cgroup first; any write releases it.
- ``_OCI_SYNCPIPE=<fd>``: with ``--api-version 1`` conmon writes one JSON line
  ``{"data": <pid>}`` once ``<runtime> create`` succeeded, or ``{"data": -1, "message":
  "<runtime stderr>"}`` when it failed (older API versions use the key ``pid``). If the
  runtime failed silently conmon just exits, which the parent sees as end of file.
- The exit file holds ``WEXITSTATUS`` or ``128 + signal`` as text; it is written with
  g_file_set_contents (temp file + rename), so a reader never sees it half-written.
- The ctl fifo is ``<bundle>/ctl``; conmon reads lines ``"<type> <height> <width>\\n"``:
  type 1 resizes the terminal, type 2 reopens the log file (``"2 0 0\\n"``). Reopening
  always creates a new file (``<log>.tmp`` renamed over ``<log>``).
- ``k8s-file:<path>`` writes ``<RFC3339Nano local time> <stdout|stderr> <P|F> <text>`` per
  line; a chunk (up to 8 KiB per read) that ends without a newline is written as ``P``.
- SIGTERM to conmon is forwarded to the container, so only SIGKILL stops conmon itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cri_runtime.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PycriError,
    from_os_error,
)
from cri_runtime.host import cgroups
from cri_runtime.oci import apparmor

log = structlog.get_logger("pycri.executor")

RUNTIMES = ("crun", "runc")
# Where Debian's conmon package installs it.
CONMON = "/usr/bin/conmon"
# Runtime sub-commands (state, start, kill, delete) finish in milliseconds; a runtime that
# takes this long is stuck on something (a frozen cgroup, a dead FUSE mount) and we give up.
RUNTIME_CALL_TIMEOUT = 30.0
POLL_INTERVAL = 0.02
# Time for conmon to drain output and write the exit file after the container died.
CONMON_EXIT_GRACE = 5.0
# After an ExecSync timeout kill, how long to keep reading output before abandoning pipes
# that an escaped grandchild may still hold open.
EXEC_DRAIN_GRACE = 1.0
REOPEN_LOG_TIMEOUT = 5.0
# conmon writes -1 (sync pipe) for failures; CRI-O reports 255 when no exit code is known.
UNKNOWN_EXIT_CODE = 255
CTL_REOPEN_LOGS = b"2 0 0\n"
# What conmon creates inside the bundle: control and resize fifos, the attach socket.
CONMON_BUNDLE_FILES = ("ctl", "winsz", "attach")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class ExitInfo:
    exit_code: int
    finished_at_ns: int
    oom_killed: bool


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int
    timed_out: bool
    truncated: bool


def _pid_is_conmon_for(pid: int, container_id: str, program: str) -> bool:
    """True if ``pid`` is a live ``program`` (conmon) monitoring ``container_id``: not a reused
    pid, not a zombie."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    # A zombie has an empty cmdline: it is dead for our purposes.
    if not argv or not argv[0] or os.path.basename(argv[0]) != os.path.basename(program).encode():
        return False
    encoded = container_id.encode()
    return any(argv[i] in (b"-c", b"--cid") and argv[i + 1] == encoded for i in range(len(argv) - 1))


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return True
    # The state letter follows the parenthesised command name, which may contain spaces.
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] in (b"Z", b"X")


def _descendants(root_pid: int) -> list[int]:
    """``root_pid`` and every process below it, found by walking /proc parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, queue = [], [root_pid]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, []))
    return found


def _kill_tree(root_pid: int) -> None:
    """SIGKILL ``root_pid`` and everything below it, without losing a child forked meanwhile.

    Killing from a list races with fork: a child born after the list was read outlives its
    killed parent (re-parented to the container's init). So the tree is stopped first, until
    no new process appears, and only then killed.
    """
    stopped: set[int] = set()
    while True:
        fresh = [pid for pid in _descendants(root_pid) if pid not in stopped]
        if not fresh:
            break
        for pid in fresh:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        stopped.update(fresh)
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _command_error(what: str, error: str) -> PycriError | None:
    """The runtime got as far as executing the caller's command, and the command is no program of
    this container: the caller's mistake, not pycri's (runc's wording, then crun's)."""
    # runc's message may keep logrus's quoting (\") when it holds bytes JSON cannot decode.
    if not re.search(r'exec: \\?"|executable file `|open executable:', error):
        return None
    lowered = error.lower()
    if "not found" in lowered or "no such file" in lowered:
        return NotFound(f"{what}: {error}")
    return InvalidArgument(f"{what}: {error}")


def _binary_error(exc: OSError, binary: str, package: str, doing: str) -> PycriError:
    """The error for a failed exec of ``binary``: a missing or unrunnable program is the host's
    problem and says which Debian package provides it; other failures go by their errno."""
    if exc.filename is not None and os.fspath(exc.filename) != binary:
        return from_os_error(exc, doing)  # not the program itself, e.g. the working directory
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return FailedPrecondition(
            f"{doing}: {binary} is not installed; install it with: apt-get install {package}"
        )
    if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.ELOOP):
        return FailedPrecondition(
            f"{doing}: {binary} cannot be executed ({exc.strerror}); "
            f"reinstall it with: apt-get install --reinstall {package}"
        )
    return from_os_error(exc, doing)


def _require_executable(binary: str, package: str, doing: str) -> None:
    """Refuse early, before anything is made, when ``binary`` cannot be run at all."""
    if not os.path.exists(binary):
        raise FailedPrecondition(
            f"{doing}: {binary} is not installed; install it with: apt-get install {package}"
        )
    if not os.path.isfile(binary) or not os.access(binary, os.X_OK):
        raise FailedPrecondition(
            f"{doing}: {binary} is not an executable file; "
            f"reinstall it with: apt-get install --reinstall {package}"
        )


def _clean_runtime_error(text: str) -> str:
    """runc logs through logrus (``time=... level=error msg="..."``); keep just the message."""
    messages = re.findall(r'level=(?:error|fatal) msg="((?:[^"\\]|\\.)*)"', text)
    if not messages:
        return text.strip()
    decoded = []
    for message in messages:
        try:
            decoded.append(json.loads(f'"{message}"'))
        except ValueError:
            decoded.append(message)
    return "; ".join(decoded)


class Executor:
    """Runs containers through conmon and one OCI runtime; safe to use from several threads."""

    def __init__(
        self,
        runtime_name: str,
        runtime_path: str,
        state_dir: Path,
        *,
        conmon_path: str = CONMON,
        cgroup_driver: cgroups.CgroupDriver | None = None,
    ) -> None:
        if runtime_name not in RUNTIMES:
            raise InvalidArgument(f"unsupported OCI runtime {runtime_name!r}; expected one of {RUNTIMES}")
        self.runtime_name = runtime_name
        self.runtime_path = runtime_path
        self.state_dir = Path(state_dir)
        self.conmon_path = conmon_path
        self.runtime_root = self.state_dir / f"runtime-{runtime_name}"
        self.cgroup_driver = cgroup_driver or cgroups.CgroupfsDriver()
        # --root, and --systemd-cgroup under the systemd driver: every call must agree on both.
        self._runtime_globals = ["--root", str(self.runtime_root), *self.cgroup_driver.runtime_args]
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.runtime_root.mkdir(exist_ok=True, mode=0o700)
        # conmon and the runtime get a fixed, small environment (as CRI-O's conmon_env does):
        # nothing of pycri's own (NOTIFY_SOCKET, LISTEN_FDS, proxies) leaks into containers' monitors.
        self._env = {"PATH": os.environ.get("PATH") or DEFAULT_PATH}

    # --- paths -------------------------------------------------------------------------

    def container_dir(self, container_id: str) -> Path:
        if not _ID_PATTERN.fullmatch(container_id):
            raise InvalidArgument(f"invalid container id {container_id!r}")
        return self.state_dir / container_id

    def _exit_file(self, container_id: str) -> Path:
        return self.container_dir(container_id) / "exits" / container_id

    def exit_file_written(self, container_id: str) -> bool:
        """One stat: has conmon written the exit file? (The cheap check a watcher polls.)"""
        return self._exit_file(container_id).exists()

    def _monitor(self, container_id: str) -> dict[str, str]:
        try:
            return json.loads((self.container_dir(container_id) / "monitor.json").read_text())
        except FileNotFoundError:
            raise NotFound(f"container {container_id} has no monitor state in {self.state_dir}") from None

    def bundle_path(self, container_id: str) -> Path:
        return Path(self._monitor(container_id)["bundle"])

    def attach_socket_path(self, container_id: str) -> Path:
        """conmon's attach socket (``--full-attach``: in the bundle, not under a short symlink)."""
        return self.bundle_path(container_id) / "attach"

    def ctl_fifo_path(self, container_id: str) -> Path:
        return self.bundle_path(container_id) / "ctl"

    # --- runtime calls -----------------------------------------------------------------

    def _runtime(
        self, args: list[str], timeout: float = RUNTIME_CALL_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        argv = [self.runtime_path, *self._runtime_globals, *args]
        try:
            return subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env=self._env,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
            raise DeadlineExceeded(
                f"{self.runtime_name} {args[0]} did not finish within {timeout:g}s: {stderr or ''}".strip()
            ) from None
        except OSError as exc:
            raise _binary_error(
                exc, self.runtime_path, self.runtime_name, f"cannot run {self.runtime_name} {args[0]}"
            ) from exc

    def _has_runtime_state(self, container_id: str) -> bool:
        # Both crun and runc keep one directory per container under --root.
        return (self.runtime_root / container_id).exists()

    # --- create ------------------------------------------------------------------------

    def create(
        self,
        container_id: str,
        bundle: Path,
        log_path: Path,
        *,
        terminal: bool = False,
        stdin: bool = False,
        stdin_once: bool = False,
        conmon_cgroup: str | None = None,
        timeout: float = 60.0,
        restore_from: Path | None = None,
    ) -> int:
        """Start conmon, which runs ``<runtime> create``; return the container's init pid.
        With ``restore_from`` (CRIU images), conmon runs ``<runtime> restore`` instead and the
        container is running when this returns.

        On failure nothing is left behind: no conmon, no runtime state, no ``state_dir/<id>``,
        and no log file unless it existed before.
        """
        directory = self.container_dir(container_id)
        bundle, log_path = Path(bundle).absolute(), Path(log_path).absolute()
        if not (bundle / "config.json").is_file():
            raise InvalidArgument(f"bundle {bundle} has no config.json")
        self.check_create(container_id, log_path)
        if not log_path.parent.is_dir():
            raise InvalidArgument(f"log directory {log_path.parent} does not exist")
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            raise AlreadyExists(
                f"container {container_id} already has monitor state in {directory}"
            ) from None
        log_existed = log_path.exists()
        created_cgroups: list[str] = []
        try:
            (directory / "exits").mkdir(mode=0o700)
            (directory / "monitor.json").write_text(
                json.dumps({"bundle": str(bundle), "log_path": str(log_path), "runtime": self.runtime_name})
            )
            return self._start_conmon(
                container_id,
                directory,
                bundle,
                log_path,
                terminal=terminal,
                stdin=stdin,
                stdin_once=stdin_once,
                conmon_cgroup=conmon_cgroup,
                created_cgroups=created_cgroups,
                timeout=timeout,
                restore_from=restore_from,
            )
        except BaseException:
            self._discard(container_id, directory)
            if not log_existed:
                with contextlib.suppress(FileNotFoundError):
                    log_path.unlink()
            if created_cgroups:
                try:
                    self.cgroup_driver.remove_conmon_cgroup(created_cgroups)
                except (OSError, PycriError) as exc:
                    log.warning("conmon cgroup left behind", id=container_id, error=str(exc))
            raise

    def check_create(self, container_id: str, log_path: Path) -> None:
        """What ``create`` would refuse for reasons known before anything runs: a log path conmon
        cannot take, a missing conmon or runtime. (CreateContainer asks early; the runtime's own
        create happens at StartContainer.)"""
        if ":" in str(log_path):
            # conmon splits --log-path on ':' (driver:path); a colon in the path cannot be passed.
            raise InvalidArgument(f"log path {log_path} contains ':', which conmon cannot take")
        doing = f"cannot create container {container_id}"
        # conmon runs the runtime itself, where a missing binary would only show as a vague
        # exit; both are checked here, before anything is made.
        _require_executable(self.conmon_path, "conmon", doing)
        _require_executable(self.runtime_path, self.runtime_name, doing)

    def _conmon_argv(
        self,
        container_id: str,
        directory: Path,
        bundle: Path,
        log_path: Path,
        *,
        terminal: bool,
        stdin: bool,
        stdin_once: bool,
        restore_from: Path | None = None,
    ) -> list[str]:
        argv = [
            self.conmon_path,
            "--api-version", "1",
            "--cid", container_id,
            "--cuuid", container_id,
            "--name", container_id,
            "--runtime", self.runtime_path,
            "--runtime-arg", f"--root={self.runtime_root}",
            *(f"--runtime-arg={arg}" for arg in self.cgroup_driver.runtime_args),
            *self.cgroup_driver.conmon_args,
            "--bundle", str(bundle),
            "--container-pidfile", str(directory / "pidfile"),
            "--conmon-pidfile", str(directory / "conmon.pid"),
            "--log-path", f"k8s-file:{log_path}",
            "--exit-dir", str(directory / "exits"),
            "--persist-dir", str(directory),
            # The attach socket goes to <bundle>/attach instead of a symlink under a shared
            # socket directory: one place per container, removed with the bundle.
            "--full-attach",
        ]  # fmt: skip
        # As CRI-O: a terminal carries stdin itself; otherwise stdin is a pipe that conmon
        # keeps open across attach sessions unless the container asked for stdin_once.
        if terminal:
            argv.append("--terminal")
        elif stdin:
            argv.append("--stdin")
            if not stdin_once:
                argv.append("--leave-stdin-open")
        if restore_from is not None:
            argv += ["--restore", str(restore_from)]
        return argv

    def _start_conmon(
        self,
        container_id: str,
        directory: Path,
        bundle: Path,
        log_path: Path,
        *,
        terminal: bool,
        stdin: bool,
        stdin_once: bool,
        conmon_cgroup: str | None,
        created_cgroups: list[str],
        timeout: float,
        restore_from: Path | None = None,
    ) -> int:
        deadline = time.monotonic() + timeout
        argv = self._conmon_argv(
            container_id,
            directory,
            bundle,
            log_path,
            terminal=terminal,
            stdin=stdin,
            stdin_once=stdin_once,
            restore_from=restore_from,
        )
        sync_read, sync_write = os.pipe()
        start_read, start_write = os.pipe()
        try:
            try:
                proc = subprocess.Popen(
                    argv,
                    env={
                        **self._env,
                        # glib parses conmon's options in the locale's charset: under plain C,
                        # a log path with a non-ASCII character makes conmon exit 1, silently.
                        "LC_ALL": "C.UTF-8",
                        "_OCI_SYNCPIPE": str(sync_write),
                        "_OCI_STARTPIPE": str(start_read),
                    },
                    pass_fds=(sync_write, start_read),
                    # conmon's oom file goes to its working directory as well as --persist-dir.
                    cwd=directory,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    # Out of pycri's process group from the first instant, so a ^C or a signal to
                    # pycri's group never reaches a monitor (conmon calls setsid itself later).
                    start_new_session=True,
                )
            except OSError as exc:
                raise _binary_error(exc, self.conmon_path, "conmon", "cannot start conmon") from exc
            finally:
                os.close(sync_write)
                os.close(start_read)
                sync_write = start_read = -1
            try:
                if conmon_cgroup:
                    # conmon waits on the start pipe before forking: its children (the daemon
                    # conmon and through it the runtime) are born in this cgroup.
                    self._enter_cgroup(proc.pid, conmon_cgroup, container_id, created_cgroups)
                os.write(start_write, b"0")
            except BaseException:
                proc.kill()
                proc.communicate()
                raise
            finally:
                os.close(start_write)
                start_write = -1
            try:
                _, stderr = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise DeadlineExceeded(
                    f"conmon for {container_id} did not daemonise within {timeout:g}s"
                ) from None
            if proc.returncode != 0:
                raise Internal(
                    f"conmon for {container_id} failed (exit {proc.returncode}): "
                    f"{stderr.decode(errors='replace').strip()}"
                )
            message = self._read_sync(sync_read, deadline)
        finally:
            for fd in (sync_read, sync_write, start_read, start_write):
                if fd >= 0:
                    os.close(fd)
        if message is None:
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"{self.runtime_name} create of {container_id} did not finish within {timeout:g}s"
                )
            raise Internal(
                f"{self.runtime_name} create of {container_id} failed: conmon exited without reporting a pid"
            )
        pid = message.get("data", message.get("pid", -1))
        if not isinstance(pid, int) or pid <= 0:
            text = _clean_runtime_error(str(message.get("message") or "no error message"))
            raise _command_error(f"{self.runtime_name} create of {container_id}", text) or Internal(
                f"{self.runtime_name} create of {container_id} failed: {text}"
            )
        return pid

    def _read_sync(self, fd: int, deadline: float) -> dict[str, Any] | None:
        """conmon's first sync-pipe message, or None on end of file or at the deadline."""
        data = b""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if not poller.poll(remaining * 1000):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                if not data:
                    return None
                break
            data += chunk
        line = data.split(b"\n", 1)[0]
        try:
            parsed = json.loads(line)
        except ValueError:
            raise Internal(f"conmon sent an unreadable sync message: {line!r}") from None
        if not isinstance(parsed, dict):
            raise Internal(f"conmon sent an unexpected sync message: {line!r}")
        return parsed

    def _enter_cgroup(self, pid: int, path: str, container_id: str, created: list[str]) -> None:
        """Move ``pid`` into ``path`` (a cgroup, or under systemd a slice), making what is missing.

        What is made is added to ``created`` as soon as it exists, so a failed create can remove
        it once conmon is dead (not before: rmdir needs the cgroup empty).
        A conmon cgroup that existed already (the pod's) is the caller's to remove.
        """
        try:
            self.cgroup_driver.enter_conmon(pid, path, container_id, created)
        except ValueError as exc:
            raise InvalidArgument(f"cannot move conmon into cgroup {path}: {exc}") from exc
        except OSError as exc:
            raise from_os_error(exc, f"cannot move conmon into cgroup {path}") from exc

    def _discard(self, container_id: str, directory: Path) -> None:
        """Undo a failed create: conmon, the runtime's state, our files. Never raises."""
        pid = self._read_pid(directory / "conmon.pid")
        if pid is not None and _pid_is_conmon_for(pid, container_id, self.conmon_path):
            # conmon and everything below it: a `runtime create` still running (timeout), its
            # hooks, a half-made container init. SIGKILL, because conmon forwards SIGTERM to
            # the container instead of exiting.
            victims = _descendants(pid)
            for victim in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
            for victim in victims:
                self._wait_gone(victim, 2.0)
        try:
            self._runtime_delete(container_id)
        except PycriError as exc:
            log.warning("runtime state left behind", id=container_id, error=str(exc))
        self._remove_conmon_files(directory)

    @staticmethod
    def _remove_conmon_files(directory: Path) -> None:
        """Remove ``state_dir/<id>`` and the fifos and socket conmon made in the bundle."""
        try:
            bundle = Path(json.loads((directory / "monitor.json").read_text())["bundle"])
        except (OSError, ValueError, KeyError):
            bundle = None
        if bundle is not None:
            for name in CONMON_BUNDLE_FILES:
                path = bundle / name
                # Only fifos and sockets: never a regular file someone put in the bundle.
                with contextlib.suppress(FileNotFoundError):
                    if not path.is_file() and not path.is_dir():
                        path.unlink()
        shutil.rmtree(directory, ignore_errors=True)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, container_id: str) -> None:
        result = self._runtime(["start", container_id])
        if result.returncode == 0:
            return
        current = self.state(container_id)
        if current is None:
            raise NotFound(f"container {container_id} is not known to {self.runtime_name}")
        error = _clean_runtime_error(result.stderr)
        if current.get("status") != "created":
            raise FailedPrecondition(
                f"cannot start container {container_id}: it is {current.get('status')} ({error})"
            )
        raise Internal(f"{self.runtime_name} start {container_id} failed: {error}")

    def update_resources(self, container_id: str, resources: dict[str, Any]) -> None:
        """Apply OCI linux.resources to a live container (``<runtime> update --resources``)."""
        directory = self.container_dir(container_id)
        if not directory.is_dir():
            raise NotFound(f"container {container_id} is not known to {self.runtime_name}")
        request = directory / "update.json"
        request.write_text(json.dumps(resources))
        try:
            result = self._runtime(["update", "--resources", str(request), container_id])
        finally:
            request.unlink(missing_ok=True)
        if result.returncode != 0:
            raise FailedPrecondition(
                f"{self.runtime_name} update {container_id}: {_clean_runtime_error(result.stderr)}"
            )

    def kill(self, container_id: str, signal: int, *, all_processes: bool = False) -> None:
        """Send ``signal`` to the container's init (or all its processes).

        Fine if the container already stopped, or is gone altogether (after a reboot wiped
        the runtime's state): either way there is nothing left to signal.
        """
        args = ["kill", *(["--all"] if all_processes else []), container_id, str(int(signal))]
        result = self._runtime(args)
        if result.returncode == 0:
            return
        current = self.state(container_id)
        if current is None or current.get("status") == "stopped":
            return
        raise Internal(
            f"{self.runtime_name} kill {container_id} {signal} failed: {_clean_runtime_error(result.stderr)}"
        )

    def state(self, container_id: str) -> dict[str, Any] | None:
        """``<runtime> state`` as a dict, or None if the runtime does not know the container."""
        if not self._has_runtime_state(container_id):
            return None
        result = self._runtime(["state", container_id])
        if result.returncode != 0:
            if not self._has_runtime_state(container_id):
                return None  # deleted while we asked
            raise Internal(
                f"{self.runtime_name} state {container_id} failed: {_clean_runtime_error(result.stderr)}"
            )
        try:
            parsed = json.loads(result.stdout)
        except ValueError:
            raise Internal(
                f"{self.runtime_name} state {container_id} printed no JSON: {result.stdout!r}"
            ) from None
        return parsed if isinstance(parsed, dict) else None

    def _runtime_delete(self, container_id: str) -> None:
        if not self._has_runtime_state(container_id):
            return
        result = self._runtime(["delete", "--force", container_id])
        if result.returncode != 0 and self._has_runtime_state(container_id):
            raise Internal(
                f"{self.runtime_name} delete --force {container_id} failed: "
                f"{_clean_runtime_error(result.stderr)}"
            )

    def forget_stopped(self, container_id: str) -> None:
        """Drop the runtime's state of a container that has exited (``<runtime> delete``), as
        containerd deletes a task when it exits: RemoveContainer then has no runtime call to
        make. conmon's files (the exit code) stay until ``delete``. Never raises."""
        try:
            self._runtime_delete(container_id)
        except PycriError as exc:
            log.warning("cannot delete an exited container's runtime state", id=container_id, error=str(exc))

    def delete(self, container_id: str) -> None:
        """Kill and forget the container: runtime state, conmon, ``state_dir/<id>``. Idempotent."""
        directory = self.container_dir(container_id)
        # The runtime first: killing the container makes conmon record the exit and leave by itself.
        self._runtime_delete(container_id)
        pid = self.conmon_pid(container_id)
        if pid is not None and not self._wait_gone(pid, CONMON_EXIT_GRACE):
            log.warning("conmon did not exit after its container; killing it", id=container_id, pid=pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_gone(pid, 2.0)
        self._remove_conmon_files(directory)

    # --- exits ---------------------------------------------------------------------------

    def exit_info(self, container_id: str) -> ExitInfo | None:
        """How the container exited, or None while it runs.

        A container whose conmon died without writing an exit file and which the runtime
        reports stopped (or no longer knows, e.g. after a reboot wiped the state directory)
        exited with an unknown code: reported as 255, as CRI-O does.
        """
        directory = self.container_dir(container_id)
        found = self._read_exit_file(container_id)
        if found is not None:
            return found
        pid = self._read_pid(directory / "conmon.pid")
        if pid is not None and _pid_is_conmon_for(pid, container_id, self.conmon_path):
            return None
        # conmon writes the exit file before it exits: look again now that it is gone.
        found = self._read_exit_file(container_id)
        if found is not None:
            return found
        if pid is None and directory.exists():
            return None  # create has not reached the point where conmon reports its pid
        current = self.state(container_id)
        if current is not None and current.get("status") != "stopped":
            return None  # monitor lost, container still alive
        return ExitInfo(UNKNOWN_EXIT_CODE, time.time_ns(), (directory / "oom").exists())

    def _read_exit_file(self, container_id: str) -> ExitInfo | None:
        path = self._exit_file(container_id)
        try:
            with open(path) as fh:
                text = fh.read()
                finished = os.fstat(fh.fileno()).st_mtime_ns
        except FileNotFoundError:
            return None
        try:
            code = int(text.strip())
        except ValueError:
            raise Internal(f"conmon's exit file {path} holds {text!r}, not an exit code") from None
        if code < 0:
            code = UNKNOWN_EXIT_CODE
        return ExitInfo(code, finished, (path.parent.parent / "oom").exists())

    def wait_exit(self, container_id: str, timeout: float) -> ExitInfo | None:
        """Poll the exit file until the container exited or ``timeout`` seconds passed."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            info = self.exit_info(container_id)
            if info is not None or time.monotonic() >= deadline:
                return info
            time.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))

    # --- conmon ------------------------------------------------------------------------------

    @staticmethod
    def _read_pid(path: Path) -> int | None:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def conmon_pid(self, container_id: str) -> int | None:
        """The pid of the container's live conmon, or None if there is none."""
        pid = self._read_pid(self.container_dir(container_id) / "conmon.pid")
        if pid is None or not _pid_is_conmon_for(pid, container_id, self.conmon_path):
            return None
        return pid

    @staticmethod
    def _wait_gone(pid: int, timeout: float) -> bool:
        # conmon is not our child (it daemonised), so it cannot be waited for; poll /proc.
        deadline = time.monotonic() + timeout
        while not _process_gone(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def reopen_log(self, container_id: str) -> None:
        """Ask conmon to reopen the log file (after kubelet rotated it); wait until it has."""
        monitor = self._monitor(container_id)
        log_path = Path(monitor["log_path"])
        if self.conmon_pid(container_id) is None:
            raise FailedPrecondition(
                f"container {container_id} has no running conmon; its log cannot be reopened"
            )
        if not log_path.parent.is_dir():
            # conmon exits when it cannot open the new file; refuse rather than lose the monitor.
            raise FailedPrecondition(f"log directory {log_path.parent} of container {container_id} is gone")
        try:
            before = log_path.stat().st_ino
        except FileNotFoundError:
            before = None
        ctl = Path(monitor["bundle"]) / "ctl"
        try:
            # Non-blocking: with conmon gone the fifo has no reader and open fails (ENXIO)
            # instead of hanging. conmon holds a writer itself, so its reader never sees EOF.
            fd = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.ENOENT):
                raise FailedPrecondition(
                    f"conmon of container {container_id} is not listening on {ctl}"
                ) from None
            raise from_os_error(exc, f"cannot open conmon's control fifo {ctl}") from exc
        try:
            os.write(fd, CTL_REOPEN_LOGS)
        finally:
            os.close(fd)
        # conmon always reopens into a new file renamed over the path: a new inode means done.
        deadline = time.monotonic() + REOPEN_LOG_TIMEOUT
        while True:
            try:
                if log_path.stat().st_ino != before:
                    return
            except FileNotFoundError:
                pass
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"conmon did not reopen {log_path} within {REOPEN_LOG_TIMEOUT:g}s")
            if self.conmon_pid(container_id) is None:
                raise Internal(f"conmon of container {container_id} exited while reopening {log_path}")
            time.sleep(0.005)

    # --- exec ------------------------------------------------------------------------------

    def _exec_process(self, container_id: str, cmd: list[str]) -> dict[str, Any]:
        """The container's process spec with ``cmd`` as its args, as CRI-O builds exec processes:
        same user, env, cwd, capabilities, rlimits and LSM labels as the container itself."""
        config_path = self.bundle_path(container_id) / "config.json"
        try:
            process = dict(json.loads(config_path.read_text()).get("process") or {})
        except OSError as exc:
            raise from_os_error(exc, f"cannot read the spec of container {container_id}") from exc
        except ValueError as exc:
            raise Internal(
                f"cannot read the spec of container {container_id} ({config_path}): {exc}"
            ) from exc
        process["args"] = list(cmd)
        process["terminal"] = False
        process.pop("consoleSize", None)
        # The container's AppArmor profile carries over (with its SELinux label); the default one
        # is loaded again if an AppArmor reload removed it, or the exec would fail to enter it.
        apparmor.ensure_loaded(process.get("apparmorProfile"))
        return process

    def exec_sync(
        self,
        container_id: str,
        cmd: list[str],
        timeout: float | None,
        *,
        max_output: int = 16 * 1024 * 1024,
    ) -> ExecResult:
        """Run ``cmd`` in the container and collect its output (``exec_async``, for callers with no
        event loop of their own).

        ``timeout`` None or <= 0 means no limit. On timeout the process and everything it
        started are killed inside the container. Each of stdout and stderr keeps at most
        ``max_output`` bytes; the rest is read and dropped so the process never blocks.
        """
        return asyncio.run(self.exec_async(container_id, cmd, timeout, max_output=max_output))

    def _exec_files(self, container_id: str, cmd: list[str]) -> tuple[list[str], Path, Path]:
        """Write the exec's process file; return the runtime's argv, the process and pid files."""
        if not cmd:
            raise InvalidArgument("exec command is empty")
        directory = self.container_dir(container_id)
        if not directory.exists():
            raise NotFound(f"container {container_id} is not known to this executor")
        token = secrets.token_hex(6)
        process_file = directory / f"exec-{token}.json"
        pid_file = directory / f"exec-{token}.pid"
        process_file.write_text(json.dumps(self._exec_process(container_id, cmd)))
        argv = [
            self.runtime_path,
            *self._runtime_globals,
            "exec",
            "--process", str(process_file),
            "--pid-file", str(pid_file),
            container_id,
        ]  # fmt: skip
        return argv, process_file, pid_file

    @staticmethod
    def _remove_exec_files(*paths: Path) -> None:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def exec_async(
        self,
        container_id: str,
        cmd: list[str],
        timeout: float | None,
        *,
        max_output: int = 16 * 1024 * 1024,
    ) -> ExecResult:
        """``exec_sync`` for the event loop: the command's run time, however long, costs no thread.

        Only bounded steps (writing the process file, killing a timed-out process tree, reading the
        runtime's state after a failure) run on worker threads. A caller that goes away (the task is
        cancelled) gets its exec killed, as a timeout would, before the cancellation goes on.
        """
        loop = asyncio.get_running_loop()
        argv, process_file, pid_file = await loop.run_in_executor(None, self._exec_files, container_id, cmd)
        try:
            return await self._run_exec_async(container_id, argv, pid_file, timeout, max_output)
        finally:
            self._remove_exec_files(process_file, pid_file)

    async def _run_exec_async(
        self, container_id: str, argv: list[str], pid_file: Path, timeout: float | None, max_output: int
    ) -> ExecResult:
        loop = asyncio.get_running_loop()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
                start_new_session=True,
            )
        except OSError as exc:
            raise _binary_error(
                exc, self.runtime_path, self.runtime_name, f"cannot exec in container {container_id}"
            ) from exc
        assert proc.stdout is not None and proc.stderr is not None
        kept = (bytearray(), bytearray())
        truncated = False

        async def drain(stream: asyncio.StreamReader, buffer: bytearray) -> None:
            nonlocal truncated
            while chunk := await stream.read(65536):
                room = max_output - len(buffer)
                if len(chunk) > room:
                    truncated = True  # the rest is read and dropped, so the process never blocks
                    chunk = chunk[: max(0, room)]
                buffer += chunk

        readers = asyncio.gather(drain(proc.stdout, kept[0]), drain(proc.stderr, kept[1]))
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.shield(readers), timeout if timeout and timeout > 0 else None)
        except TimeoutError:
            timed_out = True
        except asyncio.CancelledError:
            await asyncio.shield(self._stop_exec(loop, proc, pid_file, readers))
            raise
        if timed_out:
            await self._stop_exec(loop, proc, pid_file, readers)
        try:
            exit_code = await asyncio.wait_for(
                proc.wait(), EXEC_DRAIN_GRACE if timed_out else RUNTIME_CALL_TIMEOUT
            )
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            exit_code = await proc.wait()
        stdout, stderr = bytes(kept[0]), bytes(kept[1])
        if not timed_out and exit_code != 0 and not pid_file.exists():
            # No pid file: the runtime never started the process; its stderr is its own error.
            await loop.run_in_executor(None, self._raise_exec_failure, container_id, stderr)
        return ExecResult(stdout, stderr, exit_code, timed_out, truncated)

    async def _stop_exec(
        self,
        loop: asyncio.AbstractEventLoop,
        proc: asyncio.subprocess.Process,
        pid_file: Path,
        readers: asyncio.Future[Any],
    ) -> None:
        """Kill a timed-out (or abandoned) exec's process tree, then stop reading its pipes."""
        await loop.run_in_executor(None, self._kill_exec_pid, proc.pid, proc.returncode, pid_file)
        try:
            await asyncio.wait_for(asyncio.shield(readers), EXEC_DRAIN_GRACE)
        except TimeoutError:
            # A process that escaped the kill (re-parented out of the tree) still holds the
            # pipes; stop reading rather than wait for it.
            readers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await readers

    def _kill_exec_pid(self, runtime_pid: int, returncode: int | None, pid_file: Path) -> None:
        """Kill a timed-out exec, given the pid of the runtime running it (``runtime exec``): the
        process in the container and its descendants, or the runtime if it is still starting."""
        pid = None
        # The runtime writes the pid file once the process exists; on a loaded machine that can
        # take a while, and killing the runtime before then could orphan the process.
        give_up = time.monotonic() + 5.0
        while pid is None and time.monotonic() < give_up:
            pid = self._read_pid(pid_file)
            if pid is None:
                ended = returncode is not None or _process_gone(runtime_pid)
                if ended and time.monotonic() > give_up - 4.8:
                    break  # the runtime is gone and never wrote the pid: nothing was started
                time.sleep(0.01)
        if pid is not None:
            _kill_tree(pid)
        else:
            # Still starting: killing the runtime stops it before the process exists.
            with contextlib.suppress(ProcessLookupError):
                os.kill(runtime_pid, signal.SIGKILL)

    def _raise_exec_failure(self, container_id: str, stderr: bytes) -> None:
        error = _clean_runtime_error(stderr.decode(errors="replace"))
        current = self.state(container_id)
        if current is None:
            raise NotFound(f"container {container_id} is not known to {self.runtime_name}: {error}")
        if current.get("status") != "running":
            raise FailedPrecondition(
                f"cannot exec in container {container_id}: it is {current.get('status')} ({error})"
            )
        command_error = _command_error(f"exec in container {container_id}", error)
        if command_error is not None:
            raise command_error
        raise Internal(f"{self.runtime_name} exec in {container_id} failed: {error}")

    # --- interactive exec (streaming) ------------------------------------------------------

    def prepare_exec(
        self, container_id: str, cmd: list[str], *, tty: bool, console_size: tuple[int, int] | None = None
    ) -> PreparedExec:
        """The argv and files of an interactive ``<runtime> exec`` that the caller runs.

        Without ``tty`` the process inherits the runtime's stdio (pipes the caller makes).
        With ``tty`` the runtime makes a terminal inside the container and sends its master
        over ``--console-socket``, a listening socket made here; the caller accepts on it.
        The caller calls ``cleanup()`` when the process is gone. ``console_size`` is the
        terminal's initial (width, height).
        """
        import socket
        import tempfile

        if not cmd:
            raise InvalidArgument("exec command is empty")
        directory = self.container_dir(container_id)
        if not directory.exists():
            raise NotFound(f"container {container_id} is not known to this executor")
        process = self._exec_process(container_id, cmd)
        if tty:
            process["terminal"] = True
            env = list(process.get("env") or [])
            if not any(item.startswith("TERM=") for item in env):
                env.append("TERM=xterm")  # as CRI-O and containerd do for a terminal
            process["env"] = env
            if console_size is not None and all(console_size):
                process["consoleSize"] = {"width": console_size[0], "height": console_size[1]}
        token = secrets.token_hex(6)
        process_file = directory / f"exec-{token}.json"
        pid_file = directory / f"exec-{token}.pid"
        process_file.write_text(json.dumps(process))
        argv = [
            self.runtime_path,
            *self._runtime_globals,
            "exec",
            "--process", str(process_file),
            "--pid-file", str(pid_file),
        ]  # fmt: skip
        prepared = PreparedExec(argv, dict(self._env), process_file, pid_file)
        if tty and self.runtime_name == "runc":
            # runc refuses --console-socket unless it detaches, and a detached exec's exit code
            # is lost; in the foreground it makes the terminal itself and copies it to its own
            # stdio, which the caller makes a terminal (resized with SIGWINCH to runc).
            prepared.runtime_copies_terminal = True
        elif tty:
            try:
                # A short directory of its own: a socket path has at most 107 bytes.
                prepared.console_dir = Path(tempfile.mkdtemp(prefix="pycri-tty-"))
                path = prepared.console_dir / "console.sock"
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                prepared.console_listener = listener
                listener.bind(str(path))
                listener.listen(1)
            except BaseException:
                prepared.cleanup()
                raise
            argv += ["--console-socket", str(path)]
        argv.append(container_id)
        return prepared

    def kill_exec(self, prepared: PreparedExec) -> None:
        """Kill an interactive exec's process in the container and everything it started."""
        pid = self._read_pid(prepared.pid_file)
        if pid is None:
            return
        _kill_tree(pid)


@dataclass
class PreparedExec:
    argv: list[str]
    env: dict[str, str]
    process_file: Path
    pid_file: Path
    console_dir: Path | None = None
    console_listener: Any = None  # socket.socket listening for the terminal master
    runtime_copies_terminal: bool = False

    def cleanup(self) -> None:
        if self.console_listener is not None:
            self.console_listener.close()
        for path in (self.process_file, self.pid_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self.console_dir is not None:
            shutil.rmtree(self.console_dir, ignore_errors=True)
