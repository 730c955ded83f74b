"""TLS for the etcd client: the client context, and TLS failures explained in terms of what to check."""

from __future__ import annotations

import ssl

from .errors import EtcdTLSError


def build_ssl_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """A client TLS context; the system CAs unless ``ca_file``; a client certificate if given."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise EtcdTLSError(f"cannot load etcd CA file {ca_file!r}: {e}") from e
    if cert_file or key_file:
        if not cert_file:
            raise EtcdTLSError("etcd key_file given without cert_file")
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as e:
            raise EtcdTLSError(f"cannot load etcd client certificate {cert_file!r} / key {key_file!r}: {e}") from e
    return ctx


def tls_cause(e: BaseException) -> ssl.SSLError | None:
    """The ssl.SSLError behind an aiohttp error, if any (aiohttp wraps it at varying depths)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def tls_error(ep: str, e: BaseException) -> EtcdTLSError:
    """A TLS failure, explained in terms of what to check."""
    cause = tls_cause(e) or e
    text = str(getattr(cause, "reason", None) or cause)
    full = str(cause)
    if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in full:
        hint = "the server's certificate is not trusted by ca_file (or its name does not match the endpoint)"
    elif "WRONG_VERSION_NUMBER" in full or "wrong version number" in full:
        hint = "the endpoint does not speak TLS; use http:// for it"
    elif "CERTIFICATE_REQUIRED" in full or "BAD_CERTIFICATE" in full or "UNKNOWN_CA" in full:
        # Go answers a missing client certificate and one it does not trust alike ("bad certificate").
        hint = (
            "the server refused the client certificate: it requires one (cert_file/key_file) signed by a CA "
            "in its --trusted-ca-file"
        )
    else:
        hint = "TLS handshake failed"
    return EtcdTLSError(f"TLS error talking to etcd at {ep}: {hint} [{text}]", endpoint=ep)
