"""FI-Scores of many modules at once, with a single device-to-host transfer.

Layout of the statistics and the FI-Score formula: selora_kernels/fisher_stats.py. The reductions run on
the device; the (modules x 4) table of [live sum, trial sum, N, non-finite input rows] (one
`statistics_summary` per module) is optionally summed over processes (every process then decides
identically) and read back once; a module that saw inf/NaN inputs while measuring raises ValueError there,
on every process alike.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from ..fisher_stats import FisherScores, fi_scores, raise_on_nonfinite_inputs, statistics_summary


def fisher_table(modules: Sequence, statistics: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """(len(modules), 4) float64 table on the modules' device: live-slot sum, trial-slot sum, samples,
    non-finite input rows."""
    if statistics is None:
        statistics = [m.fisher_statistics() for m in modules]
    return torch.stack([statistics_summary(stats, module.rank) for module, stats in zip(modules, statistics)])


def scores_from_table(table: Sequence[Sequence[float]], fisher_scale: float = 1.0) -> List[FisherScores]:
    """FisherScores per row of a host table; `fisher_scale` multiplies Fisher values (AMP, accumulation)."""
    return [fi_scores(live, trial, samples, fisher_scale) for live, trial, samples, *_ in table]


def batched_fisher_scores(modules: Sequence, statistics: Optional[Sequence[torch.Tensor]] = None,
                          reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                          fisher_scale: float = 1.0, check_inputs: bool = True) -> List[FisherScores]:
    """FisherScores of every module (one host sync).

    reduce: applied to the device table before the read-back, e.g. distributed.all_reduce_sum_ (sums of
    squared per-sample gradients and sample counts add up across processes).
    fisher_scale: multiplies every Fisher value to bring it to the eq.-3 scale: (accumulation steps /
    loss scale)^2 when the backward saw a loss divided by the accumulation steps and multiplied by an AMP
    loss scale. Ratios do not depend on it.
    check_inputs: raise ValueError naming the modules whose measured inputs held inf/NaN (off where an
    AMP overflow explains them: the caller skips the step instead).
    """
    modules = list(modules)
    if not modules:
        return []
    table = fisher_table(modules, statistics)
    if reduce is not None:
        table = reduce(table)
    host = table.cpu().tolist()
    if check_inputs:
        raise_on_nonfinite_inputs([m.selora_name for m in modules], [row[3] for row in host])
    return scores_from_table(host, fisher_scale)


def squared_gradient_norms(modules: Sequence, extra_slot: bool = False) -> torch.Tensor:
    """(len(modules),) float64 device tensor: ||grad A||^2 + ||grad B||^2 over the live slots of each module
    (the released script's "Fisher": the square of the batch-mean gradient). extra_slot: include slot `rank`
    (a trial slot made temporarily live). Missing gradients count as zero. No host sync."""
    values = []
    for module in modules:
        slots = module.rank + (1 if extra_slot else 0)
        total = torch.zeros((), dtype=torch.float64, device=module.lora_A.device)
        if module.lora_A.grad is not None:
            total = total + module.lora_A.grad[:slots].double().square().sum()
        if module.lora_B.grad is not None:
            total = total + module.lora_B.grad[:, :slots].double().square().sum()
        values.append(total)
    return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64)
