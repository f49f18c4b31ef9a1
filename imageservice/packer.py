"""One pass over a container's overlay upper directory: the OCI layer blob (gzip tar) with both of
its digests, and, when asked, the store's layer directory for it written at the same time.

A commit used to write the blob, then read it back through the hostile-tar unpacker into the
store: a second full pass (decompress, parse, write, hash). Here the walk that produces the tar
stream also writes each entry into the new layer directory, exactly as ``imageservice.unpack``
would have made it from that stream (the layer's files match its diff ID):

* a whiteout (char device 0/0) is a ``.wh.<name>`` entry in the tar and a 0/0 device in the
  layer; an opaque directory (``trusted.overlay.opaque=y``) gets a ``.wh..wh..opq`` entry and
  keeps the xattr; overlayfs's other ``trusted.overlay.*`` xattrs are dropped from both;
* ownership, modes, whole-second mtimes (atime = mtime), xattrs, symlinks, hard links (later
  names ``LNKTYPE`` of the first), device nodes and fifos are kept; a sparse file's content is
  kept, holes read as zeros, as the unpacker writes it; sockets are skipped, as tar does.

The rules of hostile content hold for this trusted walk too: the source is read through
directory file descriptors, one component at a time with ``O_NOFOLLOW`` (a container that swaps
a directory for a symlink mid-commit gets an error, never the host's files); names come from
``readdir`` (no ``/``, no ``..``), so nothing is written outside the new layer directory, which is
private to this call; files are created ``O_EXCL|O_NOFOLLOW``.

Compression is gzip level 6 (``tar -czf``'s), done the way pigz does it: 1 MiB blocks deflated on
a pool of threads (zlib releases the GIL), each primed with the previous block's last 32 KiB and
ended with a sync flush, so the blocks form one ordinary deflate stream in one gzip member.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import stat
import struct
import tarfile
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cri_runtime.errors import DeadlineExceeded, FailedPrecondition, from_os_error

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_OVERLAY_XATTR = "trusted.overlay."
_OPAQUE_XATTR = "trusted.overlay.opaque"
# An upper directory with these was written by overlay features pycri does not enable
# (redirect_dir, metacopy); packing it as plain files would give a wrong layer.
_UNSUPPORTED_XATTRS = ("trusted.overlay.redirect", "trusted.overlay.metacopy")
_XATTR_PAX_PREFIX = "SCHILY.xattr."

_CHUNK = 1 << 20
_BLOCK = 1 << 20  # deflate block handed to a worker
_DICT = 32 * 1024  # deflate's window: what a block is primed with
_LEVEL = 6
_WORKERS = 2
_AHEAD = 6  # blocks compressed or waiting to be written, at most
# gzip member header: magic, deflate, no flags, mtime 0, no extra flags, OS unknown (Python's gzip).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_TAR_ENCODING = "utf-8"
_TAR_ERRORS = "surrogateescape"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class PackedLayer:
    digest: str  # of the gzip blob
    diff_id: str  # of the uncompressed tar
    size: int  # blob bytes


def _deflate(block: bytes, zdict: bytes, last: bool) -> bytes:
    if zdict:
        comp = zlib.compressobj(_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS, 8, zlib.Z_DEFAULT_STRATEGY, zdict)
    else:
        comp = zlib.compressobj(_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return comp.compress(block) + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class ParallelGzip:
    """The tar stream in, the gzip blob out to ``out``; sha256 and size of both kept.

    The caller's thread only gathers blocks; workers deflate them and one writer thread hashes
    the stream, hashes and writes the compressed blocks in order. ``close`` finishes the member;
    ``abort`` stops everything after an error (the output is then garbage for the caller to drop).
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._diff = hashlib.sha256()
        self._blob = hashlib.sha256()
        self.diff_size = 0
        self.blob_size = 0
        self._crc = 0
        self._buf = bytearray()
        self._tail = b""
        self._pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="commit-gzip")
        self._queue: queue.Queue[tuple[bytes, Future[bytes]] | None] = queue.Queue(_AHEAD)
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._drain, name="commit-blob", daemon=True)
        self._emit(_GZIP_HEADER)
        self._writer.start()

    def _emit(self, data: bytes) -> None:
        self._blob.update(data)
        self.blob_size += len(data)
        view = memoryview(data)
        while view:
            view = view[self._out.write(view) :]

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            block, future = item
            try:
                self._diff.update(block)
                self._crc = zlib.crc32(block, self._crc)
                self._emit(future.result())
            except BaseException as exc:  # reported to the caller by write() or close()
                self._error = exc

    def _submit(self, last: bool) -> None:
        if self._error is not None:
            raise self._error
        block = bytes(self._buf)
        self._buf.clear()
        self.diff_size += len(block)
        future = self._pool.submit(_deflate, block, self._tail, last)
        self._tail = block[-_DICT:] if len(block) >= _DICT else (self._tail + block)[-_DICT:]
        self._queue.put((block, future))

    def write(self, data: bytes | memoryview) -> None:
        self._buf += data
        if len(self._buf) >= _BLOCK:
            self._submit(last=False)

    def close(self) -> tuple[str, str]:
        """Finish the member; (blob digest, diff ID)."""
        self._submit(last=True)
        self._queue.put(None)
        self._writer.join()
        self._pool.shutdown()
        if self._error is not None:
            raise self._error
        self._emit(struct.pack("<II", self._crc & 0xFFFFFFFF, self.diff_size & 0xFFFFFFFF))
        return "sha256:" + self._blob.hexdigest(), "sha256:" + self._diff.hexdigest()

    def abort(self) -> None:
        self._error = self._error or DeadlineExceeded("commit stopped")
        # The writer skips what is queued once an error is set; None ends it.
        while self._writer.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=0.5)
                break
        self._writer.join()
        self._pool.shutdown(cancel_futures=True)


_Op = tuple[Callable[..., None], tuple[Any, ...]]


class _Lane:
    """One thread carrying out queued operations in order, handed over in batches (a thread
    switch per operation would cost more than most of them). Holds the file being written."""

    _DEPTH = 16  # queued batches, each at most _BATCH operations or about 1 MiB of data
    _BATCH = 256

    def __init__(self, name: str) -> None:
        self.fd = -1
        self._queue: queue.Queue[list[_Op] | None] = queue.Queue(self._DEPTH)
        self._batch: list[_Op] = []
        self._batch_bytes = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, op: Callable[..., None], *args: Any, size: int = 0) -> None:
        self._batch.append((op, args))
        self._batch_bytes += size
        if len(self._batch) >= self._BATCH or self._batch_bytes >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.error is not None:
            raise self.error
        if self._batch:
            self._queue.put(self._batch)
            self._batch, self._batch_bytes = [], 0

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            for op, args in batch:
                if self.error is not None:
                    break
                try:
                    op(self, *args)
                except BaseException as exc:  # reported to the producer by its next call or close()
                    self.error = exc

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join()
        self.close_fd()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        self.error = self.error or DeadlineExceeded("commit stopped")
        # The thread skips what is queued once an error is set; None ends it.
        while self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=0.5)
                break
        self._thread.join()
        self.close_fd()


class _LayerMirror:
    """Writes each packed entry into the new layer directory as the unpacker would from the tar.

    Directories are made at once, by the walk (so that everything below can be made anywhere);
    files, symlinks, devices and whiteouts are queued, each file whole on one of ``_LANES``
    threads in turn, so that file creation and writes (system time, mostly) run beside the walk
    and the deflate workers; hard links are made last, once every file they name exists.
    ``close`` waits for all of it and stamps directory times; ``abort`` stops.
    """

    _LANES = 2

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        with os.scandir(self.root) as it:
            if next(it, None) is not None:
                raise FailedPrecondition(f"layer directory {root} is not empty")
        self._dir_times: dict[str, int] = {}
        self._links: list[tuple[str, tarfile.TarInfo, dict[str, bytes]]] = []
        self._lanes = [_Lane(f"commit-layer-{n}") for n in range(self._LANES)]
        self._next = 0
        self._lane = self._lanes[0]

    # -- the walk's side ------------------------------------------------------------------

    def _pick(self) -> _Lane:
        self._lane = self._lanes[self._next]
        self._next = (self._next + 1) % len(self._lanes)
        return self._lane

    def whiteout(self, name: str, uid: int, gid: int) -> None:
        self._pick().put(_LayerMirror._whiteout, self._path(name), uid, gid)

    def directory(self, name: str, info: tarfile.TarInfo, xattrs: dict[str, bytes], opaque: bool) -> None:
        path = self._path(name)
        os.mkdir(path, 0o700)
        os.lchown(path, info.uid, info.gid)
        os.chmod(path, info.mode & 0o7777)
        _set_xattrs(path, xattrs)
        if opaque:
            os.setxattr(path, _OPAQUE_XATTR, b"y", follow_symlinks=False)
        self._dir_times[path] = int(info.mtime) * 1_000_000_000

    def begin_file(self, name: str) -> None:
        self._pick().put(_LayerMirror._begin_file, self._path(name))

    def data(self, chunk: bytes) -> None:
        self._lane.put(_LayerMirror._data, chunk, size=len(chunk))

    def end_file(self, info: tarfile.TarInfo, xattrs: dict[str, bytes]) -> None:
        self._lane.put(_LayerMirror._end_file, info, xattrs)

    def other(self, name: str, info: tarfile.TarInfo, xattrs: dict[str, bytes]) -> None:
        if info.islnk():
            self._links.append((name, info, xattrs))
        else:
            self._pick().put(_LayerMirror._other, self._path(name), info, xattrs, "")

    def close(self) -> None:
        for lane in self._lanes:
            lane.close()
        for name, info, xattrs in self._links:
            _LayerMirror._other(self._lanes[0], self._path(name), info, xattrs, self._path(info.linkname))
        # Deepest first, so that no later step touches an already-stamped directory.
        for path in sorted(self._dir_times, key=lambda p: p.count("/"), reverse=True):
            ns = self._dir_times[path]
            os.utime(path, ns=(ns, ns), follow_symlinks=False)

    def abort(self) -> None:
        for lane in self._lanes:
            lane.abort()

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    # -- the lanes' side: each runs as op(lane, *args) --------------------------------------

    @staticmethod
    def _whiteout(lane: _Lane, path: str, uid: int, gid: int) -> None:
        os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))
        os.lchown(path, uid, gid)

    @staticmethod
    def _begin_file(lane: _Lane, path: str) -> None:
        lane.fd = os.open(path, _CREATE_FLAGS, 0o600)

    @staticmethod
    def _data(lane: _Lane, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(lane.fd, view) :]

    @staticmethod
    def _end_file(lane: _Lane, info: tarfile.TarInfo, xattrs: dict[str, bytes]) -> None:
        fd = lane.fd
        os.fchown(fd, info.uid, info.gid)
        os.fchmod(fd, info.mode & 0o7777)  # after chown, which clears setuid
        _set_xattrs(fd, xattrs)
        ns = int(info.mtime) * 1_000_000_000
        os.utime(fd, ns=(ns, ns))
        lane.close_fd()

    @staticmethod
    def _other(lane: _Lane, path: str, info: tarfile.TarInfo, xattrs: dict[str, bytes], source: str) -> None:
        """Symlink, hard link (to ``source``), device node or fifo."""
        symlink = info.issym()
        if symlink:
            os.symlink(info.linkname, path)
        elif info.islnk():
            symlink = stat.S_ISLNK(os.lstat(source).st_mode)
            os.link(source, path, follow_symlinks=False)
        elif info.ischr() or info.isblk():
            kind = stat.S_IFCHR if info.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(info.devmajor, info.devminor))
        else:
            os.mknod(path, stat.S_IFIFO | 0o600)
        os.lchown(path, info.uid, info.gid)
        if not symlink:
            os.chmod(path, info.mode & 0o7777)
        _set_xattrs(path, xattrs)
        ns = int(info.mtime) * 1_000_000_000
        os.utime(path, ns=(ns, ns), follow_symlinks=False)


def _set_xattrs(target: int | str, xattrs: dict[str, bytes]) -> None:
    for key, value in xattrs.items():
        try:
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)
        except OSError as exc:
            # As the unpacker: security.* may be refused by the host's LSM or file system.
            if key.startswith("security.") and exc.errno in (errno.EPERM, errno.ENOTSUP):
                continue
            raise


def _source_xattrs(dir_fd: int, name: str) -> dict[str, bytes]:
    # /proc/self/fd/N resolves to the directory itself; the last component is not followed.
    path = f"/proc/self/fd/{dir_fd}/{name}"
    out: dict[str, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for key in names:
        with contextlib.suppress(OSError):
            out[key] = os.getxattr(path, key, follow_symlinks=False)
    return out


class _Packer:
    def __init__(
        self, sink: ParallelGzip, mirror: _LayerMirror | None, cancel: threading.Event | None
    ) -> None:
        self.sink = sink
        self.mirror = mirror
        self.cancel = cancel
        self.offset = 0
        self.inodes: dict[tuple[int, int], str] = {}
        self.current = ""

    def _write(self, data: bytes | memoryview) -> None:
        self.sink.write(data)
        self.offset += len(data)

    def _header(self, info: tarfile.TarInfo) -> None:
        self._write(info.tobuf(tarfile.PAX_FORMAT, _TAR_ENCODING, _TAR_ERRORS))

    def walk(self, dir_fd: int, prefix: str) -> None:
        with os.scandir(dir_fd) as it:
            names = sorted(entry.name for entry in it)
        for base in names:
            if self.cancel is not None and self.cancel.is_set():
                raise DeadlineExceeded("commit cancelled")
            name = f"{prefix}{base}"
            self.current = name
            st = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(base, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    self._directory(sub, dir_fd, base, name, st)
                    self.walk(sub, f"{name}/")
                finally:
                    os.close(sub)
            else:
                self._entry(dir_fd, base, name, st)

    def _info(self, name: str, st: os.stat_result, xattrs: dict[str, bytes]) -> tarfile.TarInfo:
        for key in xattrs:
            if key.startswith(_UNSUPPORTED_XATTRS):
                raise FailedPrecondition(
                    f"{name} carries overlay xattr {key}: written by an overlay feature "
                    "(redirect_dir/metacopy) that commit cannot turn into a layer"
                )
        info = tarfile.TarInfo(name)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.mtime = int(st.st_mtime)
        info.uname = info.gname = ""
        info.pax_headers = {
            _XATTR_PAX_PREFIX + key: value.decode("utf-8", "surrogateescape")
            for key, value in xattrs.items()
            if not key.startswith(_OVERLAY_XATTR)
        }
        return info

    @staticmethod
    def _kept(xattrs: dict[str, bytes]) -> dict[str, bytes]:
        return {k: v for k, v in xattrs.items() if not k.startswith(_OVERLAY_XATTR)}

    def _directory(self, fd: int, parent_fd: int, base: str, name: str, st: os.stat_result) -> None:
        xattrs = _source_xattrs(parent_fd, base)
        info = self._info(name, st, xattrs)
        info.type = tarfile.DIRTYPE
        self._header(info)
        opaque = xattrs.get(_OPAQUE_XATTR) == b"y"
        if opaque:
            marker = tarfile.TarInfo(f"{name}/{OPAQUE_MARKER}")
            marker.mtime = int(st.st_mtime)
            self._header(marker)
        if self.mirror is not None:
            self.mirror.directory(name, info, self._kept(xattrs), opaque)

    def _entry(self, dir_fd: int, base: str, name: str, st: os.stat_result) -> None:
        mode = st.st_mode
        if stat.S_ISCHR(mode) and st.st_rdev == 0:
            # overlayfs's whiteout: the lower file is deleted.
            parent, _, leaf = name.rpartition("/")
            info = tarfile.TarInfo(
                f"{parent}/{WHITEOUT_PREFIX}{leaf}" if parent else f"{WHITEOUT_PREFIX}{leaf}"
            )
            info.mtime = int(st.st_mtime)
            info.uid, info.gid = st.st_uid, st.st_gid
            self._header(info)
            if self.mirror is not None:
                self.mirror.whiteout(name, st.st_uid, st.st_gid)
            return
        if stat.S_ISSOCK(mode):
            return  # not representable in a tar; tar and containerd skip them too
        xattrs = _source_xattrs(dir_fd, base)
        info = self._info(name, st, xattrs)
        kept = self._kept(xattrs)
        if stat.S_ISREG(mode):
            inode = (st.st_ino, st.st_dev)
            first = self.inodes.get(inode)
            if st.st_nlink > 1 and first is not None:
                info.type, info.linkname = tarfile.LNKTYPE, first
            else:
                if st.st_nlink > 1:
                    self.inodes[inode] = name
                info.type, info.size = tarfile.REGTYPE, st.st_size
                self._regular(dir_fd, base, name, info, kept)
                return
        elif stat.S_ISLNK(mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(base, dir_fd=dir_fd)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:
            return
        self._header(info)
        if self.mirror is not None:
            self.mirror.other(name, info, kept)

    def _regular(
        self, dir_fd: int, base: str, name: str, info: tarfile.TarInfo, xattrs: dict[str, bytes]
    ) -> None:
        src = os.open(base, _READ_FLAGS, dir_fd=dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(src).st_mode):
                raise FailedPrecondition(f"{name} was replaced while read; commit again, or with --pause")
            self._header(info)
            if self.mirror is not None:
                self.mirror.begin_file(name)
            left = info.size
            while left > 0:
                chunk = os.read(src, min(_CHUNK, left))
                if not chunk:
                    raise FailedPrecondition(f"{name} shrank while read; commit again, or with --pause")
                left -= len(chunk)
                self._write(chunk)
                if self.mirror is not None:
                    self.mirror.data(chunk)
            if info.size % tarfile.BLOCKSIZE:
                self._write(tarfile.NUL * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE))
            if self.mirror is not None:
                self.mirror.end_file(info, xattrs)
        finally:
            os.close(src)

    def end(self) -> None:
        # As tarfile closes a stream: two zero blocks, then zeros up to a whole record.
        self._write(tarfile.NUL * (tarfile.BLOCKSIZE * 2))
        remainder = self.offset % tarfile.RECORDSIZE
        if remainder:
            self._write(tarfile.NUL * (tarfile.RECORDSIZE - remainder))


def pack_upper(
    upper: Path, blob: Path, cancel: threading.Event | None = None, *, layer_dir: Path | None = None
) -> PackedLayer:
    """Write the OCI layer (gzip tar) of overlay upper directory ``upper`` to new file ``blob``;
    with ``layer_dir`` (an empty directory), also write the layer's files there, as the store's
    unpacker would from that blob. On error both are left for the caller to delete."""
    fd = os.open(blob, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb", buffering=0) as raw:
        mirror = _LayerMirror(layer_dir) if layer_dir is not None else None
        sink = ParallelGzip(raw)  # type: ignore[arg-type]
        packer = _Packer(sink, mirror, cancel)
        try:
            root = os.open(upper, _DIR_FLAGS)
            try:
                packer.walk(root, "")
            finally:
                os.close(root)
            packer.end()
            digest, diff_id = sink.close()
            if mirror is not None:
                mirror.close()
        except BaseException as exc:
            sink.abort()
            if mirror is not None:
                mirror.abort()
            if isinstance(exc, OSError):
                where = f"{upper}/{packer.current}"
                raise from_os_error(exc, f"cannot commit the container's changes at {where}") from exc
            raise
    return PackedLayer(digest, diff_id, sink.blob_size)
