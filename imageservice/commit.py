"""Layers out: a container's overlay upper directory packed as one plain layer tar (a checkpoint's
rootfs diff; a commit's gzip layer and layer directory come from ``imageservice.packer``), the
image config of a commit (the parent's, with ``--change`` instructions, a history entry and the
new diff ID), and a build step's image stacked on its parent.

The plain packer turns overlayfs's own markers back into the OCI forms the unpacker reads:
a whiteout (a character device 0/0) becomes an empty ``.wh.<name>`` file, an opaque
directory (xattr ``trusted.overlay.opaque=y``) gets a ``.wh..wh..opq`` entry. Device nodes,
fifos, symlinks, hard links (one ``LNKTYPE`` entry per extra name), ownership, modes,
times and xattrs (``SCHILY.xattr.*`` PAX records) are kept; overlayfs's private
``trusted.overlay.*`` xattrs are not written. A sparse file's content is kept (its holes read
as zeros), not its holes.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gzip
import hashlib
import json
import os
import re
import shlex
import stat
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cri_runtime.errors import FailedPrecondition, InvalidArgument, from_os_error
from imageservice.db import ImageRecord
from imageservice.packer import PackedLayer
from imageservice.store import Descriptor, ImageStore

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_OVERLAY_XATTR = "trusted.overlay."
_OPAQUE_XATTR = "trusted.overlay.opaque"
# An upper directory with these was written by overlay features pycri does not enable
# (redirect_dir, metacopy); packing it as plain files would give a wrong layer.
_UNSUPPORTED_XATTRS = ("trusted.overlay.redirect", "trusted.overlay.metacopy")
_CHUNK = 1 << 20
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

CHANGE_KEYS = (
    "CMD",
    "ENTRYPOINT",
    "ENV",
    "WORKDIR",
    "USER",
    "LABEL",
    "EXPOSE",
    "STOPSIGNAL",
    "VOLUME",
    "HEALTHCHECK",
    "ONBUILD",
)
# HEALTHCHECK options, as Docker names them, to the image config's Healthcheck keys.
_HEALTH_DURATIONS = {
    "--interval": "Interval",
    "--timeout": "Timeout",
    "--start-period": "StartPeriod",
    "--start-interval": "StartInterval",
}
_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


class _HashingWriter:
    """Hashes what passes through to ``target`` and counts it."""

    def __init__(self, target: BinaryIO | gzip.GzipFile) -> None:
        self.target = target
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        self.target.write(data)
        return len(data)

    def flush(self) -> None:
        self.target.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()


def _xattrs(path: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in names:
        with contextlib.suppress(OSError):
            out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _entries(root: str) -> Iterator[tuple[str, str]]:
    """Depth-first, sorted, each directory before its contents."""
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        yield entry.path, entry.name
        if entry.is_dir(follow_symlinks=False):
            for path, name in _entries(entry.path):
                yield path, f"{entry.name}/{name}"


def pack_upper_plain(upper: Path, target: Path) -> None:
    """Write overlay upper directory ``upper`` to new file ``target`` as an uncompressed layer tar
    (whiteouts as ``.wh.`` entries): a checkpoint archive's rootfs-diff.tar."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    current = str(upper)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        try:
            for current, name in _entries(str(upper)):
                _add(tar, current, name)
        except OSError as exc:
            raise from_os_error(exc, f"cannot read the container's changes at {current}") from exc


def _add(tar: tarfile.TarFile, path: str, name: str) -> None:
    st = os.lstat(path)
    parent, _, base = name.rpartition("/")
    prefix = f"{parent}/" if parent else ""
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        # overlayfs's whiteout: the lower file is deleted.
        info = tarfile.TarInfo(f"{prefix}{WHITEOUT_PREFIX}{base}")
        info.mtime = int(st.st_mtime)
        info.uid, info.gid = st.st_uid, st.st_gid
        tar.addfile(info)
        return
    xattrs = _xattrs(path)
    for key in xattrs:
        if key.startswith(_UNSUPPORTED_XATTRS):
            raise FailedPrecondition(
                f"{name} carries overlay xattr {key}: written by an overlay feature "
                "(redirect_dir/metacopy) that commit cannot turn into a layer"
            )
    info = tar.gettarinfo(path, arcname=name)
    info.uname = info.gname = ""
    info.mtime = int(st.st_mtime)
    pax = dict(info.pax_headers)
    for key, value in xattrs.items():
        if not key.startswith(_OVERLAY_XATTR):
            pax["SCHILY.xattr." + key] = value.decode("utf-8", "surrogateescape")
    info.pax_headers = pax
    if info.isreg():
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW)) as fh:
            tar.addfile(info, fh)
    else:
        tar.addfile(info)
    if info.isdir() and xattrs.get(_OPAQUE_XATTR) == b"y":
        opaque = tarfile.TarInfo(f"{name}/{OPAQUE_MARKER}")
        opaque.mtime = int(st.st_mtime)
        tar.addfile(opaque)


# --- the image config ----------------------------------------------------------


def _json_or_shell(value: str) -> list[str]:
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except ValueError:
            raise InvalidArgument(f"{value!r} is not a JSON array of strings") from None
        if not isinstance(parsed, list) or not all(isinstance(p, str) for p in parsed):
            raise InvalidArgument(f"{value!r} is not a JSON array of strings")
        return parsed
    return ["/bin/sh", "-c", text]


def _pairs(value: str, what: str) -> list[tuple[str, str]]:
    """``K=V K2="v 2"`` (or the old ``K V`` form for one pair)."""
    words = shlex.split(value)
    if not words:
        raise InvalidArgument(f"{what} needs at least one key")
    if "=" not in words[0]:
        key, _, rest = value.strip().partition(" ")
        return [(key, rest.strip())]
    out = []
    for word in words:
        key, sep, val = word.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"{what}: {word!r} is not KEY=VALUE")
        out.append((key, val))
    return out


def _duration_ns(text: str, what: str) -> int:
    """A Go duration (``30s``, ``1m30s``, ``500ms``) in nanoseconds, as Docker stores it."""
    pos, total = 0, 0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += int(float(match.group(1)) * _DURATION_UNITS[match.group(2)])
        pos = match.end()
    if not text or pos != len(text):
        raise InvalidArgument(f"{what}: {text!r} is not a duration such as 30s, 1m30s or 500ms")
    return total


def _healthcheck(value: str, change: str) -> dict:
    """``HEALTHCHECK [--interval=D --timeout=D --start-period=D --start-interval=D --retries=N] CMD
    command`` or ``HEALTHCHECK NONE``, as Docker records it in the image config."""
    rest = value.strip()
    health: dict[str, object] = {}
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        rest = rest.strip()
        name, sep, text = option.partition("=")
        if name in _HEALTH_DURATIONS and sep:
            health[_HEALTH_DURATIONS[name]] = _duration_ns(text, f"HEALTHCHECK {name}")
        elif name == "--retries" and sep and text.isdigit():
            health["Retries"] = int(text)
        else:
            raise InvalidArgument(
                f"--change {change!r}: {option!r} is not one of --interval, --timeout, --start-period, "
                "--start-interval (=DURATION) or --retries (=N)"
            )
    word, _, command = rest.partition(" ")
    if word.upper() == "NONE" and not command.strip() and not health:
        return {"Test": ["NONE"]}
    if word.upper() != "CMD" or not command.strip():
        raise InvalidArgument(f"--change {change!r}: HEALTHCHECK takes [OPTIONS] CMD command, or NONE")
    command = command.strip()
    if command.startswith("["):
        health["Test"] = ["CMD", *_json_or_shell(command)]
    else:
        health["Test"] = ["CMD-SHELL", command]
    return {"Test": health.pop("Test"), **health}


def apply_changes(config: dict, changes: list[str]) -> dict:
    """The runtime config (the ``config`` object of an image config) with Dockerfile-style
    ``changes`` applied: CMD, ENTRYPOINT, ENV, WORKDIR, USER, LABEL, EXPOSE, STOPSIGNAL, VOLUME,
    HEALTHCHECK (the ``Healthcheck`` object) and ONBUILD (appended to ``OnBuild``)."""
    out = copy.deepcopy(config)
    for change in changes:
        keyword, _, value = change.strip().partition(" ")
        keyword = keyword.upper()
        value = value.strip()
        if keyword not in CHANGE_KEYS:
            raise InvalidArgument(
                f"--change {change!r}: {keyword or 'nothing'} is not one of {', '.join(CHANGE_KEYS)}"
            )
        if not value:
            raise InvalidArgument(f"--change {change!r}: {keyword} needs a value")
        if keyword == "CMD":
            out["Cmd"] = _json_or_shell(value)
        elif keyword == "ENTRYPOINT":
            out["Entrypoint"] = _json_or_shell(value)
        elif keyword == "ENV":
            env = [e for e in out.get("Env") or [] if isinstance(e, str)]
            for key, val in _pairs(value, "ENV"):
                env = [e for e in env if e.partition("=")[0] != key] + [f"{key}={val}"]
            out["Env"] = env
        elif keyword == "WORKDIR":
            base = out.get("WorkingDir") or "/"
            out["WorkingDir"] = os.path.normpath(os.path.join(base, value))
        elif keyword == "USER":
            out["User"] = value
        elif keyword == "LABEL":
            labels = dict(out.get("Labels") or {})
            labels.update(_pairs(value, "LABEL"))
            out["Labels"] = labels
        elif keyword == "STOPSIGNAL":
            out["StopSignal"] = value
        elif keyword == "VOLUME":
            volumes = dict(out.get("Volumes") or {})
            paths = _json_or_shell(value) if value.startswith("[") else value.split()
            volumes.update({path: {} for path in paths})
            out["Volumes"] = volumes
        elif keyword == "HEALTHCHECK":
            out["Healthcheck"] = _healthcheck(value, change)
        elif keyword == "ONBUILD":
            trigger = value.split(None, 1)[0].upper()
            if trigger in ("ONBUILD", "FROM", "MAINTAINER"):
                raise InvalidArgument(f"--change {change!r}: ONBUILD cannot trigger {trigger}")
            out["OnBuild"] = [*(out.get("OnBuild") or []), value]
        elif keyword == "EXPOSE":
            ports = dict(out.get("ExposedPorts") or {})
            for port in value.split():
                number, _, proto = port.partition("/")
                if (
                    not number.isdigit()
                    or not 0 < int(number) < 65536
                    or proto not in ("", "tcp", "udp", "sctp")
                ):
                    raise InvalidArgument(f"--change {change!r}: {port!r} is not PORT[/tcp|udp|sctp]")
                ports[f"{number}/{proto or 'tcp'}"] = {}
            out["ExposedPorts"] = ports
    return out


def commit_config(
    parent: dict,
    diff_id: str,
    changes: list[str],
    *,
    comment: str = "",
    author: str = "",
    created_by: str = "pycri commit",
) -> bytes:
    """The committed image's config: ``parent`` plus changes, a history entry and ``diff_id``."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    config = copy.deepcopy(parent)
    config["config"] = apply_changes(parent.get("config") or {}, changes)
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = [*(rootfs.get("diff_ids") or []), diff_id]
    entry: dict[str, str] = {"created": now, "created_by": created_by}
    if comment:
        entry["comment"] = comment
    if author:
        entry["author"] = author
        config["author"] = author
    config["history"] = [*(config.get("history") or []), entry]
    config["created"] = now
    return json.dumps(config, separators=(",", ":")).encode()


def stack_image(
    store: ImageStore,
    parent_text: str,
    names: list[str],
    changes: list[str],
    layer_tar: Path | None,
    *,
    created_by: str,
    cancel: threading.Event | None = None,
) -> ImageRecord:
    """A new image: ``parent_text``'s layers, plus the plain tar ``layer_tar`` as one more layer
    when given (unpacked through the hostile-content path, as any layer), and its config with
    ``changes`` and a history entry (``empty_layer`` when there is no tar). Used by builds."""
    apply_changes({}, changes)
    parent = store.get(parent_text)
    blobs: list[tuple[Descriptor, Path | None]] = [
        (Descriptor("", layer.blob_digest, layer.blob_size), None) for layer in parent.layers
    ]
    config = copy.deepcopy(parent.config)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    config["config"] = apply_changes(parent.config.get("config") or {}, changes)
    entry: dict[str, object] = {"created": now, "created_by": created_by}
    blob = store.tmp_dir / f"stack-{os.urandom(8).hex()}.tar.gz"
    try:
        if layer_tar is not None:
            if not layer_tar.is_file():
                raise InvalidArgument(f"layer {str(layer_tar)!r} is not a file")
            # Stored gzip-compressed like a commit's layer: every registry and runtime takes it.
            packed = gzip_layer(layer_tar, blob)
            rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
            rootfs["diff_ids"] = [*(rootfs.get("diff_ids") or []), packed.diff_id]
            blobs.append((Descriptor(GZIP_LAYER, packed.digest, packed.size), blob))
        else:
            entry["empty_layer"] = True
        config["history"] = [*(config.get("history") or []), entry]
        config["created"] = now
        config_bytes = json.dumps(config, separators=(",", ":")).encode()
        return store.import_image(names, None, config_bytes, blobs, cancel)
    finally:
        blob.unlink(missing_ok=True)


def gzip_layer(source: Path, blob: Path) -> PackedLayer:
    """Compress plain tar ``source`` into new file ``blob``: its digest, diff ID and size."""
    fd = os.open(blob, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as raw, open(source, "rb") as src:
        blob_writer = _HashingWriter(raw)
        with gzip.GzipFile(fileobj=blob_writer, mode="wb", compresslevel=6, mtime=0) as gz:  # type: ignore[arg-type]
            diff_writer = _HashingWriter(gz)
            while chunk := src.read(_CHUNK):
                diff_writer.write(chunk)
    return PackedLayer(blob_writer.digest, diff_writer.digest, blob_writer.size)
