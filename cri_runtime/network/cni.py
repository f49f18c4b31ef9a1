"""A CNI client (spec 1.0.0): attach a pod's network namespace to the node's pod network.

The network is the first file in ``conf_dir`` in lexical order (``*.conflist``, or a
single-plugin ``*.conf``/``*.json`` wrapped as a list, as libcni does); with none, pycri's
built-in bridge network: bridge (gateway, hairpin, no masquerade) with host-local IPAM
on ``builtin_subnet``, then portmap for host ports. Like containerd, pycri first attaches
``lo`` through a separate loopback network, so the pod has ``lo`` up whatever the
conflist says.

Every ADD records what it is about to do in ``cache_dir/<pod_id>.json`` before the first
plugin runs: the network list, the CNI_ARGS, the port mappings and (once known) the
result. DEL and CHECK use that record, not the current config, so a pod is torn down by
the network that set it up even after the conflist changed, and portmap gets back the
mappings it must remove. A missing record therefore means nothing is attached.

Calls block (plugins are subprocesses, each under a timeout): managers run them in a
thread, one pod at a time per pod ID.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import ipaddress
import json
import os
import re
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cri_runtime.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PycriError,
    Unavailable,
    from_os_error,
)
from cri_runtime.network.netns import is_network_namespace

log = structlog.get_logger("pycri.cni")

Json = dict[str, Any]

DEFAULT_PLUGIN_TIMEOUT = 60.0
CONF_SUFFIXES = (".conflist", ".conf", ".json")
LOOPBACK_NETWORK: Json = {"cniVersion": "1.0.0", "name": "cni-loopback", "plugins": [{"type": "loopback"}]}
# CNI error codes that mean "not now" rather than "broken": try again later, plugin not available.
RETRYABLE_CODES = {11, 50, 51}
PROTOCOLS = ("tcp", "udp", "sctp")
# Spec: container IDs are alphanumeric plus _ . -; pycri also uses them as file names.
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")
_PLUGIN_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_OUTPUT_LIMIT = 4096  # of a plugin's stdout/stderr quoted in an error
# The plugins of the containernetworking/plugins project, which Debian packages as
# containernetworking-plugins; any other plugin comes with its network add-on.
REFERENCE_PLUGINS = frozenset(
    (
        "bandwidth", "bridge", "dhcp", "dummy", "firewall", "host-device", "host-local", "ipvlan",
        "loopback", "macvlan", "portmap", "ptp", "sbr", "static", "tap", "tuning", "vlan", "vrf",
    )
)  # fmt: skip


@dataclass(frozen=True)
class PortMapping:
    protocol: str  # "tcp", "udp" or "sctp"
    container_port: int
    host_port: int
    host_ip: str = ""

    def runtime_config(self) -> Json:
        """The portMappings entry of runtimeConfig (CNI conventions)."""
        return {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol.lower(),
            "hostIP": self.host_ip,
        }


@dataclass(frozen=True)
class PodNetworkResult:
    ips: list[str]  # the pod interface's addresses without prefix length, IPv4 first
    interfaces: list[Json]
    raw: Json  # the result of the last plugin of the ADD


@dataclass(frozen=True)
class _Call:
    """What every plugin invocation of one pod attachment shares (the CNI_* environment)."""

    container_id: str
    netns: str
    ifname: str
    args: str


def _version(text: str) -> tuple[int, int, int]:
    match = _VERSION.fullmatch(text)
    if match is None:
        raise FailedPrecondition(f"cniVersion {text!r} is not a version like 1.0.0")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch)


def _clip(data: bytes | str) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    text = text.strip()
    return text if len(text) <= _OUTPUT_LIMIT else text[:_OUTPUT_LIMIT] + "...(truncated)"


def _validate_network(network: Any, source: str) -> Json:
    if not isinstance(network, dict):
        raise FailedPrecondition(f"CNI config {source}: not a JSON object")
    name, version, plugins = network.get("name"), network.get("cniVersion"), network.get("plugins")
    if not isinstance(name, str) or not name:
        raise FailedPrecondition(f"CNI config {source}: no network name")
    if not isinstance(version, str):
        raise FailedPrecondition(f"CNI config {source}: no cniVersion")
    _version(version)
    if not isinstance(plugins, list) or not plugins:
        raise FailedPrecondition(f"CNI config {source}: no plugins")
    for plugin in plugins:
        plugin_type = plugin.get("type") if isinstance(plugin, dict) else None
        # The type names a file in the plugin directories: no paths, nothing hidden.
        if not isinstance(plugin_type, str) or not _PLUGIN_TYPE.fullmatch(plugin_type):
            raise FailedPrecondition(f"CNI config {source}: plugin {plugin!r} has no valid type")
    return network


def _install_hint(missing: list[str]) -> str:
    """What to install for the plugins in ``missing``."""
    reference = [t for t in missing if t in REFERENCE_PLUGINS]
    others = [t for t in missing if t not in REFERENCE_PLUGINS]
    hints = []
    if reference:
        hints.append(f"install {', '.join(reference)} with: apt-get install containernetworking-plugins")
    if others:
        hints.append(
            f"{', '.join(others)} {'is' if len(others) == 1 else 'are'} not part of "
            "containernetworking-plugins: install the network add-on that provides "
            f"{'it' if len(others) == 1 else 'them'}"
        )
    return "; ".join(hints) + ", or list the plugins' directory in network.bin_dirs"


def _plugin_types(network: Json) -> list[str]:
    """Every plugin binary the network runs, including delegated IPAM plugins."""
    types: list[str] = []
    for plugin in network["plugins"]:
        types.append(plugin["type"])
        ipam = plugin.get("ipam")
        if isinstance(ipam, dict) and isinstance(ipam.get("type"), str):
            types.append(ipam["type"])
    return list(dict.fromkeys(types))


def _result_ips(result: Json, ifname: str) -> list[str]:
    """The pod interface's addresses: IPs tied to ``ifname`` (or to no interface), IPv4 first."""
    interfaces = result.get("interfaces") or []
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for entry in result.get("ips") or []:
        index = entry.get("interface")
        if (
            isinstance(index, int)
            and 0 <= index < len(interfaces)
            and interfaces[index].get("name") != ifname
        ):
            continue  # an address of another interface, e.g. the bridge's own gateway address
        try:
            found.append(ipaddress.ip_interface(entry["address"]).ip)
        except (KeyError, TypeError, ValueError):
            continue
    for legacy in ("ip4", "ip6"):  # CNI 0.2.0 results
        entry = result.get(legacy)
        if isinstance(entry, dict) and "ip" in entry:
            with contextlib.suppress(ValueError):
                found.append(ipaddress.ip_interface(entry["ip"]).ip)
    ordered = sorted(dict.fromkeys(found), key=lambda ip: ip.version)  # stable: keeps plugin order
    return [str(ip) for ip in ordered]


class CNI:
    def __init__(
        self,
        conf_dir: Path,
        bin_dirs: list[Path],
        cache_dir: Path,
        builtin_subnet: str = "198.18.0.0/16",
        builtin_bridge: str = "pycri0",
        plugin_timeout: float = DEFAULT_PLUGIN_TIMEOUT,
    ) -> None:
        self.conf_dir = conf_dir
        self.bin_dirs = list(bin_dirs)
        self.cache_dir = cache_dir
        # host-local's allocations live beside the cache, not in the host-wide
        # /var/lib/cni/networks: several pycri instances (and tests) stay apart, and the
        # allocations share the cache's lifetime (both vanish together with /run).
        self.ipam_dir = cache_dir.parent / "cni-ipam"
        self.plugin_timeout = plugin_timeout
        if not builtin_bridge or len(builtin_bridge) > 15 or "/" in builtin_bridge:
            raise InvalidArgument(f"bridge name {builtin_bridge!r} is not a valid interface name")
        self.builtin_bridge = builtin_bridge
        self.builtin_subnet = ""
        self.set_pod_cidr(builtin_subnet)

    # --- configuration ------------------------------------------------------------

    def set_pod_cidr(self, cidr: str) -> None:
        """The subnet of the built-in network (kubelet's UpdateRuntimeConfig pod CIDR)."""
        try:
            subnet = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise InvalidArgument(f"pod CIDR {cidr!r} is not a subnet") from None
        if subnet.num_addresses < 4:
            raise InvalidArgument(f"pod CIDR {subnet} is too small for pods")
        self.builtin_subnet = str(subnet)

    def builtin_config(self) -> Json:
        default_route = "0.0.0.0/0" if ipaddress.ip_network(self.builtin_subnet).version == 4 else "::/0"
        return {
            "cniVersion": "1.0.0",
            "name": "pycri",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.builtin_bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.builtin_subnet}]],
                        "routes": [{"dst": default_route}],
                        "dataDir": str(self.ipam_dir),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def _load(self) -> tuple[Json, str]:
        """The network list in use and where it came from."""
        try:
            files = sorted(p for p in self.conf_dir.iterdir() if p.suffix in CONF_SUFFIXES and p.is_file())
        except FileNotFoundError:
            files = []
        except OSError as exc:
            raise from_os_error(exc, f"cannot read CNI config directory {self.conf_dir}") from exc
        if not files:
            return self.builtin_config(), f"built-in bridge {self.builtin_bridge} on {self.builtin_subnet}"
        path = files[0]
        try:
            data = json.loads(path.read_bytes())
        except OSError as exc:
            raise from_os_error(exc, f"cannot read CNI config {path}") from exc
        except ValueError as exc:
            raise FailedPrecondition(f"CNI config {path}: {exc}") from exc
        if isinstance(data, dict) and "plugins" not in data and path.suffix != ".conflist":
            # A single plugin's config: libcni wraps it as a list of one.
            data = {"cniVersion": data.get("cniVersion"), "name": data.get("name"), "plugins": [data]}
        return _validate_network(data, str(path)), str(path)

    def config(self) -> Json:
        return self._load()[0]

    def find_plugin(self, plugin_type: str) -> Path | None:
        for directory in self.bin_dirs:
            candidate = directory / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        return None

    def _missing(self, network: Json) -> list[str]:
        wanted = _plugin_types(LOOPBACK_NETWORK) + _plugin_types(network)
        return [t for t in dict.fromkeys(wanted) if self.find_plugin(t) is None]

    def _missing_message(self, network: Json, source: str, missing: list[str]) -> str:
        dirs = ", ".join(map(str, self.bin_dirs))
        return (
            f"CNI network {network['name']!r} ({source}) lacks plugins {missing} in {dirs}; "
            f"{_install_hint(missing)}"
        )

    def ready(self) -> tuple[bool, str]:
        try:
            network, source = self._load()
        except PycriError as exc:
            return False, str(exc)
        missing = self._missing(network)
        if missing:
            return False, self._missing_message(network, source, missing)
        return True, f"CNI network {network['name']!r} ({source})"

    # --- the cache of what ADD did ----------------------------------------------------

    def recorded_pods(self) -> list[str]:
        """The pods with an attachment on record (an ADD begun and no DEL finished)."""
        try:
            names = os.listdir(self.cache_dir)
        except FileNotFoundError:
            return []
        return [n.removesuffix(".json") for n in names if n.endswith(".json") and not n.startswith(".")]

    def _cache_path(self, pod_id: str) -> Path:
        if not _CONTAINER_ID.fullmatch(pod_id):
            raise InvalidArgument(f"pod id {pod_id!r} is not a valid CNI container ID")
        return self.cache_dir / f"{pod_id}.json"

    def _write_cache(self, record: Json) -> None:
        path = self._cache_path(record["containerId"])
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Write and rename, so a crash leaves the old record or the new one, never half of one.
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-")
        except OSError as exc:
            raise from_os_error(exc, f"cannot write the CNI cache {path}") from exc
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise from_os_error(exc, f"cannot write the CNI cache {path}") from exc
            raise

    def _read_cache(self, pod_id: str) -> Json | None:
        path = self._cache_path(pod_id)
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise from_os_error(exc, f"cannot read the CNI cache {path}") from exc
        except ValueError as exc:
            raise Internal(f"CNI cache {path} is unreadable: {exc}") from exc
        if not isinstance(record, dict) or not isinstance(record.get("network"), dict):
            raise Internal(f"CNI cache {path} is not a pycri CNI record")
        return record

    # --- ADD, CHECK, DEL ----------------------------------------------------------------

    def add(
        self,
        pod_id: str,
        netns: Path,
        *,
        pod_name: str,
        pod_namespace: str,
        pod_uid: str,
        port_mappings: list[PortMapping],
        ifname: str = "eth0",
    ) -> PodNetworkResult:
        """Attach the pod's network namespace to the pod network; on failure nothing stays attached."""
        cache_path = self._cache_path(pod_id)
        if not ifname or len(ifname) > 15 or "/" in ifname or ifname in (".", ".."):
            raise InvalidArgument(f"interface name {ifname!r} is not valid")
        cni_args = _cni_args(pod_id, pod_name=pod_name, pod_namespace=pod_namespace, pod_uid=pod_uid)
        mappings = [_check_mapping(m) for m in port_mappings if m.host_port > 0]  # 0: not published
        if not is_network_namespace(netns):
            if not netns.exists():
                raise NotFound(f"network namespace {netns} does not exist")
            raise InvalidArgument(f"{netns} is not a network namespace")
        network, source = self._load()
        missing = self._missing(network)
        if missing:
            raise FailedPrecondition(self._missing_message(network, source, missing))
        if cache_path.exists():
            raise AlreadyExists(f"pod {pod_id} already has a CNI attachment on record ({cache_path})")
        record: Json = {
            "kind": "pycri-cni-attachment",
            "containerId": pod_id,
            "ifName": ifname,
            "cniArgs": cni_args,
            "network": network,
            "source": source,
            "portMappings": mappings,
            "result": None,
        }
        self._write_cache(record)
        call = _Call(pod_id, str(netns), ifname, cni_args)
        try:
            self._run("ADD", LOOPBACK_NETWORK, _Call(pod_id, str(netns), "lo", cni_args), [], None, None)
            self._run("ADD", network, call, mappings, None, record)
            if not record["result"]:
                raise Internal(f"CNI network {network['name']!r} returned no result")
            self._write_cache(record)
        except BaseException as exc:
            self._undo_failed_add(record, netns, exc)
            raise
        result = record["result"]
        return PodNetworkResult(_result_ips(result, ifname), list(result.get("interfaces") or []), result)

    def _undo_failed_add(self, record: Json, netns: Path, exc: BaseException) -> None:
        # The spec's answer to a failed ADD: DEL the whole list; every plugin's DEL must
        # cope with what it did not (or only half) set up.
        errors = self._delete_all(record, netns)
        if not errors:
            with contextlib.suppress(FileNotFoundError):
                self._cache_path(record["containerId"]).unlink()
            return
        # Keep the record: a later delete() retries the cleanup.
        messages = [str(e) for e in errors]
        log.warning("CNI cleanup after a failed ADD failed", pod=record["containerId"], errors=messages)
        if isinstance(exc, PycriError):
            exc.args = (
                f"{exc}; cleaning up also failed (record kept; delete to retry): {'; '.join(messages)}",
            )

    def check(self, pod_id: str, netns: Path) -> None:
        """CHECK the attachment of a pod against the network that made it (CNI >= 0.4.0)."""
        record = self._read_cache(pod_id)
        if record is None:
            raise NotFound(f"pod {pod_id} has no CNI attachment on record")
        if not record.get("result"):
            raise FailedPrecondition(f"the CNI ADD of pod {pod_id} did not complete")
        if not is_network_namespace(netns):
            raise NotFound(f"network namespace {netns} of pod {pod_id} is gone")
        network = record["network"]
        if _version(network["cniVersion"]) < (0, 4, 0) or str(network.get("disableCheck")).lower() == "true":
            return
        cni_args = record["cniArgs"]
        self._run("CHECK", LOOPBACK_NETWORK, _Call(pod_id, str(netns), "lo", cni_args), [], None, None)
        call = _Call(pod_id, str(netns), record["ifName"], cni_args)
        self._run("CHECK", network, call, record["portMappings"], record["result"], None)

    def delete(
        self,
        pod_id: str,
        netns: Path | None,
        *,
        pod_name: str = "",
        pod_namespace: str = "",
        pod_uid: str = "",
    ) -> None:
        """DEL the pod's attachment with the network and arguments of its ADD; repeating it is fine.

        ``netns`` may be None or already gone: plugins then get CNI_NETNS="" (the spec
        allows it) and release what lives outside it (IPAM, iptables rules). The pod's
        name, namespace and UID are accepted for symmetry with ``add``; the values on
        record from the ADD are the ones used.
        """
        record = self._read_cache(pod_id)
        if record is None:
            return  # written before the first ADD plugin ran, removed after the last DEL: nothing attached
        errors = self._delete_all(record, netns)
        if errors:
            # A plugin gone from the host needs a person; anything else may pass on a retry.
            permanent = any(isinstance(e, FailedPrecondition) for e in errors)
            raise (FailedPrecondition if permanent else Unavailable)(
                f"CNI DEL of pod {pod_id} failed (record kept; delete again to retry): "
                f"{'; '.join(map(str, errors))}"
            )
        with contextlib.suppress(FileNotFoundError):
            self._cache_path(pod_id).unlink()

    def _delete_all(self, record: Json, netns: Path | None) -> list[PycriError]:
        """DEL every plugin of the pod's network in reverse, then the loopback; the errors met."""
        pod_id, cni_args = record["containerId"], record["cniArgs"]
        netns_arg = str(netns) if netns is not None and is_network_namespace(netns) else ""
        errors: list[PycriError] = []
        call = _Call(pod_id, netns_arg, record["ifName"], cni_args)
        errors += self._run(
            "DEL",
            record["network"],
            call,
            record["portMappings"],
            record.get("result"),
            None,
            keep_going=True,
        )
        errors += self._run(
            "DEL", LOOPBACK_NETWORK, _Call(pod_id, netns_arg, "lo", cni_args), [], None, None, keep_going=True
        )
        return errors

    # --- running plugins ------------------------------------------------------------

    def _run(
        self,
        command: str,
        network: Json,
        call: _Call,
        mappings: list[Json],
        prev_result: Json | None,
        record: Json | None,
        *,
        keep_going: bool = False,
    ) -> list[PycriError]:
        """Run ``command`` through the network's plugins (reverse order for DEL).

        ADD chains each plugin's result into the next one's prevResult and keeps the
        latest in ``record["result"]``, so that a rollback hands plugins what was done.
        With ``keep_going`` (DEL), errors are collected and returned instead of raised, so
        that one failing plugin does not keep the others from releasing their part.
        """
        plugins = network["plugins"]
        if command == "DEL":
            plugins = list(reversed(plugins))
            if _version(network["cniVersion"]) < (0, 4, 0):
                prev_result = None  # DEL took no prevResult before 0.4.0
        errors: list[PycriError] = []
        for plugin in plugins:
            stdin = copy.deepcopy(plugin)
            stdin["name"] = network["name"]
            stdin["cniVersion"] = network["cniVersion"]
            if prev_result:
                stdin["prevResult"] = prev_result
            capabilities = plugin.get("capabilities") or {}
            if capabilities.get("portMappings") and mappings:
                stdin["runtimeConfig"] = {"portMappings": mappings}
            try:
                output = self._exec(command, plugin["type"], stdin, call, network["name"])
            except PycriError as exc:
                if not keep_going:
                    raise
                errors.append(exc)
                continue
            if command == "ADD" and output is not None:
                prev_result = output
                if record is not None:
                    record["result"] = output
        return errors

    def _exec(
        self, command: str, plugin_type: str, stdin: Json, call: _Call, network_name: str
    ) -> Json | None:
        """Execute one plugin per the spec's protocol; its parsed stdout, None when it printed nothing."""
        what = f"CNI plugin {plugin_type} ({command}, network {network_name!r}, pod {call.container_id})"
        binary = self.find_plugin(plugin_type)
        if binary is None:
            raise FailedPrecondition(
                f"{what}: not found in {', '.join(map(str, self.bin_dirs))}; {_install_hint([plugin_type])}"
            )
        env = dict(os.environ)
        env.setdefault("PATH", _DEFAULT_PATH)  # plugins run iptables, ip6tables, modprobe...
        env.update(
            CNI_COMMAND=command,
            CNI_CONTAINERID=call.container_id,
            CNI_NETNS=call.netns,
            CNI_IFNAME=call.ifname,
            CNI_ARGS=call.args,
            CNI_PATH=":".join(map(str, self.bin_dirs)),
        )
        try:
            # A session of its own, so a timeout kills the plugin and the IPAM plugin it runs.
            proc = subprocess.Popen(
                [str(binary)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd="/",
                start_new_session=True,
            )
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC):
                # Found a moment ago: removed, or not a program this machine can run.
                raise FailedPrecondition(
                    f"{what}: cannot execute {binary}: {exc.strerror}; {_install_hint([plugin_type])}"
                ) from exc
            raise from_os_error(exc, f"{what}: cannot execute {binary}") from exc
        try:
            out, err = proc.communicate(json.dumps(stdin).encode(), timeout=self.plugin_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                _, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                err = b""
            raise DeadlineExceeded(
                f"{what}: no answer after {self.plugin_timeout:g}s; stderr: {_clip(err)}"
            ) from None
        if proc.returncode != 0:
            raise _plugin_error(what, proc.returncode, out, err)
        if not out.strip():
            return None
        try:
            parsed = json.loads(out)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise Internal(f"{what}: output is not a JSON object: {_clip(out)}; stderr: {_clip(err)}")
        return parsed


def _plugin_error(what: str, status: int, out: bytes, err: bytes) -> PycriError:
    """The plugin's error ({"code", "msg", "details"}) and stderr, as a domain error."""
    try:
        error = json.loads(out)
    except ValueError:
        error = None
    stderr = f"; stderr: {_clip(err)}" if err.strip() else ""
    if isinstance(error, dict) and "msg" in error:
        code = error.get("code")
        details = f" ({error['details']})" if error.get("details") else ""
        message = f"{what} failed with CNI error {code}: {error['msg']}{details}{stderr}"
        return Unavailable(message) if code in RETRYABLE_CODES else Internal(message)
    output = f"; output: {_clip(out)}" if out.strip() else ""
    return Internal(f"{what} exited with status {status}{output}{stderr}")


def _cni_args(pod_id: str, *, pod_name: str, pod_namespace: str, pod_uid: str) -> str:
    pairs = {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": pod_namespace,
        "K8S_POD_NAME": pod_name,
        "K8S_POD_INFRA_CONTAINER_ID": pod_id,
        "K8S_POD_UID": pod_uid,
    }
    for key, value in pairs.items():
        # ';' and '=' are CNI_ARGS's separators; Kubernetes names never hold them.
        if ";" in value or "=" in value or "\0" in value:
            raise InvalidArgument(f"{key} {value!r} cannot be passed in CNI_ARGS")
    return ";".join(f"{key}={value}" for key, value in pairs.items())


def _check_mapping(mapping: PortMapping) -> Json:
    protocol = mapping.protocol.lower()
    if protocol not in PROTOCOLS:
        raise InvalidArgument(f"port mapping protocol {mapping.protocol!r} is not one of {PROTOCOLS}")
    for name, port in (("container", mapping.container_port), ("host", mapping.host_port)):
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"port mapping {name} port {port} is out of range")
    if mapping.host_ip:
        try:
            ipaddress.ip_address(mapping.host_ip)
        except ValueError:
            raise InvalidArgument(f"port mapping host IP {mapping.host_ip!r} is not an IP address") from None
    return mapping.runtime_config()
