"""pycri configuration: built-in defaults, then a TOML file, then command-line flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cri_runtime.errors import InvalidArgument
from cri_runtime.nri.settings import NriConfig
from imageservice.config import ImageConfig, RegistryHost

DEFAULT_CONFIG_PATH = Path("/etc/pycri/pycri.toml")


@dataclass(frozen=True)
class NetworkConfig:
    # The first *.conflist here (lexical order) is the pod network.
    conf_dir: str = "/etc/cni/net.d"
    bin_dirs: tuple[str, ...] = ("/opt/cni/bin", "/usr/lib/cni")
    # With no conflist, pycri's built-in bridge network hands out addresses from this subnet.
    pod_subnet: str = "198.18.0.0/16"
    bridge: str = "pycri0"


@dataclass(frozen=True)
class StreamingConfig:
    # Where the exec, attach and port-forward URLs point; port 0 picks a free port.
    address: str = "127.0.0.1"
    port: int = 0
    # Serve https with this certificate and key (PEM files); both empty: plain http.
    tls_cert_file: str = ""
    tls_key_file: str = ""


@dataclass(frozen=True)
class Config:
    socket: str = "/run/pycri/pycri.sock"
    root: str = "/var/lib/pycri"
    state: str = "/run/pycri"
    log_level: str = "info"
    log_format: str = "console"
    cgroup_driver: str = "cgroupfs"
    # "crun" or "runc"; pycri falls back to runc when crun cannot run on this host.
    default_runtime: str = "crun"
    # HOST:PORT of the Prometheus /metrics endpoint; empty: no endpoint.
    metrics_address: str = ""
    # Most processes (and threads) a container may have, its pids.max (as CRI-O's pids_limit; CRI
    # has no field for it). 0: no limit of pycri's (kubelet's podPidsLimit still bounds the pod).
    pids_limit: int = 0
    # CheckpointContainer writes archives only inside this directory (kubelet's checkpoint API
    # writes to <kubelet root>/checkpoints); anything else is refused.
    checkpoint_dir: str = "/var/lib/kubelet/checkpoints"
    image: ImageConfig = field(default_factory=ImageConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    nri: NriConfig = field(default_factory=NriConfig)

    @property
    def socket_path(self) -> Path:
        return Path(self.socket.removeprefix("unix://"))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["network"]["bin_dirs"] = list(self.network.bin_dirs)
        image = out["image"]
        image["pinned_images"] = list(self.image.pinned_images)
        image["registries"] = {host: dataclasses.asdict(reg) for host, reg in self.image.registries.items()}
        for reg in image["registries"].values():
            reg["mirrors"] = list(reg["mirrors"])
            for secret in ("password", "auth"):
                if reg[secret]:
                    reg[secret] = "<redacted>"
        return out


_TOP_KEYS = {f.name for f in dataclasses.fields(Config)} - {"image", "network", "streaming", "nri"}
_NRI_KEYS = {f.name for f in dataclasses.fields(NriConfig)}
_STREAMING_KEYS = {f.name for f in dataclasses.fields(StreamingConfig)}
_NETWORK_KEYS = {f.name for f in dataclasses.fields(NetworkConfig)}
_IMAGE_KEYS = {f.name for f in dataclasses.fields(ImageConfig)} - {"registries"}
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("console", "json")


def _check_type(where: str, value: Any, expected: type | tuple[type, ...]) -> None:
    if isinstance(value, bool) and expected in (int, float, (int, float)):
        raise InvalidArgument(f"{where}: expected a number, got {value!r}")
    if not isinstance(value, expected):
        raise InvalidArgument(f"{where}: expected {expected}, got {value!r}")


def config_from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Overlay the TOML table ``data`` on ``base`` (defaults when None)."""
    base = base or Config()
    unknown = set(data) - _TOP_KEYS - {"image", "registries", "network", "streaming", "nri"}
    if unknown:
        raise InvalidArgument(f"unknown configuration keys: {sorted(unknown)}")
    top: dict[str, Any] = {}
    for key in _TOP_KEYS & set(data):
        _check_type(key, data[key], int if key == "pids_limit" else str)
        top[key] = data[key]
    image_table = data.get("image", {})
    _check_type("image", image_table, dict)
    unknown = set(image_table) - _IMAGE_KEYS
    if unknown:
        raise InvalidArgument(f"unknown keys in [image]: {sorted(unknown)}")
    image_fields: dict[str, Any] = {}
    for f in dataclasses.fields(ImageConfig):
        if f.name in image_table:
            value = image_table[f.name]
            if f.name == "pinned_images":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise InvalidArgument("image.pinned_images must be a list of image names")
                value = tuple(value)
            else:
                expected: type | tuple[type, ...] = (
                    (int, float) if f.name == "pull_progress_timeout" else type(getattr(base.image, f.name))
                )
                _check_type(f"image.{f.name}", value, expected)
            image_fields[f.name] = value
    registries = dict(base.image.registries)
    reg_table = data.get("registries", {})
    _check_type("registries", reg_table, dict)
    for host, table in reg_table.items():
        _check_type(f"registries.{host!r}", table, dict)
        registries[host] = RegistryHost.from_table(host, table)
    image = dataclasses.replace(base.image, registries=registries, **image_fields)
    network_table = data.get("network", {})
    _check_type("network", network_table, dict)
    unknown = set(network_table) - _NETWORK_KEYS
    if unknown:
        raise InvalidArgument(f"unknown keys in [network]: {sorted(unknown)}")
    network_fields: dict[str, Any] = {}
    for key, value in network_table.items():
        if key == "bin_dirs":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidArgument("network.bin_dirs must be a list of directories")
            value = tuple(value)
        else:
            _check_type(f"network.{key}", value, str)
        network_fields[key] = value
    network = dataclasses.replace(base.network, **network_fields)
    streaming_table = data.get("streaming", {})
    _check_type("streaming", streaming_table, dict)
    unknown = set(streaming_table) - _STREAMING_KEYS
    if unknown:
        raise InvalidArgument(f"unknown keys in [streaming]: {sorted(unknown)}")
    for key, value in streaming_table.items():
        _check_type(f"streaming.{key}", value, int if key == "port" else str)
    streaming = dataclasses.replace(base.streaming, **streaming_table)
    nri = _nri_from_table(data.get("nri", {}), base.nri)
    config = dataclasses.replace(base, image=image, network=network, streaming=streaming, nri=nri, **top)
    validate(config)
    return config


def _duration(where: str, value: Any) -> float:
    """Seconds from a number or a containerd-style duration string ("5s", "500ms", "1m")."""
    if isinstance(value, str):
        for unit, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
            number = value.removesuffix(unit)
            if number != value:
                try:
                    return float(number) * scale
                except ValueError:
                    break
        raise InvalidArgument(f'{where}: expected seconds or a duration such as "5s", got {value!r}')
    _check_type(where, value, (int, float))
    return float(value)


def _nri_from_table(table: Any, base: NriConfig) -> NriConfig:
    _check_type("nri", table, dict)
    unknown = set(table) - _NRI_KEYS
    if unknown:
        raise InvalidArgument(f"unknown keys in [nri]: {sorted(unknown)}")
    fields: dict[str, Any] = {}
    for key, value in table.items():
        if key.endswith("_timeout"):
            fields[key] = _duration(f"nri.{key}", value)
        else:
            _check_type(f"nri.{key}", value, type(getattr(base, key)))
            fields[key] = value
    return dataclasses.replace(base, **fields)


def validate(config: Config) -> None:
    if config.log_level not in LOG_LEVELS:
        raise InvalidArgument(f"log_level must be one of {LOG_LEVELS}, got {config.log_level!r}")
    if config.log_format not in LOG_FORMATS:
        raise InvalidArgument(f"log_format must be one of {LOG_FORMATS}, got {config.log_format!r}")
    if config.cgroup_driver not in ("cgroupfs", "systemd"):
        raise InvalidArgument(f"cgroup_driver must be cgroupfs or systemd, got {config.cgroup_driver!r}")
    if config.pids_limit < 0:
        raise InvalidArgument(f"pids_limit must be 0 (no limit) or positive, got {config.pids_limit}")
    if config.default_runtime not in ("crun", "runc"):
        raise InvalidArgument(f"default_runtime must be crun or runc, got {config.default_runtime!r}")
    if config.metrics_address:
        # Here, not at the top: the metrics module pulls in the runtime, which every pycri
        # command (commit, build, push) would otherwise pay for at start-up.
        from cri_runtime.daemon.metrics import parse_address

        parse_address(config.metrics_address, "metrics_address")
    try:
        subnet = ipaddress.ip_network(config.network.pod_subnet)
    except ValueError:
        raise InvalidArgument(f"network.pod_subnet {config.network.pod_subnet!r} is not a subnet") from None
    if subnet.num_addresses < 4:
        raise InvalidArgument(f"network.pod_subnet {subnet} is too small for pods")
    if not 0 <= config.streaming.port <= 65535:
        raise InvalidArgument(f"streaming.port must be 0-65535, got {config.streaming.port}")
    if bool(config.streaming.tls_cert_file) != bool(config.streaming.tls_key_file):
        raise InvalidArgument("streaming.tls_cert_file and streaming.tls_key_file go together")
    if config.image.max_concurrent_downloads < 1:
        raise InvalidArgument("image.max_concurrent_downloads must be at least 1")
    if config.image.max_metadata_bytes < 1024:
        raise InvalidArgument("image.max_metadata_bytes must be at least 1024")
    if config.image.pull_progress_timeout <= 0:
        raise InvalidArgument("image.pull_progress_timeout must be positive")
    for name in ("plugin_registration_timeout", "plugin_request_timeout"):
        if getattr(config.nri, name) <= 0:
            raise InvalidArgument(f"nri.{name} must be positive")
    if config.nri.enable and not config.nri.socket_path and config.nri.disable_connections is False:
        raise InvalidArgument("nri.socket_path must be set when NRI is enabled with connections")


def load_config(path: Path | None, overrides: dict[str, Any]) -> Config:
    """Defaults, then ``path`` (or the default file if it exists), then ``overrides``."""
    config = Config()
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise InvalidArgument(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"configuration file {path}: {exc}") from None
        config = config_from_dict(data, config)
    flags = {k: v for k, v in overrides.items() if v is not None}
    if flags:
        config = dataclasses.replace(config, **flags)
        validate(config)
    return config
