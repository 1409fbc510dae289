"""BudgetPanel: each node's differential-privacy budget, as a bar of the ε spent against the node's budget.

The budget belongs to the node: its operator sets ``epsilon_budget`` and ``delta`` in the node's
``[privacy]`` table, for each researcher and each source dataset, and the node's ledger records every
spend. The panel only shows what the nodes said last, one row per node and dataset: a badge saying
whether the node requires DP, a bar of ε spent out of the budget (orange when less than a fifth is
left, red when nothing is), and the numbers (ε and δ spent and left, how many answers spent them).

``update(...)`` takes any of what the nodes report:

- the frame of ``researcher.privacy_budget(fds)`` (one row per node, from the node's own ledger; a node
  that did not answer keeps its last figures and shows why);
- a mapping ``{node name: DPBalance or DPSpent}``: what a DP statistics answer (``FAResult.dp``) or a DP
  training round (``TrainReply.dp``) reported, the ``DPSpent`` adding what that one answer cost;
- an ``FAResult`` of a DP request (its ``dp`` and ``node_names``).

``dataset`` names the dataset of the figures (one name, or one per node name): a node keeps one budget
per dataset, so each gets its own row. A derived dataset spends from its source's budget, which the
researcher cannot see; its row shows what the node said for it.

Like the progress panel, ``update`` sets the widgets' traits from whichever thread calls it (a training
round reports on the researcher's thread), under a lock, each row's widgets batched with ``hold_sync``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ipywidgets as w
import pandas as pd

from fedlab.protocol.dp_messages import DPBalance, DPSpent

__all__ = ["BADGE_COLOURS", "BudgetPanel", "BudgetRow", "bar_style"]

BADGE_COLOURS = {"DP required": "red", "DP optional": "gray"}
LOW_FRACTION = 0.2  # orange below a fifth of the budget left
FRAME_COLUMNS = ["node", "dataset", "epsilon_spent", "epsilon_remaining", "epsilon_budget", "delta_spent",
                 "delta_remaining", "delta_budget", "require_dp", "spends", "status"]


def _num(value: float) -> str:
    return f"{value:.3g}"


def bar_style(balance: DPBalance) -> str:
    """"danger" when no ε is left, "warning" when less than a fifth is, "info" otherwise."""
    if balance.epsilon_remaining <= 0:
        return "danger"
    if balance.epsilon_budget > 0 and balance.epsilon_remaining < LOW_FRACTION * balance.epsilon_budget:
        return "warning"
    return "info"


@dataclass
class _Known:
    balance: DPBalance | None = None
    status: str = "no answer yet"


class BudgetRow(w.HBox):
    """name · DP badge · bar of ε spent out of the budget · numbers · the last answer or status"""

    def __init__(self, label: str) -> None:
        self.name = w.Label(label, layout=w.Layout(width="220px"))
        self.badge = w.Label("", layout=w.Layout(width="100px"))
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, layout=w.Layout(width="220px"))
        self.numbers = w.Label("", layout=w.Layout(width="330px"))
        self.last = w.Label("", layout=w.Layout(width="auto"))
        super().__init__([self.name, self.badge, self.bar, self.numbers, self.last])

    def parts(self) -> tuple[w.Widget, ...]:
        return (self.badge, self.bar, self.numbers, self.last)

    def show(self, balance: DPBalance) -> None:
        badge = "DP required" if balance.require_dp else "DP optional"
        self.badge.value = badge
        self.badge.style.text_color = BADGE_COLOURS[badge]
        self.badge.style.font_weight = "bold" if balance.require_dp else "normal"
        budget, spent = float(balance.epsilon_budget), float(balance.epsilon_spent)
        # a zero budget (DP refused) shows as a full red bar; the bar never runs past its end
        self.bar.max = budget if budget > 0 else 1.0
        self.bar.value = min(spent, budget) if budget > 0 else 1.0
        self.bar.bar_style = bar_style(balance)
        self.bar.tooltip = f"epsilon {_num(spent)} of {_num(budget)} spent"
        spends = f"{balance.n_spends} spend{'s' if balance.n_spends != 1 else ''}"
        self.numbers.value = (f"ε {_num(spent)} / {_num(budget)} spent, {_num(balance.epsilon_remaining)} left · "
                              f"δ {balance.delta_spent:.2g} / {balance.delta_budget:.2g} · {spends}")

    def show_status(self, status: str, *, failed: bool) -> None:
        self.last.value = status
        self.last.tooltip = status  # a node's reason may be longer than the label
        self.last.style.text_color = "red" if failed else None


class BudgetPanel(w.VBox):
    """Per node and dataset: this researcher's DP budget there; ``update`` from any report of the nodes."""

    def __init__(self, title: str = "privacy budget") -> None:
        self.title = title
        self.header = w.Label(f"{title}: no DP answer yet")
        self.rows: dict[tuple[str, str], BudgetRow] = {}
        self.known: dict[tuple[str, str], _Known] = {}
        super().__init__([self.header])
        self.updates = 0
        self._lock = threading.RLock()

    # -- input -----------------------------------------------------------------------------------
    def update(self, source: Any, *, dataset: str | Mapping[str, str] | None = None) -> None:
        """Show what the nodes reported: a ``privacy_budget()`` frame, ``{node: DPBalance | DPSpent}``,
        or an ``FAResult`` of a DP request (see the module's docstring)."""
        entries = list(_entries(source))
        with self._lock:
            self.updates += 1
            added = False
            for node, reported, status in entries:
                label = dataset.get(node, "") if isinstance(dataset, Mapping) else (dataset or "")
                key = (node, label)
                if key not in self.rows:
                    self.rows[key] = BudgetRow(f"{node} · {label}" if label else node)
                    self.known[key] = _Known()
                    added = True
                self._show(key, reported, status)
            if added:
                self.children = (self.header, *self.rows.values())
            self._header()

    def _show(self, key: tuple[str, str], reported: DPBalance | DPSpent | None, status: str) -> None:
        row, known = self.rows[key], self.known[key]
        with contextlib.ExitStack() as stack:
            for part in row.parts():
                stack.enter_context(part.hold_sync())
            if reported is None:  # the node did not answer: its last figures stay, with the reason
                known.status = status
                stale = " (figures from its last answer)" if known.balance is not None else ""
                row.show_status(status + stale, failed=True)
                return
            balance = reported.balance if isinstance(reported, DPSpent) else reported
            known.balance, known.status = balance, status
            row.show(balance)
            if isinstance(reported, DPSpent):
                noise = max(reported.noise.values(), default=math.nan)
                cost = f"last answer: ε {_num(reported.epsilon)}"
                cost += f", δ {reported.delta:.2g}" if reported.delta else ""
                cost += f" ({reported.mechanism}" + (f", noise scale up to {_num(noise)})" if noise == noise else ")")
                row.show_status(cost, failed=False)
            else:
                row.show_status(status, failed=False)

    def _header(self) -> None:
        balances = {k: v.balance for k, v in self.known.items() if v.balance is not None}
        failed = sum(1 for v in self.known.values() if v.balance is None or v.status.startswith(("[", "no answer")))
        if not balances:
            self.header.value = f"{self.title}: no node has reported a balance"
            return
        key, least = min(balances.items(), key=lambda kv: kv[1].epsilon_remaining)
        where = f"{key[0]} · {key[1]}" if key[1] else key[0]
        self.header.value = (f"{self.title} (ε per researcher and dataset, set by each node's operator): "
                             f"{len(balances)} row{'s' if len(balances) != 1 else ''}, least left "
                             f"ε {_num(least.epsilon_remaining)} of {_num(least.epsilon_budget)} on {where}"
                             + (f"; {failed} without a current answer" if failed else ""))

    # -- output ----------------------------------------------------------------------------------
    @property
    def frame(self) -> pd.DataFrame:
        """What the panel shows, one row per node and dataset (NaN where a node never answered)."""
        with self._lock:
            rows = []
            for (node, label), known in self.known.items():
                b = known.balance
                figures: dict[str, Any] = {} if b is None else {
                    "epsilon_spent": b.epsilon_spent, "epsilon_remaining": b.epsilon_remaining,
                    "epsilon_budget": b.epsilon_budget, "delta_spent": b.delta_spent,
                    "delta_remaining": b.delta_remaining, "delta_budget": b.delta_budget,
                    "require_dp": b.require_dp, "spends": b.n_spends}
                rows.append({"node": node, "dataset": label, **figures, "status": known.status})
        return pd.DataFrame(rows, columns=FRAME_COLUMNS)


def _entries(source: Any) -> list[tuple[str, DPBalance | DPSpent | None, str]]:
    """(node name, what it reported or None, status) for every node in ``source``."""
    if isinstance(source, pd.DataFrame):
        return _frame_entries(source)
    dp = getattr(source, "dp", None)
    if isinstance(dp, Mapping) and not isinstance(source, Mapping):  # an FAResult
        names = getattr(source, "node_names", {}) or {}
        source = {names.get(n, n): spent for n, spent in dp.items()}
    if not isinstance(source, Mapping):
        raise TypeError(f"BudgetPanel.update takes a privacy_budget() frame, a mapping {{node: DPBalance or "
                        f"DPSpent}} or a DP FAResult, not {type(source).__name__}")
    out: list[tuple[str, DPBalance | DPSpent | None, str]] = []
    for node, reported in source.items():
        if reported is None:  # e.g. a training round without DP on that node: nothing to show
            continue
        if not isinstance(reported, DPBalance | DPSpent):
            raise TypeError(f"BudgetPanel.update: node {node!r} has a {type(reported).__name__}, not a DPBalance "
                            "or DPSpent")
        out.append((str(node), reported, "answered"))
    return out


def _frame_entries(frame: pd.DataFrame) -> list[tuple[str, DPBalance | DPSpent | None, str]]:
    if "node" in frame.columns:
        frame = frame.set_index("node")
    missing = {"epsilon_spent", "epsilon_remaining", "epsilon_budget"} - set(frame.columns)
    if missing:
        raise ValueError(f"BudgetPanel.update: the frame lacks {sorted(missing)}; pass researcher.privacy_budget(fds)")
    out: list[tuple[str, DPBalance | DPSpent | None, str]] = []
    for node, row in frame.iterrows():
        status = str(row.get("status", "answered"))
        if pd.isna(row["epsilon_spent"]):
            out.append((str(node), None, status))
            continue
        number = _numbers(row)
        spends, flag = row.get("spends", 0), row.get("require_dp", False)
        out.append((str(node), DPBalance(
            epsilon_budget=number("epsilon_budget"), delta_budget=number("delta_budget"),
            epsilon_spent=number("epsilon_spent"), delta_spent=number("delta_spent"),
            epsilon_remaining=number("epsilon_remaining"), delta_remaining=number("delta_remaining"),
            require_dp=False if pd.isna(flag) else bool(flag),
            n_spends=0 if pd.isna(spends) else int(spends)), status))
    return out


def _numbers(row: pd.Series) -> Callable[[str], float]:
    """``number(column)``: the row's figure as a float, 0 where it is missing."""

    def number(name: str) -> float:
        value = row.get(name, 0.0)
        return 0.0 if pd.isna(value) else float(value)

    return number
