"""The two CRI runtimes under test, each on its own socket, root and state under a temp dir.

* :class:`PycriRuntime` wraps ``tests.support.daemon.Daemon``.
* :class:`ContainerdRuntime` runs Debian's ``containerd`` (1.6) with its CRI plugin, a
  private config (root/state/socket of its own, hosts.toml sending the loopback registry
  to plain http) and removes every mount and directory it made when stopped.

Both expose the same small surface: ``start()``, ``stop()``, ``pid``, ``endpoint``,
``client()`` and ``store_leftovers()`` (what content remains on disk).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Protocol

from cri_runtime.client import CRIClient
from tests.support.daemon import Daemon

CONTAINERD_BINARY = "/usr/bin/containerd"
# Short, fixed parent for containerd's socket and state: unix socket paths max out at 108 bytes.
RUN_PARENT = Path("/run/pycri-bench")


class Runtime(Protocol):
    name: str

    @property
    def pid(self) -> int: ...

    @property
    def endpoint(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def client(self) -> CRIClient: ...

    def store_leftovers(self) -> dict[str, int]: ...

    def log_tail(self, lines: int = 30) -> str: ...


def _count_entries(path: Path) -> int:
    try:
        return sum(1 for _ in path.iterdir())
    except FileNotFoundError:
        return 0


# --- pycri ----------------------------------------------------------------------------------------


class PycriRuntime:
    name = "pycri"

    def __init__(self, workdir: Path, config_text: str = "") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.daemon = Daemon(workdir, config_text)

    @property
    def pid(self) -> int:
        assert self.daemon.process is not None
        return self.daemon.process.pid

    @property
    def endpoint(self) -> str:
        return self.daemon.endpoint

    def start(self) -> None:
        self.daemon.start()

    def stop(self) -> None:
        try:
            self.daemon.stop()
        finally:
            self.daemon.kill()

    def client(self) -> CRIClient:
        return self.daemon.client()

    def store_leftovers(self) -> dict[str, int]:
        root = self.daemon.root
        tmp = [p for p in (root / "tmp").glob("*")] if (root / "tmp").exists() else []
        return {"layers": _count_entries(root / "layers"), "tmp": len(tmp)}

    def log_tail(self, lines: int = 30) -> str:
        return self.daemon.log_tail(lines)


# --- containerd -----------------------------------------------------------------------------------

_CONTAINERD_CONFIG = """\
# containerd 1.6 config written by pycri's bench: everything private to {base}.
version = 2
root = "{root}"
state = "{state}"
# Snapshotters this host cannot use; disabling them only silences start-up errors.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{base}/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.9"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    # root here lacks CAP_SYS_RESOURCE; see ../shared/conformance/RUNBOOK.md section 4.
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          BinaryName = "/usr/sbin/runc"
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{base}/cni"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "{base}/certs.d"
"""

_HOSTS_TOML = """\
# The bench registry speaks plain http on loopback only.
server = "http://{host}"

[host."http://{host}"]
  capabilities = ["pull", "resolve"]
"""


def _mounts_under(paths: list[Path]) -> list[str]:
    """Mount points at or below any of ``paths`` (deepest first)."""
    prefixes = [str(p.resolve()) for p in paths]
    found: list[str] = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) < 2:
                continue
            # /proc/mounts escapes spaces etc. as octal; our paths have none.
            target = fields[1]
            if any(target == p or target.startswith(p + "/") for p in prefixes):
                found.append(target)
    return sorted(set(found), key=len, reverse=True)


def unmount_all_under(paths: list[Path]) -> list[str]:
    """Unmount everything below ``paths``; lazily when a plain umount fails. Returns what was found."""
    found = _mounts_under(paths)
    for target in found:
        result = subprocess.run(["umount", target], capture_output=True)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", target], capture_output=True)
    return found


class ContainerdRuntime:
    name = "containerd"

    def __init__(self, workdir: Path, registry_host: str) -> None:
        self.base = workdir
        self.base.mkdir(parents=True, exist_ok=True)
        RUN_PARENT.mkdir(parents=True, exist_ok=True, mode=0o711)
        self.run_dir = Path(tempfile.mkdtemp(prefix="cd-", dir=RUN_PARENT))
        self.root = self.base / "root"
        self.state = self.run_dir / "state"
        self.socket = self.run_dir / "containerd.sock"
        self.log_path = self.base / "containerd.log"
        self.config_path = self.base / "config.toml"
        self.registry_host = registry_host
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def _write_config(self) -> None:
        (self.base / "cni").mkdir(exist_ok=True)
        (self.base / "opt").mkdir(exist_ok=True)
        hosts_dir = self.base / "certs.d" / self.registry_host
        hosts_dir.mkdir(parents=True, exist_ok=True)
        (hosts_dir / "hosts.toml").write_text(_HOSTS_TOML.format(host=self.registry_host))
        self.config_path.write_text(
            _CONTAINERD_CONFIG.format(base=self.base, root=self.root, state=self.state, socket=self.socket)
        )

    def start(self, timeout: float = 30.0) -> None:
        if not os.access(CONTAINERD_BINARY, os.X_OK):
            raise RuntimeError(f"{CONTAINERD_BINARY} not found (apt-get install containerd)")
        self._write_config()
        # setpriv --pdeathsig: containerd gets SIGTERM should this process die unexpectedly.
        prefix = ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*prefix, CONTAINERD_BINARY, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.base,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.socket.exists():
                try:
                    with CRIClient(self.endpoint, timeout=2) as client:
                        client.version()
                        client.list_images()  # the image service answers too
                    return
                except Exception:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"containerd's CRI did not come up in {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        try:
            proc = self.process
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        finally:
            self.process = None
            unmount_all_under([self.base, self.run_dir])
            shutil.rmtree(self.root, ignore_errors=True)
            shutil.rmtree(self.run_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                RUN_PARENT.rmdir()  # only when no other bench is using it

    def client(self) -> CRIClient:
        return CRIClient(self.endpoint)

    def store_leftovers(self) -> dict[str, int]:
        blobs = self.root / "io.containerd.content.v1.content" / "blobs" / "sha256"
        ingest = self.root / "io.containerd.content.v1.content" / "ingest"
        snapshots = self.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
        return {
            "blobs": _count_entries(blobs),
            "ingest": _count_entries(ingest),
            "snapshots": _count_entries(snapshots),
        }

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
