"""Registering the CRI servicers on a gRPC server, so that the daemon's wiring needs no schema."""

from __future__ import annotations

import grpc

from cri_runtime.api import api_pb2 as pb
from cri_runtime.api import api_pb2_grpc as pb_grpc
from cri_runtime.cri.rpc import Observer, wrap_servicer
from cri_runtime.cri.runtime_service import RuntimeService
from imageservice.service import ImageService


def add_servicers(
    server: grpc.aio.Server, runtime: RuntimeService, images: ImageService, observe: Observer
) -> None:
    """Both servicers, every RPC through the one wrapper (``cri.rpc``), reported to ``observe``."""
    services = pb.DESCRIPTOR.services_by_name
    pb_grpc.add_RuntimeServiceServicer_to_server(
        wrap_servicer(runtime, services["RuntimeService"].full_name, observe), server
    )
    pb_grpc.add_ImageServiceServicer_to_server(
        wrap_servicer(images, services["ImageService"].full_name, observe), server
    )
