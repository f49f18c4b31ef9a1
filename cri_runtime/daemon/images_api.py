"""``pycri.v1.Images``: pycri's own image workflow on its socket (commit, tag, export, push,
checkpoint-image).

Like ``pycri.v1.Admin`` (``pycri image import``) it is JSON over gRPC on the CRI server: these
calls are pycri's CLI talking to its own daemon, not a wire contract other programs implement,
so a schema of their own would add generated code and nothing a caller needs. Each method is
thin: check the request's shape, run the domain call in a worker thread, map domain errors
to status codes (cri.status), answer with plain JSON.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import structlog

from cri_runtime.cri.status import status_code
from cri_runtime.errors import InvalidArgument, PycriError
from cri_runtime.runtime.commit import CommitRequest, commit_container
from cri_runtime.runtime.containers import ContainerManager
from cri_runtime.runtime.pods import Pods
from imageservice.checkpoint_image import make_checkpoint_image
from imageservice.commit import stack_image
from imageservice.db import ImageRecord
from imageservice.export import export_image
from imageservice.push import CHUNK_SIZE, push_image
from imageservice.reference import parse_reference
from imageservice.registry import Credentials
from imageservice.store import ImageStore

log = structlog.get_logger("pycri.images_api")

IMAGES_SERVICE = "pycri.v1.Images"
# The namespace of the pods `pycri build` runs its steps in; a build session removes only these.
BUILD_NAMESPACE = "pycri-build"

Handler = Callable[[dict, grpc.aio.ServicerContext], Awaitable[dict]]


def _text(request: dict, key: str, *, required: bool = True) -> str:
    value = request.get(key, "")
    if not isinstance(value, str) or (required and not value):
        raise InvalidArgument(f"{key} must be a {'non-empty ' if required else ''}string")
    return value


def _image(record: ImageRecord) -> dict[str, Any]:
    return {"id": record.id, "repo_tags": record.repo_tags, "repo_digests": record.repo_digests}


class ImagesAPI:
    def __init__(self, store: ImageStore, containers: ContainerManager, pods: Pods | None = None) -> None:
        self.store = store
        self.containers = containers
        self.pods = pods

    def commit(self, request: dict) -> dict:
        changes = request.get("changes") or []
        if not isinstance(changes, list) or not all(isinstance(c, str) for c in changes):
            raise InvalidArgument("changes must be a list of strings")
        record = commit_container(
            self.containers,
            self.store,
            CommitRequest(
                container_id=_text(request, "container_id"),
                name=_text(request, "name", required=False),
                changes=changes,
                pause=bool(request.get("pause")),
                comment=_text(request, "comment", required=False),
                author=_text(request, "author", required=False),
            ),
        )
        return {"image": _image(record)}

    def tag(self, request: dict) -> dict:
        return {"image": _image(self.store.tag(_text(request, "source"), _text(request, "name")))}

    def export(self, request: dict) -> dict:
        fmt = _text(request, "format", required=False) or "oci"
        if fmt not in ("oci", "docker"):
            raise InvalidArgument(f"format {fmt!r} is not oci or docker")
        record = export_image(self.store, _text(request, "image"), Path(_text(request, "path")), fmt)  # type: ignore[arg-type]
        return {"image": _image(record)}

    def push(self, request: dict) -> dict:
        fmt = _text(request, "format", required=False) or None
        if fmt not in (None, "oci", "docker"):
            raise InvalidArgument(f"format {fmt!r} is not oci or docker")
        credentials = Credentials.from_auth(
            username=_text(request, "username", required=False),
            password=_text(request, "password", required=False),
        )
        chunk_size = request.get("chunk_size") or CHUNK_SIZE
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1024:
            raise InvalidArgument("chunk_size must be a number of bytes, at least 1024")
        result = push_image(
            self.store,
            _text(request, "image"),
            _text(request, "dest", required=False),
            credentials,
            fmt=fmt,  # type: ignore[arg-type]
            chunk_size=chunk_size,
        )
        return {
            "reference": result.reference,
            "digest": result.digest,
            "media_type": result.media_type,
            "uploaded": result.uploaded,
            "mounted": result.mounted,
            "skipped": result.skipped,
        }

    def stack(self, request: dict) -> dict:
        changes = request.get("changes") or []
        if not isinstance(changes, list) or not all(isinstance(c, str) for c in changes):
            raise InvalidArgument("changes must be a list of strings")
        layer = _text(request, "layer_path", required=False)
        name = _text(request, "name", required=False)
        record = stack_image(
            self.store,
            _text(request, "image"),
            [str(parse_reference(name))] if name else [],
            changes,
            Path(layer) if layer else None,
            created_by=_text(request, "created_by", required=False) or "pycri build",
        )
        return {"image": _image(record)}

    def checkpoint_image(self, request: dict) -> dict:
        """A checkpoint OCI image (CRI-O's layout and annotation) of a checkpoint archive."""
        record = make_checkpoint_image(self.store, Path(_text(request, "archive")), _text(request, "name"))
        return {"image": _image(record)}

    def _remove_build_pods(self, pod_ids: list[str]) -> None:
        """What a build client left behind: its pods (only ``pycri-build`` ones), stopped and removed."""
        if self.pods is None:
            return
        for pod_id in pod_ids:
            sandbox = self.pods.sandboxes.find(pod_id)
            if sandbox is None or sandbox.namespace != BUILD_NAMESPACE:
                continue
            try:
                self.pods.stop_pod(pod_id)
                self.pods.remove_pod(pod_id)
                log.info("build pod of a vanished client removed", pod=pod_id)
            except PycriError as exc:
                log.error("cannot remove a vanished build client's pod", pod=pod_id, error=str(exc))

    async def build_session(
        self, requests: AsyncIterator[dict], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dict]:
        """Held open by ``pycri build`` for as long as it runs: it names each pod it makes, then
        says ``done``. A stream that ends any other way (the client killed, its connection lost)
        leaves pods nobody will remove; the daemon removes them."""
        pods: list[str] = []
        done = False
        try:
            async for request in requests:
                if not isinstance(request, dict):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request must be a JSON object")
                pod_id = request.get("pod_id")
                if isinstance(pod_id, str) and pod_id:
                    pods.append(pod_id)
                if request.get("done") is True:
                    done = True
                    break
        finally:
            if not done and pods:
                # Not awaited: the handler may be being cancelled; the worker pool finishes it.
                asyncio.get_running_loop().run_in_executor(None, self._remove_build_pods, pods)
        yield {"pods": len(pods)}

    def _unary(self, method: Callable[[dict], dict]) -> Handler:
        async def call(request: dict, context: grpc.aio.ServicerContext) -> dict:
            if not isinstance(request, dict):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request must be a JSON object")
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(None, method, request)
            except PycriError as exc:
                await context.abort(status_code(exc), str(exc))
            raise AssertionError("unreachable")  # abort raises

        return call

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "Commit": self.commit,
            "Tag": self.tag,
            "Export": self.export,
            "Push": self.push,
            "Stack": self.stack,
            "CheckpointImage": self.checkpoint_image,
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._unary(method),
                request_deserializer=json.loads,
                response_serializer=lambda d: json.dumps(d).encode(),
            )
            for name, method in methods.items()
        }
        handlers["BuildSession"] = grpc.stream_stream_rpc_method_handler(
            self.build_session,
            request_deserializer=json.loads,
            response_serializer=lambda d: json.dumps(d).encode(),
        )
        return grpc.method_handlers_generic_handler(IMAGES_SERVICE, handlers)
