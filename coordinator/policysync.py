"""Which cluster policy a coordinator applies: the pure decision behind ``Leader.sync_policy``.

The policy lives in etcd (``/gpufleet/<cluster>/config``, gpufleet/policyconfig.py). Every
replica mirrors the key and applies what is there, so a new leader already runs the cluster's
policy when its term starts: a leader change never changes policy. Until the key is seen the
file's sections apply; when it is absent the leader writes the policy it applies (the file's,
the first time: the bootstrap). A value that does not decode or validate is skipped and the
last good policy stays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpufleet.policyconfig import ClusterPolicy, InvalidPolicy, decode_policy, diff, differing_sections


@dataclass(frozen=True)
class PolicyState:
    policy: ClusterPolicy  # what applies
    revision: int = 0  # mod revision of the etcd value applied; 0: not from etcd (the file's)
    seen: int = 0  # the last mod revision judged (applied or skipped)


@dataclass(frozen=True)
class PolicyStep:
    state: PolicyState
    changes: list[str] = field(default_factory=list)  # "section.field: old -> new", when applied
    invalid: str | None = None  # why the value at ``state.seen`` was skipped
    absent: bool = False  # no value in etcd: the leader should write ``state.policy``


def step_policy(state: PolicyState, value: bytes | None, mod_revision: int) -> PolicyStep:
    """Judge the key's current value (``None``: absent) against what applies."""
    if value is None:
        return PolicyStep(PolicyState(state.policy, 0, 0), absent=True)
    if mod_revision == state.seen:
        return PolicyStep(state)
    try:
        new = decode_policy(value)
    except InvalidPolicy as e:
        return PolicyStep(PolicyState(state.policy, state.revision, mod_revision), invalid=str(e))
    return PolicyStep(PolicyState(new, mod_revision, mod_revision), changes=diff(state.policy, new))


def file_differs(file_policy: ClusterPolicy, cluster: ClusterPolicy) -> list[str]:
    """The sections in which the local file disagrees with the cluster's policy."""
    return differing_sections(file_policy, cluster)
