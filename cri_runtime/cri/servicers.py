"""Registering the CRI servicers on a gRPC server, so that the daemon's wiring needs no schema."""

from __future__ import annotations

import grpc

from cri_runtime.api import api_pb2_grpc as pb_grpc
from cri_runtime.cri.runtime_service import RuntimeService
from imageservice.service import ImageService


def add_servicers(server: grpc.aio.Server, runtime: RuntimeService, images: ImageService) -> None:
    pb_grpc.add_RuntimeServiceServicer_to_server(runtime, server)
    pb_grpc.add_ImageServiceServicer_to_server(images, server)
