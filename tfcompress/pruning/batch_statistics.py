"""BatchNorm moving statistics after a pruning step, from the batch statistics training computes anyway.

When pruning removes or revives channels, the BatchNorms after them receive another distribution. Training
normalises each batch with its own statistics, but Keras moves the moving ones (which inference uses) towards
them at ``1 - momentum`` per step: ``moving = m * moving + (1 - m) * batch``. For hundreds of steps inference
then normalises with the unpruned network's statistics. That update can be inverted: read before and after a
step, the moving statistics give the batch's own, ``batch = (new - m * old) / (1 - m)``, exactly as the layer
computed them (mean and biased variance, with its mask, synchronised across replicas or not). No data beyond
the training batches is needed and the training step is not touched (the moving statistics do not enter it).
The inversion multiplies the float32 rounding of the moving statistics by ``1 / (1 - m)`` (100): about 1e-5 of
the moving value, which matters only for a statistic that shrank by orders of magnitude.

:class:`BatchStatisticsAverage` sets the moving statistics of the BatchNorms after a change to the moving
average Keras would keep had they been created at the change: its exponential weights on the batches since,
divided by the total weight those hold (``1 - m ** n`` after ``n`` steps), with nothing of the statistics before.
The first batch after the change counts alone, as a refresh on data would; recent batches count more than
earlier ones, so the statistics follow the weights as training recovers from the change. Once ``m ** n`` falls
to 1 % (459 steps at Keras' default 0.99), Keras' own update weighs the batches within 1 % of this average, and
the BatchNorm is left to it.
"""

from __future__ import annotations

from typing import Iterable

import keras
import numpy as np

from tfcompress.graph import compensation

__all__ = ["BatchStatisticsAverage"]


class _Average:
    """One BatchNorm whose moving statistics are kept at Keras' average of the batches since the change alone."""

    def __init__(self, bn: keras.layers.BatchNormalization) -> None:
        self.bn = bn
        # the train step multiplies float32 values by these float32 constants
        self.keep = float(np.float32(bn.momentum))
        self.take = float(np.float32(1.0 - bn.momentum))
        self.steps = 0
        self.before: list[np.ndarray] | None = None

    def weight(self, n: int) -> float:
        """The total weight Keras' average gives the last ``n`` batches."""
        return self.take * (1.0 - self.keep ** n) / (1.0 - self.keep)

    def variables(self) -> tuple:
        return self.bn.moving_mean, self.bn.moving_variance

    def read(self) -> None:
        self.before = [np.asarray(v, np.float64) for v in self.variables()]

    def add(self, steps: int) -> None:
        """Take the ``steps`` batches the last execution ran: Keras gave the statistics before it the weight
        ``m ** steps``, of which only the batches since the change (``weight(self.steps)``) are kept."""
        if self.before is None:  # nothing read before this execution
            return
        stale = self.keep ** steps * (1.0 - self.weight(self.steps))
        self.steps += steps
        total = self.weight(self.steps)
        mean, var = ((np.asarray(v, np.float64) - stale * old) / total
                     for v, old in zip(self.variables(), self.before))
        self.before = None
        self.bn.moving_mean.assign(mean.astype(self.bn.moving_mean.dtype))
        # a channel whose input is constant has variance 0; rounding must not make it negative
        self.bn.moving_variance.assign(np.maximum(var, 0.0).astype(self.bn.moving_variance.dtype))

    @property
    def done(self) -> bool:
        """Whether Keras' own average from here on is within 1 % of this one."""
        return self.keep ** self.steps <= 0.01


class BatchStatisticsAverage:
    """Keep the moving statistics of chosen BatchNorms at Keras' moving average of the batch statistics training
    computed since they were chosen, without what came before, until ``momentum ** steps`` reaches 1 %.

    Call :meth:`start` with the BatchNorms after changed channels, :meth:`before_step` in
    ``on_train_batch_begin`` and :meth:`after_step` in ``on_train_batch_end`` with the number of steps the
    execution ran (``steps_per_execution`` runs several between two callbacks). BatchNorms whose moving
    statistics training does not move at ``momentum`` (frozen, ``renorm``, ``momentum=1``) are left alone.
    """

    def __init__(self) -> None:
        self._tracked: dict[int, _Average] = {}

    def start(self, layers: Iterable[keras.layers.BatchNormalization]) -> None:
        """Average ``layers``' batch statistics from the next step on (again from zero for one already tracked)."""
        for bn in layers:
            if compensation.moves_with_batches(bn) and bn.momentum < 1.0:
                self._tracked[id(bn)] = _Average(bn)

    def stop(self) -> None:
        """Leave every BatchNorm to Keras' update from now on, with the statistics it has."""
        self._tracked.clear()

    def before_step(self) -> None:
        """Read the moving statistics before an execution of the training step."""
        for t in self._tracked.values():
            t.read()

    def after_step(self, steps: int) -> None:
        """Take the ``steps`` steps just run out of the moving statistics' update and set them to the average
        since the start; BatchNorms whose average Keras' own update now keeps within 1 % are left to it."""
        for key, t in list(self._tracked.items()):
            t.add(steps)
            if t.done:
                del self._tracked[key]
