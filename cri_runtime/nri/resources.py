"""CRI container resources (cri_runtime.model.LinuxResources) to and from NRI's LinuxResources.

What NRI can say and the CRI cannot (a memory reservation, kernel memory, realtime CPU, a pids
limit, blockio and RDT classes) has no place in UpdateContainerResources: as in containerd
(toCRIResources), those fields of a plugin's update are not applied; ``unsupported`` names them
so that the caller can say so.
"""

from __future__ import annotations

from dataclasses import replace

from cri_runtime.model import HugepageLimit, LinuxResources
from cri_runtime.nri.api import api_pb2 as nri


def to_nri(resources: LinuxResources) -> nri.LinuxResources:
    """The CRI resources as NRI's message; zero (unset) fields stay unset."""
    out = nri.LinuxResources()
    if resources.memory_limit_in_bytes:
        out.memory.limit.value = resources.memory_limit_in_bytes
    if resources.memory_swap_limit_in_bytes:
        out.memory.swap.value = resources.memory_swap_limit_in_bytes
    if resources.cpu_shares:
        out.cpu.shares.value = resources.cpu_shares
    if resources.cpu_quota:
        out.cpu.quota.value = resources.cpu_quota
    if resources.cpu_period:
        out.cpu.period.value = resources.cpu_period
    out.cpu.cpus = resources.cpuset_cpus
    out.cpu.mems = resources.cpuset_mems
    for limit in resources.hugepage_limits:
        out.hugepage_limits.add(page_size=limit.page_size, limit=limit.limit)
    out.unified.update(resources.unified)
    return out


def from_nri(update: nri.LinuxResources, base: LinuxResources) -> LinuxResources:
    """``base`` with the fields ``update`` sets replaced by the update's values."""
    changes: dict[str, object] = {}
    if update.memory.HasField("limit"):
        changes["memory_limit_in_bytes"] = update.memory.limit.value
    if update.memory.HasField("swap"):
        changes["memory_swap_limit_in_bytes"] = update.memory.swap.value
    if update.cpu.HasField("shares"):
        changes["cpu_shares"] = update.cpu.shares.value
    if update.cpu.HasField("quota"):
        changes["cpu_quota"] = update.cpu.quota.value
    if update.cpu.HasField("period"):
        changes["cpu_period"] = update.cpu.period.value
    if update.cpu.cpus:
        changes["cpuset_cpus"] = update.cpu.cpus
    if update.cpu.mems:
        changes["cpuset_mems"] = update.cpu.mems
    if update.hugepage_limits:
        by_size = {h.page_size: h for h in base.hugepage_limits}
        for limit in update.hugepage_limits:
            by_size[limit.page_size] = HugepageLimit(limit.page_size, limit.limit)
        changes["hugepage_limits"] = tuple(by_size.values())
    if update.unified:
        changes["unified"] = {**base.unified, **dict(update.unified)}
    return replace(base, **changes)  # type: ignore[arg-type]


def unsupported(update: nri.LinuxResources) -> list[str]:
    """The fields of ``update`` that UpdateContainerResources cannot apply."""
    names = [
        f"memory.{f}"
        for f in ("reservation", "kernel", "kernel_tcp", "swappiness")
        if update.memory.HasField(f)
    ]
    names += [f"cpu.{f}" for f in ("realtime_runtime", "realtime_period") if update.cpu.HasField(f)]
    names += [f for f in ("pids", "blockio_class", "rdt_class") if update.HasField(f)]
    return names
