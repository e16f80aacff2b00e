"""Quantization-aware training inside ``model.fit``."""

from tfcompress.quantization.layers import (
    ActivationQuantizer, ChannelMask, QuantConv1D, QuantConv1DTranspose, QuantConv2D, QuantConv2DTranspose,
    QuantConv3D, QuantConv3DTranspose, QuantDense, QuantDepthwiseConv1D, QuantDepthwiseConv2D, QuantEinsumDense,
    QuantMultiHeadAttention, QuantSeparableConv1D, QuantSeparableConv2D, fake_quant_weights,
)
from tfcompress.quantization.quantize import PRESETS, RangeInit, quantize_model

__all__ = [
    "ActivationQuantizer", "ChannelMask", "PRESETS", "QuantConv1D", "QuantConv1DTranspose", "QuantConv2D",
    "QuantConv2DTranspose", "QuantConv3D", "QuantConv3DTranspose", "QuantDense", "QuantDepthwiseConv1D",
    "QuantDepthwiseConv2D", "QuantEinsumDense", "QuantMultiHeadAttention", "QuantSeparableConv1D", "QuantSeparableConv2D", "RangeInit", "fake_quant_weights",
    "quantize_model",
]
