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

:class:`BatchStatisticsAverage` sets the moving statistics of the BatchNorms after a change to the plain average
of the batch statistics recovered since, as :func:`tfcompress.graph.compensation.refresh_batchnorm` does with
data, until they hold ``1 / (1 - m)`` batches: from there on Keras' own update gives a new batch the weight
(``1 - m``) the plain average would (``1 / (n + 1)``), and the BatchNorm is left to it.
"""

from __future__ import annotations

from typing import Iterable

import keras
import numpy as np

from tfcompress.graph import compensation

__all__ = ["BatchStatisticsAverage"]


class _Average:
    """One BatchNorm's batch statistics since the change, summed, and its moving statistics before a step."""

    def __init__(self, bn: keras.layers.BatchNormalization) -> None:
        self.bn = bn
        # the train step multiplies float32 values by these float32 constants
        self.keep = float(np.float32(bn.momentum))
        self.take = float(np.float32(1.0 - bn.momentum))
        self.window = 1.0 / (1.0 - bn.momentum)  # batches after which Keras' update weighs a batch as the average
        self.batches = 0
        self.sums = [np.zeros(tuple(bn.moving_mean.shape)), np.zeros(tuple(bn.moving_variance.shape))]
        self.before: list[np.ndarray] | None = None

    def variables(self) -> tuple:
        return self.bn.moving_mean, self.bn.moving_variance

    def read(self) -> None:
        self.before = [np.asarray(v, np.float64) for v in self.variables()]

    def add(self, steps: int) -> None:
        """Take the ``steps`` batches the last execution ran (their average as Keras weighed them: a step ``i``
        before its end by ``m ** i``) and set the moving statistics to the average of all since the change."""
        if self.before is None:  # nothing read before this execution
            return
        kept = self.keep ** steps
        taken = self.take * sum(self.keep ** i for i in range(steps))
        for k, (v, old) in enumerate(zip(self.variables(), self.before)):
            self.sums[k] += steps * (np.asarray(v, np.float64) - kept * old) / taken
        self.batches += steps
        self.before = None
        mean, var = (s / self.batches for s in self.sums)
        self.bn.moving_mean.assign(mean.astype(self.bn.moving_mean.dtype))
        # a channel whose input is constant has variance 0; rounding must not make it negative
        self.bn.moving_variance.assign(np.maximum(var, 0.0).astype(self.bn.moving_variance.dtype))


class BatchStatisticsAverage:
    """Keep the moving statistics of chosen BatchNorms at the average of the batch statistics training computed
    since they were chosen, for ``1 / (1 - momentum)`` batches (100 at Keras' default 0.99).

    Call :meth:`start` with the BatchNorms after changed channels, :meth:`before_step` in
    ``on_train_batch_begin`` and :meth:`after_step` in ``on_train_batch_end`` with the number of steps the
    execution ran (``steps_per_execution`` runs several between two callbacks). BatchNorms whose moving
    statistics training does not move at ``momentum`` (frozen, ``renorm``, ``momentum=1``) are left alone.
    """

    def __init__(self) -> None:
        self._tracked: dict[int, _Average] = {}

    @property
    def tracking(self) -> list[str]:
        """Names of the BatchNorms currently averaged."""
        return [t.bn.name for t in self._tracked.values()]

    def start(self, layers: Iterable[keras.layers.BatchNormalization]) -> None:
        """Average ``layers``' batch statistics from the next step on (again from zero for one already tracked)."""
        for bn in layers:
            if compensation.moves_with_batches(bn) and bn.momentum < 1.0:
                self._tracked[id(bn)] = _Average(bn)

    def stop(self, layers: Iterable[keras.layers.BatchNormalization] | None = None) -> None:
        """Leave ``layers`` (all, without) to Keras' update from now on, with the statistics they have."""
        if layers is None:
            self._tracked.clear()
        for bn in layers or ():
            self._tracked.pop(id(bn), None)

    def before_step(self) -> None:
        """Read the moving statistics before an execution of the training step."""
        for t in self._tracked.values():
            t.read()

    def after_step(self, steps: int) -> None:
        """Recover the batch statistics of the ``steps`` steps just run and set the moving statistics to the
        average since the start; BatchNorms that hold enough batches are left to Keras."""
        for key, t in list(self._tracked.items()):
            t.add(steps)
            if t.batches >= t.window - 1e-9:
                del self._tracked[key]
