"""The Fisher-statistics contract: the layout every backward writes and the FI-Score every reader computes.

A measuring backward returns, per module, a (FISHER_ROWS, capacity + 1) tensor; column k < capacity is slot
k, column `capacity` is the trial slot (row K of A, a zero column of B):

    row FISHER_ROW_A      sum over samples i of ||dL_i/dA[k, :]||^2
    row FISHER_ROW_B      sum over samples i of ||dL_i/dB[:, k]||^2
    row FISHER_ROW_COUNT  column FISHER_COL_SAMPLES: samples N; column FISHER_COL_NONFINITE: input rows
                          holding inf/NaN; the other columns zero

The FI-Score (Fisher in the per-sample scale, averaged over samples) of the live slots, and of the module
expanded by the trial slot (docs/algorithm.md):

    FI_orig = sum_{k < r} (F_A[k] + F_B[k]) / N        FI_exp = FI_orig + (F_A[trial] + F_B[trial]) / N

The kernels (kernels/selora_linear_backward.py), the float64 oracle (ops/reference.py), the layer
(nn/selora_linear.py) and the controller (expansion/) all take the layout and the formula from here.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Tuple

import torch

FISHER_ROW_A = 0
FISHER_ROW_B = 1
FISHER_ROW_COUNT = 2
FISHER_ROWS = 3
FISHER_COL_SAMPLES = 0
# Input rows holding inf/NaN, counted from the trial column x . trial_row that the measuring backward already
# forms, so the check costs no pass over x and no host sync; the readers (the controller before the optimizer
# step, SeLoRALinear.fisher_scores, expansion.fisher) raise on it, naming the module.
FISHER_COL_NONFINITE = 1


def fisher_dtype(dtype: torch.dtype) -> torch.dtype:
    """Fisher statistics are fp32, or fp64 for fp64 inputs (the oracle tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def statistics_shape(capacity: int) -> Tuple[int, int]:
    """Shape of one module's statistics: a column per slot plus the trial slot's, measuring or not."""
    return FISHER_ROWS, capacity + 1


def statistics_width(capacity: int, measuring: bool) -> int:
    """Slots a backward computes: the capacity, plus the trial slot (column `capacity`) while measuring."""
    return capacity + 1 if measuring else capacity


def nonfinite_rows(stats: torch.Tensor) -> torch.Tensor:
    """0-d count of input rows that held inf/NaN while measuring (on the statistics' device: no sync)."""
    return stats[FISHER_ROW_COUNT, FISHER_COL_NONFINITE]


def statistics_summary(stats: torch.Tensor, rank: int) -> torch.Tensor:
    """(4,) float64 on the statistics' device: live-slot Fisher sum, trial-slot Fisher sum, samples,
    non-finite input rows. Sums over processes stay valid summaries (every entry is a sum)."""
    per_slot = (stats[FISHER_ROW_A] + stats[FISHER_ROW_B]).double()
    counts = stats[FISHER_ROW_COUNT, FISHER_COL_SAMPLES:FISHER_COL_NONFINITE + 1].double()
    return torch.cat([torch.stack([per_slot[:rank].sum(), per_slot[-1]]), counts])


class FisherScores(NamedTuple):
    """FI-Scores (eq. 4, Fisher in the eq.-3 scale) of one module and their ratio (expanded / original)."""

    original: float
    expanded: float
    ratio: float
    samples: int


def fi_ratio(original: float, expanded: float) -> float:
    """expanded / original, with x/0 -> inf and 0/0 -> nan (nothing measured: nan >= lambda is False, so
    such a module never expands, whatever lambda)."""
    if original > 0:
        return expanded / original
    return math.inf if expanded > 0 else math.nan


def fi_scores(live: float, trial: float, samples: float, fisher_scale: float = 1.0) -> FisherScores:
    """FisherScores from one host summary (`statistics_summary`); `fisher_scale` multiplies Fisher values
    (AMP loss scale, gradient accumulation) and leaves the ratio unchanged."""
    if samples <= 0:
        return FisherScores(0.0, 0.0, math.nan, 0)
    original = live * fisher_scale / samples
    expanded = original + trial * fisher_scale / samples
    return FisherScores(original, expanded, fi_ratio(original, expanded), int(samples))


def raise_on_nonfinite_inputs(names: Sequence[str], nonfinite_counts: Sequence[float]) -> None:
    """ValueError naming every module whose measured inputs held inf/NaN (counts from the statistics)."""
    bad = [f"{name} ({int(count)} input rows)" for name, count in zip(names, nonfinite_counts) if count > 0]
    if bad:
        raise ValueError(f"non-finite values in the input while measuring Fisher: {', '.join(bad[:5])}"
                         f"{f' and {len(bad) - 5} more modules' if len(bad) > 5 else ''}")
