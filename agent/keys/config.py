"""``[auth]``: who may use this agent's OpenAI routes (the admin API has its own token).

Like Redis's protected mode, the default follows the listen address: an agent that only
processes on its own host can reach (``listen_host`` loopback) is open, as the host already
trusts them; an agent reachable from the network needs API keys unless the file says
``mode = "open"`` — and then check-config and ``gpuctl check`` say so. Nothing reachable from
the network is open by omission.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from gpufleet.tomlconfig import ConfigProblem, StrictSection, is_loopback

AuthMode = Literal["keys", "open"]


class AuthSection(StrictSection):
    """Who may use the OpenAI routes (/v1/...): API keys made with ``gpuctl keys create``."""

    # keys: every request needs an API key; open: anyone who can reach the port. Default: open
    # when listen_host is a loopback address, keys otherwise.
    mode: AuthMode | None = None
    # A standalone agent's keys (gpuctl keys create NAME --file PATH); re-read on reload. Cluster
    # agents mirror the cluster's keys from etcd instead.
    keys_file: str | None = None
    # Cluster agents: the secret nodes sign forwarded requests with, the same file on every node
    # (at least 32 bytes: openssl rand -hex 32). A forwarded request without a valid signature is
    # refused, so nobody can skip the key check by claiming to be a peer. Re-read on reload.
    hop_secret_file: str | None = None

    def resolve(self, base: Path) -> None:
        for name in ("keys_file", "hop_secret_file"):
            value = getattr(self, name)
            if value and not Path(value).is_absolute():
                setattr(self, name, str((base / value).resolve()))


def effective_mode(auth: AuthSection, listen_host: str) -> AuthMode:
    if auth.mode is not None:
        return auth.mode
    return "open" if is_loopback(listen_host) else "keys"


def auth_problems(auth: AuthSection, listen_host: str, cluster: bool) -> list[ConfigProblem]:
    mode = effective_mode(auth, listen_host)
    implied = "" if auth.mode else f" (the default, as {listen_host} is reachable from other hosts)"
    out = []
    if cluster and auth.keys_file:
        out.append(
            ConfigProblem("$.auth.keys_file", "cluster agents take their keys from etcd (gpuctl keys): remove it")
        )
    if mode == "keys" and not cluster and not auth.keys_file:
        out.append(
            ConfigProblem(
                "$.auth.keys_file",
                f'mode = "keys"{implied} needs the keys file of this standalone agent: '
                'make one with `gpuctl keys create NAME --file PATH`, or set mode = "open"',
            )
        )
    if mode == "keys" and cluster and not auth.hop_secret_file:
        out.append(
            ConfigProblem(
                "$.auth.hop_secret_file",
                f'mode = "keys"{implied} in cluster mode needs the secret every node signs forwarded '
                "requests with (the same file on every node: openssl rand -hex 32 > FILE)",
            )
        )
    return out


def auth_warnings(auth: AuthSection, listen_host: str) -> list[ConfigProblem]:
    if auth.mode == "open" and not is_loopback(listen_host):
        return [
            ConfigProblem(
                "$.auth.mode",
                f'"open" on {listen_host}: anyone who can reach this port can use every GPU of the fleet; '
                'use mode = "keys" (gpuctl keys create) unless a gateway in front authenticates clients',
            )
        ]
    return []
