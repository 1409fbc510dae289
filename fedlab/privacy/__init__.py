"""What may leave a node, decided from the node's own data and state: the disclosure rule engine.

The node is the only party that can be trusted with its rules, so every guarantee here is computed
on the node from its own rows, its ``[disclosure]`` table and what its SQLite database remembers
of earlier answers, whatever a request claims. Four ideas carry it:

**Provenance** (:mod:`.provenance`). Every column a preprocessing chain makes knows the *source*
columns it came from (``patient_id=P1000`` comes from ``patient_id``; a standardized ``age`` from
``age``) and which of its rows hold *real* values (an imputed value is not data). Exclusions,
``min_count``, noise and threshold state follow the source column, never the name at hand.

**Specs are checked, not trusted** (:mod:`.spec_check`). A transform spec arrives from the
researcher; before the node keeps it, no step may touch an excluded column (or one derived from
it), a one-hot step's levels that this node holds fewer than ``cell_threshold`` times are folded
into ``<other>`` on the node (the column stays, all zeros, so every node keeps one schema), a
column with too many levels cannot be one-hot encoded, scales must be positive (so that every
value transform is increasing and ranks are kept), and the caps on categories and derived size hold.

**Cuts** (:mod:`.cuts`). A threshold ``t`` (a quantile round) or a histogram edge tells how many
values lie below ``t``: a *cut* at some rank of the sorted real values. Every cut a researcher
ever got answered on a source column is stored; a new one is answered only if it lies at least
``min_count`` ranks from both ends and at least ``cell_threshold`` ranks from every stored cut (or
exactly on one). Points are rounded to a power-of-ten grid first (no finer than
``threshold_resolution`` x std), and each distinct point costs one unit of a per-researcher,
per-source-column ``threshold_allowance``. Differencing two answers can therefore never isolate
fewer than ``cell_threshold`` values, a value can never be located more finely than the grid,
and bisection runs out.

**Groups and levels** (:mod:`.groups`). A column with few distinct values (``group_levels``)
partitions the rows: a covariance with it is a sum over a subset, so each of its groups must hold
``min_count`` rows; its own moments are its level counts, so they need every level to be
releasable. Which levels of a column are suppressed is decided from the column's own value counts
(primary and secondary suppression), so every table over the column hides the same levels.

Min/max noise (:mod:`.noise`) is fixed per (node secret, source content, source column) and scales
with the affine map of a derived copy, so neither repeating a request nor deriving copies
averages it away.
"""

from __future__ import annotations
