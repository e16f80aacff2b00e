"""FilterPruning: progressive, group-aware filter pruning as one Keras callback."""

from __future__ import annotations

import importlib.resources
import json
import math
import numbers
import os
import pathlib
import warnings
from typing import Any, Iterable

import keras
import numpy as np

from tfcompress.graph import compensation
from tfcompress.graph.engine import ChannelGroup, Rule
from tfcompress.graph.flops import FlopsCounter
from tfcompress.graph.keras_adapter import KerasGraph, build_graph
from tfcompress.pruning.batch_statistics import BatchStatisticsAverage
from tfcompress.pruning.criteria import CRITERIA, importance
from tfcompress.pruning.masking import GroupMasks
from tfcompress.pruning.schedules import SCHEDULES, level_at
from tfcompress.pruning import latency, sensitivity

__all__ = ["FilterPruning"]

_ALLOCATIONS = ("uniform", "global", "global_per_flop", "global_per_latency", "sensitivity")
# round_to="auto": in a model of at least AUTO_ROUND_MIN_FLOPS per sample, groups of at least
# AUTO_ROUND_MIN_GROUP channels keep a multiple of AUTO_ROUND_MULTIPLE. OpenVINO's CPU kernels process channels
# in blocks (16 on AVX-512 CPUs, 8 on AVX2-only ones), so a kept count just past a multiple pays for a whole extra
# block (BENCHMARKS.md 9, "Channel count vs speed", "On an AVX2 CPU"). A multiple of 16 is aligned on both CPU
# classes, and a model is often pruned on one and deployed on the other. Narrower groups stay unrounded so that
# they remain prunable; smaller models are bound by per-layer overheads rather than by their convolutions'
# arithmetic (a 12-MFLOP MobileNetV2 ran 1.05x faster for 45 % fewer FLOPs), so rounding would only take freedom
# from their allocation.
AUTO_ROUND_MULTIPLE = 16
AUTO_ROUND_MIN_GROUP = 32
AUTO_ROUND_MIN_FLOPS = 2e8


@keras.saving.register_keras_serializable(package="tfcompress")
class FilterPruning(keras.callbacks.Callback):
    """Zero a growing fraction of every channel group's filters while ``model.fit`` trains.

    Adding the callback is the only change a training script needs::

        pruner = tfcompress.pruning.FilterPruning(target=0.4, pruning_epochs=10)
        model.fit(x, y, epochs=20, callbacks=[pruner])
        small = tfcompress.strip(model)

    At the start of each epoch of the ramp (``start_epoch`` .. ``start_epoch + pruning_epochs - 1``) the level
    given by the schedule is applied: in every group (coupled channels, see :func:`tfcompress.channel_groups`)
    the least important channels by ``criterion``, aggregated over the group's layers, are zeroed (kernel
    slices, biases, BatchNorm gamma and beta). Masks are re-selected at each step, so a channel may come
    back (with the weights it had when pruned). After every training batch the pruned weights are zeroed again,
    so they are exactly zero after every optimizer step, at every epoch end, in any checkpoint and after
    ``fit`` returns (also when the optimizer's ``use_ema`` swaps in averaged weights). With
    ``steps_per_execution=k`` Keras calls callbacks every ``k`` steps only, so the zeroing happens that often
    (a warning says so).

    Epochs count from the first ``fit`` the callback saw on the model: a later ``fit`` call with the same callback
    continues the schedule after the last epoch completed (and keeps a finished ramp's masks) rather than
    restarting it at its epoch 0; a ``fit`` that starts at a later epoch (``initial_epoch``, or
    ``keras.callbacks.BackupAndRestore`` resuming an interrupted run, in this process or a new one) continues it
    at that epoch.

    Each epoch's ``logs`` get ``pruning_level`` (fraction of prunable filters removed) and ``flops_ratio``
    (remaining / original FLOPs): the progress bar, ``History`` and a ``TensorBoard`` callback placed *after*
    this one show them.

    Args:
        target: fraction of each group's channels removed at the end, in [0, 1).
        flops_target: instead of ``target``, the FLOPs reduction to reach (e.g. 0.45 removes 45 % of the FLOPs).
        criterion: ``"l1"``, ``"l2"`` or ``"geometric_median"`` (FPGM) from the filters' weights, each filter
            scaled to its channel's gain where the next layer reads it (after BatchNorms and depthwise
            convolutions: :meth:`~tfcompress.pruning.masking.GroupMasks.gains`), or
            ``"emitted"``: what each channel emits into its consumers once its mean is handed over (its standard
            deviation at their inputs on ``compensation_data`` times their weights' norm; needs that data and
            ``compensate``; :func:`tfcompress.graph.compensation.emitted_importance`).
        schedule: ``"exponential"``, ``"polynomial"`` or ``"baseline"`` (the full level from ``start_epoch``).
        start_epoch: first epoch (0-based) that prunes.
        pruning_epochs: epochs over which the level ramps to its final value; masks are fixed afterwards
            (a run resumed after the ramp keeps the channels its checkpoint has zeroed; one resumed inside it
            with ``"sensitivity"`` measures the checkpoint's partly pruned weights, and warns).
        prune_first_conv: also prune layers fed directly by a model input.
        prune_downsample_convs: also prune groups containing a strided convolution.
        ignored_layers: names of layers never to prune (their whole group is left alone); a MultiHeadAttention's
            heads are named ``"<layer>:heads"`` (ignoring them keeps every head and still prunes the layer's output).
        flops_allocation: with ``flops_target``, ``"uniform"`` prunes the same fraction of every group;
            ``"global"`` ranks channels across groups (importance normalised per group) and prunes where it
            matters least, keeping at least ``1 - max_group_level`` of every group; ``"global_per_flop"``
            ranks by importance per FLOP a channel costs, so a channel of a high-resolution layer goes before
            an equally important one of a cheap layer: the FLOPs go for fewer weights (on ResNet-8 at 40 % of
            the FLOPs it keeps 64 k of 79 k parameters where ``"uniform"`` keeps 40 k; BENCHMARKS.md 1b);
            ``"sensitivity"`` measures, when pruning starts, how much the loss on ``sensitivity_data`` grows
            when each group alone loses its least important channels, then removes channels where the loss per
            FLOP saved is least (:mod:`tfcompress.pruning.sensitivity`; on ResNet-8 it beat
            ``"global_per_flop"`` after 4 epochs of fine-tuning and lost to it after 20: BENCHMARKS.md 1b).
            ``"global_per_latency"`` ranks by importance per second of inference a channel costs on the
            deployment target, from ``latency_profile``: a channel of a layer that runs slowly for its FLOPs
            (depthwise and memory-bound 1x1 convolutions) goes before an equally important one of a layer
            that runs at full arithmetic speed. ``flops_target`` stays the budget (the FLOPs removed), so
            allocations compare at equal FLOPs; the profile only decides where they are removed.
            Within a group, ``criterion`` still picks the channels.
        max_group_level: with a ``"global*"`` or ``"sensitivity"`` allocation, the largest fraction removed
            from one group.
        round_to: keep a multiple of ``round_to`` channels in every pruned group (or all of them, when the
            group has fewer than ``round_to`` or no smaller multiple fits the allocation). The allocation
            searches over these counts, so the FLOPs target is met with them rather than by rounding its
            result. OpenVINO's CPU kernels work on channels in blocks (16 on AVX-512 CPUs, 8 on AVX2-only
            ones), so a layer with 33 channels can cost as much as one with 48 (or 40). ``"auto"`` (the
            default): in models of at least 200 MFLOPs per sample, under ``flops_target`` with a ``"uniform"``
            or ``"global*"`` allocation, groups of at least 32 channels keep a multiple of 16 (aligned on both
            CPU classes) and narrower ones any count; no rounding in smaller models (bound by
            per-layer overheads, not by channel blocks), with ``target`` alone (a fraction of every group, which
            rounding would change) or with ``"sensitivity"``. Explicit multiples are not available with
            ``"sensitivity"`` (its loss table is probed at fixed channel steps).
        sensitivity_data: with ``flops_allocation="sensitivity"``, held-out ``(x, y)`` arrays or a batched
            ``tf.data.Dataset`` the compiled loss is measured on: a few thousand samples, in the format the
            compiled loss expects, preferably not trained on (the ResNet-8 benchmark uses 5,000 training images,
            not augmented). Not part of ``get_config``.
        latency_profile: with ``flops_allocation="global_per_latency"``, seconds per inference spent in each
            convolution/dense layer (layer name -> seconds), as measured by
            :func:`tfcompress.pruning.latency.measure_latency_profile` at the batch size and precision you deploy
            with (for an INT8 deployment: of the INT8 model, ``calibration_data=``, at ``precision=None``);
            layers it lacks are charged its mean seconds per FLOP. Not part of ``get_config``.
        compensate: when a channel is pruned, hand its contribution to the layers that read it (Conv/Dense
            biases, or the BatchNorm after a bias-less consumer): its exact constant where the channel is
            provably constant, else its mean on ``compensation_data``; taken back if the channel is revived.
            See :func:`tfcompress.zero_channels`.
        compensation_data: model inputs as ``fit`` takes them (an array; for several inputs a dict by input name
            or a tuple / list in input order; ``(x, y)`` of those; or a batched ``tf.data.Dataset``; a few hundred
            samples) on which the means of channels being pruned are measured at each schedule step, and on
            which the moving statistics of the BatchNorms after the changed channels are measured again (as
            training computes them: :func:`tfcompress.graph.compensation.refresh_batchnorm`), so that inference
            does not normalise with statistics of the unpruned network while they decay. Without it only
            provably constant channels are handed over, and the moving statistics come from the training
            batches (``average_batchnorm``). Not part of ``get_config``.
        average_batchnorm: without ``compensation_data``, after each schedule step that changes channels, set
            the moving statistics of the BatchNorms after them to the moving average Keras would keep of the
            batch statistics training computed since the change alone (its weights on those batches, divided by
            their total), until Keras' own average holds less than 1 % of what came before (459 steps at the
            default momentum 0.99) (:class:`~tfcompress.pruning.batch_statistics.BatchStatisticsAverage`: each
            step's statistics are taken out of the moving average's update, so nothing runs but the training
            steps, and training is unchanged). Otherwise inference would normalise with the unpruned network's
            statistics while they decay at ``1 - momentum`` per step. With ``steps_per_execution > 1`` it needs
            the number of steps per epoch (an input of known length, or ``steps_per_epoch``).
        verbose: 1 prints the level applied at each schedule step and a progress bar of the measurement.
    """

    def __init__(
        self,
        target: float = 0.4,
        flops_target: float | None = None,
        criterion: str = "geometric_median",
        schedule: str = "exponential",
        start_epoch: int = 0,
        pruning_epochs: int = 10,
        prune_first_conv: bool = False,
        prune_downsample_convs: bool = False,
        ignored_layers: Iterable[str] = (),
        flops_allocation: str = "uniform",
        max_group_level: float = 0.8,
        round_to: int | str = "auto",
        verbose: int = 0,
        sensitivity_data: Any = None,
        compensate: bool = True,
        compensation_data: Any = None,
        latency_profile: dict[str, float] | None = None,
        average_batchnorm: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(ignored_layers, str):
            ignored_layers = [ignored_layers]
        if ignored_layers is None:
            ignored_layers = ()
        self.target = _fraction("target", target)
        self.flops_target = None if flops_target is None else _fraction("flops_target", flops_target)
        self.criterion = _choice("criterion", criterion, [*CRITERIA, "emitted"])
        self.schedule = _choice("schedule", schedule, SCHEDULES)
        self.start_epoch = _count("start_epoch", start_epoch, minimum=0)
        self.pruning_epochs = _count("pruning_epochs", pruning_epochs, minimum=1)
        self.prune_first_conv = _bool("prune_first_conv", prune_first_conv)
        self.prune_downsample_convs = _bool("prune_downsample_convs", prune_downsample_convs)
        self.ignored_layers = tuple(ignored_layers)
        if not all(isinstance(n, str) for n in self.ignored_layers):
            raise ValueError(f"ignored_layers must be layer names (strings); got {list(self.ignored_layers)!r}")
        self.flops_allocation = _choice("flops_allocation", flops_allocation, _ALLOCATIONS)
        self.max_group_level = _fraction("max_group_level", max_group_level)
        self.round_to = "auto" if isinstance(round_to, str) and round_to == "auto" else \
            _count("round_to", round_to, minimum=1, alternative='"auto" or ')
        if not isinstance(verbose, (bool, int, np.integer)) or verbose < 0:
            raise ValueError(f"verbose must be 0 or 1 (or a bool), got {verbose!r}")
        self.verbose = int(verbose)
        if self.flops_allocation == "sensitivity":
            if self.flops_target is None:
                raise ValueError('flops_allocation="sensitivity" allocates a FLOPs budget: set flops_target')
            if self.round_to != "auto" and self.round_to > 1:
                raise ValueError(f'round_to={self.round_to} is not supported with flops_allocation="sensitivity" '
                                 "(its loss table is probed at fixed channel steps); use round_to=1 or another "
                                 "allocation")
            if sensitivity_data is None:
                raise ValueError('flops_allocation="sensitivity" needs sensitivity_data=(x, y) (held-out samples)')
            sensitivity_data = sensitivity.check_data(sensitivity_data)
        elif sensitivity_data is not None:
            raise ValueError(f'sensitivity_data is only used with flops_allocation="sensitivity" '
                             f"(got flops_allocation={self.flops_allocation!r})")
        self.sensitivity_data = sensitivity_data
        self.latency_profile = _profile(self.flops_allocation, self.flops_target, latency_profile)
        self.compensate = _bool("compensate", compensate)
        if compensation_data is not None and not self.compensate:
            raise ValueError("compensation_data is only used with compensate=True")
        self.compensation_data = compensation_data
        self.average_batchnorm = _bool("average_batchnorm", average_batchnorm)
        if self.criterion == "emitted" and compensation_data is None:
            raise ValueError('criterion="emitted" measures channels on data: set compensation_data (model inputs)')
        self._state: _State | None = None

    # ------------------------------------------------------------------ serialisation
    def get_config(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "flops_target": self.flops_target,
            "criterion": self.criterion,
            "schedule": self.schedule,
            "start_epoch": self.start_epoch,
            "pruning_epochs": self.pruning_epochs,
            "prune_first_conv": self.prune_first_conv,
            "prune_downsample_convs": self.prune_downsample_convs,
            "ignored_layers": list(self.ignored_layers),
            "flops_allocation": self.flops_allocation,
            "max_group_level": self.max_group_level,
            "round_to": self.round_to,
            "verbose": self.verbose,
            "compensate": self.compensate,
            "average_batchnorm": self.average_batchnorm,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], sensitivity_data: Any = None,
                    latency_profile: dict[str, float] | None = None) -> "FilterPruning":
        """Build from a dict (e.g. a ``tfcompress/configs/*.json`` section); unknown keys are rejected by name.

        Data cannot live in a config: a ``"sensitivity"`` allocation gets its ``sensitivity_data`` here, a
        ``"global_per_latency"`` one its ``latency_profile``.
        """
        if not isinstance(config, dict):
            raise ValueError(f"a FilterPruning config must be a JSON object, got {type(config).__name__}")
        allowed = set(cls().get_config())
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(f"unknown FilterPruning config key {unknown[0]!r}; allowed keys: {sorted(allowed)}")
        return cls(**config, sensitivity_data=sensitivity_data, latency_profile=latency_profile)

    # ------------------------------------------------------------------ schedule
    def level_at(self, epoch: int) -> float:
        """The scheduled level during ``epoch``: fraction of channels, or FLOPs reduction with flops_target."""
        final = self.flops_target if self.flops_target is not None else self.target
        return level_at(self.schedule, final, epoch, self.start_epoch, self.pruning_epochs)

    @property
    def groups(self) -> list[ChannelGroup]:
        """The groups being pruned (after ``on_train_begin``)."""
        return list(self._require().masks.groups)

    @property
    def masks(self) -> dict[tuple[str, ...], np.ndarray]:
        """Current keep mask of each pruned group, keyed by the group's layer names.

        Where a channel range (``x[..., a:b]``, ``keras.ops.split``) cut one layer's channels into several
        groups, those groups share their layer names and one entry: the keep mask of that layer's whole output.
        """
        st = self._require()
        parts: dict[tuple[str, ...], list[ChannelGroup]] = {}
        for g in st.masks.groups:
            parts.setdefault(g.layers, []).append(g)
        return {layers: st.masks.keep[gs[0].id].copy() if len(gs) == 1 else st.masks.layer_keep(layers[0])
                for layers, gs in parts.items()}

    @property
    def pruning_level(self) -> float:
        """Fraction of the prunable filters currently removed."""
        st = self._require()
        total = sum(g.size for g in st.masks.groups)
        return float(sum((~st.masks.keep[g.id]).sum() for g in st.masks.groups) / total)

    @property
    def flops_ratio(self) -> float:
        """Remaining FLOPs / original FLOPs with the current masks."""
        st = self._require()
        return st.counter.flops(st.masks.removed()) / st.full_flops

    def _require(self) -> "_State":
        if self._state is None:
            raise RuntimeError("FilterPruning has not seen a model yet: pass it to model.fit(callbacks=[...])")
        return self._state

    # ------------------------------------------------------------------ Keras hooks
    def on_train_begin(self, logs: dict | None = None) -> None:
        if self._state is None or self._state.model is not self.model:
            self._state = self._analyse(self.model)
            self._check_reachable()
            if self.flops_allocation == "sensitivity":
                sensitivity.check_fits(self.model, self.sensitivity_data)
        self._state.offset = None  # a new fit: set by its first epoch
        self._state.average_batchnorm = self.average_batchnorm and self.compensation_data is None
        steps = getattr(self.model, "steps_per_execution", 1)
        if isinstance(steps, int) and steps > 1:
            unknown = self._state.average_batchnorm and not (self.params or {}).get("steps")
            warnings.warn(
                f"the model is compiled with steps_per_execution={steps}: Keras calls callbacks once per "
                f"{steps} optimizer steps, so FilterPruning re-zeroes the pruned weights only that often and "
                "pruned channels train in between; compile with steps_per_execution=1 to keep them exactly zero "
                "after every step" + ("; the number of steps per epoch is unknown, so the last execution's is "
                                      "too, and the BatchNorm statistics are left to Keras' moving average "
                                      "(average_batchnorm; pass steps_per_epoch)" if unknown else ""),
                stacklevel=2)
            if unknown:
                self._state.average_batchnorm = False

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        st = self._require()
        # Keras numbers the epochs of every fit call from its initial_epoch (0 by default): a second fit from 0
        # on the same model continues the schedule after the last epoch completed instead of restarting its
        # ramp; a fit that starts later (initial_epoch, or BackupAndRestore resuming an interrupted fit) names
        # its epoch itself
        if st.offset is None:
            st.offset = st.next_epoch if epoch == 0 else 0
        epoch += st.offset
        in_ramp = self.start_epoch <= epoch < self.start_epoch + self.pruning_epochs
        after_ramp = epoch >= self.start_epoch + self.pruning_epochs
        level = self.level_at(epoch)
        current = {gid: int((~k).sum()) for gid, k in st.masks.keep.items()}
        # After the ramp the masks are fixed once they reach the final level. Re-ranking there would let a
        # weight-dependent allocation ("global*", "sensitivity") trade channels between groups every epoch,
        # reviving filters with stale weights, and a run resumed from a checkpoint would re-measure the
        # sensitivity table on already pruned weights.
        if not (after_ramp and self._reaches(current, level)):
            counts = self._counts(level)
            if st.resumed and st.next_epoch == 0 and sum(counts.values()) < sum(current.values()):
                warnings.warn(
                    f"FilterPruning: the model already has {sum(current.values())} pruned channels (a checkpoint "
                    f"of a pruned run?) and the schedule prunes {sum(counts.values())} at epoch {epoch + 1}: the "
                    "others come back; to resume a run, pass fit(initial_epoch=<the epoch it stopped at>)",
                    stacklevel=2)
            if in_ramp or counts != current:
                before = st.masks.keep
                st.masks.set(self._select(counts))
                changed = [gid for gid, k in st.masks.keep.items() if not np.array_equal(before[gid], k)]
                if changed and self.compensation_data is not None:
                    st.masks.apply()
                    compensation.refresh_batchnorm(self.model, self.compensation_data,
                                                   layers=st.masks.batchnorms_after(changed))
                elif changed and st.average_batchnorm:
                    st.bn_average.start(st.masks.batchnorms_after(changed))
                if self.verbose:
                    print(f"FilterPruning: epoch {epoch + 1}: pruning level {self.pruning_level:.3f}, "
                          f"FLOPs ratio {self.flops_ratio:.3f}")
        st.masks.apply()

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        st = self._require()
        st.execution_begin = batch
        st.bn_average.before_step()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        st = self._require()
        if st.execution_begin is not None:
            total = (self.params or {}).get("steps")  # the epoch's last execution may run fewer steps
            st.bn_average.after_step(min(batch, total - 1 if total else batch) - st.execution_begin + 1)
        st.execution_begin = None
        st.masks.apply()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        st = self._require()
        st.next_epoch = epoch + (st.offset or 0) + 1
        if logs is not None:
            logs["pruning_level"] = self.pruning_level
            logs["flops_ratio"] = self.flops_ratio

    def on_train_end(self, logs: dict | None = None) -> None:
        # fit() swaps in an optimizer's moving average of the weights (use_ema=True) just before this hook; the
        # average still holds what pruned channels had before they were pruned
        st = self._require()
        st.masks.apply()
        st.bn_average.stop()  # the next fit starts from the statistics as they are (the user may change them)

    # ------------------------------------------------------------------ internals
    def _analyse(self, model: keras.Model) -> "_State":
        kg = build_graph(model)
        names = set(kg.layers) | {rec.op.layer for rec in kg.records}  # with the parts of calls ("mha:heads")
        missing = [n for n in self.ignored_layers if n not in names]
        if missing:
            raise ValueError(
                f"ignored_layers names {missing} that are not layers of model {model.name!r} "
                f"(nested layers are named 'submodel/layer')"
            )
        all_groups = kg.groups()
        first = kg.first_layers(lambda rec: rec.op.rule is Rule.PRODUCER)
        strided = {rec.op.layer for rec in kg.records
                   if rec.op.rule is Rule.PRODUCER and rec.kind.strides() > 1}
        excluded = {"ignored_layers": set(self.ignored_layers),
                    "prune_first_conv=True": set() if self.prune_first_conv else first,
                    "prune_downsample_convs=True": set() if self.prune_downsample_convs else strided}
        left_out = {why: [g for g in all_groups if set(g.layers) & layers] for why, layers in excluded.items()}
        groups = [g for g in all_groups if not any(g in gs for gs in left_out.values())]
        if not groups:
            first_axis = [n for n, layer in kg.layers.items() if getattr(layer, "data_format", "") == "channels_first"]
            raise ValueError(_nothing_to_prune(model.name, len(all_groups), left_out, first_axis))
        masks = GroupMasks(kg, groups, compensate=self.compensate, data=self.compensation_data)
        counter = FlopsCounter(kg.graph)
        st = _State(model, kg, masks, counter, counter.flops())
        for g in groups:  # what one channel of each group costs, all other channels present
            one = np.zeros(g.size, dtype=bool)
            one[0] = True
            st.channel_flops[g.id] = st.full_flops - counter.flops({g.id: one})
        if self.latency_profile is not None:
            unknown = sorted(set(self.latency_profile) - names)
            if unknown:
                raise ValueError(f"latency_profile names {unknown[:5]} that are not layers of model {model.name!r}")
            st.channel_cost = latency.channel_seconds(counter, groups, self.latency_profile)
        else:
            st.channel_cost = st.channel_flops
        # resuming from a checkpoint: channels that are exactly zero were pruned before
        resumed = {g.id: ~masks.zero_channels(g) for g in groups}
        if any((~k).any() for k in resumed.values()):
            masks.set({gid: _keep_some(k, g.blocks) for (gid, k), g in zip(resumed.items(), groups)})
            st.resumed = True
        return st

    def _check_reachable(self) -> None:
        """Refuse, before training, a ``flops_target`` the prunable groups cannot reach: every group would be cut
        to its limit (one channel, or ``max_group_level``) and the target still missed."""
        st = self._require()
        if self.flops_target is None:
            return
        groups = st.masks.groups
        if self.flops_allocation == "uniform":
            most = {g.id: _aligned(g.size, g, self._multiple(g)) for g in groups}
        else:
            most = {g.id: self._cap(g) for g in groups}
        best = 1.0 - self._flops_of(most) / st.full_flops
        if best < self.flops_target - 1e-9:
            limit = "one channel per group" if self.flops_allocation == "uniform" else \
                f"max_group_level={self.max_group_level} of every group"
            raise ValueError(
                f"flops_target={self.flops_target} cannot be reached on model {self.model.name!r}: its prunable "
                f"groups ({len(groups)}, {sum(g.size for g in groups)} channels) cut to {limit} remove "
                f"{best:.1%} of its FLOPs; lower flops_target, or allow more (max_group_level, prune_first_conv, "
                "prune_downsample_convs, ignored_layers)")

    def _reaches(self, removed: dict[int, int], level: float) -> bool:
        """Whether removing ``removed`` channels per group already meets ``level`` (per group, or in FLOPs)."""
        if self.flops_target is None:  # per-group counts depend on the level alone: compare with them
            return all(removed[gid] >= n for gid, n in self._counts(level).items())
        # a FLOPs allocation may depend on the weights: ask only whether the FLOPs goal is met
        return self._flops_of(removed) <= (1.0 - level) * self._require().full_flops * (1.0 + 1e-9)

    def _counts(self, level: float) -> dict[int, int]:
        """Channels to remove per group for a level (a fraction, or a FLOPs reduction)."""
        st = self._require()
        groups = st.masks.groups
        if self.flops_target is None:
            return {g.id: _aligned(level * g.size, g, self._multiple(g)) for g in groups}
        if level <= 0:
            return {g.id: 0 for g in groups}
        goal = (1.0 - level) * st.full_flops
        if self.flops_allocation == "uniform":
            lo, hi = 0.0, 1.0
            for _ in range(40):
                mid = (lo + hi) / 2
                if self._flops_of({g.id: _aligned(mid * g.size, g, self._multiple(g)) for g in groups}) <= goal:
                    hi = mid
                else:
                    lo = mid
            return {g.id: _aligned(hi * g.size, g, self._multiple(g)) for g in groups}
        if self.flops_allocation == "sensitivity":
            return sensitivity.counts_for_goal(self._sensitivity_path(), goal, self._flops_of,
                                               {g.id: g.blocks for g in groups})
        return self._global_counts(goal)

    def _sensitivity_path(self) -> list[tuple[dict[int, int], float]]:
        """Measure the loss table once (on the weights pruning starts from), then the greedy allocation path."""
        st = self._require()
        if st.sensitivity_path is None:
            groups = st.masks.groups
            saved = {gid: k.copy() for gid, k in st.masks.keep.items()}

            def apply_counts(counts: dict[int, int] | None) -> None:
                st.masks.set(saved if counts is None else self._select(counts))

            if st.resumed:
                warnings.warn(
                    "FilterPruning resumed inside its ramp with flops_allocation='sensitivity': the loss of "
                    "pruning each group is measured on the checkpoint's partly pruned weights, not on the weights "
                    "pruning started from, so the allocation can differ from an uninterrupted run's; resume after "
                    "the ramp, or restart the ramp from the unpruned model, to reproduce it", stacklevel=2)
            if self.verbose:
                print("FilterPruning: measuring the loss of pruning each group on sensitivity_data")
            caps = {g.id: self._cap(g) for g in groups}
            table = sensitivity.loss_table(self.model, groups, apply_counts, self.sensitivity_data, caps,
                                           verbose=self.verbose)
            st.sensitivity_path = sensitivity.greedy_path(table, self._flops_of)
        return st.sensitivity_path

    def _global_counts(self, goal: float) -> dict[int, int]:
        """Rank channels across groups by importance normalised per group (and divided by the channel's cost,
        FLOPs or seconds, relative to the mean channel's, with ``"global_per_flop"`` / ``"global_per_latency"``);
        prune a prefix reaching ``goal``."""
        st = self._require()
        groups = st.masks.groups
        floor = 1e-30 if self.flops_allocation == "global_per_latency" else 1.0
        mean_cost = np.mean([max(st.channel_cost[g.id], floor) for g in groups])
        entries = []
        for g in groups:
            score = self._importance(g)
            score = np.sort(score / max(score.mean(), 1e-12))
            if self.flops_allocation in ("global_per_flop", "global_per_latency"):
                score = score / (max(st.channel_cost[g.id], floor) / mean_cost)
            entries += [(s, g.id, k + 1) for k, s in enumerate(score[: self._cap(g)])]
        entries.sort(key=lambda e: e[0])

        def counts_for(n: int) -> dict[int, int]:
            c = {g.id: 0 for g in groups}
            for _, gid, k in entries[:n]:
                c[gid] = max(c[gid], k)
            return {g.id: _aligned(c[g.id], g, self._multiple(g)) for g in groups}

        lo, hi = 0, len(entries)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._flops_of(counts_for(mid)) <= goal:
                hi = mid
            else:
                lo = mid + 1
        return counts_for(lo)

    def _importance(self, g: ChannelGroup) -> np.ndarray:
        """Importance of each channel of ``g`` by ``criterion`` (higher = keep)."""
        st = self._require()
        if self.criterion == "emitted":
            return compensation.emitted_importance(st.kg, g, self.compensation_data)
        return importance(self.criterion, st.masks.filters(g))

    def _cap(self, g: ChannelGroup) -> int:
        """The most channels a global or measured allocation may take from ``g`` (``max_group_level``)."""
        return _aligned(self.max_group_level * g.size, g, self._multiple(g))

    def _multiple(self, g: ChannelGroup) -> int:
        """The multiple ``g``'s kept channel count is rounded to (``round_to``, resolved for ``"auto"``)."""
        if self.round_to != "auto":
            return self.round_to
        if self.flops_target is None or self.flops_allocation == "sensitivity" \
                or self._require().full_flops < AUTO_ROUND_MIN_FLOPS:
            return 1
        return AUTO_ROUND_MULTIPLE if g.size >= AUTO_ROUND_MIN_GROUP else 1

    def _flops_of(self, counts: dict[int, int]) -> float:
        st = self._require()
        removed = {}
        for g in st.masks.groups:
            m = np.zeros(g.size, dtype=bool)
            m[: counts[g.id]] = True  # FLOPs depend on how many channels go, not on which
            removed[g.id] = m
        return st.counter.flops(removed)

    def _select(self, counts: dict[int, int]) -> dict[int, np.ndarray]:
        st = self._require()
        keep = {}
        for g in st.masks.groups:
            n = counts[g.id]
            k = np.ones(g.size, dtype=bool)
            if n:
                score = self._importance(g)
                # channels zero with nothing remembered (pruned before a restart) rank lowest: they stay out
                score = np.where(st.masks.zero_channels(g) & ~st.masks.keep[g.id], -np.inf, score)
                per_block = n // g.blocks
                blocks = score.reshape(g.blocks, -1)
                for b in range(g.blocks):
                    order = np.argsort(blocks[b], kind="stable")[:per_block]
                    k[b * blocks.shape[1] + order] = False
            keep[g.id] = k
        return keep


class _State:
    def __init__(self, model, kg: KerasGraph, masks: GroupMasks, counter: FlopsCounter, full_flops: float):
        self.model, self.kg, self.masks, self.counter, self.full_flops = model, kg, masks, counter, full_flops
        self.channel_flops: dict[int, float] = {}  # group id -> FLOPs one of its channels costs
        self.channel_cost: dict[int, float] = {}  # what the per-cost allocations divide by (FLOPs or seconds)
        self.sensitivity_path: list[tuple[dict[int, int], float]] | None = None  # "sensitivity" allocation
        self.resumed = False  # channels were already zero when training started (a checkpoint of a pruned run)
        self.next_epoch = 0  # the schedule's epoch after the last one this model completed with the callback
        self.offset: int | None = None  # added to the epochs Keras numbers in the current fit call
        self.average_batchnorm = False  # whether this fit averages the batch statistics after changes
        self.bn_average = BatchStatisticsAverage()
        self.execution_begin: int | None = None  # the first step of the execution running now


def _nothing_to_prune(name: str, n_groups: int, left_out: dict[str, list], channels_first: list[str]) -> str:
    """One line: why a model has no prunable group, and the options that would prune the groups left out."""
    why = [f"{len(gs)} {'in' if option == 'ignored_layers' else 'kept unless'} {option}"
           for option, gs in left_out.items() if gs]
    layout = (f"; {len(channels_first)} layer(s) have data_format='channels_first' ({', '.join(channels_first[:3])}"
              f"{', ...' if len(channels_first) > 3 else ''}): channels are followed on the last axis only, so "
              "build the model channels-last" if channels_first else "")
    return (f"model {name!r} has no prunable channel group: of its {n_groups} group(s) of channels that can be "
            f"pruned{', ' + ', '.join(why) if why else ''}; channels that reach a model output, a Lambda, an "
            "unregistered custom layer or a reshape across the channel axis are never pruned "
            f"(tfcompress.explain(model) gives each group's reason){layout}")


def _aligned(n: float, g: ChannelGroup, round_to: int = 1) -> int:
    """The most channels, at most ``n``, that can go from ``g`` while each of its blocks loses the same number,
    keeps at least one channel, and the channels kept number a multiple of ``round_to`` (0 if none can go)."""
    n = max(0, min(int(math.floor(n + 1e-9)), g.size - g.blocks))
    step = math.lcm(g.blocks, round_to)
    kept = -(-(g.size - n) // step) * step  # round the kept count up: remove fewer
    return g.size - kept if kept < g.size else 0


def _keep_some(keep: np.ndarray, blocks: int) -> np.ndarray:
    keep = keep.copy().reshape(blocks, -1)
    for b in range(blocks):
        if not keep[b].any():
            keep[b, 0] = True
    return keep.reshape(-1)


def _profile(allocation: str, flops_target: float | None, profile: Any) -> dict[str, float] | None:
    """The checked ``latency_profile``: required by ``"global_per_latency"`` only."""
    if allocation != "global_per_latency":
        if profile is not None:
            raise ValueError(f'latency_profile is only used with flops_allocation="global_per_latency" '
                             f"(got flops_allocation={allocation!r})")
        return None
    if flops_target is None:
        raise ValueError('flops_allocation="global_per_latency" allocates a FLOPs budget: set flops_target')
    if profile is None:
        raise ValueError('flops_allocation="global_per_latency" needs latency_profile= (layer name -> seconds, '
                         "from tfcompress.pruning.latency.measure_latency_profile)")
    if not isinstance(profile, dict) or not profile:
        raise ValueError(f"latency_profile must be a non-empty dict of layer name -> seconds, got {profile!r:.80}")
    out = {}
    for name, seconds in profile.items():
        if not isinstance(name, str) or not isinstance(seconds, (int, float, np.floating)) or not math.isfinite(seconds) \
                or seconds < 0:
            raise ValueError(f"latency_profile entry {name!r}: {seconds!r} is not a layer name -> seconds >= 0")
        out[name] = float(seconds)
    return out


def _fraction(name: str, value: Any) -> float:
    # numpy scalars too (a level taken from np.linspace is a np.float32 or np.float64)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _count(name: str, value: Any, minimum: int, alternative: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be {alternative}an integer >= {minimum}, got {value!r}")
    return int(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _choice(name: str, value: Any, options: Iterable[str]) -> str:
    options = list(options)
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; choose one of {options}")
    return value


def shipped_configs() -> list[str]:
    """The names of the configs installed with tfcompress (``tfcompress/configs/*.json``), for
    :func:`load_config`."""
    folder = importlib.resources.files("tfcompress") / "configs"
    return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".json")) if folder.is_dir() else []


def _config_file(config: str | os.PathLike):
    """The file :func:`load_config` reads for ``config``: an existing file, or else the shipped config of that
    name (``"resnet8_flops40"`` or ``"resnet8_flops40.json"``); ValueError when it is neither, naming the shipped
    config a missing path's file name would have found (the ``configs/...`` of a checkout)."""
    if os.path.isfile(config):
        return pathlib.Path(config)
    path = os.fspath(config)
    name = os.path.basename(path)
    name = name[:-5] if name.endswith(".json") else name
    shipped = shipped_configs()
    if name in shipped and name in (path, path[:-5]):  # a bare name, not a path to somewhere else
        return importlib.resources.files("tfcompress") / "configs" / f"{name}.json"
    if os.path.isdir(config):
        raise ValueError(f"config file {path!r} is a directory")
    hint = f"; tfcompress ships {name!r}: load_config({name!r})" if name in shipped else ""
    if os.sep in path or "/" in path or not isinstance(config, str):
        raise ValueError(f"config file {path!r} does not exist{hint}")
    raise ValueError(f"config {path!r} is neither a file nor a shipped config (shipped: {shipped})")


def load_config(path: str | os.PathLike, **pruning: Any) -> dict[str, Any]:
    """Read a tfcompress JSON config file and build what it describes.

    ``path``: a JSON file, or the name of a config shipped with tfcompress (:func:`shipped_configs`, e.g.
    ``"resnet8_flops40"``); an existing file of that name comes first. The file is a JSON object with one
    section per stage; today ``"pruning"`` (the arguments of :class:`FilterPruning`). Returns
    ``{"pruning": FilterPruning(...)}``. Errors name the offending key.

    ``pruning``: arguments of :class:`FilterPruning` that override or complete the config's ``"pruning"``
    section, e.g. ``load_config("resnet8_flops40", pruning_epochs=3)``, or the ``sensitivity_data`` /
    ``latency_profile`` an allocation needs, which a JSON file cannot hold.
    """
    try:
        data = json.loads(_config_file(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {os.fspath(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {os.fspath(path)!r} must hold a JSON object")
    if pruning and "pruning" not in data:
        raise ValueError(f"config file {os.fspath(path)!r} has no 'pruning' section for {sorted(pruning)}")
    data_args = {k: pruning.pop(k) for k in ("sensitivity_data", "latency_profile") if k in pruning}
    builders = {"pruning": lambda section: FilterPruning.from_config({**section, **pruning}, **data_args)}
    out = {}
    for key, section in data.items():
        if key in ("description", "comment"):
            continue
        if key not in builders:
            raise ValueError(f"unknown config section {key!r} in {os.fspath(path)!r}; known: {sorted(builders)}")
        try:
            out[key] = builders[key](section)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: section {key!r}: {e}") from None
    return out
