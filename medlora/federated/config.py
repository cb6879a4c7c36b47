"""The federation config (``configs/federated/*.yaml``): the run/study schema plus what a federation adds.

``model:``, ``data:`` and ``trainer:`` are the sections of ``medlora fit`` and of a study, read by the study's own
section functions (:mod:`medlora.training.study_config`) and checked by the same
:func:`medlora.training.checks.check_run` (values, adapter, network on the meta device): ``model:`` takes the
parameters of the fit factory :func:`~medlora.training.module.segmentation_module` (``spatial_dims`` follows
``data.spatial_dims``, as in fit), ``data:`` those of :class:`~medlora.data.datamodule.CTSegDataModule` less the
per-site ones (``data_dir``, ``fold``, ``num_folds``, ``splits_file``, ``seed``, ``validate``: the sites and the
federation's seed set them), ``trainer:`` the Trainer arguments a study may set.

What a federation adds: ``sites``, ``rounds``, ``fraction`` (of sites per round), ``local_epochs`` or
``local_steps`` (a site's budget per round), ``strategies`` (each a ``name``, its ``options`` and, flat, an
override of the ``model:`` section as a study's method entry, e.g. ``{name: full_fedavg, lr: 0.001}``),
``baselines``, ``dp`` (DP-SGD) and pretraining: ``source`` (a dataset folder or phantoms, the study's record)
with ``pretrain`` (overrides of ``model``/``data``/``trainer`` for pretraining, as in a study; its
``trainer.max_epochs`` or ``max_steps`` is the pretraining budget).

Local training is medlora's own loop (:class:`medlora.federated.client.SiteTrainer`), not a Lightning
``Trainer``: of the ``trainer:`` keys it honours ``gradient_clip_val``/``gradient_clip_algorithm`` (as Lightning
clips) and the budget keys in ``pretrain.trainer``; the others are refused with one line saying why.

A misspelt key or a wrong type is one :class:`FederatedConfigError` naming the file and the key path; a key of
the federation's earlier format says what replaced it (``federation.train.lr: renamed to model.lr``).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..adapters import AdapterConfig
from ..assembly import ModelSpec
from ..errors import MedloraError
from ..training import checks
from ..training.study_config import (
    PER_JOB_DATA_KEYS,
    DatasetSpec,
    PretrainSpec,
    RunSections,
    StudyConfigError,
    _checked,
    _convert,
    _data_section,
    _defaults,
    _model_section,
    _section,
    _trainer_section,
    data_parameters,
    from_mapping,
    model_parameters,
    renamed_keys,
)
from .sites import PhantomSite, SiteSpec

STRATEGY_NAMES = ("fedit", "ffa", "lora_fair", "fedsmooth", "full_fedavg")
STRATEGY_OPTIONS = {
    "fedit": {}, "ffa": {}, "full_fedavg": {},
    "lora_fair": {"lam": 0.01},
    # official defaults: decay schedule for non-IID sites, zeta from 1 to 0, gamma 64 (LoRA-GA's stable scale);
    # the local learning rate follows the official cosine over rounds, from model.lr down to lr_min
    "fedsmooth": {"zeta_mode": "decay", "zeta0": 1.0, "zeta_min": 0.0, "gamma": 64.0, "ga_batches": 2,
                  "lr_schedule": "cosine", "lr_min": 0.0},
}
BASELINES = ("local", "centralised")

# Keys of the federation's earlier format and what replaced them (reported all at once, in one line).
RENAMED: dict[str, str] = {
    "federation.train.local_epochs": "local_epochs (top level; or local_steps)",
    "federation.train.lr": "model.lr",
    "federation.train.full_lr": "strategies[].lr of full_fedavg (a flat model override, as a study's method entry)",
    "federation.train.loss": "model.loss",
    "federation.train.norm_stats": "model.norm_stats",
    "federation.data.inference_roi": "model.roi_size",
    "federation.model.spatial_dims": "data.spatial_dims (as in medlora fit, where model.spatial_dims follows it)",
    "federation.pretrain.phantoms": "source.phantoms (the study's source dataset)",
    "federation.pretrain.epochs": "pretrain.trainer.max_epochs",
    "federation.pretrain.lr": "pretrain.model.lr",
}

_PER_SITE = "set per site (sites[].data_dir or phantoms, heldout) and by the federation's seed"
_MODEL_REFUSED = {
    "spatial_dims": "set data.spatial_dims (as in medlora fit, where model.spatial_dims follows it)",
    "forgetting_weight": "the federated local loop has no forgetting term",
}
# what a strategy entry may not override: what defines the network, its adapter and how every site is evaluated
_STRATEGY_REFUSED = {
    **{k: "the same for every strategy: set it in the model section" for k in (
        "backbone", "backbone_args", "pretrained", "adapter", "roi_size", "sw_batch_size", "sw_overlap",
        "threshold")},
    **{k: "full_fedavg trains the whole model, the adapter strategies the model section's adapter" for k in (
        "finetune",)},
    **_MODEL_REFUSED,
}
_LOCAL_BUDGET = "the local budget is local_epochs or local_steps per round (top level)"
_TRAINER_REFUSED = {
    "accumulate_grad_batches": "not supported by the federated local loop (one optimiser step per batch)",
}


class FederatedConfigError(MedloraError, ValueError):
    """A federation config that cannot be used; the message names the file and the key."""


@dataclass
class StrategySpec:
    """A strategy to run: its ``name``, its ``options`` and an override of the ``model:`` section (flat in YAML)."""

    name: str = field(metadata={"help": "fedit, ffa, lora_fair, fedsmooth or full_fedavg"})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "the strategy's options"})
    model: dict[str, Any] = field(default_factory=dict, metadata={"help": "model-section override (lr, ...)"})

    def resolved_options(self) -> dict[str, Any]:
        return {**STRATEGY_OPTIONS[self.name], **self.options}


@dataclass
class DPSpec:
    """DP-SGD on every site (:mod:`medlora.federated.privacy`): Poisson sampling of cases, per-case clipping,
    Gaussian noise; epsilon from Opacus's RDP accountant."""

    noise_multiplier: float = field(default=1.0, metadata={"help": "noise sd over the clipping norm"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "per-case gradient clipping norm"})
    delta: float = field(default=1e-3, metadata={"help": "delta of the (epsilon, delta) guarantee"})


@dataclass
class FederatedConfig(RunSections):
    """A federated fine-tuning of one base with one adapter method across sites, for one or more strategies."""

    sites: list[SiteSpec]
    name: str = "federation"
    seed: int = 0  # the shared seed: the same adapter start (and FFA's A) on every site
    rounds: int = 5
    fraction: float = 1.0
    local_epochs: int | None = None  # default 1 when local_steps is not given either
    local_steps: int | None = None
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    source: DatasetSpec | None = None
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    strategies: list[StrategySpec] = field(default_factory=lambda: [StrategySpec("ffa")])
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    dp: DPSpec | None = None

    # ---- the sections of one run

    def budget(self, rounds: int = 1) -> dict[str, int]:
        """``{"epochs": n}`` or ``{"steps": n}``: a site's local budget over ``rounds`` rounds."""
        if self.local_steps is not None:
            return {"steps": rounds * self.local_steps}
        return {"epochs": rounds * (self.local_epochs or 1)}

    def strategy_model(self, strategy: str) -> dict[str, Any]:
        """The ``model:`` section of ``strategy`` (keyword arguments of ``segmentation_module``, defaults filled
        in): the config's, the strategy's override over it; ``full_fedavg`` trains the whole model, no adapter."""
        own = next((s.model for s in self.strategies if s.name == strategy), {})
        model = {**_defaults(model_parameters()), **copy.deepcopy(self.model), **copy.deepcopy(own),
                 "spatial_dims": self.spatial_dims}
        if strategy == "full_fedavg":
            model.update(adapter=None, finetune="all", training_rule=None, training_rule_options=None)
        return model

    def data_args(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """``CTSegDataModule``'s arguments but the per-site ones, defaults filled in."""
        data = {**_defaults(data_parameters()), **self.data, **(overrides or {})}
        return {k: v for k, v in data.items() if k not in PER_JOB_DATA_KEYS}

    def pretrain_model(self) -> dict[str, Any]:
        """The ``model:`` section of pretraining: the config's with ``pretrain.model`` over it, every weight
        trained from random initialisation (no adapter)."""
        return {**_defaults(model_parameters()), **copy.deepcopy(self.model), **copy.deepcopy(self.pretrain.model),
                "spatial_dims": self.spatial_dims, "pretrained": None, "adapter": None, "finetune": "all",
                "training_rule": None, "training_rule_options": None, "forgetting_weight": 0.0}

    def pretrain_trainer(self) -> dict[str, Any]:
        return {**self.trainer, **self.pretrain.trainer}

    def model_spec(self, strategy: str) -> ModelSpec:
        """The network record of ``strategy`` (:class:`medlora.assembly.ModelSpec`)."""
        model = self.strategy_model(strategy)
        return ModelSpec.from_dict({f.name: model[f.name] for f in dataclasses.fields(ModelSpec)})

    def to_record(self) -> dict[str, Any]:
        """The config as JSON-native data in its YAML form (``federation.json``)."""
        import json

        record = dataclasses.asdict(self)
        record["strategies"] = [{"name": s.name, "options": s.options, **s.model} for s in self.strategies]
        return json.loads(json.dumps(record, default=str))


# ----------------------------------------------------------------------------- reading


def old_keys(data: Any) -> list[str]:
    """``"<old key>: renamed to <new key>"`` for every key of the federation's earlier format in ``data``."""
    found = renamed_keys(data, RENAMED)
    if isinstance(data, dict) and "train" in data and not any(f.startswith("federation.train.") for f in found):
        found.append("federation.train: split into local_epochs (top level) and model.lr/loss/norm_stats")
    return found


def _whole_adapter(data: Any, where: str) -> dict[str, Any] | None:
    """A complete ``model.adapter`` section (every :class:`~medlora.adapters.AdapterConfig` key)."""
    if data is None:
        return None
    hints = typing.get_type_hints(AdapterConfig)
    return _section(data, where, hints, [f.name for f in dataclasses.fields(AdapterConfig)], {})


def _model(data: Any, where: str, refused: dict[str, str]) -> dict[str, Any]:
    """A ``model:`` section whose adapter is whole (a study's method entry sets method and rank; we do not)."""
    if isinstance(data, dict) and "adapter" in data and "adapter" not in refused:
        rest = {k: v for k, v in data.items() if k != "adapter"}
        return {**_model_section(rest, where, refused), "adapter": _whole_adapter(data["adapter"], f"{where}.adapter")}
    return _model_section(data, where, refused)


def _strategy_entry(data: Any, where: str) -> StrategySpec:
    if not isinstance(data, dict):
        raise FederatedConfigError(f"{where}: expected a mapping, got {data!r}")
    if "name" not in data:
        raise FederatedConfigError(f"{where}: missing required key 'name'")
    name, options = data["name"], data.get("options") or {}
    if not isinstance(name, str):
        raise FederatedConfigError(f"{where}.name: expected str, got {name!r}")
    if not isinstance(options, dict):
        raise FederatedConfigError(f"{where}.options: expected a mapping, got {options!r}")
    overrides = {k: v for k, v in data.items() if k not in ("name", "options")}
    return StrategySpec(name, dict(options), _model_section(overrides, where, _STRATEGY_REFUSED))


def _trainer(data: Any, where: str, budget: bool) -> dict[str, Any]:
    """A ``trainer:`` section; the keys the federated loop cannot honour are refused (``budget``: the budget keys
    are allowed, as in ``pretrain.trainer``)."""
    trainer = _trainer_section(data, where)
    for key, value in trainer.items():
        if key in ("max_epochs", "max_steps") and not budget:
            raise FederatedConfigError(f"{where}.{key}: {_LOCAL_BUDGET}")
        if key in _TRAINER_REFUSED:
            raise FederatedConfigError(f"{where}.{key}: {_TRAINER_REFUSED[key]}")
        if key == "precision" and str(value) not in ("32", "32-true"):
            raise FederatedConfigError(f"{where}.precision: the federated local loop runs in float32, got {value!r}")
        if key == "accelerator" and value != "cpu":
            raise FederatedConfigError(f"{where}.accelerator: the federated local loop runs on the CPU, got {value!r}")
        if key == "gradient_clip_algorithm" and value not in ("norm", "value"):
            raise FederatedConfigError(f"{where}.{key}: norm or value, got {value!r}")
    return trainer


_SECTIONS = {"model", "data", "trainer", "pretrain", "strategies"}


def federation_from_mapping(data: Any) -> FederatedConfig:
    """Build a :class:`FederatedConfig` from YAML data (or a run folder's ``federation.json``)."""
    if not isinstance(data, dict):
        raise FederatedConfigError(f"federation: expected a mapping, got {data!r}")
    found = old_keys(data)
    if found:
        raise FederatedConfigError("old federation format: " + "; ".join(found))
    known = [f.name for f in dataclasses.fields(FederatedConfig)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise FederatedConfigError(f"federation: unknown key {unknown[0]!r} (valid: {', '.join(known)})")
    if "sites" not in data:
        raise FederatedConfigError("federation: missing required key 'sites'")
    hints = typing.get_type_hints(FederatedConfig)
    try:
        kwargs = {k: _convert(hints[k], v, f"federation.{k}") for k, v in data.items() if k not in _SECTIONS}
        kwargs["model"] = _model(data.get("model"), "federation.model", _MODEL_REFUSED)
        kwargs["data"] = _data_section(data.get("data"), "federation.data", _PER_SITE)
        kwargs["trainer"] = _trainer(data.get("trainer"), "federation.trainer", budget=False)
        pretrain = data.get("pretrain") or {}
        kwargs["pretrain"] = from_mapping(PretrainSpec, pretrain, "federation.pretrain")
        kwargs["pretrain"].model = _model(pretrain.get("model"), "federation.pretrain.model", {
            **_MODEL_REFUSED, **{k: "pretraining trains the whole network from random weights" for k in (
                "pretrained", "adapter", "finetune", "training_rule", "training_rule_options")}})
        kwargs["pretrain"].data = _data_section(pretrain.get("data"), "federation.pretrain.data", _PER_SITE)
        kwargs["pretrain"].trainer = _trainer(pretrain.get("trainer"), "federation.pretrain.trainer", budget=True)
    except StudyConfigError as exc:
        raise FederatedConfigError(str(exc)) from None
    strategies = data.get("strategies", [{"name": "ffa"}])
    if not isinstance(strategies, list):
        raise FederatedConfigError(f"federation.strategies: expected a list, got {strategies!r}")
    try:
        kwargs["strategies"] = [_strategy_entry(s, f"federation.strategies[{i}]") for i, s in enumerate(strategies)]
    except StudyConfigError as exc:
        raise FederatedConfigError(str(exc)) from None
    return FederatedConfig(**kwargs)


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
        config = federation_from_mapping(data or {})
        check_config(config)
    except FederatedConfigError as exc:
        raise FederatedConfigError(f"{path}: {exc}") from None
    return config


# ----------------------------------------------------------------------------- checks


def check_config(config: FederatedConfig) -> None:
    """The checks that need more than one key; raises :class:`FederatedConfigError`."""
    try:
        _check(config)
    except (StudyConfigError, checks.SettingError) as exc:
        raise FederatedConfigError(str(exc)) from None


def _check(config: FederatedConfig) -> None:
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
    if config.local_epochs is not None and config.local_steps is not None:
        raise FederatedConfigError("federation.local_steps: give local_epochs or local_steps, not both")
    for key in ("local_epochs", "local_steps"):
        if getattr(config, key) is not None:
            checks.at_least(f"federation.{key}", getattr(config, key), 1)
    if not config.strategies:
        raise FederatedConfigError("federation.strategies: list at least one strategy")
    seen: set[str] = set()
    meta: dict[tuple, Any] = {}  # the backbone on the meta device, built once for all strategies
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
        if strategy.name == "fedsmooth":
            options = strategy.resolved_options()
            checks.one_of(f"{where}.options.lr_schedule", options["lr_schedule"], ("cosine", "constant"))
            checks.at_least(f"{where}.options.lr_min", options["lr_min"], 0)
        if strategy.name != "full_fedavg":
            if config.model.get("adapter") is None:
                raise FederatedConfigError(f"{where}: {strategy.name} federates adapters; give model.adapter")
            method = get_method(str(config.model["adapter"].get("method")))
            if strategy.name in ("ffa", "lora_fair", "fedsmooth") and not method.lora_pair:
                raise FederatedConfigError(f"{where}: {strategy.name} needs an adapter of plain LoRA pairs; "
                                           f"{method.name} has none (use fedit for it)")

        def origin(key: str, own: dict[str, Any] = strategy.model, at: str = where) -> str:
            leaf = key.partition(".")[2]
            return f"{at}.{leaf}" if key.startswith("model.") and leaf.split(".")[0] in own else f"federation.{key}"

        _checked(None, config.strategy_model(strategy.name), config.data_args(), config.trainer, origin, meta)
    for i, name in enumerate(config.baselines):
        if name not in BASELINES:
            raise FederatedConfigError(f"federation.baselines[{i}]: unknown baseline {name!r} (valid: "
                                       f"{', '.join(BASELINES)})")
    _check_pretrain(config)
    if config.dp is not None:
        _check_dp(config)


def _check_pretrain(config: FederatedConfig) -> None:
    pretrain = config.pretrain
    asked = bool(pretrain.model or pretrain.data or pretrain.trainer)
    if config.source is None:
        if asked:
            raise FederatedConfigError("federation.pretrain: give source (the data to pretrain the base on)")
        return
    if config.base_given is not None:
        raise FederatedConfigError("federation.source: the federation starts from model.pretrained and does not "
                                   "pretrain; remove source or model.pretrained")
    source = config.source
    if (source.data_dir is None) == (source.phantoms is None):
        raise FederatedConfigError("federation.source: give exactly one of data_dir or phantoms")
    if source.phantoms is not None:
        checks.one_of("federation.source.phantoms.domain", source.phantoms.domain, ("tbi", "sah"))
        checks.at_least("federation.source.phantoms.cases", source.phantoms.cases, 2)
    if "max_epochs" not in pretrain.trainer and "max_steps" not in pretrain.trainer:
        raise FederatedConfigError("federation.pretrain.trainer.max_epochs: required (the pretraining budget; or "
                                   "max_steps)")

    def origin(key: str) -> str:
        section, _, leaf = key.partition(".")
        own = getattr(pretrain, section, {})
        return f"federation.pretrain.{key}" if leaf.split(".")[0] in own else f"federation.{key}"

    _checked(None, config.pretrain_model(), config.data_args(pretrain.data), config.pretrain_trainer(), origin, {})


def _check_dp(config: FederatedConfig) -> None:
    where = "federation.dp"
    for strategy in config.strategies:
        model = config.strategy_model(strategy.name)
        if model["loss"] != "dice_ce":
            raise FederatedConfigError(f"{where}: loss {model['loss']} couples the samples of a batch (batch Dice), "
                                       "which breaks the per-case clipping bound; use model.loss: dice_ce")
        if model["norm_stats"] != "freeze":
            raise FederatedConfigError(f"{where}: BatchNorm statistics updated in training couple the cases of a "
                                       "batch; use model.norm_stats: freeze")
    data = config.data_args()
    if data["samples_per_volume"] != 1 or config.spatial_dims != 3:
        raise FederatedConfigError(f"{where}: the privacy unit is a case: use 3D patches with "
                                   "data.samples_per_volume: 1 (one patch per case and visit)")
    if "gradient_clip_val" in config.trainer:
        raise FederatedConfigError(f"{where}: DP-SGD clips every case's gradient (dp.max_grad_norm); remove "
                                   "trainer.gradient_clip_val")
    dp = config.dp
    assert dp is not None
    if not (dp.noise_multiplier >= 0 and dp.max_grad_norm > 0 and 0 < dp.delta < 1):
        raise FederatedConfigError(f"{where}: need noise_multiplier >= 0, max_grad_norm > 0, 0 < delta < 1")
    if "full_fedavg" in [s.name for s in config.strategies]:
        raise FederatedConfigError(f"{where}: DP-SGD is for adapter strategies; remove full_fedavg")


def source_site(config: FederatedConfig) -> SiteSpec:
    """The pretraining data as a site that holds out its last case (pretraining trains on the others)."""
    source = config.source
    assert source is not None
    phantoms = None
    if source.phantoms is not None:
        ph = source.phantoms
        phantoms = PhantomSite(cases=ph.cases, seed=ph.seed, domain=ph.domain, shape=ph.shape, spacing=ph.spacing)
    return SiteSpec("source", data_dir=source.data_dir, phantoms=phantoms, heldout=1)
