"""A small NRI plugin for the tests, speaking pycri's own ttrpc/NRI code from the plugin side.

Both ends being this project's code, the wire compatibility with containerd/nri's Go stub is not
proven here: that is what critest's NRI specs (a Go plugin built on containerd/nri) check.
The plugin runs on its own event loop in a thread; it records the events it gets (and their
requests) and answers CreateContainer with the adjustment it was given, an error, or not in time;
``respond`` gives any other event an answer of the test's making (container updates, evictions, a
validator's verdict), and ``update_containers`` sends the runtime unsolicited updates.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cri_runtime.nri import ttrpc
from cri_runtime.nri.api import api_pb2 as nri

RUNTIME = "nri.pkg.api.v1alpha1.Runtime"
ALL_EVENTS = (1 << (nri.LAST - 1)) - 1
VALIDATE = 1 << (nri.VALIDATE_CONTAINER_ADJUSTMENT - 1)
LIFECYCLE_EVENTS = ALL_EVENTS & ~VALIDATE  # everything but being a validator


@dataclass
class NriTestPlugin:
    socket: Path
    name: str
    idx: str = "50"
    adjust: Any = None  # nri.ContainerAdjustment for every CreateContainer
    fail_create: str = ""  # an error message: CreateContainer fails with it
    create_delay: float = 0.0
    events: list[tuple[str, str]] = field(default_factory=list)  # (method, pod or container name)
    synced: threading.Event = field(default_factory=threading.Event)
    synced_containers: list[str] = field(default_factory=list)
    on_event: Callable[[str], None] | None = None
    subscribe: int = LIFECYCLE_EVENTS
    # method -> function of the request giving the response message (or raising TtrpcError)
    respond: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    requests: list[tuple[str, Any]] = field(default_factory=list)

    def start(self, timeout: float = 10.0) -> NriTestPlugin:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._connect(), self._loop).result(timeout)
        if not self.synced.wait(timeout):
            raise TimeoutError(f"plugin {self.name} was not synchronised in {timeout}s")
        return self

    async def _connect(self) -> None:
        inherited = os.environ.get("NRI_PLUGIN_SOCKET")
        if inherited:  # started by pycri from plugin_path
            reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=int(inherited)))
        else:
            reader, writer = await asyncio.open_unix_connection(str(self.socket))
        self.channel = ttrpc.MuxChannel.plugin_side(reader, writer, self._handle, name="pycri")
        self.channel.start()
        request = nri.RegisterPluginRequest(plugin_name=self.name, plugin_idx=self.idx)
        await self.channel.call(RUNTIME, "RegisterPlugin", request.SerializeToString(), 5)

    def update_containers(
        self, update: list[Any], evict: list[Any] | None = None, timeout: float = 10.0
    ) -> Any:
        """The runtime service's UpdateContainers: the answer lists the updates that failed."""
        request = nri.UpdateContainersRequest(update=update, evict=evict or [])
        call = self.channel.call(RUNTIME, "UpdateContainers", request.SerializeToString(), timeout)
        payload = asyncio.run_coroutine_threadsafe(call, self._loop).result(timeout + 1)
        return nri.UpdateContainersResponse.FromString(payload)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.channel.close("test done"), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def closed(self) -> bool:
        return self.channel.closed.is_set()

    async def _handle(self, service: str, method: str, payload: bytes) -> bytes:
        if method == "Configure":
            return nri.ConfigureResponse(events=self.subscribe).SerializeToString()
        if method == "Synchronize":
            request = nri.SynchronizeRequest.FromString(payload)
            self.synced_containers = [c.name for c in request.containers]
            self.requests.append((method, request))
            response = self.respond[method](request) if method in self.respond else nri.SynchronizeResponse()
            self.synced.set()
            return response.SerializeToString()
        if method == "CreateContainer":
            request = nri.CreateContainerRequest.FromString(payload)
            self.events.append((method, request.container.name))
            self.requests.append((method, request))
            if self.create_delay:
                await asyncio.sleep(self.create_delay)
            if self.fail_create:
                raise ttrpc.TtrpcError(ttrpc.CODE_UNKNOWN, self.fail_create)
            response = (
                self.respond[method](request) if method in self.respond else nri.CreateContainerResponse()
            )
            if self.adjust is not None:
                response.adjust.CopyFrom(self.adjust)
            return response.SerializeToString()
        request_type = getattr(nri, f"{method}Request", None)
        if request_type is None:
            return nri.Empty().SerializeToString()
        request = request_type.FromString(payload)
        has_container = "container" in request.DESCRIPTOR.fields_by_name
        subject = request.container.name if has_container else request.pod.name
        self.events.append((method, subject))
        self.requests.append((method, request))
        if method in self.respond:
            return self.respond[method](request).SerializeToString()
        return getattr(nri, f"{method}Response")().SerializeToString()


if __name__ == "__main__":
    # A pre-installed plugin: pycri starts it with NRI_PLUGIN_NAME/IDX/SOCKET; it adds an env var.
    plugin = NriTestPlugin(
        Path("-"),
        os.environ["NRI_PLUGIN_NAME"],
        os.environ["NRI_PLUGIN_IDX"],
        adjust=nri.ContainerAdjustment(env=[nri.KeyValue(key="PREINSTALLED", value=sys.argv[0])]),
    ).start()
    plugin._thread.join()
