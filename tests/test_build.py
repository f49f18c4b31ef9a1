"""``pycri build``: a Containerfile built through the daemon (RUN in pycri containers, COPY and ADD
as layers through the hostile-content unpacker), cached per step, failing cleanly."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    # As docker build: exit 1, the step, its output, then BuildKit's words for the failure.
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr == (
        "pycri: build failed: STEP 3/4 (line 3): RUN echo oops-output; exit 3\n"
        "oops-output\n"
        'failed to solve: process "/bin/sh -c echo oops-output; exit 3" did not complete successfully:'
        " exit code: 3\n"
    ), failed.stderr
    assert "never" not in failed.stdout
    assert env.cri.list_containers() == [] and env.cri.list_pods() == []
    assert not any("broken:1" in " ".join(i.repo_tags) for i in env.cri.list_images())
    # The step before is cached: the rebuild does not run it again.
    rerun = pycri(env, "build", "-t", "broken:1", str(context))
    assert "Using cache" in rerun.stdout.split("STEP 3/4")[0]
    assert len({i.id for i in env.cri.list_images()} - images_before) == 1  # only the cached step
    # A step the daemon refuses (no such user in the image) names the step too.
    (context / "Containerfile").write_text(f"FROM {env.image}\nUSER nosuchuser\nRUN true\n")
    refused = pycri(env, "build", str(context))
    assert refused.returncode == 1 and "STEP 3/3 (line 3): RUN true: " in refused.stderr, refused.stderr
    assert "nosuchuser" in refused.stderr, refused.stderr
    # A usage error is argparse's: exit 2.
    assert pycri(env, "build", "--no-such-flag", str(context)).returncode == 2


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


def _in_image(env: Env, image: str, name: str, script: str) -> list[str]:
    """What ``sh -c script`` prints in a container of ``image`` (the CRI log prefix removed)."""
    pod = env.pod(name)
    cid = env.cri.create_container(pod, name, image, command=["sh", "-c", script], log_path=f"{name}.log")
    env.cri.start_container(cid)
    assert wait_exited(env.cri, cid).exit_code == 0
    return [line.split(" ", 3)[-1] for line in (env.logs / name / f"{name}.log").read_text().splitlines()]


RUN_HEREDOCS = """\
FROM {image}
ARG WHO=builder
RUN <<EOF
echo "one $WHO" > /one
# a comment line inside the document is the script's
echo ran-heredoc-{marker}
EOF
RUN <<-EOF
\t\techo tabs-stripped > /two
\tEOF
RUN <<EOF
#!/bin/sh -e
echo "script run as $0" > /three
EOF
RUN <<EOF
#!/bin/awk -f
BEGIN {{ print "awk ran the script" > "/five" }}
EOF
RUN cat <<A > /four; cat <<'B' >> /four
first $WHO
A
second $WHO
B
RUN echo last-step
"""


def test_run_heredocs_by_the_shell_as_a_script_and_several_on_a_line(env: Env, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Containerfile").write_text(RUN_HEREDOCS.format(image=env.image, marker="v1"))
    built = pycri(env, "build", "-t", "heredoc:1", str(context))
    assert built.returncode == 0, built.stderr + built.stdout
    assert "\nran-heredoc-v1\n" in built.stdout
    assert 'STEP 3/8: RUN <<EOF (echo "one $WHO" > /one...)' in built.stdout  # BuildKit's summary
    script = "cat /one /two /three /five /four; ls /dev/pipes 2>&1 || true"
    assert _in_image(env, "heredoc:1", "check", script) == [
        "one builder",  # the shell expands the build argument (an environment variable of the step)
        "tabs-stripped",  # <<- strips the leading tabs, of the delimiter line too
        "script run as /dev/pipes/EOF",  # #!: a file of its own, run by its interpreter
        "awk ran the script",  # any interpreter
        "first builder",  # several documents on one line: the shell reads them
        "second $WHO",  # a quoted delimiter: no expansion
        "ls: /dev/pipes: No such file or directory",  # the script's mount is not in the image
    ]
    # The documents' bodies are in the cache key: unchanged, nothing runs; a changed body reruns
    # that step and the ones after it.
    again = pycri(env, "build", "-t", "heredoc:1", str(context))
    assert again.returncode == 0 and again.stdout.count("Using cache") == 6, again.stdout
    (context / "Containerfile").write_text(RUN_HEREDOCS.format(image=env.image, marker="v2"))
    changed = pycri(env, "build", "-t", "heredoc:2", str(context))
    assert changed.returncode == 0, changed.stderr
    assert "\nran-heredoc-v2\n" in changed.stdout and "\nlast-step\n" in changed.stdout
    assert "Using cache" not in changed.stdout
    # A document's script that fails fails its step, with its output and exit code.
    (context / "Containerfile").write_text(
        f"FROM {env.image}\nRUN <<EOF\n#!/bin/sh\necho script-says-no\nexit 7\nEOF\n"
    )
    failed = pycri(env, "build", str(context))
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.startswith("pycri: build failed: STEP 2/2 (line 2): RUN <<EOF (#!/bin/sh...)\n")
    assert "script-says-no" in failed.stderr
    assert 'process "/dev/pipes/EOF" did not complete successfully: exit code: 7' in failed.stderr
    # An unterminated document is refused before anything runs.
    (context / "Containerfile").write_text(f"FROM {env.image}\nRUN <<EOF\necho never\n")
    refused = pycri(env, "build", str(context))
    assert refused.returncode == 1 and "here-document EOF has no line EOF ending it" in refused.stderr
    assert [p for p in env.cri.list_pods() if p.metadata.namespace == "pycri-build"] == []


def test_copy_heredocs_make_files_with_their_modes_owners_and_build_variables(
    env: Env, tmp_path: Path
) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    text = (
        f"FROM {env.image}\n"
        "ARG NAME=world\n"
        "COPY <<EOF /etc/greeting\n"
        "hello $NAME\n"
        "EOF\n"
        'COPY --chmod=755 --chown=1002:1003 <<a.sh <<"b.txt" /opt/\n'
        "echo a $NAME\n"
        "a.sh\n"
        "literal $NAME\n"
        "b.txt\n"
        "ADD <<-EOF /tabbed\n"
        "\ttab gone {version}\n"
        "\tEOF\n"
    )
    (context / "Containerfile").write_text(text.format(version="v1"))
    built = pycri(env, "build", "-t", "inline:1", str(context))
    assert built.returncode == 0, built.stderr + built.stdout
    lines = _in_image(
        env,
        "inline:1",
        "check",
        "stat -c '%n %u %g %a' /etc/greeting /opt/a.sh /opt/b.txt /tabbed;"
        " cat /etc/greeting /opt/a.sh /opt/b.txt /tabbed",
    )
    assert lines == [
        "/etc/greeting 0 0 644",  # a here-document's file: 0644, root's, as in BuildKit
        "/opt/a.sh 1002 1003 755",  # --chmod and --chown apply to them
        "/opt/b.txt 1002 1003 755",
        "/tabbed 0 0 644",
        "hello world",  # an unquoted delimiter: build variables substituted
        "echo a world",
        "literal $NAME",  # a quoted one: the text as written
        "tab gone v1",
    ], lines
    again = pycri(env, "build", "-t", "inline:1", str(context))
    assert again.returncode == 0 and again.stdout.count("Using cache") == 3, again.stdout
    (context / "Containerfile").write_text(text.format(version="v2"))
    changed = pycri(env, "build", "-t", "inline:2", str(context))
    assert changed.returncode == 0 and changed.stdout.count("Using cache") == 2, changed.stdout
    assert _in_image(env, "inline:2", "check2", "cat /tabbed") == ["tab gone v2"]


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` (path -> bytes); ``/moved/X`` redirects to ``/X``; counts requests."""

    def do_GET(self) -> None:
        server: Any = self.server
        server.requests.append(self.path)
        if self.path.startswith("/moved/"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/moved"))
            self.end_headers()
            return
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Last-Modified", "Tue, 15 Nov 1994 08:12:31 GMT")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def files_server() -> Iterator[Any]:
    server: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    server.files, server.requests = {}, []
    server.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _tar_bytes(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_add_of_a_url_downloads_follows_redirects_keeps_archives_and_reruns_on_change(
    env: Env, tmp_path: Path, files_server: Any
) -> None:
    archive = _tar_bytes("inside.txt", b"never unpacked\n")
    files_server.files["/dl/bundle.tar.gz"] = archive
    files_server.files["/dl/note.txt"] = b"note v1\n"
    checksum = "sha256:" + hashlib.sha256(archive).hexdigest()
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Containerfile").write_text(
        f"FROM {env.image}\n"
        f"ADD --checksum={checksum} {files_server.url}/dl/bundle.tar.gz /downloads/\n"
        f"ADD --chmod=640 --chown=1002:1003 {files_server.url}/moved/dl/note.txt /etc/note.txt\n"
        "RUN echo ran-after-add\n"
    )
    built = pycri(env, "build", "-t", "fetched:1", str(context))
    assert built.returncode == 0, built.stderr + built.stdout
    lines = _in_image(
        env,
        "fetched:1",
        "check",
        "stat -c '%n %u %g %a %s %Y' /downloads/bundle.tar.gz /etc/note.txt; cat /etc/note.txt;"
        " ls /downloads",
    )
    assert lines == [
        # 0600, the archive as it was, the time the server's Last-Modified (784887151)
        f"/downloads/bundle.tar.gz 0 0 600 {len(archive)} 784887151",
        "/etc/note.txt 1002 1003 640 8 784887151",  # through the redirect; --chmod/--chown applied
        "note v1",
        "bundle.tar.gz",  # not unpacked: no inside.txt
    ], lines
    assert "/moved/dl/note.txt" in files_server.requests and "/dl/note.txt" in files_server.requests

    # Fetched again on every build (as Docker does) and compared: unchanged, every step cached.
    fetched_before = len(files_server.requests)
    again = pycri(env, "build", "-t", "fetched:1", str(context))
    assert again.returncode == 0 and again.stdout.count("Using cache") == 3, again.stdout
    assert "ran-after-add" not in again.stdout.replace("RUN echo ran-after-add", "")
    assert len(files_server.requests) > fetched_before
    # The remote file changed: that ADD and the steps after it run again.
    files_server.files["/dl/note.txt"] = b"note v2\n"
    changed = pycri(env, "build", "-t", "fetched:2", str(context))
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.count("Using cache") == 1 and "\nran-after-add\n" in changed.stdout
    assert _in_image(env, "fetched:2", "check2", "cat /etc/note.txt") == ["note v2"]


def test_add_of_a_url_that_fails_stops_the_build_and_leaves_nothing(
    env: Env, tmp_path: Path, files_server: Any
) -> None:
    files_server.files["/dl/file"] = b"content\n"
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    right = hashlib.sha256(b"content\n").hexdigest()
    context = tmp_path / "ctx"
    context.mkdir()
    cases = [
        (f"{files_server.url}/dl/missing", "", ["answered 404 Not Found"]),
        (f"http://127.0.0.1:{closed_port}/file", "", ["Connection refused"]),
        (
            f"{files_server.url}/dl/file",
            "--checksum=sha256:" + "0" * 64,
            ["checksum mismatch", "expected sha256:" + "0" * 64, f"got sha256:{right}"],
        ),
    ]
    # The step before the ADD, built (and cached) first.
    (context / "Containerfile").write_text(f"FROM {env.image}\nRUN echo before > /before\n")
    assert pycri(env, "build", str(context)).returncode == 0
    images_before = {i.id for i in env.cri.list_images()}
    layers_before = sorted(p.name for p in (env.daemon.root / "layers").iterdir())
    for url, flag, says in cases:
        (context / "Containerfile").write_text(
            f"FROM {env.image}\nRUN echo before > /before\nADD {flag} {url} /x\nRUN echo never\n"
        )
        failed = pycri(env, "build", "-t", "fetchfail:1", str(context))
        assert failed.returncode == 1, failed.stderr
        assert "STEP 3/4 (line 3): ADD" in failed.stderr and url in failed.stderr, failed.stderr
        for text in says:
            assert text in failed.stderr, failed.stderr
        assert "never" not in failed.stdout.replace("RUN echo never", "")
        assert "Using cache" in failed.stdout.split("STEP 3/4")[0]  # the cache is kept
        assert sorted(p.name for p in (env.daemon.root / "layers").iterdir()) == layers_before
        assert env.cri.list_containers() == [] and env.cri.list_pods() == []
    assert {i.id for i in env.cri.list_images()} == images_before
    # --checksum is for ADD of one URL; COPY takes no URL.
    for line, says in (
        ("ADD --checksum=sha256:" + right + " Containerfile /x", "--checksum is for ADD of one http(s) URL"),
        ("ADD --checksum=md5:abc " + f"{files_server.url}/dl/file /x", "--checksum takes ALGORITHM:HEX"),
        (f"COPY {files_server.url}/dl/file /x", "COPY takes no URL"),
    ):
        (context / "Containerfile").write_text(f"FROM {env.image}\n{line}\n")
        refused = pycri(env, "build", str(context))
        assert refused.returncode == 1 and says in refused.stderr, refused.stderr


def test_a_download_that_stalls_times_out(tmp_path: Path) -> None:
    """No daemon: the client's fetch against a loopback server that accepts and never answers."""
    from cri_runtime.daemon.build import download
    from cri_runtime.errors import DeadlineExceeded

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/slow"
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"no answer within 1 s"):
            download(url, tmp_path / "slow", timeout=1.0)
        assert time.monotonic() - started < 5
    assert not (tmp_path / "slow").exists()
