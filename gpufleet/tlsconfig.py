"""TLS of the daemons' ports: the ``[tls]`` section of the agent's and the coordinator's config,
the listener's :class:`ssl.SSLContext`, and the context an agent verifies other nodes with.

One section for both daemons (the same Struct), because a node's certificate, its key and the
cluster's CA are one thing whichever daemon serves on it, and the playbook's PKI issues them
alike. ``cert_file`` set: the port serves HTTPS only (no plain-HTTP fallback on the same port),
TLS 1.2 or later; TLS 1.2 with ECDHE and AES-GCM or ChaCha20-Poly1305 only (forward secret,
AEAD: Mozilla's "intermediate" list without DHE), TLS 1.3 with its own suites; no compression.
``client_ca_file`` set: mutual TLS, every client (other nodes, gpuctl, Prometheus, API clients)
must present a certificate signed by it, and by it alone (the system's CAs are not loaded).

Certificate rotation without a restart: :meth:`ServerTls.reload` (the agent's SIGHUP) reads the
files again into a new context and swaps it in from the handshake's SNI callback, so a file
pair that does not load leaves the running certificate serving and connections already open
keep theirs.

Every problem names its field (``$.tls.key_file: ...``): ``check-config`` lists them
(:func:`file_problems`) and a daemon that meets one at start-up exits 78.
"""

from __future__ import annotations

import ssl
import stat
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from gpufleet.tomlconfig import ConfigProblem, StrictSection

# TLS 1.2 suites (1.3's are all AEAD and not set here). Every client of the last decade has them.
CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20"
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsSection(StrictSection):
    """``[tls]``: HTTPS on this daemon's port, and (agent) how other nodes' certificates are checked."""

    # This node's certificate (PEM; intermediates after it). With key_file: the port serves
    # HTTPS only, and the default advertise_url is https://. The paths are read at start-up,
    # the files again on an agent's SIGHUP: a certificate rotated in place serves new
    # connections without a restart (a file that does not load keeps the running one).
    cert_file: str | None = None
    key_file: str | None = None  # the private key of cert_file (PEM), readable by the daemon's user only
    # Mutual TLS: clients must present a certificate this CA signed (other nodes, gpuctl,
    # Prometheus, API clients alike). Unset: any client completes the handshake (API keys and
    # the hop signature then say who it is).
    client_ca_file: str | None = None
    # The CA bundle that signed the other nodes' certificates: an agent verifies the node it
    # forwards a request to against it (hostname included). Unset: the system's trust store.
    # Verification is never turned off.
    ca_file: str | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"  # the oldest TLS version offered, client or server

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def scheme(self) -> str:
        return "https" if self.enabled else "http"

    def resolve(self, base: Path) -> None:
        for attr in ("cert_file", "key_file", "client_ca_file", "ca_file"):
            val = getattr(self, attr)
            if val and not Path(val).is_absolute():
                setattr(self, attr, str((base / val).resolve()))

    def problems(self, at: str = "$.tls") -> list[ConfigProblem]:
        """Rules a type cannot express. Pure: no I/O (the files are :func:`file_problems`')."""
        out = []
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            out.append(ConfigProblem(f"{at}.{missing}", "cert_file and key_file go together"))
        if self.client_ca_file is not None and self.cert_file is None:
            out.append(ConfigProblem(f"{at}.client_ca_file", "mutual TLS needs cert_file and key_file (HTTPS)"))
        return out

    def advertise_problems(self, url: str | None, url_at: str) -> list[ConfigProblem]:
        """An advertised URL whose scheme the port does not serve: other nodes would call it in
        plain HTTP and fail (behind a TLS terminator the operator advertises https there too)."""
        if self.enabled and url is not None and urlsplit(url).scheme == "http":
            return [ConfigProblem(url_at, "the port serves HTTPS ([tls] cert_file): advertise https://")]
        return []


class TlsError(Exception):
    """A TLS file that does not load; ``field`` is its path in the config (``$.tls.key_file``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _read(path: str, field: str, marker: bytes, what: str) -> None:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TlsError(field, f"cannot read {path}: {e.strerror or e}") from None
    if marker not in data:
        raise TlsError(field, f"{path} holds no PEM {what}")


def _load_chain(ctx: ssl.SSLContext, tls: TlsSection, at: str) -> None:
    assert tls.cert_file is not None and tls.key_file is not None
    _read(tls.cert_file, f"{at}.cert_file", b"-----BEGIN CERTIFICATE-----", "certificate")
    _read(tls.key_file, f"{at}.key_file", b"PRIVATE KEY-----", "private key")
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or e.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"{at}.key_file", f"{tls.key_file} is not the key of the certificate in {tls.cert_file}"
            ) from None
        raise TlsError(f"{at}.cert_file", f"cannot load {tls.cert_file} with {tls.key_file}: {e.reason or e}") from None


def _load_ca(ctx: ssl.SSLContext, path: str, field: str) -> None:
    _read(path, field, b"-----BEGIN CERTIFICATE-----", "certificate")
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as e:
        raise TlsError(field, f"cannot load {path}: {e.reason or e}") from None


def server_context(tls: TlsSection, at: str = "$.tls") -> ssl.SSLContext:
    """The listener's context; raises :class:`TlsError` naming the field of a file that does not load."""
    # Not create_default_context: for CLIENT_AUTH it loads the system's CAs, and under mutual
    # TLS a client certificate from any public CA would then pass. Only client_ca_file signs.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(["http/1.1"])  # aiohttp's server speaks HTTP/1.1 only
    _load_chain(ctx, tls, at)
    if tls.client_ca_file:
        _load_ca(ctx, tls.client_ca_file, f"{at}.client_ca_file")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_context(tls: TlsSection, at: str = "$.tls") -> ssl.SSLContext:
    """The context an agent reaches other nodes with: their certificate verified against
    ``ca_file`` (or the system's store), hostname included; with mutual TLS it presents this
    node's own certificate (which must then allow client authentication, or carry no EKU)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # certificate and host name required
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.set_ciphers(CIPHERS_TLS12)
    if tls.ca_file:  # the cluster's CA alone: a public CA's certificate for a node's name does not pass
        _load_ca(ctx, tls.ca_file, f"{at}.ca_file")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.client_ca_file and tls.enabled:
        _load_chain(ctx, tls, at)
    return ctx


def file_problems(tls: TlsSection, at: str = "$.tls") -> list[ConfigProblem]:
    """The files as the daemon will load them (``check-config``): each that does not, by field."""
    out = []
    for build, wanted in ((server_context, tls.enabled), (peer_context, True)):
        if not wanted:
            continue
        try:
            build(tls, at)
        except TlsError as e:
            if all(p.path != e.field for p in out):
                out.append(ConfigProblem(e.field, e.message))
    return out


def key_warnings(tls: TlsSection, at: str = "$.tls") -> list[ConfigProblem]:
    """A private key every user on the host can read (``check-config`` says so; not refused:
    the operator may have reasons, as with the admin token)."""
    if not tls.key_file:
        return []
    try:
        mode = Path(tls.key_file).stat().st_mode
    except OSError:
        return []  # file_problems says it
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        return [
            ConfigProblem(
                f"{at}.key_file",
                f"{tls.key_file} is readable by every user (mode {stat.S_IMODE(mode):04o}): anyone on this host "
                "can impersonate the node; chmod 640 (group: the daemon's user) or 600",
            )
        ]
    return []


class ServerTls:
    """The running daemon's contexts: :attr:`server` (None: plain HTTP) given to the listener
    once, :attr:`peer` to the agent's forwarding client. :meth:`reload` replaces the
    certificate in place."""

    def __init__(self, tls: TlsSection, at: str = "$.tls") -> None:
        self.section, self.at = tls, at
        self.server = server_context(tls, at) if tls.enabled else None
        self.peer = peer_context(tls, at)
        self._current = self.server
        if self.server is not None:
            # The listener keeps the context it was given; each handshake switches to the newest.
            self.server.sni_callback = self._pick

    def _pick(self, conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext) -> None:
        if self._current is not None and self._current is not self.server:
            conn.context = self._current

    def reload(self) -> None:
        """Read the files again (same paths). A file that does not load raises :class:`TlsError`
        and the running certificate stays; a good pair serves every new connection."""
        fresh = server_context(self.section, self.at) if self.server is not None else None
        peer_context(self.section, self.at)  # every file checked before anything changes
        self._current = fresh
        # The forwarding client's context is held by its connection pool: the CA (added to
        # what it trusts, so both CAs verify during a CA rotation) and, with mutual TLS, this
        # node's certificate are loaded into it. Both just loaded into a fresh context above.
        if self.section.ca_file:
            self.peer.load_verify_locations(cafile=self.section.ca_file)
        if self.section.client_ca_file and self.section.cert_file:
            self.peer.load_cert_chain(self.section.cert_file, self.section.key_file)
