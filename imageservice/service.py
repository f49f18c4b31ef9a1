"""The CRI ImageService: protobuf in, ImageStore calls, protobuf out. No I/O of its own.

ListImages, StreamImages and ImageStatus read the store's in-memory view (no lock, no disk),
so they answer on the event loop; every call that touches the disk or SQLite (pulls,
removals, ImageFsInfo) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog

from cri_runtime.api import api_pb2 as pb
from cri_runtime.api import api_pb2_grpc as pb_grpc
from cri_runtime.errors import DeadlineExceeded, InvalidArgument
from imageservice.cancel import Cancellation
from imageservice.db import ImageRecord
from imageservice.registry import Credentials
from imageservice.store import FsUsage, ImageStore

log = structlog.get_logger("pycri.images")

STREAM_PAGE = 100


def to_proto(record: ImageRecord) -> pb.Image:
    uid, username = record.user
    image = pb.Image(
        id=record.id,
        repo_tags=record.repo_tags,
        repo_digests=record.repo_digests,
        size=record.size,
        username=username,
        spec=pb.ImageSpec(image=record.id),
        pinned=record.pinned,
    )
    if uid is not None:
        image.uid.value = uid
    return image


def _filesystem(usage: FsUsage) -> pb.FilesystemUsage:
    return pb.FilesystemUsage(
        timestamp=usage.timestamp_ns,
        fs_id=pb.FilesystemIdentifier(mountpoint=usage.mountpoint),
        used_bytes=pb.UInt64Value(value=usage.used_bytes),
        inodes_used=pb.UInt64Value(value=usage.inodes_used),
    )


def _credentials(auth: pb.AuthConfig) -> Credentials:
    return Credentials.from_auth(
        username=auth.username,
        password=auth.password,
        auth=auth.auth,
        identity_token=auth.identity_token,
        registry_token=auth.registry_token,
        server_address=auth.server_address,
    )


class ImageService(pb_grpc.ImageServiceServicer):
    def __init__(self, store: ImageStore, container_fs: Callable[[], FsUsage] | None = None) -> None:
        self.store = store
        # The containers' writable layers, measured by the runtime (which this package does not
        # import): ImageFsInfo reports them as the container filesystem, apart from the layers.
        self.container_fs = container_fs
        # Pulls wait on downloads for minutes; they get threads of their own so that
        # quick RPCs in the default executor never queue behind them.
        self._pull_threads = ThreadPoolExecutor(16, thread_name_prefix="pull")
        self._active: set[Cancellation] = set()

    def close(self) -> None:
        """Cancel pulls in flight (their cleanup runs) and wait for their threads."""
        for cancel in list(self._active):
            cancel.set()
        self._pull_threads.shutdown(wait=True, cancel_futures=True)

    def _matching(self, image_filter: pb.ImageFilter | None) -> list[pb.Image]:
        wanted = image_filter.image.image if image_filter is not None else ""
        if wanted:
            record = self.store.resolve(wanted)
            return [to_proto(record)] if record else []
        return [to_proto(r) for r in self.store.list_images()]

    async def ListImages(
        self, request: pb.ListImagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListImagesResponse:
        return pb.ListImagesResponse(images=self._matching(request.filter))

    async def StreamImages(
        self, request: pb.StreamImagesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamImagesResponse]:
        images = self._matching(request.filter)
        for start in range(0, len(images), STREAM_PAGE):
            yield pb.StreamImagesResponse(images=images[start : start + STREAM_PAGE])

    async def ImageStatus(
        self, request: pb.ImageStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ImageStatusResponse:
        if not request.image.image:
            raise InvalidArgument("ImageStatus: image.image is empty")
        record = self.store.resolve(request.image.image)
        if record is None:
            # kubelet asks before pulling: absence is an empty answer, not an error.
            return pb.ImageStatusResponse()
        response = pb.ImageStatusResponse(image=to_proto(record))
        if request.verbose:
            info = {
                "id": record.id,
                "manifestDigest": record.manifest_digest,
                "chainIDs": [layer.chain_id for layer in record.layers],
                "layers": [
                    {"digest": layer.blob_digest, "size": layer.blob_size, "diffID": layer.diff_id}
                    for layer in record.layers
                ],
                "imageSpec": record.config,
            }
            response.info["info"] = json.dumps(info)
        return response

    async def PullImage(
        self, request: pb.PullImageRequest, context: grpc.aio.ServicerContext
    ) -> pb.PullImageResponse:
        name = request.image.image
        if not name:
            raise InvalidArgument("PullImage: image.image is empty")
        credentials = _credentials(request.auth)
        cancel = Cancellation()
        loop = asyncio.get_running_loop()
        self._active.add(cancel)
        work = loop.run_in_executor(self._pull_threads, self.store.pull, name, credentials, cancel)
        work.add_done_callback(lambda _f: self._active.discard(cancel))
        remaining = context.time_remaining()
        try:
            record = await asyncio.wait_for(asyncio.shield(work), timeout=remaining)
        except (TimeoutError, asyncio.CancelledError) as exc:
            # The caller's deadline passed or it went away: stop the pull and wait for its
            # cleanup, so that nothing half-stored outlives this call.
            cancel.set()
            try:
                await work
            except DeadlineExceeded:
                pass  # the pull saw the cancellation: what it stored is gone
            except Exception as late:
                # The caller hears of its deadline; a pull that failed otherwise meanwhile
                # (its cleanup, say) is told here, or nobody would know.
                log.warning("pull failed while being cancelled", image=name, error=str(late))
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise DeadlineExceeded(f"PullImage {name}: deadline exceeded; pull cancelled") from None
        return pb.PullImageResponse(image_ref=record.id)

    async def RemoveImage(
        self, request: pb.RemoveImageRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveImageResponse:
        if not request.image.image:
            raise InvalidArgument("RemoveImage: image.image is empty")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.store.remove, request.image.image)
        return pb.RemoveImageResponse()

    async def ImageFsInfo(
        self, request: pb.ImageFsInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ImageFsInfoResponse:
        loop = asyncio.get_running_loop()
        usage = await loop.run_in_executor(None, self.store.fs_usage)
        response = pb.ImageFsInfoResponse(image_filesystems=[_filesystem(usage)])
        if self.container_fs is not None:
            writable = await loop.run_in_executor(None, self.container_fs)
            response.container_filesystems.append(_filesystem(writable))
        return response
