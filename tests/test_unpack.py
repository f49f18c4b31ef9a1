"""Layer unpacking: archives built here with tarfile, unpacked, and checked on disk."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from cri_runtime.errors import DataLoss, DeadlineExceeded, HostileContent, InvalidArgument
from imageservice.unpack import UnpackResult, unpack_layer

pytestmark = pytest.mark.root  # chown, mknod and trusted.* xattrs need root

DIGEST = "sha256:" + "ab" * 32
MTIME = 1_600_000_000

Entry = tuple[tarfile.TarInfo, bytes | None]


# --- archive building -----------------------------------------------------------------


def reg(
    name: str,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: float = MTIME,
    xattrs: dict[str, str] | None = None,
) -> Entry:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, uid, gid, mtime
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return info, data


def dir_(name: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: float = MTIME) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = tarfile.DIRTYPE, mode, uid, gid, mtime
    return info, None


def link(name: str, target: str, typ: bytes = tarfile.SYMTYPE, *, uid: int = 0, gid: int = 0) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.uid, info.gid = typ, target, 0o777, uid, gid
    info.mtime = MTIME
    return info, None


def hardlink(name: str, target: str) -> Entry:
    info, _ = link(name, target, tarfile.LNKTYPE)
    info.mode = 0o644
    return info, None


def device(name: str, typ: bytes, major: int = 0, minor: int = 0, *, mode: int = 0o666) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor, info.mode, info.mtime = typ, major, minor, mode, MTIME
    return info, None


def make_tar(entries: Iterable[Entry]) -> bytes:
    buf = io.BytesIO()
    # PAX writes names and link targets verbatim (no stripping of "/" or ".."), which is
    # what a hostile archive would do, and carries xattrs.
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(raw, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    assert compression == "none"
    return raw


@dataclass
class Box:
    """tmp_path/outer holds dest and an empty sentinel dir an escape would write next to."""

    tmp: Path
    dest: Path
    sentinel: Path
    blob: Path

    def unpack(
        self, entries: Iterable[Entry], compression: str = "gzip", cancel: threading.Event | None = None
    ) -> UnpackResult:
        self.blob.write_bytes(compress(make_tar(entries), compression))
        return unpack_layer(self.blob, self.dest, blob_digest=DIGEST, cancel=cancel)

    def outside(self) -> set[str]:
        """Every path under tmp_path that is not inside dest (and not the blob)."""
        found = set()
        for dirpath, dirnames, filenames in os.walk(self.tmp):
            if Path(dirpath) == self.dest or self.dest in Path(dirpath).parents:
                continue
            for name in dirnames + filenames:
                found.add(os.path.relpath(os.path.join(dirpath, name), self.tmp))
        return found - {"blob"}


@pytest.fixture
def box(tmp_path: Path) -> Box:
    outer = tmp_path / "outer"
    dest = outer / "dest"
    sentinel = outer / "sentinel"
    dest.mkdir(parents=True)
    sentinel.mkdir()
    return Box(tmp_path, dest, sentinel, tmp_path / "blob")


# --- well-formed layers ---------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_files_and_dirs_are_written_with_content_and_diff_id_of_uncompressed_tar(
    box: Box, compression: str
) -> None:
    entries = [
        dir_("etc", mode=0o755),
        reg("etc/hostname", b"pycri\n"),
        dir_("usr"),
        dir_("usr/bin"),
        reg("usr/bin/tool", b"#!/bin/sh\necho hi\n", mode=0o755),
        reg("empty"),
    ]
    raw = make_tar(entries)
    result = box.unpack(entries, compression)

    assert (box.dest / "etc/hostname").read_bytes() == b"pycri\n"
    assert (box.dest / "usr/bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (box.dest / "empty").read_bytes() == b""
    assert stat.S_IMODE(os.stat(box.dest / "usr/bin/tool").st_mode) == 0o755
    assert result.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert result.size == len(b"pycri\n") + len(b"#!/bin/sh\necho hi\n")
    assert result.inodes == 6
    assert box.outside() == {"outer", "outer/dest", "outer/sentinel"}


def test_large_file_spanning_many_chunks_is_copied_exactly(box: Box) -> None:
    data = os.urandom(3 * (1 << 20) + 5)
    result = box.unpack([reg("big", data)])
    assert hashlib.sha256((box.dest / "big").read_bytes()).digest() == hashlib.sha256(data).digest()
    assert result.size == len(data)


def test_multi_member_gzip_and_multi_frame_zstd_are_read_to_the_end(box: Box) -> None:
    raw = make_tar([reg("a", b"A" * 5000), reg("b", b"B" * 7000)])
    half = len(raw) // 2
    box.blob.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    result = unpack_layer(box.blob, box.dest, blob_digest=DIGEST)
    assert (box.dest / "b").read_bytes() == b"B" * 7000
    assert result.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()

    other = box.tmp / "other"
    other.mkdir()
    cctx = zstandard.ZstdCompressor()
    box.blob.write_bytes(cctx.compress(raw[:half]) + cctx.compress(raw[half:]))
    result = unpack_layer(box.blob, other, blob_digest=DIGEST)
    assert (other / "b").read_bytes() == b"B" * 7000
    assert result.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_diff_id_covers_padding_after_the_end_of_archive_marker(box: Box) -> None:
    # Several MiB, so that the bytes after the tar end are more than any read-ahead.
    raw = make_tar([reg("a", b"x")]) + b"\0" * (8 << 20)
    box.blob.write_bytes(gzip.compress(raw))
    result = unpack_layer(box.blob, box.dest, blob_digest=DIGEST)
    assert result.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_ownership_and_setuid_setgid_sticky_modes_survive_chown(box: Box) -> None:
    box.unpack(
        [
            reg("suid", b"x", mode=0o4755, uid=1000, gid=1000),
            reg("sgid", b"x", mode=0o2755, uid=1000, gid=2000),
            dir_("tmp", mode=0o1777, uid=1000, gid=1000),
        ]
    )
    suid = os.stat(box.dest / "suid")
    assert suid.st_mode & stat.S_ISUID
    assert stat.S_IMODE(suid.st_mode) == 0o4755
    assert (suid.st_uid, suid.st_gid) == (1000, 1000)
    sgid = os.stat(box.dest / "sgid")
    assert sgid.st_mode & stat.S_ISGID and (sgid.st_uid, sgid.st_gid) == (1000, 2000)
    tmp = os.stat(box.dest / "tmp")
    assert stat.S_IMODE(tmp.st_mode) == 0o1777 and (tmp.st_uid, tmp.st_gid) == (1000, 1000)


def test_mtimes_are_kept_and_directory_mtime_is_set_after_its_children(box: Box) -> None:
    box.unpack(
        [
            dir_("d", mtime=1_000_000_000),
            dir_("d/sub", mtime=1_100_000_000),
            reg("d/sub/f", b"x", mtime=1_200_000_000),
            reg("d/g", b"y", mtime=1_300_000_000),
            link("d/s", "g"),
        ]
    )
    assert os.stat(box.dest / "d").st_mtime == 1_000_000_000
    assert os.stat(box.dest / "d/sub").st_mtime == 1_100_000_000
    assert os.stat(box.dest / "d/sub/f").st_mtime == 1_200_000_000
    assert os.stat(box.dest / "d/g").st_mtime == 1_300_000_000
    assert os.lstat(box.dest / "d/s").st_mtime == MTIME


def test_sub_second_pax_mtime_is_kept_to_the_nanosecond(box: Box) -> None:
    info, data = reg("f", b"x")
    info.pax_headers = {"mtime": "1600000000.123456789"}
    box.unpack([(info, data)])
    assert os.stat(box.dest / "f").st_mtime_ns == 1_600_000_000_123_456_789


def test_symlinks_are_created_verbatim_with_owner(box: Box) -> None:
    box.unpack([reg("target", b"t"), link("rel", "target", uid=1000, gid=1000), link("abs", "/etc/passwd")])
    assert os.readlink(box.dest / "rel") == "target"
    assert os.readlink(box.dest / "abs") == "/etc/passwd"
    st = os.lstat(box.dest / "rel")
    assert stat.S_ISLNK(st.st_mode) and (st.st_uid, st.st_gid) == (1000, 1000)


def test_hardlink_shares_the_inode_and_is_counted_once(box: Box) -> None:
    result = box.unpack([dir_("bin"), reg("bin/a", b"payload"), hardlink("bin/b", "bin/a")])
    a, b = os.stat(box.dest / "bin/a"), os.stat(box.dest / "bin/b")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert (box.dest / "bin/b").read_bytes() == b"payload"
    assert result.size == len(b"payload")
    assert result.inodes == 2  # bin and the one file


def test_hardlink_with_leading_dot_slash_resolves_inside_the_layer(box: Box) -> None:
    box.unpack([reg("./etc/passwd", b"root:x:0:0::/root:/bin/sh\n"), hardlink("./pw", "./etc/passwd")])
    assert os.stat(box.dest / "pw").st_ino == os.stat(box.dest / "etc/passwd").st_ino
    assert os.stat(box.dest / "pw").st_ino != os.stat("/etc/passwd").st_ino


def test_hardlink_to_a_symlink_links_the_symlink_not_what_it_points_at(box: Box) -> None:
    box.unpack([link("s", "/etc/passwd"), hardlink("h", "s")])
    h = os.lstat(box.dest / "h")
    assert stat.S_ISLNK(h.st_mode)
    assert h.st_ino == os.lstat(box.dest / "s").st_ino
    assert h.st_ino != os.stat("/etc/passwd").st_ino


def test_pax_xattrs_are_set_including_non_utf8_values(box: Box) -> None:
    binary = b"\xff\x00\x80bin".decode("utf-8", "surrogateescape")
    box.unpack([reg("f", b"x", xattrs={"user.foo": "bar", "user.bin": binary}), dir_("d")])
    assert os.getxattr(box.dest / "f", "user.foo") == b"bar"
    assert os.getxattr(box.dest / "f", "user.bin") == b"\xff\x00\x80bin"


def test_xattr_survives_chown_so_file_capabilities_are_kept(box: Box) -> None:
    # VFS_CAP_REVISION_2, cap_net_bind_service permitted+effective; chown would drop it.
    cap = bytes.fromhex("0100000200040000000000000000000000000000")
    info, data = reg("ping", b"x", mode=0o755, uid=1000, gid=1000)
    info.pax_headers = {"SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape")}
    box.unpack([(info, data)])
    assert os.getxattr(box.dest / "ping", "security.capability") == cap


def test_character_and_block_devices_and_fifos_are_created(box: Box) -> None:
    box.unpack(
        [
            device("dev/null", tarfile.CHRTYPE, 1, 3),
            device("dev/loop0", tarfile.BLKTYPE, 7, 0, mode=0o660),
            device("run/fifo", tarfile.FIFOTYPE, mode=0o600),
        ]
    )
    null = os.lstat(box.dest / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    loop = os.lstat(box.dest / "dev/loop0")
    assert stat.S_ISBLK(loop.st_mode) and (os.major(loop.st_rdev), os.minor(loop.st_rdev)) == (7, 0)
    fifo = os.lstat(box.dest / "run/fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o600


def test_whiteout_file_becomes_a_0_0_character_device(box: Box) -> None:
    result = box.unpack([dir_("etc"), reg("etc/.wh.motd")])
    wh = os.lstat(box.dest / "etc/motd")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == os.makedev(0, 0)
    assert not (box.dest / "etc/.wh.motd").exists()
    assert result.inodes == 2


def test_opaque_marker_sets_the_overlay_xattr_and_creates_a_missing_dir(box: Box) -> None:
    box.unpack([dir_("var"), reg("var/.wh..wh..opq"), reg("new/.wh..wh..opq"), reg("var/keep", b"k")])
    assert os.getxattr(box.dest / "var", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(box.dest / "new", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(box.dest / "var")) == ["keep"]


def test_other_aufs_metadata_entries_are_ignored(box: Box) -> None:
    result = box.unpack([reg(".wh..wh.plnk/1234.5"), reg(".wh..wh.aufs")])
    assert os.listdir(box.dest) == []
    assert result.inodes == 0


def test_missing_parents_are_created_0755_root(box: Box) -> None:
    box.unpack([reg("a/b/c", b"x", uid=1000, gid=1000)])
    for d in ("a", "a/b"):
        st = os.stat(box.dest / d)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
        assert (st.st_uid, st.st_gid) == (0, 0)


def test_later_entry_replaces_an_earlier_one_of_another_kind(box: Box) -> None:
    result = box.unpack(
        [
            reg("f", b"old"),
            reg("f", b"new"),
            dir_("d"),
            reg("d/child", b"gone"),
            reg("d", b"now a file"),
            reg("x", b"file"),
            dir_("x", mode=0o700),
            dir_("keep", mode=0o755),
            reg("keep/child", b"stays"),
            dir_("keep", mode=0o750),
        ]
    )
    assert (box.dest / "f").read_bytes() == b"new"
    assert (box.dest / "d").read_bytes() == b"now a file"
    assert stat.S_ISDIR(os.lstat(box.dest / "x").st_mode)
    assert stat.S_IMODE(os.stat(box.dest / "keep").st_mode) == 0o750
    assert (box.dest / "keep/child").read_bytes() == b"stays"
    # Net result: f, d, x, keep, keep/child.
    assert result.inodes == 5
    assert result.size == len(b"new") + len(b"now a file") + len(b"stays")


def test_regular_file_over_a_symlink_replaces_the_link_instead_of_writing_through(box: Box) -> None:
    outside = box.sentinel / "x"
    result = box.unpack([link("s", str(outside)), reg("s", b"inside")])
    assert not os.path.islink(box.dest / "s")
    assert (box.dest / "s").read_bytes() == b"inside"
    assert not outside.exists() and os.listdir(box.sentinel) == []
    assert result.inodes == 1


def test_absolute_symlink_in_a_parent_is_resolved_inside_the_layer(box: Box) -> None:
    box.unpack([link("etc", "/real-etc"), dir_("real-etc"), reg("etc/conf", b"c")])
    assert os.path.islink(box.dest / "etc")
    assert (box.dest / "real-etc/conf").read_bytes() == b"c"


def test_symlink_to_host_directory_is_followed_as_if_dest_were_root(box: Box) -> None:
    host_dir = str(box.sentinel)  # an absolute host path; inside the layer it means dest/<that path>
    box.unpack([link("s", host_dir), reg("s/evil", b"contained"), link("r", "/"), reg("r/tmp/x", b"t")])
    assert os.listdir(box.sentinel) == []
    assert (box.dest / host_dir.lstrip("/") / "evil").read_bytes() == b"contained"
    assert (box.dest / "tmp/x").read_bytes() == b"t"


def test_relative_symlink_staying_inside_is_followed(box: Box) -> None:
    box.unpack([dir_("usr"), dir_("usr/lib"), link("lib", "usr/lib"), reg("lib/libc.so", b"elf")])
    assert (box.dest / "usr/lib/libc.so").read_bytes() == b"elf"


def test_cancel_before_start_raises_deadline_exceeded(box: Box) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(DeadlineExceeded, match=f"unpack of {DIGEST} cancelled"):
        box.unpack([reg("a", b"x")], cancel=cancel)
    assert not (box.dest / "a").exists()


class _TripAfter(threading.Event):
    """An event that reads as set once it has been polled ``n`` times."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.polls = n

    def is_set(self) -> bool:
        self.polls -= 1
        return self.polls < 0 or super().is_set()


def test_cancel_during_a_large_file_copy_stops_promptly(box: Box) -> None:
    data = os.urandom(8 << 20)
    with pytest.raises(DeadlineExceeded, match=f"unpack of {DIGEST} cancelled"):
        box.unpack([reg("big", data), reg("after", b"x")], cancel=_TripAfter(4))
    assert os.path.getsize(box.dest / "big") < len(data)
    assert not (box.dest / "after").exists()


# --- hostile archives -----------------------------------------------------------------

EVIL = b"this must never appear outside the layer\n"


def assert_refused(box: Box, entries: list[Entry], offending: str) -> None:
    before = box.outside()
    with pytest.raises(HostileContent) as err:
        box.unpack(entries)
    message = str(err.value)
    assert DIGEST in message and offending in message, message
    assert box.outside() == before == {"outer", "outer/dest", "outer/sentinel"}
    assert os.listdir(box.sentinel) == []
    # "../../.." from dest reaches one level above tmp_path.
    assert not (box.tmp.parent / "evil").exists()


def test_absolute_entry_name_is_refused(box: Box) -> None:
    name = f"/etc/pycri-unpack-test-{uuid.uuid4().hex}"
    assert_refused(box, [reg(name, EVIL)], name)
    assert not os.path.exists(name)
    assert not (box.dest / name.lstrip("/")).exists()


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "./../evil", "../outer/sentinel/evil"])
def test_dotdot_climbing_out_of_the_layer_is_refused(box: Box, name: str) -> None:
    assert_refused(box, [reg(name, EVIL)], name)


def test_dotdot_through_a_symlink_to_root_is_refused(box: Box) -> None:
    assert_refused(box, [link("s", "/"), reg("s/../../evil", EVIL)], "s/../../evil")


@pytest.mark.parametrize("target", ["../../", "../sentinel", "../../.."])
def test_writing_through_a_relative_symlink_that_leaves_the_layer_is_refused(box: Box, target: str) -> None:
    assert_refused(box, [link("s", target), reg("s/evil", EVIL)], "s/evil")


def test_escape_through_a_chain_of_symlinks_is_refused(box: Box) -> None:
    entries = [dir_("d"), link("d/up", ".."), link("a", "d/up/d/up/.."), reg("a/evil", EVIL)]
    assert_refused(box, entries, "a/evil")


def test_directory_entry_through_an_escaping_symlink_is_refused(box: Box) -> None:
    assert_refused(box, [link("s", "../sentinel"), dir_("s/evil")], "s/evil")


def test_symlink_loop_in_a_parent_is_refused(box: Box) -> None:
    assert_refused(box, [link("l1", "l2"), link("l2", "l1"), reg("l1/x", EVIL)], "l1/x")


def test_whiteout_through_an_escaping_symlink_is_refused(box: Box) -> None:
    assert_refused(box, [link("s", "../sentinel"), reg("s/.wh.victim")], "s/.wh.victim")


@pytest.mark.parametrize("target", ["../outside", "../outer/sentinel", "a/../../evil"])
def test_hardlink_to_a_target_outside_the_layer_is_refused(box: Box, target: str) -> None:
    assert_refused(box, [hardlink("h", target)], "h")


def test_hardlink_to_host_etc_passwd_is_refused_and_never_links_it(box: Box) -> None:
    host = os.stat("/etc/passwd")
    assert_refused(box, [hardlink("pw", "/etc/passwd")], "pw")
    assert host.st_nlink == os.stat("/etc/passwd").st_nlink
    assert not os.path.lexists(box.dest / "pw")


def test_hardlink_to_a_path_missing_from_the_layer_is_refused(box: Box) -> None:
    assert_refused(box, [hardlink("h", "etc/passwd")], "etc/passwd")


def test_hardlink_through_a_symlink_leaving_the_layer_is_refused(box: Box) -> None:
    (box.sentinel / "secret").write_bytes(b"host data")
    before = os.stat(box.sentinel / "secret")
    with pytest.raises(HostileContent, match="h"):
        box.unpack([link("s", "../sentinel"), hardlink("h", "s/secret")])
    assert os.stat(box.sentinel / "secret").st_nlink == before.st_nlink == 1
    assert not os.path.lexists(box.dest / "h")


def test_directory_replaced_by_an_escaping_symlink_is_not_written_through(box: Box) -> None:
    entries = [dir_("d"), reg("d/a", b"a"), link("d", "../sentinel"), reg("d/evil", EVIL)]
    assert_refused(box, entries, "d/evil")


def test_directory_replaced_by_a_symlink_does_not_get_its_pending_mtime_applied_outside(box: Box) -> None:
    (box.sentinel / "sub").mkdir()
    os.utime(box.sentinel / "sub", (5, 5))
    box.unpack([dir_("d"), dir_("d/sub", mtime=1_000_000_000), link("d", "../sentinel")])
    assert os.stat(box.sentinel / "sub").st_mtime == 5
    assert os.readlink(box.dest / "d") == "../sentinel"


def test_hardlink_to_a_directory_is_refused(box: Box) -> None:
    assert_refused(box, [dir_("d"), hardlink("h", "d")], "h")


def test_name_with_nul_byte_is_refused(box: Box) -> None:
    info, data = reg("placeholder", EVIL)
    info.pax_headers = {"path": "evil\x00name"}
    with pytest.raises(HostileContent, match="NUL") as err:
        box.unpack([(info, data)])
    assert DIGEST in str(err.value) and "evil" in str(err.value)
    assert os.listdir(box.dest) == []


def test_unknown_entry_type_is_refused(box: Box) -> None:
    info, data = reg("volume-label")
    info.type = b"V"  # GNU volume header: tarfile passes it through as an unknown type
    assert_refused(box, [(info, data)], "volume-label")


def test_overlay_private_xattr_from_the_archive_is_refused(box: Box) -> None:
    assert_refused(box, [reg("f", b"x", xattrs={"trusted.overlay.redirect": "/etc"})], "f")


# --- malformed and misused input ------------------------------------------------------


def test_truncated_gzip_raises_data_loss_naming_the_blob(box: Box) -> None:
    blob = gzip.compress(make_tar([reg("a", os.urandom(200_000))]))
    box.blob.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataLoss) as err:
        unpack_layer(box.blob, box.dest, blob_digest=DIGEST)
    assert DIGEST in str(err.value) and "'a'" in str(err.value)


def test_damaged_header_mid_archive_is_data_loss_not_a_silent_end(box: Box) -> None:
    raw = bytearray(make_tar([reg("a", b"x" * 10), reg("b", b"y" * 10)]))
    second = raw.index(b"b\0")  # name field of the second header
    raw[second + 148] ^= 0xFF  # corrupt its checksum field
    box.blob.write_bytes(bytes(raw))
    with pytest.raises(DataLoss, match=DIGEST):
        unpack_layer(box.blob, box.dest, blob_digest=DIGEST)


def test_destination_that_is_not_empty_is_rejected(box: Box) -> None:
    (box.dest / "stale").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="not empty"):
        box.unpack([reg("a", b"x")])


@pytest.mark.parametrize(
    ("entries", "error"),
    [
        ([reg("..", EVIL)], HostileContent),
        ([reg("d/.wh...", EVIL)], HostileContent),
        ([reg("f", b"x"), reg("f/child", EVIL)], InvalidArgument),
    ],
    ids=["dotdot-alone", "whiteout-of-parent", "child-of-regular-file"],
)
def test_malformed_entries_are_rejected_with_blob_and_entry_named(
    box: Box, entries: list[Entry], error: type[Exception]
) -> None:
    offending = entries[-1][0].name
    with pytest.raises(error) as err:
        box.unpack(entries)
    assert DIGEST in str(err.value) and offending in str(err.value)
    assert box.outside() == {"outer", "outer/dest", "outer/sentinel"}
