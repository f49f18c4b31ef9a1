"""OCI runtime detection: crun is refused on hybrid hosts whose cgroup2 holds controllers."""

from __future__ import annotations

from pathlib import Path

from cri_runtime import oci


def test_crun_is_unusable_when_cgroup2_holds_a_controller_and_runc_is_chosen(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("hugetlb\n")
    crun = oci.probe("crun", unified=tmp_path)
    assert not crun.usable
    assert "hugetlb" in crun.reason and "mount -t cgroup" in crun.reason
    runc = oci.probe("runc")
    chosen, why = oci.choose_default("crun", {"crun": crun, "runc": runc})
    assert chosen is not None and chosen.name == "runc"
    assert "crun cannot run here" in why and "hugetlb" in why


def test_crun_is_usable_when_cgroup2_holds_no_controller(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("\n")
    crun = oci.probe("crun", unified=tmp_path)
    assert crun.usable, crun.reason
    chosen, why = oci.choose_default("crun", {"crun": crun, "runc": oci.probe("runc")})
    assert chosen is not None and chosen.name == "crun"
    assert why.startswith("using crun")


def test_missing_runtime_says_how_to_install_it() -> None:
    info = oci.probe("no-such-runtime-xyz")
    assert not info.usable and "not installed" in info.reason
