"""Which nodes a preprocessing step is fitted on, column by column (the researcher's side).

A node answers a fit, for each column, with a partial, a refusal, or "no values": its root
source holds no measured value of the column (a lab value that site never measured; see
``PreprocReply.no_values``). A step is fitted on the partials of the nodes that have values; the
nodes that have none do not contribute to that column but take the fitted step like every node,
which is what a fit on the pooled rows gives, since every fit here leaves missing values out.
This module sorts the replies out and names who did not contribute; it sends nothing and sees
no row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedlab.analytics.messages import CategoricalPartial, NumericPartial
from fedlab.errors import FedlabError
from fedlab.preprocessing.messages import PreprocReply

__all__ = ["NotContributing", "categorical_partials", "no_values_by_column", "numeric_partials"]

# what a node without values of a column gets from each step, for the user's warning
_WHAT_IT_GETS = {
    "impute": "every missing row there gets the imputed value",
    "combat": "the column is left as it is there",
}
_INSTEAD = {
    "impute": ', or fill it with impute([...], strategy="constant", fill_value=...)',
}


@dataclass(frozen=True)
class NotContributing:
    """One column of one fitted step that some nodes did not contribute to: they hold no
    measured value of it. ``step`` is the step's position in ``Pipeline.steps``."""

    step: int
    step_type: str
    column: str
    nodes: tuple[str, ...]

    def describe(self, names: Mapping[str, str] | None = None) -> str:
        who = ", ".join((names or {}).get(n, n) for n in self.nodes)
        gets = _WHAT_IT_GETS.get(self.step_type, "it takes the fitted step there like every site")
        return (f"step {self.step + 1} ({self.step_type}) of {self.column!r} was fitted without {who}, which "
                f"holds no value of it; {gets}")


def no_values_by_column(
    replies: Mapping[str, PreprocReply],
    columns: Sequence[str],
    what: str,
    names: Mapping[str, str] | None = None,
) -> dict[str, tuple[str, ...]]:
    """``{column: nodes that answered "no values"}`` for the columns where some did (in the
    replies' order); raises :class:`FedlabError` for a column that no answering node holds a value of,
    since there is nothing to fit it on."""
    found: dict[str, tuple[str, ...]] = {}
    for column in columns:
        empty = tuple(n for n, r in replies.items() if column in (r.no_values or ()))
        if not empty:
            continue
        if len(empty) == len(replies):
            who = ", ".join((names or {}).get(n, n) for n in empty)
            raise FedlabError(
                f"{what} cannot be fitted on {column!r}: no site in the pipeline holds a value of it ({who} "
                f"answered that they have none). Leave {column!r} out of this step{_INSTEAD.get(what, '')}")
        found[column] = empty
    return found


def numeric_partials(replies: Mapping[str, PreprocReply], column: str) -> dict[str, NumericPartial]:
    """The numeric partials of ``column`` from the nodes that hold values of it (a node that said
    "no values" of it contributes nothing, whatever else its reply holds)."""
    return {n: p for n, r in replies.items() if column not in (r.no_values or ()) and r.partials is not None
            and (p := r.partials.numeric.get(column)) is not None}


def categorical_partials(replies: Mapping[str, PreprocReply], column: str) -> dict[str, CategoricalPartial]:
    """The value counts of ``column`` from the nodes that hold values of it."""
    return {n: p for n, r in replies.items() if column not in (r.no_values or ()) and r.partials is not None
            and (p := r.partials.categorical.get(column)) is not None}
