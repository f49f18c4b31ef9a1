"""Every program pycri or its tests run comes from a Debian package that the Makefile installs.

On a fresh Debian 12 machine `make test` once failed because the tests ran `nft` and nothing
installed nftables. This test reads the code for the programs it runs (argv literals handed to
subprocess and asyncio, `shutil.which` lookups, `_run("prog", ...)` helpers, absolute paths of
programs, the OCI runtimes and CNI plugins pycri picks by name), finds the package that owns each
(`dpkg -S`), and fails unless that package is named in the Makefile, or is part of every Debian
system (Essential or Priority: required).
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from cri_runtime.network.cni import CNI, LOOPBACK_NETWORK
from cri_runtime.oci.conmon import Executor
from cri_runtime.oci.runtimes import CANDIDATES

ROOT = Path(__file__).resolve().parent.parent
MAKEFILE = ROOT / "Makefile"
SCANNED = ("cri_runtime", "imageservice", "tests")  # bench/ has its own install step (make bench)
CNI_BIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni")
SUBPROCESS_MODULES = {"subprocess", "asyncio"}
SUBPROCESS_CALLS = {"run", "Popen", "check_output", "check_call", "call", "create_subprocess_exec"}
RUN_HELPERS = {"_run", "run_cmd", "_sh"}  # the tests' thin wrappers: _run("nft", "list", ...)
PROGRAM_DIRS = ("/usr/bin/", "/usr/sbin/", "/bin/", "/sbin/", "/usr/lib/cni/", "/usr/libexec/")
# Found in argv literals but run inside containers or built by the tests: not host programs.
NOT_HOST_PROGRAMS = {"pycri"}


@dataclass(frozen=True)
class Use:
    program: str  # a name looked up in PATH, or an absolute path
    where: str  # file:line


def _string(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _first_of_sequence(node: ast.AST) -> str | None:
    if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
        return _string(node.elts[0])
    return None


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def _is_subprocess_call(node: ast.Call) -> bool:
    """subprocess.run(...), asyncio.create_subprocess_exec(...), or a bare imported Popen(...)."""
    func = node.func
    if isinstance(func, ast.Attribute):
        return (
            func.attr in SUBPROCESS_CALLS
            and isinstance(func.value, ast.Name)
            and func.value.id in SUBPROCESS_MODULES
        )
    return isinstance(func, ast.Name) and func.id in SUBPROCESS_CALLS - {"run", "call"}


def _is_run_helper(node: ast.Call) -> bool:
    """A module-level wrapper such as ``_run("nft", "list", "tables")`` (not a method)."""
    return isinstance(node.func, ast.Name) and node.func.id in RUN_HELPERS


def programs_in(path: Path) -> list[Use]:
    """The host programs ``path`` runs, as far as its source says so literally."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[Use] = []

    def add(program: str | None, node: ast.AST) -> None:
        if program and program not in NOT_HOST_PROGRAMS and not program.startswith("-"):
            found.append(Use(program, f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            name = _call_name(node)
            first = node.args[0]
            if _is_subprocess_call(node):
                add(
                    _first_of_sequence(first)
                    or (_string(first) if name == "create_subprocess_exec" else None),
                    node,
                )
            elif name == "which" or _is_run_helper(node):
                add(_string(first), node)
        elif isinstance(node, ast.Assign):
            # PROGRAM = "/usr/bin/conmon" or Path("/usr/bin/catatonit") at any level.
            value = node.value
            if isinstance(value, ast.Call) and _call_name(value) == "Path" and value.args:
                value = value.args[0]
            text = _string(value)
            if text and text.startswith(PROGRAM_DIRS) and "{" not in text and not text.endswith("/"):
                add(text, node)
    return found


def programs_by_name() -> list[Use]:
    """Programs the code picks by name at run time, from the code's own constants."""
    cni = CNI(Path("/nonexistent"), list(map(Path, CNI_BIN_DIRS)), Path("/nonexistent"))
    plugins = [p["type"] for p in cni.builtin_config()["plugins"]] + [
        p["type"] for p in LOOPBACK_NETWORK["plugins"]
    ]
    plugins.append("host-local")  # the bridge's IPAM plugin, nested in its config
    defaults = Executor.__init__.__kwdefaults__ or {}
    uses = [Use(name, "cri_runtime/oci/runtimes.py CANDIDATES") for name in CANDIDATES]
    uses += [Use(f"/usr/lib/cni/{p}", "cri_runtime/network/cni.py built-in network") for p in plugins]
    uses += [Use(str(v), f"Executor {k}") for k, v in defaults.items() if str(v).startswith(PROGRAM_DIRS)]
    return uses


def all_uses() -> list[Use]:
    uses = programs_by_name()
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "api" in path.relative_to(ROOT).parts[1:2]:
                continue  # generated
            uses += programs_in(path)
    return uses


def makefile_packages(variable: str, text: str | None = None) -> set[str]:
    """The words of a ``VAR := a b \\`` list in the Makefile."""
    text = MAKEFILE.read_text() if text is None else text
    match = re.search(rf"^{variable}\s*:?=\s*((?:.*\\\n)*.*)$", text, flags=re.M)
    assert match, f"no {variable} in the Makefile"
    return set(match.group(1).replace("\\\n", " ").split())


@functools.cache
def owner(path: str) -> str | None:
    """The Debian package that installed ``path`` (trying it as named, then resolved)."""
    candidates: list[str] = []
    for name in (path, os.path.realpath(path)):
        # /bin and /sbin are links to /usr/bin and /usr/sbin on Debian 12 (merged /usr), and a
        # package may have shipped a program in any of them: ask dpkg about every spelling.
        base = os.path.basename(name)
        if name.startswith(("/usr/bin/", "/usr/sbin/", "/bin/", "/sbin/")):
            candidates += [name] + [f"{d}/{base}" for d in ("/bin", "/sbin", "/usr/bin", "/usr/sbin")]
        else:
            candidates.append(name)
    for candidate in dict.fromkeys(candidates):
        out = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            return out.stdout.split(":", 1)[0].split(",")[0].strip()
    return None


@functools.cache
def part_of_every_system(package: str) -> bool:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Essential} ${Priority}", package],
        capture_output=True,
        text=True,
        timeout=30,
    )
    essential, _, priority = out.stdout.partition(" ")
    return essential == "yes" or priority == "required"


def locate(program: str) -> str | None:
    if program.startswith("/"):
        return program if os.path.exists(program) else None
    return shutil.which(program, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")


def problems(uses: list[Use], named: set[str]) -> list[str]:
    found: list[str] = []
    for use in uses:
        path = locate(use.program)
        if path is None:
            found.append(
                f"{use.where}: {use.program} is not installed; add its Debian package to APT_PACKAGES"
            )
            continue
        package = owner(path)
        if package is None:
            found.append(f"{use.where}: {use.program} ({path}) belongs to no Debian package")
            continue
        if package not in named and not part_of_every_system(package):
            found.append(
                f"{use.where}: {use.program} comes from {package}, which the Makefile does not install"
            )
    return found


@pytest.fixture(scope="module")
def uses() -> list[Use]:
    return all_uses()


def test_the_scan_finds_the_programs_pycri_and_its_tests_run(uses: list[Use]) -> None:
    names = {os.path.basename(u.program) for u in uses}
    # A broken scan must not pass quietly: these are run today, by pycri or by the tests.
    assert {
        "nft",
        "ip",
        "iptables",
        "conmon",
        "catatonit",
        "crun",
        "runc",
        "bridge",
        "docker-registry",
    } <= names


def test_every_program_run_comes_from_a_package_the_makefile_installs(uses: list[Use]) -> None:
    named = makefile_packages("APT_PACKAGES")
    assert problems(uses, named) == []


def test_dropping_any_needed_package_from_the_makefile_is_caught(uses: list[Use]) -> None:
    named = makefile_packages("APT_PACKAGES")
    needed = {owner(p) for u in uses if (p := locate(u.program))} & named
    assert "nftables" in needed
    for package in sorted(needed):
        if part_of_every_system(package):
            continue
        left = problems(uses, named - {package})
        assert any(package in line for line in left), f"dropping {package} went unnoticed"
