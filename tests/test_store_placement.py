"""Where the image store makes new layers: its tmp/ carries the "top of directory hierarchies"
inode flag (``chattr +T``), so that ext4 places each layer made there in a block group of its
own rather than among the inodes of layers deleted before (see ``store._spread_new_trees``).

A real ImageStore in a temporary directory; the flag is read back with FS_IOC_GETFLAGS, as
``lsattr`` does. Skipped on a file system without inode flags.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
from pathlib import Path

import pytest

from imageservice.config import ImageConfig
from imageservice.store import ImageStore

pytestmark = pytest.mark.root

FS_IOC_GETFLAGS = 0x80086601
FS_TOPDIR_FL = 0x00020000


def inode_flags(path: Path) -> int | None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        (flags,) = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0)))
        return int(flags)
    except OSError:
        return None
    finally:
        os.close(fd)


def fs_type(path: Path) -> str:
    out = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, timeout=10, check=True
    )
    return out.stdout.strip()


def test_tmp_is_a_top_directory_and_the_flag_stays_there(tmp_path: Path) -> None:
    if inode_flags(tmp_path) is None:
        pytest.skip(f"{tmp_path}'s file system has no inode flags")
    root = tmp_path / "images"
    store = ImageStore(root, ImageConfig())
    try:
        flags = inode_flags(store.tmp_dir)
        if fs_type(root) != "ext2/ext3":  # how stat(1) names ext4 too
            pytest.skip(f"{root} is on {fs_type(root)}: the flag is ext4's")
        assert flags is not None and flags & FS_TOPDIR_FL, f"tmp/ flags {flags}"
        # Not inherited: a layer made in tmp/ (and everything in it) is an ordinary tree.
        layer = store.tmp_dir / "layer-x" / "diff" / "usr"
        layer.mkdir(parents=True)
        for path in (layer.parent.parent, layer.parent, layer):
            assert not (inode_flags(path) or 0) & FS_TOPDIR_FL, path
        # Nothing else of the store carries it.
        assert not (inode_flags(root) or 0) & FS_TOPDIR_FL
        assert not (inode_flags(store.layers_dir) or 0) & FS_TOPDIR_FL
    finally:
        store.close()
    # Opening the store again (tmp/ emptied at start) keeps the flag.
    again = ImageStore(root, ImageConfig())
    try:
        assert not list(again.tmp_dir.iterdir())
        assert (inode_flags(again.tmp_dir) or 0) & FS_TOPDIR_FL
    finally:
        again.close()
