"""Configuration: the shipped annotated file equals the built-in defaults; bad files are refused."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from cri_runtime.daemon.config import Config, config_from_dict, load_config
from cri_runtime.errors import InvalidArgument

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_file_matches_the_builtin_defaults() -> None:
    with open(ROOT / "manifests" / "pycri.toml", "rb") as fh:
        shipped = tomllib.load(fh)
    assert config_from_dict(shipped) == Config()
    # Every default key is written out, so operators see them all.
    defaults = Config().to_dict()
    image_defaults = defaults.pop("image")
    network_defaults = defaults.pop("network")
    image_defaults.pop("registries")
    assert set(shipped) - {"image", "network"} == set(defaults)
    assert set(shipped["image"]) == set(image_defaults)
    assert set(shipped["network"]) == set(network_defaults)


def test_registry_tables_are_parsed_with_defaults_for_the_rest() -> None:
    config = config_from_dict(
        {
            "registries": {
                "registry.k8s.io": {"mirrors": ["http://127.0.0.1:5000/"], "mirrors_only": True},
                "*": {"insecure": True},
            }
        }
    )
    k8s = config.image.registry("registry.k8s.io")
    assert k8s.mirrors == ("http://127.0.0.1:5000",) and k8s.mirrors_only and not k8s.insecure
    assert config.image.registry("other.example").insecure


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"sockett": "/x"}, "sockett"),
        ({"log_level": "loud"}, "log_level"),
        ({"image": {"max_concurrent_downloads": 0}}, "max_concurrent_downloads"),
        ({"image": {"pull_progress_timeout": "soon"}}, "pull_progress_timeout"),
        ({"registries": {"r.io": {"mirrors": ["ftp://x"]}}}, "ftp://x"),
        ({"registries": {"r.io": {"mirror": ["http://x"]}}}, "mirror"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(data: dict, needle: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        config_from_dict(data)
    assert needle in str(err.value)


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('root = "/from/file"\nstate = "/state/file"\n')
    config = load_config(path, {"root": "/from/flag", "state": None})
    assert config.root == "/from/flag" and config.state == "/state/file"
