"""Container checkpoint and restore (KEP-2008), in the archive format CRI-O and containerd write.

A checkpoint archive is an uncompressed tar holding (names from checkpointctl's ``metadata``):
``config.dump`` (who the container was: its ID, name, image), ``spec.dump`` (its OCI spec),
``checkpoint/`` (CRIU's images, written by ``<runtime> checkpoint``), ``rootfs-diff.tar`` (the
writable layer's changes as an OCI layer: overlay whiteouts become ``.wh.`` entries),
``deleted.files`` (the paths those whiteouts delete, as CRI-O lists them) and ``container.log``.

CRIU does the dump and the restore through the OCI runtime. Whether it can work on this host is
asked once (``criu check``) and the answer kept: a kernel CRIU cannot handle makes every
checkpoint FailedPrecondition with CRIU's own words.

A restore archive comes from outside and is treated as hostile: only plain files and directories
under relative, non-climbing names are unpacked, the layer changes go through the image layer
unpacker, and an archive for another architecture or without its metadata is refused before
anything is made.

A checkpoint OCI image (CRI-O's way to ship a checkpoint through a registry; made by
``checkpointctl build``, buildah, or ``pycri checkpoint-image``) is one whose manifest carries
the annotation ``io.kubernetes.cri-o.annotations.checkpoint.name``; its content is an archive's
members at the root. A restore from one mounts the image read-only from the store for as long
as it takes to copy the CRIU images and unpack the rootfs diff, under the same rules.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from cri_runtime.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PycriError,
    from_os_error,
)
from cri_runtime.host import freezer, mounts
from cri_runtime.oci.conmon import Executor
from cri_runtime.runtime.state import Container

if TYPE_CHECKING:
    from cri_runtime.runtime.containers import ContainerManager
    from imageservice.store import ImageStore
from imageservice.checkpoint_image import CHECKPOINT_NAME_ANNOTATION
from imageservice.commit import pack_upper_plain
from imageservice.db import ImageRecord
from imageservice.platform import host_platform
from imageservice.unpack import unpack_layer

log = structlog.get_logger("pycri.checkpoint")

CONFIG_DUMP = "config.dump"
SPEC_DUMP = "spec.dump"
CHECKPOINT_DIRECTORY = "checkpoint"
ROOTFS_DIFF_TAR = "rootfs-diff.tar"
DELETED_FILES = "deleted.files"
CONTAINER_LOG = "container.log"
DUMP_LOG = "dump.log"

CRIU = "criu"
CRIU_CHECK_TIMEOUT = 30.0
# CRI's timeout 0: no deadline of the caller's; this bounds the dump all the same.
DEFAULT_TIMEOUT = 300.0
# A restore archive bigger than this (unpacked) is refused: it is read onto the node's disk.
MAX_RESTORE_BYTES = 64 << 30
MAX_METADATA_BYTES = 16 << 20  # config.dump, spec.dump
_RUNTIME_CALL_SLACK = 1.0


@dataclass(frozen=True)
class CriuStatus:
    available: bool
    reason: str  # why not, in CRIU's own words; or its version when available


_criu_lock = threading.Lock()
_criu_status: CriuStatus | None = None


def _check_criu(binary: str = CRIU) -> CriuStatus:
    path = shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        return CriuStatus(False, "criu is not installed (apt-get install criu)")
    try:
        result = subprocess.run(
            [path, "check"],
            capture_output=True,
            text=True,
            timeout=CRIU_CHECK_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return CriuStatus(False, f"criu check did not finish within {CRIU_CHECK_TIMEOUT:g}s")
    except OSError as exc:
        return CriuStatus(False, f"cannot run {path}: {exc.strerror}")
    said = " ".join(line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip())
    if result.returncode != 0:
        return CriuStatus(False, f"criu check says: {said or f'exit code {result.returncode}'}")
    return CriuStatus(True, said or "criu check passed")


def criu_status(refresh: bool = False) -> CriuStatus:
    """``criu check``'s verdict, asked once per process (it takes a second and cannot change
    without a new kernel or package)."""
    global _criu_status
    with _criu_lock:
        if _criu_status is None or refresh:
            _criu_status = _check_criu()
        return _criu_status


def runtime_checkpoint_support(executor: Executor) -> str:
    """Empty when ``executor``'s runtime can checkpoint and restore, else why not."""
    if executor.runtime_name != "crun":
        return ""  # runc always has checkpoint/restore; it needs only the criu binary
    try:
        result = subprocess.run(
            [executor.runtime_path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot ask crun for its features: {exc}"
    if "+CRIU" not in result.stdout:
        return "this crun is built without CRIU support (its --version lists no +CRIU); use runc"
    return ""


def require_available(executor: Executor) -> None:
    status = criu_status()
    if not status.available:
        raise FailedPrecondition(f"checkpointing is not available on this node: {status.reason}")
    why = runtime_checkpoint_support(executor)
    if why:
        raise FailedPrecondition(
            f"checkpointing is not available with runtime {executor.runtime_name}: {why}"
        )


# --- checkpoint -------------------------------------------------------------------------


def validate_location(location: str, allowed_dir: Path) -> Path:
    """The archive path a caller asked for: absolute, inside ``allowed_dir`` (no climbing, no
    symbolic link on the way out), its directory present, the file itself not."""
    if not location:
        raise InvalidArgument("checkpoint location is empty")
    if "\0" in location or not os.path.isabs(location):
        raise InvalidArgument(f"checkpoint location {location!r} must be an absolute path")
    allowed = os.path.realpath(allowed_dir)
    target = Path(os.path.normpath(location))
    parent = os.path.realpath(target.parent)
    if parent != allowed and not parent.startswith(allowed.rstrip("/") + "/"):
        raise InvalidArgument(
            f"checkpoint location {location!r} is outside the checkpoint directory {allowed} "
            "(checkpoint_dir in the configuration)"
        )
    if not os.path.isdir(parent):
        raise InvalidArgument(
            f"checkpoint location {location!r}: directory {str(target.parent)!r} does not exist"
        )
    resolved = Path(parent) / target.name
    if os.path.lexists(resolved):
        raise AlreadyExists(f"checkpoint location {location!r} exists already")
    return resolved


@dataclass(frozen=True)
class CheckpointRequest:
    container_id: str
    location: str
    timeout: float = 0.0  # seconds; 0: DEFAULT_TIMEOUT
    rpc_remaining: float | None = None  # what is left of the caller's gRPC deadline, if it set one


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded(f"checkpoint did not finish in time ({what})")
    return left


def _runtime_checkpoint(executor: Executor, container: Container, work: Path, deadline: float) -> None:
    images = work / CHECKPOINT_DIRECTORY
    images.mkdir(mode=0o700)
    argv = [
        executor.runtime_path,
        "--root",
        str(executor.runtime_root),
        *executor.cgroup_driver.runtime_args,
        "checkpoint",
        "--image-path",
        str(images),
        "--work-path",
        str(work),
        "--leave-running",
        container.id,
    ]
    timeout = _remaining(deadline, "before the CRIU dump")
    try:
        # A session of its own: on the deadline the runtime and the criu it started go together.
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
    except OSError as exc:
        raise from_os_error(exc, f"cannot run {executor.runtime_name} checkpoint") from exc
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_dump(process, container)
        raise DeadlineExceeded(
            f"{executor.runtime_name} checkpoint of {container.id} did not finish within {timeout:.1f}s: "
            "the dump was stopped and the container left running"
        ) from None
    except BaseException:
        _stop_dump(process, container)
        raise
    if process.returncode != 0:
        detail = (stderr or stdout).strip()
        dump_log = work / DUMP_LOG
        with contextlib.suppress(OSError):
            tail = dump_log.read_text(errors="replace").strip().splitlines()[-5:]
            detail += " | dump.log: " + " / ".join(tail)
        raise FailedPrecondition(f"{executor.runtime_name} checkpoint of {container.id} failed: {detail}")


def _stop_dump(process: subprocess.Popen[str], container: Container) -> None:
    """Kill a dump still running (the runtime and its criu, one process group) and thaw the
    container, which CRIU freezes through its cgroup while it dumps: it goes on running."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    try:
        process.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # a pipe held open by something that left the group
        process.kill()
        process.wait()
    try:
        directory, v2 = freezer.freezer_dir(container.pid)
        freezer.thaw(directory, v2)
    except PycriError as exc:
        log.warning("cannot thaw the container after a stopped dump", id=container.id, error=str(exc))
    log.warning("checkpoint dump stopped on its deadline", id=container.id)


def _deleted_files(upper: Path) -> list[str]:
    """The paths overlay whiteouts in ``upper`` delete, "/"-rooted as CRI-O lists them."""
    found = []
    for directory, dirs, files in os.walk(upper):
        for name in [*files, *dirs]:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if (st.st_mode & 0o170000) == 0o020000 and st.st_rdev == 0:
                found.append("/" + os.path.relpath(path, upper))
    return sorted(found)


def _config_dump(container: Container, now_ns: int) -> dict:
    return {
        "id": container.id,
        "name": container.name,
        "rootfsImage": container.image,
        "rootfsImageRef": container.image_id,
        "rootfsImageName": container.image,
        "OCIRuntime": container.runtime,
        "createdTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(container.created_at_ns / 1e9)),
        "checkpointedTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now_ns / 1e9)),
        "restoredTime": "0001-01-01T00:00:00Z",
        "restored": False,
        # pycri's own: a restore on another architecture cannot work.
        "architecture": host_platform().architecture,
    }


def write_archive(container: Container, executor: Executor, target: Path, deadline: float) -> None:
    """Dump ``container`` (left running) and write its archive at ``target`` (which must not
    exist); on any failure nothing is left at ``target`` or beside it."""
    work = target.parent / f".{target.name}.pycri-{uuid.uuid4().hex[:12]}"
    work.mkdir(mode=0o700)
    partial = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        (work / SPEC_DUMP).write_bytes(container.bundle_dir.joinpath("config.json").read_bytes())
        (work / CONFIG_DUMP).write_text(json.dumps(_config_dump(container, time.time_ns())))
        _runtime_checkpoint(executor, container, work, deadline)
        # After the dump, so the files match the memory image as closely as a running
        # container allows (CRI-O's order).
        upper = Path(container.dir) / "upper"
        _remaining(deadline, "before the rootfs diff")
        pack_upper_plain(upper, work / ROOTFS_DIFF_TAR)
        (work / DELETED_FILES).write_text(json.dumps(_deleted_files(upper)))
        if container.log_path and os.path.isfile(container.log_path):
            shutil.copyfile(container.log_path, work / CONTAINER_LOG)
        _remaining(deadline, "before the archive")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with (
            os.fdopen(fd, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for entry in sorted(work.iterdir()):
                tar.add(entry, arcname=entry.name, recursive=True)
            raw.flush()
            os.fsync(raw.fileno())
        _remaining(deadline, "before the archive was in place")
        # link, not rename: refuses to replace a file that appeared meanwhile.
        try:
            os.link(partial, target)
        except FileExistsError:
            raise AlreadyExists(f"checkpoint location {str(target)!r} appeared meanwhile") from None
    except OSError as exc:
        raise from_os_error(exc, f"cannot write the checkpoint of {container.id}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        shutil.rmtree(work, ignore_errors=True)


def checkpoint_container(containers: ContainerManager, request: CheckpointRequest, allowed_dir: Path) -> Path:
    """CheckpointContainer: the archive of running container ``request.container_id`` at
    ``request.location``; the container keeps running."""
    budget = request.timeout if request.timeout > 0 else DEFAULT_TIMEOUT
    if request.rpc_remaining is not None:
        # Answer before the caller gives up, so that what it gets is the truth: nothing left.
        budget = min(budget, request.rpc_remaining - _RUNTIME_CALL_SLACK)
    deadline = time.monotonic() + budget
    target = validate_location(request.location, allowed_dir)
    container = containers.get(request.container_id)
    with containers.locks.hold(container.id):
        if containers.find(container.id) is not container:
            raise NotFound(f"container {request.container_id!r} not found (removed meanwhile)")
        if container.pending in ("creating", "removing"):
            raise FailedPrecondition(f"container {container.id} is being {container.pending[:-3]}ed")
        if container.state != "running" or not container.pid:
            raise FailedPrecondition(
                f"container {container.id} is {container.state}; only a running one is checkpointed"
            )
        executor = containers.executor(container)
        require_available(executor)
        started = time.monotonic()
        write_archive(container, executor, target, deadline)
    log.info(
        "container checkpointed",
        id=container.id,
        location=str(target),
        bytes=target.stat().st_size,
        seconds=round(time.monotonic() - started, 3),
    )
    return target


# --- restore ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreSource:
    """A checkpoint archive unpacked (its metadata checked) into ``directory``."""

    directory: Path
    image: str  # the image the checkpointed container ran: its ID
    image_name: str
    spec: dict

    @property
    def members(self) -> Path:
        """The archive's members, as unpacked."""
        return self.directory / "archive"

    @property
    def images(self) -> Path:
        return self.members / CHECKPOINT_DIRECTORY

    @property
    def upper(self) -> Path:
        """The checkpointed writable layer, unpacked: the new container's upper directory."""
        return self.directory / "upper"


def is_archive_reference(image: str) -> bool:
    """CRI-O's rule: an image.image naming an existing file is a checkpoint archive."""
    return image.startswith("/") and os.path.isfile(image)


def _member_path(dest: str, name: str) -> str:
    cleaned = name.removeprefix("./").rstrip("/")
    parts = cleaned.split("/")
    if not cleaned or name.startswith("/") or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise InvalidArgument(f"checkpoint archive entry {name!r} is not allowed (absolute or climbing)")
    return os.path.join(dest, *parts)


def _extract(archive: Path, dest: Path) -> None:
    total = 0
    root = os.path.realpath(dest)
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for member in tar:
                path = _member_path(root, member.name)
                if member.isdir():
                    os.makedirs(path, mode=0o700, exist_ok=True)
                    continue
                if not member.isreg():
                    raise InvalidArgument(
                        f"checkpoint archive entry {member.name!r} is not a plain file or directory"
                    )
                total += member.size
                if total > MAX_RESTORE_BYTES:
                    raise InvalidArgument(
                        f"checkpoint archive unpacks to more than {MAX_RESTORE_BYTES} bytes"
                    )
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                # O_EXCL|O_NOFOLLOW: a name given twice or a planted link cannot redirect a write.
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                source = tar.extractfile(member)
                assert source is not None
                with os.fdopen(fd, "wb") as out, source:
                    shutil.copyfileobj(source, out, 1 << 20)
    except tarfile.TarError as exc:
        raise InvalidArgument(f"checkpoint archive {str(archive)!r} is not a readable tar: {exc}") from None
    except FileExistsError as exc:
        raise InvalidArgument(f"checkpoint archive names {exc.filename!r} twice") from None


def open_archive(archive: Path, dest: Path) -> RestoreSource:
    """Unpack and check checkpoint ``archive`` into new directory ``dest``; InvalidArgument
    (and ``dest`` removed) for anything corrupt, hostile or made for another architecture."""
    dest.mkdir(mode=0o700)
    members = dest / "archive"
    members.mkdir(mode=0o700)
    try:
        _extract(archive, members)
        return _open_members(members, dest, f"checkpoint archive {str(archive)!r}")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def is_checkpoint_image(record: ImageRecord) -> bool:
    """CRI-O's rule: an image whose manifest carries the checkpoint name annotation is a
    checkpoint image (its content: a checkpoint archive's members at its root)."""
    return CHECKPOINT_NAME_ANNOTATION in record.annotations


def open_image(store: ImageStore, record: ImageRecord, dest: Path) -> RestoreSource:
    """Check checkpoint image ``record`` and take what a restore needs from its content, mounted
    read-only from the store for the while (the CRIU images copied, the rootfs diff unpacked,
    nothing else read), into new directory ``dest``; InvalidArgument (and ``dest`` removed)
    for anything missing, hostile or made for another architecture."""
    what = f"checkpoint image {(record.repo_tags or record.repo_digests or [record.id])[0]}"
    here = host_platform().architecture
    arch = record.config.get("architecture") or here
    if arch != here:
        raise InvalidArgument(f"{what} is for {arch}; this node is {here}")
    dest.mkdir(mode=0o700)
    content = dest / "image"
    try:
        content.mkdir(mode=0o700)
        (dest / "archive").mkdir(mode=0o700)
        chains = store.hold_layers(record.id)
        try:
            mounts.mount_layers_readonly(store.layer_dirs(record.id), content)
            try:
                return _open_members(content, dest, what)
            finally:
                mounts.unmount(content)
        finally:
            store.release_layers(chains)
    except BaseException:
        if not mounts.mounts_under(content):  # never remove through a mount still there
            shutil.rmtree(dest, ignore_errors=True)
        raise


def _read_member(root: Path, name: str, what: str) -> bytes:
    """Member ``name`` of checkpoint content ``root``: a plain file (a link is not followed)."""
    try:
        fd = os.open(root / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InvalidArgument(f"{what} has no {name}") from None
    except OSError as exc:
        raise InvalidArgument(
            f"{what}: {name} cannot be read ({exc.strerror}); it must be a plain file"
        ) from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{what}: {name} is not a plain file")
        if st.st_size > MAX_METADATA_BYTES:
            raise InvalidArgument(f"{what}: {name} is larger than {MAX_METADATA_BYTES} bytes")
        return fh.read(MAX_METADATA_BYTES + 1)


def _json_member(root: Path, name: str, what: str) -> dict:
    data = _read_member(root, name, what)
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what}: metadata is not JSON: {name}: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what}: metadata is not a JSON object: {name}")
    return value


def _open_members(root: Path, dest: Path, what: str) -> RestoreSource:
    """Check the checkpoint members under ``root`` (an unpacked archive, or a checkpoint image's
    mounted content) and make the restore's own copy in ``dest``: the CRIU images under
    ``dest/archive/checkpoint`` and the rootfs diff unpacked as ``dest/upper``."""
    config = _json_member(root, CONFIG_DUMP, what)
    spec = _json_member(root, SPEC_DUMP, what)
    here = host_platform().architecture
    arch = config.get("architecture") or here
    if arch != here:
        raise InvalidArgument(f"{what} was made on {arch}; this node is {here}")
    image = config.get("rootfsImageRef") or config.get("rootfsImage")
    if not isinstance(image, str) or not image:
        raise InvalidArgument(f"{what}: {CONFIG_DUMP} names no rootfsImage")
    images = root / CHECKPOINT_DIRECTORY
    try:
        images_are_a_directory = stat.S_ISDIR(os.lstat(images).st_mode)
    except FileNotFoundError:
        images_are_a_directory = False
    if not images_are_a_directory:
        raise InvalidArgument(f"{what} has no {CHECKPOINT_DIRECTORY}/ (CRIU images)")
    source = RestoreSource(dest, image, str(config.get("rootfsImageName") or image), spec)
    if images != source.images:
        _copy_plain_tree(images, source.images, what)
    diff = root / ROOTFS_DIFF_TAR
    try:
        diff_mode: int | None = os.lstat(diff).st_mode
    except FileNotFoundError:
        diff_mode = None
    if diff_mode is not None and not stat.S_ISREG(diff_mode):
        raise InvalidArgument(f"{what}: {ROOTFS_DIFF_TAR} is not a plain file")
    _unpack_rootfs_diff(diff, source.upper, keep=images != source.images)
    return source


def _copy_plain_tree(source: Path, target: Path, what: str) -> None:
    """Copy directory ``source`` (checkpoint content from an image: links are not followed,
    anything but plain files and directories refused) to new directory ``target``."""
    total = 0
    target.mkdir(mode=0o700)
    for directory, dirs, files in os.walk(source):
        relative = os.path.relpath(directory, source)
        out = target if relative == "." else target / relative
        for name in [*dirs, *files]:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            shown = os.path.join(CHECKPOINT_DIRECTORY, os.path.relpath(path, source))
            if stat.S_ISDIR(st.st_mode):
                (out / name).mkdir(mode=0o700)
                continue
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"{what}: {shown!r} is not a plain file or directory")
            total += st.st_size
            if total > MAX_RESTORE_BYTES:
                raise InvalidArgument(
                    f"{what}: {CHECKPOINT_DIRECTORY}/ holds more than {MAX_RESTORE_BYTES} bytes"
                )
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as src:
                out_fd = os.open(
                    out / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
                )
                with os.fdopen(out_fd, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)


def _unpack_rootfs_diff(diff: Path, upper: Path, *, keep: bool = False) -> None:
    """The checkpointed writable layer into new directory ``upper``, through the image layer
    unpacker's hostile-content rules (the whiteouts become overlay whiteouts again); ``diff``
    removed afterwards unless ``keep`` (an image's, read where it is mounted)."""
    upper.mkdir(mode=0o755)
    if not diff.is_file():
        return
    try:
        unpack_layer(diff, upper, blob_digest=f"checkpoint {ROOTFS_DIFF_TAR}")
    except PycriError as exc:
        raise InvalidArgument(f"checkpoint archive {ROOTFS_DIFF_TAR}: {exc}") from exc
    if not keep:
        diff.unlink()
