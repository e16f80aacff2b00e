"""The channel-dependency engine and its Keras adapter."""

from tfcompress.graph.channels import channel_groups, explain, zero_channels
from tfcompress.graph.engine import ChannelGraph, ChannelGroup, ChannelMap, Op, Rule, Segment
from tfcompress.graph.custom_layers import register_layer
from tfcompress.graph.keras_adapter import KerasGraph, UnsupportedModelError, build_graph

__all__ = [
    "ChannelGraph", "ChannelGroup", "ChannelMap", "KerasGraph", "Op", "Rule", "Segment",
    "UnsupportedModelError", "build_graph", "channel_groups", "explain", "register_layer", "zero_channels",
]
