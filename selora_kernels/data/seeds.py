"""Per-item random streams: one seed for item `index` of a run with `seed`.

Training draws each step's noise from seed_mix(seed, step) and generation draws image i from
seed_mix(seed, i), so a draw never depends on batch size, batch order or what ran before (a resumed run draws
exactly what the original would).
"""
from __future__ import annotations

SEED_STRIDE = 1_000_003  # a prime larger than any step or prompt count: the items of a run get distinct seeds


def seed_mix(seed: int, index: int) -> int:
    """The generator seed of item `index` in a run with `seed` (a non-negative int below 2**63)."""
    return (int(seed) * SEED_STRIDE + int(index)) % (2**63)
