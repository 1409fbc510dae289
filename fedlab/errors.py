"""The one exception tree of fedlab.

Every error fedlab raises to a user derives from :class:`FedlabError`; zmq, msgspec and
sqlite errors are translated where they happen (the transport edge, the decoder, the
registry) and never reach a user raw::

    FedlabError
    ├── FedlabConfigError          a node directory, config file or argument is wrong
    ├── FedlabDatasetError         a dataset cannot be registered, found or read
    ├── FedlabDataQualityError     datasets found on several nodes do not agree
    ├── FedlabProtocolError        a message could not be decoded or validated
    │   └── FedlabVersionError     the peer speaks an incompatible protocol version
    ├── FedlabTransportError       a socket could not be bound, connected or used
    │   └── FedlabTimeoutError     a wait reached its deadline
    ├── FedlabNodeError            a node answered with an error reply
    ├── FedlabRequestStopped       a request policy stopped a request
    ├── FedlabApprovalError        a training plan is not approved on a node
    ├── FedlabTrainingError        a training plan failed or its arguments are wrong
    ├── FedlabDisclosureError      a node's disclosure rules refused a result
    └── FedlabSecaggError          a secure aggregation step failed or was refused

Each class carries a message written for the person who will read it: what was wrong and
what to do about it.
"""

from __future__ import annotations

__all__ = [
    "FedlabApprovalError",
    "FedlabBudgetError",
    "FedlabConfigError",
    "FedlabDataQualityError",
    "FedlabDatasetError",
    "FedlabDisclosureError",
    "FedlabError",
    "FedlabNodeError",
    "FedlabProtocolError",
    "FedlabRequestStopped",
    "FedlabSecaggError",
    "FedlabTimeoutError",
    "FedlabTrainingError",
    "FedlabTransportError",
    "FedlabVersionError",
]


class FedlabError(Exception):
    """Root of every error fedlab raises on purpose."""


class FedlabConfigError(FedlabError):
    """A node directory, configuration file or command-line argument is wrong."""


class FedlabDatasetError(FedlabError):
    """A dataset cannot be registered, found or read."""


class FedlabDataQualityError(FedlabError):
    """Datasets found on several nodes do not have the same structure."""


class FedlabProtocolError(FedlabError):
    """A message could not be decoded or failed validation.

    ``code`` is a short machine-readable reason (``"malformed"``, ``"invalid_field"``,
    ``"too_large"``, ``"unknown_type"``...); ``field`` names the offending field when known.
    """

    def __init__(self, message: str, *, code: str = "malformed", field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


class FedlabVersionError(FedlabProtocolError):
    """The peer speaks a protocol version this side cannot understand."""

    def __init__(self, message: str, *, code: str = "protocol_version", field: str | None = None) -> None:
        super().__init__(message, code=code, field=field)


class FedlabTransportError(FedlabError):
    """A socket could not be bound, connected or used."""


class FedlabTimeoutError(FedlabTransportError):
    """A wait reached its deadline."""


class FedlabNodeError(FedlabError):
    """One or more nodes answered with an error reply.

    ``errors`` maps node id to ``(code, message)``.
    """

    def __init__(self, message: str, errors: dict[str, tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.errors = dict(errors or {})


class FedlabRequestStopped(FedlabError):
    """A request policy (StopOnTimeout, StopOnDisconnect, StopOnError) stopped a request."""


class FedlabApprovalError(FedlabError):
    """A training plan is not approved on a node."""


class FedlabDisclosureError(FedlabError):
    """A node's disclosure rules refused to release a result."""


class FedlabBudgetError(FedlabDisclosureError):
    """A node refused a differentially private answer because it would go over this researcher's
    privacy budget on the dataset (the message names the ε and δ that remain)."""


class FedlabTrainingError(FedlabError):
    """A training plan raised, could not be loaded, or was given arguments it cannot use.

    The message carries the plan's own error (its exception type, text and the line of the
    plan that raised) so the researcher can fix the plan without access to the node.
    """


class FedlabSecaggError(FedlabError):
    """A secure aggregation step failed or was refused: a share that does not decrypt, a session
    replayed or asked twice, too few nodes left to unmask the sum (the message says how many
    answered and how many were needed)."""
