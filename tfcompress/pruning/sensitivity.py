"""Data-driven FLOPs allocation: where removing channels costs the least loss per FLOP saved.

Norm criteria say which channels of a group matter least, but not how much a group as a whole can lose:
whether 75 % of a 32x32 stage costs less accuracy than 25 % of the last stage is an empirical question. This
module answers it once, on data the user holds out: for every group alone it zeroes the ``n`` least
important channels for a few ``n`` (the other groups intact) and records the loss increase. A greedy search
then spends the FLOPs budget step by step on the group whose next step costs the least loss per FLOP saved
(the idea of a learned global ranking, e.g. LeGR, measured directly instead of learned). Measured on ResNet-8 /
CIFAR-10 at 40 % of the FLOPs (BENCHMARKS.md 1b) it beats the data-free per-FLOP ranking by 1 point after 4
epochs of fine-tuning but loses 0.7-1.8 points to it after 20: the loss right after pruning underrates the
capacity that long fine-tuning can use, and this measure lets more weights go.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from tfcompress.graph.engine import ChannelGroup

__all__ = ["check_data", "check_fits", "loss_table", "greedy_path", "counts_for_goal", "probe_points"]

Counts = dict[int, int]


def check_data(data: Any) -> Any:
    """``(x, y)`` arrays of equal length, or a batched ``tf.data.Dataset`` of ``(x, y)``; else ValueError."""
    if isinstance(data, tf.data.Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        nx, ny = _samples(x), _samples(y)
        if nx > 0 and nx == ny:
            return (x, y)
        raise ValueError(f"sensitivity_data=(x, y) needs x and y of the same non-zero length; got {nx} and {ny}")
    raise ValueError(
        f"sensitivity_data must be (x, y) arrays or a tf.data.Dataset of (x, y) batches; got {type(data).__name__}"
    )


def _samples(x: Any) -> int:
    """The number of samples of an array, or of a dict / list of arrays (a multi-input model's x); -1 when
    it has no length or its arrays disagree."""
    try:
        lengths = {len(a) for a in keras.tree.flatten(x)}
    except TypeError:
        return -1
    return lengths.pop() if len(lengths) == 1 else -1


def _head(x: Any, n: int) -> Any:
    return keras.tree.map_structure(lambda a: a[:n], x)


def check_fits(model: keras.Model, data: Any) -> None:
    """Evaluate the compiled loss on a few samples of ``data`` so that data in the wrong format fails when
    training starts, with a ValueError that says what to do, not at the first schedule step from inside
    ``model.evaluate``."""
    head = data.take(1) if isinstance(data, tf.data.Dataset) else (_head(data[0], 8), _head(data[1], 8))
    try:
        _loss(model, head)
    except (ValueError, TypeError, tf.errors.OpError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"sensitivity_data does not fit the compiled loss of model {model.name!r}; give it in the format "
            f"the loss expects (with DistillationLoss, pass it through with_teacher like the training data): "
            f"{first_line}"
        ) from None
    finally:
        model.reset_metrics()


def _loss(model: keras.Model, data: Any, batch_size: int = 256) -> float:
    """The model's compiled loss (with any ``add_loss`` terms) on ``(x, y)`` arrays or a batched dataset."""
    if isinstance(data, tf.data.Dataset):
        out = model.evaluate(data, verbose=0, return_dict=True)
    else:
        out = model.evaluate(data[0], data[1], batch_size=batch_size, verbose=0, return_dict=True)
    return float(out["loss"])


def probe_points(blocks: int, cap: int, max_probes: int = 12) -> list[int]:
    """Channel counts to try removing from one group: multiples of its block count, at most ``max_probes``."""
    if cap < blocks:
        return []
    step = max(blocks, int(np.ceil(cap / max_probes / blocks)) * blocks)
    points = list(range(step, cap + 1, step))
    if points[-1] != cap - cap % blocks:
        points.append(cap - cap % blocks)
    return points


def loss_table(
    model: keras.Model,
    groups: list[ChannelGroup],
    apply_counts: Callable[[Counts | None], None],
    data: Any,
    caps: Counts,
    batch_size: int = 256,
    verbose: int = 0,
) -> dict[int, dict[int, float]]:
    """Loss increase of each group with its ``n`` least important channels removed, the others intact.

    ``apply_counts(counts)`` puts the model in that pruned state (``None`` restores the state it was in). The
    loss is the model's compiled loss on ``data``. Returns ``{group id: {n: loss increase}}`` with ``n = 0``
    mapped to 0.
    """

    def loss() -> float:
        return _loss(model, data, batch_size)

    points = {g.id: probe_points(g.blocks, caps[g.id]) for g in groups}
    bar = keras.utils.Progbar(1 + sum(len(p) for p in points.values()), unit_name="probe") if verbose else None
    none = {g.id: 0 for g in groups}
    try:
        apply_counts(none)
        base = loss()
        if bar:
            bar.add(1)
        table = {}
        for g in groups:
            table[g.id] = {0: 0.0}
            for n in points[g.id]:
                apply_counts({**none, g.id: n})
                table[g.id][n] = loss() - base
                if bar:
                    bar.add(1)
    finally:
        apply_counts(None)
        model.reset_metrics()  # evaluate() left its values in the metrics the running epoch accumulates into
    return table


def greedy_path(table: dict[int, dict[int, float]], flops_of: Callable[[Counts], float]) -> list[tuple[Counts, float]]:
    """Allocations of growing FLOPs savings: each step takes one group to its next probe point, the group
    whose step costs the least loss per FLOP saved.

    The measured loss is noisy and a step may lower it, which only makes that step cheap. The path is the same
    whatever the FLOPs goal (the goal only says where to stop), so it is computed once and ``counts_for_goal``
    walks it.
    """
    points = {gid: sorted(row) for gid, row in table.items()}
    counts = {gid: 0 for gid in table}
    current = flops_of(counts)
    path = [(dict(counts), current)]
    while True:
        best: tuple[float, int, int, float] | None = None
        for gid, row in table.items():
            later = [n for n in points[gid] if n > counts[gid]]
            if not later:
                continue
            flops = flops_of({**counts, gid: later[0]})
            if flops >= current:
                continue
            cost = (row[later[0]] - row[counts[gid]]) / (current - flops)
            if best is None or cost < best[0]:
                best = (cost, gid, later[0], flops)
        if best is None:
            return path
        _, gid, n, current = best
        counts[gid] = n
        path.append((dict(counts), current))


def counts_for_goal(path: list[tuple[Counts, float]], goal: float, flops_of: Callable[[Counts], float],
                    blocks: Counts) -> Counts:
    """The first allocation on ``path`` with at most ``goal`` FLOPs (the last one if none reaches it), its
    last step shortened to the fewest channels (in multiples of the group's ``blocks``) that reach the goal."""
    for i, (counts, flops) in enumerate(path):
        if flops <= goal:
            break
    else:
        return dict(path[-1][0])
    if i == 0:
        return dict(counts)
    before = path[i - 1][0]
    (gid,) = [g for g in counts if counts[g] != before[g]]
    lo, hi = before[gid] // blocks[gid] + 1, counts[gid] // blocks[gid]  # in blocks; hi is known to reach
    while lo < hi:
        mid = (lo + hi) // 2
        if flops_of({**counts, gid: mid * blocks[gid]}) <= goal:
            hi = mid
        else:
            lo = mid + 1
    return {**counts, gid: hi * blocks[gid]}
