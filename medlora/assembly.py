"""One model assembly: a typed model record (:class:`ModelSpec`) and the one function that turns it into a network.

Every command that needs a network (``medlora fit``, ``medlora crossval``, ``medlora infer``, and whatever comes
next) goes through :func:`build_model`, so that a network is put together the same way everywhere::

    spec = ModelSpec("mv_unet", {"level": 2, "width": 8}, spatial_dims=3, pretrained="base.safetensors",
                     adapter=AdapterConfig("cp_dora", rank=4, targets=["group:decoder"]))
    net = build_model(spec)           # registry -> base weights -> adapters injected; only adapters train
    record = spec.to_dict()           # JSON: written beside checkpoints and adapter files

The steps, in this order (the order fixes which random numbers each step draws, so a seeded build is
reproducible): the backbone from the model registry (:func:`medlora.models.create_model`), the base weights
(:func:`medlora.models.weights.load_weights`, tensors only), then either adapters are injected
(:func:`medlora.adapters.inject`: every base parameter frozen, adapter parameters trainable) and an optional
module group unfrozen as well, or, without adapters, only a module group is left trainable
(:func:`medlora.models.set_trainable`; the default group ``all`` is full fine-tuning).

Plain torch: nothing here imports Lightning or the training package, so inference and serving can build
networks without them. Bad input raises :class:`ModelSpecError`, one line naming the key (``model.backbone``,
``model.finetune``, ...) or the file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import AdapterConfig, AdapterFileError, inject, load_adapter, merge
from .errors import MedloraError
from .models import create_model, group_module_names, group_parameters, set_trainable
from .models.weights import load_weights

__all__ = [
    "ModelSpec",
    "ModelSpecError",
    "build_architecture",
    "build_model",
    "expand_group_targets",
    "load_adapter_onto",
    "make_trainable",
]

# Layer types a ``group:<name>`` adapter target expands to (those the adapter core can adapt).
_GROUP_TARGET_TYPES = (nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose2d, nn.ConvTranspose3d)


class ModelSpecError(MedloraError, ValueError):
    """A model record that cannot be built: one line ``model.<key>: <problem>``.

    ``key`` and ``problem`` are the two halves, so that a caller checking another file's section (a study's
    method entry) can name its own key instead.
    """

    @property
    def key(self) -> str:
        return str(self).partition(": ")[0]

    @property
    def problem(self) -> str:
        return str(self).partition(": ")[2]


@dataclass
class ModelSpec:
    """What network to build and what of it trains: the architecture/model record of a run.

    ``finetune`` is a module group of the backbone (``medlora.models.module_groups``; ``a+b`` for a union).
    Without an adapter it is what trains (default ``all``: full fine-tuning; ``none`` trains nothing); with an
    adapter it is what trains besides the adapters (default: nothing, e.g. ``norms+pos_embed`` for SALT on SAM).
    """

    backbone: str = field(default="mv_unet", metadata={"help": "registered backbone (medlora.models.list_models())"})
    backbone_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "keyword arguments of the backbone (its own argument names)"})
    spatial_dims: int = field(default=3, metadata={"help": "3: volumetric network; 2: network on axial slices"})
    pretrained: str | None = field(
        default=None, metadata={"help": "base weights loaded before adapters (Lightning .ckpt, .safetensors, .pt)"})
    adapter: AdapterConfig | None = field(
        default=None, metadata={"help": "adapters to inject (targets may name module groups as group:<name>)"})
    finetune: str | None = field(
        default=None, metadata={"help": "module group(s) to train, 'a+b' for several; without an adapter the "
                                "default is all, with one it is none"})
    training_rule: str | None = field(
        default=None, metadata={"help": "adapter training rule instead of Adam(W) (medlora adapters --rules)"})
    training_rule_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "options of the training rule"})

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ModelSpecError(f"model.backbone: expected a registered model name, got {self.backbone!r}")
        if not isinstance(self.backbone_args, Mapping):
            raise ModelSpecError(f"model.backbone_args: expected a mapping, got {self.backbone_args!r}")
        self.backbone_args = dict(self.backbone_args)
        if isinstance(self.spatial_dims, bool) or self.spatial_dims not in (2, 3):
            raise ModelSpecError(f"model.spatial_dims: must be 2 or 3, got {self.spatial_dims!r}")
        if self.pretrained is not None:
            self.pretrained = os.fspath(self.pretrained)
        if isinstance(self.adapter, Mapping):
            try:
                self.adapter = AdapterConfig.from_dict(dict(self.adapter))
            except (TypeError, ValueError) as exc:
                raise ModelSpecError(f"model.adapter: {exc}") from None
        elif self.adapter is not None and not isinstance(self.adapter, AdapterConfig):
            raise ModelSpecError(f"model.adapter: expected an adapter config, got {self.adapter!r}")
        if self.finetune is not None and (not isinstance(self.finetune, str) or not self.finetune.strip()):
            raise ModelSpecError(f"model.finetune: expected a module group name, got {self.finetune!r}")
        self.training_rule_options = dict(self.training_rule_options or {})
        if self.training_rule is not None:
            from .adapters.optim import get_rule

            try:
                rule = get_rule(self.training_rule)
            except ValueError as exc:
                raise ModelSpecError(f"model.training_rule: {exc}") from None
            known = {f.name for f in dataclasses.fields(rule.options_cls)}
            unknown = sorted(set(self.training_rule_options) - known)
            if unknown:
                raise ModelSpecError(
                    f"model.training_rule_options: unknown option(s) {', '.join(unknown)} for training rule "
                    f"{self.training_rule!r}; valid: {', '.join(sorted(known)) or 'none'}")
        elif self.training_rule_options:
            raise ModelSpecError("model.training_rule_options: given without model.training_rule")

    @property
    def trains_group(self) -> str:
        """The module group that trains besides any adapters (``none`` when only adapters train)."""
        if self.finetune is not None:
            return self.finetune
        return "none" if self.adapter is not None else "all"

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-native data (tuples become lists), as written into checkpoints and adapter files."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["adapter"] = None if self.adapter is None else self.adapter.to_dict()
        try:
            return json.loads(json.dumps(data))
        except (TypeError, ValueError) as exc:
            raise ModelSpecError(f"model: the record is not JSON data ({exc})") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """The inverse of :meth:`to_dict`; an unknown key is an error naming it."""
        if not isinstance(data, Mapping):
            raise ModelSpecError(f"model: expected a mapping, got {data!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ModelSpecError(f"model: unknown key {unknown[0]!r} (valid: {', '.join(known)})")
        return cls(**dict(data))


def expand_group_targets(model: nn.Module, targets: Sequence[str] | None) -> list[str] | None:
    """Adapter targets with every ``group:<name>`` (``shallow``, ``deep``, ``encoder``, ``decoder``, ``all``, or a
    backbone's own groups) replaced by exact-name patterns of that group's layers."""
    if targets is None:
        return None
    out: list[str] = []
    for t in targets:
        if t.startswith("group:"):
            try:
                names = group_module_names(model, t[len("group:"):], types=_GROUP_TARGET_TYPES)
            except ValueError as exc:
                raise ModelSpecError(f"model.adapter.targets: {t}: {exc}") from None
            out += [f"re:{re.escape(n)}" for n in names]
        else:
            out.append(t)
    return out


def _create(spec: ModelSpec) -> nn.Module:
    args = {"spatial_dims": spec.spatial_dims, **spec.backbone_args}
    try:
        return create_model(spec.backbone, **args)
    except MedloraError:
        raise  # e.g. a backbone that reads a checkpoint while built: that error names its file
    except (TypeError, ValueError) as exc:
        from .models import list_models

        if spec.backbone not in list_models():
            raise ModelSpecError(f"model.backbone: unknown model {spec.backbone!r}; available: "
                                 f"{', '.join(list_models())}") from None
        message = " ".join(str(exc).split())  # one line, whatever the backbone's message looks like
        raise ModelSpecError(f"model.backbone_args: cannot build {spec.backbone!r} with {spec.backbone_args}: "
                             f"{message}") from None


def _check_group(model: nn.Module, group: str) -> None:
    try:
        group_parameters(model, group)
    except ValueError as exc:
        raise ModelSpecError(f"model.finetune: {exc}") from None


def _adapter_with_layers(model: nn.Module, adapter: AdapterConfig) -> AdapterConfig:
    """``adapter`` with its ``group:`` targets expanded on ``model``."""
    if not any(t.startswith("group:") for t in adapter.targets or ()):
        return adapter
    return AdapterConfig.from_dict({**adapter.to_dict(), "targets": expand_group_targets(model, adapter.targets)})


def build_architecture(spec: ModelSpec, *, device: str | torch.device | None = "meta") -> nn.Module:
    """The backbone of ``spec`` without base weights or adapters, built on ``device`` (default: the meta device,
    which allocates nothing), after checking that the spec's module groups and adapter targets exist on it.

    For validating a config before anything runs (a study checks every method's groups this way) and for
    looking at a network's layer names and groups without its weights.
    """
    from .adapters.inject import select_layers

    if device is None:
        model = _create(spec)
    else:
        with torch.device(device):
            model = _create(spec)
    _check_group(model, spec.trains_group)
    if spec.adapter is not None:
        try:
            select_layers(model, _adapter_with_layers(model, spec.adapter))
        except ModelSpecError:
            raise
        except ValueError as exc:
            raise ModelSpecError(f"model.adapter: {exc}") from None
    return model


def build_model(spec: ModelSpec, *, device: str | torch.device | None = None) -> nn.Module:
    """The ready network of ``spec``: registry -> base weights -> adapters injected or a module group unfrozen.

    ``requires_grad`` is set on return: with an adapter, the adapter parameters plus the parameters of
    ``spec.finetune`` (if given); without one, exactly the parameters of ``spec.finetune`` (default ``all``).
    The network is built and initialised on the CPU (so a seeded build gives the same numbers on every machine)
    and then moved to ``device`` when one is given. A training rule is not applied here: it shapes the optimiser,
    which the trainer builds (:func:`medlora.adapters.optim.build_optimizer`).
    """
    model = _create(spec)
    if spec.pretrained:
        load_weights(model, spec.pretrained)  # WeightsError names the file
    make_trainable(model, spec.adapter, spec.finetune)
    if device is not None:
        model.to(device)
    return model


def make_trainable(model: nn.Module, adapter: AdapterConfig | Mapping[str, Any] | None,
                   finetune: str | None = None) -> nn.Module:
    """The last step of :func:`build_model`, in place on a network that has its base weights: inject ``adapter``
    (its ``group:`` targets expanded) and unfreeze the module group ``finetune`` on top (default: nothing), or,
    without an adapter, leave exactly ``finetune`` trainable (default ``all``). Returns ``model``.

    It works on a network built on the meta device as well, which is how configs are checked before anything
    runs (:mod:`medlora.training.checks`).
    """
    spec = ModelSpec(adapter=adapter, finetune=finetune)  # checks both, an adapter given as a mapping too
    trains = spec.trains_group
    if spec.adapter is not None:
        adapter = _adapter_with_layers(model, spec.adapter)
        try:
            inject(model, adapter)
        except ValueError as exc:
            raise ModelSpecError(f"model.adapter: {' '.join(str(exc).split())}") from None
        if trains != "none":
            _check_group(model, trains)
            for p in group_parameters(model, trains):
                p.requires_grad_(True)
    else:
        _check_group(model, trains)
        set_trainable(model, trains)
    return model


def load_adapter_onto(base: nn.Module, path: str | os.PathLike[str], *, merge_weights: bool = True) -> nn.Module:
    """A copy of ``base`` carrying the adapter file at ``path``; with ``merge_weights`` (default) the adapters are
    merged into plain layers, so the network costs what the base costs. ``base`` itself is left untouched.

    The file's base fingerprint must match ``base`` (:func:`medlora.adapters.load_adapter`); any problem is one
    :class:`~medlora.adapters.AdapterFileError` naming the file.
    """
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        # inject's advice that an adapter is as large as a small layer is for training time, not here
        warnings.filterwarnings("ignore", message=".*adapter parameters >= the layer")
        load_adapter(model, path)
    if merge_weights:
        try:
            merge(model)
        except ValueError as exc:
            raise AdapterFileError(f"{Path(path)}: {exc}") from None
    return model
