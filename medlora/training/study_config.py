"""The k-fold transfer-study configuration (``configs/study/*.yaml``), checked strictly.

A misspelt key or a wrong type is one ``StudyConfigError`` naming the file and the key path, so that a
long study never starts from a config that does not say what the user meant.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..adapters import AdapterConfig, get_method, list_methods
from ..errors import MedloraError
from ..models import GROUP_ALIASES, module_groups
from . import checks

BASELINES = ("no_finetune", "full", "module")


class StudyConfigError(MedloraError, ValueError):
    """A study config that cannot be used; the message names the file and the key."""


@dataclass
class PhantomSpec:
    """Synthetic head-CT phantoms generated into the run folder (``medlora data phantoms``)."""

    domain: str = field(metadata={"help": "tbi (source) or sah (target)"})
    cases: int = field(default=20, metadata={"help": "number of cases"})
    seed: int = field(default=0, metadata={"help": "generator seed"})
    shape: list[int] | None = field(default=None, metadata={"help": "grid (default 96 x 96 x 32)"})
    spacing: list[float] | None = field(default=None, metadata={"help": "voxel size in mm (default 2 x 2 x 5)"})


@dataclass
class DatasetSpec:
    """A dataset in nnU-Net v2 layout: an existing folder, or phantoms to generate."""

    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (nnU-Net v2 raw layout)"})
    phantoms: PhantomSpec | None = field(default=None, metadata={"help": "generate phantoms instead"})


@dataclass
class ModelSpec:
    backbone: str = field(default="mv_unet", metadata={"help": "registered backbone name"})
    backbone_args: dict[str, Any] = field(default_factory=dict, metadata={"help": "backbone keyword arguments"})
    spatial_dims: int = field(default=3, metadata={"help": "3: volumetric patches; 2: axial slices"})


@dataclass
class DataSpec:
    patch_size: list[int] = field(default_factory=lambda: [64, 64, 16], metadata={"help": "training patch"})
    batch_size: int = field(default=2, metadata={"help": "volumes (3D) or slices (2D) per batch"})
    samples_per_volume: int = field(default=2, metadata={"help": "3D patches per volume visit"})
    pos_fraction: float = field(default=0.67, metadata={"help": "share of patches centred on hemorrhage"})
    hu_window: list[float] = field(default_factory=lambda: [0.0, 140.0], metadata={"help": "HU window"})
    target_spacing: list[float] | None = field(default=None, metadata={"help": "resample to this spacing (mm)"})
    inference_roi: list[int] | None = field(
        default=None, metadata={"help": "sliding-window size for evaluation (default: patch_size)"})


@dataclass
class TrainSpec:
    epochs: int = field(default=10, metadata={"help": "passes over the training cases"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (full/module-wise fine-tuning)"})
    adapter_lr: float = field(default=5e-3, metadata={"help": "Adam learning rate for adapter methods"})
    loss: str = field(default="dice_ce", metadata={"help": "dice_ce or soft_dice"})
    norm_stats: str = field(default="update", metadata={"help": "BatchNorm statistics: update or freeze"})


@dataclass
class MethodEntry:
    """One method of the comparison; adapter methods run once per rank."""

    name: str = field(metadata={"help": "no_finetune, full, module, or an adapter method"})
    ranks: list[int] = field(default_factory=lambda: [4], metadata={"help": "adapter ranks"})
    group: str | None = field(default=None, metadata={"help": "module group for name: module"})
    alpha: float | None = field(default=None, metadata={"help": "adapter alpha (default: the method's)"})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "adapter method options"})
    options_pattern: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "layer-name pattern -> adapter option overrides (per layer type)"})
    targets: list[str] | None = field(
        default=None, metadata={"help": "adapter methods: layer patterns for this method (default: adapter_targets)"})
    finetune: str | None = field(
        default=None, metadata={"help": "adapter methods: module group(s) trained as well, 'a+b' for several "
                                "(e.g. norms+pos_embed for SALT on SAM)"})
    lr: float | None = field(default=None, metadata={"help": "learning rate for this method only"})
    training_rule: str | None = field(
        default=None, metadata={"help": "adapter training rule (medlora adapters --rules), e.g. lora_pro; "
                                "the job is named <method>_<rule>_r<rank>"})
    training_rule_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "the rule's options"})

    def job_name(self, rank: int | None) -> str:
        if self.name == "module":
            return f"module_{self.group}"
        base = f"{self.name}_{self.training_rule}" if self.training_rule else self.name
        return base if rank is None else f"{base}_r{rank}"


@dataclass
class StudyConfig:
    """A k-fold cross-validated comparison of fine-tuning methods on a target dataset."""

    target: DatasetSpec = field(metadata={"help": "the target dataset (fine-tuning and evaluation)"})
    name: str = field(default="study", metadata={"help": "study name (report title)"})
    seed: int = field(default=0, metadata={"help": "seed of every job (plus the fold index)"})
    folds: int = field(default=3, metadata={"help": "k of the cross-validation (the seed paper: 3)"})
    splits_file: str | None = field(default=None, metadata={"help": "your own splits_final.json"})
    base_checkpoint: str | None = field(default=None, metadata={"help": "pretrained base weights; else pretrain"})
    source: DatasetSpec | None = field(default=None, metadata={"help": "pretraining dataset (no base_checkpoint)"})
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    pretrain: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=20, lr=3e-3))
    finetune: TrainSpec = field(default_factory=TrainSpec)
    adapter_targets: dict[str, Any] = field(
        default_factory=lambda: {"target_types": ["Conv2d", "Conv3d"], "exclude": ["M3.TripleOut.6"]},
        metadata={"help": "targets / target_types / exclude for every adapter method"},
    )
    methods: list[MethodEntry] = field(default_factory=list, metadata={"help": "methods to compare"})

    def adapter_config(self, entry: MethodEntry, rank: int | None) -> AdapterConfig:
        # methods without a rank (svd) take rank 1, which they ignore
        return AdapterConfig.from_dict({"method": entry.name, "rank": rank or 1, "alpha": entry.alpha,
                                        "options": dict(entry.options),
                                        "options_pattern": dict(entry.options_pattern),
                                        **{**self.adapter_targets,
                                           **({"targets": list(entry.targets)} if entry.targets else {})}})


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except StudyConfigError as exc:
                errors.append(str(exc))
        raise StudyConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise StudyConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise StudyConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and (type(value) is tp):
        return value
    if tp is Any:
        return value
    raise StudyConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_mapping(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types name ``where``."""
    if not isinstance(data, dict):
        raise StudyConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise StudyConfigError(f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(fields)})")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise StudyConfigError(f"{where}: missing required key {missing[0]!r}")
    return cls(**kwargs)


def load_study_config(path: str | Path) -> StudyConfig:
    """Read and check a study YAML file."""
    path = Path(path)
    if not path.is_file():
        raise StudyConfigError(f"{path}: study config not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise StudyConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    try:
        config = from_mapping(StudyConfig, data or {}, "study")
        _check(config)
    except (StudyConfigError, checks.SettingError) as exc:
        raise StudyConfigError(f"{path}: {exc}") from None
    return config


def _check(config: StudyConfig) -> None:
    """The checks that read nothing but the config (a run folder's study.json is loaded with them too)."""
    for name, spec in (("target", config.target), ("source", config.source)):
        if spec is not None and (spec.data_dir is None) == (spec.phantoms is None):
            raise StudyConfigError(f"study.{name}: give exactly one of data_dir or phantoms")
        if spec is not None and spec.phantoms is not None:
            ph, where = spec.phantoms, f"study.{name}.phantoms"
            checks.one_of(f"{where}.domain", ph.domain, ("tbi", "sah"))
            checks.at_least(f"{where}.cases", ph.cases, 1)
            for key in ("shape", "spacing"):
                if getattr(ph, key) is not None:
                    checks.axes(f"{where}.{key}", getattr(ph, key), 3)
    if config.base_checkpoint is None and config.source is None:
        raise StudyConfigError("study: give base_checkpoint (pretrained weights) or source (data to pretrain on)")
    target_phantoms = config.target.phantoms
    checks.check_folds("study.folds", config.folds, target_phantoms.cases if target_phantoms else config.folds,
                       "study.target.phantoms")
    d, dims = config.data, config.model.spatial_dims
    checks.check_data("study.data.", spatial_dims=dims, patch_size=d.patch_size, batch_size=d.batch_size,
                      samples_per_volume=d.samples_per_volume, pos_fraction=d.pos_fraction, hu_window_=d.hu_window,
                      target_spacing=d.target_spacing)
    if d.inference_roi is not None:
        checks.axes("study.data.inference_roi", d.inference_roi, dims)
    for stage, spec in (("pretrain", config.pretrain), ("finetune", config.finetune)):
        checks.check_training({k: f"study.{stage}.{k}" for k in ("epochs", "lr", "loss", "norm_stats")},
                              epochs=spec.epochs, lr=spec.lr, loss=spec.loss, norm_stats=spec.norm_stats)
        checks.positive(f"study.{stage}.adapter_lr", spec.adapter_lr)
    if not config.methods:
        raise StudyConfigError("study.methods: list at least one method")
    seen: set[str] = set()
    groups = _model_groups(config)
    for i, entry in enumerate(config.methods):
        where = f"study.methods[{i}]"
        for key, value in (("group", entry.group), ("finetune", entry.finetune)):
            unknown = [g for g in (value or "").split("+") if value and groups is not None and g.strip() not in groups]
            if unknown:
                raise StudyConfigError(f"{where}.{key}: {config.model.backbone} has no module group {unknown[0]!r} "
                                       f"(groups: {', '.join(sorted(groups))})")
        for job in _check_method(config, None, entry, where):
            if job in seen:
                raise StudyConfigError(f"{where}: job {job!r} appears twice")
            seen.add(job)


def _model_groups(config: StudyConfig) -> set[str] | None:
    """The backbone's module-group names, from a weightless (meta-device) build; None if it cannot be built so."""
    try:
        base = checks.meta_network(config.model.backbone, config.model.backbone_args, config.model.spatial_dims,
                                   {"backbone": "study.model.backbone", "backbone_args": "study.model.backbone_args"})
    except checks.SettingError:
        return None  # reported with the file checks, see check_study_inputs
    if base is None:
        return None
    names = set(module_groups(base))
    return names | set(GROUP_ALIASES) if "shallow" in names else names


def check_study_inputs(config: StudyConfig, path: str | Path) -> None:
    """What :func:`load_study_config` leaves out because it reads other files or builds networks: the datasets
    (their case counts against the folds), ``splits_file``, ``base_checkpoint``, and every job's network built
    on the meta device. ``medlora crossval`` runs this before it claims the run folder."""
    from ..data.dataset import DatasetError, load_splits, read_dataset

    try:
        for name, spec in (("target", config.target), ("source", config.source)):
            if spec is not None and spec.data_dir is not None:
                try:
                    n_cases = len(read_dataset(spec.data_dir).case_ids)
                except DatasetError as exc:
                    raise StudyConfigError(f"study.{name}.data_dir: {exc}") from None
                if name == "target":
                    checks.check_folds("study.folds", config.folds, n_cases, str(spec.data_dir))
        if config.splits_file:
            try:
                splits = load_splits(config.splits_file)
            except DatasetError as exc:
                raise StudyConfigError(f"study.splits_file: {exc}") from None
            if len(splits) != config.folds:
                raise StudyConfigError(f"study.splits_file: {config.splits_file} has {len(splits)} folds, "
                                       f"study.folds is {config.folds}")
        checks.existing_file("study.base_checkpoint", config.base_checkpoint)
        base = checks.meta_network(config.model.backbone, config.model.backbone_args, config.model.spatial_dims,
                                   {"backbone": "study.model.backbone", "backbone_args": "study.model.backbone_args"})
        checks.check_network(base, {"hu_window": "study.data.hu_window"}, hu_window_=config.data.hu_window)
        for i, entry in enumerate(config.methods):
            _check_method(config, base, entry, f"study.methods[{i}]")
    except (StudyConfigError, checks.SettingError) as exc:
        raise StudyConfigError(f"{path}: {exc}") from None


def _check_method(config: StudyConfig, base: Any, entry: MethodEntry, where: str) -> list[str]:
    """Check one method entry (its network too, given the meta-device ``base``); returns its job names."""
    adapters = set(list_methods())
    if entry.name not in BASELINES and entry.name not in adapters:
        raise StudyConfigError(
            f"{where}.name: unknown method {entry.name!r} (valid: {', '.join(BASELINES + tuple(sorted(adapters)))})"
        )
    if entry.name == "module" and not entry.group:
        raise StudyConfigError(f"{where}.group: module-wise fine-tuning needs a module group")
    if entry.training_rule is not None and entry.name not in adapters:
        raise StudyConfigError(f"{where}.training_rule: only adapter methods take a training rule")
    if entry.lr is not None:
        checks.positive(f"{where}.lr", entry.lr)
    keys = {"finetune": f"{where}.group" if entry.name == "module" else f"{where}.finetune",
            "training_rule": f"{where}.training_rule", "adapter": where}
    if entry.name not in adapters:
        checks.check_network(base, keys, finetune=entry.group if entry.name == "module" else "all")
        return [entry.job_name(None)]
    if not entry.ranks or any(r < 1 for r in entry.ranks):
        raise StudyConfigError(f"{where}.ranks: give positive ranks")
    ranks: list[int | None] = list(entry.ranks) if get_method(entry.name).uses_rank else [None]
    for rank in ranks:
        try:
            adapter = config.adapter_config(entry, rank)
            checks.check_network(base, keys, adapter=adapter, finetune=entry.finetune,
                                 training_rule=entry.training_rule, rule_options=dict(entry.training_rule_options))
        except checks.SettingError as exc:
            prefix = f"rank {rank}: " if len(ranks) > 1 and exc.key == where else ""
            raise StudyConfigError(f"{exc.key}: {prefix}{exc.problem}") from None
        except ValueError as exc:
            raise StudyConfigError(f"{where}: {exc}") from None
    return [entry.job_name(rank) for rank in ranks]
