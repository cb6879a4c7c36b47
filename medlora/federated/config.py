"""The federation config (``configs/federated/*.yaml``), checked strictly: a misspelt key or a wrong type is one
:class:`FederatedConfigError` naming the file and the key path.

The model is a :class:`medlora.assembly.ModelSpec` (the record every command builds networks from); the data
keys are :class:`~medlora.data.datamodule.CTSegDataModule`'s argument names. What a federation adds: the
sites, the rounds, the local epochs, the fraction of sites per round, the strategies and their options, the
baselines and optional DP-SGD.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..assembly import ModelSpec, ModelSpecError
from ..errors import MedloraError
from .sites import PhantomSite, SiteSpec

STRATEGY_NAMES = ("fedit", "ffa", "lora_fair", "fedsmooth", "full_fedavg")
STRATEGY_OPTIONS = {
    "fedit": {}, "ffa": {}, "full_fedavg": {},
    "lora_fair": {"lam": 0.01},
    # official defaults: decay schedule for non-IID sites, zeta from 1 to 0, gamma 64 (LoRA-GA's stable scale)
    "fedsmooth": {"zeta_mode": "decay", "zeta0": 1.0, "zeta_min": 0.0, "gamma": 64.0, "ga_batches": 2},
}
BASELINES = ("local", "centralised")


class FederatedConfigError(MedloraError, ValueError):
    """A federation config that cannot be used; the message names the file and the key."""


@dataclass
class DataSpec:
    """Patches and preprocessing, with :class:`~medlora.data.datamodule.CTSegDataModule`'s argument names."""

    patch_size: list[int] = field(default_factory=lambda: [48, 48, 16], metadata={"help": "training patch"})
    batch_size: int = field(default=2, metadata={"help": "volumes (3D) or slices (2D) per batch"})
    samples_per_volume: int = field(default=2, metadata={"help": "3D patches per volume visit"})
    pos_fraction: float = field(default=0.67, metadata={"help": "share of patches centred on hemorrhage"})
    hu_window: list[float] = field(default_factory=lambda: [0.0, 140.0], metadata={"help": "HU window"})
    target_spacing: list[float] | None = field(default=None, metadata={"help": "resample to this spacing (mm)"})
    inference_roi: list[int] | None = field(
        default=None, metadata={"help": "sliding-window size for evaluation (default: patch_size)"})


@dataclass
class TrainSpec:
    """Local training on every site (and the baselines' training: the same budget)."""

    local_epochs: int = field(default=1, metadata={"help": "passes over a site's training cases per round"})
    lr: float = field(default=5e-3, metadata={"help": "Adam learning rate of adapter strategies"})
    full_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of full_fedavg"})
    loss: str = field(default="dice_ce", metadata={"help": "dice_ce or soft_dice"})
    norm_stats: str = field(
        default="freeze", metadata={"help": "BatchNorm statistics: freeze (the base's) or update (averaged "
                                    "across sites by case count: not exact)"})


@dataclass
class StrategySpec:
    name: str = field(metadata={"help": "fedit, ffa, lora_fair, fedsmooth or full_fedavg"})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "the strategy's options"})

    def resolved_options(self) -> dict[str, Any]:
        return {**STRATEGY_OPTIONS[self.name], **self.options}


@dataclass
class PretrainSpec:
    """The base when ``model.pretrained`` is not given: trained on source-domain phantoms first."""

    phantoms: PhantomSite = field(default_factory=lambda: PhantomSite(cases=12, domain="tbi"))
    epochs: int = field(default=20, metadata={"help": "pretraining epochs"})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate"})


@dataclass
class DPSpec:
    """DP-SGD on every site (:mod:`medlora.federated.privacy`): Poisson sampling of cases, per-case clipping,
    Gaussian noise; epsilon from Opacus's RDP accountant."""

    noise_multiplier: float = field(default=1.0, metadata={"help": "noise sd over the clipping norm"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "per-case gradient clipping norm"})
    delta: float = field(default=1e-3, metadata={"help": "delta of the (epsilon, delta) guarantee"})


@dataclass
class FederatedConfig:
    """A federated fine-tuning of one base with one adapter method across sites, for one or more strategies."""

    sites: list[SiteSpec] = field(metadata={"help": "the hospitals"})
    name: str = field(default="federation", metadata={"help": "name (report title)"})
    seed: int = field(default=0, metadata={"help": "shared seed: the same adapter start (and FFA's A) everywhere"})
    rounds: int = field(default=5, metadata={"help": "federated rounds"})
    fraction: float = field(default=1.0, metadata={"help": "fraction of sites trained per round (at least one)"})
    model: ModelSpec = field(default_factory=ModelSpec, metadata={"help": "medlora.assembly.ModelSpec"})
    pretrain: PretrainSpec | None = field(default=None, metadata={"help": "pretraining when model.pretrained is "
                                                                          "not given (else a random base)"})
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    strategies: list[StrategySpec] = field(
        default_factory=lambda: [StrategySpec("ffa")], metadata={"help": "strategies to run and compare"})
    baselines: list[str] = field(default_factory=lambda: list(BASELINES),
                                 metadata={"help": "local (each site alone) and/or centralised (pooled)"})
    dp: DPSpec | None = field(default=None, metadata={"help": "DP-SGD on the sites (per patient)"})

    def model_spec(self, strategy: str) -> ModelSpec:
        """The network of ``strategy``: the config's adapter, or full fine-tuning for ``full_fedavg``."""
        if strategy == "full_fedavg":
            return dataclasses.replace(self.model, adapter=None, finetune="all", training_rule=None,
                                       training_rule_options={})
        return self.model


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` as type ``tp`` (dataclasses, lists, optionals, scalars); a mismatch names ``where``."""
    if tp is ModelSpec:
        try:
            return ModelSpec.from_dict(value)
        except ModelSpecError as exc:
            raise FederatedConfigError(f"{where}: {str(exc).removeprefix('model')}".replace(": .", ".")) from None
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise FederatedConfigError(f"{where}: must not be empty")
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise FederatedConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise FederatedConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is float and numeric:
        return float(value)
    if tp is Any or (tp in (int, str, bool) and type(value) is tp):
        return value
    raise FederatedConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _dataclass(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise FederatedConfigError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise FederatedConfigError(f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise FederatedConfigError(f"{where}: missing required key {name!r}")
    return cls(**{k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def load_federated_config(path: str | Path) -> FederatedConfig:
    """Read and check a federation YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FederatedConfigError(f"{path}: federation config not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise FederatedConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    try:
        config = _dataclass(FederatedConfig, data or {}, "federation")
        check_config(config)
    except FederatedConfigError as exc:
        raise FederatedConfigError(f"{path}: {exc}") from None
    return config


def check_config(config: FederatedConfig) -> None:
    """The checks that need more than one key; raises :class:`FederatedConfigError`."""
    from ..adapters import get_method

    if len(config.sites) < 2:
        raise FederatedConfigError("federation.sites: a federation needs at least 2 sites")
    names = [s.name for s in config.sites]
    if len(set(names)) != len(names):
        raise FederatedConfigError(f"federation.sites: site names must differ, got {names}")
    for i, site in enumerate(config.sites):
        if (site.data_dir is None) == (site.phantoms is None):
            raise FederatedConfigError(f"federation.sites[{i}]: give exactly one of data_dir or phantoms")
        if not site.name or "/" in site.name or site.name.startswith("."):
            raise FederatedConfigError(f"federation.sites[{i}].name: {site.name!r} is not a usable folder name")
    if config.rounds < 1:
        raise FederatedConfigError(f"federation.rounds: must be at least 1, got {config.rounds}")
    if not 0 < config.fraction <= 1:
        raise FederatedConfigError(f"federation.fraction: must lie in (0, 1], got {config.fraction}")
    if config.train.local_epochs < 1:
        raise FederatedConfigError(f"federation.train.local_epochs: must be at least 1, got "
                                   f"{config.train.local_epochs}")
    if config.train.loss not in ("dice_ce", "soft_dice"):
        raise FederatedConfigError(f"federation.train.loss: dice_ce or soft_dice, got {config.train.loss!r}")
    if config.train.norm_stats not in ("freeze", "update"):
        raise FederatedConfigError(f"federation.train.norm_stats: freeze or update, got {config.train.norm_stats!r}")
    if len(config.data.patch_size) != config.model.spatial_dims:
        raise FederatedConfigError(f"federation.data.patch_size: {config.data.patch_size} does not have "
                                   f"{config.model.spatial_dims} axes")
    if not config.strategies:
        raise FederatedConfigError("federation.strategies: list at least one strategy")
    seen = set()
    for i, strategy in enumerate(config.strategies):
        where = f"federation.strategies[{i}]"
        if strategy.name not in STRATEGY_NAMES:
            raise FederatedConfigError(f"{where}.name: unknown strategy {strategy.name!r} (valid: "
                                       f"{', '.join(STRATEGY_NAMES)})")
        if strategy.name in seen:
            raise FederatedConfigError(f"{where}.name: {strategy.name} is listed twice")
        seen.add(strategy.name)
        bad = sorted(set(strategy.options) - set(STRATEGY_OPTIONS[strategy.name]))
        if bad:
            raise FederatedConfigError(f"{where}.options: unknown option {bad[0]!r} for {strategy.name} (valid: "
                                       f"{', '.join(STRATEGY_OPTIONS[strategy.name]) or 'none'})")
        if strategy.name == "full_fedavg":
            continue
        if config.model.adapter is None:
            raise FederatedConfigError(f"{where}: {strategy.name} federates adapters; give model.adapter")
        method = get_method(config.model.adapter.method)
        if strategy.name in ("ffa", "lora_fair", "fedsmooth") and not method.lora_pair:
            raise FederatedConfigError(f"{where}: {strategy.name} needs an adapter of plain LoRA pairs; "
                                       f"{method.name} has none (use fedit for it)")
    for i, name in enumerate(config.baselines):
        if name not in BASELINES:
            raise FederatedConfigError(f"federation.baselines[{i}]: unknown baseline {name!r} (valid: "
                                       f"{', '.join(BASELINES)})")
    if config.dp is not None:
        where = "federation.dp"
        if config.train.loss != "dice_ce":
            raise FederatedConfigError(f"{where}: loss {config.train.loss} couples the samples of a batch (batch "
                                       "Dice), which breaks the per-case clipping bound; use train.loss: dice_ce")
        if config.train.norm_stats != "freeze":
            raise FederatedConfigError(f"{where}: BatchNorm statistics updated in training couple the cases of a "
                                       "batch; use train.norm_stats: freeze")
        if config.data.samples_per_volume != 1 or config.model.spatial_dims != 3:
            raise FederatedConfigError(f"{where}: the privacy unit is a case: use 3D patches with "
                                       "data.samples_per_volume: 1 (one patch per case and visit)")
        dp = config.dp
        if not (dp.noise_multiplier >= 0 and dp.max_grad_norm > 0 and 0 < dp.delta < 1):
            raise FederatedConfigError(f"{where}: need noise_multiplier >= 0, max_grad_norm > 0, 0 < delta < 1")
        if "full_fedavg" in [s.name for s in config.strategies]:
            raise FederatedConfigError(f"{where}: DP-SGD is for adapter strategies; remove full_fedavg")
