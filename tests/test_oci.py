"""OCI runtime detection: crun is refused on hybrid hosts whose cgroup2 holds controllers."""

from __future__ import annotations

from pathlib import Path

from cri_runtime.oci import runtimes as oci_runtimes


def test_crun_is_unusable_when_cgroup2_holds_a_controller_and_runc_is_chosen(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("hugetlb\n")
    crun = oci_runtimes.probe("crun", unified=tmp_path)
    assert not crun.usable
    assert "hugetlb" in crun.reason and "mount -t cgroup" in crun.reason
    runc = oci_runtimes.probe("runc")
    chosen, why = oci_runtimes.choose_default("crun", {"crun": crun, "runc": runc})
    assert chosen is not None and chosen.name == "runc"
    assert "crun cannot run here" in why and "hugetlb" in why


def test_crun_is_usable_when_cgroup2_holds_no_controller(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("\n")
    crun = oci_runtimes.probe("crun", unified=tmp_path)
    assert crun.usable, crun.reason
    chosen, why = oci_runtimes.choose_default("crun", {"crun": crun, "runc": oci_runtimes.probe("runc")})
    assert chosen is not None and chosen.name == "crun"
    assert why.startswith("using crun")


def test_missing_runtime_says_how_to_install_it() -> None:
    info = oci_runtimes.probe("no-such-runtime-xyz")
    assert not info.usable and "not installed" in info.reason


def test_recursive_read_only_support_comes_from_the_runtimes_features() -> None:
    crun = oci_runtimes.probe("crun", unified=Path("/nonexistent"))
    runc = oci_runtimes.probe("runc")
    # runc 1.1 lists "rro" in `runc features`; crun 1.8 has no `features` command, so pycri
    # does not claim what it cannot check. The kernel here has mount_setattr.
    assert "rro" in runc.mount_options and runc.recursive_read_only
    assert crun.recursive_read_only is ("rro" in crun.mount_options)
