"""The generated NRI modules must be exactly what grpcio-tools makes of proto/nri/*.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cri_runtime.nri.api import api_pb2, ttrpc_pb2

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ("api", "ttrpc")


def test_generated_nri_modules_are_not_stale(tmp_path: Path) -> None:
    virtual = tmp_path / "cri_runtime" / "nri" / "api"
    virtual.mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-Icri_runtime/nri/api={ROOT / 'proto' / 'nri'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            *(str(ROOT / "proto" / "nri" / f"{name}.proto") for name in SCHEMAS),
        ],
        check=True,
        cwd=tmp_path,
        timeout=60,
    )
    for name in SCHEMAS:
        # api_pb2.pyi is not kept: the schema's enum value named None makes it invalid Python.
        for suffix in ("_pb2.py", "_pb2.pyi") if name == "ttrpc" else ("_pb2.py",):
            fresh = (virtual / f"{name}{suffix}").read_text()
            committed = (ROOT / "cri_runtime" / "nri" / "api" / f"{name}{suffix}").read_text()
            assert fresh == committed, f"cri_runtime/nri/api/{name}{suffix} is stale: run `make nri-proto`"


def test_nri_schema_has_the_runtime_and_plugin_services() -> None:
    assert api_pb2.DESCRIPTOR.package == "nri.pkg.api.v1alpha1"
    services = api_pb2.DESCRIPTOR.services_by_name
    assert {m.name for m in services["Runtime"].methods} == {"RegisterPlugin", "UpdateContainers"}
    plugin_rpcs = {m.name for m in services["Plugin"].methods}
    assert {"Configure", "Synchronize", "CreateContainer", "StateChange", "Shutdown"} <= plugin_rpcs


def test_wire_field_numbers_match_upstream_for_key_messages() -> None:
    register = api_pb2.RegisterPluginRequest.DESCRIPTOR.fields_by_name
    assert (register["plugin_name"].number, register["plugin_idx"].number) == (1, 2)
    adjust = api_pb2.ContainerAdjustment.DESCRIPTOR.fields_by_name
    assert (adjust["annotations"].number, adjust["mounts"].number, adjust["env"].number) == (2, 3, 4)
    request = ttrpc_pb2.Request.DESCRIPTOR.fields_by_name
    assert [request[f].number for f in ("service", "method", "payload", "timeout_nano", "metadata")] == [
        1,
        2,
        3,
        4,
        5,
    ]
    response = ttrpc_pb2.Response.DESCRIPTOR.fields_by_name
    assert (response["status"].number, response["payload"].number) == (1, 2)
