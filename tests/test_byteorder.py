"""Known byte vectors for byte-order-sensitive code: digests, tar headers, SPDY framing, protobuf.

Every expected value here is a literal written out by hand (or a published test vector), never
computed by the code under test, so the same file catches a byte-order bug when run on a
big-endian host (.ci/s390x runs it under qemu-s390x). Needs no root.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from cri_runtime.api import api_pb2 as pb
from cri_runtime.streaming import spdy
from imageservice.unpack import unpack_layer

# --- digests ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "hexdigest"),
    [
        # FIPS 180-2 examples.
        (b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        (
            b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        ),
    ],
)
def test_sha256_known_vectors(data: bytes, hexdigest: str) -> None:
    assert hashlib.sha256(data).hexdigest() == hexdigest


def test_zlib_crc32_and_adler32_known_vectors() -> None:
    # gzip trailers (crc32) and zlib streams (adler32) carry these as fixed-order integers.
    assert zlib.crc32(b"123456789") == 0xCBF43926
    assert zlib.adler32(b"Wikipedia") == 0x11E60398


# --- tar headers ------------------------------------------------------------------------


def _field(value: bytes, size: int) -> bytes:
    assert len(value) <= size
    return value + b"\0" * (size - len(value))


# One ustar header for "hello.txt": mode 0644, uid/gid 1000 (octal 1750), size 6,
# mtime 1600000000 (octal 13727410000). The checksum is the byte sum of the header with the
# checksum field read as eight spaces: 4024, octal 7670.
HEADER = b"".join(
    [
        _field(b"hello.txt", 100),
        b"0000644\0",
        b"0001750\0",
        b"0001750\0",
        b"00000000006\0",
        b"13727410000\0",
        b"007670\0 ",
        b"0",  # regular file
        _field(b"", 100),  # linkname
        b"ustar\x0000",
        _field(b"", 32),  # uname
        _field(b"", 32),  # gname
        _field(b"", 8),  # devmajor
        _field(b"", 8),  # devminor
        _field(b"", 155),  # prefix
        _field(b"", 12),
    ]
)
CONTENT = b"pycri\n"
# Header, content padded to a block, two zero blocks.
ARCHIVE = HEADER + _field(CONTENT, 512) + b"\0" * 1024
ARCHIVE_SHA256 = "0a26c115d2c7faf56601bec1c2abc41952bcad387c26cedb9d3e0d81877540b4"
MTIME = 1_600_000_000


def test_hand_built_header_has_the_known_checksum_and_digest() -> None:
    assert len(HEADER) == 512 and len(ARCHIVE) == 2048
    assert sum(HEADER[:148]) + 8 * ord(" ") + sum(HEADER[156:]) == 0o7670 == 4024
    assert hashlib.sha256(ARCHIVE).hexdigest() == ARCHIVE_SHA256


def test_tarfile_writes_the_same_header_bytes() -> None:
    info = tarfile.TarInfo("hello.txt")
    info.size, info.mode, info.uid, info.gid, info.mtime = len(CONTENT), 0o644, 1000, 1000, MTIME
    info.uname = info.gname = ""
    assert info.tobuf(tarfile.USTAR_FORMAT) == HEADER


def test_tarfile_parses_the_header_fields_back() -> None:
    info = tarfile.TarInfo.frombuf(HEADER, "utf-8", "surrogateescape")
    assert (info.name, info.mode, info.uid, info.gid, info.size, info.mtime) == (
        "hello.txt",
        0o644,
        1000,
        1000,
        6,
        MTIME,
    )
    assert info.chksum == 0o7670


def test_gnu_base256_numbers_are_big_endian() -> None:
    # Numbers too large for octal are stored as 0x80 followed by a big-endian integer.
    itn, nti = tarfile.itn, tarfile.nti  # type: ignore[attr-defined]  # undocumented helpers
    assert bytes(itn(0x12345678, 8, tarfile.GNU_FORMAT)) == b"\x80\x00\x00\x00\x12\x34\x56\x78"
    assert nti(b"\x80\x00\x00\x00\x12\x34\x56\x78") == 0x12345678
    assert nti(b"\xff\xff\xff\xff\xff\xff\xff\xfe") == -2


def test_unpack_layer_parses_the_known_archive_and_reports_its_diff_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ownership from the header is applied with chown, which needs root; record it instead
    # so this runs anywhere.
    owners: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "fchown", lambda fd, uid, gid: owners.append((uid, gid)))
    monkeypatch.setattr(os, "lchown", lambda path, uid, gid: owners.append((uid, gid)))
    blob = tmp_path / "blob"
    blob.write_bytes(ARCHIVE)
    dest = tmp_path / "dest"
    dest.mkdir()

    result = unpack_layer(blob, dest, blob_digest="sha256:" + ARCHIVE_SHA256)

    assert result.diff_id == "sha256:" + ARCHIVE_SHA256
    assert (result.size, result.inodes) == (6, 1)
    assert (dest / "hello.txt").read_bytes() == CONTENT
    st = (dest / "hello.txt").stat()
    assert st.st_mode & 0o7777 == 0o644
    assert st.st_mtime_ns == MTIME * 10**9
    assert owners == [(1000, 1000)]


def test_unpack_layer_diff_id_includes_trailing_padding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fchown", lambda fd, uid, gid: None)
    # Padded to tar's 10240-byte record, as tarfile and GNU tar write it.
    padded = ARCHIVE + b"\0" * (10240 - len(ARCHIVE))
    blob = tmp_path / "blob"
    blob.write_bytes(padded)
    dest = tmp_path / "dest"
    dest.mkdir()
    result = unpack_layer(blob, dest, blob_digest="sha256:" + "ab" * 32)
    assert result.diff_id == "sha256:51076b7f3c80884e32a910b5c0caea85673da876a33c51de6b4b2267ba95f484"


# --- SPDY/3.1 framing -------------------------------------------------------------------


def test_control_frame_header_bytes() -> None:
    # Control bit and version 3, type, flags in the top byte, 24-bit length, all big-endian.
    frame = spdy.control_frame(spdy.SYN_REPLY, spdy.FLAG_FIN, b"\x00\x00\x00\x01")
    assert frame == bytes.fromhex("80030002 01000004 00000001")
    assert spdy.control_frame(spdy.PING, 0, b"\x01\x02\x03\x04") == bytes.fromhex(
        "80030006 00000004 01020304"
    )
    assert spdy.control_frame(spdy.WINDOW_UPDATE, 0, b"") == bytes.fromhex("80030009 00000000")


def test_control_frame_length_uses_all_24_bits() -> None:
    payload = b"x" * 0x010203
    frame = spdy.control_frame(spdy.HEADERS, 0x02, payload)
    assert frame[:8] == bytes.fromhex("80030008 02010203")
    assert frame[8:] == payload


def test_data_frame_header_bytes() -> None:
    assert spdy.data_frame(5, 0, b"ab") == bytes.fromhex("00000005 00000002 6162")
    assert spdy.data_frame(0x01020304, spdy.FLAG_FIN, b"") == bytes.fromhex("01020304 01000000")
    # The stream id is 31 bits: the top bit is the control bit and is never set on DATA.
    assert spdy.data_frame(0xFFFFFFFF, 0, b"")[:4] == bytes.fromhex("7fffffff")


def _read(raw: bytes) -> list[spdy.Frame]:
    async def main() -> list[spdy.Frame]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        frames = []
        while (frame := await spdy.read_frame(reader)) is not None:
            frames.append(frame)
        return frames

    return asyncio.run(main())


def test_read_frame_decodes_hand_written_frames() -> None:
    raw = bytes.fromhex(
        "80030003 00000008 00000007 00000005"  # RST_STREAM stream 7, CANCEL
        "80030006 00000004 0a0b0c0d"  # PING 0x0a0b0c0d
        "00000009 01000003 78797a"  # DATA stream 9, FIN, "xyz"
        "7fffffff 00000000"  # DATA on the largest stream id, empty
    )
    assert _read(raw) == [
        spdy.Frame(True, spdy.RST_STREAM, 0, 0, bytes.fromhex("00000007 00000005")),
        spdy.Frame(True, spdy.PING, 0, 0, bytes.fromhex("0a0b0c0d")),
        spdy.Frame(False, 0, 9, spdy.FLAG_FIN, b"xyz"),
        spdy.Frame(False, 0, 0x7FFFFFFF, 0, b""),
    ]


def test_read_frame_rejects_other_versions() -> None:
    with pytest.raises(spdy.ProtocolError, match="version 2"):
        _read(bytes.fromhex("80020006 00000004 00000001"))


def test_dictionary_is_length_prefixed_big_endian() -> None:
    assert spdy.DICTIONARY[:15] == b"\x00\x00\x00\x07options\x00\x00\x00\x04"
    assert spdy.DICTIONARY.endswith(b"enq=0.")
    assert zlib.adler32(spdy.DICTIONARY) == _DICTIONARY_ADLER32


# zlib's dictionary id (FDICT) in a SPDY/3 header block: fixed by the draft's dictionary.
_DICTIONARY_ADLER32 = 0xE3C6A7C2

# {"host": "x", ":status": "200"} as SPDY/3 lays it out before compression.
RAW_HEADERS = bytes.fromhex(
    "00000002"
    "00000004"
    + b"host".hex()
    + "00000001"
    + b"x".hex()
    + "00000007"
    + b":status".hex()
    + "00000003"
    + b"200".hex()
)


def test_header_block_layout() -> None:
    block = spdy.HeaderCodec().encode([("Host", "x"), (":status", "200")])
    # The first block names the dictionary by its adler32 in the zlib header (bytes 2-5).
    assert block[2:6] == struct.pack(">I", _DICTIONARY_ADLER32)
    inflate = zlib.decompressobj(zdict=spdy.DICTIONARY)
    assert inflate.decompress(block) == RAW_HEADERS


def test_header_block_decodes_hand_written_layout() -> None:
    deflate = zlib.compressobj(zdict=spdy.DICTIONARY)
    block = deflate.compress(RAW_HEADERS) + deflate.flush(zlib.Z_SYNC_FLUSH)
    assert spdy.HeaderCodec().decode(block) == {"host": "x", ":status": "200"}


# --- protobuf ---------------------------------------------------------------------------


def test_protobuf_varint_and_double_encoding() -> None:
    # Field 1 varint 300 (0xac 0x02); field 2 double 1.5, little-endian IEEE 754.
    message = pb.PsiData(Total=300, Avg10=1.5)
    expected = bytes.fromhex("08ac02 11 000000000000f83f")
    assert message.SerializeToString() == expected
    assert pb.PsiData.FromString(expected) == message
    assert pb.LinuxContainerResources(cpu_period=100000, oom_score_adj=-1).SerializeToString() == (
        bytes.fromhex("08a08d06") + bytes.fromhex("28ffffffffffffffffff01")
    )
