"""Run a real pycri daemon for a test: its own socket, root and state directories."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cri_runtime.daemon.client import CRIClient
from cri_runtime.network.netns import netlink

# PYCRI_TEST_CGROUP_DRIVER=systemd (vm/guest-test) runs every test daemon under that driver unless
# the test's own config names one; unset, pycri's default (cgroupfs).
TEST_CGROUP_DRIVER = os.environ.get("PYCRI_TEST_CGROUP_DRIVER", "")


def with_test_cgroup_driver(config_text: str) -> str:
    """The config with ``cgroup_driver`` from PYCRI_TEST_CGROUP_DRIVER, when it names none (a
    top-level key, so it goes before the first table)."""
    if not TEST_CGROUP_DRIVER or re.search(r"(?m)^\s*cgroup_driver\s*=", config_text):
        return config_text
    return f'cgroup_driver = "{TEST_CGROUP_DRIVER}"\n{config_text}'


@dataclass
class Daemon:
    workdir: Path
    config_text: str = ""
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # added to pycri's environment
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.workdir / "pycri.sock"

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def state(self) -> Path:
        return self.workdir / "state"

    @property
    def log_path(self) -> Path:
        return self.workdir / "pycri.log"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 20.0) -> Daemon:
        config = self.workdir / "pycri.toml"
        config.write_text(with_test_cgroup_driver(self.config_text))
        args = [
            sys.executable,
            "-m",
            "cri_runtime.daemon.cli",
            "serve",
            "--config",
            str(config),
            "--socket",
            str(self.socket),
            "--root",
            str(self.root),
            "--state",
            str(self.state),
            "--log-level",
            "debug",
            "--log-format",
            "json",
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            args, stdout=log, stderr=log, start_new_session=True, env={**os.environ, **self.env}
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pycri exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.socket.exists():
                try:
                    with CRIClient(self.endpoint, timeout=2) as client:
                        client.version()
                    return self
                except Exception:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"pycri did not come up in {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise RuntimeError(f"pycri did not stop on SIGTERM in {timeout}s:\n{self.log_tail()}") from None

    def wait_killed(self, timeout: float = 30.0) -> None:
        """Wait for a daemon that kills itself (an armed failpoint) to be gone."""
        assert self.process is not None
        code = self.process.wait(timeout)
        if code != -9:
            raise RuntimeError(f"pycri exited with {code}, not by SIGKILL:\n{self.log_tail()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def client(self) -> CRIClient:
        return CRIClient(self.endpoint)

    def rss_kib(self) -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0


def force_cleanup(daemon: Daemon) -> None:
    """Last resort after a failed test: take down whatever the daemon left, so the next test
    (and the next CI run) starts on a clean host. The test has already failed by then."""
    import shutil

    from cri_runtime.host import cgroups, mounts

    workdir = str(daemon.workdir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if argv and argv[0].endswith(b"catatonit") and workdir.encode() in environ:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
            continue
        if not argv or not argv[0].endswith(b"conmon") or workdir.encode() not in b" ".join(argv):
            continue
        args = [a.decode() for a in argv if a]
        runtime = args[args.index("--runtime") + 1]
        root = next(a.split("=", 1)[1] for a in args if a.startswith("--root="))
        cid = args[args.index("--cid") + 1]
        subprocess.run([runtime, "--root", root, "kill", cid, "KILL"], capture_output=True, timeout=10)
        subprocess.run([runtime, "--root", root, "delete", "--force", cid], capture_output=True, timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(entry.name), signal.SIGKILL)
    mounts.unmount_all_under(daemon.workdir)
    sandboxes = daemon.state / "sandboxes"
    if sandboxes.is_dir():
        for pod in sandboxes.iterdir():
            with contextlib.suppress(OSError, ValueError):
                cgroups.remove(f"/pycri/{pod.name}")
    shutil.rmtree(daemon.state, ignore_errors=True)


def bridge_ports(bridge: str) -> list[str]:
    """The names of the links attached to ``bridge`` (none when there is no such bridge), as the
    kernel lists them over netlink: a host leak check for pod veths."""
    with netlink() as ipr:
        found = ipr.link_lookup(ifname=bridge)
        if not found:
            return []
        return sorted(link.get("ifname") for link in ipr.link("dump") if link.get("master") == found[0])
