"""Pods and their containers together: the work that spans both managers, under one lock per pod.

SandboxManager knows pods, ContainerManager containers; neither knows the other. This module
does what needs both: a container is created only in a ready pod; stopping a pod stops its
containers and then the pod; removing a pod removes its containers and then the pod; start-up
reconciles containers before the pods that hold them.

Each pod has a read/write lock (cri_runtime.runtime.locks.KeyedRWLocks). Container calls hold
their pod's lock shared, so they run together; RunPodSandbox, StopPodSandbox and
RemovePodSandbox hold it exclusive, so that no container is made in a pod that is going away,
and none outlives its pod. Different pods never wait for each other. The callers are worker
threads (the servicer runs each call with run_in_executor), so the locks are thread locks.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import structlog

from cri_runtime.errors import FailedPrecondition, NotFound
from cri_runtime.model import ContainerConfig, LinuxResources, PodSandboxConfig
from cri_runtime.oci.conmon import ExecResult
from cri_runtime.runtime.containers import KILL_WAIT, ContainerManager
from cri_runtime.runtime.hooks import NO_HOOKS, LifecycleHooks
from cri_runtime.runtime.locks import KeyedRWLocks
from cri_runtime.runtime.sandboxes import SandboxManager
from cri_runtime.runtime.state import Container, Sandbox

log = structlog.get_logger("pycri.pods")

T = TypeVar("T")


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Bounded work (file system, subprocesses with timeouts, SQLite) on the loop's worker pool."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


class Pods:
    def __init__(self, sandboxes: SandboxManager, containers: ContainerManager) -> None:
        self.sandboxes = sandboxes
        self.containers = containers
        self.locks = KeyedRWLocks()
        self.hooks: LifecycleHooks = NO_HOOKS

    def set_hooks(self, hooks: LifecycleHooks) -> None:
        """Have ``hooks`` (NRI) told of, and asked about, every pod and container step."""
        self.hooks = self.sandboxes.hooks = self.containers.hooks = hooks

    # --- pods -------------------------------------------------------------------------------

    def run_pod(self, config: PodSandboxConfig, runtime_handler: str) -> Sandbox:
        sandbox_id = secrets.token_hex(32)
        with self.locks.exclusive(sandbox_id):
            return self.sandboxes.run(sandbox_id, config, runtime_handler)

    def _current(self, sandbox: Sandbox) -> bool:
        """Whether ``sandbox`` is still on record: another call may have removed it while this
        one waited for the pod's lock."""
        return self.sandboxes.find(sandbox.id) is sandbox

    def update_pod_resources(
        self, pod_id: str, resources: LinuxResources | None, overhead: LinuxResources | None
    ) -> None:
        sandbox = self.sandboxes.get(pod_id)
        with self.locks.exclusive(sandbox.id):
            if not self._current(sandbox):
                raise NotFound(f"pod sandbox {pod_id!r} not found")
            self.hooks.update_pod(sandbox, resources, overhead)  # NRI UpdatePodSandbox; raising fails
            self.sandboxes.update_resources(sandbox, resources, overhead)
            self.hooks.post_update_pod(sandbox)

    def stop_pod(self, pod_id: str) -> None:
        sandbox = self.sandboxes.find(pod_id)
        if sandbox is None:
            return  # CRI: stopping a pod that is gone is not an error
        with self.locks.exclusive(sandbox.id):
            if not self._current(sandbox):
                return
            was_ready = sandbox.state == "ready"
            self.sandboxes.begin_stop(sandbox)
            self.containers.stop_all_in_pod(sandbox.id)
            if was_ready:  # NRI: a second StopPodSandbox is no event
                self.hooks.stop_pod(sandbox)
            self.sandboxes.finish_stop(sandbox)

    def remove_pod(self, pod_id: str) -> None:
        sandbox = self.sandboxes.find(pod_id)
        if sandbox is None:
            return  # CRI: removing a removed pod succeeds
        with self.locks.exclusive(sandbox.id):
            if not self._current(sandbox):
                return
            self.sandboxes.begin_remove(sandbox)
            for container in self.containers.remove_all_in_pod(sandbox.id):
                # NRI: a plugin sees each container's removal, also when its pod takes it along.
                self.hooks.remove_container(sandbox, container)
            self.hooks.remove_pod(sandbox)
            self.sandboxes.finish_remove(sandbox)

    # --- containers ---------------------------------------------------------------------------

    def create_container(self, pod_id: str, config: ContainerConfig) -> Container:
        sandbox = self.sandboxes.get(pod_id)
        with self.locks.shared(sandbox.id):
            if not self._current(sandbox):
                raise NotFound(f"pod sandbox {pod_id!r} not found")
            if sandbox.state != "ready" or sandbox.pending:
                raise FailedPrecondition(
                    f"pod sandbox {sandbox.id} is not ready; cannot create a container in it"
                )
            container = self.containers.create(sandbox, config)
            self.hooks.post_create_container(sandbox, container)
            return container

    def start_container(self, container_id: str) -> None:
        container = self.containers.get(container_id)
        with self.locks.shared(container.pod_id):
            # The runtime creates the container now, in the pod's namespaces: they must still be there.
            sandbox = self.sandboxes.find(container.pod_id)
            if sandbox is None or sandbox.state != "ready" or sandbox.pending:
                raise FailedPrecondition(
                    f"pod sandbox {container.pod_id} is not ready; cannot start container {container.id}"
                )
            self.hooks.start_container(sandbox, container)
            self.containers.start(container.id, sandbox)
            self.hooks.post_start_container(sandbox, container)

    def stop_container(self, container_id: str, timeout: float) -> None:
        container = self.containers.find(container_id)
        if container is None:
            return  # CRI: stopping a container that is gone is not an error
        with self.locks.shared(container.pod_id):
            self.containers.stop(container.id, timeout)

    def remove_container(self, container_id: str) -> None:
        container = self.containers.find(container_id)
        if container is None:
            return  # CRI: removing a removed container succeeds
        with self.locks.shared(container.pod_id):
            self.containers.remove(container.id)
            self.hooks.remove_container(self.sandboxes.find(container.pod_id), container)

    def update_container_resources(self, container_id: str, resources: LinuxResources) -> None:
        """UpdateContainerResources: NRI plugins may change what is applied (UpdateContainer),
        and are told of the result (PostUpdateContainer)."""
        container = self.containers.get(container_id)
        with self.locks.shared(container.pod_id):
            sandbox = self.sandboxes.find(container.pod_id)
            if sandbox is not None:
                resources = self.hooks.update_container(sandbox, container, resources)
            self.containers.update_resources(container.id, resources)
            if sandbox is not None:
                self.hooks.post_update_container(sandbox, container)

    def apply_container_resources(self, container_id: str, resources: LinuxResources) -> None:
        """A container update an NRI plugin asked for: applied as UpdateContainerResources is, all
        or nothing, without asking the plugins again."""
        container = self.containers.get(container_id)
        with self.locks.shared(container.pod_id):
            self.containers.update_resources(container.id, resources)

    def reopen_container_log(self, container_id: str) -> None:
        container = self.containers.get(container_id)
        with self.locks.shared(container.pod_id):
            self.containers.reopen_log(container.id)

    def _exec_ready(self, container_id: str) -> None:
        container = self.containers.get(container_id)
        with self.locks.shared(container.pod_id):
            container = self.containers.get(container.id)
            if container.state != "running":
                raise FailedPrecondition(f"container {container.id} is {container.state}, not running")

    # --- the same calls for the event loop: waits of unbounded length hold no thread ---------

    async def stop_container_async(self, container_id: str, timeout: float) -> None:
        """StopContainer: the bounded steps (signal, SIGKILL, record) on worker threads under the
        pod's shared lock; the grace period awaited on the loop (the exit watcher's pidfd), holding
        no lock and no thread. A pod stop or removal meanwhile ends the wait early."""
        container = self.containers.find(container_id)
        if container is None:
            return  # CRI: stopping a container that is gone is not an error
        exits = self.containers.exits
        if not exits.running:
            await _in_thread(self.stop_container, container_id, timeout)
            return
        phase = await _in_thread(self._under_pod_lock, container, self.containers.stop_begin, timeout)
        if phase == "signalled":
            if await exits.wait(container.id, timeout):
                return
            phase = await _in_thread(self._under_pod_lock, container, self.containers.stop_kill)
        if phase == "done" or await exits.wait(container.id, KILL_WAIT):
            return
        # SIGKILL did not end it in time (a process stuck in the kernel): record what is known.
        await _in_thread(self._under_pod_lock, container, self.containers.stop_finish, 0.0)

    async def exec_sync_async(self, container_id: str, cmd: list[str], timeout: float | None) -> ExecResult:
        """ExecSync; the pod's lock is held to set the exec up, not while the command runs (it
        may run for as long as its timeout, and a pod's removal must not wait for it)."""
        await _in_thread(self._exec_ready, container_id)
        return await self.containers.exec_async(container_id, cmd, timeout)

    def _under_pod_lock(self, container: Container, step: Callable[..., T], *args: Any) -> T:
        with self.locks.shared(container.pod_id):
            return step(container, *args)

    # --- start-up -------------------------------------------------------------------------------

    def restore(self, sandboxes: Sequence[Sandbox], containers: Sequence[Container]) -> None:
        """Take the records of a previous run, then finish or undo what a crash interrupted:
        containers first (a pod's stop or removal takes its containers along), then pods."""
        self.sandboxes.restore(list(sandboxes))
        by_id = {s.id: s for s in self.sandboxes.all()}
        self.containers.restore(list(containers), by_id)
        self.containers.recover(by_id)
        for sandbox in self.sandboxes.all():
            try:
                with self.locks.exclusive(sandbox.id):
                    self._recover_pod(sandbox)
            except Exception as exc:
                log.error("cannot finish a pod's interrupted operation", id=sandbox.id, error=str(exc))

    def _recover_pod(self, sandbox: Sandbox) -> None:
        self.sandboxes.check_intact(sandbox)
        if sandbox.pending == "creating":
            self.sandboxes.discard(sandbox)
        elif sandbox.pending == "stopping":
            self.containers.stop_all_in_pod(sandbox.id)
            self.sandboxes.finish_stop(sandbox)
            log.info("finished stopping a pod after a crash", id=sandbox.id)
        elif sandbox.pending == "removing":
            self.containers.remove_all_in_pod(sandbox.id)
            self.sandboxes.finish_remove(sandbox)
            log.info("finished removing a pod after a crash", id=sandbox.id)
