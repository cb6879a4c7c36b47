"""An adapter bank: one frozen base, several adapters held apart from it, one forward for a mixed batch.

S-LoRA (Sheng et al., arXiv 2311.03285) serves many LoRA adapters over one base by batching requests for different
adapters together and gathering each request's adapter weights; this is that idea for any ``nn.Module`` and every
method of the registry, with convolutions included (``reference/federated_and_beyond.md`` section 3).

How it is built. The bank keeps a private copy of the plain base (the *trunk*) and, per adapter, a *member*: an
adapted model of the same base. A member made from an adapter file shares every frozen parameter of the base (no
copy) and owns only the adapter's tensors and whatever the file carries besides (``extra_tensors``: BatchNorm
statistics re-estimated on the target, an unfrozen layer); a member given as a model is used as it is (live: an
adapter still in training, or a packed training job). A forward runs the trunk once; each trunk layer where some
member differs from the base (*routed* layers) computes its rows per adapter:

* adapted ``Linear`` / ``ConvNd`` / ``ConvTransposeNd``: the member layer's effective weight (its own
  reparameterisation, so every method of the registry, DoRA and shared-basis methods included) in one grouped
  convolution or batched matmul over the adapters present (see :mod:`.ops`);
* any other module with per-adapter state (BatchNorm with the adapter's statistics, an unfrozen head, a container
  holding a trained position embedding): the member's own module on that adapter's rows;
* every BatchNorm (and InstanceNorm with running statistics) in training mode, or BatchNorm using batch statistics:
  per adapter as well, so that batch statistics are those of the adapter's own samples, exactly as when the
  adapter runs alone.

Everything else is shared and runs once on the whole batch. Gradients flow to each member's own parameters, and
the gradient of a sum of per-adapter losses with respect to one adapter's parameters is that adapter's gradient
alone on its samples: the same forward trains several adapters at once (:class:`.pack.PackedJobs`).

Limits (each refused with one line, never computed wrong): methods whose update depends on the input
(``mergeable=False``: FlyLoRA) and adapted layers with forward hooks; a routed layer whose input does not have the
batch axis first (or a whole multiple of it, as window attention); a routed layer's weight read outside its own
forward (``nn.MultiheadAttention`` reads ``out_proj.weight`` directly); adapters of another base. A forward that
draws random numbers (dropout, DyLoRA's per-layer rank draw) draws them in a different order than separate runs.
"""

from __future__ import annotations

import contextvars
import copy
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..base import AdditiveReparam, Reparam
from ..config import get_method
from ..inject import _is_parametrization_internal, adapters_of, iter_adapters
from ..io import AdapterFileError, frozen_base_state, load_adapter, read_adapter_file
from ..layout import WeightLayout, layout_of
from ..methods.conv_lora import ConvLoRA
from ..methods.lora import LoRA
from ..methods.pissa import OffsetLoRA
from .ops import STRATEGIES, join_rows, mixed_conv, mixed_linear, split_rows
from .routing import MultiAdapterError, Routing

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_STANDARD_FORWARD = {t.forward for t in (nn.Linear, *_CONV_TYPES)}
_RUNNING_STATS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class _Active:
    """The routing of the forward in progress, scaled per leading size on demand."""

    routing: Routing
    scaled: dict[int, Routing] = field(default_factory=dict)


# The routings in progress, by bank (never mutated: every change sets a new mapping, so nesting and threads are safe).
_ACTIVE: contextvars.ContextVar[Mapping[int, _Active]] = contextvars.ContextVar(
    "medlora_multi_adapter", default=MappingProxyType({}))


def _plain_type(module: nn.Module) -> type:
    return type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)


def _named_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if not _is_parametrization_internal(n)}


def _couples_batch(module: nn.Module) -> bool:
    """True when the module's output or state depends on the other samples of the batch."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.training or not module.track_running_stats
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return module.training and module.track_running_stats
    return False


def lora_terms(reparam: Reparam | None) -> list[tuple[torch.Tensor, torch.Tensor, float]] | None:
    """``[(A, B, s), ...]`` with the layer's effective weight ``W0 + sum s B A`` exactly (canonical layout of a
    Linear layer), for the methods whose code is exactly that; None for every other method (dense path).

    Recognised by the code that computes the weight, not by name: the plain forward and ``W0 + delta`` of
    :class:`~medlora.adapters.base.AdditiveReparam`, with the delta of ``lora`` (one block), ``conv_lora`` (on a
    Linear layer it is LoRA) or the offset LoRA of PiSSA (``W0 + s(BA - B0 A0)``, two terms).
    """
    if reparam is None:
        return None
    cls = type(reparam)
    if cls.forward is not Reparam.forward or cls.effective is not AdditiveReparam.effective:
        return None
    s = reparam.scaling
    if (cls.delta is LoRA.delta and reparam.adapt_outputs is None) or cls.delta is ConvLoRA.delta:
        return [(reparam.lora_A, reparam.lora_B, s)]
    if cls.delta is OffsetLoRA.delta:
        return [(reparam.lora_A, reparam.lora_B, s), (reparam.offset_A, -reparam.offset_B, s)]
    return None


class _WeightGuard(nn.Module):
    """Stands on a routed trunk layer's ``weight``: code that reads it directly (not through the layer's forward)
    would get the base weight for every sample, so it raises instead."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        raise MultiAdapterError(
            f"layer {self.name!r}: its weight is read outside its own forward (e.g. nn.MultiheadAttention reads "
            "out_proj.weight directly), so a mixed-adapter batch cannot route it; exclude this layer from the adapter")


def share_copy(model: nn.Module, private: set[str] = frozenset(), strip_adapters: bool = False) -> nn.Module:
    """A copy of ``model`` that shares its frozen parameters (the same tensors) except those of the ``private``
    modules; buffers and trainable parameters are copied. ``strip_adapters`` removes the copy's adapters."""
    memo: dict[int, Any] = {}
    for name, module in _named_modules(model).items():
        if name in private:
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                memo[id(p)] = p
        if parametrize.is_parametrized(module):
            for plist in module.parametrizations.values():
                if not plist.original.requires_grad:
                    memo[id(plist.original)] = plist.original
    clone = copy.deepcopy(model, memo)
    if strip_adapters:
        for module in list(clone.modules()):
            if parametrize.is_parametrized(module):
                _strip_parametrizations(module)
        for p in clone.parameters():
            p.requires_grad_(False)
    return clone


def _strip_parametrizations(module: nn.Module) -> None:
    """Put a deep copy's frozen ``W0`` back as plain parameters.

    Not ``parametrize.remove_parametrizations``: a deep copy shares its dynamically made ``Parametrized<Layer>``
    class with the original, and removing the last parametrization deletes the property from that class, which
    breaks the original model.
    """
    originals = {t: plist.original for t, plist in module.parametrizations.items()}
    del module._modules["parametrizations"]
    module.__class__ = type(module).__bases__[0]
    for tensor_name, original in originals.items():
        module.register_parameter(tensor_name, original)


class AdapterBank(nn.Module):
    """One base model and several adapters held apart from it, by name; ``bank(x, adapters=[...])`` computes a
    batch in which each sample names its adapter (``None``: the base).

        >>> bank = AdapterBank(base)                     # the plain base (copied once; the bank never changes it)
        >>> bank.add("sah", "runs/sah/adapter.safetensors")
        >>> bank.add("ivh", ivh_model)                   # an adapted model of the same base, used live
        >>> y = bank(x, adapters=["sah", None, "ivh", "sah"])

    Each sample's output equals the output of its adapter's model alone, merged or not, up to the round-off of a
    different summation order (the tests hold it to 1e-5 relative in float32). ``strategy`` picks how routed
    convolutions and dense Linear layers are computed (``grouped``, ``vmap``, ``loop``; see
    :mod:`medlora.adapters.multi.ops`): the numbers are the same, the speed is not (``docs/multi_adapter.md``).
    """

    def __init__(self, base: nn.Module, *, strategy: str = "grouped", copy_base: bool = True) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise MultiAdapterError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if next(iter_adapters(base), None) is not None:
            raise MultiAdapterError("the base model already holds adapters; give the bank the plain base model "
                                    "and add adapted models or adapter files to it")
        pristine = copy.deepcopy(base) if copy_base else base
        for p in pristine.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "_base", pristine)  # not a submodule: members are copied from it, it never runs
        self.strategy = strategy
        self.trunk = share_copy(pristine)
        self.members = nn.ModuleDict()
        self._keys: dict[str, str] = {}
        self._varying: dict[str, dict[str, nn.Module]] = {}
        # routed trunk layers -> their weight layout (None: not a weight layer), taken before the guard changes the
        # layer's class (transformers' Conv1D is recognised by its class name)
        self._routed: dict[str, WeightLayout | None] = {}
        self._counter = 0
        for name, module in _named_modules(self.trunk).items():
            if isinstance(module, _RUNNING_STATS):
                self._route(name, module)

    # ------------------------------------------------------------------------------------------ adapters

    @property
    def names(self) -> list[str]:
        """The adapters in the bank, in the order they were added."""
        return list(self._keys)

    def member(self, name: str) -> nn.Module:
        """The adapted model of adapter ``name`` (shares the base's frozen tensors with the bank)."""
        return self.members[self._key(name)]

    def add(self, name: str, source: str | os.PathLike | nn.Module, *, check_base: bool = True) -> nn.Module:
        """Add adapter ``name`` from an adapter file (checked against the base, see
        :func:`medlora.adapters.load_adapter`) or from an adapted model of the same base (used live, not copied:
        training it changes what the bank computes). Returns the member model."""
        if not isinstance(name, str) or not name:
            raise MultiAdapterError(f"adapter names are non-empty strings, got {name!r}")
        if name in self._keys:
            raise MultiAdapterError(f"adapter {name!r} is already in the bank; remove it first")
        if isinstance(source, (str, os.PathLike)):
            member, varying = self._from_file(Path(source), check_base)
        elif isinstance(source, nn.Module):
            member, varying = self._from_model(name, source)
        else:
            raise MultiAdapterError(f"adapter {name!r}: expected an adapter file or an adapted model, "
                                    f"got {type(source).__name__}")
        trunk = _named_modules(self.trunk)
        for layer in varying:
            self._check_routable(name, layer, trunk[layer], varying[layer])
        key = f"m{self._counter}"
        self._counter += 1
        self.members[key] = member
        self._keys[name] = key
        self._varying[key] = varying
        for layer in varying:
            self._route(layer, trunk[layer])
        return member

    def remove(self, name: str) -> nn.Module:
        """Take adapter ``name`` out of the bank; returns its member model."""
        key = self._key(name)
        del self._keys[name], self._varying[key]
        member = self.members[key]
        del self.members[key]
        return member

    def _key(self, name: Hashable) -> str:
        try:
            return self._keys[name]
        except (KeyError, TypeError):
            raise MultiAdapterError(f"unknown adapter {name!r}; the bank holds: "
                                    f"{', '.join(map(repr, self._keys)) or 'none'}") from None

    def _from_file(self, path: Path, check_base: bool) -> tuple[nn.Module, dict[str, nn.Module]]:
        meta, _ = read_adapter_file(path)
        for cfg in meta.get("configs", []):
            try:
                spec = get_method(cfg.get("method"))
            except ValueError as exc:
                raise AdapterFileError(f"{path}: {exc}") from None
            if not spec.mergeable:
                raise AdapterFileError(f"{path}: {_input_dependent(spec.name)}")
        private = {n.rsplit(".", 1)[0] if "." in n else "" for n in meta.get("extra_tensors", [])}
        member = share_copy(self._base, private)
        load_adapter(member, path, check_base=check_base)
        modules = _named_modules(member)
        varying = {n: modules[n] for n, _, _ in iter_adapters(member)}
        varying.update({n: modules[n] for n in private})
        return member, varying

    def _from_model(self, name: str, model: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
        modules, trunk = _named_modules(model), _named_modules(self.trunk)
        if set(modules) != set(trunk):
            extra = sorted(set(modules) ^ set(trunk))[:3]
            raise MultiAdapterError(f"adapter {name!r}: the model's layers differ from the bank's base "
                                    f"(first: {', '.join(extra)}); a bank holds adapters of one base model")
        for layer, module in modules.items():
            if _plain_type(module) is not _plain_type(trunk[layer]):
                raise MultiAdapterError(f"adapter {name!r}: layer {layer!r} is a {_plain_type(module).__name__}, "
                                        f"the base's is a {_plain_type(trunk[layer]).__name__}")
        for layer, _, reparam in iter_adapters(model):
            if not reparam.config.spec.mergeable:
                raise MultiAdapterError(f"adapter {name!r}: layer {layer!r}: {_input_dependent(reparam.config.method)}")
        varying = {n: modules[n] for n, _, _ in iter_adapters(model)}
        for layer, module in modules.items():
            trained = any(p.requires_grad for p in module.parameters(recurse=False))
            if trained or isinstance(module, _RUNNING_STATS) and module.track_running_stats:
                varying[layer] = module
        adapted = {n for n, _, _ in iter_adapters(model)}
        base = frozen_base_state(self._base)
        for key, value in frozen_base_state(model).items():
            owner, _, attr = key.rpartition(".")
            if owner in varying and not (owner in adapted and attr == "weight"):
                continue  # the member's own state for that module, used for its rows only
            ref = base.get(key)
            if ref is None or not (value is ref or (value.shape == ref.shape and value.dtype == ref.dtype
                                                    and torch.equal(value, ref.to(value.device)))):
                raise MultiAdapterError(f"adapter {name!r}: tensor {key!r} differs from the bank's base; a bank holds "
                                        "adapters of one base model (build the bank on that model's base)")
        return model, varying

    def _check_routable(self, name: str, layer: str, trunk_module: nn.Module, member_module: nn.Module) -> None:
        if self._routed.get(layer, layout_of(trunk_module)) is None:
            return
        plain = _plain_type(trunk_module)
        hf_conv1d = plain.__name__ == "Conv1D" and plain.__module__.startswith("transformers")  # as layout_of
        if not hf_conv1d and plain.forward not in _STANDARD_FORWARD:
            raise MultiAdapterError(f"adapter {name!r}: layer {layer!r} is a {_plain_type(trunk_module).__name__} "
                                    "with its own forward; a mixed-adapter batch routes plain Linear/conv layers")
        if member_module._forward_hooks or member_module._forward_pre_hooks:
            raise MultiAdapterError(f"adapter {name!r}: layer {layer!r} has forward hooks (an input-dependent "
                                    "adapter branch?); a mixed-adapter batch computes weight-space adapters only")

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, *args: Any, adapters: Sequence[str | None], **kwargs: Any) -> Any:
        """The trunk on ``args``/``kwargs`` with sample i computed by adapter ``adapters[i]`` (None: the base)."""
        names = list(adapters)
        for a in dict.fromkeys(names):
            if a is not None:
                self._key(a)
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is not None and first.shape[0] != len(names):
            raise MultiAdapterError(f"{len(names)} adapter names for a batch of {first.shape[0]} samples")
        active = {**_ACTIVE.get(), id(self): _Active(Routing.of(names))}
        token = _ACTIVE.set(active)
        try:
            return self.trunk(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    def _route(self, name: str, module: nn.Module) -> None:
        if name in self._routed:
            return
        layout = self._routed[name] = layout_of(module)
        if layout is not None:
            parametrize.register_parametrization(module, "weight", _WeightGuard(name), unsafe=True)
            module.forward = partial(self._weight_forward, name, module)
        else:
            module.forward = partial(self._module_forward, name, module)

    def _routing(self, name: str, rows: int) -> Routing:
        active = _ACTIVE.get().get(id(self))
        if active is None:
            raise MultiAdapterError(f"layer {name!r} of an adapter bank's trunk was called outside the bank's forward")
        if rows not in active.scaled:
            active.scaled[rows] = active.routing.scaled(rows, f"layer {name!r}")
        return active.scaled[rows]

    def _slot_modules(self, name: str, routing: Routing) -> list[nn.Module | None]:
        return [None if s is None else self._varying[self._keys[s]].get(name) for s in routing.slots]

    def _weight_forward(self, name: str, module: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        routing = self._routing(name, x.shape[0])
        slots = self._slot_modules(name, routing)
        routing, slots = _merge_same(routing, slots)
        w0 = module.parametrizations["weight"].original
        if isinstance(module, _CONV_TYPES):
            weights = [w0 if m is None else m.weight for m in slots]
            biases = [module.bias if m is None else m.bias for m in slots]
            output_size = kwargs.get("output_size", args[0] if args else None)
            return mixed_conv(module, x, routing, weights, biases, self.strategy, output_size)
        layout = self._routed[name]
        biases = [module.bias if m is None else m.bias for m in slots]
        terms = [[] if m is None else lora_terms(adapters_of(m)) for m in slots]
        canonical_w0 = layout.to_canonical(w0)
        if len(slots) > 1 and all(t is not None for t in terms) and self.strategy != "loop":
            return mixed_linear(x, routing, [canonical_w0] * len(slots), biases, terms, canonical_w0)
        weights = [canonical_w0 if m is None else layout.to_canonical(m.weight) for m in slots]
        return mixed_linear(x, routing, weights, biases, strategy=self.strategy)

    def _module_forward(self, name: str, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None:
            raise MultiAdapterError(f"layer {name!r}: a routed module needs a tensor input with the batch axis first")
        routing = self._routing(name, first.shape[0])
        slots = self._slot_modules(name, routing)
        own = partial(type(module).forward, module)
        if all(m is None for m in slots) and (len(slots) == 1 or not _couples_batch(module)):
            return own(*args, **kwargs)
        rows = first.shape[0]
        split_args = [_split(routing, a, rows) for a in args]
        split_kwargs = {k: _split(routing, v, rows) for k, v in kwargs.items()}
        outputs = []
        for s, (slot, m) in enumerate(zip(routing.slots, slots, strict=True)):
            part_args = [a[s] if isinstance(a, _Parts) else a for a in split_args]
            part_kwargs = {k: v[s] if isinstance(v, _Parts) else v for k, v in split_kwargs.items()}
            sub = Routing.of([slot] * _rows_in(part_args, part_kwargs))
            token = _ACTIVE.set({**_ACTIVE.get(), id(self): _Active(sub)})
            try:
                outputs.append((m if m is not None else own)(*part_args, **part_kwargs))
            finally:
                _ACTIVE.reset(token)
        return _join_outputs(name, routing, outputs, rows)

    def _apply(self, fn, recurse: bool = True):  # .to(), .double(): the pristine base moves with the bank
        super()._apply(fn, recurse)
        self._base._apply(fn, recurse)
        return self

    def extra_repr(self) -> str:
        return f"adapters={self.names}, strategy={self.strategy!r}, routed layers={len(self._routed)}"


def _input_dependent(method: str) -> str:
    return (f"method {method!r} computes an update that depends on the input (not mergeable); a mixed-adapter "
            "batch computes weight-space adapters only")


def _merge_same(routing: Routing, slots: list[nn.Module | None]) -> tuple[Routing, list[nn.Module | None]]:
    """Slots that compute this layer identically (the same member module or the base) become one slot."""
    keys: dict[int, int] = {}
    mapping = [keys.setdefault(id(m), len(keys)) for m in slots]
    if len(keys) == len(slots):
        return routing, slots
    merged = [slots[mapping.index(k)] for k in range(len(keys))]
    index = torch.tensor(mapping, dtype=torch.long)[routing.index]
    return Routing.of(index.tolist()), merged


class _Parts(list):
    """One tensor argument split into the slots' rows."""


def _split(routing: Routing, value: Any, rows: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return _Parts(split_rows(routing, value))
    return value


def _rows_in(args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    return next(a.shape[0] for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))


def _join_outputs(name: str, routing: Routing, outputs: list[Any], rows: int) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return join_rows(routing, outputs)
    if first is None:
        return None
    if isinstance(first, (tuple, list)):
        return type(first)(_join_outputs(name, routing, list(parts), rows) for parts in zip(*outputs, strict=True))
    raise MultiAdapterError(f"layer {name!r}: a routed module must return tensors (or tuples of tensors) with the "
                            f"batch axis first, got {type(first).__name__}")

