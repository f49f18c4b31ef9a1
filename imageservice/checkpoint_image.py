"""Checkpoint OCI images: a container checkpoint archive as an image, the way CRI-O restores one.

CRI-O (and ``checkpointctl build``, which runs ``buildah add ARCHIVE /`` and ``buildah config
--annotation``) know a checkpoint image by the image manifest annotation
``io.kubernetes.cri-o.annotations.checkpoint.name`` (the checkpointed container's name); the
image's single layer holds the archive's members at its root (``config.dump``, ``spec.dump``,
``checkpoint/``, ``rootfs-diff.tar``, ...). ``make_checkpoint_image`` makes such an image in the
store from an archive on this node; push it like any image.
"""

from __future__ import annotations

import datetime
import json
import tarfile
import threading
import uuid
from pathlib import Path

from cri_runtime.errors import InvalidArgument, NotFound
from imageservice.commit import GZIP_LAYER, gzip_layer
from imageservice.db import ImageRecord
from imageservice.platform import host_platform
from imageservice.reference import parse_reference
from imageservice.store import Descriptor, ImageStore

CHECKPOINT_NAME_ANNOTATION = "io.kubernetes.cri-o.annotations.checkpoint.name"
_CONFIG_DUMP = "config.dump"
_REQUIRED = ("config.dump", "spec.dump", "checkpoint")
_MAX_CONFIG_DUMP = 16 << 20


def _archive_metadata(archive: Path) -> dict:
    """``config.dump`` of checkpoint ``archive``, after checking the archive has the members a
    restore needs (the content itself is checked as any layer's when the image is stored, and
    again on restore)."""
    seen: set[str] = set()
    config: dict | None = None
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for member in tar:
                name = member.name.removeprefix("./").rstrip("/")
                top = name.split("/", 1)[0]
                seen.add(top)
                if name == _CONFIG_DUMP and member.isreg() and member.size <= _MAX_CONFIG_DUMP:
                    source = tar.extractfile(member)
                    assert source is not None
                    try:
                        loaded = json.loads(source.read())
                    except (ValueError, UnicodeDecodeError) as exc:
                        raise InvalidArgument(
                            f"checkpoint archive {str(archive)!r}: config.dump is not JSON: {exc}"
                        ) from None
                    config = loaded if isinstance(loaded, dict) else None
    except tarfile.TarError as exc:
        raise InvalidArgument(f"checkpoint archive {str(archive)!r} is not a readable tar: {exc}") from None
    missing = [name for name in _REQUIRED if name not in seen]
    if missing:
        raise InvalidArgument(f"checkpoint archive {str(archive)!r} has no {', '.join(missing)}")
    if config is None:
        raise InvalidArgument(f"checkpoint archive {str(archive)!r}: config.dump is not a JSON object")
    return config


def make_checkpoint_image(
    store: ImageStore, archive: Path, name: str, cancel: threading.Event | None = None
) -> ImageRecord:
    """Store checkpoint ``archive`` as image ``name`` (NAME[:TAG]): one layer with the archive's
    members at its root, the checkpoint annotation on its manifest, its config naming the
    architecture the checkpoint was made on."""
    ref = parse_reference(name)
    if ref.digest:
        raise InvalidArgument(f"{name!r}: name the checkpoint image NAME[:TAG], without a digest")
    if not archive.is_absolute():
        raise InvalidArgument(f"checkpoint archive {str(archive)!r} must be an absolute path")
    if not archive.is_file():
        raise NotFound(f"checkpoint archive {str(archive)!r} is not a file")
    metadata = _archive_metadata(archive)
    container_name = str(metadata.get("name") or metadata.get("id") or "checkpoint")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    blob = store.tmp_dir / f"checkpoint-{uuid.uuid4().hex}.tar.gz"
    try:
        packed = gzip_layer(archive, blob)
        config = {
            "created": now,
            "architecture": str(metadata.get("architecture") or host_platform().architecture),
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [packed.diff_id]},
            "history": [{"created": now, "created_by": f"pycri checkpoint-image {archive.name}"}],
        }
        config_bytes = json.dumps(config, separators=(",", ":")).encode()
        return store.import_image(
            [str(ref)],
            None,
            config_bytes,
            [(Descriptor(GZIP_LAYER, packed.digest, packed.size), blob)],
            cancel,
            annotations={CHECKPOINT_NAME_ANNOTATION: container_name},
        )
    finally:
        blob.unlink(missing_ok=True)
