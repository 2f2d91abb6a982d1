"""The rank-aware token cost: an adapter's flops ratio, and what a token on it costs.

Arithmetic only; the coefficient's measurement is ``benchmarks/rank_cost.py``.
"""

from __future__ import annotations

import pytest

from adapters.base_layout import LINEAR_TARGETS, BaseModelLayout
from engine.scheduling import RANK_COST_COEFFICIENT, token_cost

# Two layers; per layer q (8→8), k and v (8→4), o (8→8), gate and up (8→16), down (16→8):
# Σ in·out = 64 + 32 + 32 + 64 + 128 + 128 + 128 = 576 multiply-adds per token per layer.
LAYOUT = BaseModelLayout.for_decoder(
    num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1, head_dim=4
)
BASE_MACS = 2 * 576


def ranks_of(rank: int, targets: tuple[str, ...]) -> dict[tuple[int, str], int]:
    """One adapter's ranks by (layer, target): ``rank`` on ``targets`` in every layer."""
    return {(layer, t): rank for layer in range(LAYOUT.num_layers) for t in targets}


def test_flops_ratio_of_a_known_adapter() -> None:
    # Rank 2 on q and v in both layers: 2 layers · 2 · ((8 + 8) + (8 + 4)) = 112.
    assert LAYOUT.flops_ratio(ranks_of(2, ("q_proj", "v_proj"))) == pytest.approx(112 / BASE_MACS)
    # Modules count one by one, each with its own rank: rank 4 on layer 0's q, rank 1 on
    # layer 1's down: 4 · 16 + 1 · 24 = 88.
    assert LAYOUT.flops_ratio({(0, "q_proj"): 4, (1, "down_proj"): 1}) == pytest.approx(
        88 / BASE_MACS
    )
    assert LAYOUT.flops_ratio({}) == 0.0


def test_flops_ratio_is_linear_in_rank() -> None:
    one = LAYOUT.flops_ratio(ranks_of(1, LINEAR_TARGETS))
    # Σ (in + out) over the seven targets = 16 + 12 + 12 + 16 + 24 + 24 + 24 = 128 per layer.
    assert one == pytest.approx(2 * 128 / BASE_MACS)
    for rank in (8, 16, 32, 64):
        assert LAYOUT.flops_ratio(ranks_of(rank, LINEAR_TARGETS)) == pytest.approx(rank * one)


def test_token_cost_is_one_plus_coefficient_times_ratio() -> None:
    assert RANK_COST_COEFFICIENT > 0
    assert token_cost(0.0) == 1.0
    assert token_cost(0.25) == pytest.approx(1.0 + RANK_COST_COEFFICIENT * 0.25)


@pytest.mark.parametrize("targets", [LINEAR_TARGETS, ("q_proj", "v_proj")])
def test_token_cost_grows_with_rank(targets: tuple[str, ...]) -> None:
    costs = [token_cost(LAYOUT.flops_ratio(ranks_of(r, targets))) for r in (8, 16, 32, 64)]
    assert all(c > 1.0 for c in costs)
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    assert costs[-1] > costs[0]  # rank 64 costs more than rank 8


def test_more_targets_cost_more() -> None:
    assert token_cost(LAYOUT.flops_ratio(ranks_of(8, LINEAR_TARGETS))) > token_cost(
        LAYOUT.flops_ratio(ranks_of(8, ("q_proj", "v_proj")))
    )
