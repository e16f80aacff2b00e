"""Kernel arithmetic shared by the Keras and GraphDef adapters (one implementation, two front ends).

Kernels are given as ``(..., in, out)`` arrays (Keras Conv/Dense layout, TF's HWIO), depthwise kernels as
``(..., in, multiplier)``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "channel_mask", "producer_consts", "depthwise_consts", "fold_into_bias", "fold_rows", "slice_kernel", "window_sum",
]


def channel_mask(shape: tuple, keep, axis: int, view: tuple | None = None, blocks: int = 1) -> np.ndarray:
    """A 0/1 float32 array of ``shape`` that is 0 where ``keep`` is False along ``axis`` of the array viewed as
    ``view`` (``shape`` itself by default).

    With ``blocks`` > 1 the channels form that many contiguous blocks, which the view holds as (channel within
    its block, block) on ``axis`` and the axis after it: a grouped convolution's kernel ``(..., in / G, out)``
    viewed as ``(..., in / G, G, out / G)`` has input channel ``g * in / G + r`` in row ``r`` of block ``g``.
    """
    view = tuple(view or shape)
    keep = np.asarray(keep, np.float32)
    b = [1] * len(view)
    if blocks > 1:
        keep = keep.reshape(blocks, -1).T
        ax = axis % len(view)
        b[ax], b[ax + 1] = keep.shape
    else:
        b[axis] = keep.size
    return np.ascontiguousarray(np.broadcast_to(keep.reshape(b), view)).reshape(shape)


def producer_consts(kernel: np.ndarray) -> np.ndarray:
    """Per output channel: 0 where the kernel column is all zero (before bias), NaN elsewhere."""
    zero = ~kernel.reshape(-1, kernel.shape[-1]).any(axis=0)
    return np.where(zero, 0.0, np.nan)


def depthwise_consts(kernel: np.ndarray, in_consts: np.ndarray, valid_padding: bool) -> np.ndarray:
    """Per output channel ``c*m+k`` of a depthwise convolution, its constant value before bias (NaN: unknown).

    A zero kernel slice or a zero input channel gives 0 (zero padding keeps it 0); a constant input gives a
    constant only without padding (at the borders 'same' padding mixes in zeros).
    """
    m = kernel.shape[-1]
    flat = kernel.reshape(-1, kernel.shape[-2] * m)  # (spatial, in*m), column c*m+k
    c_in = np.repeat(in_consts, m)
    out = np.full(flat.shape[1], np.nan)
    zero_k = ~flat.any(axis=0)
    out[zero_k | (c_in == 0)] = 0.0
    if valid_padding:
        const = np.isfinite(c_in) & ~zero_k
        out[const] = c_in[const] * flat.sum(axis=0)[const]
    return out


def fold_into_bias(kernel: np.ndarray, in_keep: np.ndarray, fold: np.ndarray, groups: int = 1) -> np.ndarray:
    """Bias change (per output channel) that replaces the removed input channels holding constants ``fold``.

    Exact when every output position sees the whole kernel window of the constant (Dense, 'valid' or 1x1
    convolutions). ``groups``: input block b feeds output block b.
    """
    gone = np.nonzero(~np.asarray(in_keep, dtype=bool))[0]
    return fold_rows(window_sum(kernel), gone, np.asarray(fold, np.float64)[gone], groups)


def window_sum(kernel: np.ndarray) -> np.ndarray:
    """The kernel summed over its spatial window, in float64: ``(in/groups, out)``; what a constant input
    channel contributes to each output per unit of its value."""
    return kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1]).sum(axis=0).astype(np.float64)


def fold_rows(w: np.ndarray, positions: np.ndarray, values: np.ndarray, groups: int = 1) -> np.ndarray:
    """:func:`fold_into_bias` from the kernel's :func:`window_sum` ``w``: the input ``positions`` (of all
    ``groups`` blocks together) hold ``values``. Costs the removed rows only, for callers that fold one kernel
    many times (one input channel at a time)."""
    n_in, n_out = w.shape[0], w.shape[-1] // groups
    positions = np.asarray(positions, dtype=int)
    block = positions // n_in
    rows = w.reshape(n_in, groups, n_out)[positions - block * n_in, block]  # (removed, n_out)
    add = np.zeros((groups, n_out))
    np.add.at(add, block, np.asarray(values, np.float64)[:, None] * rows)
    return add.reshape(-1)


def slice_kernel(kernel: np.ndarray, in_keep: np.ndarray, out_keep: np.ndarray, groups: int = 1) -> np.ndarray:
    """The kernel without removed input rows and output columns; grouped kernels stay grouped."""
    kernel = np.take(kernel, np.nonzero(out_keep)[0], axis=-1)
    if groups == 1:
        return np.take(kernel, np.nonzero(in_keep)[0], axis=-2)
    n_in = in_keep.size // groups
    n_out = int(out_keep.sum()) // groups
    parts = [
        np.take(np.take(kernel, np.arange(b * n_out, (b + 1) * n_out), axis=-1),
                np.nonzero(in_keep[b * n_in:(b + 1) * n_in])[0], axis=-2)
        for b in range(groups)
    ]
    return np.concatenate(parts, axis=-1)
