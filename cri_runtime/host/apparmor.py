"""AppArmor on this host: is it on, which profiles are loaded, and pycri's default profile.

The kernel says whether AppArmor is on (``/sys/module/apparmor/parameters/enabled`` is "Y") and
lists the loaded profiles, one ``name (mode)`` a line, in securityfs. Profiles are loaded with
``apparmor_parser`` (Debian's ``apparmor`` package). pycri's default profile, ``pycri-default``,
confines a container the way containerd's ``cri-containerd.apparmor.d`` and CRI-O's ``crio-default``
do: everything is allowed but writes to the kernel's knobs in /proc and /sys, mount, and ptrace or
signals that cross the profile's border. It is loaded at start and again whenever a container needs
it and it is gone (an ``apparmor`` service reload or ``aa-teardown`` removes every profile).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import structlog

from cri_runtime.errors import FailedPrecondition

log = structlog.get_logger("pycri.apparmor")

ENABLED = Path("/sys/module/apparmor/parameters/enabled")
PROFILES = Path("/sys/kernel/security/apparmor/profiles")
# Declaring the 3.0 ABI keeps "network," meaning every network rule (unix sockets included) under
# apparmor_parser 4.x as well; older parsers lack the file, and then the profile declares no ABI.
ABI_3 = Path("/etc/apparmor.d/abi/3.0")
DEFAULT_PROFILE = "pycri-default"
PARSER_CANDIDATES = ("apparmor_parser", "/sbin/apparmor_parser", "/usr/sbin/apparmor_parser")
PARSER_TIMEOUT = 60.0

_load_lock = threading.Lock()


def enabled(switch: Path = ENABLED) -> bool:
    """The kernel has AppArmor and it is on."""
    try:
        return switch.read_text().strip() == "Y"
    except OSError:
        return False


def parser() -> str | None:
    """The path of apparmor_parser, or None when it is not installed."""
    for candidate in PARSER_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def loaded_profiles(listing: Path = PROFILES) -> dict[str, str]:
    """The loaded profiles and their modes ("enforce", "complain", ...); empty where AppArmor is off."""
    try:
        text = listing.read_text()
    except OSError:
        return {}
    profiles: dict[str, str] = {}
    for line in text.splitlines():
        # "name (mode)"; a name may itself hold spaces and parentheses, so split at the last " (".
        name, sep, mode = line.rstrip().rpartition(" (")
        if sep and mode.endswith(")"):
            profiles[name] = mode[:-1]
    return profiles


def is_loaded(name: str, listing: Path = PROFILES) -> bool:
    return name in loaded_profiles(listing)


def default_profile_text(name: str = DEFAULT_PROFILE, *, abi_3: bool | None = None) -> str:
    """The source of pycri's default container profile (no includes: it needs nothing from /etc)."""
    if abi_3 is None:
        abi_3 = ABI_3.exists()
    lines = ["abi <abi/3.0>,", ""] if abi_3 else []
    lines += [
        f"profile {name} flags=(attach_disconnected,mediate_deleted) {{",
        # What a container may do at all; the deny rules below take back the dangerous part.
        "  network,",
        "  capability,",
        "  file,",
        "  umount,",
        # Signals: from unconfined host processes (pycri, conmon, kubelet), from the OCI runtimes,
        # and among processes confined by this profile; none to anything outside.
        "  signal (receive) peer=unconfined,",
        "  signal (receive) peer=crun,",
        "  signal (receive) peer=runc,",
        f"  signal (send,receive) peer={name},",
        # ptrace only within the profile (ps, strace of the container's own processes).
        f"  ptrace (trace,read,tracedby,readby) peer={name},",
        "",
        # /proc: no writes to files directly in /proc, nor below anything but /proc/<pid> and
        # /proc/sys, nor in /proc/sys but kernel/shm* (the IPC knobs a pod may own).
        "  deny /proc/* w,",
        "  deny /proc/{[^1-9],[^1-9][^0-9],[^1-9s][^0-9y][^0-9s],[^1-9][^0-9][^0-9][^0-9/]*}/** w,",
        "  deny /proc/sys/[^k]** w,",
        "  deny /proc/sys/kernel/{?,??,[^s][^h][^m]**} w,",
        "  deny /proc/sysrq-trigger rwklx,",
        "  deny /proc/kcore rwklx,",
        "",
        "  deny mount,",
        "",
        # /sys: no writes anywhere but the cgroup file system, and no access at all to firmware,
        # power capping (RAPL energy counters leak what other tenants compute) or the LSMs' files.
        "  deny /sys/[^f]*/** wklx,",
        "  deny /sys/f[^s]*/** wklx,",
        "  deny /sys/fs/[^c]*/** wklx,",
        "  deny /sys/fs/c[^g]*/** wklx,",
        "  deny /sys/fs/cg[^r]*/** wklx,",
        "  deny /sys/firmware/** rwklx,",
        "  deny /sys/devices/virtual/powercap/** rwklx,",
        "  deny /sys/kernel/security/** rwklx,",
        "}",
    ]
    return "\n".join(lines) + "\n"


def load(text: str, what: str) -> None:
    """Load (or replace) a profile with ``apparmor_parser -Kr`` (-K: no cache written to /etc)."""
    binary = parser()
    if binary is None:
        raise FailedPrecondition(
            f"cannot load {what}: apparmor_parser is not installed (apt-get install apparmor)"
        )
    try:
        out = subprocess.run(
            [binary, "-Kr"],
            input=text,
            capture_output=True,
            text=True,
            timeout=PARSER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FailedPrecondition(f"cannot load {what}: {binary}: {exc}") from exc
    if out.returncode != 0:
        raise FailedPrecondition(
            f"cannot load {what}: {binary} -Kr exited {out.returncode}: {out.stderr.strip()}"
        )


def ensure_default(record: Path | None = None) -> bool:
    """Load ``pycri-default`` unless it is loaded already; True when it was loaded now.

    ``record`` (pycri's state directory, which a reboot clears with the kernel's profiles) keeps
    the text pycri last loaded: at start, a loaded profile whose text differs (an older pycri's)
    is replaced. Without it (at container create) a loaded profile is left as it is.
    """
    text = default_profile_text()
    with _load_lock:
        if is_loaded(DEFAULT_PROFILE):
            if record is None:
                return False
            try:
                if record.read_text() == text:
                    return False
            except OSError:
                pass
        load(text, f"AppArmor profile {DEFAULT_PROFILE}")
        log.info("AppArmor profile loaded", profile=DEFAULT_PROFILE)
        if record is not None:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(text)
        return True
