"""The cut rules (fedlab.privacy.cuts): grid, ends, spacing between cuts, allowance."""

from __future__ import annotations

import numpy as np
import pytest

from fedlab.privacy.cuts import LEFT, RIGHT, CutState, Point, answer_points, grid_step, snap

VALUES = np.sort(np.arange(1.0, 41.0))  # 40 values 1..40


def ask(points: list[float], state: CutState, side: str = RIGHT, fence: tuple[float, float] = (0.5, 40.5),
        **kw: int) -> tuple[list[int | None], list[str]]:
    kwargs = {"min_count": 10, "cell_threshold": 3, **kw}
    return answer_points([Point(p, side) for p in points], VALUES, fence=fence, state=state, key_prefix="k",
                         **kwargs)


def fresh(remaining: int = 100) -> CutState:
    return CutState(ranks=set(), points=set(), remaining=remaining)


def test_grid_is_a_power_of_ten_and_keeps_round_numbers() -> None:
    assert grid_step(VALUES, 0.01) == 1.0  # std 11.5 -> 0.115 -> never finer: 1
    assert grid_step(VALUES, 0.001) == 0.1
    assert grid_step(np.array([5.0]), 0.01) == 0.1
    assert snap(40.0, 0.1) == 40.0 and snap(0.3, 0.1) == 0.3 and snap(12.34, 0.1) == 12.3
    assert snap(1234.0, 100.0) == 1200.0 and snap(float("inf"), 0.1) == float("inf")
    assert snap(1e300, 0.1) == 1e300  # far away: kept as it is


def test_tails_of_fewer_than_min_count_values_are_never_delimited() -> None:
    ranks, reasons = ask([5.0, 9.0, 10.0, 30.0, 31.0, 35.0], fresh())
    assert ranks == [None, None, 10, 30, None, None]
    assert reasons.count("min_count") == 4


def test_points_outside_the_noisy_range_say_nothing_and_are_answered() -> None:
    ranks, _ = ask([0.0, 0.4, 41.0], fresh())
    assert ranks == [0, 0, 40]
    ranks, _ = ask([0.6], fresh())  # inside the fence, below the data: a tail
    assert ranks == [None]


def test_no_two_answers_difference_to_fewer_than_cell_threshold_values() -> None:
    state = fresh()
    assert ask([20.0], state)[0] == [20]
    # a second request cannot cut 1 or 2 values away from the first cut
    assert ask([21.0, 22.0, 19.0, 18.0], state)[0] == [None, None, None, None]
    assert ask([23.0, 17.0], state)[0] == [23, 17]
    # a point at a stored rank (a refinement) is answered: it separates nothing new
    assert ask([20.5], state)[0] == [20]
    # within one request too, and in value order whatever the order asked
    state = fresh()
    assert ask([21.0, 20.0, 25.0], state)[0] == [None, 20, 25]


def test_histogram_edges_and_thresholds_share_the_cuts() -> None:
    state = fresh()
    assert ask([20.0], state, side=LEFT)[0] == [19]
    assert ask([20.0], state, side=RIGHT)[0] == [None]  # 19 vs 20: one value apart


def test_allowance_counts_distinct_points_and_runs_out() -> None:
    state = fresh(remaining=3)
    assert ask([15.0, 25.0], state)[0] == [15, 25]
    assert state.remaining == 1
    assert ask([15.0, 25.0], state)[0] == [15, 25]  # asked before: free
    assert state.remaining == 1
    ranks, reasons = ask([20.0, 30.0], state)
    assert ranks == [20, None] and reasons == ["threshold_allowance"]
    assert state.remaining == 0 and state.new_points == {"k|right|15.0", "k|right|25.0", "k|right|20.0"}


def test_a_withheld_point_costs_too() -> None:
    state = fresh(remaining=5)
    ask([3.0], state)
    assert state.remaining == 4


@pytest.mark.parametrize("seed", range(5))
def test_bisection_never_isolates_fewer_than_cell_threshold_values(seed: int) -> None:
    rng = np.random.default_rng(seed)
    state = fresh(remaining=10_000)
    answered: dict[float, int] = {}
    for _ in range(300):
        t = float(np.round(rng.uniform(0, 41), 1))
        rank = ask([t], state)[0][0]
        if rank is not None:
            answered[t] = rank
    ranks = sorted(set(answered.values()) - {0, 40})
    assert all(b - a >= 3 for a, b in zip(ranks, ranks[1:], strict=False))
    assert all(10 <= r <= 30 for r in ranks)
