"""The model servers' own flags for what the agent sizes itself: context, slots, threads, key.

One table, read by the backends (to launch) and by the config check (an instance that sets
``context_size`` and also passes ``-c`` in ``args`` is refused with the field named, rather
than started with whichever flag the server happens to read last). Pure data: the config
module imports it, so it imports nothing of the agent.

Spellings are the servers' own (llama.cpp b6xxx ``llama-server --help``, vLLM 0.11 ``vllm serve
--help``, KoboldCPP 1.9x ``--help``); each setting lists every alias the server accepts.
"""

from __future__ import annotations

from typing import Literal

Setting = Literal["context_size", "parallel", "threads", "api_key"]

FLAGS: dict[str, dict[Setting, tuple[str, ...]]] = {
    "llamacpp": {
        "context_size": ("-c", "--ctx-size"),
        "parallel": ("-np", "--parallel"),
        "threads": ("-t", "--threads", "-tb", "--threads-batch"),
        "api_key": ("--api-key", "--api-key-file"),
    },
    "vllm": {
        "context_size": ("--max-model-len",),
        "parallel": ("--max-num-seqs",),
        "api_key": ("--api-key",),
    },
    "koboldcpp": {
        "context_size": ("--contextsize",),
        "parallel": ("--multiuser",),
        "threads": ("--threads", "--blasthreads"),
        "api_key": ("--password",),
    },
    "ollama": {},
    "command": {},
}

# Environment variables through which a server takes its API key: the agent passes the key
# from ``api_key_file`` this way, because a process's argv is readable by every local user.
API_KEY_ENV: dict[str, str] = {"llamacpp": "LLAMA_API_KEY", "vllm": "VLLM_API_KEY"}


def given(args: list[str], flags: tuple[str, ...]) -> bool:
    """Does ``args`` set one of ``flags`` (``--flag value`` or ``--flag=value``)?"""
    return any(a in flags or a.split("=", 1)[0] in flags for a in args)


def value_of(args: list[str], flags: tuple[str, ...]) -> str | None:
    """The value ``args`` gives to the last of ``flags`` present, if any."""
    found = None
    for i, a in enumerate(args):
        name, eq, val = a.partition("=")
        if name in flags:
            if eq:
                found = val
            elif i + 1 < len(args):
                found = args[i + 1]
    return found
