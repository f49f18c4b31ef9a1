"""A small CRI client for tests, benchmarks and people: ``CRIClient("unix:///run/pycri/pycri.sock")``.

It speaks plain CRI v1, so it drives containerd or CRI-O just the same.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

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

    # --- pods and containers ------------------------------------------------------

    def run_pod(
        self,
        name: str,
        *,
        runtime_handler: str = "",
        config: pb.PodSandboxConfig | None = None,
        **options: Any,
    ) -> str:
        """RunPodSandbox with ``config``, or a kubelet-like one from ``pod_config(name, **options)``."""
        if config is None:
            config = self.pod_config(name, **options)
        request = pb.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        return self.runtime.RunPodSandbox(request, timeout=max(self.timeout, 120)).pod_sandbox_id

    @staticmethod
    def pod_config(
        name: str,
        *,
        namespace: str = "default",
        uid: str = "",
        attempt: int = 0,
        hostname: str = "",
        log_directory: str = "",
        labels: dict[str, str] | None = None,
        pid_mode: int = pb.NamespaceMode.CONTAINER,
        host_network: bool = False,
        dns_servers: list[str] | None = None,
        dns_searches: list[str] | None = None,
        cgroup_parent: str = "",
        port_mappings: list[pb.PortMapping] | None = None,
        annotations: dict[str, str] | None = None,
    ) -> pb.PodSandboxConfig:
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(
                name=name, namespace=namespace, uid=uid or f"uid-{name}", attempt=attempt
            ),
            hostname=hostname,
            log_directory=log_directory,
            labels=labels or {},
            port_mappings=port_mappings or [],
            annotations=annotations or {},
        )
        options = config.linux.security_context.namespace_options
        options.pid = pid_mode  # type: ignore[assignment]  # an enum value as int
        if host_network:
            options.network = pb.NamespaceMode.NODE
        if dns_servers or dns_searches:
            config.dns_config.servers.extend(dns_servers or [])
            config.dns_config.searches.extend(dns_searches or [])
        config.linux.cgroup_parent = cgroup_parent
        return config

    def stop_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(
            pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=max(self.timeout, 120)
        )

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.RemovePodSandbox(
            pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=max(self.timeout, 120)
        )

    def pod_status(self, pod_id: str, verbose: bool = False) -> pb.PodSandboxStatusResponse:
        return self.runtime.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose), timeout=self.timeout
        )

    def list_pods(self, pod_filter: pb.PodSandboxFilter | None = None) -> list[pb.PodSandbox]:
        return list(
            self.runtime.ListPodSandbox(
                pb.ListPodSandboxRequest(filter=pod_filter), timeout=self.timeout
            ).items
        )

    def create_container(
        self,
        pod_id: str,
        name: str,
        image: str,
        *,
        command: list[str] | None = None,
        args: list[str] | None = None,
        envs: dict[str, str] | None = None,
        log_path: str = "",
        labels: dict[str, str] | None = None,
        config: pb.ContainerConfig | None = None,
        sandbox_config: pb.PodSandboxConfig | None = None,
        readonly_mounts: dict[str, str] | None = None,
    ) -> str:
        """``readonly_mounts``: container path -> host path, bound read-only."""
        if config is None:
            config = pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name=name),
                image=pb.ImageSpec(image=image),
                command=command or [],
                args=args or [],
                envs=[pb.KeyValue(key=k, value=v.encode()) for k, v in (envs or {}).items()],
                log_path=log_path,
                labels=labels or {},
                mounts=[
                    pb.Mount(container_path=inside, host_path=host, readonly=True)
                    for inside, host in (readonly_mounts or {}).items()
                ],
            )
        request = pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config
        )
        return self.runtime.CreateContainer(request, timeout=max(self.timeout, 120)).container_id

    def start_container(self, container_id: str) -> None:
        self.runtime.StartContainer(pb.StartContainerRequest(container_id=container_id), timeout=self.timeout)

    def stop_container(self, container_id: str, timeout: int = 10) -> None:
        self.runtime.StopContainer(
            pb.StopContainerRequest(container_id=container_id, timeout=timeout),
            timeout=self.timeout + timeout,
        )

    def remove_container(self, container_id: str) -> None:
        self.runtime.RemoveContainer(
            pb.RemoveContainerRequest(container_id=container_id), timeout=self.timeout
        )

    def container_status(self, container_id: str, verbose: bool = False) -> pb.ContainerStatusResponse:
        return self.runtime.ContainerStatus(
            pb.ContainerStatusRequest(container_id=container_id, verbose=verbose), timeout=self.timeout
        )

    def list_containers(self, container_filter: pb.ContainerFilter | None = None) -> list[pb.Container]:
        request = pb.ListContainersRequest(filter=container_filter)
        return list(self.runtime.ListContainers(request, timeout=self.timeout).containers)

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int = 0) -> pb.ExecSyncResponse:
        request = pb.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout)
        return self.runtime.ExecSync(request, timeout=self.timeout + timeout)
