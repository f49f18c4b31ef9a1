"""Client for the OCI distribution API (registry API v2), as far as pulling needs it.

Blocking code, meant to run in worker threads: http.client gives us streaming, exact
control of what is read, and socket timeouts that double as the pull-progress watchdog.
Every registry is untrusted: metadata reads are bounded, blob bytes are hashed as they
arrive and compared with the size and digest that the manifest promised.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import structlog

from cri_runtime.errors import (
    DataLoss,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PycriError,
    Unauthenticated,
    Unavailable,
)
from imageservice.cancel import on_cancel
from imageservice.config import ImageConfig, RegistryHost
from imageservice.reference import Reference, endpoint_host

log = structlog.get_logger("pycri.registry")
T = TypeVar("T")

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
SCHEMA1_TYPES = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
CHUNK = 1024 * 1024
USER_AGENT = "pycri/0.1"
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class Credentials:
    """What a caller may authenticate with; every field optional."""

    username: str = ""
    password: str = ""
    identity_token: str = ""  # an OAuth2 refresh token
    registry_token: str = ""  # a bearer token used as is
    server_address: str = ""

    @classmethod
    def from_auth(
        cls,
        *,
        username: str = "",
        password: str = "",
        auth: str = "",
        identity_token: str = "",
        registry_token: str = "",
        server_address: str = "",
    ) -> Credentials:
        if auth and not username:
            try:
                decoded = base64.b64decode(auth, validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise InvalidArgument("auth is not base64 of 'username:password'") from None
            username, sep, password = decoded.partition(":")
            if not sep:
                raise InvalidArgument("auth does not decode to 'username:password'")
        return cls(username, password, identity_token, registry_token, server_address)

    @property
    def empty(self) -> bool:
        return not (self.username or self.identity_token or self.registry_token)

    def applies_to(self, host: str) -> bool:
        if not self.server_address:
            return True
        address = self.server_address
        for prefix in ("https://", "http://"):
            address = address.removeprefix(prefix)
        address = address.split("/", 1)[0]
        return (
            address in (host, "index.docker.io", "docker.io")
            if host == "registry-1.docker.io"
            else (address == host)
        )


@dataclass(frozen=True)
class Endpoint:
    """One place to fetch a repository from: a mirror or the registry itself."""

    scheme: str
    host: str  # host[:port]
    base_path: str  # path prefix before /v2, usually empty
    insecure: bool
    is_mirror: bool
    settings: RegistryHost

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}{self.base_path}"


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
    return name in ("localhost", "::1") or name.startswith("127.")


def endpoints_for(ref: Reference, config: ImageConfig) -> list[Endpoint]:
    """Mirrors in configured order, then the registry itself unless ``mirrors_only``."""
    settings = config.registry(ref.domain)
    out: list[Endpoint] = []
    for mirror in settings.mirrors:
        parsed = urllib.parse.urlsplit(mirror)
        mirror_settings = config.registries.get(parsed.netloc, settings)
        out.append(
            Endpoint(
                scheme=parsed.scheme,
                host=parsed.netloc,
                base_path=parsed.path.rstrip("/").removesuffix("/v2"),
                insecure=settings.insecure or mirror_settings.insecure,
                is_mirror=True,
                settings=mirror_settings,
            )
        )
    if not settings.mirrors_only or not settings.mirrors:
        host = endpoint_host(ref.domain)
        plain = settings.insecure or _is_loopback(host)
        out.append(
            Endpoint(
                scheme="http" if plain else "https",
                host=host,
                base_path="",
                insecure=settings.insecure,
                is_mirror=False,
                settings=settings,
            )
        )
    return out


@dataclass
class Manifest:
    media_type: str
    digest: str
    body: bytes
    document: dict


@dataclass
class _AuthState:
    """Per-endpoint authorization, reused across the requests of one pull."""

    header: str | None = None
    challenge_tried: bool = False


@dataclass
class RegistrySession:
    """Talks to the endpoints of one repository for the duration of one pull."""

    ref: Reference
    config: ImageConfig
    credentials: Credentials = field(default_factory=Credentials)
    cancel: threading.Event = field(default_factory=threading.Event)
    _auth: dict[str, _AuthState] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.endpoints = endpoints_for(self.ref, self.config)

    # --- public operations -------------------------------------------------

    def fetch_manifest(self, reference: str, *, expect_digest: str | None = None) -> Manifest:
        """GET a manifest or index by tag or digest, bounded and digest-checked."""
        accept = ", ".join((*MANIFEST_TYPES, *SCHEMA1_TYPES))
        path = f"/v2/{self.ref.path}/manifests/{reference}"

        def attempt(endpoint: Endpoint) -> Manifest:
            with self._request(endpoint, "GET", path, accept=accept, what=f"manifest {reference}") as resp:
                body = self._read_bounded(resp, endpoint, f"manifest {reference}")
                header_type = (resp.getheader("Content-Type") or "").split(";")[0].strip()
            return self._parse_manifest(endpoint, reference, body, header_type, expect_digest)

        return self._each_endpoint(attempt)

    def fetch_config(self, digest: str, size: int | None) -> bytes:
        path = f"/v2/{self.ref.path}/blobs/{digest}"

        def attempt(endpoint: Endpoint) -> bytes:
            with self._request(endpoint, "GET", path, what=f"config {digest}") as resp:
                body = self._read_bounded(resp, endpoint, f"config {digest}")
            _check_blob(body, digest, size, endpoint)
            return body

        return self._each_endpoint(attempt)

    def download_blob(
        self,
        digest: str,
        size: int | None,
        dest: Path,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Stream blob ``digest`` into ``dest`` (a new file), verifying size and digest.

        On any failure ``dest`` is removed, so a caller never sees a partial blob.
        """
        path = f"/v2/{self.ref.path}/blobs/{digest}"

        def attempt(endpoint: Endpoint) -> None:
            try:
                with self._request(endpoint, "GET", path, what=f"blob {digest}") as resp:
                    declared = resp.getheader("Content-Length")
                    if (
                        size is not None
                        and declared is not None
                        and declared.isdigit()
                        and int(declared) != size
                    ):
                        raise DataLoss(
                            f"blob {digest} from {endpoint}: registry sends {declared} bytes "
                            f"but the manifest says {size}"
                        )
                    hasher = hashlib.sha256()
                    received = 0
                    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        for chunk in self._chunks(resp, endpoint, f"blob {digest}"):
                            received += len(chunk)
                            if size is not None and received > size:
                                raise DataLoss(
                                    f"blob {digest} from {endpoint}: more bytes than the {size} "
                                    "the manifest declares"
                                )
                            hasher.update(chunk)
                            out.write(chunk)
                            if progress is not None:
                                progress(len(chunk))
                    if size is not None and received != size:
                        raise DataLoss(
                            f"blob {digest} from {endpoint}: received {received} bytes, "
                            f"the manifest declares {size}"
                        )
                    actual = "sha256:" + hasher.hexdigest()
                    if actual != digest:
                        raise DataLoss(f"blob {digest} from {endpoint}: content has digest {actual}")
            except BaseException:
                dest.unlink(missing_ok=True)
                raise

        self._each_endpoint(attempt)

    # --- plumbing ----------------------------------------------------------

    def _each_endpoint(self, attempt: Callable[[Endpoint], T]) -> T:
        errors: list[PycriError] = []
        for endpoint in self.endpoints:
            if self.cancel.is_set():
                raise DeadlineExceeded(f"pull of {self.ref} cancelled")
            try:
                return attempt(endpoint)
            except (DataLoss, InvalidArgument, DeadlineExceeded):
                # Content problems and cancellation are not cured by another mirror.
                raise
            except PycriError as exc:
                log.info("registry endpoint failed", endpoint=str(endpoint), error=str(exc))
                errors.append(exc)
        if errors and all(isinstance(e, NotFound) for e in errors):
            raise errors[-1]
        # The registry itself speaks last; its error is the one a user can act on.
        raise errors[-1] if errors else Unavailable(f"no endpoint configured for {self.ref.domain}")

    def _connection(self, endpoint: Endpoint, scheme: str, host: str) -> http.client.HTTPConnection:
        timeout = self.config.pull_progress_timeout
        if scheme == "https":
            context = ssl.create_default_context()
            if endpoint.insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(host, timeout=timeout, context=context)
        return http.client.HTTPConnection(host, timeout=timeout)

    class _Response:
        """Context manager that owns a connection and its response."""

        def __init__(
            self,
            conn: http.client.HTTPConnection,
            resp: http.client.HTTPResponse,
            forget: Callable[[], None],
        ) -> None:
            self.conn = conn
            self.resp = resp
            self.forget = forget

        def __enter__(self) -> http.client.HTTPResponse:
            return self.resp

        def __exit__(self, *exc: object) -> None:
            self.forget()
            self.conn.close()

    def _watch(self, conn: http.client.HTTPConnection) -> Callable[[], None]:
        """Shut ``conn``'s socket down on cancellation, waking a thread blocked reading it."""

        def abort() -> None:
            sock = conn.sock
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)

        return on_cancel(self.cancel, abort)

    def _cancelled(self, what: str) -> DeadlineExceeded:
        return DeadlineExceeded(f"pull of {self.ref} cancelled while fetching {what}")

    def _request(
        self, endpoint: Endpoint, method: str, path: str, *, accept: str | None = None, what: str
    ) -> RegistrySession._Response:
        url_path = endpoint.base_path + path
        if endpoint.is_mirror:
            # containerd's convention: mirrors learn which upstream the request is for.
            url_path += ("&" if "?" in url_path else "?") + "ns=" + urllib.parse.quote(self.ref.domain)
        scheme, host = endpoint.scheme, endpoint.host
        auth_state = self._auth.setdefault(str(endpoint), _AuthState())
        redirects = 0
        send_auth = True
        while True:
            headers = {"User-Agent": USER_AGENT}
            if accept:
                headers["Accept"] = accept
            if send_auth and auth_state.header:
                headers["Authorization"] = auth_state.header
            conn = self._connection(endpoint, scheme, host)
            forget = self._watch(conn)
            try:
                conn.request(method, url_path, headers=headers)
                resp = conn.getresponse()
            except TimeoutError:
                forget()
                conn.close()
                if self.cancel.is_set():
                    raise self._cancelled(what) from None
                raise Unavailable(
                    f"{what}: registry {scheme}://{host} sent nothing for "
                    f"{self.config.pull_progress_timeout:g}s (pull_progress_timeout)"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                forget()
                conn.close()
                if self.cancel.is_set():
                    raise self._cancelled(what) from None
                raise Unavailable(f"{what}: cannot reach registry {scheme}://{host}: {exc}") from None
            status = resp.status
            if status != 200:
                forget()
            if status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location") or ""
                conn.close()
                redirects += 1
                if not location or redirects > MAX_REDIRECTS:
                    raise Unavailable(f"{what}: registry {host} redirects without end")
                target = urllib.parse.urlsplit(urllib.parse.urljoin(f"{scheme}://{host}{url_path}", location))
                if target.netloc != host:
                    # A storage backend on another host gets no registry credentials.
                    send_auth = False
                scheme, host = target.scheme, target.netloc
                url_path = target.path + (f"?{target.query}" if target.query else "")
                continue
            if status == 401 and send_auth and not auth_state.challenge_tried:
                challenge = resp.getheader("WWW-Authenticate") or ""
                conn.close()
                auth_state.challenge_tried = True
                auth_state.header = self._authorize(endpoint, challenge)
                if auth_state.header:
                    continue
                raise Unauthenticated(
                    f"{what}: registry {endpoint} requires authentication (HTTP 401) "
                    "and no credentials were given"
                )
            if status == 200:
                return RegistrySession._Response(conn, resp, forget)
            detail = _error_detail(resp)
            conn.close()
            where = f"{what}: registry {scheme}://{host} answered HTTP {status}{detail}"
            if status == 401:
                raise Unauthenticated(where)
            if status == 403:
                raise PermissionDenied(where)
            if status == 404:
                raise NotFound(where)
            raise Unavailable(where)

    def _credentials_for(self, endpoint: Endpoint) -> Credentials:
        if not self.credentials.empty and self.credentials.applies_to(endpoint.host):
            return self.credentials
        settings = endpoint.settings
        if settings.username or settings.auth:
            return Credentials.from_auth(
                username=settings.username, password=settings.password, auth=settings.auth
            )
        return Credentials()

    def _authorize(self, endpoint: Endpoint, challenge: str) -> str | None:
        creds = self._credentials_for(endpoint)
        scheme, _, params_text = challenge.partition(" ")
        params = _parse_challenge(params_text)
        if scheme.lower() == "basic":
            if not creds.username:
                return None
            raw = f"{creds.username}:{creds.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        if scheme.lower() != "bearer":
            raise Unauthenticated(f"registry {endpoint} asks for unsupported auth scheme {scheme!r}")
        if creds.registry_token:
            return f"Bearer {creds.registry_token}"
        realm = params.get("realm")
        if not realm:
            raise Unauthenticated(f"registry {endpoint} sent a Bearer challenge without realm")
        scope = params.get("scope") or f"repository:{self.ref.path}:pull"
        token = self._fetch_token(endpoint, realm, params.get("service", ""), scope, creds)
        return f"Bearer {token}"

    def _fetch_token(
        self, endpoint: Endpoint, realm: str, service: str, scope: str, creds: Credentials
    ) -> str:
        target = urllib.parse.urlsplit(realm)
        if target.scheme not in ("http", "https") or not target.netloc:
            raise Unauthenticated(f"registry {endpoint} names an invalid token realm {realm!r}")
        headers = {"User-Agent": USER_AGENT}
        if creds.identity_token:
            method = "POST"
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "service": service,
                "scope": scope,
                "client_id": "pycri",
            }
            body: bytes | None = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            path = target.path or "/"
        else:
            method = "GET"
            body = None
            query = urllib.parse.urlencode({"service": service, "scope": scope})
            path = (target.path or "/") + "?" + (f"{target.query}&" if target.query else "") + query
            if creds.username:
                raw = f"{creds.username}:{creds.password}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        conn = self._connection(endpoint, target.scheme, target.netloc)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                detail = _error_detail(resp)
                exc_type = PermissionDenied if resp.status == 403 else Unauthenticated
                raise exc_type(
                    f"token service {target.scheme}://{target.netloc} for registry {endpoint} "
                    f"refused a token for {scope} (HTTP {resp.status}){detail}"
                )
            raw_body = self._read_bounded(resp, endpoint, "token response")
        except (OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"cannot reach token service {realm} for registry {endpoint}: {exc}") from None
        finally:
            conn.close()
        try:
            document = json.loads(raw_body)
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise Unauthenticated(f"token service {realm} for registry {endpoint} returned no token")
        return token

    def _chunks(self, resp: http.client.HTTPResponse, endpoint: Endpoint, what: str) -> Iterator[bytes]:
        while True:
            if self.cancel.is_set():
                raise DeadlineExceeded(f"pull of {self.ref} cancelled while reading {what}")
            try:
                chunk = resp.read1(CHUNK) if hasattr(resp, "read1") else resp.read(CHUNK)
            except TimeoutError:
                if self.cancel.is_set():
                    raise self._cancelled(what) from None
                raise Unavailable(
                    f"{what}: registry {endpoint} sent no bytes for "
                    f"{self.config.pull_progress_timeout:g}s (pull_progress_timeout); pull cancelled"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                if self.cancel.is_set():
                    raise self._cancelled(what) from None
                raise Unavailable(f"{what}: connection to registry {endpoint} broke: {exc}") from None
            if not chunk:
                if self.cancel.is_set():
                    raise self._cancelled(what)
                return
            yield chunk

    def _read_bounded(self, resp: http.client.HTTPResponse, endpoint: Endpoint, what: str) -> bytes:
        limit = self.config.max_metadata_bytes
        declared = resp.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise InvalidArgument(
                f"{what} from registry {endpoint} is {declared} bytes, over the {limit}-byte limit "
                "(image.max_metadata_bytes)"
            )
        parts: list[bytes] = []
        total = 0
        for chunk in self._chunks(resp, endpoint, what):
            total += len(chunk)
            if total > limit:
                raise InvalidArgument(
                    f"{what} from registry {endpoint} exceeds the {limit}-byte limit "
                    "(image.max_metadata_bytes); stopped reading"
                )
            parts.append(chunk)
        body = b"".join(parts)
        if declared is not None and declared.isdigit() and int(declared) != len(body):
            raise DataLoss(f"{what} from registry {endpoint}: declared {declared} bytes, got {len(body)}")
        return body

    def _parse_manifest(
        self,
        endpoint: Endpoint,
        reference: str,
        body: bytes,
        header_type: str,
        expect_digest: str | None,
    ) -> Manifest:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if expect_digest and digest != expect_digest:
            raise DataLoss(
                f"manifest {reference} from registry {endpoint} has digest {digest}, expected {expect_digest}"
            )
        try:
            document = json.loads(body)
        except ValueError:
            raise InvalidArgument(
                f"manifest {reference} from registry {endpoint} is not valid JSON"
            ) from None
        if not isinstance(document, dict):
            raise InvalidArgument(f"manifest {reference} from registry {endpoint} is not a JSON object")
        declared = document.get("mediaType")
        if declared is not None and not isinstance(declared, str):
            raise InvalidArgument(
                f"manifest {reference} from registry {endpoint} has a mediaType that is not a string"
            )
        media_type = declared or header_type
        if media_type in SCHEMA1_TYPES or document.get("schemaVersion") == 1:
            raise InvalidArgument(
                f"manifest {reference} from registry {endpoint} is Docker schema 1, which pycri does "
                "not support (deprecated since 2017); push the image again with a current client"
            )
        if declared and declared not in MANIFEST_TYPES:
            # A document that names its own type is that type, whatever its shape: an artifact
            # or a future format is not pulled as if it were an image.
            raise InvalidArgument(
                f"manifest {reference} from registry {endpoint} has unsupported media type {declared!r}; "
                f"pycri pulls {', '.join(MANIFEST_TYPES)}"
            )
        if media_type not in MANIFEST_TYPES:
            # OCI manifests may omit mediaType; then the Content-Type says what they are, and
            # without a usable one (application/json from a plain web server) their shape does.
            if "manifests" in document:
                media_type = MANIFEST_TYPES[0]
            elif "config" in document and "layers" in document:
                media_type = MANIFEST_TYPES[2]
            else:
                raise InvalidArgument(
                    f"manifest {reference} from registry {endpoint} has unsupported media type {media_type!r}"
                )
        return Manifest(media_type=media_type, digest=digest, body=body, document=document)


def _check_blob(body: bytes, digest: str, size: int | None, endpoint: Endpoint) -> None:
    if size is not None and len(body) != size:
        raise DataLoss(f"blob {digest} from registry {endpoint}: {len(body)} bytes, manifest says {size}")
    actual = "sha256:" + hashlib.sha256(body).hexdigest()
    if actual != digest:
        raise DataLoss(f"blob {digest} from registry {endpoint}: content has digest {actual}")


def _parse_challenge(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(text):
        while i < len(text) and text[i] in " ,":
            i += 1
        eq = text.find("=", i)
        if eq < 0:
            break
        key = text[i:eq].strip().lower()
        i = eq + 1
        if i < len(text) and text[i] == '"':
            end = i + 1
            value_chars = []
            while end < len(text) and text[end] != '"':
                if text[end] == "\\" and end + 1 < len(text):
                    end += 1
                value_chars.append(text[end])
                end += 1
            out[key] = "".join(value_chars)
            i = end + 1
        else:
            end = text.find(",", i)
            end = len(text) if end < 0 else end
            out[key] = text[i:end].strip()
            i = end
    return out


def _error_detail(resp: http.client.HTTPResponse) -> str:
    """The registry's own error text (distribution API error JSON), briefly; empty when the
    body is no such document or cannot be read (the HTTP status then speaks alone)."""
    try:
        body = resp.read(4096)
    except (OSError, http.client.HTTPException) as exc:
        log.info("cannot read a registry's error body", status=resp.status, error=str(exc))
        return ""
    try:
        document = json.loads(body)
    except ValueError:
        return ""  # not JSON: an HTML page from a proxy, a truncated body
    errors = document.get("errors") if isinstance(document, dict) else None
    if not isinstance(errors, list):
        return ""
    messages = [f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict)]
    return f" ({'; '.join(messages)})" if messages else ""
