"""The channel-dependency engine: one description of how channels flow through a network.

Pruning, the Keras stripper and the SavedModel stripper all need the same answer to one question:
*which output channels are coupled, so that removing channel j here forces removing channel j there?*
This module answers it once, on a backend-neutral graph of :class:`Op` objects.  Adapters
(:mod:`tfcompress.graph.keras_adapter`, :mod:`tfcompress.graph.graphdef_adapter`) only translate their
framework's operations into one of a handful of channel rules (:class:`Rule`).

Vocabulary
----------
* A **space** is a set of channels created by one operation (a convolution's filters, a model input).
  Every tensor's last axis is described by a :class:`ChannelMap`: a sequence of :class:`Segment` s, each a run
  of channels of one space (concatenation makes several segments; a depthwise multiplier repeats channels;
  ``Flatten`` tiles them).
* Elementwise joins (``Add``, ``Multiply`` ...) **union** the spaces of their inputs: the union is a
  **group**, whose channels can only be removed together. Where the inputs' segments do not line up (a
  convolution added to a ``Concatenate``), a space is first **split** into consecutive parts that mirror the
  other side's segments, each part a group of its own.
* A space that reaches an operation the engine does not understand, or a model output, is **blocked**.
  A group with a blocked space is never pruned.

Beyond the structure, :meth:`ChannelGraph.removable_channels` decides which channels can be *physically*
removed: it propagates, per channel, whether a tensor is a known constant (0 for a properly zeroed channel)
and accepts a channel only when every consumer sees exactly zero, or a constant it can fold into its bias.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Callable, Collection, Protocol, Sequence

import numpy as np

__all__ = [
    "Rule",
    "Segment",
    "ChannelMap",
    "Op",
    "OpSemantics",
    "ChannelGroup",
    "ChannelGraph",
]


class Rule(enum.Enum):
    """How an operation maps the channels (last axis) of its inputs to its outputs."""

    INPUT = "input"  # a graph input: a new, blocked space
    PRODUCER = "producer"  # consumes its input channels, creates a new space (Conv, Dense)
    ELEMENTWISE = "elementwise"  # one input, channels pass through (BN, activations, pooling, padding)
    DEPTHWISE = "depthwise"  # channels pass through, each repeated `channels` times (depth multiplier)
    JOIN = "join"  # several inputs combined channel by channel (Add, Multiply, Maximum ...)
    CONCAT = "concat"  # inputs concatenated along the channel axis
    FLATTEN = "flatten"  # the channel map is tiled `channels` times (Flatten of an HxWxC tensor)
    SLICE = "slice"  # each output is a range of consecutive input channels (`slices`): x[..., a:b], split
    CONTRACT = "contract"  # sums the channels of its `contracted` inputs together (joined, read as a producer
    # reads them); the first output carries the channels of input `passed` one to one (attention, matmul)
    BLOCKER = "blocker"  # anything else: the channels reaching it can never be removed
    SHAPE = "shape"  # reads only its input's shape (batch size): a new blocked output, inputs untouched


@dataclasses.dataclass(frozen=True)
class Segment:
    """Channels ``start:stop`` of ``space``, each repeated ``repeat`` times in a row."""

    space: int
    start: int
    stop: int
    repeat: int = 1

    @property
    def width(self) -> int:
        return (self.stop - self.start) * self.repeat


@dataclasses.dataclass(frozen=True)
class ChannelMap:
    """What each channel of a tensor's last axis is: ``segments`` concatenated, the whole tiled ``tile`` times."""

    segments: tuple[Segment, ...]
    tile: int = 1

    @property
    def width(self) -> int:
        return self.tile * sum(s.width for s in self.segments)

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(space, channel) of every position of the tensor's channel axis, as two int arrays."""
        spaces, chans = [], []
        for s in self.segments:
            ch = np.repeat(np.arange(s.start, s.stop), s.repeat)
            chans.append(ch)
            spaces.append(np.full(ch.shape, s.space))
        sp = np.concatenate(spaces) if spaces else np.zeros(0, int)
        ch = np.concatenate(chans) if chans else np.zeros(0, int)
        return np.tile(sp, self.tile), np.tile(ch, self.tile)


class OpSemantics(Protocol):
    """What an adapter tells the engine about an op's values (needed only for stripping)."""

    def const_out(self, in_consts: list[np.ndarray]) -> list[np.ndarray]:
        """Per-channel constant value of each output given those of the inputs (NaN = not constant)."""

    def can_fold(self, input_index: int) -> bool:
        """Whether a non-zero constant input channel can be removed by folding it into the bias."""


@dataclasses.dataclass
class Op:
    """One operation of the graph, as the engine sees it.

    Attributes:
        name: unique name of this op (one call of a layer).
        rule: its channel rule.
        inputs, outputs: tensor ids.
        layer: name of the parameter owner; calls of a shared layer share it.
        channels: PRODUCER/INPUT/BLOCKER: output channel count; DEPTHWISE: depth multiplier;
            FLATTEN: tile factor.
        blocks: for grouped convolutions, the number of groups: channels are removed in equal numbers
            from each contiguous block of the input and output.
        has_channel_params: the op holds per-input-channel parameters (kernel rows, BN vectors), so all
            calls of a shared layer must see the same input channels.
        semantics: values for stripping; ``None`` means identity (ELEMENTWISE), sum (JOIN) etc.
        reads_all_channels: a non-producer whose every output depends on all its input channels (a
            LayerNormalization's statistics): like a producer's input, a channel may leave it only as 0 or
            as a constant its semantics can account for (``can_fold``).
        mixes_outputs: why the op's output channels depend on each other (a convolution or dense layer with
            a softmax activation: removing one changes the others), or ``""``: if set, they are blocked.
        slices: SLICE: for each output, the ``(start, stop)`` of the input channels it is.
        contracted: CONTRACT: the inputs whose channel axes are summed over together (``q . k``, or
            ``tanh(q + k)`` summed over the channels): channel j of each meets channel j of the others, so they
            are joined, and a channel may leave only where it adds nothing (0, or a constant the op can fold).
        passed: CONTRACT: the input whose channels the first output carries one to one (the value of an
            attention, the right operand of ``weights @ v``), or None: the outputs carry no tracked channels.
            An input neither contracted nor passed has its channels moved off the channel axis: it is blocked.
    """

    name: str
    rule: Rule
    inputs: list[int]
    outputs: list[int]
    layer: str = ""
    channels: int = 0
    blocks: int = 1
    has_channel_params: bool = False
    semantics: OpSemantics | None = None
    reads_all_channels: bool = False
    mixes_outputs: str = ""
    slices: tuple[tuple[int, int], ...] = ()
    contracted: tuple[int, ...] = ()
    passed: int | None = None

    def __post_init__(self) -> None:
        if not self.layer:
            self.layer = self.name


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Layers whose output channels are coupled and must be pruned together.

    Attributes:
        layers: names of the producing layers (Conv2D, Dense ...), in graph order. A layer added to a
            concatenation is in one group per concatenated part (each holding that part of its channels).
        size: number of channels of the group (the same for every layer in it).
        blocks: channels must be removed in equal numbers from each of ``blocks`` contiguous blocks
            (1 unless a grouped convolution reads or writes them).
        id: the group's identifier inside the graph it came from.
        reason: why the group cannot be pruned; empty for a prunable group.
    """

    layers: tuple[str, ...]
    size: int
    blocks: int = 1
    id: int = -1
    reason: str = ""

    def __repr__(self) -> str:
        why = f", reason={self.reason!r}" if self.reason else ""
        return f"ChannelGroup(layers={list(self.layers)}, size={self.size}, blocks={self.blocks}{why})"


@dataclasses.dataclass
class _Space:
    size: int
    producers: list[str]
    blocked: bool = False
    blocks: int = 1
    reason: str = ""  # why it is blocked (the first cause met)
    parts: list[int] = dataclasses.field(default_factory=list)  # the spaces it was split into, in order


class ChannelGraph:
    """A graph of :class:`Op` s in topological order, analysed into channel groups on construction.

    Args:
        ops: the operations, each after the ops producing its inputs.
        input_tensors: ids of the graph inputs (their INPUT ops must be in ``ops``).
        output_tensors: ids of the graph outputs (their channels are blocked).
        tensor_width: channel count of every tensor id.
    """

    def __init__(
        self,
        ops: Sequence[Op],
        output_tensors: Sequence[int],
        tensor_width: dict[int, int],
    ) -> None:
        self.ops = list(ops)
        self.output_tensors = list(output_tensors)
        self.tensor_width = dict(tensor_width)
        self._spaces: list[_Space] = []
        self._parent: list[int] = []
        self.maps: dict[int, ChannelMap] = {}
        # (op, input index) for every op that consumes (reads through parameters) a tensor's channels
        self.consumers: list[tuple[Op, int]] = []
        self._analyse()
        self._roots_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._root_ids_cache: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ union-find over spaces
    def _new_space(self, size: int, producer: str | None = None, blocked: bool = False) -> int:
        self._spaces.append(_Space(size, [producer] if producer else [], blocked))
        self._parent.append(len(self._parent))
        return len(self._spaces) - 1

    def root(self, space: int) -> int:
        while self._parent[space] != space:
            self._parent[space] = self._parent[self._parent[space]]
            space = self._parent[space]
        return space

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra == rb:
            return
        sa, sb = self._spaces[ra], self._spaces[rb]
        self._parent[rb] = ra
        sa.producers += [p for p in sb.producers if p not in sa.producers]
        sa.blocked = sa.blocked or sb.blocked
        sa.reason = sa.reason or sb.reason
        sa.blocks = math.lcm(sa.blocks, sb.blocks)

    def _block(self, cmap: ChannelMap, reason: str = "") -> None:
        for s in self._resolve(cmap).segments:
            sp = self._spaces[self.root(s.space)]
            sp.blocked = True
            sp.reason = sp.reason or reason

    def _fresh(self, tensor: int, blocked: bool, producer: str | None = None, source: str = "") -> ChannelMap:
        width = self.tensor_width.get(tensor) or 0
        space = self._new_space(width, producer, blocked)
        if blocked:  # channels nobody tracks: whatever they are joined with is blocked too
            self._spaces[space].reason = f"joined with the untracked output of {source!r}"
        return ChannelMap((Segment(space, 0, width),))

    def _whole(self, cmap: ChannelMap) -> bool:
        """True when ``cmap`` is made of whole, unrepeated spaces (the only maps the engine joins)."""
        return cmap.tile == 1 and all(
            s.repeat == 1 and s.start == 0 and s.stop == self._spaces[s.space].size for s in cmap.segments
        )

    def _resolve(self, cmap: ChannelMap) -> ChannelMap:
        """``cmap`` over the current spaces: a segment of a space that was split becomes segments of its parts."""
        return dataclasses.replace(cmap, segments=tuple(p for s in cmap.segments for p in self._parts(s)))

    def _parts(self, s: Segment) -> list[Segment]:
        out, offset = [], 0
        for child in self._spaces[self.root(s.space)].parts:
            lo, hi = max(s.start, offset), min(s.stop, offset + self._spaces[child].size)
            if lo < hi:
                out += self._parts(Segment(child, lo - offset, hi - offset, s.repeat))
            offset += self._spaces[child].size
        return out or [s]

    def _split(self, space: int, cuts: list[int]) -> bool:
        """Split the group of ``space`` at channel offsets ``cuts`` into consecutive parts, each a group of its
        own with the same producers (and blocked state); False for a grouped convolution's channels."""
        sp = self._spaces[self.root(space)]
        if sp.blocks > 1:
            return False
        edges = [0, *cuts, sp.size]
        for a, b in zip(edges, edges[1:]):
            self._spaces.append(dataclasses.replace(sp, size=b - a, producers=list(sp.producers), parts=[]))
            self._parent.append(len(self._parent))
            sp.parts.append(len(self._spaces) - 1)
        return True

    def _join(self, maps: list[ChannelMap]) -> bool:
        """Union the spaces of maps channel by channel; False if they cannot be made to line up.

        A whole space facing several segments on another input (a convolution added to a concatenation) is
        split to mirror them, part i joining segment i; splits repeat until every input's segments line up.
        """
        while True:
            maps = [self._resolve(m) for m in maps]
            if len({m.width for m in maps}) != 1 or not all(self._whole(m) for m in maps):
                return False
            cuts = set().union(*(np.cumsum([s.width for s in m.segments]).tolist() for m in maps))
            inside = [(s.space, offsets) for m in maps for s, offsets in _edges(m, cuts) if offsets]
            if not inside:
                break
            if not self._split(*inside[0]):
                return False
        for m in maps[1:]:
            for s, t in zip(maps[0].segments, m.segments):
                self._union(s.space, t.space)
        return True

    def _slice(self, cmap: ChannelMap, bounds: Sequence[tuple[int, int]]) -> list[ChannelMap] | None:
        """The maps of channel ranges ``bounds`` of ``cmap``: a space a bound falls inside is split there (each part
        a group of its own, as for a join), so every range is made of whole spaces; None if that cannot be
        (repeated or tiled channels, a grouped convolution's)."""
        cuts = {c for ab in bounds for c in ab}
        while True:
            cmap = self._resolve(cmap)
            if not self._whole(cmap):
                return None
            inside = [(s.space, offsets) for s, offsets in _edges(cmap, cuts) if offsets]
            if not inside:
                break
            if not self._split(*inside[0]):
                return None
        starts = np.cumsum([0] + [s.width for s in cmap.segments]).tolist()
        return [ChannelMap(tuple(s for s, lo, hi in zip(cmap.segments, starts, starts[1:]) if a <= lo and hi <= b))
                for a, b in bounds]

    # ------------------------------------------------------------------ structure
    def _analyse(self) -> None:
        layer_space: dict[str, int] = {}
        layer_inputs: dict[str, list[ChannelMap]] = {}
        for op in self.ops:
            ins = [self._resolve(self.maps[t]) for t in op.inputs]
            out: ChannelMap
            if op.has_channel_params and ins:
                # a shared layer: every call must read the same channels through the same parameters
                if op.layer in layer_inputs:
                    for prev, cur in zip(layer_inputs[op.layer], ins):
                        if not self._join([prev, cur]):
                            why = f"the calls of shared layer {op.layer} read different channels"
                            self._block(prev, why)
                            self._block(cur, why)
                else:
                    layer_inputs[op.layer] = ins
            if op.reads_all_channels:
                self.consumers += [(op, i) for i in range(len(ins))]
            if op.rule in (Rule.INPUT, Rule.BLOCKER, Rule.SHAPE):
                if op.rule is Rule.BLOCKER:
                    for m in ins:
                        self._block(m, f"they reach {_label(op)}, which the channel rules do not cover")
                for t in op.outputs:  # possibly several outputs, each its own unknown channels
                    self.maps[t] = self._fresh(t, blocked=True, source=op.name)
                continue
            elif op.rule is Rule.PRODUCER:
                for i in range(len(ins)):
                    self.consumers.append((op, i))
                if op.blocks > 1:
                    for m in ins:
                        if self._whole(m) and len(m.segments) == 1:
                            sp = self._spaces[self.root(m.segments[0].space)]
                            sp.blocks = math.lcm(sp.blocks, op.blocks)
                        else:
                            self._block(m, f"grouped {_label(op)} reads them mixed with other channels")
                if op.layer not in layer_space:
                    layer_space[op.layer] = self._new_space(op.channels, op.layer)
                    self._spaces[layer_space[op.layer]].blocks = op.blocks
                sp = layer_space[op.layer]
                out = ChannelMap((Segment(sp, 0, op.channels),))
            elif op.rule is Rule.ELEMENTWISE:
                out = ins[0]
            elif op.rule is Rule.DEPTHWISE:
                m = ins[0]
                if m.tile != 1:
                    self._block(m, f"depthwise {_label(op)} reads them flattened")
                    out = self._fresh(op.outputs[0], blocked=True, source=op.name)
                else:
                    out = ChannelMap(
                        tuple(dataclasses.replace(s, repeat=s.repeat * op.channels) for s in m.segments)
                    )
            elif op.rule is Rule.JOIN:
                wide, narrow = _broadcast_split(ins, self.tensor_width.get(op.outputs[0]))
                if wide and (len(wide) == 1 or self._join(wide)):
                    for m in narrow:
                        self._block(m, f"{_label(op)} broadcasts them over the channels of its other inputs")
                    out = wide[0]
                else:
                    for m in ins:
                        self._block(m, f"{_label(op)} combines them with channels that do not line up")
                    out = self._fresh(op.outputs[0], blocked=True, source=op.name)
            elif op.rule is Rule.CONCAT:
                if any(m.tile != 1 for m in ins):
                    for m in ins:
                        self._block(m, f"{_label(op)} concatenates them flattened")
                    out = self._fresh(op.outputs[0], blocked=True, source=op.name)
                else:
                    out = ChannelMap(tuple(s for m in ins for s in m.segments))
            elif op.rule is Rule.FLATTEN:
                out = dataclasses.replace(ins[0], tile=ins[0].tile * op.channels)
            elif op.rule is Rule.CONTRACT:
                self._contract(op, ins)
                continue
            elif op.rule is Rule.SLICE:
                parts = self._slice(ins[0], op.slices)
                if parts is None:
                    self._block(ins[0], f"{_label(op)} takes a range of them out of a depthwise repeat, a "
                                        "flattened map or a grouped convolution's blocks")
                    parts = [self._fresh(t, blocked=True, source=op.name) for t in op.outputs]
                for t, m in zip(op.outputs, parts):
                    self.maps[t] = m
                continue
            else:  # pragma: no cover - exhaustive
                raise AssertionError(op.rule)
            if op.mixes_outputs:
                self._block(out, op.mixes_outputs)
            for t in op.outputs:
                self.maps[t] = out
        for t in self.output_tensors:
            self._block(self.maps[t], "they are a model output")
        self.maps = {t: self._resolve(m) for t, m in self.maps.items()}

    def _contract(self, op: Op, ins: list[ChannelMap]) -> None:
        """A CONTRACT op: its contracted inputs joined and read as consumers, the first output the passed input's
        channels, every other output (attention scores, whose last axis is positions) untracked."""
        summed = [ins[i] for i in op.contracted]
        self.consumers += [(op, i) for i in op.contracted]
        if len(summed) > 1 and not self._join(summed):
            for m in summed:
                self._block(m, f"{_label(op)} sums them with channels that do not line up")
        for i, m in enumerate(ins):
            if i not in op.contracted and i != op.passed:
                self._block(m, f"{_label(op)} moves them off the channel axis or sums them against positions")
        for k, t in enumerate(op.outputs):
            if k == 0 and op.passed is not None:
                self.maps[t] = ins[op.passed]
            else:
                self.maps[t] = self._fresh(t, blocked=True, source=op.name)

    # ------------------------------------------------------------------ groups
    def groups(self) -> list[ChannelGroup]:
        """The prunable groups: unblocked, created by at least one producer, more than one channel."""
        return [g for g in self.all_groups() if not g.reason]

    def all_groups(self) -> list[ChannelGroup]:
        """Every group created by a producer, the ones that cannot be pruned with their ``reason``."""
        seen: dict[int, ChannelGroup] = {}
        for op in self.ops:  # graph order, so groups come out in the order of their first producer
            if op.rule is not Rule.PRODUCER:
                continue
            for t in op.outputs:
                for s in self.maps[t].segments:
                    r = self.root(s.space)
                    if r not in seen and self._spaces[r].producers:
                        sp = self._spaces[r]
                        seen[r] = ChannelGroup(tuple(sp.producers), sp.size, sp.blocks, r, _why_not(sp))
        return list(seen.values())

    def owners(self, tensor: int) -> tuple[np.ndarray, np.ndarray]:
        """Per position of ``tensor``'s channel axis: the id of its group (root space) and its channel there."""
        return self._roots(tensor)

    def block_reason(self, group_id: int) -> str:
        """Why the channels of ``group_id`` (a root from :meth:`owners`) cannot be removed at all ('' if they can)."""
        sp = self._spaces[self.root(group_id)]
        return _why_not(sp) if sp.producers else "no convolution or dense layer creates them"

    def _roots(self, tensor: int) -> tuple[np.ndarray, np.ndarray]:
        """(group id, channel) of every position of ``tensor``'s channel axis (read-only arrays).

        The spaces are final once the graph is analysed, so each tensor's answer is computed once: pruning and
        compensation ask it again for every group."""
        if tensor not in self._roots_cache:
            spaces, chans = self.maps[tensor].positions()
            uniq, inverse = np.unique(spaces, return_inverse=True)
            roots = np.array([self.root(int(s)) for s in uniq], dtype=int)[inverse].reshape(spaces.shape)
            roots.flags.writeable = chans.flags.writeable = False
            self._roots_cache[tensor] = roots, chans
        return self._roots_cache[tensor]

    def positions(self, tensor: int, group: ChannelGroup) -> tuple[np.ndarray, np.ndarray]:
        """Positions on ``tensor``'s channel axis that carry ``group`` channels, and which channels."""
        roots, chans = self._roots(tensor)
        hit = roots == group.id
        return np.nonzero(hit)[0], chans[hit]

    def keep_mask(self, tensor: int, removed: dict[int, np.ndarray]) -> np.ndarray:
        """Boolean keep-mask of ``tensor``'s channels when the ``removed[group id]`` channels go."""
        roots, chans = self._roots(tensor)
        keep = np.ones(roots.shape, dtype=bool)
        for r in self._root_ids(tensor):  # the tensor's own groups: a model has far more groups than a tensor
            if r in removed:
                hit = roots == r
                keep[hit] = ~removed[r][chans[hit]]
        return keep

    def _root_ids(self, tensor: int) -> list[int]:
        """The group ids (roots) on ``tensor``'s channel axis, each once."""
        if tensor not in self._root_ids_cache:
            self._root_ids_cache[tensor] = [int(r) for r in np.unique(self._roots(tensor)[0])]
        return self._root_ids_cache[tensor]

    # ------------------------------------------------------------------ values and removal
    def constants(self, previous: dict[int, np.ndarray] | None = None,
                  changed: Collection[str] = ()) -> dict[int, np.ndarray]:
        """Per tensor, the constant value of each channel over all inputs (NaN: not provably constant).

        Given ``previous`` (an earlier result for this graph) and ``changed`` (the parameter owners,
        :attr:`Op.layer`, whose weights changed since), only their ops and the ops reading a tensor whose
        constants moved are evaluated again; the others keep their earlier values. The result is the full
        evaluation's as long as no other weight changed, at the cost of the part of the graph that moved.
        """
        consts: dict[int, np.ndarray] = {}
        moved: set[int] = set()
        for op in self.ops:
            if previous is not None and op.layer not in changed and moved.isdisjoint(op.inputs):
                for t in op.outputs:
                    consts[t] = previous[t]
                continue
            ins = [consts[t] for t in op.inputs]
            if op.rule is Rule.JOIN:  # a one-channel input is broadcast over the output's channels
                width = self.tensor_width.get(op.outputs[0]) or 0
                ins = [np.broadcast_to(c, (width,)) if c.size == 1 and width > 1 else c for c in ins]
            if op.semantics is not None:
                outs = op.semantics.const_out(ins)
            elif op.rule is Rule.ELEMENTWISE:
                outs = [ins[0]]
            elif op.rule is Rule.CONCAT:
                outs = [np.concatenate(ins)]
            elif op.rule is Rule.FLATTEN:
                outs = [np.tile(ins[0], op.channels)]
            elif op.rule is Rule.SLICE:
                outs = [ins[0][a:b] for a, b in op.slices]
            elif op.rule is Rule.JOIN:
                outs = [_sum_consts(ins, self.tensor_width[op.outputs[0]])]
            else:
                outs = []
            for k, t in enumerate(op.outputs):
                c = outs[k] if k < len(outs) else np.full(self.tensor_width.get(t) or 0, np.nan)
                consts[t] = np.asarray(c, dtype=np.float64)
                if previous is not None and not _same_bits(consts[t], previous[t]):
                    moved.add(t)
        return consts

    def removable_channels(self, groups: Sequence[ChannelGroup] | None = None) -> dict[int, np.ndarray]:
        """For each group id, a boolean mask of the channels that can be removed without changing outputs.

        A channel is removable when every consumer of every tensor carrying it sees exactly 0 there,
        or a constant that the consumer folds into its bias. Grouped convolutions keep the count
        removed equal per block, and at least one channel per block always stays.
        """
        return self.plan_removal(groups)[0]

    def plan_removal(
        self, groups: Sequence[ChannelGroup] | None = None
    ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """:meth:`removable_channels` and the per-tensor constants it was decided from."""
        groups = self.groups() if groups is None else groups
        consts = self.constants()
        removable = {g.id: np.ones(g.size, dtype=bool) for g in groups}
        for op, i in self.consumers:
            tensor = op.inputs[i]
            roots, chans = self._roots(tensor)
            vals = consts[tensor]
            foldable = op.semantics.can_fold(i) if op.semantics is not None else False
            bad = ~((vals == 0) | (np.isfinite(vals) & foldable))
            for r in np.unique(roots[bad]):
                if int(r) in removable:
                    removable[int(r)][chans[bad & (roots == r)]] = False
        for g in groups:
            removable[g.id] = _balance(removable[g.id], g.blocks)
        return removable, consts

    def kept_reasons(
        self, removable: dict[int, np.ndarray], consts: dict[int, np.ndarray]
    ) -> dict[int, dict[int, str]]:
        """Why each channel of a prunable group that :meth:`plan_removal` keeps is kept: group id -> channel
        -> the first consumer that sees a value it cannot do without (or the grouped-convolution balance)."""
        reasons: dict[int, dict[int, str]] = {g: {} for g in removable}
        for op, i in self.consumers:
            roots, chans = self._roots(op.inputs[i])
            vals = consts[op.inputs[i]]
            for pos in np.nonzero(np.isin(roots, list(removable)))[0]:
                r, c, v = int(roots[pos]), int(chans[pos]), vals[pos]
                if removable[r][c] or c in reasons[r] or v == 0:
                    continue
                if not np.isfinite(v):
                    reasons[r][c] = f"its value where {_label(op)} reads it is not provably constant"
                elif not (op.semantics is not None and op.semantics.can_fold(i)):
                    note = getattr(op.semantics, "fold_note", lambda: "")()
                    reasons[r][c] = f"it is a non-zero constant where {_label(op)} reads it{note}"
        for r, mask in removable.items():
            for c in np.nonzero(~mask)[0]:
                reasons[r].setdefault(int(c), "kept so that every block of a grouped convolution loses as many")
        return reasons


def _why_not(sp: _Space) -> str:
    """Why a space cannot be pruned ("" if it can)."""
    if sp.blocked:
        return sp.reason or "blocked"
    if sp.size < 2:
        return "a single channel"
    if sp.size % sp.blocks or sp.size // sp.blocks < 2:
        return f"a grouped convolution leaves fewer than 2 of its {sp.size} channels per block"
    return ""


def _edges(cmap: ChannelMap, cuts: set[int]) -> list[tuple[Segment, list[int]]]:
    """Each segment of ``cmap`` with the ``cuts`` (positions on the tensor) that fall inside it, as offsets."""
    out, start = [], 0
    for s in cmap.segments:
        out.append((s, sorted(c - start for c in cuts if start < c < start + s.width)))
        start += s.width
    return out


def _label(op: Op) -> str:
    """How messages name an op: its adapter's label if it has one (e.g. with the TF op type), else its name."""
    return getattr(op.semantics, "label", None) or op.name


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two constant vectors are equal bit for bit (NaN included, 0.0 and -0.0 apart)."""
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def _sum_consts(ins: list[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros(width)
    for c in ins:
        out = out + c
    return out


def _broadcast_split(maps: list[ChannelMap], width: int | None) -> tuple[list[ChannelMap], list[ChannelMap]]:
    """A join's inputs as those of the output's width and those of one channel broadcast over them (a spatial
    gate ``x * s`` with ``s`` of shape (..., 1)); ([], []) if any input is neither. Without a known output width,
    inputs of one width are all wide."""
    if not width:
        width = maps[0].width if len({m.width for m in maps}) == 1 else None
    wide = [m for m in maps if m.width == width]
    narrow = [m for m in maps if m.width == 1 and width != 1]
    return (wide, narrow) if len(wide) + len(narrow) == len(maps) else ([], [])


def _balance(mask: np.ndarray, blocks: int) -> np.ndarray:
    """Make the removed count equal in every block, and keep at least one channel per block."""
    mask = mask.copy()
    per = mask.reshape(blocks, -1)
    n = min(int(per.sum(axis=1).min()), per.shape[1] - 1)
    for b in range(blocks):
        idx = np.nonzero(per[b])[0]
        per[b, idx[n:]] = False  # keep the surplus (the last removable ones) in blocks with more
    return per.reshape(-1)


def elementwise_consts(fn: Callable[[np.ndarray], np.ndarray], c: np.ndarray) -> np.ndarray:
    """Apply ``fn`` to the finite entries of a constant vector, leaving NaN (unknown) entries NaN."""
    out = np.full(c.shape, np.nan)
    fin = np.isfinite(c)
    if fin.any():
        out[fin] = np.asarray(fn(c[fin]), dtype=np.float64)
    return out
