"""Seeds of raydae's random streams, each derived from a user's seed (`train.seed`, `eval.seed`) and its place.

Distinct parts give distinct seeds, so no two streams (ranks, steps, epochs, degradations) replay each other.
"""

from __future__ import annotations


def derive_seed(base: int, *parts: int, stride: int = 1_000_003) -> int:
    """`base` with each part folded in as `seed * stride + part` (a stride above every part keeps seeds apart)."""
    seed = base
    for part in parts:
        seed = seed * stride + part
    return seed
