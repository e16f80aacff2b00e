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
of the first layer's output (model outputs count as readers); the first layer is a Convolution with constant
weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfcompress.calibration.placement import _is_const, _source, _through_convert, bias_input, unpadded_stride_one

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

    @property
    def tensor(self) -> tuple[int, int]:
        """The aligned tensor: (op position, output port) of the producer's bias Add, or the producer."""
        return (self.producer if self.producer_bias is None else self.producer_bias, 0)


def _const_conv(op) -> bool:
    return op.get_type_name() == "Convolution" and _is_const(_source(op.input(1)))


def _value(inp) -> np.ndarray:
    """The constant an input reads (through a Convert), as float64."""
    return _through_convert(_source(inp)).get_data().astype(np.float64)


def _set(inp, value: np.ndarray) -> None:
    """Feed ``inp`` from a new f32 constant (an FP16-compressed one is decompressed)."""
    import openvino.opset13 as ops

    inp.replace_source_output(ops.constant(value.astype(np.float32)).output(0))


def alignment_pairs(model, ignored_layers=()) -> list[AlignmentPair]:
    """Every producer -> consumer convolution pair of ``model`` that :func:`align` may rescale."""
    ops = list(model.get_ordered_ops())
    pos = {op.get_name(): k for k, op in enumerate(ops)}
    ignored = set(ignored_layers)
    pairs = []
    for op in ops:
        if not (_const_conv(op) and unpadded_stride_one(op)) or op.get_friendly_name() in ignored:
            continue
        src = _source(op.input(0))
        if len(src.get_target_inputs()) != 1:  # the consumer must be the tensor's only reader
            continue
        node, producer_bias = src.get_node(), None
        if node.get_type_name() == "Add":  # producer -> bias Add -> consumer
            data = [i for i in node.inputs() if not _is_const(_source(i))]
            bias = bias_input(_source(data[0]).get_node(), results_read=True) if len(data) == 1 else None
            if bias is None or bias.get_node().get_name() != node.get_name():
                continue
            node, producer_bias = _source(data[0]).get_node(), pos[node.get_name()]
        if _const_conv(node) and node.get_friendly_name() not in ignored:
            pairs.append(AlignmentPair(pos[node.get_name()], producer_bias, pos[op.get_name()]))
    return pairs


def align(model, pairs: list[AlignmentPair], ranges: dict) -> int:
    """Shift and scale each pair's tensor channels (in place); ``ranges[pair.tensor] = (lo, hi)`` per channel.

    Returns how many pairs were changed.
    """
    ops = list(model.get_ordered_ops())
    changed = 0
    for pair in pairs:
        lo, hi = (np.asarray(r, np.float64).reshape(-1) for r in ranges[pair.tensor])
        producer, consumer = ops[pair.producer], ops[pair.consumer]
        w_in, w_out = _value(producer.input(1)), _value(consumer.input(1))
        if w_in.shape[0] != lo.size or w_out.shape[1] != lo.size:
            continue
        b_in = None if pair.producer_bias is None else bias_input(producer, results_read=True)
        b_out = bias_input(consumer, results_read=True)
        bias_in = None if b_in is None else _value(b_in)
        bias_out = None if b_out is None else _value(b_out)
        mid, width = (lo + hi) / 2, hi - lo
        if b_in is not None and b_out is not None:  # shifting needs a bias on both sides to absorb it
            bias_in = (bias_in.reshape(-1) - mid).reshape(bias_in.shape)
            bias_out = (bias_out.reshape(-1) + w_out.sum(axis=(2, 3)) @ mid).reshape(bias_out.shape)
        scale = np.ones_like(width)
        if np.any(width > 0):
            scale = np.where(width > 0, width / np.median(width[width > 0]), 1.0)
            scale = np.clip(scale, *_SCALE_CLIP)
        _set(producer.input(1), w_in / scale[:, None, None, None])
        _set(consumer.input(1), w_out * scale[None, :, None, None])
        if b_in is not None:
            _set(b_in, bias_in / scale.reshape(bias_in.shape))
        if b_out is not None:
            _set(b_out, bias_out)
        changed += 1
    model.validate_nodes_and_infer_types()
    return changed
