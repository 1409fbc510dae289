"""``researcher.stats(..., secagg=True)``: federated statistics of which the researcher sees only the sum.

Three requests instead of one (see :mod:`fedlab.secagg.fa_layout` for what each node sends):

1. the layout request: every node answers its reply's *skeleton*, the names of the columns, levels
   and cells it would answer, which it suppressed or refused, and no figure;
2. a secure aggregation session over the nodes that answered (``SecureSum.setup``);
3. the masked request: every node answers its figures in the common layout, encoded exactly
   (counts as integers, float64 figures to 2**-64) and masked; the researcher adds the masked
   vectors, unmasks the sum and rebuilds one reply from it, which the usual merge turns into the
   pooled statistics (moments through the Chan terms, with exact arithmetic).

Each node applies its disclosure rules to its own figures before masking, exactly as in the clear;
a threshold on the *global* count is the researcher's to judge from the sum. What cannot be summed
(min, max, quantiles, the median, histograms given as a bin count, which need the min and max
first) is refused before anything is sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from fedlab.analytics.messages import FAReply, FASecure
from fedlab.errors import FedlabSecaggError
from fedlab.researcher.fa_result import FAResult, contributors
from fedlab.researcher.fa_stats import _merge, _note_allowances, _plan, asked_statistics
from fedlab.researcher.federated_dataset import FederatedDataset
from fedlab.researcher.jobs import FARequestJob
from fedlab.researcher.policies import DiscardOnTimeout
from fedlab.researcher.requests import Requests
from fedlab.researcher.secure_sum import SecureSum
from fedlab.secagg.fa_layout import SECURE_SUM, check_secure_request, layout_of
from fedlab.secagg.fa_rebuild import rebuild_replies
from fedlab.secagg.fixed_point import decode_exact_sum

__all__ = ["secure_stats"]

_NOT_SUMMABLE = ("min", "max", "median", "quantiles")
LIMBS = 8  # fixed_point.encode_exact's default: 256-bit values


def secure_stats(
    fds: FederatedDataset,
    *,
    researcher_id: str,
    requests: Requests,
    stats: Sequence[str],
    columns: Sequence[str] | None = None,
    stats_args: Mapping[str, Mapping[str, Any]] | None = None,
    bins: int | Sequence[float] | None = None,
    crosstab: Sequence[str] = (),
    node_names: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    threshold: int | None = None,
) -> FAResult:
    names, table = asked_statistics(stats, stats_args, crosstab)
    cannot = sorted(set(names) & set(_NOT_SUMMABLE))
    if cannot:
        raise FedlabSecaggError(
            f"{cannot} cannot be computed under secure aggregation (they are no sums); ask for them without "
            "secagg=True, or leave them out")
    per_column, bin_counts = _plan(fds, list(stats) + table, columns, stats_args, bins)
    if bin_counts:
        raise FedlabSecaggError(
            f"histograms of {sorted(bin_counts)} were asked as a number of bins, which needs each node's min and "
            "max first; under secure aggregation give the edges: bins=[0, 20, 40, 60, 80, 100]")
    policies = [DiscardOnTimeout(timeout)]

    def job(nodes: Sequence[str], secagg: Mapping[str, FASecure]) -> FARequestJob:
        return FARequestJob(None, None, fds, per_column, None, researcher_id=researcher_id, requests=requests,
                            nodes=nodes, policies=policies, crosstab=crosstab if table else (),
                            raise_on_error=False, table_stats=table, secagg=secagg)

    first = job(fds.node_ids(), {n: FASecure(phase="layout") for n in fds.node_ids()})
    check_secure_request(first._message_for(fds.node_ids()[0]))
    skeletons = first.execute()
    result = FAResult(stats=list(dict.fromkeys(names)), quantile_levels=[],
                      node_names={**(node_names or {}), SECURE_SUM: "the nodes together"}, replies={})
    _note_errors(result, first)
    secure = SecureSum(requests, [n for n in fds.node_ids() if n in skeletons], purpose="analytics",
                       threshold=threshold, timeout=timeout)
    ready = secure.setup()
    layout = layout_of({n: skeletons[n] for n in ready})
    encoded = msgspec.msgpack.encode(layout)
    second = job(ready, {n: FASecure(phase="masked", input=secure.input_for(n), layout=encoded) for n in ready})
    replies = second.execute()
    _note_errors(result, second)
    total: np.ndarray | None = None
    survivors = []
    for node_id, reply in replies.items():
        vector = _masked(node_id, reply, total)
        total = vector.copy() if total is None else np.add(total, vector, out=total)
        survivors.append(node_id)
    if total is None:
        raise FedlabSecaggError(f"no node answered the masked request ({result.failed or result.missing})")
    sums = decode_exact_sum(secure.unmask(total, survivors), total.size // LIMBS, limbs=LIMBS)
    kept = {n: skeletons[n] for n in ready if n in survivors}
    # the summed figures under SECURE_SUM, and per node a figure-free reply with its marks (withheld
    # cells), so the merge reports a withheld cell as the plain merge does: a lower bound, naming the node
    result.replies = rebuild_replies(layout, sums, kept)
    _merge(result, per_column)
    result.replies = kept  # who answered, what they refused: no figure (the skeletons have none)
    result.contributors = {c: contributors(kept, c) for c in per_column}
    _note_allowances(result, kept)
    for node_id, why in secure.left.items():
        result.failed.setdefault(node_id, f"secure aggregation: {why}")
    result.secure = {"session": secure.session_id, "threshold": secure.threshold, "survivors": survivors,
                     "dropped": [n for n in ready if n not in survivors]}
    return result


def _masked(node_id: str, reply: FAReply, total: np.ndarray | None) -> np.ndarray:
    if reply.masked is None or len(reply.masked) % (8 * LIMBS) or (
            total is not None and len(reply.masked) != total.size * 8):
        raise FedlabSecaggError(f"node {node_id} did not answer the masked request with a masked vector of the "
                                "layout's length; is it running a fedlab version with secure aggregation?")
    return np.frombuffer(reply.masked, np.uint64)


def _note_errors(result: FAResult, job: FARequestJob) -> None:
    for node_id, error in job.errors.items():
        target = result.refused if error.code in ("disclosure_refused", "secagg_refused") else result.failed
        target.setdefault(node_id, f"[{error.code}] {error.message}")
    for node_id, why in job.missing.items():
        result.missing.setdefault(node_id, str(why))
