"""Adapter configuration and the method registry.

``AdapterConfig`` is what a user (or a YAML file) writes: which method, its rank and scale, which
layers. Each method registers itself by name with an options dataclass whose fields carry help
text, in the manner of PEFT's per-method config classes; ``AdapterConfig.options`` holds those
method-specific values and is checked against the dataclass so that a misspelt key is an error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MedloraError


class AdapterConfigError(MedloraError, ValueError):
    """An adapter configuration that cannot be used as given (the CLI reports it in one line)."""


def option(default: Any, help: str) -> Any:
    """A dataclass field with help text (shown by ``describe_method`` and ``medlora adapters``)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class NoOptions:
    """This method has no options beyond rank and alpha."""


@dataclass
class MethodSpec:
    """A registered method: how to build its reparameterisation and what it defaults to."""

    name: str
    build: Callable[..., torch.nn.Module]
    options_cls: type
    summary: str
    citation: str
    # Display name in tables and reports (the paper's spelling, e.g. "CP-LoRA"); default: the registered name.
    label: str = ""
    # The form of the update, one of FAMILIES (a DoRA wrapper takes its inner method's), for grouping in reports.
    family: str = ""
    # Default alpha as a multiple of rank when the user gives none (e.g. LoRA-C's paper: alpha/r = 2).
    alpha_over_rank: float = 1.0
    # A default alpha that does not grow with the rank (LoLDU's alpha = 1, i.e. s = 1/r); None: alpha_over_rank.
    default_alpha: float | None = None
    # True when the adapted weight equals W0 exactly at initialisation.
    starts_at_base: bool = True
    uses_rank: bool = True
    # False when W_eff cannot be written into a plain layer (e.g. input-dependent routing); merge() refuses.
    mergeable: bool = True
    # For the methods table: what trains, and which layer types the method applies to.
    trains: str = ""
    layer_types: str = "Linear, ConvNd, ConvTransposeNd"
    # Builds state shared by all layers of one inject() call (see medlora.adapters.shared); None: none.
    build_shared: Callable[..., torch.nn.Module] | None = None
    # True when the method's layers declare a plain LoRA pair dW = s B A (Reparam.rule_pairs), which the
    # training rules of medlora.adapters.optim (LoRA-Pro, AltLoRA, ...) may update.
    lora_pair: bool = False
    # Options that depend on the training schedule, schedule_options(lr, total_steps) -> dict (LoRA-SB's
    # warm-up step); a runner that knows its schedule merges them under the user's options. None: none.
    schedule_options: Callable[[float, int], dict[str, Any]] | None = None


    def __post_init__(self) -> None:
        self.label = self.label or self.name


# The families of update form, as the README groups the methods: the seed paper's low-rank, CP and spectral
# methods; initialisations; shared or random bases; structured updates; nested-rank training.
FAMILIES = ("low-rank", "cp", "spectral", "initialisation", "shared-basis", "structure", "nested-rank")

_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    options: type = NoOptions,
    summary: str,
    citation: str,
    label: str | None = None,
    family: str,
    alpha_over_rank: float = 1.0,
    default_alpha: float | None = None,
    starts_at_base: bool = True,
    uses_rank: bool = True,
    mergeable: bool = True,
    trains: str = "",
    layer_types: str = "Linear, ConvNd, ConvTransposeNd",
    shared: Callable[..., torch.nn.Module] | None = None,
    lora_pair: bool = False,
    schedule_options: Callable[[float, int], dict[str, Any]] | None = None,
) -> Callable[[Callable[..., torch.nn.Module]], Callable[..., torch.nn.Module]]:
    """Register a method under ``name``; the decorated callable builds one layer's reparameterisation.

    The builder is called as ``build(w0, rank=, scaling=, options=)`` with ``w0`` the frozen weight in
    canonical ``(O, I/groups, *k)`` layout and returns an ``nn.Module`` mapping that weight to the
    effective weight (see :class:`medlora.adapters.base.Reparam`).

    ``shared``, if given, is called once per ``inject`` as ``shared(layers, config)`` with ``layers`` the
    selected ``(name, canonical w0, per-layer AdapterConfig)`` in module order; it returns a
    :class:`medlora.adapters.shared.SharedState` that every layer's builder then receives as ``shared=``.

    ``label`` is the display name (default ``name``) and ``family`` one of :data:`FAMILIES`.
    ``lora_pair=True`` declares that the method's layers expose a plain LoRA pair to the training rules (their
    reparameterisation overrides :meth:`medlora.adapters.base.Reparam.rule_pairs`). ``schedule_options(lr,
    total_steps)`` gives the options a method derives from the training schedule (LoRA-SB's warm-up step).
    """

    def decorator(build: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"adapter method {name!r} is already registered")
        if family not in FAMILIES:
            raise ValueError(f"adapter method {name!r}: family must be one of {', '.join(FAMILIES)}, got {family!r}")
        _REGISTRY[name] = MethodSpec(
            name=name,
            build=build,
            options_cls=options,
            summary=summary,
            citation=citation,
            label=label or name,
            family=family,
            alpha_over_rank=alpha_over_rank,
            default_alpha=default_alpha,
            starts_at_base=starts_at_base,
            uses_rank=uses_rank,
            mergeable=mergeable,
            trains=trains,
            layer_types=layer_types,
            build_shared=shared,
            lora_pair=lora_pair,
            schedule_options=schedule_options,
        )
        return build

    return decorator


def _ensure_builtin_methods() -> None:
    from . import methods  # noqa: F401  (registers the built-in methods on import)


def get_method(name: str) -> MethodSpec:
    _ensure_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown adapter method {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_methods() -> list[str]:
    """Names of all registered adapter methods."""
    _ensure_builtin_methods()
    return sorted(_REGISTRY)


def describe_method(name: str) -> str:
    """A human-readable description of a method and its options with help text and defaults."""
    spec = get_method(name)
    return describe_entry(spec.name, spec.summary, spec.citation, spec.options_cls, prefix="options.")


def describe_entry(name: str, summary: str, citation: str, options_cls: type, prefix: str = "") -> str:
    """``name: summary``, the paper, then each option of ``options_cls`` with its default and help text."""
    lines = [f"{name}: {summary}", f"  paper: {citation}"]
    for f in dataclasses.fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {prefix}{f.name} (default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


@dataclass
class AdapterConfig:
    """Which adapter method to attach, with which rank and scale, to which layers.

    Layer selection: a layer is adapted when its type is supported (Linear, Conv1d/2d/3d,
    ConvTranspose1d/2d/3d) and allowed by ``target_types``, its dotted name matches ``targets`` and
    it does not match ``exclude``. A pattern matches a name when it is a glob for the whole name
    (``"encoder.*"``), the name itself, or the name's last dotted components (``"qkv"`` matches
    ``"blocks.0.attn.qkv"``, as in PEFT); prefix a pattern with ``re:`` for a full-match regular
    expression.
    """

    method: str = field(metadata={"help": "registered method name, see medlora.adapters.list_methods()"})
    rank: int = field(default=8, metadata={"help": "adapter rank r (CP rank R for the CP methods)"})
    alpha: float | None = field(
        default=None,
        metadata={"help": "scale numerator: dW is multiplied by alpha / rank; default: the method's "
                  "recommended alpha/rank ratio times rank (or its fixed default alpha, e.g. LoLDU's 1)"},
    )
    targets: list[str] | str | None = field(
        default=None, metadata={"help": "layer-name patterns to adapt; None: every supported layer"}
    )
    target_types: list[str] | None = field(
        default=None,
        metadata={"help": "restrict to these layer class names, e.g. ['Conv3d']; None: all supported"},
    )
    exclude: list[str] | str | None = field(
        default=None, metadata={"help": "layer-name patterns never to adapt (e.g. a segmentation head)"}
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "rank-stabilised scale alpha / sqrt(rank) (Kalajdzievski 2023)"}
    )
    options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "method-specific options, see describe_method(method)"}
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "layer-name pattern -> rank for the layers it matches (as PEFT's rank_pattern); "
                  "the first matching pattern wins"},
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "layer-name pattern -> alpha (as PEFT's alpha_pattern)"}
    )
    options_pattern: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "layer-name pattern -> option overrides, e.g. {'mlp.*': {'svd_rank': 50}} for SALT's "
                  "per-layer-type ranks"},
    )

    def __post_init__(self) -> None:
        spec = get_method(self.method)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"AdapterConfig.rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        self.options = dict(self.options or {})
        known = {f.name for f in dataclasses.fields(spec.options_cls)}
        unknown = sorted(set(self.options) - known)
        if unknown:
            valid = ", ".join(sorted(known)) or "none"
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for adapter method {self.method!r}; valid: {valid}"
            )
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self.options_pattern = {k: dict(v) for k, v in (self.options_pattern or {}).items()}
        for pattern, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"AdapterConfig.rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}")
        for pattern, overrides in self.options_pattern.items():
            bad = sorted(set(overrides) - known)
            if bad:
                raise ValueError(f"unknown option(s) {', '.join(bad)} in options_pattern[{pattern!r}] for adapter "
                                 f"method {self.method!r}; valid: {', '.join(sorted(known)) or 'none'}")

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    def resolved_alpha(self) -> float:
        if self.alpha is not None:
            return float(self.alpha)
        spec = self.spec
        return float(spec.default_alpha) if spec.default_alpha is not None else spec.alpha_over_rank * self.rank

    def scaling(self) -> float:
        """The factor ``s`` applied to a low-rank update: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        denominator = math.sqrt(self.rank) if self.use_rslora else self.rank
        return self.resolved_alpha() / denominator

    def method_options(self) -> Any:
        """The method's options dataclass filled from ``options`` (defaults elsewhere)."""
        return self.spec.options_cls(**self.options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig key(s): {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**data)
