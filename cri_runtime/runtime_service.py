"""The CRI RuntimeService. This stage answers Version, Status and RuntimeConfig; every
other RPC answers UNIMPLEMENTED with its name."""

from __future__ import annotations

import json
from typing import Any

import grpc

from cri_runtime import __version__, network
from cri_runtime.api import api_pb2 as pb
from cri_runtime.api import api_pb2_grpc as pb_grpc
from cri_runtime.config import Config
from cri_runtime.oci import RuntimeInfo

RUNTIME_NAME = "pycri"
RUNTIME_API_VERSION = "v1"


class RuntimeService(pb_grpc.RuntimeServiceServicer):
    def __init__(
        self, config: Config, runtimes: dict[str, RuntimeInfo], default: RuntimeInfo | None, why: str
    ):
        self.config = config
        self.runtimes = runtimes
        self.default_runtime = default
        self.default_reason = why

    async def Version(
        self, request: pb.VersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.VersionResponse:
        return pb.VersionResponse(
            version="0.1.0",
            runtime_name=RUNTIME_NAME,
            runtime_version=__version__,
            runtime_api_version=RUNTIME_API_VERSION,
        )

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        runtime_ready = pb.RuntimeCondition(type="RuntimeReady", status=self.default_runtime is not None)
        if self.default_runtime is None:
            runtime_ready.reason = "NoOCIRuntime"
            runtime_ready.message = self.default_reason
        net = network.readiness()
        network_ready = pb.RuntimeCondition(
            type="NetworkReady",
            status=net.ready,
            reason=net.reason,
            message=net.message if not net.ready else "",
        )
        handlers = [
            pb.RuntimeHandler(name=name, features=pb.RuntimeHandlerFeatures())
            for name in ("", *(n for n, info in self.runtimes.items() if info.usable))
        ]
        response = pb.StatusResponse(
            status=pb.RuntimeStatus(conditions=[runtime_ready, network_ready]),
            runtime_handlers=handlers,
            features=pb.RuntimeFeatures(),
        )
        if request.verbose:
            info: dict[str, Any] = {
                "defaultRuntime": self.default_runtime.name if self.default_runtime else "",
                "defaultRuntimeReason": self.default_reason,
                "runtimes": {
                    n: {"path": i.path, "version": i.version, "usable": i.usable, "reason": i.reason}
                    for n, i in self.runtimes.items()
                },
                "network": net.message,
                "config": self.config.to_dict(),
            }
            response.info["config"] = json.dumps(info)
        return response

    async def RuntimeConfig(
        self, request: pb.RuntimeConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.RuntimeConfigResponse:
        driver = (
            pb.CgroupDriver.SYSTEMD if self.config.cgroup_driver == "systemd" else pb.CgroupDriver.CGROUPFS
        )
        return pb.RuntimeConfigResponse(linux=pb.LinuxRuntimeConfiguration(cgroup_driver=driver))


def _unimplemented(name: str, streaming: bool) -> Any:
    message = f"{name} is not implemented by pycri yet"

    if streaming:

        async def stream_handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
            yield  # pragma: no cover - makes this an async generator

        return stream_handler

    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return handler


def _fill_unimplemented() -> None:
    service = pb.DESCRIPTOR.services_by_name["RuntimeService"]
    for method in service.methods:
        if method.name not in RuntimeService.__dict__:
            setattr(RuntimeService, method.name, _unimplemented(method.name, method.server_streaming))


_fill_unimplemented()
