"""ComBat harmonisation (Johnson, Li & Rabinovic 2007; location/scale, parametric empirical
Bayes, no covariates), split so that each node is one batch and sends only moments.

The researcher computes the global ``alpha`` (pooled mean) and ``sigma`` (pooled within-batch
std) from the nodes' ``(n, mean, M2)``
(:func:`fedlab.preprocessing.fit.combat_global_params`). Everything else in ComBat is per
batch: the batch's location/scale estimates, their empirical Bayes priors (taken *across the
features* of that batch) and the posterior iteration. So each node computes its own
``gamma_star``/``delta_star`` here (:func:`combat_local_params`) and never sends them: they
stay in its state and are used by the ``combat`` transform.

:func:`combat_pooled` is the whole algorithm on pooled data, written independently from the
published method (as neuroCombat implements it), as the reference the federated result must
equal. Missing values are left out of every estimate (n counts the present values per column)
and stay missing. A batch with no value at all of a column (a site that never measured it) has
no estimate for it: that column is left out of the batch's priors and left as it is there
(neuroCombat would make the whole batch NaN).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from fedlab.errors import FedlabConfigError, FedlabDatasetError

__all__ = ["combat_local_params", "combat_pooled"]


def _column(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame.columns:
        raise FedlabConfigError(f"ComBat column {column!r} is not in the data (columns: {list(frame.columns)})")
    try:
        values = pd.to_numeric(frame[column], errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError, OverflowError) as exc:  # its text quotes a cell: kept in the chain, never sent
        raise FedlabConfigError(f"ComBat needs numeric columns; {column!r} holds {frame[column].dtype} values, "
                                "some of which are not numbers; leave it out of the ComBat step") from exc
    return np.asarray(values, dtype=np.float64)


def _priors(gamma_hat: np.ndarray, delta_hat: np.ndarray) -> tuple[float, float, float, float]:
    """``gamma_bar, tau2, a, b``: normal prior of the locations, inverse-gamma prior of the
    scales by the method of moments, both across the features of one batch."""
    gamma_bar, tau2 = float(np.mean(gamma_hat)), float(np.var(gamma_hat, ddof=1))
    m, s2 = float(np.mean(delta_hat)), float(np.var(delta_hat, ddof=1))
    if not s2 > 0:
        raise FedlabDatasetError("ComBat's prior on the batch scales is degenerate: the columns' variances "
                                 "in this batch are all equal; harmonise columns of different spread")
    return gamma_bar, tau2, (2 * s2 + m**2) / s2, (m * s2 + m**3) / s2


def _solve(
    z: Sequence[np.ndarray], gamma_hat: np.ndarray, delta_hat: np.ndarray, max_iter: int, tol: float,
) -> tuple[np.ndarray, np.ndarray]:
    """neuroCombat's ``it_sol``: alternate the posterior mean of gamma and of delta until
    neither changes by more than ``tol`` relatively."""
    gamma_bar, tau2, a, b = _priors(gamma_hat, delta_hat)
    n = np.array([v.size for v in z], dtype=np.float64)
    g_old, d_old = gamma_hat, delta_hat
    tiny = np.finfo(np.float64).tiny
    for _ in range(max_iter):
        g_new = (n * tau2 * gamma_hat + d_old * gamma_bar) / (n * tau2 + d_old)
        sum2 = np.array([np.sum((v - g) ** 2) for v, g in zip(z, g_new, strict=True)])
        d_new = (b + 0.5 * sum2) / (n / 2 + a - 1)
        change = max(float(np.max(np.abs(g_new - g_old) / np.maximum(np.abs(g_old), tiny))),
                     float(np.max(np.abs(d_new - d_old) / np.maximum(np.abs(d_old), tiny))))
        g_old, d_old = g_new, d_new
        if change < tol:
            return g_new, d_new
    raise FedlabDatasetError(f"ComBat's empirical Bayes estimates did not converge in {max_iter} iterations")


def combat_local_params(
    frame: pd.DataFrame,
    columns: Sequence[str],
    alpha: Mapping[str, float],
    sigma: Mapping[str, float],
    *,
    max_iter: int = 1000,
    tol: float = 1e-10,
    without: Sequence[str] = (),
) -> tuple[dict[str, float], dict[str, float]]:
    """``(gamma_star, delta_star)`` per column for this node's batch, from the global alpha, sigma.

    The priors are estimated across the columns, so ComBat needs several of them (neuroCombat
    is meant for many features: brain regions, genes); each needs 2 present values here.
    ``without``: columns of which this batch holds no value at all; they are left out of the
    priors and get ``gamma_star = 0``, ``delta_star = 1``, which leaves them as they are.
    """
    requested = list(columns)
    if len(requested) < 2:
        raise FedlabConfigError("ComBat needs at least 2 columns: its empirical Bayes priors are estimated "
                                f"across the features of a batch, and {requested} gives only {len(requested)}")
    cols = [c for c in requested if c not in set(without)]
    if len(cols) < 2:
        raise FedlabDatasetError(f"ComBat needs at least 2 columns with values in each batch; this node holds no "
                                 f"value of {sorted(set(without))}, which leaves {len(cols)}")
    z: list[np.ndarray] = []
    for c in cols:
        if not float(sigma[c]) > 0:
            raise FedlabConfigError(f"ComBat's sigma for {c!r} must be > 0, got {sigma[c]}")
        x = _column(frame, c)
        x = x[~np.isnan(x)]
        if x.size < 2:
            raise FedlabDatasetError(f"ComBat needs at least 2 values of {c!r} in each batch; "
                                     f"this node has {x.size}")
        z.append((x - float(alpha[c])) / float(sigma[c]))
    gamma_hat = np.array([np.mean(v) for v in z])
    delta_hat = np.array([np.var(v, ddof=1) for v in z])
    gamma_star, delta_star = _solve(z, gamma_hat, delta_hat, max_iter, tol)
    gamma = {c: float(g) for c, g in zip(cols, gamma_star, strict=True)}
    delta = {c: float(d) for c, d in zip(cols, delta_star, strict=True)}
    return ({c: gamma.get(c, 0.0) for c in requested}, {c: delta.get(c, 1.0) for c in requested})


def combat_pooled(frame: pd.DataFrame, batch: pd.Series, columns: Sequence[str]) -> pd.DataFrame:
    """ComBat on pooled data with batch labels (the reference for tests); returns a new frame
    with ``columns`` harmonised.

    Written from the published algorithm, not from the federated functions above: grand mean
    and pooled within-batch variance (residuals of the batch means, divided by N), standardised
    data, per-batch estimates, priors across features and the posterior iteration run to
    convergence (relative change below 1e-13).
    """
    cols = list(columns)
    labels = np.asarray(batch.to_numpy())
    data = np.column_stack([_column(frame, c) for c in cols]).T  # features x samples
    present = ~np.isnan(data)
    batches = list(pd.unique(labels))
    masks = [labels == lab for lab in batches]
    n_all = present.sum(axis=1)
    grand_mean = np.nansum(data, axis=1) / n_all
    resid2 = np.zeros(len(cols))
    for mask in masks:
        n_batch = present[:, mask].sum(axis=1)
        batch_mean = np.nansum(data[:, mask], axis=1) / np.maximum(n_batch, 1)  # 0 where the batch has none
        resid2 += np.nansum((data[:, mask] - batch_mean[:, None]) ** 2, axis=1)
    sd = np.sqrt(resid2 / n_all)
    s = (data - grand_mean[:, None]) / sd[:, None]
    out = frame.copy()
    adjusted = s.copy()
    for mask in masks:
        has = (~np.isnan(s[:, mask])).any(axis=1)  # the columns this batch holds values of
        rows = np.flatnonzero(has)
        sb = s[np.ix_(rows, np.flatnonzero(mask))]
        nb = (~np.isnan(sb)).sum(axis=1).astype(np.float64)
        g_hat = np.nanmean(sb, axis=1)
        d_hat = np.nanvar(sb, axis=1, ddof=1)
        g_bar, t2 = g_hat.mean(), g_hat.var(ddof=1)
        m, v = d_hat.mean(), d_hat.var(ddof=1)
        a, b = (2 * v + m**2) / v, (m * v + m**3) / v
        g_old, d_old = g_hat, d_hat
        for _ in range(100_000):
            g_new = (t2 * nb * g_hat + d_old * g_bar) / (t2 * nb + d_old)
            d_new = (0.5 * np.nansum((sb - g_new[:, None]) ** 2, axis=1) + b) / (nb / 2 + a - 1)
            change = max(np.max(np.abs(g_new - g_old) / np.abs(g_old)), np.max(np.abs(d_new - d_old) / d_old))
            g_old, d_old = g_new, d_new
            if change < 1e-13:
                break
        adjusted[np.ix_(rows, np.flatnonzero(mask))] = (sb - g_old[:, None]) / np.sqrt(d_old[:, None])
    result = adjusted * sd[:, None] + grand_mean[:, None]
    for i, c in enumerate(cols):
        out[c] = pd.Series(result[i], index=frame.index)
    return out
