"""The seed's memory claim, measured: containers of two different images that share a base layer
read one file of that layer, and the host's page cache holds it once.

Overlay passes reads of a lower file through to the lower inode, and pycri unpacks a layer once
for every image stacked on it, so both containers read the same inode of the same file system.
Its pages are cached once and charged to the memory cgroup that first read them: after
container A has read the file, container B's reading it adds (almost) nothing to B's cgroup.
"""

from __future__ import annotations

import ctypes
import os
import subprocess

import pytest

from cri_runtime.host import cgroups
from tests.support.images import Image, busybox_layer, layer_from_files, push_image, random_layer
from tests.support.pods import Env, container_pid, exec_out, pod_cgroup
from tests.support.registry import Registry

pytestmark = pytest.mark.root

BIG = 48 * 1024 * 1024
BIG_FILE = "/random/seed-7/file-0.bin"
_POSIX_FADV_DONTNEED = 4


def _file_cache_bytes(cgroup_path: str) -> int:
    """Page cache charged to a cgroup: memory.stat ``cache`` (v1) or ``file`` (v2)."""
    stat_file = cgroups.controllers()["memory"] / cgroup_path.lstrip("/") / "memory.stat"
    fields = dict(line.split() for line in stat_file.read_text().splitlines())
    return int(fields["cache"] if "cache" in fields else fields["file"])


def _resident_bytes(path: str) -> int:
    """Bytes of ``path`` in the page cache (util-linux fincore)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", path],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return int(out.split()[0])


def _drop_from_cache(path: str) -> None:
    """Evict one file's clean pages (the unpack wrote them, charged to the daemon), so the test
    starts with the file uncached; nothing else on the host is touched."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.posix_fadvise(fd, ctypes.c_long(0), ctypes.c_long(0), _POSIX_FADV_DONTNEED) == 0
    finally:
        os.close(fd)


def test_a_shared_base_layer_file_is_cached_once_for_two_images(
    env: Env, registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    base = random_layer(BIG, 7, files=1)
    image_a = Image.build([busybox_layer(), base, layer_from_files({"a.txt": "a\n"})], cmd=["sh"])
    image_b = Image.build([busybox_layer(), base, layer_from_files({"b.txt": "b\n"})], cmd=["sh"])
    push_image(registry, "test/shared-a", "1", image_a)
    push_image(registry, "test/shared-b", "1", image_b)
    ref_a, ref_b = f"{registry.host}/test/shared-a:1", f"{registry.host}/test/shared-b:1"
    assert env.cri.pull(ref_a) != env.cri.pull(ref_b)  # two different images

    pod = env.pod("sharing")
    a = env.cri.create_container(pod, "a", ref_a, command=["sleep", "1000"], log_path="a.log")
    b = env.cri.create_container(pod, "b", ref_b, command=["sleep", "1000"], log_path="b.log")
    env.cri.start_container(a)
    env.cri.start_container(b)

    # One file on the host: the shared layer's, under both overlays.
    host_files = [p for p in (env.daemon.root / "layers").glob(f"*/diff{BIG_FILE}")]
    assert len(host_files) == 1, host_files
    host_file = str(host_files[0])
    host_inode = os.stat(host_file).st_ino
    inode_a = int(exec_out(env.cri, a, "stat", "-c", "%i", BIG_FILE))
    inode_b = int(exec_out(env.cri, b, "stat", "-c", "%i", BIG_FILE))
    assert inode_a == inode_b == host_inode

    _drop_from_cache(host_file)
    assert _resident_bytes(host_file) < BIG // 10
    pod_path = pod_cgroup(env.cri, pod)
    cgroup_a, cgroup_b = cgroups.container_path(pod_path, a), cgroups.container_path(pod_path, b)

    a_before, b_before = _file_cache_bytes(cgroup_a), _file_cache_bytes(cgroup_b)
    exec_out(env.cri, a, "sh", "-c", f"cat {BIG_FILE} > /dev/null")
    a_after = _file_cache_bytes(cgroup_a)
    resident_after_a = _resident_bytes(host_file)
    exec_out(env.cri, b, "sh", "-c", f"cat {BIG_FILE} > /dev/null")
    b_after = _file_cache_bytes(cgroup_b)
    resident_after_b = _resident_bytes(host_file)

    charged_a, charged_b = a_after - a_before, b_after - b_before
    with capsys.disabled():
        print(
            f"\nshared {BIG >> 20} MiB file, inode {host_inode} in both containers: "
            f"A's cgroup page cache +{charged_a >> 20} MiB, then B's +{charged_b >> 10} KiB; "
            f"file resident {resident_after_a >> 20} MiB after A, {resident_after_b >> 20} MiB after B"
        )
    assert charged_a >= BIG * 9 // 10  # A brought the file into the cache, charged to A
    assert charged_b < BIG // 20  # B found it there: cached once, not again for B
    assert resident_after_b == resident_after_a >= BIG * 9 // 10
    assert container_pid(env.cri, b) > 0
