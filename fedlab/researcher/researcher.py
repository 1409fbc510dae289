"""The researcher's entry point: ``fedlab.Researcher``.

It binds the socket nodes dial into (through the transport's daemon thread), tracks which
nodes are online, and sends requests. Typical use in a notebook::

    with fedlab.Researcher("tcp://127.0.0.1:5555") as r:
        r.wait_for_nodes(3, timeout=30)
        r.nodes()                       # DataFrame: node_id, name, status, last_seen
        fds = r.search(["breast-cancer"])  # FederatedDataset, data-quality checked

When a researcher service runs for the address (``fedlab researcher start``: it holds the socket,
keys and node connections for every notebook of its user on this machine), the researcher attaches
to it instead of binding, so several kernels share the nodes and a kernel restart keeps them
connected; ``service="attach"`` insists on a service, ``service="own"`` binds in the kernel as
before (default ``"auto"``, or ``$FEDLAB_SERVICE``; see ``fedlab.researcher.service``).

With ``key=`` (the researcher's ``NAME.key_secret`` from ``fedlab keygen``) and ``allowlist=``
(one ``NODE_PUBLIC_KEY name`` line per node it accepts) every connection is encrypted and only
the listed nodes get in; ``$FEDLAB_KEY`` and ``$FEDLAB_ALLOWLIST`` supply them when the
arguments are left out, so a notebook runs unchanged. Without a key the researcher is
insecure (plain TCP, any node), for local demos, and logs a warning saying so. An encrypted
researcher sends large messages over its sealed bulk path (``bulk=``, docs/transport.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

import fedlab.training.messages  # noqa: F401 -- registers the training message types for decoding
from fedlab.errors import (
    FedlabConfigError,
    FedlabDatasetError,
    FedlabError,
    FedlabNodeError,
    FedlabTimeoutError,
    FedlabTransportError,
)
from fedlab.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DatasetInfo,
    DatasetListReply,
    DatasetListRequest,
    DatasetSearchReply,
    DatasetSearchRequest,
    PingRequest,
    to_builtins,
)
from fedlab.researcher.fa_result import FAResult

if TYPE_CHECKING:
    from fedlab.researcher.experiment import Experiment
    from fedlab.researcher.preprocess import Pipeline
from fedlab.researcher.federated_dataset import FederatedDataset, check_data_quality
from fedlab.researcher.policies import DiscardOnTimeout, RequestPolicy
from fedlab.researcher.requests import FederatedRequest, Requests
from fedlab.transport import OFFLINE, ZmqResearcherTransport
from fedlab.transport.bulk_link import split_tcp
from fedlab.transport.bulk_researcher import BULK_ENV
from fedlab.transport.keys import Allowlist, KeyPair, load_keypair

__all__ = ["Researcher", "check_bulk"]

log = logging.getLogger("fedlab.researcher")
KEY_ENV = "FEDLAB_KEY"
ALLOWLIST_ENV = "FEDLAB_ALLOWLIST"
INSECURE_WARNING = (
    "INSECURE: researcher at %s runs without a key: no encryption and no authentication, so any program that "
    "can reach this port can join as a node and anyone on the network can read the traffic. For local demos "
    "only; pass key= and allowlist= (or set FEDLAB_KEY and FEDLAB_ALLOWLIST) for real data"
)


def security(key: str | os.PathLike[str] | None, allowlist: str | os.PathLike[str] | None
             ) -> tuple[KeyPair | None, Allowlist | None]:
    """The key pair and allowlist from the arguments or, where left out, the environment."""
    key = key if key is not None else (os.environ.get(KEY_ENV) or None)
    allowlist = allowlist if allowlist is not None else (os.environ.get(ALLOWLIST_ENV) or None)
    if key is None and allowlist is None:
        return None, None
    if key is None or allowlist is None:
        given, missing = ("a key", "an allowlist") if key is not None else ("an allowlist", "a key")
        raise FedlabConfigError(
            f"a researcher with {given} needs {missing} too: key= is this researcher's NAME.key_secret "
            f"(${KEY_ENV}), allowlist= the file of node public keys it accepts (${ALLOWLIST_ENV})"
        )
    return load_keypair(key), Allowlist(allowlist)


_OFF_WORDS = {"off", "false", "no", "0"}
_BULK_WORDS = _OFF_WORDS | {"on", "true", "yes", "1"}


def check_bulk(bulk: bool | str | None) -> None:
    """Raise unless ``bulk`` is a bulk setting: None, True/False, on/off, or ``tcp://HOST:PORT``."""
    if bulk is None or isinstance(bulk, bool):
        return
    if isinstance(bulk, str) and (bulk.strip().lower() in _BULK_WORDS or split_tcp(bulk) is not None):
        return
    raise FedlabConfigError(
        f"bulk={bulk!r} is not a bulk setting: give True (or 'on': the bulk port is the control port + 1), "
        f"False (or 'off': every message over CURVE), 'tcp://HOST:PORT' (the address the bulk port listens on), "
        f"or None (${BULK_ENV}, else on)")


class Researcher:
    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        *,
        heartbeat_interval: float = 1.0,
        default_timeout: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        transport: Any = None,
        start: bool = True,
        key: str | os.PathLike[str] | None = None,
        allowlist: str | os.PathLike[str] | None = None,
        service: str | None = None,
        bulk: bool | str | None = None,
    ) -> None:
        """``transport`` replaces the ZeroMQ transport (the in-memory twin in unit tests).

        ``key`` is this researcher's secret key file (``NAME.key_secret`` from ``fedlab keygen``)
        and ``allowlist`` the file of node public keys it accepts; both default to
        ``$FEDLAB_KEY`` and ``$FEDLAB_ALLOWLIST``. With neither, the researcher is insecure.

        ``service``: ``"auto"`` (default, or ``$FEDLAB_SERVICE``) attaches to the researcher service
        of this address's port when one runs, else binds the address here; ``"attach"`` only
        attaches (an error when no service runs); ``"own"`` always binds here. Attached, the
        service's key and allowlist apply; ``key``/``allowlist``, when given, must be the service's.

        ``bulk``: the sealed bulk path that carries an encrypted researcher's large messages beside
        CURVE (docs/transport.md). None (the default) takes ``$FEDLAB_BULK``, else on; True (``"on"``)
        listens on the control port + 1; ``"tcp://HOST:PORT"`` listens there (a port the nodes can
        reach); False (``"off"``) keeps every message on CURVE. It has no effect on an insecure
        researcher. Attached to a researcher service, the service's setting is in force (its
        ``--bulk``, else its ``$FEDLAB_BULK``): a ``bulk`` given here is then logged as not applied.
        """
        from fedlab.researcher.service import attach_transport

        check_bulk(bulk)
        self.address = address
        self.service = None
        if transport is None:
            transport = attach_transport(address, service, key, allowlist, bulk=bulk)
            if transport is not None:
                self.service = transport.service
        if transport is None:
            keypair, nodes_allowed = security(key, allowlist)
            if keypair is None:
                log.warning(INSECURE_WARNING, address)
                if bulk is not None and bulk is not False and str(bulk).strip().lower() not in _OFF_WORDS:
                    log.warning("bulk=%r has no effect: the bulk path is for encrypted researchers (key= and "
                                "allowlist=); this insecure one sends every message over its one socket", bulk)
            else:
                log.info("researcher at %s: encrypted (CURVE), public key %s, %d node key(s) allowed by %s",
                         address, keypair.public, len(nodes_allowed or ()), getattr(nodes_allowed, "path", ""))
            transport = ZmqResearcherTransport(address, heartbeat_interval=heartbeat_interval,
                                               max_message_bytes=max_message_bytes, key=keypair,
                                               allowlist=nodes_allowed, bulk=bulk)
        self._transport = transport
        self.requests = Requests(self._transport, default_timeout=default_timeout)
        self._started = False
        if start:
            self.start()

    @property
    def public_key(self) -> str | None:
        """This researcher's CURVE public key (what nodes are given), or None when insecure."""
        if self.service is not None:
            return getattr(self._transport, "public_key", None)
        key = getattr(self._transport, "key", None)
        return key.public if key is not None else None

    @property
    def attached(self) -> bool:
        """Whether this researcher works through a researcher service (else it binds the address itself)."""
        return self.service is not None

    @property
    def id(self) -> str:
        return str(self._transport.researcher_id)

    def start(self) -> Researcher:
        if not self._started:
            try:
                self._transport.start(self.requests.on_message)
            except FedlabTransportError as exc:
                from fedlab.researcher.service import bind_hint

                hint = bind_hint(self.address) if self.service is None else ""
                if not hint:
                    raise
                raise FedlabTransportError(f"{exc} {hint}") from None
            self._started = True
        return self

    def close(self) -> None:
        if self._started:
            self._transport.close()
            self._started = False

    def __enter__(self) -> Researcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        via = f", through the researcher service (pid {self.service.pid})" if self.service is not None else ""
        try:
            online = f"{sum(r.status != OFFLINE for r in self._transport.nodes())} nodes online"
        except FedlabError:
            online = "not connected"
        return f"Researcher({self.id}, {self.address}{via}, {online})"

    # -- nodes -------------------------------------------------------------------------------
    def online_node_ids(self) -> list[str]:
        return [r.node_id for r in self._transport.nodes() if r.status != OFFLINE]

    def wait_for_nodes(self, n: int, timeout: float = 30.0) -> list[str]:
        """Wait until ``n`` nodes are online; return their ids. Raise if the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            online = self.online_node_ids()
            if len(online) >= n:
                return online
            if time.monotonic() >= deadline:
                raise FedlabTimeoutError(
                    f"only {len(online)} of {n} nodes came online within {timeout:g} s at {self.address}; "
                    "check that the nodes are started (`fedlab node start DIR`) and that their "
                    "researcher address matches this one"
                )
            time.sleep(0.02)

    def nodes(self) -> pd.DataFrame:
        """One row per node ever seen: node_id, name, status (online/busy/offline), last_seen."""
        rows = [{"node_id": r.node_id, "name": r.name, "status": r.status,
                 "last_seen": pd.Timestamp(r.last_seen, unit="s", tz="UTC")}
                for r in self._transport.nodes()]
        return pd.DataFrame(rows, columns=["node_id", "name", "status", "last_seen"])

    def _names(self) -> dict[str, str]:
        return {r.node_id: r.name for r in self._transport.nodes()}

    def ping(self, nodes: Iterable[str] | None = None, timeout: float = 5.0) -> FederatedRequest:
        return self.requests.send(PingRequest(), nodes, [DiscardOnTimeout(timeout)]).wait()

    # -- datasets ----------------------------------------------------------------------------
    def search(
        self,
        tags: str | Sequence[str],
        *,
        nodes: Iterable[str] | None = None,
        timeout: float = 10.0,
        policies: Sequence[RequestPolicy] | None = None,
    ) -> FederatedDataset:
        """Find, on each node, the dataset carrying all ``tags``; check the nodes agree."""
        tag_list = [tags] if isinstance(tags, str) else list(tags)
        if not tag_list:
            raise FedlabDatasetError("search needs at least one tag, e.g. researcher.search(['cancer'])")
        request = self.requests.send(DatasetSearchRequest(tags=tag_list), nodes,
                                     policies or [DiscardOnTimeout(timeout)]).wait()
        names = self._names()
        found: dict[str, DatasetInfo] = {}
        for node_id, env in request.replies().items():
            assert isinstance(env.content, DatasetSearchReply)
            matches = env.content.datasets
            if len(matches) > 1:
                raise FedlabDatasetError(
                    f"node {names.get(node_id, node_id)} ({node_id}) holds {len(matches)} datasets tagged "
                    f"{tag_list}: {[d.name for d in matches]}; add a tag that picks one of them"
                )
            if matches:
                found[node_id] = matches[0]
        self._raise_node_errors(request, "search")
        missing = {n: str(m) for n, m in request.missing().items()}
        for node_id, why in missing.items():
            log.warning("node %s did not answer the search: %s", names.get(node_id, node_id), why)
        if not found:
            asked = len(request.node_ids)
            raise FedlabDatasetError(
                f"no node holds a dataset tagged {tag_list} (asked {asked} online nodes"
                + (f"; no answer from {sorted(missing)}" if missing else "")
                + "). Check the tags with researcher.list_datasets()."
            )
        check_data_quality(found)
        return FederatedDataset(found, node_names=names, missing=missing)

    def list_datasets(self, *, nodes: Iterable[str] | None = None, timeout: float = 10.0) -> pd.DataFrame:
        """Every dataset on every online node, one row each (never the path on the node)."""
        request = self.requests.send(DatasetListRequest(), nodes, [DiscardOnTimeout(timeout)]).wait()
        self._raise_node_errors(request, "dataset list")
        names = self._names()
        rows = []
        for node_id, env in request.replies().items():
            assert isinstance(env.content, DatasetListReply)
            for info in env.content.datasets:
                row = {"node_id": node_id, "node": names.get(node_id, node_id)}
                row.update(to_builtins(info))
                rows.append(row)
        return pd.DataFrame(rows)

    # -- analytics ---------------------------------------------------------------------------
    def stats(
        self,
        federated_dataset: FederatedDataset,
        stats: Sequence[str] = ("count", "mean", "std"),
        columns: Sequence[str] | None = None,
        stats_args: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        bins: int | Sequence[float] | None = None,
        quantiles: Sequence[float] = (0.25, 0.5, 0.75),
        crosstab: Sequence[str] = (),
        timeout: float = 60.0,
        secagg: bool = False,
        secagg_threshold: int | None = None,
        epsilon: float | None = None,
        delta: float = 0.0,
        mechanism: str = "laplace",
        bounds: Mapping[str, Sequence[float]] | None = None,
        categories: Mapping[str, Sequence[Any]] | None = None,
        quantile_bins: int = 32,
    ) -> FAResult:
        """Federated statistics over ``federated_dataset``, equal to those of the pooled rows.

        ``stats`` apply to every selected column (``columns``, default all); ``stats_args`` adds
        per-column statistics with arguments, e.g. ``{"age": {"histogram": {"edges": [0, 40, 60, 100]}}}``;
        ``bins`` is the default histogram (a bin count over the federated range, or edges).
        ``secagg=True``: securely aggregated, the researcher receives only the sum of the nodes'
        figures (``secagg_threshold`` nodes must remain, default a majority; see ``secure_stats``).

        ``epsilon``: differentially private, in one round; each node spends ``epsilon`` (and ``delta``, with
        ``mechanism="gaussian"``) of this researcher's budget on its dataset. Sums, means, variances and
        quantiles need clamp ``bounds`` per column (``{"age": (0, 120)}``) unless the node's operator declared
        them; value counts and crosstabs need the public ``categories`` of a column. ``quantile_bins`` is the
        grid DP quantiles are read from. ``result.privacy()`` gives each node's spending and remaining budget,
        ``result.noise()`` the noise scale of every figure (see ``dp_stats``).
        """
        from fedlab.researcher.fa_stats import federated_stats

        if epsilon is not None:
            from fedlab.researcher.dp_stats import dp_query, dp_stats

            if secagg:
                raise FedlabError("a request cannot be both differentially private (epsilon=...) and securely "
                                  "aggregated (secagg=True) yet: choose one")
            query = dp_query(epsilon, delta=delta, mechanism=mechanism, bounds=bounds, categories=categories,
                             quantile_bins=quantile_bins)
            return dp_stats(federated_dataset, researcher_id=self.id, requests=self.requests, stats=stats,
                            query=query, columns=columns, stats_args=stats_args, bins=bins, quantiles=quantiles,
                            crosstab=crosstab, node_names=self._names(), timeout=timeout)

        if secagg:
            from fedlab.researcher.secure_stats import secure_stats

            return secure_stats(federated_dataset, researcher_id=self.id, requests=self.requests, stats=stats,
                                columns=columns, stats_args=stats_args, bins=bins, crosstab=crosstab,
                                node_names=self._names(), timeout=timeout, threshold=secagg_threshold)

        return federated_stats(federated_dataset, researcher_id=self.id, requests=self.requests, stats=stats,
                               columns=columns, stats_args=stats_args, bins=bins, quantiles=quantiles,
                               crosstab=crosstab, node_names=self._names(), timeout=timeout)

    def privacy_budget(self, federated_dataset: FederatedDataset, *, timeout: float = 30.0) -> pd.DataFrame:
        """Per node: this researcher's differential-privacy budget on the dataset's source, as the node's
        own ledger says (spent, remaining, the operator's budget, whether the node requires DP)."""
        from fedlab.researcher.dp_budget import privacy_budget

        return privacy_budget(federated_dataset, researcher_id=self.id, requests=self.requests,
                              node_names=self._names(), timeout=timeout)

    def preprocess(self, federated_dataset: FederatedDataset, *, timeout: float = 60.0) -> Pipeline:
        """A preprocessing pipeline over ``federated_dataset``: chain steps, then ``.apply(...)``."""
        from fedlab.researcher.preprocess import Pipeline

        return Pipeline(federated_dataset, researcher_id=self.id, requests=self.requests,
                        node_names=self._names(), timeout=timeout)

    # -- training ----------------------------------------------------------------------------
    def experiment(self, tags: str | Sequence[str], training_plan: type | str, **kwargs: Any) -> Experiment:
        """``fedlab.Experiment(self, tags, training_plan, **kwargs)``: federated training on the
        nodes holding a dataset tagged ``tags`` (see ``Experiment`` for the arguments)."""
        from fedlab.researcher.experiment import Experiment

        return Experiment(self, tags, training_plan, **kwargs)

    @staticmethod
    def _raise_node_errors(request: FederatedRequest, what: str) -> None:
        errors = request.errors()
        if errors:
            detail = "; ".join(f"{n}: [{e.code}] {e.message}" for n, e in errors.items())
            raise FedlabNodeError(f"{len(errors)} node(s) failed the {what}: {detail}",
                                  {n: (e.code, e.message) for n, e in errors.items()})
