"""Cluster mode of the agent: registration in etcd under a lease."""

from .publisher import ClusterPublisher

__all__ = ["ClusterPublisher"]
