"""Facts the agent, the coordinator and the tools must agree on, each written once.

Imports nothing from gpufleet, agent or coordinator, so any layer may import it. A default in a config
Struct or a policy dataclass that is one of these facts imports it from here.
"""

from __future__ import annotations

from typing import Literal, get_args

# --- Backends: the inference servers the agent knows how to launch (agent/backends/) -------------
# ``command`` (an operator's own argv) is a further instance backend, but not a model backend: the
# model registry and the launchers table take only these.
Backend = Literal["vllm", "ollama", "llamacpp", "koboldcpp"]
BACKENDS: tuple[str, ...] = get_args(Backend)
DEFAULT_BACKEND: Backend = "vllm"

# --- The hot-GPU rule ------------------------------------------------------------------------------
# Above this temperature the coordinator caps a GPU's weight (at 30 % of its base); the agent
# publishes a crossing at once, as a state change; ``gpuctl check`` flags it.
HOT_GPU_C = 85.0

# --- Exit codes (sysexits.h) -----------------------------------------------------------------------
EX_OK = 0
EX_USAGE = 64  # a command-line usage error
EX_DATAERR = 65  # the input data was incorrect (gpuctl config: a value the policy refuses)
EX_UNAVAILABLE = 69  # a required service (NVML) is unavailable
EX_SOFTWARE = 70  # an internal error: systemd restarts the daemon
EX_OSERR = 71  # cannot bind the listen port
EX_CONFIG = 78  # a configuration error; the units say RestartPreventExitStatus=78

# --- HTTP header names -----------------------------------------------------------------------------
REQUEST_ID_HEADER = "X-Request-ID"
DEGRADED_HEADER = "X-Gpufleet-Degraded"  # a static fallback answered (load shedding)
DOWNGRADED_HEADER = "X-Model-Downgraded"  # a fallback model answered
# On a downgraded request forwarded to another node: "not counted in the error rate there either".
FALLBACK_REQUEST_HEADER = "X-Gpufleet-Fallback-For"
HOPS_HEADER = "X-GPUFleet-Hops"  # proxy-to-proxy forwards so far (loop guard)
HOP_AUTH_HEADER = "X-Gpufleet-Hop-Auth"  # a forward's signature with the cluster's hop secret (hopauth.py)
KEY_NAME_HEADER = "X-Gpufleet-Key"  # on a signed forward: the API key the entry node accepted
# On every proxied answer: the node and the instance that served it (for an answer from another
# node, that node's own values), so operators can see where a request went.
NODE_HEADER = "X-Gpufleet-Node"
INSTANCE_HEADER = "X-Gpufleet-Instance"
# RFC 9110 §7.6.1 hop-by-hop headers, plus those aiohttp sets itself; lower-case.
HOP_BY_HOP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
