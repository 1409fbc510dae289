"""Differentially private training, the pure part: ``dp_args``, the accountant, central clipping and noise.

``training_args["dp_args"]`` takes Fed-BioMed's names: ``{"type": "local" | "central", "sigma": ..., "clip":
...}`` and, optionally, ``"delta"``.

* ``local``: DP-SGD on the node (``fedlab.training.dp_sgd``): each step samples every training row with
  probability ``q = batch_size / n_train`` (Poisson sampling), clips each row's gradient to L2 norm
  ``clip``, sums them and adds Gaussian noise of std ``sigma * clip``. Under add/remove-one-row one row
  changes that sum by at most ``clip``, so the noise multiplier of the Sampled Gaussian Mechanism is
  ``sigma`` itself, ``steps`` times per round.
* ``central``: the node trains as usual, then clips its *update* (the change from the global parameters
  it received, L2 norm over every shared entry together) to ``clip`` and adds Gaussian noise of std
  ``sigma * clip`` to every coordinate before the update leaves. One row can change the whole local
  training, so two clipped updates (with and without that row) can differ by anything up to ``2 * clip``:
  the L2 sensitivity is ``2 * clip`` and the honest noise multiplier is ``sigma / 2``, once per round
  (sample rate 1). Fed-BioMed accounts it with ``sigma``, which assumes a sensitivity of ``clip`` that
  only holds under replace-one for a sum of per-row contributions, not for a trained update.

Accounting: every round is an entry ``(noise_multiplier, sample_rate, steps)`` of Opacus' Rényi (RDP)
accountant (``opacus.accountants.RDPAccountant``; Balle et al. 2020 for the conversion to (ε, δ)). The
rounds of one experiment, by one researcher, on one source dataset are composed together at one δ (the
experiment's first DP round fixes it) and each round spends only what it adds to the composed ε
(:func:`round_cost`), so the ε a node records over an experiment sum to the RDP total, far below the sum
of each round's own ε. The δ is spent once per experiment, by its first round.

What a DP round releases: the noised parameters (and Scaffold's control variates, computed from them),
the number of training rows and of steps, and the ε. No loss and no validation metrics (exact statistics
of the rows). The number of rows is released as it is, as Opacus and Fed-BioMed do: the guarantee covers
the presence and the values of each row, with the dataset's size treated as public. The per-row
gradients must be per-row (a loss that is a sum or mean of per-row terms: nothing like BatchNorm that
mixes rows), or clipping them bounds nothing.

Everything here is a function of its arguments: no sockets, no SQLite, no torch.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlab.errors import FedlabTrainingError

__all__ = [
    "CENTRAL",
    "DP_ARG_KEYS",
    "LOCAL",
    "DPArgs",
    "DPRound",
    "RoundCost",
    "central_round",
    "check_dp_args",
    "clip_and_noise",
    "default_delta",
    "epsilon",
    "local_round",
    "mechanism",
    "parse_dp_args",
    "planned_steps",
    "round_cost",
    "sample_rate",
]

LOCAL, CENTRAL = "local", "central"
DP_TYPES = (LOCAL, CENTRAL)
DP_ARG_KEYS = ("type", "sigma", "clip", "delta")
_MECHANISMS = {LOCAL: "dp-sgd", CENTRAL: "gaussian-update"}
# a default delta takes a tenth of the node's delta budget, so ten DP trainings (or Gaussian answers) fit
DEFAULT_DELTA_SHARE = 0.1
# the RDP orders of opacus.accountants.RDPAccountant.DEFAULT_ALPHAS
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
_RDP: Any = None


@dataclass(frozen=True)
class DPArgs:
    """Checked ``dp_args``; ``delta`` None: the node chooses (:func:`default_delta`)."""

    type: str
    sigma: float
    clip: float
    delta: float | None = None

    @property
    def noise_std(self) -> float:
        """The std of the Gaussian noise: on the summed clipped gradients (local), on the update (central)."""
        return self.sigma * self.clip


def _number(key: str, value: Any, must: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise FedlabTrainingError(f"dp_args {key} must be {must}, not {value!r}")
    return float(value)


def check_dp_args(value: Any) -> dict[str, Any] | None:
    """``dp_args`` normalised to plain values (None stays None), or a FedlabTrainingError saying what is wrong."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise FedlabTrainingError(
            "training argument dp_args must be a dict such as {'type': 'local', 'sigma': 1.0, 'clip': 1.0}, "
            f"not {value!r}")
    unknown = sorted(str(k) for k in value if k not in DP_ARG_KEYS)
    if unknown:
        raise FedlabTrainingError(f"unknown dp_args key{'s' if len(unknown) > 1 else ''} "
                                  f"{', '.join(map(repr, unknown))}; valid keys are {', '.join(DP_ARG_KEYS)}")
    missing = [k for k in ("type", "sigma", "clip") if k not in value]
    if missing:
        raise FedlabTrainingError(f"dp_args needs {', '.join(map(repr, missing))}, e.g. "
                                  "{'type': 'local', 'sigma': 1.0, 'clip': 1.0}")
    kind = value["type"]
    if kind not in DP_TYPES:
        raise FedlabTrainingError(f"dp_args type must be 'local' (DP-SGD) or 'central' (a noised update), "
                                  f"not {kind!r}")
    out: dict[str, Any] = {"type": kind}
    for key in ("sigma", "clip"):
        number = _number(key, value[key], "a number > 0")
        if not (number > 0 and math.isfinite(number)):
            raise FedlabTrainingError(f"dp_args {key} must be a finite number > 0, not {value[key]!r}")
        out[key] = number
    if value.get("delta") is not None:
        delta = _number("delta", value["delta"], "a number above 0 and below 1, e.g. 1e-6")
        if not 0 < delta < 1:
            raise FedlabTrainingError(f"dp_args delta must be above 0 and below 1 (e.g. 1e-6), not {value['delta']!r}")
        out["delta"] = delta
    return out


def parse_dp_args(value: Any) -> DPArgs | None:
    """The checked :class:`DPArgs` of a ``dp_args`` value, None for None."""
    checked = check_dp_args(value)
    if checked is None:
        return None
    return DPArgs(type=checked["type"], sigma=checked["sigma"], clip=checked["clip"], delta=checked.get("delta"))


def mechanism(dp: DPArgs) -> str:
    """The name a node reports in ``DPSpent.mechanism``: "dp-sgd" or "gaussian-update"."""
    return _MECHANISMS[dp.type]


def default_delta(dp: DPArgs, delta_budget: float) -> float:
    """The δ an experiment is accounted at: the researcher's, else a tenth of the node's δ budget."""
    return dp.delta if dp.delta is not None else delta_budget * DEFAULT_DELTA_SHARE


# -- the plan of a round -----------------------------------------------------------------------------
def sample_rate(batch_size: int, n_train: int) -> float:
    """Poisson sampling's rate: each row is in each batch with probability ``batch_size / n_train`` (at most 1)."""
    if n_train < 1 or batch_size < 1:
        raise FedlabTrainingError(f"DP training needs at least one training row and batch_size >= 1 "
                                  f"(got {n_train} rows, batch_size {batch_size})")
    return min(1.0, batch_size / n_train)


def planned_steps(n_train: int, batch_size: int, epochs: int, num_updates: int | None) -> int:
    """The optimizer steps of a round: ``num_updates``, else ``epochs`` times the batches of an epoch
    (``ceil(n_train / batch_size)``, as without DP). Poisson sampling draws exactly this many batches
    (some may be empty), so the steps taken never exceed the steps accounted."""
    if num_updates is not None:
        return int(num_updates)
    return int(epochs) * math.ceil(n_train / batch_size)


@dataclass(frozen=True)
class DPRound:
    """One entry of the RDP accountant: ``steps`` Sampled Gaussian Mechanisms at ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def detail(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": self.steps}

    @classmethod
    def from_detail(cls, detail: Mapping[str, Any]) -> DPRound:
        return cls(float(detail["noise_multiplier"]), float(detail["sample_rate"]), int(detail["steps"]))


def local_round(sigma: float, sample_rate: float, steps: int) -> DPRound:
    """DP-SGD: sensitivity ``clip`` per step under add/remove-one-row, so the noise multiplier is ``sigma``."""
    return DPRound(float(sigma), float(sample_rate), int(steps))


def central_round(sigma: float) -> DPRound:
    """A clipped, noised update: sensitivity ``2 * clip`` (two updates in the ball of radius clip), noise std
    ``sigma * clip``, so the noise multiplier is ``sigma / 2``; the whole data, once per round."""
    return DPRound(float(sigma) / 2.0, 1.0, 1)


# -- the accountant --------------------------------------------------------------------------------
def epsilon(rounds: Sequence[DPRound], delta: float) -> float:
    """The ε of ``rounds`` composed with Opacus' RDP accountant, at ``delta`` (0 for no rounds).

    Rounds with the same noise multiplier and sample rate are one accountant entry (RDP is linear in
    the steps, so this changes nothing but the time)."""
    if not 0 < delta < 1:
        raise FedlabTrainingError(f"the accountant needs a delta above 0 and below 1, not {delta}")
    steps: dict[tuple[float, float], int] = {}
    for r in rounds:
        if r.steps > 0:
            steps[(r.noise_multiplier, r.sample_rate)] = steps.get((r.noise_multiplier, r.sample_rate), 0) + r.steps
    if not steps:
        return 0.0
    rdp = _rdp_analysis()
    total = sum(rdp.compute_rdp(q=q, noise_multiplier=nm, steps=n, orders=ALPHAS) for (nm, q), n in steps.items())
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, only looser
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp.get_privacy_spent(orders=ALPHAS, rdp=total, delta=delta)
    return float(eps)


def _rdp_analysis() -> Any:
    """Opacus' RDP analysis (``opacus/accountants/analysis/rdp.py``: numpy and scipy only), loaded from the
    installed opacus without running ``opacus/__init__``, which imports torch: the node accounts in its
    own process, which never needs torch otherwise. ``RDPAccountant.get_epsilon`` is these two calls over
    ``ALPHAS`` (tests/unit/test_dp_training.py checks both against the accountant itself)."""
    global _RDP
    if _RDP is None:
        spec = importlib.util.find_spec("opacus")
        if spec is None or not spec.submodule_search_locations:
            raise FedlabTrainingError("DP training needs opacus on the node; its operator installs it "
                                      "(`pip install 'fedlab-research[torch]'`) and restarts the node")
        path = Path(next(iter(spec.submodule_search_locations))) / "accountants" / "analysis" / "rdp.py"
        module_spec = importlib.util.spec_from_file_location("fedlab._opacus_rdp", path)
        if module_spec is None or module_spec.loader is None:
            raise FedlabTrainingError(f"opacus' RDP analysis is missing from {path.parent}; reinstall opacus")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        _RDP = module
    return _RDP


@dataclass(frozen=True)
class RoundCost:
    """What one more round adds to an experiment's composed ε: ``epsilon`` = ``total_after - total_before``."""

    epsilon: float
    total_before: float
    total_after: float


def round_cost(history: Sequence[DPRound], new: DPRound, delta: float) -> RoundCost:
    """The ε that ``new`` adds to the rounds of ``history`` when all are composed at ``delta``."""
    before = epsilon(history, delta)
    after = epsilon([*history, new], delta)
    if not math.isfinite(after):
        raise FedlabTrainingError(
            f"this DP round (noise multiplier {new.noise_multiplier:g}, sample rate {new.sample_rate:.3g}, "
            f"{new.steps} steps) gives no finite epsilon at delta={delta:g}; use a larger sigma or fewer steps")
    return RoundCost(epsilon=max(0.0, after - before), total_before=before, total_after=after)


# -- central DP ------------------------------------------------------------------------------------
def clip_and_noise(update: Mapping[str, np.ndarray], *, sigma: float, clip: float,
                   rng: np.random.Generator) -> tuple[dict[str, np.ndarray], float]:
    """``update`` scaled to L2 norm at most ``clip`` (over all arrays together), plus Gaussian noise of
    std ``sigma * clip`` on every coordinate; and the norm before clipping.

    Only floating-point arrays (an integer entry cannot carry the noise); each keeps its dtype. ``rng`` must
    be seeded from a secret (the node passes one from ``secrets``): noise a researcher could regenerate
    protects nothing."""
    for name, array in update.items():
        if not np.issubdtype(np.asarray(array).dtype, np.floating):
            raise FedlabTrainingError(f"central DP can only noise floating-point entries; {name} is "
                                      f"{np.asarray(array).dtype}")
    norm = math.sqrt(sum(float(np.sum(np.square(np.asarray(a, dtype=np.float64)))) for a in update.values()))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    std = sigma * clip
    noisy = {}
    for name, array in update.items():
        values = np.asarray(array, dtype=np.float64) * factor
        noisy[name] = (values + rng.normal(0.0, std, size=values.shape)).astype(np.asarray(array).dtype)
    return noisy, norm
