"""OpenAI-compatible proxy: routes requests by model to READY local instances."""

from .server import Proxy, add_proxy

__all__ = ["Proxy", "add_proxy"]
