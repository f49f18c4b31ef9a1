"""``pycri build``: a Containerfile built through the daemon (RUN in pycri containers, COPY and ADD
as layers through the hostile-content unpacker), cached per step, failing cleanly."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pytest

from tests.support.images import hostile_layer
from tests.support.pods import Env, wait_exited
from tests.support.registry import Registry
from tests.test_commit import pycri

pytestmark = pytest.mark.root

CONTAINERFILE = """\
# a comment
ARG GREETING=hello
FROM {image}
ENV WHO=world \\
    EXTRA=1
WORKDIR /app
RUN echo "$GREETING $WHO" > /app/greeting && echo ran-step
COPY files/ ./files/
ADD bundle.tar /opt/
COPY note.txt /etc/note.txt
LABEL built=yes
CMD ["sh", "-c", "cat /app/greeting /app/files/a.txt /opt/inside.txt /etc/note.txt"]
"""


def _context(tmp_path: Path, image: str) -> Path:
    context = tmp_path / "ctx"
    (context / "files" / "sub").mkdir(parents=True)
    (context / "files" / "a.txt").write_text("file a\n")
    (context / "files" / "sub" / "b.txt").write_text("file b\n")
    (context / "files" / "secret.key").write_text("never copied\n")
    (context / ".dockerignore").write_text("files/*.key\n")
    (context / "note.txt").write_text("note v1\n")
    data = b"from the archive\n"
    with tarfile.open(context / "bundle.tar", "w") as tar:
        info = tarfile.TarInfo("inside.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (context / "Containerfile").write_text(CONTAINERFILE.format(image=image))
    return context


def _run_image(env: Env, pod: str, image: str, name: str) -> str:
    cid = env.cri.create_container(pod, name, image, log_path=f"{name}.log")
    env.cri.start_container(cid)
    assert wait_exited(env.cri, cid).exit_code == 0
    return (env.logs / "build" / f"{name}.log").read_text()


def test_build_runs_copies_and_caches_each_step(env: Env, tmp_path: Path) -> None:
    context = _context(tmp_path, env.image)
    first = pycri(env, "build", "-t", "built:1", str(context))
    assert first.returncode == 0, first.stderr + first.stdout
    assert "STEP 5/10: RUN" in first.stdout and "\nran-step\n" in first.stdout
    image_id = first.stdout.split()[-2]
    pod = env.pod("build")
    output = _run_image(env, pod, "built:1", "first")
    for expected in ("hello world", "file a", "from the archive", "note v1"):
        assert expected in output
    check = env.cri.create_container(
        pod, "check", "built:1", command=["sh", "-c", "ls /app/files; echo $EXTRA"], log_path="check.log"
    )
    env.cri.start_container(check)
    wait_exited(env.cri, check)
    listing = (env.logs / "build" / "check.log").read_text()
    assert "a.txt" in listing and "sub" in listing and "secret.key" not in listing  # .dockerignore

    # Unchanged: every step from the cache, no RUN, the same image, well under a second of work.
    started = time.monotonic()
    again = pycri(env, "build", "-t", "built:1", str(context))
    elapsed = time.monotonic() - started
    assert again.returncode == 0, again.stderr
    assert "\nran-step\n" not in again.stdout and again.stdout.count("Using cache") == 8
    assert again.stdout.split()[-2] == image_id
    print(f"\nunchanged rebuild of 10 steps: {elapsed:.2f}s (CLI start-up included)")

    # The last COPY changed: the steps before come from the cache, that one and the rest run.
    (context / "note.txt").write_text("note v2\n")
    changed = pycri(env, "build", "-t", "built:2", str(context))
    assert changed.returncode == 0, changed.stderr
    assert "\nran-step\n" not in changed.stdout and changed.stdout.count("Using cache") == 5
    assert "note v2" in _run_image(env, pod, "built:2", "second")
    # No build pod or container is left.
    assert [p for p in env.cri.list_pods() if p.metadata.namespace == "pycri-build"] == []


def test_a_failing_run_stops_the_build_with_its_output_and_leaves_nothing(env: Env, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Containerfile").write_text(
        f"FROM {env.image}\nRUN echo before > /before\nRUN echo oops-output; exit 3\nRUN echo never\n"
    )
    images_before = {i.id for i in env.cri.list_images()}
    failed = pycri(env, "build", "-t", "broken:1", str(context))
    assert failed.returncode != 0
    assert "line 3" in failed.stderr and "exit code 3" in failed.stderr and "oops-output" in failed.stderr
    assert "never" not in failed.stdout
    assert env.cri.list_containers() == [] and env.cri.list_pods() == []
    assert not any("broken:1" in " ".join(i.repo_tags) for i in env.cri.list_images())
    # The step before is cached: the rebuild does not run it again.
    rerun = pycri(env, "build", "-t", "broken:1", str(context))
    assert "Using cache" in rerun.stdout.split("STEP 3/4")[0]
    assert len({i.id for i in env.cri.list_images()} - images_before) == 1  # only the cached step


def test_run_has_no_network_but_lo_unless_network_host(env: Env, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    # /proc/net/dev: one line per interface of the step's network namespace (after two header lines).
    (context / "Containerfile").write_text(
        f"FROM {env.image}\n"
        "RUN echo ifaces: $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ,)\n"
    )
    isolated = pycri(env, "build", "--no-cache", "-t", "nonet:1", str(context))
    assert isolated.returncode == 0, isolated.stderr + isolated.stdout
    assert "ifaces: lo," in isolated.stdout
    host = pycri(env, "build", "--no-cache", "--network", "host", "-t", "hostnet:1", str(context))
    assert host.returncode == 0, host.stderr + host.stdout
    host_ifaces = sorted(
        line.split(":")[0].strip() for line in Path("/proc/net/dev").read_text().splitlines()[2:]
    )
    assert f"ifaces: {','.join(host_ifaces)}," in host.stdout


def test_copy_of_a_symlink_leaving_the_context_or_a_missing_file_is_refused(env: Env, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (tmp_path / "outside.txt").write_text("host secret\n")
    (context / "link").symlink_to(tmp_path / "outside.txt")
    (context / "Containerfile").write_text(f"FROM {env.image}\nCOPY link /x\n")
    escaped = pycri(env, "build", str(context))
    assert escaped.returncode != 0 and "outside the build context" in escaped.stderr
    (context / "Containerfile").write_text(f"FROM {env.image}\nCOPY ../outside.txt /x\n")
    climbed = pycri(env, "build", str(context))
    assert climbed.returncode != 0 and "outside the build context" in climbed.stderr
    (context / "Containerfile").write_text(f"FROM {env.image}\nCOPY nothing-here /x\n")
    missing = pycri(env, "build", str(context))
    assert missing.returncode != 0 and "not in the build context" in missing.stderr
    assert env.cri.list_pods() == []


def test_multi_stage_build_copies_from_an_earlier_stage(env: Env, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Containerfile").write_text(
        f"FROM {env.image} AS builder\n"
        "RUN mkdir -p /out/dir && echo artifact > /out/dir/result && ln -s result /out/dir/link\n"
        f"FROM {env.image}\n"
        "COPY --from=builder /out/dir /dist\n"
        "COPY --from=0 /out/dir/result /single\n"
        'CMD ["sh", "-c", "cat /dist/result /dist/link /single"]\n'
    )
    result = pycri(env, "build", "-t", "staged:1", str(context))
    assert result.returncode == 0, result.stderr + result.stdout
    pod = env.pod("build")
    assert _run_image(env, pod, "staged:1", "staged").count("artifact") == 3
    # The final image has no trace of the builder's RUN layer: only the two COPY layers on top.
    final = env.cri.image_status("staged:1", verbose=True)
    base = env.cri.image_status(env.image, verbose=True)
    layers = json.loads(final.info["info"])["layers"]
    assert len(layers) == len(json.loads(base.info["info"])["layers"]) + 2
    assert env.cri.list_containers() == [] or all(
        c.metadata.name in ("staged",) for c in env.cri.list_containers()
    )


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_a_built_image_pushes_and_pulls_back_in_either_format(
    env: Env, registry: Registry, tmp_path: Path, fmt: str
) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "hello.txt").write_text("hello\n")
    (context / "Containerfile").write_text(f"FROM {env.image}\nCOPY hello.txt /hello.txt\nENV BUILT=1\n")
    target = f"{registry.host}/test/built-{fmt}-{env.daemon.workdir.name}:1"
    built = pycri(env, "build", "-t", target, str(context))
    assert built.returncode == 0, built.stderr
    image_id = built.stdout.split()[-2]
    pushed = pycri(env, "push", "--format", fmt, target)
    assert pushed.returncode == 0, pushed.stderr
    env.cri.remove_image(target)
    assert env.cri.pull(target) == image_id


@pytest.mark.parametrize("kind", ["dotdot", "dotdot_nested", "symlink_escape", "hardlink_escape"])
def test_add_of_a_hostile_archive_is_refused_and_writes_nothing(env: Env, tmp_path: Path, kind: str) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "evil.tar.gz").write_bytes(hostile_layer(kind).blob)  # type: ignore[arg-type]
    (context / "Containerfile").write_text(f"FROM {env.image}\nADD evil.tar.gz /opt/\n")
    layers_before = sorted(p.name for p in (env.daemon.root / "layers").iterdir())
    images_before = {i.id for i in env.cri.list_images()}
    result = pycri(env, "build", "-t", "evil:1", str(context))
    assert result.returncode != 0
    assert any(
        why in result.stderr for why in ("leaves its destination", "outside the layer", "above the layer")
    ), result.stderr
    assert sorted(p.name for p in (env.daemon.root / "layers").iterdir()) == layers_before
    assert {i.id for i in env.cri.list_images()} == images_before
    assert list((env.daemon.root / "tmp").iterdir()) == []
    assert not Path("/tmp/evil").exists() and not (tmp_path / "evil").exists()


def test_healthcheck_and_onbuild_are_recorded_in_the_image_config(env: Env, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Containerfile").write_text(
        f"FROM {env.image}\nARG PORT=8080\n"
        "HEALTHCHECK --interval=5s --retries=2 CMD wget -q -O- localhost:$PORT || exit 1\n"
        "ONBUILD RUN echo triggered $PORT\n"
    )
    built = pycri(env, "build", "-t", "health:1", str(context))
    assert built.returncode == 0, built.stderr + built.stdout
    info = json.loads(env.cri.image_status("health:1", verbose=True).info["info"])
    config = info["imageSpec"]["config"]
    # Recorded as written: no build variable substituted, as in Docker.
    assert config["Healthcheck"] == {
        "Test": ["CMD-SHELL", "wget -q -O- localhost:$PORT || exit 1"],
        "Interval": 5 * 10**9,
        "Retries": 2,
    }
    assert config["OnBuild"] == ["RUN echo triggered $PORT"]
    bad = context / "Bad"
    bad.write_text(f"FROM {env.image}\nHEALTHCHECK --interval=soon CMD true\n")
    refused = pycri(env, "build", "-f", str(bad), str(context))
    assert refused.returncode != 0 and "not a duration" in refused.stderr, refused.stderr


def test_copy_chown_by_name_from_the_image_and_chmod(env: Env, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    (context / "tree" / "sub").mkdir(parents=True)
    (context / "tree" / "sub" / "f").write_text("in tree\n")
    (context / "one").write_text("one\n")
    (context / "Containerfile").write_text(
        f"FROM {env.image}\n"
        "COPY --chown=app:grp --chmod=640 one /data/one\n"
        "COPY --chown=www-data tree /tree\n"
        "COPY --chown=1002:nogroup --chmod=0750 tree /tree2\n"
    )
    built = pycri(env, "build", "-t", "owned:1", str(context))
    assert built.returncode == 0, built.stderr + built.stdout
    pod = env.pod("build")
    cid = env.cri.create_container(
        pod,
        "owned",
        "owned:1",
        command=[
            "stat",
            "-c",
            "%n %u %g %a",
            "/data/one",
            "/tree/sub/f",
            "/tree/sub",
            "/tree2/sub/f",
            "/tree2/sub",
        ],
        log_path="owned.log",
    )
    env.cri.start_container(cid)
    assert wait_exited(env.cri, cid).exit_code == 0
    lines = (env.logs / "build" / "owned.log").read_text().splitlines()
    stats = [line.split(" ", 3)[-1] for line in lines]  # CRI log prefix: time stream tag
    assert stats == [
        "/data/one 1002 1003 640",  # app:grp from the image's /etc/passwd and /etc/group
        "/tree/sub/f 33 33 644",  # a user alone: the GID is the same number
        "/tree/sub 33 33 755",
        "/tree2/sub/f 1002 65534 750",
        "/tree2/sub 1002 65534 750",
    ], lines
    for flags, says in (
        ("--chown=nosuchuser", "no 'nosuchuser' in the image's /etc/passwd"),
        ("--chown=app:nosuchgroup", "no 'nosuchgroup' in the image's /etc/group"),
        ("--chmod=rwx", "--chmod takes an octal mode"),
    ):
        (context / "Bad").write_text(f"FROM {env.image}\nCOPY {flags} one /x\n")
        refused = pycri(env, "build", "-f", str(context / "Bad"), str(context))
        assert refused.returncode != 0 and says in refused.stderr, refused.stderr
    assert [p for p in env.cri.list_pods() if p.metadata.namespace == "pycri-build"] == []


def test_a_killed_build_client_leaves_no_build_pod(env: Env, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Containerfile").write_text(f"FROM {env.image}\nRUN sleep 120\n")
    client = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cri_runtime.daemon.cli",
            "build",
            str(context),
            "--socket",
            str(env.daemon.socket),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def build_pods() -> list[str]:
            return [p.id for p in env.cri.list_pods() if p.metadata.namespace == "pycri-build"]

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pods = build_pods()
            running = [c for c in env.cri.list_containers() if c.pod_sandbox_id in pods and c.state == 1]
            if running:
                break
            time.sleep(0.2)
        assert running, "the build's RUN step never started"
        client.send_signal(signal.SIGKILL)  # no chance to clean up: the daemon must
        client.wait(timeout=10)
        deadline = time.monotonic() + 30
        while build_pods() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert build_pods() == []
        assert [c for c in env.cri.list_containers() if c.pod_sandbox_id in pods] == []
        assert "build pod of a vanished client removed" in env.daemon.log_path.read_text()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
