"""`pycri check`: a node preflight run before kubelet starts.

Every check runs, so one run names every missing piece; each problem carries what to do
about it. A FAIL means pycri cannot run (the exit code is then 1); a WARN means it runs with
less (no crun, no shared PID namespaces, no recursive read-only mounts, ...).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cri_runtime.daemon.config import Config
from cri_runtime.errors import PycriError
from cri_runtime.host import apparmor, idmap, selinux, systemd
from cri_runtime.oci import conmon, podinit
from cri_runtime.oci import runtimes as oci_runtimes
from cri_runtime.runtime import checkpoint

OK, WARN, FAIL = "ok", "warn", "FAIL"
# The paths pycri runs these from.
CONMON = conmon.CONMON
CATATONIT = podinit.CATATONIT
NAMESPACES = ("mnt", "net", "ipc", "uts", "pid")
# Used only when a pod or container asks for them.
OPTIONAL_NAMESPACES = ("user", "cgroup")
# Without these, kubelet's resource requests and limits cannot be applied.
REQUIRED_CONTROLLERS = ("cpu", "memory", "pids")
# Filesystems an overlay upper directory cannot live on.
NO_OVERLAY_UPPER = {"overlay", "aufs", "nfs", "nfs4", "cifs", "smb3", "fuse", "fuseblk", "9p", "vboxsf"}


@dataclass(frozen=True)
class Finding:
    level: str  # OK, WARN or FAIL
    area: str
    what: str
    fix: str = ""


@dataclass(frozen=True)
class Host:
    """Where the checks look; tests point it at fakes."""

    proc: Path = Path("/proc")
    cgroup_root: Path = Path("/sys/fs/cgroup")
    root: Path = Path("/")  # where /run/systemd/system says whether systemd booted the host
    kubelet_config: Path = Path("/var/lib/kubelet/config.yaml")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _kernel_version(release: str) -> tuple[int, int]:
    parts = release.split("-")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return 0, 0


def _run_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"? ({exc})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


# --- kernel ------------------------------------------------------------------------


def check_kernel(host: Host = Host(), release: str | None = None) -> list[Finding]:
    found: list[Finding] = []
    release = release or os.uname().release
    filesystems = {line.split()[-1] for line in _read(host.proc / "filesystems").splitlines() if line.strip()}
    if "overlay" in filesystems:
        found.append(Finding(OK, "kernel", "overlayfs is available"))
    else:
        found.append(
            Finding(
                FAIL,
                "kernel",
                "overlayfs is not in /proc/filesystems (container root filesystems are overlay mounts)",
                "modprobe overlay; echo overlay > /etc/modules-load.d/pycri.conf",
            )
        )
    missing = [ns for ns in NAMESPACES if not (host.proc / "self" / "ns" / ns).exists()]
    if missing:
        found.append(
            Finding(
                FAIL,
                "kernel",
                f"namespaces not available: {', '.join(missing)}",
                "use a kernel built with CONFIG_NAMESPACES and "
                + " ".join(f"CONFIG_{n.upper()}_NS" for n in missing),
            )
        )
    else:
        found.append(Finding(OK, "kernel", f"namespaces: {' '.join(NAMESPACES)}"))
    optional = [ns for ns in OPTIONAL_NAMESPACES if not (host.proc / "self" / "ns" / ns).exists()]
    if optional:
        found.append(
            Finding(
                WARN,
                "kernel",
                f"namespaces not available: {', '.join(optional)} (pods asking for them fail)",
                "use a kernel built with " + " ".join(f"CONFIG_{n.upper()}_NS" for n in optional),
            )
        )
    max_userns = _read(host.proc / "sys" / "user" / "max_user_namespaces").strip()
    if max_userns == "0":
        found.append(
            Finding(
                WARN,
                "kernel",
                "user namespaces are disabled (user.max_user_namespaces = 0): pods asking for one fail",
                "sysctl -w user.max_user_namespaces=15000 (and in /etc/sysctl.d/)",
            )
        )
    if _kernel_version(release) >= (5, 12):
        found.append(Finding(OK, "kernel", f"mount_setattr available (kernel {release})"))
    else:
        found.append(
            Finding(
                WARN,
                "kernel",
                f"kernel {release} is older than 5.12: no mount_setattr, so no recursive read-only mounts",
                "upgrade the kernel (Debian 12's 6.1 has it) to get recursiveReadOnly mounts",
            )
        )
    found += check_cgroups(host)
    return found


def _cgroup_layout(host: Host) -> tuple[str, set[str], set[str]]:
    """("v2" | "v1" | "hybrid", controllers usable for pods, controllers on the v2 mount of a hybrid)."""
    root_controllers = _read(host.cgroup_root / "cgroup.controllers")
    if (host.cgroup_root / "cgroup.controllers").exists():
        return "v2", set(root_controllers.split()), set()
    v1: set[str] = set()
    for line in _read(host.proc / "cgroups").splitlines()[1:]:
        fields = line.split()
        if len(fields) == 4 and fields[3] == "1" and fields[1] != "0":
            v1.add(fields[0])
    unified = host.cgroup_root / "unified" / "cgroup.controllers"
    if unified.exists():
        return "hybrid", v1, set(_read(unified).split())
    return "v1", v1, set()


def check_cgroups(host: Host = Host()) -> list[Finding]:
    if not host.cgroup_root.is_dir() or not any(host.cgroup_root.iterdir()):
        return [
            Finding(
                FAIL,
                "cgroups",
                f"no cgroup filesystem mounted on {host.cgroup_root}",
                f"mount -t cgroup2 none {host.cgroup_root}",
            )
        ]
    version, controllers, on_unified = _cgroup_layout(host)
    found: list[Finding] = []
    shown = " ".join(sorted(controllers)) or "none"
    extra = f"; on the cgroup2 mount: {' '.join(sorted(on_unified))}" if on_unified else ""
    found.append(Finding(OK, "cgroups", f"cgroup {version}, controllers: {shown}{extra}"))
    missing = [c for c in REQUIRED_CONTROLLERS if c not in controllers]
    if missing:
        fix = (
            f"enable them for children: echo '{' '.join('+' + c for c in missing)}' > "
            f"{host.cgroup_root}/cgroup.subtree_control"
            if version == "v2"
            else f"mount them, e.g. mkdir {host.cgroup_root}/{missing[0]} && "
            f"mount -t cgroup -o {missing[0]} cgroup {host.cgroup_root}/{missing[0]}"
        )
        found.append(
            Finding(
                FAIL, "cgroups", f"controllers missing: {', '.join(missing)} (pod resources need them)", fix
            )
        )
    return found


# --- binaries ----------------------------------------------------------------------


def check_binaries(
    config: Config, runtimes: dict[str, oci_runtimes.RuntimeInfo] | None = None
) -> list[Finding]:
    found: list[Finding] = []
    runtimes = oci_runtimes.detect() if runtimes is None else runtimes
    for info in runtimes.values():
        if info.usable:
            found.append(Finding(OK, "runtime", f"{info.name}: {info.path} ({info.version})"))
        else:
            found.append(Finding(WARN, "runtime", f"{info.name} cannot run here: {info.reason}"))
    default, why = oci_runtimes.choose_default(config.default_runtime, runtimes)
    if default is None:
        found.append(Finding(FAIL, "runtime", why, f"apt-get install {' '.join(oci_runtimes.CANDIDATES)}"))
    elif default.name != config.default_runtime:
        found.append(
            Finding(
                WARN,
                "runtime",
                why,
                f"fix {config.default_runtime} (above) or set default_runtime = {default.name!r}",
            )
        )
    if os.access(CONMON, os.X_OK):
        found.append(Finding(OK, "monitor", f"conmon: {CONMON} ({_run_version([CONMON, '--version'])})"))
    else:
        found.append(
            Finding(
                FAIL,
                "monitor",
                f"conmon is not installed at {CONMON} (every container needs it)",
                "apt-get install conmon",
            )
        )
    if os.access(CATATONIT, os.X_OK):
        found.append(
            Finding(OK, "monitor", f"catatonit: {CATATONIT} ({_run_version([CATATONIT, '--version'])})")
        )
    else:
        found.append(
            Finding(
                WARN,
                "monitor",
                f"catatonit is not installed at {CATATONIT}: pods that share a PID namespace fail",
                "apt-get install catatonit",
            )
        )
    iptables = shutil.which("iptables") or next(
        (p for p in ("/usr/sbin/iptables", "/sbin/iptables") if os.access(p, os.X_OK)), None
    )
    if iptables:
        found.append(Finding(OK, "network", f"iptables: {iptables}"))
    else:
        found.append(
            Finding(
                WARN,
                "network",
                "iptables is not installed: hostPort mappings (portmap) fail",
                "apt-get install iptables",
            )
        )
    return found


# --- network -----------------------------------------------------------------------


def check_network(config: Config) -> list[Finding]:
    from cri_runtime.errors import PycriError
    from cri_runtime.network.cni import CNI

    network = config.network
    try:
        cni = CNI(
            Path(network.conf_dir),
            [Path(d) for d in network.bin_dirs],
            Path(config.state) / "cni",
            builtin_subnet=network.pod_subnet,
            builtin_bridge=network.bridge,
        )
    except PycriError as exc:
        return [Finding(FAIL, "network", str(exc), "fix [network] in the configuration file")]
    ready, message = cni.ready()
    if not ready:
        fix = (
            "apt-get install containernetworking-plugins, or list the plugins' directory in network.bin_dirs"
            if "lacks plugins" in message
            else f"fix or remove the config in {network.conf_dir}"
        )
        return [Finding(FAIL, "network", message, fix)]
    found = [Finding(OK, "network", message)]
    if "built-in" in message:
        found.append(
            Finding(
                OK,
                "network",
                f"no CNI config in {network.conf_dir}: pods use pycri's bridge {network.bridge} "
                f"on {network.pod_subnet} (manifests/10-pycri.conflist is an example to install)",
            )
        )
    bridge = cni.find_plugin("bridge")
    if bridge is not None:
        found.append(Finding(OK, "network", f"CNI plugins in {bridge.parent}"))
    return found


# --- socket and directories ----------------------------------------------------------


def _mounts(proc: Path) -> list[tuple[str, str]]:
    """(mount point, filesystem type) from mountinfo, in mount order."""
    out: list[tuple[str, str]] = []
    for line in _read(proc / "self" / "mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and right:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            out.append((point, right.split()[0]))
    return out


def filesystem_type(path: Path, proc: Path = Path("/proc")) -> str:
    """The type of the filesystem holding ``path`` (the last mount over its longest prefix)."""
    best, kind = "", "?"
    text = str(path)
    for point, fstype in _mounts(proc):
        if (text == point or text.startswith(point.rstrip("/") + "/") or point == "/") and len(point) >= len(
            best
        ):
            best, kind = point, fstype
    return kind


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _try_trusted_xattr(directory: Path) -> str:
    """Empty when a trusted.* xattr can be set on a file in ``directory``, else why not."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".pycri-check-")
    except OSError as exc:
        return f"cannot create a file: {exc.strerror}"
    try:
        os.setxattr(fd, "trusted.pycri.check", b"1")
        return ""
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
        os.unlink(name)


def check_directory(label: str, path: Path, overlay_upper: bool, proc: Path = Path("/proc")) -> list[Finding]:
    if not path.is_absolute():
        return [
            Finding(
                FAIL, "paths", f"{label} {path} is not an absolute path", f"set --{label} to an absolute path"
            )
        ]
    existing = _existing_ancestor(path)
    if not existing.is_dir():
        return [
            Finding(FAIL, "paths", f"{label} {path}: {existing} is not a directory", f"remove {existing}")
        ]
    where = str(path) if existing == path else f"{path} (to be created in {existing})"
    if not os.access(existing, os.W_OK | os.X_OK):
        return [Finding(FAIL, "paths", f"{label} {where} is not writable", "run pycri as root")]
    fstype = filesystem_type(existing.resolve(), proc)
    if overlay_upper and fstype in NO_OVERLAY_UPPER:
        return [
            Finding(
                FAIL,
                "paths",
                f"{label} {where} is on {fstype}, which cannot hold overlay upper directories",
                f"put --{label} on a local filesystem (ext4, xfs, btrfs, tmpfs)",
            )
        ]
    why = _try_trusted_xattr(existing)
    if why:
        level = FAIL if overlay_upper else WARN
        return [
            Finding(
                level,
                "paths",
                f"{label} {where} ({fstype}): trusted.* xattrs do not work ({why}); "
                "overlay whiteouts and opaque directories need them",
                f"run as root and put --{label} on a filesystem with xattrs (ext4, xfs, btrfs, tmpfs)",
            )
        ]
    return [Finding(OK, "paths", f"{label} {where} ({fstype}, writable, trusted xattrs)")]


def check_socket(path: Path) -> list[Finding]:
    if not path.is_absolute():
        return [Finding(FAIL, "paths", f"socket {path} is not an absolute path", "use --socket /abs/path")]
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            return [Finding(FAIL, "paths", f"socket {path} exists and is not a socket", f"remove {path}")]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            try:
                sock.connect(str(path))
            except OSError:
                return [Finding(OK, "paths", f"socket {path} is stale (nobody listens): pycri replaces it")]
        return [
            Finding(
                WARN,
                "paths",
                f"socket {path} is live: a runtime already serves there, a second pycri would be refused",
                "stop it (systemctl stop pycri) or pass another --socket",
            )
        ]
    parent = _existing_ancestor(path.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return [
            Finding(FAIL, "paths", f"socket directory {path.parent} is not writable", "run pycri as root")
        ]
    return [Finding(OK, "paths", f"socket {path} can be created")]


def check_privileges() -> list[Finding]:
    if os.geteuid() == 0:
        return [Finding(OK, "host", "running as root")]
    return [
        Finding(
            FAIL, "host", "not running as root: pycri mounts, creates namespaces and cgroups", "run as root"
        )
    ]


def _kubelet_driver(path: Path) -> str | None:
    """kubelet's cgroupDriver from its KubeletConfiguration file, if there is one that says."""
    found = re.search(r"^cgroupDriver:\s*[\"']?(\w+)", _read(path), re.MULTILINE)
    return found.group(1) if found else None


def check_config(config: Config, host: Host = Host(), bus: systemd.SystemdBus | None = None) -> list[Finding]:
    """The cgroup version, the driver in use, whether systemd answers, and kubelet's driver."""
    version = _cgroup_layout(host)[0] if host.cgroup_root.is_dir() else "none"
    booted = systemd.systemd_running(host.root)
    found: list[Finding] = []
    reachable = why = ""
    if config.cgroup_driver == "systemd" or booted:
        bus = bus or systemd.SystemdBus(timeout=5.0)
        try:
            reachable = f"systemd {bus.version()} answers over D-Bus"
        except PycriError as exc:
            why = str(exc)
        finally:
            bus.close()
    if config.cgroup_driver == "systemd":
        if not booted:
            found.append(
                Finding(
                    FAIL,
                    "config",
                    f"{systemd.MISSING_SYSTEMD_WHAT} (cgroup {version})",
                    systemd.MISSING_SYSTEMD_FIX,
                )
            )
        elif not reachable:
            found.append(
                Finding(FAIL, "config", f"cgroup_driver = systemd, but {why}", systemd.MISSING_BUS_FIX)
            )
        else:
            found.append(
                Finding(
                    OK,
                    "config",
                    f"cgroup {version}, driver systemd, {reachable} (kubelet: cgroupDriver: systemd)",
                )
            )
    else:
        on = f"; {reachable}" if reachable else "; systemd is not running" if not booted else ""
        found.append(
            Finding(OK, "config", f"cgroup {version}, driver cgroupfs{on} (kubelet: cgroupDriver: cgroupfs)")
        )
    kubelet = _kubelet_driver(host.kubelet_config)
    if kubelet is not None and kubelet != config.cgroup_driver:
        found.append(
            Finding(
                FAIL,
                "config",
                f"kubelet's cgroupDriver is {kubelet} ({host.kubelet_config}) but pycri's cgroup_driver is "
                f"{config.cgroup_driver}: pods would be refused",
                f'set cgroup_driver = "{kubelet}" in /etc/pycri/pycri.toml, or cgroupDriver: '
                f"{config.cgroup_driver} in kubelet's configuration",
            )
        )
    return found


def check_platform(config: Config) -> list[Finding]:
    from cri_runtime.errors import PycriError
    from imageservice.platform import host_platform

    machine = os.uname().machine
    try:
        platform = host_platform(config.image.platform)
    except PycriError as exc:
        return [Finding(FAIL, "images", str(exc), 'set image.platform, e.g. "linux/s390x"')]
    source = "image.platform" if config.image.platform else f"machine {machine}"
    return [Finding(OK, "images", f"pulls {platform} manifests ({source})")]


# --- confinement (AppArmor, SELinux) ----------------------------------------------------


def check_confinement() -> list[Finding]:
    """Which LSM confinement containers get here, and whether pycri's AppArmor profile is loaded."""
    found: list[Finding] = []
    if not apparmor.enabled():
        found.append(
            Finding(
                OK,
                "lsm",
                "AppArmor is not enabled: containers run without an AppArmor profile; "
                "Localhost AppArmor profiles are refused",
            )
        )
    else:
        parser = apparmor.parser()
        mode = apparmor.loaded_profiles().get(apparmor.DEFAULT_PROFILE)
        profile = (
            f"{apparmor.DEFAULT_PROFILE} loaded ({mode})"
            if mode
            else f"{apparmor.DEFAULT_PROFILE} not loaded yet (pycri loads it at start)"
        )
        if parser is None:
            level = WARN if mode else FAIL
            found.append(
                Finding(
                    level,
                    "lsm",
                    f"AppArmor is enabled, apparmor_parser is missing; {profile}: containers "
                    "under the default profile are refused while it is not loaded",
                    "apt-get install apparmor",
                )
            )
        else:
            found.append(Finding(OK, "lsm", f"AppArmor is enabled ({parser}); {profile}"))
    if selinux.enabled():
        state = "enforcing" if selinux.enforcing() else "permissive"
        found.append(
            Finding(OK, "lsm", f"SELinux is enabled ({state}): containers get process and mount labels")
        )
    else:
        found.append(Finding(OK, "lsm", "SELinux is not enabled: containers get no SELinux labels"))
    return found


def check_checkpoint(config: Config) -> list[Finding]:
    """Whether CheckpointContainer and restores can work here (CRIU and the runtime's support)."""
    status = checkpoint.criu_status()
    if not status.available:
        fix = (
            "apt-get install criu"
            if "not installed" in status.reason
            else "a kernel or criu version that pass criu check"
        )
        return [Finding(WARN, "checkpoint", f"checkpointing is not available: {status.reason}", fix)]
    return [
        Finding(
            OK,
            "checkpoint",
            f"CRIU works ({status.reason}); archives go under {config.checkpoint_dir} "
            "(runc; crun only when built with +CRIU)",
        )
    ]


def run_checks(config: Config, host: Host = Host()) -> list[Finding]:
    found = check_privileges() + check_config(config, host) + check_platform(config) + check_kernel(host)
    found += check_binaries(config)
    found += check_confinement()
    found += check_checkpoint(config)
    found += check_network(config)
    found += check_socket(config.socket_path)
    found += check_directory("root", Path(config.root), overlay_upper=True, proc=host.proc)
    found += check_directory("state", Path(config.state), overlay_upper=False, proc=host.proc)
    found += check_user_namespaces(config)
    return found


def check_user_namespaces(config: Config) -> list[Finding]:
    """Whether pods with a user namespace (KEP-127) can run: the file system of the root directory
    (image layers) must take idmapped mounts, and the pod's root must be able to walk to them."""
    root = Path(config.root)
    why = idmap.support(root)
    if why:
        return [
            Finding(
                WARN,
                "userns",
                f"the file system of {root} cannot be idmapped ({why}): pods with a user namespace "
                "are refused (FailedPrecondition) and Status does not advertise user_namespaces",
                "keep the root directory on a file system that supports idmapped mounts "
                "(ext4, xfs, btrfs, tmpfs on Linux 5.12+/6.3+)",
            )
        ]
    for directory in (root, Path(config.state)):
        closed = idmap.unsearchable(directory)
        if closed is not None:
            return [
                Finding(
                    WARN,
                    "userns",
                    f"{closed} is not searchable by others: pods with a user namespace are refused",
                    f"chmod o+x {closed}",
                )
            ]
    return [
        Finding(OK, "userns", f"user namespaces: {root} can be idmapped (mount_setattr MOUNT_ATTR_IDMAP)")
    ]


def report(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"{f.level:<4}  {f.area:<8} {f.what}")
        if f.fix and f.level != OK:
            lines.append(f"{'':<4}  {'':<8}   -> {f.fix}")
    failures = sum(f.level == FAIL for f in findings)
    warnings = sum(f.level == WARN for f in findings)
    if failures:
        lines.append(f"pycri cannot run here: {failures} problem(s), {warnings} warning(s)")
    else:
        lines.append(f"pycri can run here ({warnings} warning(s))")
    return "\n".join(lines) + "\n"


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.level == FAIL for f in findings) else 0
