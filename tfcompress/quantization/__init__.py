"""Quantization-aware training inside ``model.fit``."""

from tfcompress.quantization.layers import (
    ActivationQuantizer, ChannelMask, QuantConv2D, QuantConv2DTranspose, QuantDense, QuantDepthwiseConv2D,
    QuantSeparableConv2D, fake_quant_weights,
)
from tfcompress.quantization.quantize import PRESETS, RangeInit, quantize_model

__all__ = [
    "ActivationQuantizer", "ChannelMask", "PRESETS", "QuantConv2D", "QuantConv2DTranspose", "QuantDense",
    "QuantDepthwiseConv2D", "QuantSeparableConv2D", "RangeInit", "fake_quant_weights", "quantize_model",
]
