"""State shared by the adapters of several layers: frozen random bases, one global trainable vector.

Some methods tie their layers together: VeRA and RandLoRA draw frozen random bases once (from a seed) for
every layer, Uni-LoRA trains one vector for the whole model. Such a method registers a ``shared=`` builder
(see :func:`medlora.adapters.register_method`); :func:`medlora.adapters.inject` calls it once with every
selected layer and passes the resulting :class:`SharedState` to each layer's builder.

Ownership: the first adapted layer's reparameterisation registers the shared module as its submodule
``shared`` (so ``model.parameters()``, ``model.to()`` and ``model.state_dict()`` see it exactly once); the
other layers keep a plain, unregistered reference under the same attribute name. Adapter files store the
shared tensors once, under ``shared::<group>.<name>``, and record each group's configuration and layers
so that loading rebuilds the same grouping.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .config import AdapterConfig


class SharedState(nn.Module):
    """Tensors shared by the adapters of one ``inject`` call.

    Parameters of this module are trained (and always saved); buffers listed in ``saved_buffers`` go into
    adapter files too (e.g. a frozen random basis the user asked to store rather than regenerate).
    """

    def __init__(self, config: AdapterConfig, layer_names: Iterable[str]) -> None:
        super().__init__()
        self.config = config
        self.layer_names = list(layer_names)
        self.saved_buffers: tuple[str, ...] = ()
        self._owned = False

    @classmethod
    def frozen_bases(cls, config: AdapterConfig, layers: Iterable[tuple], like: torch.Tensor, save: bool,
                     **bases: torch.Tensor) -> SharedState:
        """A group holding frozen random ``bases`` as buffers (dtype/device of ``like``), saved when ``save``
        and otherwise regenerated from the method's seed on load."""
        shared = cls(config, [layer[0] for layer in layers])
        for name, value in bases.items():
            shared.register_buffer(name, value.to(like.device, like.dtype))
        shared.saved_buffers = tuple(bases) if save else ()
        return shared

    def adapter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for everything an adapter file holds for this group."""
        yield from self.named_parameters()
        buffers = dict(self.named_buffers())
        for name in self.saved_buffers:
            yield name, buffers[name]

    def extra_repr(self) -> str:
        return f"method={self.config.method!r}, layers={len(self.layer_names)}"


def attach_shared(reparam: nn.Module, shared: SharedState) -> None:
    """Give ``reparam`` access to ``shared`` as ``reparam.shared``; the first caller owns (registers) it."""
    if shared._owned:
        object.__setattr__(reparam, "shared", shared)  # a plain reference: not a submodule, not counted twice
    else:
        reparam.add_module("shared", shared)
        shared._owned = True


def shared_of(reparam: nn.Module) -> SharedState | None:
    """The shared state ``reparam`` uses, if any."""
    shared = reparam.__dict__.get("shared") or reparam._modules.get("shared")
    return shared if isinstance(shared, SharedState) else None


def shared_states(reparams: Iterable[nn.Module]) -> list[SharedState]:
    """The distinct shared states used by ``reparams``, in first-use order."""
    seen: dict[int, SharedState] = {}
    for reparam in reparams:
        shared = shared_of(reparam)
        if shared is not None:
            seen.setdefault(id(shared), shared)
    return list(seen.values())


def shared_parameter_ids(reparams: Iterable[nn.Module]) -> set[int]:
    return {id(p) for s in shared_states(reparams) for p in s.parameters()}


def own_parameters(reparam: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters that belong to this layer's adapter alone (shared ones excluded)."""
    shared = shared_parameter_ids([reparam])
    for name, p in reparam.named_parameters():
        if id(p) not in shared:
            yield name, p


__all__ = ["SharedState", "attach_shared", "own_parameters", "shared_of", "shared_parameter_ids", "shared_states"]
