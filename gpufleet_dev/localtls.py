"""TLS material for a local etcd: a CA, a server certificate for 127.0.0.1/localhost, a client
certificate without a Common Name, and a stranger CA with a client certificate of its own (for
"wrong CA" checks). Certificates are valid for a day; keys are ECDSA P-256, written 0600.

Needs ``cryptography`` (a test dependency), imported when material is made.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed nothing here: "wrong CA" tests
    other_client_cert: str  # a client certificate signed by other_ca
    other_client_key: str


def make_tls(directory: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a stranger CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k: ec.EllipticCurvePrivateKey, name: str) -> str:
        p = directory / name
        p.write_bytes(
            k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        p.chmod(0o600)
        return str(p)

    def write_cert(c: x509.Certificate, name: str) -> str:
        p = directory / name
        p.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        return str(p)

    def ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        k = key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
            .sign(k, hashes.SHA256())
        )
        return k, cert

    def leaf(
        ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, usages: list[x509.ObjectIdentifier]
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        import ipaddress

        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
            .issuer_name(ca_cert.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        return k, cert

    ca_key, ca_cert = ca("gpufleet test CA")
    # etcd's gateway dials etcd's own gRPC server with the server certificate, so with
    # --client-cert-auth the server certificate must be valid for client auth too.
    s_key, s_cert = leaf(ca_key, ca_cert, "etcd", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    # Client certificates for the JSON gateway carry no Common Name: with auth enabled, etcd
    # 3.4 answers any gateway request presenting one with HTTP 400 "CommonName of client sending
    # a request against gateway will be ignored and not used as expected" (gRPC clients would
    # be authenticated as that CN; the gateway cannot pass it on). SANs identify the client.
    c_key, c_cert = leaf(ca_key, ca_cert, "", [ExtendedKeyUsageOID.CLIENT_AUTH])
    o_key, o_cert = ca("some other CA")
    oc_key, oc_cert = leaf(o_key, o_cert, "", [ExtendedKeyUsageOID.CLIENT_AUTH])
    return TlsFiles(
        ca=write_cert(ca_cert, "ca.pem"),
        server_cert=write_cert(s_cert, "server.pem"),
        server_key=write_key(s_key, "server-key.pem"),
        client_cert=write_cert(c_cert, "client.pem"),
        client_key=write_key(c_key, "client-key.pem"),
        other_ca=write_cert(o_cert, "other-ca.pem"),
        other_client_cert=write_cert(oc_cert, "other-client.pem"),
        other_client_key=write_key(oc_key, "other-client-key.pem"),
    )
