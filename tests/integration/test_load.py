"""Load: 100 analytics requests in flight at once, from two threads sharing one Researcher, to
three real nodes holding different parts of the breast cancer data.

Nodes dial exactly one researcher, so two researchers' threads talking to the same nodes means
two threads of one ``Researcher`` (the notebook's kernel and a background job, say). Every
request asks something no other request asks (its own column and statistic, or its own
thresholds), and every merged answer must equal pandas on the pooled rows: a reply handed to
the wrong request would name the wrong column or carry the wrong counts.
"""

from __future__ import annotations

import threading

import pandas as pd
import pytest
from federation import NodeProcess, breast_cancer_splits

from fedlab import DiscardOnTimeout, Researcher
from fedlab.analytics.merge import merge_numeric
from fedlab.analytics.messages import FAReply, FARequest
from fedlab.node.registry import DatasetRegistry
from fedlab.privacy.cuts import snap
from fedlab.researcher.requests import FederatedRequest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

N_REQUESTS = 100
N_THREADS = 2


def question(i: int, columns: list[str], pooled: pd.DataFrame) -> tuple[str, str, list[float]]:
    """Request ``i``: a column, a kind of statistic and, for counts below, its own thresholds."""
    column = columns[i % len(columns)]
    kind = ("moments", "below", "sum_var", "below")[i // len(columns) % 4]
    values = pooled[column]
    thresholds: list[float] = []
    if kind == "below":  # thresholds unique to this request: quantiles shifted by its index
        qs = (0.25, 0.5, 0.75) if i // len(columns) == 1 else (0.2, 0.6, 0.9)
        thresholds = [float(values.quantile(q)) for q in qs]
    return column, kind, thresholds


def check(i: int, request: FederatedRequest, ask: tuple[str, str, list[float]], pooled: pd.DataFrame,
          dataset_ids: dict[str, str], frames: dict[str, pd.DataFrame]) -> str | None:
    """None if request ``i`` got the right answer from every node, else what was wrong."""
    column, kind, thresholds = ask
    replies = request.replies()
    if set(replies) != set(dataset_ids) or request.errors() or request.missing():
        return f"request {i}: replies from {sorted(replies)}, errors {request.errors()}, missing {request.missing()}"
    for node_id, env in replies.items():
        content = env.content
        if not isinstance(content, FAReply) or content.dataset_id != dataset_ids[node_id] \
                or list(content.numeric) != [column]:
            return f"request {i} ({column}) got a reply about something else from {node_id}: {content}"
    merged = merge_numeric({n: env.content.numeric[column] for n, env in replies.items()})
    values = pooled[column]
    if merged.count != values.count():
        return f"request {i} ({column}): count {merged.count} != {values.count()}"
    if kind == "moments" and (merged.mean != pytest.approx(values.mean(), rel=1e-9)
                              or merged.std != pytest.approx(values.std(), rel=1e-9)):
        return f"request {i} ({column}): mean/std {merged.mean}/{merged.std} != {values.mean()}/{values.std()}"
    if kind == "sum_var" and (merged.sum != pytest.approx(values.sum(), rel=1e-9)
                              or merged.var != pytest.approx(values.var(), rel=1e-9)):
        return f"request {i} ({column}): sum/var {merged.sum}/{merged.var} != {values.sum()}/{values.var()}"
    if kind == "below":
        for node_id, env in replies.items():
            part = env.content.numeric[column]
            if part.below is None or part.resolution is None:
                return f"request {i} ({column}): {node_id} sent no counts below its thresholds"
            own = frames[node_id][column]
            expected = [None if got is None else int((own <= snap(t, part.resolution)).sum())
                        for t, got in zip(thresholds, part.below, strict=True)]
            if part.below != expected:
                return f"request {i} ({column}): {node_id}: below {thresholds} = {part.below} != {expected}"
    return None


def test_100_concurrent_requests_from_two_threads_all_answer_correctly(tmp_path, address):
    parts = breast_cancer_splits(3)
    pooled = pd.concat(parts, ignore_index=True)
    columns = [c for c in pooled.columns if c != "target"]
    nodes = [NodeProcess.create(tmp_path, f"site-{k}", address, frame=part, heartbeat=1.0)
             for k, part in enumerate(parts)]
    dataset_ids = {n.node_id: DatasetRegistry(n.directory / "node.db").list()[0].dataset_id for n in nodes}
    frames = {n.node_id: part for n, part in zip(nodes, parts, strict=True)}
    asks = [question(i, columns, pooled) for i in range(N_REQUESTS)]
    assert len({(c, k, tuple(t)) for c, k, t in asks}) == N_REQUESTS  # each asks something of its own
    try:
        with Researcher(address, heartbeat_interval=1.0) as researcher:
            for node in nodes:
                node.start()
            researcher.wait_for_nodes(3, timeout=60)
            requests: dict[int, FederatedRequest] = {}
            problems: list[str] = []
            go = threading.Barrier(N_THREADS)

            def fire(first: int) -> None:
                """Send this thread's share without waiting, then check each answer."""
                mine = range(first, N_REQUESTS, N_THREADS)
                go.wait(timeout=30)
                for i in mine:
                    column, _, thresholds = asks[i]
                    message = {nid: FARequest(dataset_id=did, stats=["count", "mean", "std", "sum", "var"],
                                              columns=[column],
                                              thresholds={column: thresholds} if thresholds else {})
                               for nid, did in dataset_ids.items()}
                    requests[i] = researcher.requests.send(message, policies=[DiscardOnTimeout(120)])
                for i in mine:
                    with requests[i] as request:
                        problem = check(i, request, asks[i], pooled, dataset_ids, frames)
                    if problem:
                        problems.append(problem)

            threads = [threading.Thread(target=fire, args=(k,), name=f"researcher-thread-{k}")
                       for k in range(N_THREADS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(240)
            assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
            assert len(requests) == N_REQUESTS
            assert not problems, "\n".join(problems[:5])
            # 300 replies, each matched by id: every msg_id was distinct and none is left pending
            assert len({mid for r in requests.values() for mid in r.msg_ids.values()}) == N_REQUESTS * 3
            assert researcher.requests.pending_count() == 0
    finally:
        for node in nodes:
            node.stop()
