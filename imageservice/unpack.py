"""Apply one image layer blob to an empty directory, producing an overlayfs lower layer.

The result matches what containerd's overlayfs snapshotter produces when it applies a
layer to an empty snapshot: AUFS-style whiteouts become overlayfs whiteouts, and
ownership, modes, times, xattrs, links and device nodes are kept as the archive says.

Path policy (an entry that breaks it raises ``HostileContent`` naming blob and entry):

* Entry names and hardlink targets are relative to the layer root. ``.`` components
  (so a leading ``./``) and repeated slashes are dropped. A name that starts with ``/``
  is refused: containerd and Docker strip the slash instead, but layer writers (Docker,
  BuildKit, containerd, GNU tar by default) never store absolute names, so
  one is a sign of a crafted archive and refusing it should cost no real image.
* A ``..`` component is resolved lexically within the name; one that would climb above
  the layer root (``../x``, ``a/../../x``, ``s/../../x``) is refused rather than clamped,
  for the same reason.
* Parent directories are resolved physically, one component at a time with ``lstat``.
  A symlink met on the way is followed as if the process were chrooted into ``dest``:
  an absolute target restarts at ``dest``, a relative one continues from the link's
  directory. A target whose ``..`` would climb above ``dest`` is refused, as is a chain
  of more than ``_MAX_SYMLINK_HOPS`` links. The final component of an entry is never
  followed: files are created with ``O_CREAT|O_EXCL|O_NOFOLLOW``, anything already
  there (including a symlink) is unlinked and replaced, and metadata calls use their
  no-follow forms.
* A hardlink must name a non-directory that an earlier entry of this layer created
  (``dest`` starts empty, so nothing else can be there); it is resolved with the same
  scoped rules, and a target that is a symlink is linked as the symlink itself.
* Names, link targets and xattr names containing NUL, entry types other than regular
  file, directory, symlink, hardlink, character/block device and fifo, and
  ``trusted.overlay.*`` xattrs (overlayfs's private namespace) are refused.

Safety of the path-based writes rests on ``dest`` being private to this call: only this
function modifies it, so a directory verified to be symlink-free stays that way until
this code itself removes something, which drops every cached resolution.

Compressed streams are not length-checked by every decompressor (a truncated zstd
frame ends quietly), so the caller must compare the returned ``diff_id`` with the one
in the image config, as containerd does.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import queue
import shutil
import stat
import tarfile
import threading
import zlib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO, Protocol, Self, cast

import zstandard

from cri_runtime.errors import (
    DataLoss,
    DeadlineExceeded,
    HostileContent,
    Internal,
    InvalidArgument,
    PycriError,
    ResourceExhausted,
    from_os_error,
)

__all__ = ["UnpackResult", "unpack_layer"]

_CHUNK = 1 << 20
# Compressed input is fed to zlib in pieces this big; with max_length capping the output
# at _CHUNK, a larger piece would only be re-copied as unconsumed_tail on every call.
_GZIP_INPUT_CHUNK = 256 << 10
# tarfile's stream reader re-slices its whole buffer on every read, and it reads each
# 512-byte header separately; a small buffer keeps that copying cheap for layers full
# of tiny files while large file bodies still move in _CHUNK pieces.
_TAR_BUFSIZE = 16 << 10
# windowLog 31 is the largest window zstd's --long mode can produce; the decoder only
# allocates what a frame declares, so a generous cap costs nothing for normal layers.
_ZSTD_MAX_WINDOW = 1 << 31
# Linux gives up after 40 links (MAXSYMLINKS); matching it keeps behaviour familiar.
_MAX_SYMLINK_HOPS = 40

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_BZIP2_MAGIC = b"BZh"

_WHITEOUT_PREFIX = ".wh."
_WHITEOUT_META_PREFIX = ".wh..wh."
_OPAQUE_MARKER = ".wh..wh..opq"
_OPAQUE_XATTR = "trusted.overlay.opaque"
_XATTR_PAX_PREFIX = "SCHILY.xattr."

_REGULAR_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE})
_DEVICE_TYPES = {
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}
_KNOWN_TYPES = _REGULAR_TYPES | {tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE} | set(_DEVICE_TYPES)

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NS_MIN, _NS_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class UnpackResult:
    """What one layer produced on disk.

    ``size`` and ``inodes`` describe the resulting tree: an inode shared by hardlinks is
    counted once, and anything a later entry of the same layer replaced is not counted.
    """

    diff_id: str  # "sha256:<hex>" of the uncompressed tar stream, trailing bytes included
    size: int  # bytes of regular-file content
    inodes: int  # files, directories (implied ones too), symlinks, devices, whiteouts


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _CorruptStream(Exception):
    """The blob's compression or tar framing is broken (reported as DataLoss)."""


class _BlobUnreadable(Exception):
    """Reading the blob file itself failed (reported by its errno)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _GzipReader:
    """Multi-member gzip decompressor that hands out up to ``size`` bytes per read.

    gzip.GzipFile feeds zlib 8 KiB at a time, which costs a Python round trip per ~30 KiB
    of output; bigger pieces with a capped output keep memory bounded (a zip bomb yields
    at most ``size`` bytes per call) and the per-call overhead negligible.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""
        self._done = False

    def read(self, size: int = -1, /) -> bytes:
        limit = size if size > 0 else _CHUNK
        while not self._done:
            if self._zlib.eof:
                # Trailing data after a member must be another member (RFC 1952);
                # Go's gzip reader, which containerd uses, rejects anything else too.
                rest = self._zlib.unused_data or self._raw.read(_GZIP_INPUT_CHUNK)
                if not rest:
                    self._done = True
                    break
                self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._pending = rest
            if not self._pending:
                self._pending = self._raw.read(_GZIP_INPUT_CHUNK)
                if not self._pending:
                    raise _CorruptStream("gzip stream ends before its end-of-member marker")
            out = self._zlib.decompress(self._pending, limit)
            self._pending = self._zlib.unconsumed_tail
            if out:
                return out
        return b""


class _HashingReader:
    """File-like view of the decompressed tar stream, hashed as it is produced.

    A helper thread decompresses and hashes up to ``_DEPTH`` chunks ahead of the tar
    parser. zlib, zstd and hashlib release the GIL on large buffers, so on a two-core
    machine this overlaps them with tar parsing and filesystem calls instead of
    adding to them. ``close`` must be called before the blob file is closed.
    """

    _DEPTH = 4

    def __init__(self, source: _Readable) -> None:
        self._source = source
        self._sha = hashlib.sha256()
        self._queue: queue.Queue[bytes | Exception] = queue.Queue(self._DEPTH)
        self._stop = threading.Event()
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._produce, name="unpack-decompress", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        while True:
            item: bytes | Exception
            try:
                item = self._source.read(_CHUNK)
                self._sha.update(item)
            except (EOFError, zlib.error, zstandard.ZstdError) as exc:
                item = _CorruptStream(f"corrupt compressed stream: {exc}")
            except OSError as exc:
                item = _BlobUnreadable(exc)
            except Exception as exc:  # handed to the consumer, which re-raises it
                item = exc
            while not self._stop.is_set():
                try:
                    # A timeout so that close() is noticed even when nobody reads.
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or not isinstance(item, bytes) or not item:
                return

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(_CHUNK), b""))
        while self._pos >= len(self._buf):
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            item = self._queue.get()
            if isinstance(item, Exception):
                self._error = item
                raise item
            if not item:
                self._eof = True
                return b""
            self._buf, self._pos = item, 0
        data = self._buf[self._pos : self._pos + size]
        self._pos += len(data)
        return data

    def hexdigest(self) -> str:
        """Digest of everything decompressed; only meaningful once read() hit EOF."""
        self._thread.join()
        return self._sha.hexdigest()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# Real tarfile classes, just missing from typeshed.
_DAMAGED_HEADER: tuple[type[Exception], ...] = (
    tarfile.TruncatedHeaderError,  # type: ignore[attr-defined]
    tarfile.InvalidHeaderError,  # type: ignore[attr-defined]
)


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo that reports a damaged header instead of treating it as end of archive.

    In stream mode tarfile silently stops at a header with a bad checksum or a short
    read anywhere but offset 0, which would hand back a half-applied layer as success.
    A clean end (zero block or EOF exactly on a header boundary) still ends quietly.
    """

    __slots__ = ()

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except _DAMAGED_HEADER as exc:
            raise _CorruptStream(f"damaged tar header: {exc}") from exc


def _open_decompressed(raw: BinaryIO, digest: str) -> _Readable:
    magic = raw.read(8)
    raw.seek(0)
    if magic.startswith(_GZIP_MAGIC):
        return _GzipReader(raw)
    if magic.startswith(_ZSTD_MAGIC):
        return zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).stream_reader(
            raw, read_size=_CHUNK, read_across_frames=True, closefd=False
        )
    if magic.startswith(_XZ_MAGIC) or magic.startswith(_BZIP2_MAGIC):
        # Neither is an OCI layer media type; a tar parse error would hide the reason.
        raise InvalidArgument(f"layer {digest}: entry '<archive start>': unsupported compression (xz/bzip2)")
    return raw


def _split(name: str) -> tuple[str, ...] | None:
    """Components of ``name`` relative to the layer root, or None if it climbs out."""
    parts: list[str] = []
    for comp in name.split("/"):
        if comp == "" or comp == ".":
            continue
        if comp == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(comp)
    return tuple(parts)


def _time_ns(member: tarfile.TarInfo, key: str, fallback: float) -> int:
    # PAX times are decimal strings with up to nanosecond precision, which the float
    # tarfile keeps would round; parse the original text when there is one.
    text = member.pax_headers.get(key)
    value: Decimal | float = fallback
    if text is not None:
        try:
            value = Decimal(text)
        except InvalidOperation:
            value = fallback
    try:
        ns = int(Decimal(value) * 1_000_000_000)
    except (InvalidOperation, ValueError, OverflowError):
        ns = 0
    return min(max(ns, _NS_MIN), _NS_MAX)


class _Unpacker:
    def __init__(self, root: str, digest: str, cancel: threading.Event | None) -> None:
        self.root = root
        self.digest = digest
        self.cancel = cancel
        self.entry = "<archive start>"
        self.size = 0
        self.inodes = 0
        # Logical parent path -> physical components below root, all verified to be
        # real directories. Cleared whenever anything is removed.
        self._dirs: dict[tuple[str, ...], tuple[str, ...]] = {(): ()}
        # Directory mtimes are applied last: creating children would bump them again.
        self._dir_times: dict[str, tuple[int, int]] = {}

    # -- errors ---------------------------------------------------------------------

    def msg(self, text: str) -> str:
        return f"layer {self.digest}: entry {self.entry!r}: {text}"

    def hostile(self, text: str) -> HostileContent:
        return HostileContent(self.msg(text))

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise DeadlineExceeded(f"unpack of {self.digest} cancelled (at entry {self.entry!r})")

    # -- path resolution ------------------------------------------------------------

    def _path(self, comps: tuple[str, ...] | list[str]) -> str:
        return "/".join((self.root, *comps)) if comps else self.root

    def _names(self, name: str, what: str) -> tuple[str, ...]:
        if "\x00" in name:
            raise self.hostile(f"{what} contains a NUL byte")
        if name.startswith("/"):
            raise self.hostile(f"{what} {name!r} is an absolute path")
        parts = _split(name)
        if parts is None:
            raise self.hostile(f"{what} {name!r} climbs above the layer root")
        return parts

    def resolve_dir(self, parts: tuple[str, ...], *, create: bool) -> tuple[str, ...] | None:
        """Physical location of directory ``parts``, following symlinks chroot-style.

        Missing components are created (0755 root:root) when ``create`` is set,
        otherwise None is returned.
        """
        cached = self._dirs.get(parts)
        if cached is not None:
            return cached
        start = len(parts) - 1
        while parts[:start] not in self._dirs:
            start -= 1
        cur = list(self._dirs[parts[:start]])
        pending = list(reversed(parts[start:]))
        hops = 0
        while pending:
            name = pending.pop()
            if name == "" or name == ".":
                continue
            if name == "..":
                if not cur:
                    raise self.hostile(
                        f"path {'/'.join(parts)!r} goes through a symlink that resolves outside the layer"
                    )
                cur.pop()
                continue
            path = self._path([*cur, name])
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    return None
                self._mkdir_implied(path)
                cur.append(name)
                continue
            if stat.S_ISDIR(st.st_mode):
                cur.append(name)
            elif stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise self.hostile(f"too many levels of symlinks in {'/'.join(parts)!r}")
                target = os.readlink(path)
                if target.startswith("/"):
                    cur = []
                pending.extend(reversed(target.split("/")))
            else:
                if not create:
                    return None
                raise InvalidArgument(self.msg(f"parent {'/'.join(parts)!r} is not a directory"))
        result = tuple(cur)
        self._dirs[parts] = result
        return result

    def _parent_path(self, parts: tuple[str, ...]) -> str:
        comps = self.resolve_dir(parts[:-1], create=True)
        assert comps is not None  # create=True never yields None
        return self._path((*comps, parts[-1]))

    def _mkdir_implied(self, path: str) -> None:
        os.mkdir(path, 0o755)
        # mkdir honours umask and a setgid parent; implied dirs are 0755 root:root.
        os.lchown(path, 0, 0)
        os.chmod(path, 0o755)
        self.inodes += 1

    # -- replacing existing paths ---------------------------------------------------

    def _remove(self, path: str) -> None:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            self._forget_tree(path)
            shutil.rmtree(path)  # fd-based, never follows symlinks
        else:
            self._forget([st])
            os.unlink(path)
        self._dirs = {(): ()}
        prefix = path + "/"
        self._dir_times = {p: t for p, t in self._dir_times.items() if p != path and not p.startswith(prefix)}

    def _forget_tree(self, top: str) -> None:
        stats: list[os.stat_result] = []
        for dirpath, dirnames, filenames in os.walk(top):
            self.inodes -= 1
            for name in (*filenames, *dirnames):
                st = os.lstat(f"{dirpath}/{name}")
                if not stat.S_ISDIR(st.st_mode):
                    stats.append(st)
        self._forget(stats)

    def _forget(self, stats: list[os.stat_result]) -> None:
        """Take removed names out of the accounting; an inode goes with its last name."""
        names: dict[int, tuple[os.stat_result, int]] = {}
        for st in stats:
            names[st.st_ino] = (st, names.get(st.st_ino, (st, 0))[1] + 1)
        for st, count in names.values():
            if count >= st.st_nlink:
                self.inodes -= 1
                if stat.S_ISREG(st.st_mode):
                    self.size -= st.st_size

    # -- metadata -------------------------------------------------------------------

    def _xattrs(self, member: tarfile.TarInfo) -> list[tuple[str, bytes]]:
        out = []
        for key, value in member.pax_headers.items():
            if not key.startswith(_XATTR_PAX_PREFIX):
                continue
            name = key[len(_XATTR_PAX_PREFIX) :]
            if not name or "\x00" in name:
                raise self.hostile(f"invalid xattr name {name!r}")
            if name.startswith("trusted.overlay."):
                raise self.hostile(f"xattr {name!r} is private to overlayfs")
            # tarfile decodes PAX values as UTF-8 with surrogateescape; this restores
            # the exact bytes, which matters for binary values like security.capability.
            out.append((name, value.encode("utf-8", "surrogateescape")))
        return out

    def _set_xattrs(self, target: int | str, member: tarfile.TarInfo) -> None:
        for name, value in self._xattrs(member):
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value)
                else:
                    os.setxattr(target, name, value, follow_symlinks=False)
            except OSError as exc:
                # security.* (SELinux labels, capabilities) may be refused by the host's
                # LSM or filesystem; losing them matches containerd, anything else does not.
                if name.startswith("security.") and exc.errno in (errno.EPERM, errno.ENOTSUP):
                    continue
                raise

    def _times(self, member: tarfile.TarInfo) -> tuple[int, int]:
        mtime = _time_ns(member, "mtime", member.mtime)
        atime = _time_ns(member, "atime", member.mtime) if "atime" in member.pax_headers else mtime
        return (max(atime, mtime), mtime)

    def _finish_meta(self, path: str, member: tarfile.TarInfo, *, symlink: bool) -> None:
        os.lchown(path, member.uid, member.gid)
        if not symlink:
            # After chown, which clears setuid/setgid.
            os.chmod(path, member.mode & 0o7777)
        self._set_xattrs(path, member)
        os.utime(path, ns=self._times(member), follow_symlinks=False)

    # -- entries --------------------------------------------------------------------

    def apply(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = self._names(member.name, "name")
        if _WHITEOUT_META_PREFIX in member.name and any(
            p.startswith(_WHITEOUT_META_PREFIX) for p in parts[:-1]
        ):
            # Contents of AUFS bookkeeping dirs (.wh..wh.plnk/...) are skipped like the dirs.
            return
        if parts and parts[-1].startswith(_WHITEOUT_PREFIX):
            self._whiteout(parts, member)
            return
        if member.type not in _KNOWN_TYPES:
            raise self.hostile(f"unsupported entry type {member.type!r}")
        if not parts:
            if not member.isdir():
                raise InvalidArgument(self.msg("only a directory may stand for the layer root"))
            self._dir_meta(self.root, member)
            return
        if member.type in _REGULAR_TYPES:
            self._regular(tf, parts, member)
        elif member.type == tarfile.DIRTYPE:
            self._directory(parts, member)
        elif member.type == tarfile.SYMTYPE:
            self._symlink(parts, member)
        elif member.type == tarfile.LNKTYPE:
            self._hardlink(parts, member)
        else:
            self._device(parts, member)

    def _regular(self, tf: tarfile.TarFile, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        path = self._parent_path(parts)
        try:
            fd = os.open(path, _CREATE_FLAGS, 0o600)
        except FileExistsError:
            self._remove(path)
            fd = os.open(path, _CREATE_FLAGS, 0o600)
        self.inodes += 1
        try:
            if member.size:
                self._copy(tf, member, fd)
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, member.mode & 0o7777)  # after chown, which clears setuid
            self._set_xattrs(fd, member)
            os.utime(fd, ns=self._times(member))
        finally:
            os.close(fd)

    def _copy(self, tf: tarfile.TarFile, member: tarfile.TarInfo, fd: int) -> None:
        src = cast("io.BufferedReader | None", tf.extractfile(member))
        assert src is not None  # regular members always have a body
        buf = bytearray(min(member.size, _CHUNK))
        view = memoryview(buf)
        written = 0
        with src:
            while True:
                self.check_cancel()
                n = src.readinto(view)
                if not n:
                    break
                chunk = view[:n]
                while chunk:
                    chunk = chunk[os.write(fd, chunk) :]
                written += n
        self.size += written

    def _directory(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        parent = self.resolve_dir(parts[:-1], create=True)
        assert parent is not None
        comps = (*parent, parts[-1])
        path = self._path(comps)
        try:
            os.mkdir(path, 0o700)
            self.inodes += 1
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                self._remove(path)
                os.mkdir(path, 0o700)
                self.inodes += 1
        self._dirs[parts] = comps
        self._dir_meta(path, member)

    def _dir_meta(self, path: str, member: tarfile.TarInfo) -> None:
        os.lchown(path, member.uid, member.gid)
        os.chmod(path, member.mode & 0o7777)
        self._set_xattrs(path, member)
        self._dir_times[path] = self._times(member)

    def _symlink(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        target = member.linkname
        if "\x00" in target:
            raise self.hostile("symlink target contains a NUL byte")
        if not target:
            raise InvalidArgument(self.msg("symlink has an empty target"))
        path = self._parent_path(parts)
        try:
            os.symlink(target, path)
        except FileExistsError:
            self._remove(path)
            os.symlink(target, path)
        self.inodes += 1
        self._finish_meta(path, member, symlink=True)

    def _hardlink(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        target_parts = self._names(member.linkname, "hardlink target")
        if not target_parts:
            raise self.hostile("hardlink target is the layer root")
        target_dir = self.resolve_dir(target_parts[:-1], create=False)
        src = None if target_dir is None else self._path((*target_dir, target_parts[-1]))
        try:
            src_st = os.lstat(src) if src is not None else None
        except FileNotFoundError:
            src_st = None
        if src is None or src_st is None:
            raise self.hostile(f"hardlink target {member.linkname!r} does not exist in this layer")
        if stat.S_ISDIR(src_st.st_mode):
            raise self.hostile(f"hardlink target {member.linkname!r} is a directory")
        path = self._parent_path(parts)
        if path != src:
            try:
                os.link(src, path, follow_symlinks=False)
            except FileExistsError:
                self._remove(path)
                if not os.path.lexists(src):
                    raise self.hostile(
                        f"hardlink target {member.linkname!r} was removed by its own link"
                    ) from None
                os.link(src, path, follow_symlinks=False)
        self._finish_meta(path, member, symlink=stat.S_ISLNK(src_st.st_mode))

    def _device(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        kind = _DEVICE_TYPES[member.type]
        try:
            dev = os.makedev(member.devmajor, member.devminor) if kind != stat.S_IFIFO else 0
        except (OverflowError, ValueError) as exc:
            raise InvalidArgument(self.msg(f"invalid device number: {exc}")) from exc
        path = self._parent_path(parts)
        try:
            os.mknod(path, kind | 0o600, dev)
        except FileExistsError:
            self._remove(path)
            os.mknod(path, kind | 0o600, dev)
        self.inodes += 1
        self._finish_meta(path, member, symlink=False)

    def _whiteout(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        base = parts[-1]
        parent = self.resolve_dir(parts[:-1], create=True)
        assert parent is not None
        parent_path = self._path(parent)
        if base == _OPAQUE_MARKER:
            os.setxattr(parent_path, _OPAQUE_XATTR, b"y", follow_symlinks=False)
            return
        if base.startswith(_WHITEOUT_META_PREFIX):
            # Other AUFS bookkeeping (.wh..wh.plnk, .wh..wh.aufs) means nothing to overlayfs.
            return
        hidden = base[len(_WHITEOUT_PREFIX) :]
        if hidden in ("", ".", ".."):
            raise self.hostile(f"whiteout {base!r} names no sibling")
        path = self._path((*parent, hidden))
        try:
            os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))
        except FileExistsError:
            self._remove(path)
            os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))
        self.inodes += 1
        os.lchown(path, member.uid, member.gid)

    def finish(self) -> None:
        # Deepest first, so that no later step can touch an already-stamped directory.
        for path in sorted(self._dir_times, key=lambda p: p.count("/"), reverse=True):
            os.utime(path, ns=self._dir_times[path], follow_symlinks=False)


_CONTENT_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP, errno.EMLINK, errno.EINVAL})


def _wrap_os_error(unpacker: _Unpacker, exc: OSError) -> PycriError:
    text = unpacker.msg(f"{exc.strerror or exc}")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(text)
    if exc.errno in _CONTENT_ERRNOS:
        return InvalidArgument(text)
    return Internal(text)


def unpack_layer(
    blob_path: Path,
    dest: Path,
    *,
    blob_digest: str,
    cancel: threading.Event | None = None,
) -> UnpackResult:
    """Unpack the layer at ``blob_path`` (gzip, zstd or plain tar) into empty ``dest``.

    Raises HostileContent for entries that break the path policy in the module
    docstring, DataLoss for broken compression or tar framing, InvalidArgument for
    other malformed content, DeadlineExceeded when ``cancel`` is set, and
    ResourceExhausted/Internal for host failures. On error ``dest`` is left partially
    written for the caller to delete.
    """
    # Resolve once so every later path is symlink-free from the filesystem root down.
    root = os.path.realpath(dest)
    unpacker = _Unpacker(root, blob_digest, cancel)
    if not os.path.isdir(root):
        raise InvalidArgument(unpacker.msg(f"destination {str(dest)!r} is not a directory"))
    with os.scandir(root) as it:
        # Hardlinks may only point at what this layer created; that holds only if
        # nothing else was there to begin with.
        if next(it, None) is not None:
            raise InvalidArgument(unpacker.msg(f"destination {str(dest)!r} is not empty"))
    try:
        with open(blob_path, "rb") as raw:
            reader = _HashingReader(_open_decompressed(raw, blob_digest))
            try:
                # "r|" only ever calls read(); the stubs want a full file object.
                with tarfile.open(  # type: ignore[call-overload]
                    fileobj=reader,
                    mode="r|",
                    bufsize=_TAR_BUFSIZE,
                    tarinfo=_StrictTarInfo,
                    errors="surrogateescape",
                ) as tf:
                    while True:
                        unpacker.check_cancel()
                        member = tf.next()
                        if member is None:
                            break
                        # Stream mode never needs earlier members; keeping them all would
                        # cost memory proportional to the entry count.
                        tf.members.clear()
                        unpacker.entry = member.name
                        unpacker.apply(tf, member)
                # Padding after the end-of-archive blocks is part of the diff ID.
                while reader.read(_CHUNK):
                    unpacker.check_cancel()
            finally:
                reader.close()
        unpacker.finish()
    except PycriError:
        raise
    except (_CorruptStream, tarfile.TarError) as exc:
        raise DataLoss(unpacker.msg(f"malformed layer: {exc}")) from exc
    except _BlobUnreadable as exc:
        raise from_os_error(exc.error, unpacker.msg("reading the blob failed")) from exc
    except OverflowError as exc:
        raise InvalidArgument(unpacker.msg(f"value out of range: {exc}")) from exc
    except OSError as exc:
        raise _wrap_os_error(unpacker, exc) from exc
    return UnpackResult(diff_id=f"sha256:{reader.hexdigest()}", size=unpacker.size, inodes=unpacker.inodes)
