"""Build OCI / Docker images in Python and push them to a registry over the distribution API.

No docker or skopeo: layers are tar files written with :mod:`tarfile` (deterministic: fixed
mtime, explicit owners and modes, stable order), images are JSON built here, and pushes go
through ``/v2/`` with :mod:`http.client` — monolithic blob uploads, manifests by tag or
digest, basic auth and the Docker token flow.

Digests: a layer's ``digest`` is sha256 of the (compressed) blob as stored in the registry;
its ``diff_id`` is sha256 of the uncompressed tar, as listed in the config's rootfs.

Only 127.0.0.1 is ever contacted; the client refuses any other host, including token realms
and redirects, so a test can never reach out by accident.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import http.client
import io
import json
import platform as _platform
import random
import re
import tarfile
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import zstandard

from tests.support.registry import Registry

Compression = Literal["gzip", "zstd", "none"]
ManifestFormat = Literal["oci", "docker"]

# A fixed timestamp for every tar entry and config, so building twice gives the same digests.
MTIME = 1_700_000_000
CREATED = "2023-11-14T22:13:20Z"  # == MTIME

BUSYBOX_PATH = Path("/bin/busybox")

# --- media types ---------------------------------------------------------------------------
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# Not in the schema2 spec, but what moby writes for zstd layers in Docker-format manifests.
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"

ALL_MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)

_LAYER_TYPES: dict[tuple[ManifestFormat, Compression], str] = {
    ("oci", "gzip"): OCI_LAYER_GZIP,
    ("oci", "zstd"): OCI_LAYER_ZSTD,
    ("oci", "none"): OCI_LAYER,
    ("docker", "gzip"): DOCKER_LAYER_GZIP,
    ("docker", "zstd"): DOCKER_LAYER_ZSTD,
    ("docker", "none"): DOCKER_LAYER,
}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Stable JSON bytes, so a document's digest depends only on its content."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def host_architecture() -> str:
    """This machine's architecture in OCI spelling: images default to it so they run here."""
    machine = _platform.machine().lower()
    return {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "armv7l": "arm",
        "s390x": "s390x",
        "ppc64le": "ppc64le",
        "riscv64": "riscv64",
    }.get(machine, machine)


HOST_ARCH = host_architecture()

# ===========================================================================================
# Layers
# ===========================================================================================


@dataclass(frozen=True)
class Layer:
    tar: bytes  # uncompressed tar
    compression: Compression = "gzip"
    # Random (incompressible) data gains nothing from deflate, and level 0 makes the same
    # stored blocks ~15x faster; random_layer uses it. Ordinary layers use gzip's default.
    gzip_level: int = 6

    @cached_property
    def blob(self) -> bytes:
        """The bytes stored in the registry. Deterministic: gzip header mtime is 0."""
        if self.compression == "gzip":
            return gzip.compress(self.tar, compresslevel=self.gzip_level, mtime=0)
        if self.compression == "zstd":
            return zstandard.ZstdCompressor(level=3).compress(self.tar)
        if self.compression == "none":
            return self.tar
        raise ValueError(f"unknown compression {self.compression!r}")

    @cached_property
    def digest(self) -> str:
        return sha256_digest(self.blob)

    @cached_property
    def diff_id(self) -> str:
        return sha256_digest(self.tar)

    @property
    def size(self) -> int:
        return len(self.blob)

    def media_type(self, fmt: ManifestFormat = "oci") -> str:
        return _LAYER_TYPES[(fmt, self.compression)]

    def descriptor(self, fmt: ManifestFormat = "oci") -> dict[str, Any]:
        return {"mediaType": self.media_type(fmt), "digest": self.digest, "size": self.size}

    def names(self) -> list[str]:
        """Entry names in archive order (handy in assertions)."""
        with tarfile.open(fileobj=io.BytesIO(self.tar), mode="r:") as tf:
            return tf.getnames()

    def with_compression(self, compression: Compression) -> Layer:
        return replace(self, compression=compression)


FileType = Literal["file", "dir", "symlink", "hardlink", "chardev", "blockdev", "fifo"]


@dataclass(frozen=True)
class FileSpec:
    """One tar entry. ``mode`` defaults by type: 0644 files, 0755 dirs, 0777 symlinks."""

    content: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    type: FileType = "file"
    target: str = ""  # symlink target, or hardlink target (an earlier entry's name)
    devmajor: int = 0
    devminor: int = 0
    mtime: int = MTIME
    # Extra PAX records, e.g. {"SCHILY.xattr.user.foo": "bar"}.
    pax_headers: Mapping[str, str] = field(default_factory=dict)


def File(content: bytes | str = b"", mode: int = 0o644, uid: int = 0, gid: int = 0) -> FileSpec:
    data = content.encode() if isinstance(content, str) else content
    return FileSpec(content=data, mode=mode, uid=uid, gid=gid)


def Dir(mode: int = 0o755, uid: int = 0, gid: int = 0) -> FileSpec:
    return FileSpec(type="dir", mode=mode, uid=uid, gid=gid)


def Symlink(target: str, uid: int = 0, gid: int = 0) -> FileSpec:
    return FileSpec(type="symlink", target=target, uid=uid, gid=gid)


def Hardlink(target: str) -> FileSpec:
    """A hard link to ``target``, which must be an earlier entry of the same layer."""
    return FileSpec(type="hardlink", target=target.lstrip("/"))


def Whiteout(path: str) -> tuple[str, FileSpec]:
    """``Whiteout("etc/foo")`` -> ("etc/.wh.foo", empty file): deletes etc/foo from lower layers."""
    parent, _, name = path.strip("/").rpartition("/")
    return (f"{parent}/.wh.{name}" if parent else f".wh.{name}", FileSpec())


def _to_spec(name: str, value: FileSpec | bytes | str) -> FileSpec:
    if isinstance(value, FileSpec):
        return value
    if name.endswith("/"):
        return FileSpec(type="dir")
    if isinstance(value, str):
        # "-> target" is shorthand for a symlink; any other string is text content.
        if value.startswith("->"):
            return FileSpec(type="symlink", target=value[2:].strip())
        return FileSpec(content=value.encode("utf-8"))
    return FileSpec(content=bytes(value))


_TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
_DEFAULT_MODES = {"dir": 0o755, "symlink": 0o777}


def _tarinfo(name: str, spec: FileSpec) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = _TAR_TYPES[spec.type]
    info.mode = spec.mode if spec.mode is not None else _DEFAULT_MODES.get(spec.type, 0o644)
    info.uid, info.gid = spec.uid, spec.gid
    # Empty user/group names: the numeric ids are what extraction must honour.
    info.uname = info.gname = ""
    info.mtime = spec.mtime
    if spec.type in ("symlink", "hardlink"):
        info.linkname = spec.target
    if spec.type in ("chardev", "blockdev"):
        info.devmajor, info.devminor = spec.devmajor, spec.devminor
    if spec.type == "file":
        info.size = len(spec.content)
    if spec.pax_headers:
        info.pax_headers = dict(spec.pax_headers)
    return info


def tar_from_entries(entries: Iterable[tuple[str, FileSpec]], *, parents: bool = True) -> bytes:
    """An uncompressed PAX tar of ``entries`` in the given order.

    Names are made relative ("/etc/x" -> "etc/x") the way docker writes layers. With
    ``parents`` every missing parent directory gets a root-owned 0755 entry just before its
    first child; give a directory explicitly (earlier) to choose its mode and owner.
    """
    buf = io.BytesIO()
    seen: set[str] = set()
    written: dict[str, FileSpec] = {}
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tf:
        for raw_name, spec in entries:
            name = raw_name.strip("/")
            if not name:
                continue
            target = written.get(spec.target) if spec.type == "hardlink" else None
            if target is not None:
                # A hard link's header describes the same inode: real tar writers repeat the
                # target's mode and owner, and extractors apply them (docker and containerd do).
                spec = replace(spec, mode=target.mode, uid=target.uid, gid=target.gid)
            written[name] = spec
            if parents:
                parts = name.split("/")
                for i in range(1, len(parts)):
                    parent = "/".join(parts[:i])
                    if parent not in seen:
                        seen.add(parent)
                        tf.addfile(_tarinfo(parent, FileSpec(type="dir")))
            seen.add(name)
            info = _tarinfo(name, spec)
            tf.addfile(info, io.BytesIO(spec.content) if spec.type == "file" else None)
    return buf.getvalue()


def layer_from_files(
    files: Mapping[str, FileSpec | bytes | str] | Iterable[tuple[str, FileSpec | bytes | str]],
    *,
    compression: Compression = "gzip",
    parents: bool = True,
) -> Layer:
    """A deterministic layer from ``{path: content}``.

    Values: ``bytes``/``str`` are file contents; a ``str`` starting with ``"->"`` is a symlink
    (``{"bin/sh": "-> busybox"}``); a key ending in ``/`` is a directory; :class:`FileSpec`
    (or :func:`File`, :func:`Dir`, :func:`Symlink`, :func:`Hardlink`) gives modes, owners,
    devices. Whiteouts are ordinary empty files named ``dir/.wh.name`` or
    ``dir/.wh..wh..opq``. Entries keep the mapping's order, so a hardlink must come after
    its target.
    """
    items = files.items() if isinstance(files, Mapping) else files
    entries = [(name, _to_spec(name, value)) for name, value in items]
    return Layer(tar_from_entries(entries, parents=parents), compression)


BUSYBOX_APPLETS = (
    "sh", "ash", "ls", "cat", "echo", "sleep", "id", "env", "true", "false", "mkdir", "touch",
    "cp", "wc", "head", "tail", "hostname", "rm", "mv", "ln", "chmod", "chown", "chgrp", "stat",
    "ps", "kill", "grep", "sed", "awk", "printf", "pwd", "readlink", "realpath", "test", "[",
    "whoami", "groups", "uname", "date", "sort", "uniq", "tr", "cut", "find", "xargs", "nc",
    "wget", "du", "df", "mount", "umount", "dd", "seq", "yes", "timeout", "tee", "sync",
    "basename", "dirname", "nproc", "cmp", "diff", "od", "sha256sum", "md5sum", "mkfifo", "mknod",
    "ip", "ifconfig", "netstat", "nslookup", "ping", "usleep", "setsid", "nsenter", "unshare",
    "free", "uptime", "tar", "gzip", "gunzip", "zcat", "base64", "expr", "which", "rmdir",
    "truncate", "pidof", "killall", "setpriv", "httpd", "vi", "less", "hexdump", "time",
)  # fmt: skip

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
www-data:x:33:33:www-data:/var/www:/bin/sh
app:x:1002:1002:app:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
# "app" is a member of "grp", so a container running as 1002 gets 1003 as a supplementary
# group (as containerd and CRI-O derive it from /etc/group).
GROUP = """\
root:x:0:
www-data:x:33:
app:x:1002:
grp:x:1003:app
nogroup:x:65534:
"""


@functools.cache
def busybox_layer(compression: Compression = "gzip") -> Layer:
    """A tiny runnable rootfs: static busybox with applets as *hard links* plus users.

    Hard links, not symlinks, so the layer also exercises hardlink extraction and works in
    runtimes that do not follow symlinks for argv[0]. Users: root, www-data (33), app (1002),
    nobody; groups: www-data (33), app (1002), grp (1003, member app), nogroup.
    """
    files: list[tuple[str, FileSpec | bytes | str]] = [
        ("bin/", Dir()),
        ("bin/busybox", File(BUSYBOX_PATH.read_bytes(), mode=0o755)),
    ]
    files += [(f"bin/{applet}", Hardlink("bin/busybox")) for applet in BUSYBOX_APPLETS]
    files += [
        # Scripts say "#!/usr/bin/env sh" often enough to be worth having.
        ("usr/", Dir()),
        ("usr/bin/", Dir()),
        ("usr/bin/env", Hardlink("bin/busybox")),
        ("sbin/", Dir()),
        ("etc/", Dir()),
        ("etc/passwd", PASSWD),
        ("etc/group", GROUP),
        ("tmp/", Dir(0o1777)),
        ("root/", Dir(0o700)),
        ("home/", Dir()),
        ("home/app/", Dir(0o755, uid=1002, gid=1002)),
        ("var/", Dir()),
        ("var/www/", Dir(0o755, uid=33, gid=33)),
        # Mount points every image has; runtimes create them if missing, but real images ship them.
        ("proc/", Dir(0o555)),
        ("sys/", Dir(0o555)),
        ("dev/", Dir()),
    ]
    return layer_from_files(files, compression=compression)


def random_layer(size: int, seed: int, *, files: int = 4, compression: Compression = "gzip") -> Layer:
    """About ``size`` bytes of incompressible content in ``files`` files; same seed, same layer.

    For benchmarks (e.g. 5 layers x 40 MB). gzip level 0 is used: deflate would store random
    data uncompressed anyway, so the blob is realistic and building stays fast.
    """
    rng = random.Random(seed)
    files = max(1, files)
    per_file, rest = divmod(size, files)
    entries: list[tuple[str, FileSpec | bytes | str]] = []
    for i in range(files):
        n = per_file + (1 if i < rest else 0)
        entries.append((f"random/seed-{seed}/file-{i}.bin", rng.randbytes(n)))
    return Layer(tar_from_entries((n, _to_spec(n, v)) for n, v in entries), compression, gzip_level=0)


HostileKind = Literal[
    "abs_path", "dotdot", "symlink_escape", "hardlink_escape", "abs_symlink_escape", "dotdot_nested"
]
HOSTILE_KINDS: tuple[HostileKind, ...] = (
    "abs_path",
    "dotdot",
    "symlink_escape",
    "hardlink_escape",
    "abs_symlink_escape",
    "dotdot_nested",
)


def hostile_layer(kind: HostileKind, *, compression: Compression = "gzip") -> Layer:
    """A layer that tries to write outside the rootfs; an extractor must refuse or contain it.

    Built with :mod:`tarfile` directly (no name normalisation):

    * ``abs_path``: regular file ``/etc/evil-abs``.
    * ``dotdot``: regular file ``../evil``.
    * ``symlink_escape``: symlink ``link -> ../../../../tmp``, then file ``link/evil``.
    * ``hardlink_escape``: hard link ``evil-hardlink`` to ``../../etc/passwd``.
    * ``abs_symlink_escape``: symlink ``link -> /tmp``, then file ``link/evil`` (must land in
      the rootfs' /tmp, not the host's).
    * ``dotdot_nested``: regular file ``a/../../evil``.
    """
    payload = b"pycri hostile layer: this must never appear outside the rootfs\n"

    def reg(name: str) -> tuple[tarfile.TarInfo, bytes]:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(payload), 0o644, MTIME
        return info, payload

    def link(name: str, target: str, typ: bytes) -> tuple[tarfile.TarInfo, bytes]:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode, info.mtime = typ, target, 0o777, MTIME
        return info, b""

    entries: list[tuple[tarfile.TarInfo, bytes]]
    if kind == "abs_path":
        entries = [reg("/etc/evil-abs")]
    elif kind == "dotdot":
        entries = [reg("../evil")]
    elif kind == "dotdot_nested":
        entries = [reg("a/../../evil")]
    elif kind == "symlink_escape":
        entries = [link("link", "../../../../tmp", tarfile.SYMTYPE), reg("link/evil")]
    elif kind == "abs_symlink_escape":
        entries = [link("link", "/tmp", tarfile.SYMTYPE), reg("link/evil")]
    elif kind == "hardlink_escape":
        entries = [link("evil-hardlink", "../../etc/passwd", tarfile.LNKTYPE)]
    else:
        raise ValueError(f"unknown hostile layer kind {kind!r}")
    buf = io.BytesIO()
    # GNU format writes names verbatim; PAX would too, but GNU keeps headers minimal.
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.GNU_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return Layer(buf.getvalue(), compression)


# ===========================================================================================
# Images
# ===========================================================================================

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def image_config(
    *,
    architecture: str = HOST_ARCH,
    os: str = "linux",
    variant: str | None = None,
    env: list[str] | None = None,
    cmd: list[str] | None = None,
    entrypoint: list[str] | None = None,
    user: str | None = None,
    working_dir: str | None = None,
    labels: dict[str, str] | None = None,
    stop_signal: str | None = None,
    exposed_ports: dict[str, dict[str, Any]] | None = None,
    volumes: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An OCI image config without rootfs/history (:class:`Image` fills those from its layers).

    Only the fields given appear in ``config``, so tests can check a runtime's defaults.
    """
    inner: dict[str, Any] = {"Env": env if env is not None else [DEFAULT_PATH]}
    for key, value in (
        ("Cmd", cmd),
        ("Entrypoint", entrypoint),
        ("User", user),
        ("WorkingDir", working_dir),
        ("Labels", labels),
        ("StopSignal", stop_signal),
        ("ExposedPorts", exposed_ports),
        ("Volumes", volumes),
    ):
        if value is not None:
            inner[key] = value
    config: dict[str, Any] = {"created": CREATED, "architecture": architecture, "os": os, "config": inner}
    if variant:
        config["variant"] = variant
    return config


@dataclass
class Image:
    """Layers plus an OCI image config.

    ``config`` is used as given, except that a missing ``rootfs`` is filled with the layers'
    diff_ids and a missing ``history`` with one entry per layer. Give ``rootfs`` yourself to
    build an image whose config lies about its layers.
    """

    layers: list[Layer]
    config: dict[str, Any]
    annotations: dict[str, str] | None = None  # OCI manifest annotations

    @classmethod
    def build(cls, layers: list[Layer], **config: Any) -> Image:
        """``Image.build([busybox_layer()], cmd=["sh"], user="1002")`` — see :func:`image_config`."""
        return cls(list(layers), image_config(**config))

    def full_config(self) -> dict[str, Any]:
        config = dict(self.config)
        config.setdefault("rootfs", {"type": "layers", "diff_ids": [layer.diff_id for layer in self.layers]})
        config.setdefault(
            "history",
            [{"created": CREATED, "created_by": f"pycri tests: layer {i}"} for i in range(len(self.layers))],
        )
        return config

    def config_bytes(self) -> bytes:
        return canonical_json(self.full_config())

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config_bytes())

    def manifest(self, fmt: ManifestFormat = "oci") -> dict[str, Any]:
        config_bytes = self.config_bytes()
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG if fmt == "oci" else DOCKER_CONFIG,
                "digest": sha256_digest(config_bytes),
                "size": len(config_bytes),
            },
            "layers": [layer.descriptor(fmt) for layer in self.layers],
        }
        if self.annotations and fmt == "oci":
            manifest["annotations"] = dict(self.annotations)
        return manifest

    def manifest_bytes(self, fmt: ManifestFormat = "oci") -> bytes:
        return canonical_json(self.manifest(fmt))

    def manifest_digest(self, fmt: ManifestFormat = "oci") -> str:
        return sha256_digest(self.manifest_bytes(fmt))

    def manifest_media_type(self, fmt: ManifestFormat = "oci") -> str:
        return OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST

    def with_platform(self, platform: Mapping[str, Any]) -> Image:
        """A copy whose config's architecture/os/variant/os.version match ``platform``."""
        config = dict(self.config)
        for key in ("architecture", "os", "variant", "os.version", "os.features"):
            if key in platform:
                config[key] = platform[key]
        return Image(list(self.layers), config, self.annotations)

    def with_config(self, **changes: Any) -> Image:
        """A copy with ``config["config"]`` keys replaced, e.g. ``with_config(User="33")``."""
        config = dict(self.config)
        config["config"] = {**config.get("config", {}), **changes}
        return Image(list(self.layers), config, self.annotations)


IndexEntry = tuple[Image, Mapping[str, Any]]


def index_children(
    entries: Iterable[IndexEntry], *, patch_platform: bool = True
) -> list[tuple[Image, dict[str, Any]]]:
    """The images an index will point at (with configs patched to their platform by default)."""
    out = []
    for image, plat in entries:
        out.append((image.with_platform(plat) if patch_platform else image, dict(plat)))
    return out


def index_bytes(
    entries: Iterable[IndexEntry], *, fmt: ManifestFormat = "oci", patch_platform: bool = True
) -> bytes:
    """An OCI image index (``fmt="oci"``) or Docker manifest list (``fmt="docker"``)."""
    manifests = []
    for image, plat in index_children(entries, patch_platform=patch_platform):
        body = image.manifest_bytes(fmt)
        manifests.append(
            {
                "mediaType": image.manifest_media_type(fmt),
                "digest": sha256_digest(body),
                "size": len(body),
                "platform": plat,
            }
        )
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX if fmt == "oci" else DOCKER_MANIFEST_LIST,
            "manifests": manifests,
        }
    )


# ===========================================================================================
# Ready-made images
# ===========================================================================================

# What a correct extraction of multilayer_image() looks like (paths relative to the rootfs).
MULTILAYER_EXPECTED: dict[str, Any] = {
    "files": {
        "etc/app.conf": b"greeting=hello\n",
        "data/hardlink-to-conf": b"greeting=hello\n",
        "data/old/new.txt": b"created after the opaque whiteout\n",
        "data/top.txt": b"top layer\n",
        "home/app/owned.txt": b"owned by app\n",
        "usr/local/bin/suid-tool": b"#!/bin/sh\necho suid\n",
    },
    "absent": ["etc/removed", "data/old/a.txt", "data/old/b.txt", "data/old/sub", "etc/.wh.removed"],
    "symlinks": {"etc/app.conf.link": "app.conf", "data/abs-link": "/etc/app.conf"},
    "hardlinks": [("etc/app.conf", "data/hardlink-to-conf")],
    "modes": {"usr/local/bin/suid-tool": 0o4755, "home/app/owned.txt": 0o600, "tmp": 0o1777},
    "owners": {"home/app/owned.txt": (1002, 1002), "home/app": (1002, 1002)},
    "user": "1002",
    "working_dir": "/data",
}


def multilayer_image(compression: Compression = "gzip") -> Image:
    """busybox + a layer with special files + a top layer with a whiteout and an opaque dir.

    See :data:`MULTILAYER_EXPECTED` for what the merged rootfs must contain.
    """
    files = layer_from_files(
        [
            ("usr/local/bin/suid-tool", File("#!/bin/sh\necho suid\n", mode=0o4755)),
            ("etc/app.conf", "greeting=hello\n"),
            ("etc/removed", "deleted by the top layer's whiteout\n"),
            ("etc/app.conf.link", "-> app.conf"),
            ("data/abs-link", "-> /etc/app.conf"),
            ("data/hardlink-to-conf", Hardlink("etc/app.conf")),
            ("data/old/", Dir()),
            ("data/old/a.txt", "old a\n"),
            ("data/old/b.txt", "old b\n"),
            ("data/old/sub/c.txt", "old c\n"),
            ("home/app/", Dir(0o755, uid=1002, gid=1002)),
            ("home/app/owned.txt", File("owned by app\n", mode=0o600, uid=1002, gid=1002)),
        ],
        compression=compression,
    )
    top = layer_from_files(
        [
            Whiteout("etc/removed"),  # -> etc/.wh.removed
            ("data/old/.wh..wh..opq", b""),
            ("data/old/new.txt", "created after the opaque whiteout\n"),
            ("data/top.txt", "top layer\n"),
        ],
        compression=compression,
    )
    return Image.build(
        [busybox_layer(compression), files, top],
        env=[DEFAULT_PATH, "GREETING=hello", "PYCRI_IMAGE=multilayer"],
        cmd=["/bin/sh", "-c", "cat /etc/app.conf"],
        user="1002",
        working_dir="/data",
        labels={"org.pycri.test": "multilayer"},
        stop_signal="SIGTERM",
    )


USER_IMAGE_USERS = ("www-data", "1003:grp", "1002")


def user_image(user: str, *, cmd: list[str] | None = None) -> Image:
    """busybox with ``USER`` set, running ``id`` by default. Users: see :func:`busybox_layer`."""
    return Image.build([busybox_layer()], user=user, cmd=cmd or ["id"])


def busybox_image(*, cmd: list[str] | None = None, **config: Any) -> Image:
    """Just busybox, ``sh`` by default; ``config`` goes to :func:`image_config`."""
    return Image.build([busybox_layer()], cmd=cmd or ["sh"], **config)


# ===========================================================================================
# Registry client (distribution API v2)
# ===========================================================================================


class RegistryError(RuntimeError):
    def __init__(self, method: str, url: str, status: int, body: bytes) -> None:
        self.method, self.url, self.status, self.body = method, url, status, body
        super().__init__(f"{method} {url} -> {status}: {body[:500]!r}")


@dataclass
class HttpResponse:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


_REPO_IN_PATH = re.compile(r"^/v2/(.+)/(?:blobs|manifests|tags)/")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM.findall(rest))


def _check_loopback(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname != "127.0.0.1":
        raise ValueError(f"refusing to contact {url!r}: tests only talk to http://127.0.0.1")
    return parts


class RegistryClient:
    """A minimal distribution-API client with basic and bearer-token auth.

    Tokens are cached per repository; a 401 with a challenge triggers one token fetch (or
    switches to basic auth) and one retry. Bodies are bytes so a request can be re-sent.
    """

    def __init__(
        self,
        reg: Registry,
        *,
        username: str | None = None,
        password: str | None = None,
        anonymous: bool = False,
    ) -> None:
        """Credentials default to the registry's; ``anonymous=True`` sends none at all."""
        self.reg = reg
        self.username = None if anonymous else (username if username is not None else reg.username)
        self.password = None if anonymous else (password if password is not None else reg.password)
        self._auth_by_repo: dict[str, str] = {}
        self._basic = False
        self.token_fetches = 0

    # --- plumbing ---------------------------------------------------------------------------

    def _basic_header(self) -> str | None:
        if self.username is None:
            return None
        creds = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(creds).decode("ascii")

    @staticmethod
    def raw(
        method: str, url: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> HttpResponse:
        """One HTTP exchange to 127.0.0.1, no auth, no redirects."""
        parts = _check_loopback(url)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=60)
        try:
            hdrs = dict(headers or {})
            if body is not None:
                hdrs.setdefault("Content-Length", str(len(body)))
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return HttpResponse(resp.status, resp.headers, data)
        finally:
            conn.close()

    def fetch_token(self, challenge: Mapping[str, str]) -> str:
        realm = challenge.get("realm")
        if not realm:
            raise ValueError(f"bearer challenge without realm: {challenge}")
        params = {k: challenge[k] for k in ("service", "scope") if challenge.get(k)}
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(params)
        headers = {}
        basic = self._basic_header()
        if basic:
            headers["Authorization"] = basic
        resp = self.raw("GET", url, headers=headers)
        if resp.status != 200:
            raise RegistryError("GET", url, resp.status, resp.body)
        self.token_fetches += 1
        doc = json.loads(resp.body)
        token = doc.get("token") or doc.get("access_token")
        if not token:
            raise RegistryError("GET", url, resp.status, b"token response without token: " + resp.body)
        return str(token)

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        expect: Iterable[int] | None = (200,),
        follow_redirects: bool = True,
    ) -> HttpResponse:
        """An authenticated request; raises :class:`RegistryError` unless status is in ``expect``.

        ``expect=None`` returns any status.
        """
        url = path_or_url if "://" in path_or_url else self.reg.url + path_or_url
        match = _REPO_IN_PATH.match(urllib.parse.urlsplit(url).path)
        repo = match.group(1) if match else ""
        resp: HttpResponse | None = None
        redirected = False
        for _hop in range(6):
            for attempt in range(2):
                hdrs = dict(headers or {})
                auth = self._auth_by_repo.get(repo) or (self._basic_header() if self._basic else None)
                # Never send registry credentials to a redirect target.
                if auth and not redirected:
                    hdrs["Authorization"] = auth
                resp = self.raw(method, url, body, hdrs)
                if resp.status != 401 or attempt == 1:
                    break
                challenge = resp.header("WWW-Authenticate")
                if not challenge:
                    break
                scheme, params = parse_challenge(challenge)
                if redirected:
                    break
                if scheme == "basic":
                    if self.username is None:
                        break
                    self._basic = True
                elif scheme == "bearer":
                    self._auth_by_repo[repo] = "Bearer " + self.fetch_token(params)
                else:
                    break
            assert resp is not None
            # Blob GETs may redirect (S3-style storage); the location carries its own auth,
            # so follow without ours — and only to loopback (checked in raw()).
            if follow_redirects and resp.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
                location = resp.header("Location")
                if location:
                    url = urllib.parse.urljoin(url, location)
                    redirected = True
                    continue
            break
        assert resp is not None
        if expect is not None and resp.status not in set(expect):
            raise RegistryError(method, url, resp.status, resp.body)
        return resp

    # --- API ----------------------------------------------------------------------------------

    def blob_exists(self, repo: str, digest: str) -> bool:
        resp = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", expect=(200, 404))
        return resp.status == 200

    def push_blob(self, repo: str, data: bytes, *, check_exists: bool = True) -> str:
        """Monolithic upload: POST to open a session, PUT the whole blob with ?digest=."""
        digest = sha256_digest(data)
        if check_exists and self.blob_exists(repo, digest):
            return digest
        start = self.request("POST", f"/v2/{repo}/blobs/uploads/", body=b"", expect=(202,))
        location = start.header("Location")
        if not location:
            raise RegistryError("POST", f"/v2/{repo}/blobs/uploads/", start.status, b"no Location header")
        # The location may be relative and already carries _state in its query.
        url = urllib.parse.urljoin(self.reg.url + "/", location)
        url += ("&" if "?" in url else "?") + "digest=" + urllib.parse.quote(digest, safe="")
        done = self.request(
            "PUT", url, body=data, headers={"Content-Type": "application/octet-stream"}, expect=(201,)
        )
        stored = done.header("Docker-Content-Digest")
        if stored and stored != digest:
            raise RegistryError("PUT", url, done.status, f"registry says {stored}, we sent {digest}".encode())
        return digest

    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        resp = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{ref}",
            body=body,
            headers={"Content-Type": media_type},
            expect=(201,),
        )
        digest = sha256_digest(body)
        stored = resp.header("Docker-Content-Digest")
        if stored and stored != digest:
            raise RegistryError(
                "PUT",
                f"/v2/{repo}/manifests/{ref}",
                resp.status,
                f"registry says {stored}, body is {digest}".encode(),
            )
        return digest

    def get_manifest(
        self, repo: str, ref: str, *, accept: Iterable[str] = ALL_MANIFEST_TYPES
    ) -> tuple[bytes, str, str | None]:
        """(body, Content-Type, Docker-Content-Digest header)."""
        resp = self.request("GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": ", ".join(accept)})
        return resp.body, resp.header("Content-Type") or "", resp.header("Docker-Content-Digest")

    def get_blob(self, repo: str, digest: str) -> bytes:
        return self.request("GET", f"/v2/{repo}/blobs/{digest}").body

    def delete_manifest(self, repo: str, digest: str) -> None:
        self.request("DELETE", f"/v2/{repo}/manifests/{digest}", expect=(202,))

    def push_image(self, repo: str, tag: str | None, image: Image, *, fmt: ManifestFormat = "oci") -> str:
        for layer in image.layers:
            self.push_blob(repo, layer.blob)
        self.push_blob(repo, image.config_bytes())
        body = image.manifest_bytes(fmt)
        return self.put_manifest(repo, tag or sha256_digest(body), body, image.manifest_media_type(fmt))

    def push_index(
        self,
        repo: str,
        tag: str | None,
        entries: Iterable[IndexEntry],
        *,
        fmt: ManifestFormat = "oci",
        patch_platform: bool = True,
    ) -> str:
        entries = list(entries)
        # The registry refuses an index whose children it does not have: push them first.
        for image, _plat in index_children(entries, patch_platform=patch_platform):
            self.push_image(repo, None, image, fmt=fmt)
        body = index_bytes(entries, fmt=fmt, patch_platform=patch_platform)
        media_type = OCI_INDEX if fmt == "oci" else DOCKER_MANIFEST_LIST
        return self.put_manifest(repo, tag or sha256_digest(body), body, media_type)


# --- module-level conveniences (one client per call) -------------------------------------------


def push_blob(reg: Registry, repo: str, data: bytes) -> str:
    return RegistryClient(reg).push_blob(repo, data)


def push_image(
    reg: Registry, repo: str, tag: str | None, image: Image, *, fmt: ManifestFormat = "oci"
) -> str:
    """Push layers, config and manifest; returns the manifest digest. ``tag=None`` pushes by digest."""
    return RegistryClient(reg).push_image(repo, tag, image, fmt=fmt)


def push_index(
    reg: Registry,
    repo: str,
    tag: str | None,
    entries: Iterable[IndexEntry],
    *,
    fmt: ManifestFormat = "oci",
    patch_platform: bool = True,
) -> str:
    """Push an OCI index / Docker manifest list and its children; returns the index digest.

    Each child image's config gets the architecture/os/variant of its platform entry unless
    ``patch_platform=False`` (use that to test a config that disagrees with its index).
    """
    return RegistryClient(reg).push_index(repo, tag, entries, fmt=fmt, patch_platform=patch_platform)


def push_raw_manifest(reg: Registry, repo: str, ref: str, body: bytes, media_type: str) -> str:
    """PUT arbitrary manifest bytes; returns sha256 of ``body``.

    docker-registry validates what it stores (referenced blobs must exist, JSON must parse),
    so it raises :class:`RegistryError` for documents it refuses: very hostile manifests need
    a fake server instead.
    """
    return RegistryClient(reg).put_manifest(repo, ref, body, media_type)
