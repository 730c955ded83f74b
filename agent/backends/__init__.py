"""Model-server backends: how to launch each kind of server, probe it and read its load."""

from __future__ import annotations

from .base import Backend, Judgement, LaunchSpec, ProbeResult, Upstream, Verdict, judge_status
from .command import CommandBackend
from .koboldcpp import KoboldCppBackend
from .llamacpp import LlamaCppBackend
from .ollama import OllamaBackend
from .vllm import VllmBackend

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (VllmBackend(), OllamaBackend(), LlamaCppBackend(), KoboldCppBackend(), CommandBackend())
}


def get_backend(name: str) -> Backend:
    return BACKENDS[name]


__all__ = [
    "BACKENDS",
    "Backend",
    "Judgement",
    "LaunchSpec",
    "ProbeResult",
    "Upstream",
    "Verdict",
    "get_backend",
    "judge_status",
]
