"""Pruning schedules: how the pruned fraction ramps from 0 to its final value over the pruning epochs.

``t`` is the progress through the ramp, ``(epoch - start_epoch + 1) / pruning_epochs`` clipped to [0, 1]:
the level of epoch ``e`` is applied at its start, so the last pruning epoch already trains at the target.
"""

from __future__ import annotations

__all__ = ["SCHEDULES", "level_at"]


def _exponential(final: float, t: float) -> float:
    # the same fraction of what remains is removed at every step: 1 - (1 - final) ** t
    return 1.0 - (1.0 - final) ** t


def _polynomial(final: float, t: float, power: float = 3.0) -> float:
    # fast at first, slower near the target (Zhu & Gupta 2017)
    return final * (1.0 - (1.0 - t) ** power)


def _baseline(final: float, t: float) -> float:
    return final if t > 0 else 0.0


SCHEDULES = {"exponential": _exponential, "polynomial": _polynomial, "baseline": _baseline}


def level_at(schedule: str, final: float, epoch: int, start_epoch: int, pruning_epochs: int) -> float:
    """The level (fraction pruned, or FLOPs reduction) in force during ``epoch`` (0-based)."""
    if epoch < start_epoch:
        return 0.0
    t = min(1.0, (epoch - start_epoch + 1) / max(pruning_epochs, 1))
    return float(SCHEDULES[schedule](final, t))
