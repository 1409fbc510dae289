"""Request policies: small value objects that decide what to do with late, lost or failed nodes.

A policy looks at the state of one federated request and answers with a :class:`Verdict`
(or None, meaning "keep waiting"). ``deadline`` tells the waiting thread when to look again,
so a timeout is honoured to within a few milliseconds instead of being rounded to seconds.

- ``DiscardOnTimeout(t)``: after t seconds, drop the nodes that have not answered and
  complete with the others.
- ``StopOnTimeout(t)``: after t seconds with a node still silent, stop the whole request.
- ``DiscardOnDisconnect(t)``: a node offline for t seconds is dropped; the others go on.
- ``StopOnDisconnect(t)``: a node offline for t seconds while we wait for it stops the request.
- ``StopOnError()``: the first error reply stops the request.

A stopped request still says who answered; the job that sent it decides whether to raise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "DiscardOnDisconnect",
    "DiscardOnTimeout",
    "NodeProgress",
    "RequestPolicy",
    "StopOnDisconnect",
    "StopOnError",
    "StopOnTimeout",
    "Verdict",
]

PENDING, REPLIED, ERROR, MISSING = "pending", "replied", "error", "missing"


@dataclass
class NodeProgress:
    """Where one node stands in one request (owned by the request, read by policies)."""

    status: str = PENDING
    reason: str = ""
    detail: str = ""
    offline_since: float | None = None
    answered_at: float | None = None


@dataclass(frozen=True)
class Verdict:
    """What a policy decided: drop these nodes, and whether to stop the request."""

    policy: RequestPolicy
    stop: bool
    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)  # node -> (reason, detail)


class RequestPolicy:
    """Base class. ``started`` is the request's start on the monotonic clock.

    ``bounds_wait``: the policy ends every wait by itself (else the request's default timeout
    applies). ``handles_disconnect``: the policy decides about offline nodes (else a node that
    goes offline while pending is dropped at once as "disconnected").
    """

    bounds_wait = False
    handles_disconnect = False

    def deadline(self, started: float, nodes: dict[str, NodeProgress]) -> float | None:
        return None

    def check(self, started: float, now: float, nodes: dict[str, NodeProgress]) -> Verdict | None:
        raise NotImplementedError


def _pending(nodes: dict[str, NodeProgress]) -> list[str]:
    return [n for n, p in nodes.items() if p.status == PENDING]


def _check_timeout(timeout: float) -> float:
    if not timeout > 0:
        raise ValueError(f"a policy timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


@dataclass(frozen=True)
class DiscardOnTimeout(RequestPolicy):
    timeout: float
    bounds_wait = True

    def __post_init__(self) -> None:
        _check_timeout(self.timeout)

    def deadline(self, started: float, nodes: dict[str, NodeProgress]) -> float | None:
        return started + self.timeout

    def check(self, started: float, now: float, nodes: dict[str, NodeProgress]) -> Verdict | None:
        late = _pending(nodes)
        if not late or now < started + self.timeout:
            return None
        detail = f"no reply within {self.timeout:g} s (DiscardOnTimeout)"
        return Verdict(self, stop=False, nodes={n: ("timeout", detail) for n in late})


@dataclass(frozen=True)
class StopOnTimeout(RequestPolicy):
    timeout: float
    bounds_wait = True

    def __post_init__(self) -> None:
        _check_timeout(self.timeout)

    def deadline(self, started: float, nodes: dict[str, NodeProgress]) -> float | None:
        return started + self.timeout

    def check(self, started: float, now: float, nodes: dict[str, NodeProgress]) -> Verdict | None:
        late = _pending(nodes)
        if not late or now < started + self.timeout:
            return None
        detail = f"no reply within {self.timeout:g} s (StopOnTimeout)"
        return Verdict(self, stop=True, nodes={n: ("timeout", detail) for n in late})


@dataclass(frozen=True)
class DiscardOnDisconnect(RequestPolicy):
    """Drop a node once it has been offline for ``timeout`` seconds of the request; the others
    go on. A node back within that time stays in (a short network blip loses nothing)."""

    timeout: float = 10.0
    handles_disconnect = True
    _stops = False

    def __post_init__(self) -> None:
        if self.timeout < 0:
            raise ValueError(f"{type(self).__name__} timeout must be >= 0 seconds, got {self.timeout!r}")

    def deadline(self, started: float, nodes: dict[str, NodeProgress]) -> float | None:
        times = [p.offline_since + self.timeout for p in nodes.values()
                 if p.status == PENDING and p.offline_since is not None]
        return min(times) if times else None

    def check(self, started: float, now: float, nodes: dict[str, NodeProgress]) -> Verdict | None:
        gone = [n for n, p in nodes.items() if p.status == PENDING and p.offline_since is not None
                and now >= p.offline_since + self.timeout]
        if not gone:
            return None
        detail = f"disconnected for {self.timeout:g} s ({type(self).__name__})"
        return Verdict(self, stop=self._stops, nodes={n: ("disconnected", detail) for n in gone})


@dataclass(frozen=True)
class StopOnDisconnect(DiscardOnDisconnect):
    """A node offline for ``timeout`` seconds while the request waits for it stops the request."""

    timeout: float = 0.0
    _stops = True


@dataclass(frozen=True)
class StopOnError(RequestPolicy):
    def check(self, started: float, now: float, nodes: dict[str, NodeProgress]) -> Verdict | None:
        if any(p.status == ERROR for p in nodes.values()):
            return Verdict(self, stop=True)
        return None
