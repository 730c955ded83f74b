"""How a daemon or gpuctl reaches etcd: endpoints, TLS, auth. Shared by every config.

The password lives in a file (never in the TOML, never in a log); TLS files and the password
file are checked to be readable when the client is built, with the path in the error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from gpufleet.etcd import EtcdClient
from gpufleet.tomlconfig import ConfigProblem

EndpointUrl = Annotated[str, Meta(pattern=r"^https?://[^/\s]+(:\d+)?/?$")]


class EtcdSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How to reach etcd: endpoints, TLS, authentication (docs/etcd.md)."""

    endpoints: list[EndpointUrl] = []  # empty: standalone, no etcd
    cluster: str = "default"  # the cluster's name: its keys live under /gpufleet/<cluster>/
    ca_file: str | None = None  # CA bundle that signed the etcd servers' certificates (https:// endpoints)
    cert_file: str | None = None  # client certificate, with key_file (mutual TLS)
    key_file: str | None = None
    # etcd user; its password is read from password_file (never written in the TOML, never logged).
    username: str | None = None
    password_file: str | None = None
    # Deadline of one etcd call (failover to other endpoints included).
    timeout_s: Annotated[float, Meta(gt=0)] = 2.0

    def resolve(self, base: Path) -> None:
        for attr in ("ca_file", "cert_file", "key_file", "password_file"):
            val = getattr(self, attr)
            if val and not Path(val).is_absolute():
                setattr(self, attr, str((base / val).resolve()))

    def problems(self, at: str) -> list[ConfigProblem]:
        out = []
        if (self.cert_file is None) != (self.key_file is None):
            out.append(ConfigProblem(f"{at}.cert_file", "cert_file and key_file go together"))
        if (self.username is None) != (self.password_file is None):
            out.append(ConfigProblem(f"{at}.password_file", "username and password_file go together"))
        schemes = {e.split("://", 1)[0] for e in self.endpoints}
        if len(schemes) > 1:
            out.append(ConfigProblem(f"{at}.endpoints", "mixes http:// and https:// endpoints"))
        return out

    def client(self) -> EtcdClient:
        password = None
        if self.password_file:
            try:
                password = Path(self.password_file).read_text().strip()
            except OSError as e:
                raise OSError(f"cannot read etcd password file {self.password_file}: {e.strerror or e}") from None
        for f in (self.ca_file, self.cert_file, self.key_file):
            if f and not Path(f).is_file():
                raise OSError(f"etcd TLS file {f} does not exist")
        return EtcdClient(
            list(self.endpoints),
            username=self.username,
            password=password,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            timeout=self.timeout_s,
        )
