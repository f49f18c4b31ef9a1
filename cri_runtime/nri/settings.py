"""The [nri] table of pycri.toml."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NriConfig:
    # containerd's [plugins."io.containerd.nri.v1.nri"] names and defaults, except that NRI is off
    # unless enabled: containerd 2.x enables it by default, but an enabled default would make every
    # pycri bind the host-wide /var/run/nri/nri.sock, which the node's containerd may already own.
    enable: bool = False
    socket_path: str = "/var/run/nri/nri.sock"
    plugin_path: str = "/opt/nri/plugins"
    plugin_config_path: str = "/etc/nri/conf.d"
    # Seconds; a TOML string with a unit ("5s", "500ms") is accepted too, as containerd writes them.
    plugin_registration_timeout: float = 5.0
    plugin_request_timeout: float = 2.0
    # Refuse plugins connecting to the socket; only pre-installed plugins from plugin_path run.
    disable_connections: bool = False
