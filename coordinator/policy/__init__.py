"""The gpu-coordinator's policy: pure functions of (previous state, records, now).

The leader's loop reads node records from etcd, steps each node's and instance's health
(``health``), computes the route table (``routes``, with weights from ``weights``) and writes the
routes that changed. Nothing in this package does I/O or reads a clock.
"""

from .health import (
    DEFAULT_HEALTH,
    Health,
    HealthPolicy,
    InstanceHealth,
    NodeHealth,
    node_sample,
    routable,
    step_instance,
    step_node,
)
from .routes import DEFAULT_FAILOVER, FailoverPolicy, RoutePlan, compute_routes, models_removed, routes_differ
from .weights import DEFAULT_WEIGHTS, WeightPolicy, endpoint_weight, instance_telemetry, instance_weight

__all__ = [
    "DEFAULT_FAILOVER",
    "DEFAULT_HEALTH",
    "DEFAULT_WEIGHTS",
    "FailoverPolicy",
    "Health",
    "HealthPolicy",
    "InstanceHealth",
    "NodeHealth",
    "RoutePlan",
    "WeightPolicy",
    "compute_routes",
    "endpoint_weight",
    "instance_telemetry",
    "instance_weight",
    "models_removed",
    "node_sample",
    "routable",
    "routes_differ",
    "step_instance",
    "step_node",
]
