"""A real ``docker-registry`` (distribution 2.8) for tests, with optional basic or token auth.

Tests of the image service pull from this registry over HTTP on 127.0.0.1, so the client
code meets the real server's headers, redirects, error bodies and auth challenges instead
of a hand-written fake. Images are built and pushed with :mod:`tests.support.images`.

Three flavours:

* ``auth=None``: anonymous pull and push.
* ``auth="basic"``: htpasswd (bcrypt) auth; ``GET /v2/`` answers 401 with a ``Basic`` challenge.
* ``auth="token"``: the Docker token flow. A small token server (:class:`TokenServer`) runs in
  a thread of the test process and signs RS256 JWTs with a throw-away key; the registry trusts
  the matching self-signed certificate through ``rootcertbundle``. Its counters let tests
  assert that the client really went through the token flow.

Everything listens on 127.0.0.1 only. Keys and certificates are made with the ``openssl``
CLI and JWTs are signed in pure Python, so no extra Python package is needed.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import http.client
import itertools
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

REGISTRY_BINARY = "/usr/bin/docker-registry"
HTPASSWD_BINARY = "htpasswd"
OPENSSL_BINARY = "openssl"
LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT = 10.0
TOKEN_SERVICE = "pycri-test-registry"
TOKEN_ISSUER = "pycri-test-token-issuer"
TOKEN_LIFETIME = 300

AuthMode = Literal[None, "basic", "token"]
KeyRef = Literal["x5c", "kid"]


class RegistryStartError(RuntimeError):
    """The registry process did not come up; the message carries its log tail."""


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1.

    There is a window between closing this socket and the registry binding the port; the
    caller retries with a fresh port when the registry reports "address already in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------
# Keys, certificates and JWTs (RS256, signed in pure Python)
# --------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _der_read(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """One DER TLV at ``pos``: (tag, value, position after it)."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    return tag, data[pos : pos + length], pos + length


@dataclass(frozen=True)
class SigningKey:
    """An RSA key and the self-signed certificate the registry is told to trust.

    Only the integers needed for PKCS#1 v1.5 signing are kept; ``openssl`` made the key,
    so we never implement key generation or prime testing ourselves.
    """

    cert_pem: bytes
    cert_der: bytes
    spki_der: bytes
    n: int
    d: int
    p: int
    q: int
    dp: int
    dq: int
    qinv: int

    @classmethod
    def generate(cls, directory: Path, common_name: str = "pycri-test-token-signer") -> SigningKey:
        key_path = directory / "token-signer.key"
        cert_path = directory / "token-signer.crt"
        subprocess.run(
            [
                OPENSSL_BINARY, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                "-days", "2", "-subj", f"/CN={common_name}",
                "-keyout", str(key_path), "-out", str(cert_path),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        # "-traditional" gives PKCS#1 RSAPrivateKey, whose fields we can read directly.
        key_der = subprocess.run(
            [OPENSSL_BINARY, "rsa", "-in", str(key_path), "-traditional", "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        spki_der = subprocess.run(
            [OPENSSL_BINARY, "rsa", "-in", str(key_path), "-pubout", "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        cert_pem = cert_path.read_bytes()
        body = b"".join(line for line in cert_pem.splitlines() if line and not line.startswith(b"-----"))
        cert_der = base64.b64decode(body)

        # RSAPrivateKey ::= SEQUENCE { version, n, e, d, p, q, dp, dq, qinv }
        _, seq, _ = _der_read(key_der, 0)
        ints: list[int] = []
        pos = 0
        while pos < len(seq):
            _, value, pos = _der_read(seq, pos)
            ints.append(int.from_bytes(value, "big"))
        _version, n, _e, d, p, q, dp, dq, qinv = ints[:9]
        return cls(cert_pem, cert_der, spki_der, n, d, p, q, dp, dq, qinv)

    @property
    def libtrust_kid(self) -> str:
        """The key id docker/libtrust derives from a public key.

        SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits, base32, in groups of four
        separated by colons. The registry looks ``kid`` up among the keys of the
        certificates in ``rootcertbundle`` when a JWT carries no ``x5c``.
        """
        digest = hashlib.sha256(self.spki_der).digest()[:30]
        b32 = base64.b32encode(digest).decode("ascii").rstrip("=")
        return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))

    def sign_rs256(self, message: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 with SHA-256, computed with the CRT for speed."""
        digest_info = (
            bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(message).digest()
        )
        k = (self.n.bit_length() + 7) // 8
        padded = b"\x00\x01" + b"\xff" * (k - len(digest_info) - 3) + b"\x00" + digest_info
        m = int.from_bytes(padded, "big")
        s1 = pow(m, self.dp, self.p)
        s2 = pow(m, self.dq, self.q)
        h = (self.qinv * (s1 - s2)) % self.p
        return (s2 + h * self.q).to_bytes(k, "big")

    def jwt(self, claims: dict[str, object], key_ref: KeyRef = "x5c") -> str:
        header: dict[str, object] = {"typ": "JWT", "alg": "RS256"}
        if key_ref == "x5c":
            # distribution verifies the chain in x5c against rootcertbundle; a self-signed
            # certificate that is itself in the bundle is a complete chain.
            header["x5c"] = [base64.b64encode(self.cert_der).decode("ascii")]
        else:
            header["kid"] = self.libtrust_kid
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        return signing_input + "." + _b64url(self.sign_rs256(signing_input.encode("ascii")))


# --------------------------------------------------------------------------------------
# Token server
# --------------------------------------------------------------------------------------


@dataclass
class TokenStats:
    """What the token server saw. Read it under :attr:`TokenServer.lock` or via ``snapshot``."""

    requests: int = 0
    tokens_issued: int = 0
    anonymous_tokens: int = 0
    authenticated_tokens: int = 0
    denied: int = 0
    # Every requested scope string, in order ("" when the request had none).
    scopes: list[str] = field(default_factory=list)


class TokenServer:
    """The auth server half of the Docker token flow, in a thread of the test process.

    ``GET /token?service=...&scope=repository:NAME:pull,push`` with optional Basic auth.
    Good credentials get every requested action of ``pull``/``push``; anonymous requests get
    ``pull`` only when ``anonymous_pull`` is set, else 401; bad credentials always get 401
    (as Docker Hub does) rather than silently falling back to anonymous.
    """

    def __init__(
        self,
        signing_key: SigningKey,
        *,
        users: dict[str, str],
        service: str = TOKEN_SERVICE,
        issuer: str = TOKEN_ISSUER,
        anonymous_pull: bool = False,
        key_ref: KeyRef = "x5c",
    ) -> None:
        self.signing_key = signing_key
        self.users = dict(users)
        self.service = service
        self.issuer = issuer
        self.anonymous_pull = anonymous_pull
        self.key_ref: KeyRef = key_ref
        self.lock = threading.Lock()
        self.stats = TokenStats()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Counters as plain properties so tests read them without touching the lock.
    @property
    def tokens_issued(self) -> int:
        with self.lock:
            return self.stats.tokens_issued

    @property
    def denied(self) -> int:
        with self.lock:
            return self.stats.denied

    @property
    def requests(self) -> int:
        with self.lock:
            return self.stats.requests

    def snapshot(self) -> TokenStats:
        with self.lock:
            s = self.stats
            return TokenStats(
                s.requests, s.tokens_issued, s.anonymous_tokens, s.authenticated_tokens, s.denied, [*s.scopes]
            )

    @property
    def port(self) -> int:
        assert self._httpd is not None, "token server not started"
        return int(self._httpd.server_address[1])

    @property
    def realm(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/token"

    def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._handle(self)

            def log_message(self, format: str, *args: object) -> None:
                # Keep pytest output clean; the counters say what happened.
                pass

        self._httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"token-server-{self.port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def _authenticate(self, header: str | None) -> tuple[bool, str | None]:
        """(credentials acceptable, username). No header means anonymous."""
        if not header:
            return True, None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(value.strip()).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, None
        expected = self.users.get(user)
        if expected is None or not secrets.compare_digest(expected, password):
            return False, None
        return True, user

    def issue(self, subject: str, scopes: list[str], allowed_actions: set[str]) -> str:
        """A signed token granting ``allowed_actions`` on each repository scope requested."""
        access: list[dict[str, object]] = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue
            # Names may contain ":" only via a port in the host part, which a registry-side
            # scope never has, but rejoin defensively: type:name...:actions.
            name = ":".join(parts[1:-1])
            actions = [a for a in parts[-1].split(",") if a in allowed_actions]
            access.append({"type": "repository", "name": name, "actions": actions})
        now = int(time.time())
        claims: dict[str, object] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            # Back-date a little so a registry clock a hair behind us does not reject "nbf".
            "nbf": now - 10,
            "iat": now - 10,
            "exp": now + TOKEN_LIFETIME,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        return self.signing_key.jwt(claims, self.key_ref)

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(req.path)
        query = urllib.parse.parse_qs(url.query)
        scopes: list[str] = []
        for value in query.get("scope", []):
            scopes.extend(value.split(" "))
        with self.lock:
            self.stats.requests += 1
            self.stats.scopes.extend(scopes or [""])

        def reply(status: int, body: dict[str, object], extra: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            req.send_response(status)
            req.send_header("Content-Type", "application/json")
            req.send_header("Content-Length", str(len(data)))
            for key, value in (extra or {}).items():
                req.send_header(key, value)
            req.end_headers()
            req.wfile.write(data)

        def deny(message: str) -> None:
            with self.lock:
                self.stats.denied += 1
            reply(
                401,
                {"errors": [{"code": "UNAUTHORIZED", "message": message}]},
                {"WWW-Authenticate": 'Basic realm="pycri-token-server"'},
            )

        if url.path != "/token":
            reply(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
            return
        service = query.get("service", [""])[0]
        if service and service != self.service:
            reply(400, {"errors": [{"code": "DENIED", "message": f"unknown service {service!r}"}]})
            return
        ok, user = self._authenticate(req.headers.get("Authorization"))
        if not ok:
            deny("bad credentials")
            return
        if user is None and not self.anonymous_pull:
            deny("authentication required")
            return
        allowed = {"pull", "push"} if user is not None else {"pull"}
        token = self.issue(user or "", scopes, allowed)
        with self.lock:
            self.stats.tokens_issued += 1
            if user is None:
                self.stats.anonymous_tokens += 1
            else:
                self.stats.authenticated_tokens += 1
        reply(
            200,
            {
                "token": token,
                "access_token": token,
                "expires_in": TOKEN_LIFETIME,
                "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )


# --------------------------------------------------------------------------------------
# The registry process
# --------------------------------------------------------------------------------------


@dataclass
class Registry:
    host: str  # "127.0.0.1:PORT"
    url: str  # "http://127.0.0.1:PORT"
    username: str | None
    password: str | None
    auth: AuthMode = None
    token_server: TokenServer | None = None
    log_path: Path | None = None
    # Private directory with config, storage, htpasswd and keys; removed by stop().
    root: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Terminate the registry (and token server), wait for it, remove its private dir.

        The log file lives beside the private dir, in the caller's workdir, and is kept so
        a failing test can still be diagnosed. Safe to call twice.
        """
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.process = None
        _live.pop(id(self), None)
        if self.token_server is not None:
            self.token_server.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Registries still running, stopped by an atexit hook if a test forgets to (and by
# PR_SET_PDEATHSIG, see _pdeathsig_prefix, if the whole test process dies).
_live: dict[int, Registry] = {}


@atexit.register
def _stop_leftovers() -> None:
    for reg in list(_live.values()):
        reg.stop()


def _tail(path: Path | None, lines: int) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig TERM --``: the registry gets SIGTERM when the test process dies,
    so none outlives a run killed by a timeout or ^C.

    setpriv (util-linux, always on Debian) sets PR_SET_PDEATHSIG and execs the registry,
    which keeps it; doing that in a ``preexec_fn`` instead would be unsafe with the token
    server's threads running. The signal fires when the *thread* that spawned the child
    exits, so we only ask for it from the main thread, which lives as long as the process.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


def _config_yaml(root: Path, port: int, auth: dict[str, dict[str, str]] | None) -> str:
    """The registry config. JSON is valid YAML, so we write JSON and skip a YAML dependency."""
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "storage")},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
            # No background goroutines touching storage behind the tests' backs.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": f"{LOOPBACK}:{port}",
            # A fixed secret silences the "No HTTP secret provided" warning.
            "secret": "pycri-test-secret",
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
        "health": {"storagedriver": {"enabled": False}},
    }
    if auth:
        config["auth"] = auth
    return json.dumps(config, indent=2) + "\n"


def _probe(url: str) -> int | None:
    """Status of GET /v2/, or None while nothing answers yet."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname or LOOPBACK, parsed.port, timeout=1)
    try:
        conn.request("GET", "/v2/")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return None
    finally:
        conn.close()


def _pick_log_path(workdir: Path) -> Path:
    """workdir/registry.log, or registry-N.log when several registries share a workdir."""
    first = workdir / "registry.log"
    if not first.exists():
        return first
    for n in itertools.count(2):
        candidate = workdir / f"registry-{n}.log"
        if not candidate.exists():
            return candidate
    raise AssertionError("unreachable")


def start_registry(
    workdir: Path,
    *,
    auth: AuthMode = None,
    username: str = "pycri",
    password: str = "s3cret",
    anonymous_pull: bool = False,
    key_ref: KeyRef = "x5c",
    startup_timeout: float = STARTUP_TIMEOUT,
) -> Registry:
    """Start ``docker-registry serve`` on 127.0.0.1 with storage under ``workdir``.

    ``anonymous_pull`` and ``key_ref`` only matter for ``auth="token"``: whether the token
    server hands pull-only tokens to anonymous clients, and whether JWTs name their signing
    key by ``x5c`` certificate chain or libtrust ``kid`` (the registry accepts both).

    Raises :class:`RegistryStartError` with the log tail if ``GET /v2/`` does not answer 200
    or 401 within ``startup_timeout`` seconds.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not os.access(REGISTRY_BINARY, os.X_OK):
        raise RegistryStartError(f"{REGISTRY_BINARY} not found (apt-get install docker-registry)")
    root = Path(tempfile.mkdtemp(prefix="registry-", dir=workdir))
    token_server: TokenServer | None = None
    try:
        auth_config: dict[str, dict[str, str]] | None = None
        if auth == "basic":
            htpasswd = subprocess.run(
                [HTPASSWD_BINARY, "-Bbn", username, password], check=True, capture_output=True
            ).stdout
            (root / "htpasswd").write_bytes(htpasswd)
            auth_config = {"htpasswd": {"realm": "pycri-basic-realm", "path": str(root / "htpasswd")}}
        elif auth == "token":
            key = SigningKey.generate(root)
            (root / "rootcertbundle.pem").write_bytes(key.cert_pem)
            token_server = TokenServer(
                key, users={username: password}, anonymous_pull=anonymous_pull, key_ref=key_ref
            )
            token_server.start()
            auth_config = {
                "token": {
                    "realm": token_server.realm,
                    "service": token_server.service,
                    "issuer": token_server.issuer,
                    "rootcertbundle": str(root / "rootcertbundle.pem"),
                }
            }
        elif auth is not None:
            raise ValueError(f"unknown auth mode {auth!r}")

        log_path = _pick_log_path(workdir)
        # A port picked by binding 0 may be taken again before the registry binds it; a
        # few attempts make that race irrelevant.
        last_error = ""
        for _attempt in range(3):
            port = free_port()
            config_path = root / "config.yml"
            config_path.write_text(_config_yaml(root, port, auth_config))
            reg = Registry(
                host=f"{LOOPBACK}:{port}",
                url=f"http://{LOOPBACK}:{port}",
                username=username if auth else None,
                password=password if auth else None,
                auth=auth,
                token_server=token_server,
                log_path=log_path,
                root=root,
            )
            with log_path.open("ab") as log:
                log.write(f"=== docker-registry on {reg.host} (auth={auth}) ===\n".encode())
                log.flush()
                reg.process = subprocess.Popen(
                    [*_pdeathsig_prefix(), REGISTRY_BINARY, "serve", str(config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=root,
                )
            _live[id(reg)] = reg
            deadline = time.monotonic() + startup_timeout
            while time.monotonic() < deadline:
                if reg.process is None or reg.process.poll() is not None:
                    break
                if _probe(reg.url) in (200, 401):
                    return reg
                time.sleep(0.05)
            last_error = reg.log_tail()
            # Keep the private dir (and token server) for the retry; just end the process.
            proc = reg.process
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
            reg.process = None
            _live.pop(id(reg), None)
            if "address already in use" not in last_error:
                break
        raise RegistryStartError(f"docker-registry did not come up within {startup_timeout}s:\n{last_error}")
    except BaseException:
        if token_server is not None:
            token_server.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise


@contextlib.contextmanager
def running_registry(
    workdir: Path,
    *,
    auth: AuthMode = None,
    username: str = "pycri",
    password: str = "s3cret",
    anonymous_pull: bool = False,
    key_ref: KeyRef = "x5c",
    startup_timeout: float = STARTUP_TIMEOUT,
) -> Iterator[Registry]:
    """``with running_registry(tmp_path, auth="basic") as reg:`` — always stopped afterwards.

    Also handy as the body of a pytest fixture: ``with running_registry(...) as r: yield r``.
    """
    reg = start_registry(
        workdir,
        auth=auth,
        username=username,
        password=password,
        anonymous_pull=anonymous_pull,
        key_ref=key_ref,
        startup_timeout=startup_timeout,
    )
    try:
        yield reg
    finally:
        reg.stop()
