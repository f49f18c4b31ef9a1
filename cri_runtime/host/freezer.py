"""The cgroup freezer: hold a container's processes still while its files are read (commit --pause).

The cgroup is found from the container's process (``/proc/<pid>/cgroup``), so it works for the
cgroupfs and systemd drivers alike: cgroup v2 writes ``cgroup.freeze``, v1 ``freezer.state``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

from cri_runtime.errors import DeadlineExceeded, FailedPrecondition, from_os_error
from cri_runtime.host.cgroups import CGROUP_ROOT, is_cgroup2_only

log = structlog.get_logger("pycri.freezer")

FREEZE_TIMEOUT = 10.0


def _cgroups_of(pid: int) -> dict[str, str]:
    """controller (``""`` for the v2 hierarchy) -> cgroup path, from /proc/<pid>/cgroup."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError as exc:
        raise FailedPrecondition(f"process {pid} is gone: cannot find its cgroup") from exc
    out: dict[str, str] = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            out[controller] = path
    return out


def freezer_dir(pid: int) -> tuple[Path, bool]:
    """The cgroup directory to freeze ``pid`` with, and whether it is cgroup v2."""
    groups = _cgroups_of(pid)
    if "freezer" in groups and not is_cgroup2_only():
        return CGROUP_ROOT / "freezer" / groups["freezer"].lstrip("/"), False
    if "" in groups:
        base = CGROUP_ROOT if is_cgroup2_only() else CGROUP_ROOT / "unified"
        return base / groups[""].lstrip("/"), True
    raise FailedPrecondition(f"no cgroup freezer for process {pid}")


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise from_os_error(exc, f"cannot write {value!r} to {path}") from exc


def _frozen(directory: Path, v2: bool) -> bool:
    if v2:
        events = (directory / "cgroup.events").read_text()
        return "frozen 1" in events.splitlines()
    return (directory / "freezer.state").read_text().strip() == "FROZEN"


def freeze(directory: Path, v2: bool, timeout: float = FREEZE_TIMEOUT) -> None:
    _write(directory / ("cgroup.freeze" if v2 else "freezer.state"), "1" if v2 else "FROZEN")
    deadline = time.monotonic() + timeout
    while not _frozen(directory, v2):
        if time.monotonic() > deadline:
            thaw(directory, v2)
            raise DeadlineExceeded(f"cgroup {directory} did not freeze within {timeout:g}s")
        time.sleep(0.01)


def thaw(directory: Path, v2: bool) -> None:
    _write(directory / ("cgroup.freeze" if v2 else "freezer.state"), "0" if v2 else "THAWED")


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[Path]:
    """Freeze the cgroup of ``pid`` for the block; thawed afterwards, on error too."""
    directory, v2 = freezer_dir(pid)
    freeze(directory, v2)
    try:
        yield directory
    finally:
        try:
            thaw(directory, v2)
        except Exception as exc:  # the cgroup may be gone with its container
            log.warning("cannot thaw cgroup", cgroup=str(directory), error=str(exc))
