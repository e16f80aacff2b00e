"""Filter importance criteria, computed over all producing layers of a channel group.

Each layer's filters are rows of its kernel (one row per output channel). Layers in a group can have very
different scales (a 3x3x256 conv and a squeeze-excite Dense), so each layer's rows are divided by that
layer's mean filter norm before they are combined: every layer then has the same say.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["CRITERIA", "importance", "l1", "l2", "geometric_median"]


def _normalised(rows: np.ndarray, ord: int) -> np.ndarray:
    norms = np.linalg.norm(rows, ord=ord, axis=1)
    scale = norms.mean()
    return rows / scale if scale > 0 else rows


def l1(layers: Sequence[np.ndarray]) -> np.ndarray:
    """Sum over layers of each filter's L1 norm (normalised per layer): small filters matter little."""
    return sum(np.abs(_normalised(r, 1)).sum(axis=1) for r in layers)


def l2(layers: Sequence[np.ndarray]) -> np.ndarray:
    """Sum over layers of each filter's L2 norm (normalised per layer)."""
    return sum(np.linalg.norm(_normalised(r, 2), axis=1) for r in layers)


def geometric_median(layers: Sequence[np.ndarray]) -> np.ndarray:
    """FPGM (He et al., CVPR 2019): filters close to the group's geometric median are the most replaceable.

    Importance of filter i is the sum of its Euclidean distances to all other filters, the channels' filters
    of every layer of the group concatenated.
    """
    x = np.concatenate([_normalised(r, 2) for r in layers], axis=1).astype(np.float64)
    sq = (x * x).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    return np.sqrt(d2).sum(axis=1)


CRITERIA: dict[str, Callable[[Sequence[np.ndarray]], np.ndarray]] = {
    "l1": l1,
    "l2": l2,
    "geometric_median": geometric_median,
}


def importance(criterion: str, layers: Sequence[np.ndarray]) -> np.ndarray:
    """Importance of each channel of a group (higher = keep) from its layers' filter rows."""
    return CRITERIA[criterion]([np.asarray(r, np.float64) for r in layers])
