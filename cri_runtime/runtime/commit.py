"""Commit a container: its overlay upper directory becomes a new image, stacked on its image's
layers in the same store (Docker's ``docker commit``, in place, with no second image store).

Steps: find the container (NotFound for an unknown or removed one, FailedPrecondition for one
being created or removed); under the container's lock (a stop or removal waits for the commit)
pack the upper directory in one pass, optionally with the container's cgroup frozen: the gzip
blob, its digests and the new layer directory are written together (``imageservice.packer``);
then the image store moves that layer into place and records the image in one commit.
Everything lives in the store's tmp/ until then and is removed on every outcome.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from cri_runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from cri_runtime.host import freezer
from cri_runtime.runtime.containers import ContainerManager
from imageservice.commit import GZIP_LAYER, apply_changes, commit_config
from imageservice.db import ImageRecord
from imageservice.packer import pack_upper
from imageservice.reference import parse_reference
from imageservice.store import Descriptor, ImageStore

log = structlog.get_logger("pycri.commit")


@dataclass(frozen=True)
class CommitRequest:
    container_id: str
    name: str = ""  # NAME[:TAG]; empty: the image is known by its ID only
    changes: list[str] = field(default_factory=list)
    pause: bool = False
    comment: str = ""
    author: str = ""


def commit_container(
    containers: ContainerManager,
    store: ImageStore,
    request: CommitRequest,
    cancel: threading.Event | None = None,
) -> ImageRecord:
    names = []
    if request.name:
        ref = parse_reference(request.name)
        if ref.digest:
            raise InvalidArgument(f"{request.name!r}: a commit is named NAME[:TAG], without a digest")
        names.append(str(ref))
    apply_changes({}, request.changes)  # refuse bad --change before any work
    container = containers.get(request.container_id)
    started = time.monotonic()
    work = store.tmp_dir / f"commit-{uuid.uuid4().hex}"
    work.mkdir(mode=0o700)
    try:
        with containers.locks.hold(container.id):
            if containers.find(container.id) is not container:
                raise NotFound(f"container {request.container_id!r} not found (removed meanwhile)")
            if container.pending in ("creating", "removing"):
                raise FailedPrecondition(f"container {container.id} is being {container.pending[:-3]}ed")
            parent = store.get(container.image_id)
            upper = Path(container.dir) / "upper"
            if not upper.is_dir():
                raise FailedPrecondition(f"container {container.id} has no writable layer at {upper}")
            pause = request.pause and container.state == "running" and container.pid > 0
            with freezer.frozen(container.pid) if pause else contextlib.nullcontext() as frozen_cgroup:
                if frozen_cgroup is not None:
                    log.info("container frozen for commit", container=container.id, cgroup=str(frozen_cgroup))
                layer_dir = work / "layer"
                (layer_dir / "diff").mkdir(parents=True, mode=0o755)
                (layer_dir / "blobs").mkdir(mode=0o700)
                packing = time.monotonic()
                packed = pack_upper(upper, work / "layer.tar.gz", cancel, layer_dir=layer_dir / "diff")
                pack_seconds = time.monotonic() - packing
        # The blob goes with its layer: pushes and exports send these very bytes.
        (work / "layer.tar.gz").rename(layer_dir / "blobs" / packed.digest.removeprefix("sha256:"))
        config_bytes = commit_config(
            parent.config,
            packed.diff_id,
            request.changes,
            comment=request.comment,
            author=request.author,
            created_by=f"pycri commit {container.id[:12]}",
        )
        blobs: list[tuple[Descriptor, Path | None]] = [
            (Descriptor("", layer.blob_digest, layer.blob_size), None) for layer in parent.layers
        ]
        blobs.append((Descriptor(GZIP_LAYER, packed.digest, packed.size), None))
        record = store.import_image(
            names, None, config_bytes, blobs, cancel, prepared={packed.diff_id: layer_dir}
        )
    finally:
        # Whiteout devices and read-only directories included; root removes them all.
        shutil.rmtree(work, ignore_errors=True)
        if work.exists():
            log.error("cannot remove the commit's work directory", path=str(work))
    log.info(
        "container committed",
        container=container.id,
        image=record.id,
        tags=record.repo_tags,
        layer=packed.digest,
        layer_bytes=packed.size,
        seconds=round(time.monotonic() - started, 3),
        pack_seconds=round(pack_seconds, 3),
    )
    return record
