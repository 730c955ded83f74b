"""The check every OpenAI request passes before the proxy routes it, and its accounting after.

A request that enters the cluster here presents an API key (``Authorization: Bearer`` or
``x-api-key``); the key must be known, current and allowed the model (401/403 otherwise), and
this node's share of the key's limits must have room (429 with ``Retry-After`` and OpenAI's
``x-ratelimit-*`` headers). The client's key never reaches a model server (the relay strips it
and sends the instance's own key, if it has one). A request another node forwarded carries that
node's signature instead of the client's key (``gpufleet/hopauth.py``): it was authenticated and
counted at the entry node, so here it is only checked for the signature — a hop header from
anyone else gets 401.

Accounting: the entry node learns each answer's token usage (``usage.py``; streams are asked for
it on the client's behalf) and charges it to the key's token window and to the per-key
Prometheus counters.

Shares: a node enforces its share of each fleet-wide limit — the leader's division by demand
(``/state/keyshares``, coordinator/keyshare_loop.py), or ``1 / entry nodes`` (the nodes in the
cluster's route table; 1 standalone) for a key not divided — and the shares sum to 1, so the
fleet can never admit more than the limit whatever the client does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from gpufleet.apikeys import Denial, KeyIndex, presented_key
from gpufleet.facts import HOP_AUTH_HEADER, HOPS_HEADER, KEY_NAME_HEADER, REQUEST_ID_HEADER
from gpufleet.hopauth import body_digest, check_secret, sign, verify
from gpufleet.httperrors import error_response
from gpufleet.keylimits import Limiter
from gpufleet.keyspace.records import ApiKeyRecord

from .config import AuthSection, effective_mode
from .usage import Usage, ask_for_usage, encode_request

if TYPE_CHECKING:
    from agent.proxy.context import Ctx, Head
    from agent.proxy.exchange import Request

    from .journal import UsageJournal
    from .source import KeySource

log = structlog.get_logger("agent.keys")

# Headers that carry a client's credential: never passed to a model server or another node.
CREDENTIAL_HEADERS = ("Authorization", "x-api-key", HOP_AUTH_HEADER, KEY_NAME_HEADER)
# Routes whose streams can be asked for usage with stream_options (OpenAI's chat and completions).
_USAGE_OPTION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
_decoder = msgspec.json.Decoder()


def read_hop_secret(path: str) -> bytes:
    """The cluster's hop secret; raises OSError or HopAuthError with the file named."""
    return check_secret(Path(path).read_bytes(), path)


class KeyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "gpu_agent_key_requests",
            "Requests this entry node admitted, per API key, model and HTTP status.",
            ["key", "model", "status"],
            registry=registry,
        )
        self.tokens = Counter(
            "gpu_agent_key_tokens",
            "Tokens used by requests admitted here, per API key, model and kind (prompt, completion), "
            "from the model server's usage.",
            ["key", "model", "kind"],
            registry=registry,
        )
        # Labelled children, looked up once per (key, model, ...): labels() costs a lock and a
        # tuple per call, and these series are never removed.
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._tokens: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.refused = Counter(
            "gpu_agent_key_refusals",
            "Requests refused by the key check: missing/invalid/expired/revoked key, model not allowed, "
            "a limit, a bad hop signature, no key set yet.",
            ["reason"],
            registry=registry,
        )

    def count(self, key: str, model: str, status: int, usage: Usage | None) -> None:
        child = self._requests.get((key, model, status))
        if child is None:
            child = self._requests[(key, model, status)] = self.requests.labels(key, model, str(status))
        child.inc()
        if usage is not None:
            pair = self._tokens.get((key, model))
            if pair is None:
                pair = self._tokens[(key, model)] = (
                    self.tokens.labels(key, model, "prompt"),
                    self.tokens.labels(key, model, "completion"),
                )
            pair[0].inc(usage.prompt_tokens)
            pair[1].inc(usage.completion_tokens)


class KeyGate:
    def __init__(
        self,
        auth: Callable[[], AuthSection],
        listen_host: str,
        node_id: str,
        source: Callable[[], KeySource | None],
        entry_nodes: Callable[[], int],
        registry: CollectorRegistry,
    ) -> None:
        self._auth = auth  # read live: a reload applies
        self.listen_host = listen_host  # fixed until a restart, as the listener is
        self.node_id = node_id
        self._source = source
        self._entry_nodes = entry_nodes
        self.limiter = Limiter()
        self.hop_secrets: list[bytes] = []
        self.metrics = KeyMetrics(registry)
        self.journal: UsageJournal | None = None  # set by the daemon once open (agent/keys/journal.py)
        self._mode: tuple[AuthSection, str] | None = None  # keys_required's, for that [auth]

    @property
    def keys_required(self) -> bool:
        # Asked per proxied request: the mode is worked out again only when a reload replaced
        # the [auth] section (effective_mode parses the listen host as an IP address).
        auth = self._auth()
        known = self._mode
        if known is None or known[0] is not auth:
            known = self._mode = (auth, effective_mode(auth, self.listen_host))
        return known[1] == "keys"

    def load_hop_secret(self) -> None:
        """Read the hop secret file (at start, and on every reload). Raises at start; the reload
        path catches and keeps the secret in force."""
        path = self._auth().hop_secret_file
        self.hop_secrets = [read_hop_secret(path)] if path else []

    def share(self, key: str) -> float:
        """This node's share of ``key``'s fleet-wide limits: the leader's division by demand,
        or an even one (1 / entry nodes) for a key it has not divided."""
        source = self._source()
        divided = source.share(key, self.node_id) if source is not None else None
        return divided if divided is not None else 1.0 / max(1, self._entry_nodes())

    # --- before routing -----------------------------------------------------------------------

    def listing(self, request: Request) -> ApiKeyRecord | None:
        """``GET /v1/models``: the key must be valid (any model); its model list narrows the
        answer. None: no key needed (open mode)."""
        if not self.keys_required:
            return None
        return self._checked_key(request, None, (request.header(REQUEST_ID_HEADER) or ""), time.time())

    def _checked_key(self, request: Request, model: str | None, rid: str, now: float) -> ApiKeyRecord:
        """The key the request presents, valid for ``model`` (any, when None); ``Refusal``
        (401/403, or 503 before any key set is known) otherwise."""
        index = self._index(rid)
        presented = presented_key(request.header("Authorization"), request.header("x-api-key"))
        verdict = index.check(presented, model, now)
        if verdict.denial is not None:
            self._refuse_key(request, verdict.denial, verdict.message, rid)
        assert verdict.key is not None
        return verdict.key

    def _index(self, rid: str) -> KeyIndex:
        source = self._source()
        index = source.index if source is not None else None
        if index is None:
            self.metrics.refused.labels("no_keys_yet").inc()
            raise Refusal(
                error_response(
                    503,
                    "this node has not loaded the cluster's API keys yet; try again shortly",
                    "server_error",
                    "keys_unavailable",
                    {"Retry-After": "2", REQUEST_ID_HEADER: rid},
                )
            )
        return index

    def admit(self, request: Request, body: bytes, head: Head, hops: int, ctx: Ctx) -> bytes:
        """The body to forward (asking for usage where needed), or ``Refusal`` with the answer
        when the request may not go on. ``hops``: the forwards so far, as the proxy reads them."""
        if request.header(HOPS_HEADER) is not None:
            self._admit_forwarded(request, body, hops, ctx)
            return body
        if not self.keys_required:
            return body
        now = time.time()
        key = self._checked_key(request, head.model, ctx.rid, now)
        admission = self.limiter.admit(key, self.share(key.name), now)
        if not admission.allowed:
            self.metrics.refused.labels(f"limit_{admission.limit}").inc()
            what = {"requests": "requests per minute", "tokens": "tokens per minute"}.get(admission.limit)
            message = (
                f"Rate limit reached for key {key.name!r} on {what}; try again in {admission.retry_after_s:.0f}s."
                if what
                else f"Key {key.name!r} has its maximum of requests in flight; try again when one ends."
            )
            headers = {**admission.headers, "Retry-After": f"{admission.retry_after_s:.0f}", REQUEST_ID_HEADER: ctx.rid}
            raise Refusal(error_response(429, message, admission.limit, "rate_limit_exceeded", headers))
        ctx.key, ctx.key_name, ctx.auth_headers = key, key.name, dict(admission.headers)
        return self._asking_for_usage(request, body, head, ctx)

    def _refuse_key(self, request: Request, denial: Denial, message: str, rid: str) -> None:
        self.metrics.refused.labels(denial.name.lower()).inc()
        log.info(
            "request refused by the key check", reason=denial.name.lower(), path=request.path, remote=request.remote
        )
        kind = "permission_error" if denial.status == 403 else "invalid_request_error"
        headers = {REQUEST_ID_HEADER: rid}
        if denial.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="gpufleet"'
        raise Refusal(error_response(denial.status, message, kind, denial.code, headers))

    def _admit_forwarded(self, request: Request, body: bytes, hops: int, ctx: Ctx) -> None:
        """A request with a hop header: another node's forward, signed, or refused."""
        if not self.keys_required and not self.hop_secrets:
            return  # an open cluster: a hop header only guards against loops
        problem = (
            verify(
                self.hop_secrets,
                request.header(HOP_AUTH_HEADER),
                request.method,
                request.path_qs,
                hops,
                body_digest(body),
                request.header(KEY_NAME_HEADER) or "",
                time.time(),
            )
            if self.hop_secrets
            else "forwarded requests are not accepted here (no hop secret configured)"
        )
        if problem is not None:
            self.metrics.refused.labels("bad_hop_signature").inc()
            log.warning("forwarded request refused", reason=problem, path=request.path, remote=request.remote)
            raise Refusal(
                error_response(
                    401,
                    f"not a forward from a cluster member: {problem}",
                    "invalid_request_error",
                    "invalid_hop_signature",
                    {REQUEST_ID_HEADER: ctx.rid},
                )
            )
        ctx.key_name = request.header(KEY_NAME_HEADER) or None

    def _asking_for_usage(self, request: Request, body: bytes, head: Head, ctx: Ctx) -> bytes:
        """A stream is asked for its usage on the client's behalf (and the extra event hidden)."""
        if not head.stream or request.path not in _USAGE_OPTION_ROUTES:
            return body
        try:
            doc = _decoder.decode(body)
        except msgspec.DecodeError:
            return body
        if isinstance(doc, dict) and ask_for_usage(doc):
            ctx.hide_usage = True
            return encode_request(doc)
        return body

    # --- on the way out -------------------------------------------------------------------------

    def forward_headers(self, path_qs: str, hops: int, body: bytes, ctx: Ctx) -> dict[str, str]:
        """What replaces the client's credential on a forward to another node: the signature
        (nothing without a hop secret). A model server gets its instance's own key instead."""
        if not self.signs_forwards:
            return {}
        key_name = ctx.key_name or ""
        signature = sign(self.hop_secrets[0], "POST", path_qs, hops, int(time.time()), body_digest(body), key_name)
        return {HOP_AUTH_HEADER: signature, KEY_NAME_HEADER: key_name} if key_name else {HOP_AUTH_HEADER: signature}

    @property
    def signs_forwards(self) -> bool:
        """A forward to another node carries our signature (``forward_headers``): with a hop secret."""
        return bool(self.hop_secrets)

    @property
    def strips_credentials(self) -> bool:
        """Keys are ours in keys mode: the client's never goes further. In open mode a client's
        Authorization goes to the model server as before (it may be the server's own key)."""
        return self.keys_required or bool(self.hop_secrets)

    def finish(self, ctx: Ctx) -> None:
        """A request admitted here ended: free its concurrency, charge its tokens, bill it."""
        key = ctx.key
        if key is None:
            return
        usage = ctx.usage
        self.limiter.done(key, usage.total if usage is not None else 0, time.time())
        self.bill(ctx)

    def bill(self, ctx: Ctx) -> None:
        """Count a request admitted here, once, in the counters and the usage journal. Called
        before the client has the end of its answer — by finish before a body is sent, by the
        relay when a stream's end event is in hand — so a client that got a whole answer was
        billed, even if this agent is killed the next instant (docs/architecture.md, API keys)."""
        key = ctx.key
        if key is None or ctx.billed:
            return
        ctx.billed = True
        usage = ctx.usage
        model = ctx.model_label
        self.metrics.count(key.name, model, ctx.status, usage)
        if self.journal is not None:
            p, c = (usage.prompt_tokens, usage.completion_tokens) if usage is not None else (0, 0)
            self.journal.append(time.time(), key.name, model, ctx.status, p, c)


class Refusal(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response
