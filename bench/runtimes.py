"""The two CRI runtimes under test, each on its own socket, root and state under a temp dir.

* :class:`PycriRuntime` wraps ``tests.support.daemon.Daemon``.
* :class:`ContainerdRuntime` runs Debian's ``containerd`` (1.6) with its CRI plugin, a
  private config (root/state/socket of its own, hosts.toml sending the loopback registry
  to plain http) and removes every mount and directory it made when stopped.

Both expose the same small surface: ``start()``, ``stop()``, ``pid``, ``endpoint``,
``client()``, ``store_leftovers()`` (what content remains on disk) and, for the pod
benchmarks, ``infra_processes()``: the daemon and every process it keeps running for pods
and containers that is not a container's own workload (pycri: conmon, catatonit;
containerd: containerd-shim-runc-v2 and the pause processes).

Given a :class:`PodNetwork`, each runtime gets a bridge network of its own (bridge +
host-local, portmap, plus lo); ``stop()`` then removes every pod through CRI, kills what
is left of its processes, unmounts, and deletes the bridge, even after a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.measure import descendants, environ_has, process_table
from cri_runtime.daemon.client import CRIClient
from tests.support.daemon import Daemon, force_cleanup

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

    def infra_processes(self) -> dict[int, str]: ...


@dataclass(frozen=True)
class PodNetwork:
    """A runtime's own pod network: a bridge and a subnet (inside 198.18.0.0/15)."""

    name: str
    subnet: str
    bridge: str


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def _bridge_ports(name: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show", "master", name], capture_output=True, text=True)
    return out.stdout.splitlines()


def claim_bridge(name: str) -> None:
    """Make sure ``name`` is ours to create: a stale, empty bridge of an earlier bench is deleted;
    one with ports is someone else's and stops the bench."""
    if not _link_exists(name):
        return
    if _bridge_ports(name):
        raise RuntimeError(f"bridge {name} exists and has ports: another bench or runtime is using it")
    subprocess.run(["ip", "link", "del", name], capture_output=True)


def delete_bridge(name: str) -> None:
    if _link_exists(name):
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def remove_all_pods(endpoint: str, timeout: float = 60.0) -> list[str]:
    """StopPodSandbox + RemovePodSandbox of every pod (which takes their containers along);
    returns the errors. Best effort: used on the way out, after a failure too."""
    errors: list[str] = []
    try:
        with CRIClient(endpoint, timeout=timeout) as client:
            for pod in client.list_pods():
                for call in (client.stop_pod, client.remove_pod):
                    try:
                        call(pod.id)
                    except Exception as exc:
                        errors.append(f"{call.__name__} {pod.id[:12]}: {exc!r}")
            for container in client.list_containers():  # orphans, should there be any
                try:
                    client.remove_container(container.id)
                except Exception as exc:
                    errors.append(f"remove_container {container.id[:12]}: {exc!r}")
    except Exception as exc:
        errors.append(f"listing pods: {exc!r}")
    return errors


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants, children first."""
    procs = process_table()
    for victim in [*reversed(descendants(pid, procs)), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def _count_entries(path: Path) -> int:
    try:
        return sum(1 for _ in path.iterdir())
    except FileNotFoundError:
        return 0


# --- pycri ----------------------------------------------------------------------------------------


class PycriRuntime:
    name = "pycri"

    def __init__(
        self,
        workdir: Path,
        config_text: str = "",
        *,
        pod_network: PodNetwork | None = None,
        default_runtime: str = "",
        log_level: str = "",
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.pod_network = pod_network
        self.cleanup_errors: list[str] = []
        if default_runtime:
            config_text = f'default_runtime = "{default_runtime}"\n' + config_text
        if pod_network is not None:
            net_dir = workdir / "net.d"  # empty: pycri's built-in bridge network
            net_dir.mkdir(exist_ok=True)
            config_text += (
                f'[network]\nconf_dir = "{net_dir}"\npod_subnet = "{pod_network.subnet}"\n'
                f'bridge = "{pod_network.bridge}"\n'
            )
        # tests.support.daemon logs at debug; a later --log-level wins.
        self.daemon = Daemon(workdir, config_text, extra_args=["--log-level", log_level] if log_level else [])

    @property
    def pid(self) -> int:
        assert self.daemon.process is not None
        return self.daemon.process.pid

    @property
    def endpoint(self) -> str:
        return self.daemon.endpoint

    def start(self) -> None:
        if self.pod_network is not None:
            claim_bridge(self.pod_network.bridge)
        self.daemon.start()

    def stop(self) -> None:
        try:
            proc = self.daemon.process
            if self.pod_network is not None and proc is not None and proc.poll() is None:
                self.cleanup_errors += remove_all_pods(self.endpoint)
            self.daemon.stop()
        finally:
            self.daemon.kill()
            if self.pod_network is not None:
                # Whatever a failed run left: conmons and their containers, pod inits,
                # mounts, pod cgroups, state; then the bridge.
                force_cleanup(self.daemon)
                delete_bridge(self.pod_network.bridge)

    def infra_processes(self) -> dict[int, str]:
        """The daemon, its children, every conmon of this daemon (not the containers below
        them) and its pod inits (catatonit), as PID -> role."""
        marker = str(self.daemon.workdir).encode()
        table = process_table()
        roles = {self.pid: "daemon"}
        for pid in descendants(self.pid, table):
            roles[pid] = f"daemon child ({table[pid].comm})"
        for proc in table.values():
            if proc.comm == "conmon" and any(marker in arg for arg in proc.argv):
                roles[proc.pid] = "conmon"
            elif proc.comm == "catatonit" and environ_has(proc.pid, b"PYCRI_SANDBOX=" + marker):
                roles[proc.pid] = "catatonit"
        return roles

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
    sandbox_image = "{sandbox_image}"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    # root here lacks CAP_SYS_RESOURCE; see ../shared/conformance/RUNBOOK.md section 4.
    restrict_oom_score_adj = true
    # Pod network namespaces under {state}/netns, not the host-wide /var/run/netns.
    netns_mounts_under_state_dir = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          BinaryName = "/usr/sbin/runc"
          SystemdCgroup = false
          # runc's state beside containerd's, not the host-wide /run/containerd/runc.
          Root = "{runc_root}"
      # The same shim running crun, for the bench's crun rows (RuntimeClass handler "crun").
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crun]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crun.options]
          BinaryName = "/usr/bin/crun"
          SystemdCgroup = false
          Root = "{runc_root}-crun"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "{base}/cni"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "{base}/certs.d"
"""

_CNI_CONFLIST = """\
{{
  "cniVersion": "1.0.0",
  "name": "{name}",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{bridge}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{"subnet": "{subnet}"}}]],
        "routes": [{{"dst": "0.0.0.0/0"}}],
        "dataDir": "{ipam_dir}"
      }}
    }},
    {{"type": "portmap", "capabilities": {{"portMappings": true}}, "snat": true}}
  ]
}}
"""
# containerd attaches lo itself with the loopback plugin from bin_dir, before this network.
# The shims' sockets live in /run/containerd/s whatever the config says.
SHIM_SOCKET_DIR = Path("/run/containerd/s")
# libcni's result cache (containerd 1.6 sets no cache dir of its own).
CNI_RESULTS_DIR = Path("/var/lib/cni/results")
# Host directories containerd creates on demand; removed (once empty) unless they existed before.
_HOST_DIRS = (SHIM_SOCKET_DIR, SHIM_SOCKET_DIR.parent, CNI_RESULTS_DIR, CNI_RESULTS_DIR.parent)

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

    def __init__(
        self,
        workdir: Path,
        registry_host: str,
        *,
        sandbox_image: str = "registry.k8s.io/pause:3.9",
        pod_network: PodNetwork | None = None,
    ) -> None:
        self.sandbox_image = sandbox_image
        self.pod_network = pod_network
        self.cleanup_errors: list[str] = []
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
        # What existed before this containerd made shim sockets, so cleanup removes only its own.
        self._existed = set(_HOST_DIRS)

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
            _CONTAINERD_CONFIG.format(
                base=self.base,
                root=self.root,
                state=self.state,
                socket=self.socket,
                sandbox_image=self.sandbox_image,
                runc_root=self.run_dir / "runc",
            )
        )
        if self.pod_network is not None:
            net = self.pod_network
            (self.base / "cni" / "10-bench.conflist").write_text(
                _CNI_CONFLIST.format(
                    name=net.name, bridge=net.bridge, subnet=net.subnet, ipam_dir=self.base / "cni-ipam"
                )
            )

    def start(self, timeout: float = 30.0) -> None:
        if not os.access(CONTAINERD_BINARY, os.X_OK):
            raise RuntimeError(f"{CONTAINERD_BINARY} not found (apt-get install containerd)")
        if self.pod_network is not None:
            claim_bridge(self.pod_network.bridge)
        self._existed = {p for p in _HOST_DIRS if p.exists()}
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

    def _shims(self) -> list[int]:
        """This containerd's shims: ``containerd-shim-runc-v2 ... -address <our socket>``."""
        socket = str(self.socket).encode()
        out = []
        for proc in process_table().values():
            argv = proc.argv
            if not argv or not argv[0].endswith(b"containerd-shim-runc-v2"):
                continue
            if any(argv[i] == b"-address" and argv[i + 1] == socket for i in range(len(argv) - 1)):
                out.append(proc.pid)
        return out

    def infra_processes(self) -> dict[int, str]:
        """containerd, its children, its shims and each shim's pause process (the sandbox
        container's init: infrastructure); the other shim children are workloads."""
        table = process_table()
        roles = {self.pid: "daemon"}
        for pid in descendants(self.pid, table):
            roles[pid] = f"daemon child ({table[pid].comm})"
        for shim in self._shims():
            roles[shim] = "shim"
            for child in table.values():
                if child.ppid == shim and child.argv and child.argv[0] == b"/pause":
                    roles[child.pid] = "pause"
        return roles

    def _force_cleanup(self) -> None:
        """After containerd is gone: kill shims left running (and their containers), delete
        runc state, shim sockets, netns and the CNI cache of this run."""
        task_dir = self.state / "io.containerd.runtime.v2.task"
        sockets: list[Path] = []
        for address in task_dir.glob("*/*/address"):
            with contextlib.suppress(OSError):
                sockets.append(Path(address.read_text().strip().removeprefix("unix://")))
        shims = self._shims()
        if shims:
            self.cleanup_errors.append(f"{len(shims)} containerd shims left running: killed")
        for shim in shims:
            _kill_tree(shim)
        for binary, state_root in (("runc", self.run_dir / "runc"), ("crun", self.run_dir / "runc-crun")):
            for ns_dir in state_root.glob("*"):
                for container in ns_dir.glob("*"):
                    subprocess.run(
                        [binary, "--root", str(ns_dir), "delete", "--force", container.name],
                        capture_output=True,
                        timeout=30,
                    )
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.unlink()
        if self.pod_network is not None:
            for cached in CNI_RESULTS_DIR.glob(f"{self.pod_network.name}-*"):
                with contextlib.suppress(OSError):
                    cached.unlink()
        for directory in _HOST_DIRS:
            if directory not in self._existed:
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only once empty: another containerd may use it meanwhile

    def stop(self) -> None:
        try:
            proc = self.process
            if self.pod_network is not None and proc is not None and proc.poll() is None:
                self.cleanup_errors += remove_all_pods(self.endpoint)
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
            self._force_cleanup()
            unmount_all_under([self.base, self.run_dir])
            if self.pod_network is not None:
                delete_bridge(self.pod_network.bridge)
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
