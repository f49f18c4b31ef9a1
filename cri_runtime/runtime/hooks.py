"""Points in the pod and container lifecycle where an extension (NRI) is told or asked.

The runtime calls these from its worker threads, at NRI's points: a pod's hook after its
namespaces, cgroup and network exist and before it is listed; a container's create hook with the
OCI spec built and not yet written, so what the hook changes is what the runtime creates. A hook
that raises fails the call (and the call's undo stack takes away what it made) for the "run",
"create" and "start" hooks; the others only report. The default does nothing.
"""

from __future__ import annotations

from typing import Any

from cri_runtime.model import LinuxResources
from cri_runtime.runtime.state import Container, Sandbox


class LifecycleHooks:
    def run_pod(self, sandbox: Sandbox) -> None:
        """The pod is made and not yet visible; raising fails RunPodSandbox."""

    def update_pod(
        self, sandbox: Sandbox, resources: LinuxResources | None, overhead: LinuxResources | None
    ) -> None:
        """UpdatePodSandboxResources is about to resize the pod; raising fails it."""

    def post_update_pod(self, sandbox: Sandbox) -> None:
        """UpdatePodSandboxResources succeeded."""

    def stop_pod(self, sandbox: Sandbox) -> None:
        """The pod's containers are stopped; the pod is still ready."""

    def remove_pod(self, sandbox: Sandbox) -> None:
        """The pod's containers are gone; the pod is about to be."""

    def create_container(self, sandbox: Sandbox, container: Container, oci_spec: dict[str, Any]) -> None:
        """``oci_spec`` may be changed in place; raising fails CreateContainer."""

    def post_create_container(self, sandbox: Sandbox, container: Container) -> None:
        """CreateContainer succeeded."""

    def start_container(self, sandbox: Sandbox, container: Container) -> None:
        """About to start; raising fails StartContainer."""

    def post_start_container(self, sandbox: Sandbox, container: Container) -> None:
        """StartContainer succeeded."""

    def update_container(
        self, sandbox: Sandbox, container: Container, resources: LinuxResources
    ) -> LinuxResources:
        """UpdateContainerResources is about to apply ``resources``; the answer is what it applies
        instead; raising fails the call (nothing applied)."""
        return resources

    def post_update_container(self, sandbox: Sandbox, container: Container) -> None:
        """UpdateContainerResources succeeded."""

    def container_stopped(self, container: Container) -> None:
        """The container has stopped, by StopContainer or on its own; called from any thread,
        including the event loop's: it must not block."""

    def remove_container(self, sandbox: Sandbox | None, container: Container) -> None:
        """The container was removed."""


NO_HOOKS = LifecycleHooks()
