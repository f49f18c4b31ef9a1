"""ImageStore: pulls images into a content-addressed, layered store and answers for them.

On disk, under the persistent root:
    layers/<chain-id hex>/diff   one unpacked layer, shared by every image that stacks on it
    tmp/                         downloads and unpacks in progress (same file system, for rename);
                                 marked ``chattr +T`` where the file system has the flag (see
                                 ``_spread_new_trees``): each layer made there gets fresh inodes
    pycri.db                     image records (imageservice.db)

A layer directory is made in tmp/ and renamed into place only once complete and verified,
so a crash never leaves a half layer that counts as present; tmp/ is emptied at start.

Threads and locks (pulls, removals and imports run in worker threads; queries run anywhere,
the event loop included, and never touch the disk):
- ``_view``: the images and their names, an immutable snapshot that writers replace whole.
  ``list_images``, ``resolve``, ``get`` and ``layer_dirs`` read it with no lock at all.
- ``_state_lock``: guards the small mutable maps (``_view`` swaps, ``_layers``, ``_pins``,
  ``_jobs``). Held only for dictionary work, never across a file system call or SQLite, so
  ``hold_layers`` (CreateContainer) and ``release_layers`` never wait for a disk.
- ``_writer_lock``: serialises the writers' durable steps (a layer's rename, directory fsync
  and SQLite commit; an image's commit; a removal's commit; a collection's deletions). A
  writer commits first and publishes to the maps afterwards, so nobody sees what is not yet
  durable. Order: ``_writer_lock`` before ``_state_lock``, never the other way round.
A layer is deleted only after a decision taken under ``_state_lock`` that no image, pull or
container holds it; the same decision drops it from ``_layers``, so that a hold or a pull
coming afterwards either is seen by it or no longer finds the layer.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import json
import os
import shutil
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import structlog

from cri_runtime import failpoints
from cri_runtime.errors import (
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    from_os_error,
)
from imageservice.cancel import Cancellation
from imageservice.config import ImageConfig
from imageservice.db import ImageDB, ImageRecord, LayerRecord, LayerRef, manifest_annotations
from imageservice.diskusage import disk_usage, disk_usage_of_dir
from imageservice.platform import describe, host_platform
from imageservice.reference import Reference, looks_like_image_id, parse_reference, validate_digest
from imageservice.registry import Credentials, Manifest, RegistrySession
from imageservice.unpack import unpack_layer

log = structlog.get_logger("pycri.images")

INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    @classmethod
    def parse(cls, raw: object, what: str) -> Descriptor:
        if not isinstance(raw, dict):
            raise InvalidArgument(f"{what}: descriptor is not a JSON object")
        digest, size = raw.get("digest"), raw.get("size")
        if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"{what}: descriptor needs a digest and a non-negative size")
        validate_digest(digest)
        return cls(str(raw.get("mediaType", "")), digest, size)


@dataclass
class _LayerJob:
    """One download-and-unpack of a layer, shared by every pull that needs it."""

    chain_id: str
    future: Future[LayerRecord]
    cancel: threading.Event = field(default_factory=Cancellation)
    waiters: int = 0


class PullObserver(Protocol):
    """Told of pull progress (pycri's metrics); called from pull and download threads."""

    def pull_bytes_received(self, count: int) -> None: ...

    def pull_finished(self, result: str, seconds: float) -> None: ...


@dataclass(frozen=True)
class _ImageIndex:
    """The images and their names at one moment. Never changed once published: writers
    build a new one (the records in it are never changed either) and swap it in."""

    images: Mapping[str, ImageRecord]
    names: Mapping[str, str]  # repo tag or repo digest -> image id


@dataclass(frozen=True)
class FsUsage:
    mountpoint: str
    used_bytes: int
    inodes_used: int
    timestamp_ns: int


class ImageStore:
    def __init__(self, root: Path, config: ImageConfig) -> None:
        self.root = root
        self.config = config
        self.layers_dir = root / "layers"
        self.tmp_dir = root / "tmp"
        for directory in (root, self.layers_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o711)
        _spread_new_trees(self.tmp_dir)
        self.platform = host_platform(config.platform)
        self._pinned = {str(parse_reference(name)) for name in config.pinned_images}
        self._clear_tmp()
        self.db = ImageDB(root / "pycri.db")
        self._state_lock = threading.Lock()
        self._writer_lock = threading.Lock()
        self._view = _ImageIndex({}, {})
        self._layers: dict[str, LayerRecord] = {}  # committed layers only
        self._pins: Counter[str] = Counter()  # chain id -> pulls and containers using it
        self._jobs: dict[str, _LayerJob] = {}
        self._workers = ThreadPoolExecutor(config.max_concurrent_downloads, thread_name_prefix="layer")
        self.pull_observer: PullObserver | None = None
        self._load()

    # --- start-up ------------------------------------------------------------

    def _clear_tmp(self) -> None:
        for entry in self.tmp_dir.iterdir():
            _remove_tree(entry)

    def _load(self) -> None:
        self._layers = self.db.load_layers()
        for chain_id in list(self._layers):
            if not self._layer_path(chain_id).is_dir():
                log.warning("layer recorded but missing on disk; forgetting it", chain_id=chain_id)
                self.db.remove_layer(chain_id)
                del self._layers[chain_id]
        images: dict[str, ImageRecord] = {}
        for record in self.db.load_images():
            missing = [layer.chain_id for layer in record.layers if layer.chain_id not in self._layers]
            if missing:
                log.warning("image lost layers; dropping its record", image=record.id, missing=missing)
                self.db.delete_image(record.id)
                continue
            record.pinned = self._is_pinned(record)
            images[record.id] = record
        self._view = _index_of(images)
        # Layer directories nothing records are leftovers of a crash between rename and commit.
        known = {c.removeprefix("sha256:") for c in self._layers}
        for entry in self.layers_dir.iterdir():
            if entry.name not in known:
                _remove_tree(entry)

    def collect_unused(self) -> None:
        """Remove layers nothing uses; call once containers have re-taken their holds."""
        with self._state_lock:
            candidates = list(self._layers)
        self._collect_layers(candidates)

    def close(self) -> None:
        with self._state_lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel.set()
        self._workers.shutdown(wait=True, cancel_futures=True)
        self.db.close()

    # --- queries ---------------------------------------------------------------

    def _is_pinned(self, record: ImageRecord) -> bool:
        return any(name in self._pinned for name in (*record.repo_tags, *record.repo_digests))

    def list_images(self) -> list[ImageRecord]:
        return list(self._view.images.values())

    def resolve(self, text: str) -> ImageRecord | None:
        """Find an image by ID (full or ``sha256:`` hex), tag, digest reference or short ID."""
        if not text:
            raise InvalidArgument("image reference is empty")
        view = self._view  # one snapshot for the whole lookup
        if looks_like_image_id(text):
            full_id = "sha256:" + text.removeprefix("sha256:")
            if full_id in view.images:
                return view.images[full_id]
        ref = None
        try:
            ref = parse_reference(text)
        except InvalidArgument:
            if not looks_like_image_id(text) and not _is_hex_prefix(text):
                raise
        image_id: str | None = None
        if ref is not None:
            if ref.digest:
                # Only this repository's digest: another repository's image with the same
                # manifest is not what the caller named (containerd matches exactly too).
                image_id = view.names.get(f"{ref.repository}@{ref.digest}")
            elif ref.tagged:
                image_id = view.names.get(ref.tagged)
            if image_id:
                return view.images[image_id]
        if _is_hex_prefix(text) and len(text) >= 12:
            matches = [i for i in view.images if i.removeprefix("sha256:").startswith(text)]
            if len(matches) == 1:
                return view.images[matches[0]]
        return None

    def get(self, text: str) -> ImageRecord:
        record = self.resolve(text)
        if record is None:
            raise NotFound(f"image {text!r} is not present")
        return record

    def layer_dirs(self, image_id: str) -> list[Path]:
        """The image's unpacked layer directories, lowest first (overlayfs wants them reversed)."""
        record = self._view.images.get(image_id)
        if record is None:
            raise NotFound(f"image {image_id!r} is not present")
        return [self._layer_path(layer.chain_id) / "diff" for layer in record.layers]

    def hold_layers(self, image_id: str) -> list[str]:
        """Keep an image's layers while a container uses them; pair with ``release_layers``."""
        # Under the state lock, so that a collection either sees this hold or has already
        # taken the image out of the view (and then this raises NotFound).
        with self._state_lock:
            record = self._view.images.get(image_id)
            if record is None:
                raise NotFound(f"image {image_id!r} is not present")
            chains = [layer.chain_id for layer in record.layers]
            self._pins.update(chains)
            return chains

    def hold_chains(self, chains: list[str]) -> None:
        """Re-take holds recorded before a restart (a container's layers)."""
        with self._state_lock:
            self._pins.update(chains)

    def release_layers(self, chains: list[str]) -> None:
        with self._state_lock:
            self._pins.subtract(chains)
        self._collect_layers(chains)

    def fs_usage(self) -> FsUsage:
        """What the layers cost (recorded when each was unpacked) plus the layers directory
        itself. Touches the disk (one lstat): call it from a worker thread."""
        with self._state_lock:
            used = sum(layer.size for layer in self._layers.values())
            inodes = sum(layer.inodes for layer in self._layers.values())
        own, _ = disk_usage_of_dir(self.layers_dir)
        used += own
        inodes += 1
        return FsUsage(str(self.layers_dir), used, inodes, time.time_ns())

    # --- removal ---------------------------------------------------------------

    def remove(self, text: str) -> str | None:
        """Remove the image ``text`` names, with every tag; None when there was none."""
        with self._writer_lock:
            # Resolved under the writer lock: only writers change the view, so it stays put.
            record = self.resolve(text)
            if record is None:
                return None
            self.db.delete_image(record.id)
            images = {k: v for k, v in self._view.images.items() if k != record.id}
            with self._state_lock:
                self._view = _index_of(images)
        failpoints.hit("image.remove_after_record")
        log.info("image removed", image=record.id, tags=record.repo_tags)
        self._collect_layers([layer.chain_id for layer in record.layers])
        return record.id

    def _collectable(self, candidates: Iterable[str]) -> list[str]:
        """The layers among ``candidates`` no image, pull or container uses. Caller holds
        ``_state_lock``."""
        used = {layer.chain_id for rec in self._view.images.values() for layer in rec.layers}
        out = []
        for chain_id in set(candidates):
            job = self._jobs.get(chain_id)
            if chain_id in used or self._pins[chain_id] > 0 or (job and not job.future.done()):
                continue
            if chain_id in self._layers:
                out.append(chain_id)
        return out

    def _collect_layers(self, candidates: Iterable[str]) -> None:
        """Delete the layers among ``candidates`` that no image, pull or container uses."""
        candidates = set(candidates)
        with self._state_lock:
            if not self._collectable(candidates):
                return  # the usual case (a container's layers still belong to an image): no wait
        with self._writer_lock:
            with self._state_lock:
                doomed = self._collectable(candidates)
                # Gone from the maps at once: a hold or a pull from now on no longer finds
                # these layers (a pull downloads them anew, and publishes after we are done).
                dropped = {chain_id: self._layers.pop(chain_id) for chain_id in doomed}
            if not doomed:
                return
            try:
                self.db.remove_layers(doomed)
            except BaseException:
                with self._state_lock:
                    self._layers.update(dropped)
                raise
            trash: list[Path] = []
            for chain_id in doomed:
                # Renamed away under the writer lock, so that no pull publishes onto a
                # half-deleted layer; the slow removal happens after.
                path = self.tmp_dir / f"trash-{uuid.uuid4().hex}"
                os.rename(self._layer_path(chain_id), path)
                trash.append(path)
        for path in trash:
            _remove_tree(path)

    # --- pulling -----------------------------------------------------------------

    def pull(self, text: str, credentials: Credentials, cancel: threading.Event) -> ImageRecord:
        """Pull ``text`` into the store; return its record. Runs in a worker thread."""
        started = time.monotonic()
        result = "failure"
        try:
            record = self._pull(text, credentials, cancel)
            result = "success"
            return record
        finally:
            if self.pull_observer is not None:
                if result != "success" and cancel.is_set():
                    result = "cancelled"
                self.pull_observer.pull_finished(result, time.monotonic() - started)

    def _received(self, count: int) -> None:
        if self.pull_observer is not None:
            self.pull_observer.pull_bytes_received(count)

    def _pull(self, text: str, credentials: Credentials, cancel: threading.Event) -> ImageRecord:
        ref = parse_reference(text)
        started = time.monotonic()
        session = RegistrySession(ref, self.config, credentials, cancel)
        top = session.fetch_manifest(ref.pull_reference, expect_digest=ref.digest)
        self._received(len(top.body))
        manifest = top
        if top.media_type in INDEX_TYPES:
            child = self._pick_platform(ref, top)
            manifest = session.fetch_manifest(child.digest, expect_digest=child.digest)
            self._received(len(manifest.body))
            if manifest.media_type in INDEX_TYPES:
                raise InvalidArgument(f"image {ref}: index {child.digest} points at another index")
        config_desc, layer_descs = self._parse_image_manifest(ref, manifest)
        config_bytes = session.fetch_config(config_desc.digest, config_desc.size)
        self._received(len(config_bytes))
        diff_ids = self._parse_config(ref, config_bytes, len(layer_descs))
        self._check_platform(ref, config_bytes)
        chains = chain_ids(diff_ids)
        image_id = config_desc.digest
        with self._state_lock:
            self._pins.update(chains)
        try:
            self._fetch_layers(session, ref, layer_descs, diff_ids, chains, cancel)
            if cancel.is_set():
                raise DeadlineExceeded(f"pull of {ref} cancelled")
            size = top.body.__len__() + config_desc.size + sum(d.size for d in layer_descs)
            if manifest is not top:
                size += len(manifest.body)
            record = self._record(
                ref,
                top.digest,
                image_id,
                config_bytes,
                size,
                layer_descs,
                diff_ids,
                chains,
                manifest_annotations(manifest.document),
            )
        finally:
            with self._state_lock:
                self._pins.subtract(chains)
            # On failure this removes what this pull alone brought in; on success it finds nothing.
            self._collect_layers(chains)
        log.info(
            "image pulled",
            image=str(ref),
            id=image_id,
            layers=len(chains),
            seconds=round(time.monotonic() - started, 3),
        )
        return record

    def _pick_platform(self, ref: Reference, index: Manifest) -> Descriptor:
        entries = index.document.get("manifests")
        if not isinstance(entries, list):
            raise InvalidArgument(f"image {ref}: index {index.digest} has no manifests list")
        available = []
        for raw in entries:
            platform = raw.get("platform", {}) if isinstance(raw, dict) else {}
            if not isinstance(platform, dict):
                continue
            available.append(describe(platform))
            if self.platform.matches(platform):
                return Descriptor.parse(raw, f"image {ref}: index entry")
        raise NotFound(
            f"image {ref} has no manifest for platform {self.platform}; "
            f"available: {', '.join(available) or 'none'}"
        )

    def _parse_image_manifest(
        self, ref: Reference, manifest: Manifest
    ) -> tuple[Descriptor, list[Descriptor]]:
        doc = manifest.document
        config = Descriptor.parse(doc.get("config"), f"image {ref}: config")
        raw_layers = doc.get("layers")
        if not isinstance(raw_layers, list):
            raise InvalidArgument(f"image {ref}: manifest {manifest.digest} has no layers list")
        layers = [Descriptor.parse(raw, f"image {ref}: layer {i}") for i, raw in enumerate(raw_layers)]
        for layer in layers:
            if layer.media_type not in LAYER_TYPES:
                raise InvalidArgument(
                    f"image {ref}: layer {layer.digest} has unsupported media type {layer.media_type!r}"
                )
        return config, layers

    def _check_platform(self, ref: Reference, config_bytes: bytes) -> None:
        """A single-platform image (or a child pulled by digest) must be for this host."""
        config = json.loads(config_bytes)
        platform = {k: config.get(k, "") for k in ("os", "architecture", "variant") if config.get(k)}
        if "os" in platform and "architecture" in platform and not self.platform.matches(platform):
            raise FailedPrecondition(
                f"image {ref} is for {describe(platform)}; this host runs {self.platform} "
                "(set image.platform to pull for another platform)"
            )

    def _parse_config(self, ref: Reference, config_bytes: bytes, layer_count: int) -> list[str]:
        try:
            config = json.loads(config_bytes)
            diff_ids = config["rootfs"]["diff_ids"]
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument(
                f"image {ref}: config is not an image config with rootfs.diff_ids"
            ) from None
        if not isinstance(diff_ids, list) or len(diff_ids) != layer_count:
            raise InvalidArgument(
                f"image {ref}: config lists {len(diff_ids) if isinstance(diff_ids, list) else 0} diff IDs "
                f"for {layer_count} layers"
            )
        for diff_id in diff_ids:
            if not isinstance(diff_id, str):
                raise InvalidArgument(f"image {ref}: diff ID {diff_id!r} is not a string")
            validate_digest(diff_id)
        return diff_ids

    def _fetch_layers(
        self,
        session: RegistrySession,
        ref: Reference,
        descs: list[Descriptor],
        diff_ids: list[str],
        chains: list[str],
        cancel: threading.Event,
    ) -> None:
        jobs: list[_LayerJob] = []
        started: list[_LayerJob] = []
        with self._state_lock:
            for desc, diff_id, chain_id in zip(descs, diff_ids, chains, strict=True):
                if chain_id in self._layers:
                    continue
                job = self._jobs.get(chain_id)
                if job is None:
                    job_cancel = Cancellation()
                    job_session = RegistrySession(
                        ref, self.config, session.credentials, job_cancel, _auth=session._auth
                    )
                    future = self._workers.submit(
                        self._download_and_unpack, job_session, desc, diff_id, chain_id
                    )
                    job = _LayerJob(chain_id, future, job_cancel)
                    self._jobs[chain_id] = job
                    started.append(job)
                job.waiters += 1
                jobs.append(job)
        for job in started:
            # Outside the lock: a future already done runs the callback here, and it locks.
            job.future.add_done_callback(functools.partial(self._job_done, job))
        pending = list(jobs)
        try:
            while pending:
                job = pending[0]
                try:
                    job.future.result(timeout=0.05)
                except FutureTimeout:
                    if cancel.is_set():
                        raise DeadlineExceeded(f"pull of {ref} cancelled") from None
                    continue
                pending.pop(0)
                self._release_job(job)
        except BaseException:
            for job in pending:
                self._release_job(job)
            # Let cancelled jobs finish cleaning up, so the caller's error means "nothing left".
            for job in pending:
                if job.cancel.is_set():
                    try:
                        job.future.exception(timeout=10)  # returns the job's error, raises none
                    except CancelledError:
                        pass  # never started: nothing to clean
                    except FutureTimeout:
                        log.warning("layer download still cleaning up after 10s", chain_id=job.chain_id)
            raise

    def _release_job(self, job: _LayerJob) -> None:
        with self._state_lock:
            job.waiters -= 1
            if job.waiters <= 0:
                # Nobody wants this layer any more: stop downloading it.
                job.cancel.set()

    def _job_done(self, job: _LayerJob, _future: object) -> None:
        with self._state_lock:
            if self._jobs.get(job.chain_id) is job:
                del self._jobs[job.chain_id]

    def _download_and_unpack(
        self, session: RegistrySession, desc: Descriptor, diff_id: str, chain_id: str
    ) -> LayerRecord:
        work = self.tmp_dir / f"layer-{uuid.uuid4().hex}"
        work.mkdir(mode=0o700)
        try:
            blob = work / "blob"
            session.download_blob(desc.digest, desc.size, blob, progress=self._received)
            unpacked = work / "layer"
            (unpacked / "diff").mkdir(parents=True, mode=0o755)
            result = unpack_layer(blob, unpacked / "diff", blob_digest=desc.digest, cancel=session.cancel)
            if result.diff_id != diff_id:
                raise DataLoss(
                    f"layer {desc.digest}: uncompressed content has digest {result.diff_id}, "
                    f"but the image config says {diff_id}"
                )
            _keep_blob(blob, unpacked, desc.digest)
            _syncfs(unpacked)
            failpoints.hit("image.after_download")
            # What the layer costs on disk, as du counts it (ImageFsInfo adds these up).
            layer = LayerRecord(chain_id, diff_id, *disk_usage(unpacked))
            with self._writer_lock:
                # A pull that gives up on this layer after this check waits for the job to
                # end, then collects what it published.
                if session.cancel.is_set():
                    raise DeadlineExceeded(f"download of layer {desc.digest} cancelled")
                published = self._publish_layer(unpacked, layer)
                failpoints.hit("image.after_layer")
            return published
        finally:
            _remove_tree(work)

    def _record(
        self,
        ref: Reference,
        manifest_digest: str | None,
        image_id: str,
        config_bytes: bytes,
        size: int,
        descs: list[Descriptor],
        diff_ids: list[str],
        chains: list[str],
        annotations: Mapping[str, str] | None = None,
    ) -> ImageRecord:
        repo_digest = f"{ref.repository}@{manifest_digest}" if manifest_digest and ref.domain else None
        with self._writer_lock:
            # Only writers change the view and the layers, so what we read here stays true
            # until we publish; readers go on using the old view meanwhile.
            view = self._view
            with self._state_lock:
                vanished = [chain_id for chain_id in chains if chain_id not in self._layers]
            if vanished:
                raise FailedPrecondition(f"image {ref}: layer {vanished[0]} vanished during the pull")
            existing = view.images.get(image_id)
            layers = [
                LayerRef(chain, diff, desc.digest, desc.size)
                for chain, diff, desc in zip(chains, diff_ids, descs, strict=True)
            ]
            record = ImageRecord(
                id=image_id,
                manifest_digest=existing.manifest_digest if existing else (manifest_digest or ""),
                config_bytes=config_bytes,
                size=existing.size if existing else size,
                layers=existing.layers if existing else layers,
                repo_tags=list(existing.repo_tags) if existing else [],
                repo_digests=list(existing.repo_digests) if existing else [],
                created_at=existing.created_at if existing else time.time(),
                # (A store from before annotations were kept learns them on the next pull.)
                annotations=(existing.annotations if existing else {}) or dict(annotations or {}),
            )
            # With both a tag and a digest the digest decides and the tag is dropped, as in containerd.
            if ref.tagged and not ref.digest and ref.tagged not in record.repo_tags:
                record.repo_tags.append(ref.tagged)
            if repo_digest and repo_digest not in record.repo_digests:
                record.repo_digests.append(repo_digest)
            record.pinned = self._is_pinned(record)
            images = dict(view.images)
            images[image_id] = record
            # A tag moved from another image: that image keeps only its other names (a new
            # record: the old one may be in a reader's hands).
            for name in (*record.repo_tags, *record.repo_digests):
                previous = view.names.get(name)
                if previous and previous != image_id and previous in images:
                    other = images[previous]
                    moved = replace(
                        other,
                        repo_tags=[t for t in other.repo_tags if t != name],
                        repo_digests=[d for d in other.repo_digests if d != name],
                    )
                    moved.pinned = self._is_pinned(moved)
                    images[previous] = moved
            self.db.save_image(record)
            with self._state_lock:
                self._view = _index_of(images)
            return record

    def import_image(
        self,
        names: list[str],
        manifest_digest: str | None,
        config_bytes: bytes,
        layer_blobs: Sequence[tuple[Descriptor, Path | None]],
        cancel: threading.Event | None = None,
        annotations: Mapping[str, str] | None = None,
        prepared: Mapping[str, Path] | None = None,
    ) -> ImageRecord:
        """Store an image whose blobs are already on local disk (from an archive, or a commit).

        ``names`` are full references; with none the image is known by its ID only. A blob may
        be None for a layer the store already has (a commit's parent layers): such a layer is
        stacked on, never copied. ``prepared`` maps a diff ID to a layer directory pycri wrote
        itself in the store's tmp/ (``diff/`` plus ``blobs/<hex>`` of its blob: a commit's,
        from ``imageservice.packer``): it is moved into place instead of unpacking a blob; one
        not used stays where it is, for the caller to remove.
        """
        cancel = cancel or threading.Event()
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        anonymous = Reference("", "", None, None)
        diff_ids = self._parse_config(anonymous, config_bytes, len(layer_blobs))
        chains = chain_ids(diff_ids)
        refs = [parse_reference(n) for n in names] or [anonymous]
        with self._state_lock:
            self._pins.update(chains)
        try:
            for (desc, blob), diff_id, chain_id in zip(layer_blobs, diff_ids, chains, strict=True):
                with self._state_lock:
                    present = chain_id in self._layers
                if not present:
                    if prepared and diff_id in prepared:
                        self._publish_prepared(prepared[diff_id], desc, diff_id, chain_id)
                    elif blob is None:
                        raise FailedPrecondition(f"layer {chain_id} is no longer in the store")
                    else:
                        self._unpack_local(blob, desc, diff_id, chain_id, cancel)
            size = len(config_bytes) + sum(desc.size for desc, _ in layer_blobs)
            descs = [d for d, _ in layer_blobs]
            records = [
                self._record(
                    ref,
                    manifest_digest,
                    config_digest,
                    config_bytes,
                    size,
                    descs,
                    diff_ids,
                    chains,
                    annotations,
                )
                for ref in refs
            ]
            return records[-1]
        finally:
            with self._state_lock:
                self._pins.subtract(chains)
            self._collect_layers(chains)

    def _unpack_local(
        self, blob: Path, desc: Descriptor, diff_id: str, chain_id: str, cancel: threading.Event
    ) -> None:
        work = self.tmp_dir / f"layer-{uuid.uuid4().hex}"
        (work / "layer" / "diff").mkdir(parents=True, mode=0o755)
        try:
            actual = _sha256_file(blob)
            if actual != desc.digest:
                raise DataLoss(f"layer {desc.digest}: archive content has digest {actual}")
            result = unpack_layer(blob, work / "layer" / "diff", blob_digest=desc.digest, cancel=cancel)
            if result.diff_id != diff_id:
                raise DataLoss(
                    f"layer {desc.digest}: uncompressed content has digest {result.diff_id}, "
                    f"but the image config says {diff_id}"
                )
            _keep_blob(blob, work / "layer", desc.digest, link=True)
            _syncfs(work)
            layer = LayerRecord(chain_id, diff_id, *disk_usage(work / "layer"))
            with self._writer_lock:
                self._publish_layer(work / "layer", layer)
        finally:
            _remove_tree(work)

    def _publish_prepared(self, layer_dir: Path, desc: Descriptor, diff_id: str, chain_id: str) -> None:
        if layer_dir.parent.parent != self.tmp_dir or not layer_dir.is_dir() or layer_dir.is_symlink():
            raise InvalidArgument(f"prepared layer {layer_dir} is not a directory under {self.tmp_dir}")
        if not (layer_dir / "blobs" / desc.digest.removeprefix("sha256:")).is_file():
            raise InvalidArgument(f"prepared layer {layer_dir} lacks its blob {desc.digest}")
        _syncfs(layer_dir)
        layer = LayerRecord(chain_id, diff_id, *disk_usage(layer_dir))
        with self._writer_lock:
            self._publish_layer(layer_dir, layer)

    def _publish_layer(self, unpacked: Path, layer: LayerRecord) -> LayerRecord:
        """Move an unpacked, synced layer into place and record it; the layer already
        present when another pull or import got there first. Caller holds ``_writer_lock``
        (which alone adds or removes layers), never ``_state_lock``."""
        with self._state_lock:
            present = self._layers.get(layer.chain_id)
        if present is not None:
            return present
        os.rename(unpacked, self._layer_path(layer.chain_id))
        _fsync_dir(self.layers_dir)
        self.db.add_layer(layer)
        # Published only once durable: a reader never counts a layer a crash would lose.
        with self._state_lock:
            self._layers[layer.chain_id] = layer
        return layer

    def _layer_path(self, chain_id: str) -> Path:
        return self.layers_dir / chain_id.removeprefix("sha256:")

    def layer_blob(self, chain_id: str, blob_digest: str) -> Path | None:
        """The compressed blob a layer was unpacked from, when the store kept it (pushes and
        exports read it; layers stored before blobs were kept have none)."""
        path = self._layer_path(chain_id) / "blobs" / blob_digest.removeprefix("sha256:")
        return path if path.is_file() else None

    def tag(self, text: str, name: str) -> ImageRecord:
        """Give the image ``text`` names the tag ``name`` (moved from any image that had it)."""
        ref = parse_reference(name)
        if ref.digest or not ref.tag:
            raise InvalidArgument(f"{name!r}: a tag is NAME[:TAG], without a digest")
        record = self.get(text)
        descs = [Descriptor("", layer.blob_digest, layer.blob_size) for layer in record.layers]
        return self._record(
            ref,
            None,
            record.id,
            record.config_bytes,
            record.size,
            descs,
            [layer.diff_id for layer in record.layers],
            [layer.chain_id for layer in record.layers],
            record.annotations,
        )


def _index_of(images: dict[str, ImageRecord]) -> _ImageIndex:
    names = {name: r.id for r in images.values() for name in (*r.repo_tags, *r.repo_digests)}
    return _ImageIndex(images, names)


_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(path: Path) -> None:
    """Flush the file system holding ``path``: an unpacked layer must be on disk before the
    database says it is present (one call per layer, not one fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _keep_blob(blob: Path, layer_dir: Path, digest: str, *, link: bool = False) -> None:
    """Keep a layer's compressed blob inside its (not yet published) layer directory, so it
    goes with the layer: pushes and exports send the very bytes the diff ID was computed from."""
    kept = layer_dir / "blobs"
    kept.mkdir(mode=0o700, exist_ok=True)
    target = kept / digest.removeprefix("sha256:")
    if link:
        os.link(blob, target)
    else:
        os.rename(blob, target)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_hex_prefix(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdef" for c in text)


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


def _spread_new_trees(path: Path) -> None:
    """Mark ``path`` as a top of directory hierarchies (``chattr +T``): ext4's Orlov allocator
    then places each directory made in it (a layer being unpacked or committed) in a block
    group with few directories, and its files beside it, instead of in ``path``'s own group.

    That group is where earlier layers were made and deleted. On ext4 without a journal, the
    inode allocator tests the group's free inodes one by one from its start, skipping those
    deleted recently (``recently_deleted()``, a buffer-cache lookup each), for every new inode:
    on this project's test host, after a few layers were removed, creating a layer's 3,200
    files took 1-2 s of kernel time in such a group, 0.05 s in a fresh one. Only a placement
    hint: the flag is not inherited below, changes nothing else, and is skipped where the file
    system has no such flag (XFS, btrfs, tmpfs)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            (flags,) = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("i", 0)))
            if not flags & _FS_TOPDIR_FL:
                fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", flags | _FS_TOPDIR_FL))
        finally:
            os.close(fd)


def _remove_tree(path: Path) -> None:
    """Remove ``path`` even when it holds whiteout devices or read-only directories."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("cannot remove", path=str(path), error=str(exc))
        raise from_os_error(exc, f"cannot remove {path}") from exc
