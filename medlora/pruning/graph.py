"""Channel groups of a network: which layers' rows and columns must be pruned together.

A *group* is a set of units (an output channel of a convolution, or an attention head of ``head_dim`` channels)
that appear in several layers at once:

* as output rows of its *producers* (one conv; the q, k and v blocks of a fused ``qkv`` projection; several
  producers whose outputs are added would share one group, as residual adds force one mask);
* as per-channel parameters of the *norms* after them (BatchNorm/InstanceNorm affine and running statistics);
* as input columns of every *consumer*, at the offset the group's channels occupy in the consumer's input
  (a skip concatenation puts several groups side by side; max-pooling and upsampling keep channel order).

Removing unit ``j`` deletes those rows, norm entries and columns together, so the smaller network computes exactly
what the full one computes when the unit's activation is zeroed where it is consumed (:func:`mask_hooks`). We
mask at the consumers rather than at the producer's rows (the official LoRAPrune multiplies a Linear layer's
output by its mask): with a BatchNorm between conv and consumer, a zeroed conv row would still leave a constant
channel ``beta - gamma * mean / std`` behind, which the physically pruned network does not have.

Graphs are built per architecture from its structure (:func:`channel_graph`): the multi-view UNet (every
convolution but the logit head is a group; the ``M2`` long skips and the decoder concatenations offset the
consumers' columns), MONAI's UNet (residual units tie a residual conv, or the unit's input, to the last conv's
output; skip connections concatenate) and SAM's ViT encoder blocks (heads of each attention, hidden units of each
MLP).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..adapters.inject import base_weight
from ..errors import MedloraError

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "PruningError",
    "Slot",
    "channel_graph",
    "layer_indices",
    "mask_hooks",
    "prune_structure",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


class PruningError(MedloraError, ValueError):
    """A model, adapter or setting that pruning cannot handle (one line)."""


@dataclass(frozen=True)
class Slot:
    """Where a group's channels sit in one layer: ``axis`` ``"out"`` (rows) or ``"in"`` (columns), from ``offset``."""

    layer: str
    axis: str
    offset: int = 0


@dataclass
class ChannelGroup:
    """``size`` units of ``unit`` channels each, pruned together in every slot listed."""

    name: str
    size: int
    unit: int = 1
    producers: list[Slot] = field(default_factory=list)
    consumers: list[Slot] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    # (module name, attribute): set to the number of kept units after pruning (an attention's num_heads)
    counters: list[tuple[str, str]] = field(default_factory=list)

    @property
    def slots(self) -> list[Slot]:
        return self.producers + self.consumers

    def channels(self, units: torch.Tensor) -> torch.Tensor:
        """Channel indices (within the group) of the given unit indices."""
        units = units.to("cpu")
        return (units[:, None] * self.unit + torch.arange(self.unit, device="cpu")).reshape(-1)


@dataclass
class ChannelGraph:
    groups: dict[str, ChannelGroup]

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self.groups.values())

    def layers(self) -> list[str]:
        return sorted({s.layer for g in self for s in g.slots})


# ------------------------------------------------------------------------------------------- graph builders


def channel_graph(model: nn.Module) -> ChannelGraph:
    """The channel groups of ``model`` (a multi-view UNet, MONAI's UNet, or any model holding SAM ViT encoder
    blocks)."""
    from ..models.mv_unet import MultiViewUNet
    from ..models.sam import EncoderAttention, MLPBlock

    if isinstance(model, MultiViewUNet):
        return _mv_unet_graph(model)
    names = {type(m) for m in model.modules()}
    if EncoderAttention in names or MLPBlock in names:
        return _vit_graph(model)
    from monai.networks.nets import UNet

    if isinstance(model, UNet):
        return _monai_unet_graph(model)
    raise PruningError(f"structured pruning knows the channel couplings of mv_unet, MONAI's UNet and SAM's ViT "
                       f"encoder only, not of {type(model).__name__}")


class _Tracer:
    """Follows the channel composition of tensors (a list of ``(group or None, channels)`` segments)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.groups: dict[str, ChannelGroup] = {}

    def consume(self, layer: str, segments: list[tuple[str | None, int]]) -> None:
        offset = 0
        for group, n in segments:
            if group is not None:
                self.groups[group].consumers.append(Slot(layer, "in", offset))
            offset += n

    def sequential(self, prefix: str, seq: nn.Sequential, x: list[tuple[str | None, int]],
                   head: bool = False) -> list[tuple[str | None, int]]:
        """Convs of ``seq`` in order, each with the norm that follows it; a trailing ``head`` conv is not pruned."""
        children = list(seq.named_children())
        for i, (name, m) in enumerate(children):
            if not isinstance(m, _CONVS):
                continue
            layer = f"{prefix}.{name}"
            self.consume(layer, x)
            if head and i == len(children) - 1:
                return [(None, m.out_channels)]
            group = ChannelGroup(layer, m.out_channels, producers=[Slot(layer, "out")])
            nxt = children[i + 1][1] if i + 1 < len(children) else None
            if isinstance(nxt, _NORMS):
                group.norms.append(f"{prefix}.{children[i + 1][0]}")
            self.groups[layer] = group
            x = [(layer, m.out_channels)]
        return x


def _mv_unet_graph(model: nn.Module) -> ChannelGraph:
    """Follows :meth:`MultiViewUNet.forward`: ``M2`` concatenates its input before its dilated features, every
    decoder step concatenates ``Up(x)`` before the encoder's ``M2`` output."""
    t = _Tracer(model)
    x = t.sequential("M1.DoubleConv", model.M1.DoubleConv, [(None, model.in_channels)])
    rights = []
    for i, block in enumerate(model.down_list):
        right = x + t.sequential(f"down_list.{i}.M2.TripleDia", block.M2.TripleDia, x)
        x = t.sequential(f"down_list.{i}.M1.DoubleConv", block.M1.DoubleConv, x)
        rights.append(right)
    x = x + t.sequential("M2.TripleDia", model.M2.TripleDia, x)
    for i, block in enumerate(model.up_list):
        x = t.sequential(f"up_list.{i}.M1.DoubleConv", block.M1.DoubleConv, x) + rights[-(i + 1)]
    t.sequential("M3.TripleOut", model.M3.TripleOut, x, head=True)
    return ChannelGraph(t.groups)


class _MonaiUNetTracer(_Tracer):
    """Follows the forward of MONAI's ``UNet`` (``monai.networks.nets.UNet``): nested ``SkipConnection`` blocks
    (``cat([x, submodule(x)])`` on the channel axis), ``ResidualUnit`` blocks (``conv(x) + residual(x)``) and
    ``Convolution`` blocks (a conv or transposed conv, then ``adn`` with the norm ``N``)."""

    def trace(self, name: str, m: nn.Module, x: list[tuple[str | None, int]]) -> list[tuple[str | None, int]]:
        from monai.networks.blocks import Convolution, ResidualUnit
        from monai.networks.layers.simplelayers import SkipConnection

        if isinstance(m, SkipConnection):
            if m.mode != "cat" or m.dim != 1:
                raise PruningError(f"{name}: a SkipConnection with mode {m.mode!r} on dim {m.dim} (only channel "
                                   "concatenation is traced)")
            return x + self.trace(f"{name}.submodule", m.submodule, x)
        if isinstance(m, ResidualUnit):
            return self.residual_unit(name, m, x)
        if isinstance(m, Convolution):
            return self.convolution(name, m, x)
        if isinstance(m, nn.Sequential):
            for child, sub in m.named_children():
                x = self.trace(f"{name}.{child}", sub, x)
            return x
        raise PruningError(f"{name}: a {type(m).__name__} inside MONAI's UNet is not traced")

    def convolution(self, name: str, m: nn.Module, x: list[tuple[str | None, int]]) -> list[tuple[str | None, int]]:
        layer = f"{name}.conv"
        conv = m.conv
        self.consume(layer, x)
        group = ChannelGroup(layer, conv.out_channels, producers=[Slot(layer, "out")])
        adn = getattr(m, "adn", None)
        for part, sub in (adn.named_children() if adn is not None else ()):
            if isinstance(sub, _NORMS):
                group.norms.append(f"{name}.adn.{part}")
            elif sum(p.numel() for p in sub.parameters()) > 1:  # a shared PReLU slope (one value) is fine
                raise PruningError(f"{name}.adn.{part}: a {type(sub).__name__} with per-channel parameters is not "
                                   "sliced by pruning")
        self.groups[layer] = group
        return [(layer, conv.out_channels)]

    def residual_unit(self, name: str, m: nn.Module, x: list[tuple[str | None, int]]
                      ) -> list[tuple[str | None, int]]:
        h = x
        for child, sub in m.conv.named_children():
            h = self.trace(f"{name}.conv.{child}", sub, h)
        (last, n), = h
        if isinstance(m.residual, _CONVS):
            layer = f"{name}.residual"
            self.consume(layer, x)
            self.groups[last].producers.append(Slot(layer, "out"))
            return h
        # an identity residual adds the input itself: its channels and the last conv's are one group
        if len(x) != 1:
            raise PruningError(f"{name}: an identity residual over a concatenation is not traced")
        (source, _), = x
        merged = self.groups.pop(last)
        if source is None:  # the network's input channels: never pruned, so neither is this output
            return x
        self.groups[source].producers += merged.producers
        self.groups[source].norms += merged.norms
        return x


def _monai_unet_graph(model: nn.Module) -> ChannelGraph:
    """MONAI's ``UNet``: every conv's output channels (with the norm after it) are a group; a residual conv joins
    the group of the conv output it is added to, an identity residual joins that output to its input's group,
    and the output of the last block (the logits) is not pruned."""
    t = _MonaiUNetTracer(model)
    out = t.trace("model", model.model, [(None, model.in_channels)])
    for group, _ in out:
        if group is not None:
            t.groups.pop(group)
    return ChannelGraph(t.groups)


def _vit_graph(model: nn.Module) -> ChannelGraph:
    """Per SAM encoder block: the attention heads (rows of q, k and v in the fused ``qkv``, columns of ``proj``)
    and the MLP's hidden units (rows of ``lin1``, columns of ``lin2``). The embedding width, tied by every
    residual add and LayerNorm of the encoder, is not pruned."""
    from ..models.sam import EncoderAttention, MLPBlock

    groups: dict[str, ChannelGroup] = {}
    for name, m in model.named_modules():
        if isinstance(m, EncoderAttention):
            dim = m.num_heads * m.head_dim
            groups[f"{name}.heads"] = ChannelGroup(
                f"{name}.heads", m.num_heads, unit=m.head_dim,
                producers=[Slot(f"{name}.qkv", "out", k * dim) for k in range(3)],
                consumers=[Slot(f"{name}.proj", "in", 0)], counters=[(name, "num_heads")])
        elif isinstance(m, MLPBlock):
            hidden = m.lin1.out_features
            groups[f"{name}.hidden"] = ChannelGroup(
                f"{name}.hidden", hidden, producers=[Slot(f"{name}.lin1", "out")],
                consumers=[Slot(f"{name}.lin2", "in")])
    return ChannelGraph(groups)


# ------------------------------------------------------------------------------------------ masks and slicing


def _axis_size(module: nn.Module, axis: str) -> int:
    w = base_weight(module)
    if isinstance(module, _TRANSPOSED):
        return w.shape[1] if axis == "out" else w.shape[0]
    return w.shape[0] if axis == "out" else w.shape[1]


def layer_indices(model: nn.Module, graph: ChannelGraph, keep: dict[str, torch.Tensor]
                  ) -> dict[tuple[str, str], torch.Tensor]:
    """Per ``(layer, axis)`` touched by a group: the sorted channel indices that survive ``keep`` (kept units
    per group name; groups not in ``keep`` keep everything)."""
    modules = dict(model.named_modules())
    removed: dict[tuple[str, str], set[int]] = {}
    for g in graph:
        if g.name not in keep:
            continue
        gone = torch.ones(g.size, dtype=torch.bool, device="cpu")  # indices on the CPU, even for a meta-device build
        gone[keep[g.name].to("cpu")] = False
        channels = g.channels(torch.nonzero(gone).reshape(-1))
        for s in g.slots:
            removed.setdefault((s.layer, s.axis), set()).update((channels + s.offset).tolist())
    out = {}
    for (layer, axis), gone_set in removed.items():
        n = _axis_size(modules[layer], axis)
        out[(layer, axis)] = torch.tensor([i for i in range(n) if i not in gone_set], dtype=torch.long, device="cpu")
    return out


def mask_hooks(model: nn.Module, graph: ChannelGraph, keep: dict[str, torch.Tensor]) -> list:
    """Forward pre-hooks zeroing the pruned units' channels in every consumer's input: the *masked* network, which
    the physically pruned one equals. Returns the hook handles (``h.remove()`` to unmask)."""
    modules = dict(model.named_modules())
    handles = []
    for (layer, axis), kept in layer_indices(model, graph, keep).items():
        if axis != "in":
            continue
        module = modules[layer]
        mask = torch.zeros(_axis_size(module, "in"), dtype=base_weight(module).dtype)
        mask[kept] = 1.0
        channel_dim = -1 if isinstance(module, nn.Linear) else 1
        handles.append(module.register_forward_pre_hook(_masker(mask, channel_dim)))
    return handles


def _masker(mask: torch.Tensor, channel_dim: int):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        shape = [1] * x.ndim
        shape[channel_dim] = -1
        return (x * mask.to(x.device, x.dtype).view(shape), *args[1:])

    return hook


@torch.no_grad()
def prune_structure(model: nn.Module, graph: ChannelGraph, keep: dict[str, torch.Tensor]) -> nn.Module:
    """Physically remove the units not in ``keep`` from a plain model (no adapters attached), in place.

    Weights, biases, norm parameters and running statistics are sliced, layer attributes (``out_channels``,
    ``in_features``, ``num_features``, an attention's ``num_heads``) follow. Only ``groups == 1`` layers.
    """
    modules = dict(model.named_modules())
    adapted = [n for n in graph.layers() if parametrize.is_parametrized(modules[n])]
    if adapted:
        raise PruningError(f"layer {adapted[0]} carries an adapter: merge or remove adapters before pruning")
    for g in graph:
        if g.name in keep:
            k = keep[g.name]
            if k.numel() < 1 or k.numel() > g.size or len(set(k.tolist())) != k.numel() or int(k.max()) >= g.size:
                raise PruningError(f"group {g.name}: kept units {k.tolist()[:8]} are not distinct indices below "
                                   f"{g.size} (at least one)")
    for (layer, axis), kept in layer_indices(model, graph, keep).items():
        module = modules[layer]
        if getattr(module, "groups", 1) != 1:
            raise PruningError(f"layer {layer}: grouped convolutions cannot be channel-pruned")
        dim = {"out": 0, "in": 1}[axis]
        if isinstance(module, _TRANSPOSED):
            dim = 1 - dim
        module.weight = nn.Parameter(module.weight.index_select(dim, kept).contiguous(),
                                     requires_grad=module.weight.requires_grad)
        if axis == "out" and module.bias is not None:
            module.bias = nn.Parameter(module.bias[kept].contiguous(), requires_grad=module.bias.requires_grad)
        n = kept.numel()
        if isinstance(module, nn.Linear):
            setattr(module, "out_features" if axis == "out" else "in_features", n)
        elif isinstance(module, _TRANSPOSED + _CONVS):
            setattr(module, "out_channels" if axis == "out" else "in_channels", n)
    for g in graph:
        if g.name not in keep:
            continue
        kept = g.channels(keep[g.name].sort().values)
        for norm_name in g.norms:
            norm = modules[norm_name]
            for attr in ("weight", "bias"):
                p = getattr(norm, attr, None)
                if isinstance(p, nn.Parameter):
                    setattr(norm, attr, nn.Parameter(p[kept].contiguous(), requires_grad=p.requires_grad))
            for attr in ("running_mean", "running_var"):
                if getattr(norm, attr, None) is not None:
                    setattr(norm, attr, getattr(norm, attr)[kept].contiguous())
            norm.num_features = kept.numel()
        for module_name, attr in g.counters:
            setattr(modules[module_name], attr, int(keep[g.name].numel()))
    return model
