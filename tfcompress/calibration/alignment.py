"""Activation channel alignment: make the channels of a tensor between two linear layers quantize alike.

Per-tensor activation quantization wastes its 256 levels when one channel spans [-0.1, 0.1] and another
[40, 60]. Where a convolution's output (plus bias) feeds a second convolution with nothing non-linear in
between, the tensor can be changed channel by channel without changing the model's function: shift each
channel to a zero mid-range (the first layer's bias absorbs ``-mid``, the second layer's bias absorbs
``W_out @ mid``), and scale it to the median channel width (the first layer's weights and bias are divided by
``s``, the second layer's input channels multiplied by ``s``). This is POT's ActivationChannelAlignment; the
FP32 model is unchanged up to rounding, and the INT8 model loses less on such tensors.

Pairs qualify like POT's: the second layer is an ungrouped Convolution with stride 1, dilation 1 and no
padding (a shifted tensor padded with zeros would no longer be a shifted tensor), and it is the only reader
of the first layer's output; the first layer is a Convolution with constant weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfcompress.calibration.placement import _through_convert

__all__ = ["AlignmentPair", "alignment_pairs", "align"]

# channel widths are scaled into this factor of the median width (as POT): no channel is blown up 1000x
_SCALE_CLIP = (1e-2, 1e2)
QUANTILE = 1e-4  # per-channel ranges from the 1e-4 / 1 - 1e-4 quantiles (outliers do not set the width)


@dataclasses.dataclass
class AlignmentPair:
    """``producer`` (+ its bias Add) -> ``consumer``, identified by op positions in ``get_ordered_ops()``."""

    producer: int
    producer_bias: int | None  # position of the bias Add after the producer, if it has one
    consumer: int
    consumer_bias: int | None

    @property
    def tensor(self) -> tuple[int, int]:
        """The aligned tensor: (op position, output port) of the producer's bias Add, or the producer."""
        return (self.producer if self.producer_bias is None else self.producer_bias, 0)


def _readers(output) -> list:
    """All readers, model outputs (Result) included: a tensor the user sees must not be rescaled."""
    return list(output.get_target_inputs())


def _constant_input(node, index: int):
    src = node.input(index).get_source_output()
    const = _through_convert(src)
    return const if const.get_type_name() == "Constant" else None


def _bias_add(op):
    """The Add right after ``op`` that adds a constant (its only reader), or None."""
    readers = _readers(op.output(0))
    if len(readers) != 1 or readers[0].get_node().get_type_name() != "Add":
        return None
    add = readers[0].get_node()
    return add if _constant_input(add, 1 - readers[0].get_index()) is not None else None


def _plain_conv(op, no_padding: bool) -> bool:
    if op.get_type_name() != "Convolution" or _constant_input(op, 1) is None:
        return False
    if not no_padding:
        return True
    a = op.get_attributes()
    if set(a["strides"]) != {1} or set(a["dilations"]) != {1}:
        return False
    if a["auto_pad"] in ("same_upper", "same_lower"):  # "same" pads nothing only around a 1x1 kernel
        return set(op.get_input_shape(1)[2:]) == {1}
    return not any(a["pads_begin"]) and not any(a["pads_end"])


def alignment_pairs(model, ignored_layers=()) -> list[AlignmentPair]:
    """Every producer -> consumer convolution pair of ``model`` that :func:`align` may rescale."""
    ops = list(model.get_ordered_ops())
    pos = {op.get_name(): k for k, op in enumerate(ops)}
    ignored = set(ignored_layers)
    pairs = []
    for op in ops:
        if not _plain_conv(op, no_padding=True) or op.get_friendly_name() in ignored:
            continue
        src = op.input(0).get_source_output()
        if len(_readers(src)) != 1:
            continue
        node = src.get_node()
        producer_bias = None
        if node.get_type_name() == "Add":
            producer_bias = node
            data = [node.input(i).get_source_output().get_node() for i in range(2)]
            producers = [n for n in data if _bias_add(n) is not None and _bias_add(n).get_name() == node.get_name()]
            if not producers:
                continue
            node = producers[0]
        if not _plain_conv(node, no_padding=False) or node.get_friendly_name() in ignored:
            continue
        if producer_bias is None and len(_readers(node.output(0))) != 1:
            continue
        consumer_bias = _bias_add(op)
        pairs.append(AlignmentPair(pos[node.get_name()], None if producer_bias is None else pos[producer_bias.get_name()],
                                   pos[op.get_name()], None if consumer_bias is None else pos[consumer_bias.get_name()]))
    return pairs


def _replace_constant(node, index: int, value: np.ndarray) -> None:
    """Feed input ``index`` of ``node`` from a new f32 constant (an FP16-compressed one is decompressed)."""
    import openvino.opset13 as ops

    node.input(index).replace_source_output(ops.constant(value.astype(np.float32)).output(0))


def _bias(add) -> tuple[int, np.ndarray]:
    """(input index of the constant, its value as f32) of a bias Add."""
    index = 1 if _constant_input(add, 1) is not None else 0
    return index, _constant_input(add, index).get_data().astype(np.float32)


def align(model, pairs: list[AlignmentPair], ranges: dict) -> int:
    """Shift and scale each pair's tensor channels (in place); ``ranges[pair.tensor] = (lo, hi)`` per channel.

    Returns how many pairs were changed.
    """
    ops = list(model.get_ordered_ops())
    changed = 0
    for pair in pairs:
        lo, hi = (np.asarray(r, np.float64).reshape(-1) for r in ranges[pair.tensor])
        producer, consumer = ops[pair.producer], ops[pair.consumer]
        w_in = _constant_input(producer, 1).get_data().astype(np.float64)
        w_out = _constant_input(consumer, 1).get_data().astype(np.float64)
        if w_in.shape[0] != lo.size or w_out.shape[1] != lo.size:
            continue
        b_in = None if pair.producer_bias is None else _bias(ops[pair.producer_bias])
        b_out = None if pair.consumer_bias is None else _bias(ops[pair.consumer_bias])
        mid, width = (lo + hi) / 2, hi - lo
        if b_in is not None and b_out is not None:  # shifting needs a bias on both sides to absorb it
            shift_in = b_in[1].reshape(-1) - mid
            shift_out = b_out[1].reshape(-1) + w_out.sum(axis=(2, 3)) @ mid
            b_in = (b_in[0], shift_in.reshape(b_in[1].shape))
            b_out = (b_out[0], shift_out.reshape(b_out[1].shape))
        scale = np.ones_like(width)
        if np.any(width > 0):
            scale = np.where(width > 0, width / np.median(width[width > 0]), 1.0)
            scale = np.clip(scale, *_SCALE_CLIP)
        _replace_constant(producer, 1, w_in / scale[:, None, None, None])
        _replace_constant(consumer, 1, w_out * scale[None, :, None, None])
        if b_in is not None:
            _replace_constant(ops[pair.producer_bias], b_in[0], b_in[1] / scale.reshape(b_in[1].shape))
        if b_out is not None:
            _replace_constant(ops[pair.consumer_bias], b_out[0], b_out[1])
        changed += 1
    model.validate_nodes_and_infer_types()
    return changed
