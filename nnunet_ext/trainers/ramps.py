"""Weight ramps shared by the trainers (the mean teacher's consistency weight, a branch's loss weight)."""

from __future__ import annotations

import math


def sigmoid_rampup(step: int, rampup_steps: int) -> float:
    """``exp(-5 (1 - t)²)`` with ``t = step / rampup_steps`` clipped to [0, 1] (1 from ``rampup_steps`` on);
    Tarvainen & Valpola's ramp (also Laine & Aila's). 1 everywhere when ``rampup_steps <= 0``."""
    if rampup_steps <= 0:
        return 1.0
    t = min(max(step / rampup_steps, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))
