"""Model-instance supervision: ports, GPU admission, processes, health, restarts."""

from .instance import Instance
from .supervision_policy import InstanceState
from .supervisor import Supervisor, UnknownInstance

__all__ = ["Instance", "InstanceState", "Supervisor", "UnknownInstance"]
