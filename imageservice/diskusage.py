"""What a directory tree costs on disk, counted as ``du`` counts it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import structlog

log = structlog.get_logger("pycri.images")


def disk_usage(root: Path) -> tuple[int, int]:
    """Allocated bytes and inodes of ``root`` and everything below it, not following links;
    an inode reached through several hard links counts once (as ``du`` does)."""
    seen: set[tuple[int, int]] = set()
    used = inodes = 0
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return 0, 0
    seen.add((st.st_dev, st.st_ino))
    used, inodes = st.st_blocks * 512, 1
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # removed while we walked: it costs nothing any more
            except OSError as exc:
                log.warning("cannot count disk usage of a file", path=path, error=str(exc))
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            used += st.st_blocks * 512
            inodes += 1
    return used, inodes


def disk_usage_of_dir(directory: Path) -> tuple[int, int]:
    """The directory inode alone: its own blocks, and 1."""
    return os.lstat(directory).st_blocks * 512, 1
