"""The generated CRI modules must be exactly what grpcio-tools makes of proto/api.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cri_runtime.api import api_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")


def test_generated_modules_are_not_stale(tmp_path: Path) -> None:
    virtual = tmp_path / "cri_runtime" / "api"
    virtual.mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-Icri_runtime/api={ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto" / "api.proto"),
        ],
        check=True,
        cwd=tmp_path,
    )
    for name in GENERATED:
        fresh = (virtual / name).read_text()
        committed = (ROOT / "cri_runtime" / "api" / name).read_text()
        assert fresh == committed, f"cri_runtime/api/{name} is stale: run `make proto`"


def test_schema_is_package_runtime_v1_with_both_services() -> None:
    assert pb.DESCRIPTOR.package == "runtime.v1"
    services = pb.DESCRIPTOR.services_by_name
    assert set(services) == {"RuntimeService", "ImageService"}
    image_rpcs = {m.name for m in services["ImageService"].methods}
    assert {"ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo"} <= image_rpcs


def test_wire_field_numbers_match_upstream_for_key_messages() -> None:
    # Spot checks of numbers kubelet depends on; the whole file is generated from upstream's descriptor.
    fields = pb.PullImageRequest.DESCRIPTOR.fields_by_name
    assert (fields["image"].number, fields["auth"].number, fields["sandbox_config"].number) == (1, 2, 3)
    image = pb.Image.DESCRIPTOR.fields_by_name
    assert image["pinned"].number == 8 and image["uid"].number == 5
    spec = pb.ImageSpec.DESCRIPTOR.fields_by_name
    assert spec["user_specified_image"].number == 18 and spec["image_ref"].number == 20
    assert pb.CgroupDriver.Value("SYSTEMD") == 0 and pb.CgroupDriver.Value("CGROUPFS") == 1
