"""A small CRI client for tests, benchmarks and people: ``CRIClient("unix:///run/pycri/pycri.sock")``.

It speaks plain CRI v1, so it drives containerd or CRI-O just the same.
"""

from __future__ import annotations

from types import TracebackType

import grpc

from cri_runtime.api import api_pb2 as pb
from cri_runtime.api import api_pb2_grpc as pb_grpc

DEFAULT_ENDPOINT = "unix:///run/pycri/pycri.sock"


class CRIClient:
    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 30.0) -> None:
        target = endpoint if endpoint.startswith("unix:") else f"unix://{endpoint}"
        self.channel = grpc.insecure_channel(
            target,
            options=[("grpc.max_receive_message_length", 32 * 1024 * 1024)],
        )
        self.runtime = pb_grpc.RuntimeServiceStub(self.channel)
        self.images = pb_grpc.ImageServiceStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CRIClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    # --- RuntimeService -------------------------------------------------------

    def version(self) -> pb.VersionResponse:
        return self.runtime.Version(pb.VersionRequest(), timeout=self.timeout)

    def status(self, verbose: bool = False) -> pb.StatusResponse:
        return self.runtime.Status(pb.StatusRequest(verbose=verbose), timeout=self.timeout)

    def runtime_config(self) -> pb.RuntimeConfigResponse:
        return self.runtime.RuntimeConfig(pb.RuntimeConfigRequest(), timeout=self.timeout)

    # --- ImageService -----------------------------------------------------------

    def pull(
        self,
        image: str,
        *,
        username: str = "",
        password: str = "",
        auth: pb.AuthConfig | None = None,
        timeout: float | None = None,
    ) -> str:
        """Pull ``image``; return its image ref (the image ID)."""
        if auth is None and username:
            auth = pb.AuthConfig(username=username, password=password)
        request = pb.PullImageRequest(image=pb.ImageSpec(image=image), auth=auth)
        response = self.images.PullImage(request, timeout=timeout or max(self.timeout, 600.0))
        return response.image_ref

    def list_images(self, image: str = "") -> list[pb.Image]:
        request = pb.ListImagesRequest()
        if image:
            request.filter.image.image = image
        return list(self.images.ListImages(request, timeout=self.timeout).images)

    def image_status(self, image: str, verbose: bool = False) -> pb.ImageStatusResponse:
        request = pb.ImageStatusRequest(image=pb.ImageSpec(image=image), verbose=verbose)
        return self.images.ImageStatus(request, timeout=self.timeout)

    def remove_image(self, image: str) -> None:
        self.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image)), timeout=self.timeout)

    def image_fs_info(self) -> pb.ImageFsInfoResponse:
        return self.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=self.timeout)
