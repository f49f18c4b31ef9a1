"""``pycri build``: a Containerfile built on the daemon, as a client of its two APIs.

Each ``RUN`` is a CRI container of the current image in one pod per build (pycri's own
runtime path: namespaces, seccomp, a network namespace with only lo; ``--network host`` gives the node's),
committed through ``pycri.v1.Images/Commit`` when it exits 0. ``COPY``/``ADD`` pack the named
context files into a plain layer tar that ``pycri.v1.Images/Stack`` unpacks through the
store's hostile-content path; instructions that only change the config (``ENV``, ``CMD``...)
stack an empty layer. Every step's result is cached under a key of the parent image, the
instruction and (for ``COPY``/``ADD``) the copied files' names, modes and contents, so an
unchanged rebuild runs nothing. A failing ``RUN`` stops the build with its step and output;
its container and the build's pod are removed, the cache of the steps before is kept.

Here-documents (``RUN <<EOF``, ``COPY <<EOF /path``) follow BuildKit's Dockerfile 1.4 syntax;
``ADD https://...`` is fetched by this client (urllib, redirects followed), saved with mode
0600 and never unpacked, and its content's digest is part of the step's cache key.
"""

from __future__ import annotations

import contextlib
import email.utils
import fnmatch
import hashlib
import json
import os
import posixpath
import queue
import re
import secrets
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cri_runtime.daemon.client import CRIClient
from cri_runtime.errors import (
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PycriError,
    Unavailable,
)

ImagesCall = Callable[[str, dict], dict]

_VAR = re.compile(r"\$(?:\{(\w+)(?::-([^}]*))?\}|(\w+))")
_CONFIG_ONLY = (
    "ENV",
    "WORKDIR",
    "USER",
    "LABEL",
    "EXPOSE",
    "CMD",
    "ENTRYPOINT",
    "STOPSIGNAL",
    "VOLUME",
    "HEALTHCHECK",
    "ONBUILD",
)
# Recorded as written: Docker substitutes no build variables in these (ONBUILD's are for the
# build that triggers it).
_VERBATIM = ("HEALTHCHECK", "ONBUILD")


# A here-document marker (``<<EOF``, ``<<-EOF``, ``<<"EOF"``, ``<<'EOF'``), not a here-string (``<<<``).
_HEREDOC = re.compile(r"(?<!<)<<(-?)(?:\"([\w.-]+)\"|'([\w.-]+)'|([\w.-]+))")
_HEREDOC_KEYWORDS = ("RUN", "COPY", "ADD")


@dataclass(frozen=True)
class Heredoc:
    """One here-document of a ``RUN``, ``COPY`` or ``ADD`` line (BuildKit's Dockerfile 1.4 syntax)."""

    name: str
    body: str  # the lines as written, each ending in a newline, the delimiter line excluded
    chomp: bool  # ``<<-``: leading tabs are stripped from each line
    expand: bool  # an unquoted delimiter: build variables are substituted (COPY/ADD)

    @property
    def content(self) -> str:
        if not self.chomp:
            return self.body
        return "".join(line.lstrip("\t") for line in self.body.splitlines(keepends=True))


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int
    heredocs: tuple[Heredoc, ...] = ()

    def __str__(self) -> str:
        return f"{self.keyword} {self.args}"

    def summary(self) -> str:
        """The instruction as a progress line shows it: a here-document's first line after it."""
        if not self.heredocs:
            return str(self)
        lines = [line.strip() for line in self.heredocs[0].body.splitlines() if line.strip()]
        first = lines[0] if lines else ""
        return f"{self} ({first[:60]}{'...' if len(lines) > 1 or len(first) > 60 else ''})"


def parse(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    pending = ""
    start = 0
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        raw = lines[index]
        index += 1
        number = index
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        heredocs: list[Heredoc] = []
        if keyword in _HEREDOC_KEYWORDS and not args.startswith("["):
            for marker in _HEREDOC.finditer(args):
                chomp = marker.group(1) == "-"
                name = marker.group(2) or marker.group(3) or marker.group(4)
                body: list[str] = []
                while True:
                    if index >= len(lines):
                        raise InvalidArgument(
                            f"Containerfile line {start}: here-document {name} has no line {name} ending it"
                        )
                    body_line = lines[index]
                    index += 1
                    if (body_line.lstrip("\t") if chomp else body_line) == name:
                        break
                    body.append(body_line + "\n")
                if name in (".", ".."):
                    raise InvalidArgument(f"Containerfile line {start}: {name!r} cannot name a here-document")
                heredocs.append(Heredoc(name, "".join(body), chomp, expand=marker.group(4) is not None))
        out.append(Instruction(keyword, args, start, tuple(heredocs)))
    if pending:
        raise InvalidArgument(f"Containerfile line {start}: continuation at the end of the file")
    if not out or out[0].keyword not in ("FROM", "ARG"):
        raise InvalidArgument("a Containerfile starts with FROM (or ARG before FROM)")
    return out


def substitute(text: str, variables: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        value = variables.get(name)
        return value if value else (default or "")

    return _VAR.sub(one, text)


def _exec_form(text: str) -> list[str] | None:
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


# --- the build context -------------------------------------------------------------


def _ignore_patterns(context: Path) -> list[tuple[bool, str]]:
    path = context / ".dockerignore"
    if not path.is_file():
        return []
    patterns = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        patterns.append((negate, os.path.normpath(line.lstrip("!").strip("/"))))
    return patterns


def _ignored(relative: str, patterns: list[tuple[bool, str]]) -> bool:
    ignored = False
    for negate, pattern in patterns:
        parts = relative.split("/")
        # A pattern names a path or any of its parents (``dir`` excludes ``dir/file``).
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            ignored = not negate
    return ignored


def _inside(root: Path, path: Path, what: str, where: str = "the build context") -> Path:
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise InvalidArgument(f"{what}: {path} is outside {where} ({root})")
    return real


@dataclass
class _LayerTar:
    tar: tarfile.TarFile
    key: hashlib._Hash = field(default_factory=hashlib.sha256)
    dirs: set[str] = field(default_factory=set)

    def _parents(self, name: str, uid: int, gid: int) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent and parent not in self.dirs:
                info = tarfile.TarInfo(parent)
                info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o755, uid, gid
                self.tar.addfile(info)
                self.dirs.add(parent)

    def add(self, source: Path, name: str, chown: tuple[int, int] | None, chmod: int | None = None) -> None:
        st = source.lstat()
        info = self.tar.gettarinfo(str(source), arcname=name)
        info.uname = info.gname = ""
        if chown:
            info.uid, info.gid = chown
        else:
            info.uid = info.gid = 0
        if chmod is not None and not info.issym():
            info.mode = chmod
        self._parents(name, info.uid, info.gid)
        self.key.update(
            f"{name}\0{info.mode}\0{info.uid}\0{info.gid}\0{info.type!r}\0{info.linkname}\0".encode()
        )
        if info.isreg():
            with open(source, "rb") as fh:
                self.key.update(hashlib.sha256(fh.read()).digest())
                fh.seek(0)
                self.tar.addfile(info, fh)
        elif info.isdir():
            if name not in self.dirs:
                self.tar.addfile(info)
                self.dirs.add(name)
        elif info.issym():
            self.tar.addfile(info)
        else:
            raise InvalidArgument(
                f"COPY: {source} is neither a file, a directory nor a symlink ({st.st_mode:o})"
            )

    def add_archive(self, archive: Path, dest: str) -> None:
        """ADD of a local tar archive: its entries under ``dest`` (the unpacker judges them)."""
        with open(archive, "rb") as fh:
            self.key.update(hashlib.sha256(fh.read()).digest())
        with tarfile.open(archive, "r:*") as source:
            # Only the destination's directories are added: the archive's own entries (its
            # symlinks too) reach the unpacker as they are, and it judges them.
            self._parents(f"{dest}/-", 0, 0)
            for member in source:
                name = os.path.normpath(f"{dest}/{member.name}").lstrip("/")
                if name.startswith("..") or "/../" in f"/{member.name}/":
                    raise InvalidArgument(f"ADD {archive.name}: entry {member.name!r} leaves its destination")
                member.name = name
                if member.islnk():
                    member.linkname = os.path.normpath(f"{dest}/{member.linkname}").lstrip("/")
                data = source.extractfile(member) if member.isreg() else None
                self.tar.addfile(member, data)


def _is_archive(path: Path) -> bool:
    try:
        return path.is_file() and tarfile.is_tarfile(path)
    except OSError:
        return False


# --- the build -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Made:
    """A source made by the build itself (a here-document, a download): where it is, its name."""

    path: Path
    name: str
    mode: int


@dataclass(frozen=True)
class _Copy:
    dest: str
    paths: list[str]  # sources in the context (or in the --from image)
    made: list[_Made]
    chown: tuple[int, int] | None
    chmod: int | None
    count: int  # sources of all kinds


_URL = re.compile(r"https?://", re.IGNORECASE)
_CHECKSUM = re.compile(r"(sha256:[0-9a-f]{64}|sha384:[0-9a-f]{96}|sha512:[0-9a-f]{128})")


def _url_name(url: str) -> str:
    """The name a download is saved under: the URL path's last part, as BuildKit names it."""
    base = posixpath.basename(urllib.parse.urlsplit(url).path)
    return base if base not in ("", ".", "..") else "__unnamed__"


def download(url: str, target: Path, timeout: float, checksum: str = "") -> str:
    """Fetch ``url`` (redirects followed) into ``target`` with mode 0600; the content's digest
    (``ALGORITHM:HEX``, sha256 unless ``checksum`` names another), checked against ``checksum``
    if one is given. ``timeout`` bounds the connection and each read."""
    algorithm = checksum.partition(":")[0] or "sha256"
    digest = hashlib.new(algorithm)
    request = urllib.request.Request(url, headers={"User-Agent": "pycri-build"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as fh:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    fh.write(chunk)
            modified = _http_time(response.headers.get("Last-Modified", ""))
    except urllib.error.HTTPError as exc:
        exc.close()
        kind = NotFound if exc.code in (404, 410) else Unavailable
        raise kind(f"fetching {url}: the server answered {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise DeadlineExceeded(f"fetching {url}: no answer within {timeout:g} s") from None
        raise Unavailable(f"fetching {url}: {exc.reason}") from None
    except TimeoutError:
        raise DeadlineExceeded(f"fetching {url}: no answer within {timeout:g} s") from None
    except (OSError, ValueError) as exc:
        raise Unavailable(f"fetching {url}: {exc}") from None
    got = f"{algorithm}:{digest.hexdigest()}"
    if checksum and got != checksum:
        target.unlink()
        raise DataLoss(f"fetching {url}: checksum mismatch: expected {checksum}, got {got}")
    if modified is not None:
        # Docker's rule: the file's time is the server's Last-Modified.
        os.utime(target, (modified, modified))
    return got


def _http_time(text: str) -> float | None:
    if not text:
        return None
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None


@dataclass
class BuildOptions:
    containerfile: Path
    context: Path
    tag: str = ""
    build_args: dict[str, str] = field(default_factory=dict)
    host_network: bool = False
    no_cache: bool = False
    # ADD of a URL: the client fetches it itself (as Docker's builder, whatever --network says).
    download_timeout: float = 60.0
    cache_file: Path = Path("/var/lib/pycri/build-cache.json")


class Build:
    def __init__(self, cri: CRIClient, images: ImagesCall, options: BuildOptions, out: IO[str]) -> None:
        self.cri = cri
        self.images = images
        self.options = options
        self.out = out
        self.context = Path(os.path.realpath(options.context))
        if not self.context.is_dir():
            raise InvalidArgument(f"build context {options.context} is not a directory")
        self.ignore = _ignore_patterns(self.context)
        self.cache: dict[str, str] = {}
        if options.cache_file.is_file() and not options.no_cache:
            with contextlib.suppress(ValueError):
                self.cache = json.loads(options.cache_file.read_text())
        self.pod: str | None = None
        # Held open while the build runs; a build killed midway leaves its pod to the daemon.
        self._session: queue.Queue[dict | None] = queue.Queue()
        self._session_call: Any = None
        self.work = Path(tempfile.mkdtemp(prefix="pycri-build-"))
        self.runs = 0  # containers made (RUN steps not cached, COPY --from sources)
        self.stages: dict[str, str] = {}  # stage name and index -> its image
        self._stage_count = 0

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # --- cache ---------------------------------------------------------------------

    def _cached(self, key: str) -> str | None:
        image_id = self.cache.get(key)
        if image_id is None or self.options.no_cache:
            return None
        try:
            return self.cri.image_status(image_id).image.id or None
        except Exception:
            return None

    def _remember(self, key: str, image_id: str) -> None:
        self.cache[key] = image_id
        path = self.options.cache_file
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".{os.getpid()}")
        partial.write_text(json.dumps(self.cache))
        os.replace(partial, path)

    @staticmethod
    def _key(*parts: str) -> str:
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    # --- steps ---------------------------------------------------------------------

    def run(self) -> str:
        text = self.options.containerfile.read_text()
        steps = parse(text)
        variables: dict[str, str] = {}
        image = ""
        config: dict = {}
        shell = ["/bin/sh", "-c"]
        declared_args: dict[str, str] = {}
        stage = ""
        try:
            for number, step in enumerate(steps, 1):
                where = f"STEP {number}/{len(steps)} (line {step.line}): {step.summary()}"
                self.say(f"STEP {number}/{len(steps)}: {step.summary()}")
                try:
                    image, config, variables, shell, stage = self._step(
                        step, image, config, variables, shell, declared_args, stage
                    )
                except PycriError as exc:
                    raise _located(exc, where) from exc
                except Exception as exc:
                    if not callable(getattr(exc, "details", None)):
                        raise
                    # A daemon call that failed (a gRPC error): said with its step too.
                    raise PycriError(f"{where}: {exc.code().name}: {exc.details()}") from exc  # type: ignore[attr-defined]
            if self.options.tag:
                self.images("Tag", {"source": image, "name": self.options.tag})
            return image
        finally:
            self._cleanup()

    def _step(
        self,
        step: Instruction,
        image: str,
        config: dict,
        variables: dict[str, str],
        shell: list[str],
        declared_args: dict[str, str],
        stage: str,
    ) -> tuple[str, dict, dict[str, str], list[str], str]:
        """One instruction: the image, config, variables, shell and stage name after it."""
        keyword = step.keyword
        if keyword == "ARG":
            name, _, default = step.args.partition("=")
            value = self.options.build_args.get(name, substitute(default, variables))
            declared_args[name] = value
            variables.setdefault(name, value)
            return image, config, variables, shell, stage
        if keyword == "FROM":
            words = substitute(step.args, variables).split()
            stage_name = ""
            if len(words) == 3 and words[1].upper() == "AS":
                stage_name = words[2]
                words = words[:1]
            if len(words) != 1:
                raise InvalidArgument(f"line {step.line}: FROM IMAGE [AS NAME]")
            self._end_stage(image, stage)
            stage = stage_name
            image = self.stages.get(words[0]) or self._from(words[0])
            config = self._config(image)
            variables = {**declared_args, **_env_map(config)}
            return image, config, variables, shell, stage
        if not image:
            raise InvalidArgument(f"line {step.line}: {keyword} before FROM")
        if keyword == "SHELL":
            form = _exec_form(step.args)
            if not form:
                raise InvalidArgument(f"line {step.line}: SHELL takes a JSON array")
            shell = form
            return image, config, variables, shell, stage
        if keyword == "RUN":
            image = self._run(image, step, shell, declared_args)
        elif keyword in ("COPY", "ADD"):
            image = self._copy(image, step, variables, config)
        elif keyword in _CONFIG_ONLY:
            change = self._change(step, variables, shell)
            key = self._key(image, change)
            cached = self._cached(key)
            if cached:
                self.say(f"--> Using cache {cached[7:19]}")
                image = cached
            else:
                image = self._stack(image, [change], None, str(step))
                self._remember(key, image)
        else:
            raise InvalidArgument(f"line {step.line}: {keyword} is not supported by pycri build")
        config = self._config(image)
        variables = {**declared_args, **_env_map(config)}
        self.say(f"--> {image[7:19]}")
        return image, config, variables, shell, stage

    def _end_stage(self, image: str, name: str) -> None:
        if image:
            self.stages[str(self._stage_count)] = image
            if name:
                self.stages[name] = image
            self._stage_count += 1

    def _from(self, ref: str) -> str:
        try:
            return self.cri.image_status(ref).image.id or self.cri.pull(ref)
        except Exception as exc:
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            raise NotFound(f"FROM {ref}: {detail}") from None

    def _config(self, image: str) -> dict:
        info = self.cri.image_status(image, verbose=True).info.get("info", "{}")
        document = json.loads(info)
        return dict((document.get("imageSpec") or {}).get("config") or {})

    def _change(self, step: Instruction, variables: dict[str, str], shell: list[str]) -> str:
        if step.keyword in ("CMD", "ENTRYPOINT"):
            form = _exec_form(step.args) or [*shell, step.args]
            return f"{step.keyword} {json.dumps(form)}"
        if step.keyword in _VERBATIM:
            return f"{step.keyword} {step.args}"
        return f"{step.keyword} {substitute(step.args, variables)}"

    def _stack(self, image: str, changes: list[str], layer: Path | None, created_by: str) -> str:
        request: dict = {"image": image, "changes": changes, "created_by": created_by}
        if layer is not None:
            request["layer_path"] = str(layer)
        return str(self.images("Stack", request)["image"]["id"])

    def _ensure_pod(self) -> str:
        if self.pod is None:
            name = f"pycri-build-{secrets.token_hex(4)}"
            logs = self.work / "logs"
            logs.mkdir(exist_ok=True)
            self.pod = self.cri.run_pod(
                name,
                namespace="pycri-build",
                log_directory=str(logs),
                host_network=self.options.host_network,
                # No network for RUN unless --network host: the daemon makes the pod's namespace
                # with only lo (see the pycri.io/network annotation in runtime/sandboxes.py).
                annotations={} if self.options.host_network else {"pycri.io/network": "none"},
            )
            self._open_session(self.pod)
        return self.pod

    def _run(self, image: str, step: Instruction, shell: list[str], args: dict[str, str]) -> str:
        command, script = _run_command(step, shell)
        key_parts = [image, "RUN", json.dumps(command), json.dumps(sorted(args.items()))]
        if script is not None:
            key_parts.append(script.content)
        key = self._key(*key_parts)
        cached = self._cached(key)
        if cached:
            self.say(f"--> Using cache {cached[7:19]}")
            return cached
        pod = self._ensure_pod()
        self.runs += 1
        log_name = f"run-{self.runs}.log"
        mounts: dict[str, str] = {}
        if script is not None:
            # As BuildKit does: the script is a read-only file under /dev/pipes (a tmpfs, so
            # nothing of it is committed), run directly so its #! line names the interpreter.
            pipes = self.work / f"pipes-{self.runs}"
            pipes.mkdir()
            (pipes / script.name).write_text(script.content)
            (pipes / script.name).chmod(0o755)
            mounts[_PIPES] = str(pipes)
        cid = self.cri.create_container(
            pod,
            f"step-{self.runs}",
            image,
            command=command,
            envs=args,
            log_path=log_name,
            readonly_mounts=mounts,
        )
        try:
            self.cri.start_container(cid)
            while True:
                status = self.cri.container_status(cid).status
                if status.state == 2:  # CONTAINER_EXITED
                    break
                time.sleep(0.05)
            output = _log_text(self.work / "logs" / log_name)
            if output:
                self.out.write(output)
            if status.exit_code != 0:
                raise StepFailed(
                    f"failed to solve: process {json.dumps(' '.join(command))} "
                    f"did not complete successfully: exit code: {status.exit_code}",
                    output,
                )
            result = self.images("Commit", {"container_id": cid, "changes": [], "comment": str(step)})
        finally:
            with contextlib.suppress(Exception):
                self.cri.remove_container(cid)
        image_id = str(result["image"]["id"])
        self._remember(key, image_id)
        return image_id

    @staticmethod
    def _sources(root: Path, words: list[str], where: str) -> Iterator[Path]:
        for word in words:
            pattern = word.lstrip("/") if root != Path("/") else word
            matches = sorted(root.glob(pattern)) if any(c in word for c in "*?[") else [root / pattern]
            if not matches:
                raise NotFound(f"COPY: {word} matches nothing in {where}")
            for match in matches:
                if not match.exists() and not match.is_symlink():
                    raise NotFound(f"COPY: {word} is not in {where}")
                yield match

    def _copy(self, image: str, step: Instruction, variables: dict[str, str], config: dict) -> str:
        words = shlex.split(substitute(step.args, variables))
        chown: tuple[int, int] | None = None
        chmod: int | None = None
        checksum = ""
        source_image = ""
        while words and words[0].startswith("--"):
            flag = words.pop(0)
            if flag.startswith("--chown="):
                chown = self._owner(image, flag.removeprefix("--chown="), step)
            elif flag.startswith("--chmod="):
                mode = flag.removeprefix("--chmod=")
                if not mode or any(c not in "01234567" for c in mode) or int(mode, 8) > 0o7777:
                    raise InvalidArgument(
                        f"line {step.line}: --chmod takes an octal mode such as 755 or 0644"
                    )
                chmod = int(mode, 8)
            elif flag.startswith("--checksum=") and step.keyword == "ADD":
                checksum = flag.removeprefix("--checksum=")
                if not _CHECKSUM.fullmatch(checksum):
                    raise InvalidArgument(
                        f"line {step.line}: --checksum takes ALGORITHM:HEX, sha256, sha384 or sha512"
                    )
            elif flag.startswith("--from=") and step.keyword == "COPY":
                name = flag.removeprefix("--from=")
                source_image = self.stages.get(name) or self._from(name)
            else:
                raise InvalidArgument(f"line {step.line}: unknown flag {flag}")
        if len(words) < 2:
            raise InvalidArgument(f"line {step.line}: {step.keyword} SRC... DEST")
        *sources, dest = words
        paths, made = self._made_sources(step, sources, variables, checksum)
        if len(sources) > 1 and not dest.endswith("/"):
            raise InvalidArgument(f"line {step.line}: with several sources the destination must end with /")
        copy = _Copy(dest, paths, made, chown, chmod, len(sources))
        if source_image:
            with self._image_root(source_image) as root:
                return self._copy_from(image, step, copy, config, root, source_image)
        return self._copy_from(image, step, copy, config, self.context, "")

    def _made_sources(
        self, step: Instruction, sources: list[str], variables: dict[str, str], checksum: str
    ) -> tuple[list[str], list[_Made]]:
        """The sources that are no files of the context: here-documents (written out, mode
        0644) and, for ``ADD``, URLs (downloaded, mode 0600, never unpacked, as Docker does).
        Both are made again on every build; the cache key holds their content."""
        paths: list[str] = []
        made: list[_Made] = []
        documents = iter(step.heredocs)
        urls = [word for word in sources if _URL.match(word)]
        if checksum and (len(sources) != 1 or not urls):
            raise InvalidArgument(f"line {step.line}: --checksum is for ADD of one http(s) URL")
        for word in sources:
            if _HEREDOC.fullmatch(word) or (word.startswith("<<") and step.heredocs):
                document = next(documents, None)
                if document is None:
                    raise InvalidArgument(f"line {step.line}: {word} has no here-document")
                content = substitute(document.content, variables) if document.expand else document.content
                folder = self.work / f"inline-{secrets.token_hex(4)}"
                folder.mkdir()
                (folder / document.name).write_text(content)
                made.append(_Made(folder / document.name, document.name, 0o644))
            elif _URL.match(word):
                if step.keyword != "ADD":
                    raise InvalidArgument(f"line {step.line}: COPY takes no URL ({word}); ADD fetches one")
                folder = self.work / f"download-{secrets.token_hex(4)}"
                folder.mkdir()
                name = _url_name(word)
                self.say(f"--> fetching {word}")
                digest = download(word, folder / name, self.options.download_timeout, checksum)
                self.say(f"--> {word}: {digest}")
                made.append(_Made(folder / name, name, 0o600))
            else:
                paths.append(word)
        return paths, made

    def _owner(self, image: str, text: str, step: Instruction) -> tuple[int, int]:
        """``--chown=USER[:GROUP]``, numbers or names; names are looked up in the image's own
        /etc/passwd and /etc/group. Without a group the GID is the UID's number, as in Docker."""
        user, _, group = text.partition(":")
        if not user:
            raise InvalidArgument(f"line {step.line}: --chown takes USER[:GROUP]")
        if user.isdigit() and (not group or group.isdigit()):
            return int(user), int(group or user)
        with self._image_root(image) as root:
            uid = int(user) if user.isdigit() else _lookup(root, "passwd", user, step)
            if not group:
                return uid, uid
            return uid, int(group) if group.isdigit() else _lookup(root, "group", group, step)

    @contextlib.contextmanager
    def _image_root(self, image: str) -> Iterator[Path]:
        """An image's root file system, read-only in use: a created (never started) container's
        overlay, removed afterwards."""
        pod = self._ensure_pod()
        self.runs += 1
        cid = self.cri.create_container(pod, f"copy-from-{self.runs}", image, command=["true"])
        try:
            info = json.loads(self.cri.container_status(cid, verbose=True).info["info"])
            yield Path(os.path.realpath(info["rootfs"]))
        finally:
            with contextlib.suppress(Exception):
                self.cri.remove_container(cid)

    def _copy_from(
        self, image: str, step: Instruction, copy: _Copy, config: dict, root: Path, source_image: str
    ) -> str:
        chown, chmod, dest = copy.chown, copy.chmod, copy.dest
        where = f"image {source_image[7:19]}" if source_image else "the build context"
        ignore = [] if source_image else self.ignore
        workdir = config.get("WorkingDir") or "/"
        dest_path = os.path.normpath(os.path.join(workdir, dest)).lstrip("/")
        into_dir = dest.endswith("/") or copy.count > 1
        tar_path = self.work / f"layer-{secrets.token_hex(4)}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
            layer = _LayerTar(tar)
            for item in copy.made:
                name = f"{dest_path}/{item.name}" if into_dir else dest_path
                layer.add(item.path, name.lstrip("/"), chown, item.mode if chmod is None else chmod)
            for source in self._sources(root, copy.paths, where):
                if _ignored(str(source.relative_to(root)), ignore):
                    continue
                real = _inside(root, source, f"line {step.line}", where)
                if step.keyword == "ADD" and _is_archive(real):
                    layer.add_archive(real, dest_path)
                elif real.is_dir():
                    self._add_tree(layer, real, dest_path, chown, step, root, ignore, not source_image, chmod)
                else:
                    name = f"{dest_path}/{source.name}" if into_dir else dest_path
                    layer.add(real, name.lstrip("/"), chown, chmod)
        key = self._key(image, step.keyword, dest_path, layer.key.hexdigest())
        cached = self._cached(key)
        if cached:
            self.say(f"--> Using cache {cached[7:19]}")
            tar_path.unlink()
            return cached
        image_id = self._stack(image, [], tar_path, str(step))
        tar_path.unlink()
        self._remember(key, image_id)
        return image_id

    def _add_tree(
        self,
        layer: _LayerTar,
        top: Path,
        dest: str,
        chown: tuple[int, int] | None,
        step: Instruction,
        root: Path,
        ignore: list[tuple[bool, str]],
        check_links: bool,
        chmod: int | None = None,
    ) -> None:
        for directory, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = Path(directory) / name
                if _ignored(str(path.relative_to(root)), ignore):
                    if name in dirnames:
                        dirnames.remove(name)
                    continue
                if check_links and path.is_symlink():
                    # Kept as a link; one pointing out of the context is refused, not followed.
                    _inside(root, path, f"line {step.line}", "the build context")
                inner = str(path.relative_to(top))
                layer.add(path, f"{dest}/{inner}".lstrip("/"), chown, chmod)

    def _open_session(self, pod_id: str) -> None:
        from cri_runtime.daemon.cli import IMAGES_SERVICE

        call = self.cri.channel.stream_stream(
            f"/{IMAGES_SERVICE}/BuildSession",
            request_serializer=lambda d: json.dumps(d).encode(),
            response_deserializer=json.loads,
        )
        self._session.put({"pod_id": pod_id})
        self._session_call = call(iter(self._session.get, None))

    def _close_session(self) -> None:
        if self._session_call is None:
            return
        self._session.put({"done": True})
        self._session.put(None)
        with contextlib.suppress(Exception):
            for _ in self._session_call:
                pass
        self._session_call = None

    def _cleanup(self) -> None:
        self._close_session()
        if self.pod is not None:
            with contextlib.suppress(Exception):
                self.cri.stop_pod(self.pod)
            with contextlib.suppress(Exception):
                self.cri.remove_pod(self.pod)
        shutil.rmtree(self.work, ignore_errors=True)


def _lookup(root: Path, database: str, name: str, step: Instruction) -> int:
    """The ID of ``name`` in the image's /etc/passwd or /etc/group (a link out of the image's
    root is refused, not followed)."""
    path = root / "etc" / database
    where = f"the image's /etc/{database}"
    if not path.exists():
        raise InvalidArgument(f"line {step.line}: --chown {name}: the image has no /etc/{database}")
    real = _inside(root, path, f"line {step.line}", "the image")
    for line in real.read_text(errors="replace").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
            return int(fields[2])
    raise InvalidArgument(f"line {step.line}: --chown: no {name!r} in {where}")


class StepFailed(FailedPrecondition):
    """A ``RUN`` that exited non-zero; ``output`` is what it printed."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def _located(exc: PycriError, where: str) -> PycriError:
    """The same kind of error, its message led by the step it happened in (and a failed
    ``RUN``'s output before the reason, as Docker prints them)."""
    output = getattr(exc, "output", "")
    if output:
        text = f"{where}\n{output}{'' if output.endswith(chr(10)) else chr(10)}{exc}"
    else:
        text = f"{where}: {exc}"
    located = type(exc)(text)
    if isinstance(located, StepFailed):
        located.output = output
    return located


_PIPES = "/dev/pipes"


def _run_command(step: Instruction, shell: list[str]) -> tuple[list[str], Heredoc | None]:
    """A ``RUN``'s command, and the here-document to run as a script file if it is one.

    As BuildKit: ``RUN <<EOF`` alone runs the document's content by the shell, or, when it
    starts with ``#!``, as a file of its own; any other line with here-documents goes to the
    shell whole (the line, then each document and its delimiter), which then reads them itself:
    the shell expands variables in them unless the delimiter is quoted, and ``<<-`` strips tabs."""
    if not step.heredocs:
        return _exec_form(step.args) or [*shell, step.args], None
    if step.args.startswith("["):
        raise InvalidArgument(f"line {step.line}: here-documents need the shell form of RUN")
    if len(step.heredocs) == 1 and _HEREDOC.fullmatch(step.args):
        document = step.heredocs[0]
        if document.content.startswith("#!"):
            return [f"{_PIPES}/{document.name}"], document
        return [*shell, document.content], None
    whole = step.args + "".join(f"\n{document.body}{document.name}" for document in step.heredocs)
    return [*shell, whole], None


def _env_map(config: dict) -> dict[str, str]:
    out = {}
    for item in config.get("Env") or []:
        key, _, value = str(item).partition("=")
        out[key] = value
    return out


def _log_text(path: Path) -> str:
    """The content of a CRI log file (``<time> <stream> <tag> <content>`` lines)."""
    if not path.is_file():
        return ""
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4:
            lines.append(parts[3] + ("\n" if parts[2] == "F" else ""))
    return "".join(lines)


def build(cri: CRIClient, images: ImagesCall, options: BuildOptions) -> str:
    try:
        return Build(cri, images, options, sys.stdout).run()
    except PycriError:
        raise
    except OSError as exc:
        raise InvalidArgument(f"build: {exc}") from exc
