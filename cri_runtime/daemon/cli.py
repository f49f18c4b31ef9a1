"""The ``pycri`` command: serve, check, version, config, image import/tag/export, commit, push,
checkpoint-image."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from cri_runtime import __version__
from cri_runtime.daemon.config import Config, load_config
from cri_runtime.errors import PycriError


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def render_toml(config: Config) -> str:
    data = config.to_dict()
    registries = data["image"].pop("registries")
    tables = {k: data.pop(k) for k in [k for k, v in data.items() if isinstance(v, dict)]}
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items()]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for host, table in registries.items():
        lines += ["", f"[registries.{json.dumps(host)}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


# images_api.IMAGES_SERVICE (tests check they agree): importing that module would load the
# whole runtime, a cost every commit, push and build would pay at start-up.
IMAGES_SERVICE = "pycri.v1.Images"


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="configuration file (default /etc/pycri/pycri.toml)")
    parser.add_argument("--socket", help="unix socket to serve on (default /run/pycri/pycri.sock)")
    parser.add_argument("--root", help="persistent data directory (default /var/lib/pycri)")
    parser.add_argument("--state", help="runtime state directory (default /run/pycri)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", choices=("console", "json"))
    parser.add_argument(
        "--metrics-address", metavar="HOST:PORT", help="serve Prometheus metrics at /metrics (default: off)"
    )


def _config(args: argparse.Namespace) -> Config:
    socket = args.socket.removeprefix("unix://") if args.socket else None
    return load_config(
        args.config,
        {
            "socket": socket,
            "root": args.root,
            "state": args.state,
            "log_level": args.log_level,
            "log_format": args.log_format,
            "metrics_address": args.metrics_address,
        },
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from cri_runtime.daemon import logs, sdnotify, server

    config = _config(args)
    server.validate_paths(config)
    logs.configure(config.log_level, config.log_format)

    def ready() -> None:
        # Type=notify: systemd counts pycri as started once the socket serves.
        sdnotify.notify("READY=1")

    stopping_sent = False

    def stopping() -> None:
        # Said as shutdown begins, so systemd does not take the drain for a hang.
        nonlocal stopping_sent
        stopping_sent = True
        sdnotify.notify("STOPPING=1")

    try:
        asyncio.run(server.serve(config, ready=ready, stopping=stopping))
    finally:
        if not stopping_sent:
            stopping()
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from cri_runtime.daemon import check

    config = _config(args)
    findings = check.run_checks(config)
    sys.stdout.write(check.report(findings))
    return check.exit_code(findings)


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"pycri {__version__} (CRI runtime API v1)")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    sys.stdout.write(render_toml(_config(args)))
    return 0


def _cmd_image_import(args: argparse.Namespace) -> int:
    import grpc

    from cri_runtime.daemon.server import ADMIN_SERVICE

    config = _config(args)
    archive = Path(args.archive).resolve()
    if config.socket_path.exists():
        with grpc.insecure_channel(f"unix://{config.socket_path}") as channel:
            call = channel.unary_unary(
                f"/{ADMIN_SERVICE}/ImportImage",
                request_serializer=lambda d: json.dumps(d).encode(),
                response_deserializer=json.loads,
            )
            try:
                result = call({"path": str(archive)}, timeout=args.timeout)
            except grpc.RpcError as exc:
                print(f"pycri: import failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
                return 1
        images = result["images"]
    else:
        # No daemon: write to the store directly.
        from cri_runtime.daemon import logs
        from imageservice.importer import import_archive
        from imageservice.store import ImageStore

        logs.configure("warning", config.log_format)
        store = ImageStore(Path(config.root), config.image)
        try:
            images = [{"id": r.id, "repo_tags": r.repo_tags} for r in import_archive(store, archive)]
        finally:
            store.close()
    for image in images:
        print(image["id"], " ".join(image["repo_tags"]))
    return 0


def _images_call(args: argparse.Namespace, method: str, request: dict) -> dict | None:
    """Call ``pycri.v1.Images/<method>`` on the daemon; None (and the reason printed) on error."""
    import grpc

    config = _config(args)
    if not config.socket_path.exists():
        print(
            f"pycri: no daemon at {config.socket_path} (start pycri serve, or pass --socket)", file=sys.stderr
        )
        return None
    with grpc.insecure_channel(f"unix://{config.socket_path}") as channel:
        call = channel.unary_unary(
            f"/{IMAGES_SERVICE}/{method}",
            request_serializer=lambda d: json.dumps(d).encode(),
            response_deserializer=json.loads,
        )
        try:
            return dict(call(request, timeout=args.timeout))
        except grpc.RpcError as exc:
            print(f"pycri: {method.lower()} failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return None


def _cmd_commit(args: argparse.Namespace) -> int:
    request = {
        "container_id": args.container,
        "name": args.name or "",
        "changes": args.change,
        "pause": args.pause,
        "comment": args.message,
        "author": args.author,
    }
    result = _images_call(args, "Commit", request)
    if result is None:
        return 1
    print(result["image"]["id"], " ".join(result["image"]["repo_tags"]))
    return 0


def _cmd_image_tag(args: argparse.Namespace) -> int:
    result = _images_call(args, "Tag", {"source": args.source, "name": args.name})
    if result is None:
        return 1
    print(result["image"]["id"], " ".join(result["image"]["repo_tags"]))
    return 0


def _cmd_image_export(args: argparse.Namespace) -> int:
    request = {"image": args.image, "path": str(Path(args.file).resolve()), "format": args.format}
    result = _images_call(args, "Export", request)
    if result is None:
        return 1
    print(result["image"]["id"], args.file)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    password = args.password
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    request = {
        "image": args.image,
        "dest": args.dest or "",
        "format": args.format or "",
        "username": args.username or "",
        "password": password or "",
        "chunk_size": args.chunk_size,
    }
    result = _images_call(args, "Push", request)
    if result is None:
        return 1
    print(
        f"{result['reference']}@{result['digest']}: uploaded {len(result['uploaded'])}, "
        f"mounted {len(result['mounted'])}, already present {len(result['skipped'])}"
    )
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    import grpc

    from cri_runtime import errors
    from cri_runtime.daemon.build import BuildOptions, build
    from cri_runtime.daemon.client import CRIClient

    config = _config(args)
    by_code = {
        "INVALID_ARGUMENT": errors.InvalidArgument,
        "NOT_FOUND": errors.NotFound,
        "FAILED_PRECONDITION": errors.FailedPrecondition,
        "UNAVAILABLE": errors.Unavailable,
    }
    build_args = {}
    for item in args.build_arg:
        key, sep, value = item.partition("=")
        build_args[key] = value if sep else os.environ.get(key, "")
    context = Path(args.context)
    options = BuildOptions(
        containerfile=Path(args.file) if args.file else context / "Containerfile",
        context=context,
        tag=args.tag or "",
        build_args=build_args,
        host_network=args.network == "host",
        no_cache=args.no_cache,
        cache_file=Path(config.root) / "build-cache.json",
    )
    if not args.file and not options.containerfile.is_file():
        options.containerfile = context / "Dockerfile"
    with CRIClient(f"unix://{config.socket_path}", timeout=args.timeout) as cri:

        def images(method: str, request: dict) -> dict:
            call = cri.channel.unary_unary(
                f"/{IMAGES_SERVICE}/{method}",
                request_serializer=lambda d: json.dumps(d).encode(),
                response_deserializer=json.loads,
            )
            try:
                return dict(call(request, timeout=args.timeout))
            except grpc.RpcError as exc:
                raise by_code.get(exc.code().name, errors.Internal)(str(exc.details())) from None

        # As ``docker build``: a build that fails exits 1 (argparse's usage errors stay 2).
        try:
            image = build(cri, images, options)
        except grpc.RpcError as exc:
            print(f"pycri: build failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except errors.PycriError as exc:
            print(f"pycri: build failed: {exc}", file=sys.stderr)
            return 1
    print(f"{image}{' ' + args.tag if args.tag else ''}")
    return 0


def _cmd_checkpoint_image(args: argparse.Namespace) -> int:
    request = {"archive": str(Path(args.archive).resolve()), "name": args.name}
    result = _images_call(args, "CheckpointImage", request)
    if result is None:
        return 1
    print(result["image"]["id"], " ".join(result["image"]["repo_tags"]))
    return 0


def _add_workflow_commands(sub: argparse._SubParsersAction, image_sub: argparse._SubParsersAction) -> None:
    commit = sub.add_parser("commit", help="make an image of a container's changes")
    commit.add_argument("container")
    commit.add_argument("name", nargs="?", help="NAME[:TAG] of the new image")
    commit.add_argument(
        "-c",
        "--change",
        action="append",
        default=[],
        help="an image config instruction: CMD, ENTRYPOINT, ENV, WORKDIR, USER, LABEL, EXPOSE",
    )
    commit.add_argument(
        "-p", "--pause", action="store_true", help="freeze the container while its changes are read"
    )
    commit.add_argument("-m", "--message", default="", help="history comment")
    commit.add_argument("-a", "--author", default="")
    commit.add_argument("--timeout", type=float, default=600.0)
    _add_config_flags(commit)
    commit.set_defaults(func=_cmd_commit)
    push = sub.add_parser("push", help="push an image to a registry")
    push.add_argument("image")
    push.add_argument("dest", nargs="?", help="destination NAME[:TAG] (default: the image's tag)")
    push.add_argument(
        "--format", choices=("oci", "docker"), help="manifest media types (default: the image's)"
    )
    push.add_argument("--username")
    push.add_argument("--password")
    push.add_argument("--password-stdin", action="store_true")
    push.add_argument(
        "--chunk-size",
        type=int,
        default=8 * 1024 * 1024,
        help="blobs bigger than this go up in PATCH chunks of this size (bytes)",
    )
    push.add_argument("--timeout", type=float, default=3600.0)
    _add_config_flags(push)
    push.set_defaults(func=_cmd_push)
    ckpt = sub.add_parser(
        "checkpoint-image", help="make a checkpoint OCI image (CRI-O's layout) of a checkpoint archive"
    )
    ckpt.add_argument("archive", help="the archive CheckpointContainer wrote")
    ckpt.add_argument("name", help="NAME[:TAG] of the image (push it with pycri push)")
    ckpt.add_argument("--timeout", type=float, default=3600.0)
    _add_config_flags(ckpt)
    ckpt.set_defaults(func=_cmd_checkpoint_image)
    build = sub.add_parser("build", help="build an image from a Containerfile")
    build.add_argument("context")
    build.add_argument("-f", "--file", help="the Containerfile (default CONTEXT/Containerfile or Dockerfile)")
    build.add_argument("-t", "--tag", help="NAME[:TAG] of the result")
    build.add_argument("--build-arg", action="append", default=[], metavar="KEY[=VALUE]")
    build.add_argument("--network", choices=("pod", "host"), default="pod", help="RUN steps' network")
    build.add_argument("--no-cache", action="store_true")
    build.add_argument("--timeout", type=float, default=3600.0)
    _add_config_flags(build)
    build.set_defaults(func=_cmd_build)
    tag = image_sub.add_parser("tag", help="give an image another name")
    tag.add_argument("source")
    tag.add_argument("name")
    tag.add_argument("--timeout", type=float, default=60.0)
    _add_config_flags(tag)
    tag.set_defaults(func=_cmd_image_tag)
    export = image_sub.add_parser("export", help="write an image to an OCI layout or docker save archive")
    export.add_argument("image")
    export.add_argument("file")
    export.add_argument("--format", choices=("oci", "docker"), default="oci")
    export.add_argument("--timeout", type=float, default=3600.0)
    _add_config_flags(export)
    export.set_defaults(func=_cmd_image_export)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pycri", description="Kubernetes CRI v1 runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon")
    _add_config_flags(serve)
    serve.set_defaults(func=_cmd_serve)
    check = sub.add_parser("check", help="preflight: can pycri run on this node, and what to fix")
    _add_config_flags(check)
    check.set_defaults(func=_cmd_check)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=_cmd_version)
    config = sub.add_parser("config", help="print the effective configuration")
    _add_config_flags(config)
    config.set_defaults(func=_cmd_config)
    image = sub.add_parser("image", help="image commands")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    imp = image_sub.add_parser("import", help="load an OCI layout or docker save archive")
    imp.add_argument("archive")
    imp.add_argument("--timeout", type=float, default=600.0)
    _add_config_flags(imp)
    imp.set_defaults(func=_cmd_image_import)
    _add_workflow_commands(sub, image_sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PycriError as exc:
        print(f"pycri: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
