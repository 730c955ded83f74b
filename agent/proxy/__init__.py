"""OpenAI-compatible proxy: routes requests by model to READY local instances."""

from .server import Proxy, add_proxy_routes

__all__ = ["Proxy", "add_proxy_routes"]
