"""Structured pruning of a base network with its adapters: LoRAPrune (prune guided by the adapter) and LoRAM
(train the adapter on the pruned base, recover it for the full one). See docs/pruning.md."""

from .graph import (
    ChannelGraph,
    ChannelGroup,
    PruningError,
    Slot,
    channel_graph,
    layer_indices,
    mask_hooks,
    prune_structure,
)
from .loraprune import LoRAPruner, group_importance, layer_importance, schedule_sparsity, select_keep

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "LoRAPruner",
    "PruningError",
    "Slot",
    "channel_graph",
    "group_importance",
    "layer_importance",
    "layer_indices",
    "mask_hooks",
    "prune_structure",
    "schedule_sparsity",
    "select_keep",
]
