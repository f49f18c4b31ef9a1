"""Push an image of the store to a registry (OCI distribution API, the push half).

Per blob (each layer, then the config): ``HEAD`` it and skip it when the registry has it at
the right size; else offer a cross-repository mount from a repository of the same registry
the image came from (``POST .../blobs/uploads/?mount=<digest>&from=<repo>``); else upload it:
one ``PUT`` for a blob up to ``chunk_size``, ``PATCH`` chunks then a closing ``PUT`` for a
bigger one. Then the manifest is ``PUT`` with its media type: Docker schema 2 for an image
Docker made, OCI otherwise (imageservice.export.manifest_format). Authentication (bearer with
a push scope, basic) and the insecure/plain-HTTP settings come from the pull client's
configuration (imageservice.registry); mirrors are for pulls and are not pushed to.

A push changes nothing locally: a failure halfway leaves the store as it was, and the push
can be retried (blobs already sent are then skipped).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import structlog

from cri_runtime.errors import (
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from imageservice.export import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    ExportFormat,
    image_manifest,
    layer_blobs,
    manifest_format,
)
from imageservice.reference import Reference, parse_reference
from imageservice.registry import USER_AGENT, Credentials, Endpoint, RegistrySession
from imageservice.store import ImageStore

log = structlog.get_logger("pycri.push")

CHUNK_SIZE = 8 * 1024 * 1024


@dataclass
class PushResult:
    reference: str
    digest: str
    media_type: str
    uploaded: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class _Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class _Pusher:
    def __init__(
        self,
        ref: Reference,
        session: RegistrySession,
        endpoint: Endpoint,
        cancel: threading.Event,
        chunk_size: int,
    ) -> None:
        self.ref = ref
        self.session = session
        self.endpoint = endpoint
        self.cancel = cancel
        self.chunk_size = chunk_size
        self.auth: str | None = None

    # --- HTTP ----------------------------------------------------------------

    def _url(self, path_or_url: str) -> tuple[str, str, str]:
        base = f"{self.endpoint.scheme}://{self.endpoint.host}{self.endpoint.base_path}"
        target = urllib.parse.urlsplit(urllib.parse.urljoin(base + "/", path_or_url))
        path = target.path + (f"?{target.query}" if target.query else "")
        return target.scheme, target.netloc, path

    def send(
        self,
        method: str,
        path_or_url: str,
        *,
        what: str,
        body: bytes | BinaryIO | None = None,
        length: int | None = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200, 201, 202, 204),
        also: tuple[int, ...] = (),
    ) -> _Reply:
        """One request; a 401 is answered with the registry's challenge once. Statuses in
        ``also`` are returned to the caller instead of raised."""
        scheme, host, path = self._url(path_or_url)
        for attempt in range(2):
            if self.cancel.is_set():
                raise DeadlineExceeded(f"push of {self.ref} cancelled")
            sent = {"User-Agent": USER_AGENT, **(headers or {})}
            if self.auth and host == self.endpoint.host:
                sent["Authorization"] = self.auth
            if body is not None or method in ("PUT", "POST", "PATCH"):
                size = length if length is not None else (len(body) if isinstance(body, bytes) else 0)
                sent["Content-Length"] = str(size)
            start = body.tell() if body is not None and not isinstance(body, bytes) else 0
            conn = self.session._connection(self.endpoint, scheme, host)
            try:
                conn.request(method, path, body=body, headers=sent)
                resp = conn.getresponse()
                reply = _Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read(65536))
            except (OSError, http.client.HTTPException) as exc:
                raise Unavailable(
                    f"push of {self.ref}: {what}: cannot reach registry {scheme}://{host}: {exc}"
                ) from None
            finally:
                conn.close()
            if reply.status == 401 and attempt == 0:
                self.auth = self.session._authorize(self.endpoint, reply.headers.get("www-authenticate", ""))
                if self.auth:
                    if body is not None and not isinstance(body, bytes):
                        body.seek(start)
                    continue
            if reply.status in ok or reply.status in also:
                return reply
            detail = _detail(reply.body)
            where = (
                f"push of {self.ref}: {what}: registry {scheme}://{host} answered HTTP {reply.status}{detail}"
            )
            if reply.status == 401:
                raise Unauthenticated(where)
            if reply.status == 403:
                raise PermissionDenied(where)
            if reply.status == 404:
                raise NotFound(where)
            if reply.status == 400:
                raise InvalidArgument(where)
            raise Unavailable(where)
        raise Unauthenticated(f"push of {self.ref}: {what}: registry {self.endpoint} refused the credentials")

    # --- blobs ---------------------------------------------------------------

    def has_blob(self, digest: str, size: int) -> bool:
        reply = self.send("HEAD", f"/v2/{self.ref.path}/blobs/{digest}", what=f"blob {digest}", also=(404,))
        if reply.status != 200:
            return False
        declared = reply.headers.get("content-length", "")
        # A registry that claims a blob at another size does not have this one: send it.
        return not declared.isdigit() or int(declared) == size

    def mount(self, digest: str, source: str) -> str | None:
        """Ask for a cross-repository mount; None when mounted, else the upload URL it opened."""
        query = urllib.parse.urlencode({"mount": digest, "from": source})
        reply = self.send(
            "POST",
            f"/v2/{self.ref.path}/blobs/uploads/?{query}",
            what=f"mount of blob {digest} from {source}",
        )
        if reply.status == 201:
            return None
        return self._location(reply, digest)

    def start_upload(self, digest: str) -> str:
        reply = self.send("POST", f"/v2/{self.ref.path}/blobs/uploads/", what=f"upload of blob {digest}")
        return self._location(reply, digest)

    def _location(self, reply: _Reply, digest: str) -> str:
        location = reply.headers.get("location")
        if not location:
            raise Unavailable(
                f"push of {self.ref}: registry {self.endpoint} opened an upload of {digest} "
                "without a Location"
            )
        return location

    def upload(self, location: str, digest: str, size: int, open_blob: Callable[[], BinaryIO]) -> None:
        what = f"upload of blob {digest}"
        with open_blob() as fh:
            if size <= self.chunk_size:
                self.send(
                    "PUT",
                    _with_digest(location, digest),
                    what=what,
                    body=fh,
                    length=size,
                    headers={"Content-Type": "application/octet-stream"},
                    ok=(201, 204),
                )
                return
            offset = 0
            while offset < size:
                chunk = fh.read(self.chunk_size)
                end = offset + len(chunk) - 1
                reply = self.send(
                    "PATCH",
                    location,
                    what=f"{what} (bytes {offset}-{end})",
                    body=chunk,
                    headers={"Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{end}"},
                    ok=(202, 204),
                )
                location = self._location(reply, digest)
                offset += len(chunk)
        self.send("PUT", _with_digest(location, digest), what=what, body=b"", ok=(201, 204))


def _with_digest(location: str, digest: str) -> str:
    return location + ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})


def _detail(body: bytes) -> str:
    try:
        errors = json.loads(body).get("errors")
        messages = [f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict)]
    except (ValueError, AttributeError, TypeError):
        return ""
    return f" ({'; '.join(messages)})" if messages else ""


def _mount_sources(store: ImageStore, ref: Reference) -> dict[str, str]:
    """blob digest -> a repository of the destination's registry that has it: one an image with
    that layer was pulled from (its repo digests). A commit's parent layers are found through
    the parent image."""
    sources: dict[str, str] = {}
    for image in store.list_images():
        for name in image.repo_digests:
            try:
                source = parse_reference(name.partition("@")[0])
            except InvalidArgument:
                continue
            if source.domain != ref.domain or source.path == ref.path:
                continue
            for layer in image.layers:
                sources.setdefault(layer.blob_digest, source.path)
    return sources


def push_image(
    store: ImageStore,
    text: str,
    dest: str = "",
    credentials: Credentials | None = None,
    cancel: threading.Event | None = None,
    *,
    fmt: ExportFormat | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> PushResult:
    """Push the image ``text`` names to ``dest`` (default: its own first tag)."""
    cancel = cancel or threading.Event()
    record = store.get(text)
    if not dest:
        # ``pycri push NAME`` pushes NAME, not whichever tag of the same image came first.
        named = _named(text)
        if named in record.repo_tags:
            dest = named or ""
    if not dest:
        if not record.repo_tags:
            raise InvalidArgument(f"image {record.id} has no tag: name a destination to push it to")
        dest = record.repo_tags[0]
    ref = parse_reference(dest)
    session = RegistrySession(ref, store.config, credentials or Credentials(), cancel)
    endpoints = [e for e in session.endpoints if not e.is_mirror]
    if not endpoints:
        raise FailedPrecondition(
            f"registry {ref.domain} is configured mirrors-only: pycri does not push to mirrors"
        )
    pusher = _Pusher(ref, session, endpoints[0], cancel, chunk_size)
    fmt = fmt or manifest_format(record)
    blobs = layer_blobs(store, record)
    manifest = image_manifest(record, blobs, fmt)
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    media_type = OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST
    result = PushResult(
        f"{ref.repository}:{ref.tag or 'latest'}" if not ref.digest else str(ref), digest, media_type
    )
    sources = _mount_sources(store, ref)
    items: list[tuple[str, int, Callable[[], BinaryIO]]] = [
        (b.digest, b.size, _opener(b.path)) for b in {b.digest: b for b in blobs}.values()
    ]
    items.append((record.id, len(record.config_bytes), _bytes_opener(record.config_bytes)))
    for blob_digest, size, open_blob in items:
        if pusher.has_blob(blob_digest, size):
            result.skipped.append(blob_digest)
            continue
        source = sources.get(blob_digest)
        if source:
            mounted_or_location = pusher.mount(blob_digest, source)
            if mounted_or_location is None:
                result.mounted.append(blob_digest)
                continue
            location = mounted_or_location
        else:
            location = pusher.start_upload(blob_digest)
        pusher.upload(location, blob_digest, size, open_blob)
        result.uploaded.append(blob_digest)
    reference = ref.digest or ref.tag or "latest"
    reply = pusher.send(
        "PUT",
        f"/v2/{ref.path}/manifests/{reference}",
        what=f"manifest {digest}",
        body=manifest,
        headers={"Content-Type": media_type},
        ok=(200, 201, 204),
    )
    answered = reply.headers.get("docker-content-digest")
    if answered and answered != digest:
        raise DataLoss(f"push of {ref}: registry stored manifest {digest} as {answered}")
    log.info(
        "image pushed",
        image=record.id,
        reference=result.reference,
        digest=digest,
        uploaded=len(result.uploaded),
        mounted=len(result.mounted),
        skipped=len(result.skipped),
    )
    return result


def _named(text: str) -> str | None:
    """The full tag ``text`` names, when it is a tag (not an ID)."""
    try:
        return parse_reference(text).tagged
    except InvalidArgument:
        return None


def _opener(path: Path) -> Callable[[], BinaryIO]:
    return lambda: open(path, "rb")


def _bytes_opener(data: bytes) -> Callable[[], BinaryIO]:
    return lambda: io.BytesIO(data)
