"""The k-fold transfer-study configuration (``configs/study/*.yaml``): fit's own sections plus the study's grid.

A study is a grid of overrides of one run config, so its ``model:``, ``data:`` and ``trainer:`` blocks are
the sections ``medlora fit`` reads, checked against the same signatures (the ``model:`` factory
:func:`~medlora.training.module.segmentation_module`, :class:`~medlora.data.datamodule.CTSegDataModule`,
Lightning's ``Trainer``) and the same value checks (:func:`medlora.training.checks.check_run`). What the study
sets per job is left out of them: the datasets, folds and seeds of the data module (``data_dir``, ``fold``,
``splits_file``, ...), and the model's adapter or module group, which come from the method entries.

A method entry names a method (``name``: ``no_finetune``, ``full``, ``module``, ``transplant``, ``loraprune`` or an
adapter method; ``transplant`` takes ``stage``, the NOT stage it trains, :mod:`medlora.adapters.transplant`;
``loraprune`` takes ``sparsity`` and the adapter ``method`` it trains with the pruner, default ``lora``), the
``ranks`` to sweep for adapter methods, and an override of the ``model:`` section, flat: ``finetune`` (the module
group of ``module``; for adapters a group trained as well), ``training_rule`` (and ``_options``),
``forgetting_weight``, ``lr``, ... and ``adapter:`` (a partial ``model.adapter`` section: ``options``, ``targets``,
``alpha``, ...; method and rank come from the entry). ``adapter_methods:`` is an override applied to every
adapter-method entry before its own (e.g. their learning rate and layer targets). ``pretrain:`` holds
overrides of ``model``/``data``/``trainer`` for pretraining on ``source``.

The grid besides methods and folds: ``seeds`` (every job repeated per fine-tuning seed; ``pretrain_seeds``
optionally repeats the pretraining), ``train_cases`` (per fold, deterministic nested subsets of the fold's
training cases) and ``source_eval`` (held-out source-domain cases every fine-tuned model is also evaluated on,
to measure forgetting). ``findings`` and ``comparisons`` are passed to the report.

A misspelt key or a wrong type is one :class:`StudyConfigError` naming the file and the key path; a key of the
old study format says in one line what replaced it (``study.data.inference_roi: renamed to model.roi_size``).
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..adapters import AdapterConfig, get_method, list_methods
from ..errors import MedloraError
from ..runs import ALL_CASES, FAMILIES, STAGE_PREFIX, job_name
from . import checks

BASELINES = tuple(FAMILIES)


class StudyConfigError(MedloraError, ValueError):
    """A study config that cannot be used; the message names the file and the key."""


# ----------------------------------------------------------------------------- the sections fit reads too


def _parameters(fn: Any) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(fn).parameters)
    params.pop("self", None)
    return params


def _hints(fn: Any) -> dict[str, Any]:
    return typing.get_type_hints(fn)


def model_parameters() -> dict[str, inspect.Parameter]:
    """The ``model:`` section's keys: the parameters of the fit factory ``segmentation_module``."""
    from .module import segmentation_module

    return _parameters(segmentation_module)


def data_parameters() -> dict[str, inspect.Parameter]:
    """The ``data:`` section's keys: the parameters of ``CTSegDataModule``."""
    from ..data.datamodule import CTSegDataModule

    return _parameters(CTSegDataModule.__init__)


# model keys the study sets per job (from the method entries) and the one that follows data.spatial_dims (as
# fit's link_arguments does)
PER_JOB_MODEL_KEYS = ("adapter", "finetune", "training_rule", "training_rule_options")
LINKED_MODEL_KEYS = ("spatial_dims",)
# data keys the study sets per job: the dataset, fold, folds file and seed
PER_JOB_DATA_KEYS = ("data_dir", "fold", "num_folds", "splits_file", "seed", "validate")
# model keys a method entry may not override: what defines the network and how every job is evaluated
STUDY_WIDE_MODEL_KEYS = ("backbone", "backbone_args", "spatial_dims", "pretrained", "roi_size", "sw_batch_size",
                         "sw_overlap", "threshold")
# Trainer arguments a study may set (the study owns logging, checkpointing and validation of its jobs)
TRAINER_KEYS = ("max_epochs", "max_steps", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
                "precision", "accelerator")


def _trainer_hints() -> dict[str, Any]:
    import lightning.pytorch as pl

    hints = _hints(pl.Trainer.__init__)
    return {k: hints[k] for k in TRAINER_KEYS}


# Keys of the old study format: (key path, what replaced it). Reported all at once, in one line.
RENAMED: dict[str, str] = {
    "study.seed": "seeds (a list: seeds: [0])",
    "study.base_checkpoint": "model.pretrained",
    "study.adapter_targets": "adapter_methods.adapter (targets, target_types, exclude)",
    "study.finetune.epochs": "trainer.max_epochs",
    "study.finetune.lr": "model.lr",
    "study.finetune.adapter_lr": "adapter_methods.lr",
    "study.finetune.loss": "model.loss",
    "study.finetune.norm_stats": "model.norm_stats",
    "study.pretrain.epochs": "pretrain.trainer.max_epochs",
    "study.pretrain.lr": "pretrain.model.lr",
    "study.pretrain.adapter_lr": "nothing (pretraining trains no adapter): remove it",
    "study.pretrain.loss": "pretrain.model.loss",
    "study.pretrain.norm_stats": "pretrain.model.norm_stats",
    "study.model.spatial_dims": "data.spatial_dims (as in medlora fit, where model.spatial_dims follows it)",
    "study.data.inference_roi": "model.roi_size",
}
RENAMED_METHOD_KEYS: dict[str, str] = {
    "group": "finetune (the module group, as model.finetune in medlora fit)",
    "alpha": "adapter.alpha (as model.adapter.alpha in medlora fit)",
    "options": "adapter.options (as model.adapter.options in medlora fit)",
    "options_pattern": "adapter.options_pattern (as model.adapter.options_pattern in medlora fit)",
    "targets": "adapter.targets (as model.adapter.targets in medlora fit)",
}


def renamed_keys(data: Any, renamed: dict[str, str]) -> list[str]:
    """``"<old key>: renamed to <new key>"`` for every key of ``renamed`` (``<root>.<path>``: what replaced it)
    present in ``data``; the federation config reports its own old keys with it."""
    if not isinstance(data, dict):
        return []
    found = []
    for old, new in renamed.items():
        node: Any = data
        parts = old.split(".")[1:]
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and parts[-1] in node:
            found.append(f"{old}: renamed to {new}")
    return found


def old_keys(data: Any) -> list[str]:
    """``"<old key>: renamed to <new key>"`` for every key of the old study format in ``data``."""
    if not isinstance(data, dict):
        return []
    found = renamed_keys(data, RENAMED)
    if "finetune" in data and not any(f.startswith("study.finetune.") for f in found):
        found.append("study.finetune: split into trainer.max_epochs, model.lr/loss/norm_stats and adapter_methods.lr")
    for i, entry in enumerate(data.get("methods") or []):
        if isinstance(entry, dict):
            found += [f"study.methods[{i}].{k}: renamed to {new}" for k, new in RENAMED_METHOD_KEYS.items()
                      if k in entry]
    return found


# ----------------------------------------------------------------------------- strict conversion by type hints


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
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise StudyConfigError(f"{where}: expected one of {', '.join(map(repr, typing.get_args(tp)))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if origin in (list, collections.abc.Sequence, tuple):
        if not isinstance(value, list):
            raise StudyConfigError(f"{where}: expected a list, got {value!r}")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = args[0] if args else Any
        return [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, collections.abc.Mapping) or tp is dict:
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


def _section(data: Any, where: str, hints: dict[str, Any], allowed: list[str], refused: dict[str, str]) -> dict:
    """A section checked against a signature: keys among ``allowed`` (``refused`` says why others are not)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise StudyConfigError(f"{where}: expected a mapping, got {data!r}")
    out = {}
    for key, value in data.items():
        if key in refused:
            raise StudyConfigError(f"{where}.{key}: {refused[key]}")
        if key not in allowed:
            raise StudyConfigError(f"{where}: unknown key {key!r} (valid: {', '.join(allowed)})")
        out[key] = _convert(hints.get(key, Any), value, f"{where}.{key}") if key != "adapter" else value
    return out


def _model_section(data: Any, where: str, refused: dict[str, str]) -> dict[str, Any]:
    from .module import segmentation_module

    allowed = [k for k in model_parameters() if k not in refused]
    section = _section(data, where, _hints(segmentation_module), allowed, refused)
    if "adapter" in section:
        section["adapter"] = _adapter_override(section["adapter"], f"{where}.adapter")
    return section


def _adapter_override(data: Any, where: str) -> dict[str, Any]:
    """A partial ``model.adapter`` section (every AdapterConfig key but method and rank, which a study sets)."""
    hints = typing.get_type_hints(AdapterConfig)
    allowed = [f.name for f in dataclasses.fields(AdapterConfig) if f.name not in ("method", "rank")]
    refused = {"method": "set by the method entry's name", "rank": "set by the method entry's ranks"}
    return _section(data, where, hints, allowed, refused)


def _data_section(data: Any, where: str, why: str = "set by the study for every job (datasets, folds and seeds)"
                  ) -> dict[str, Any]:
    """The ``data:`` section without the per-job keys (``why`` says who sets them)."""
    from ..data.datamodule import CTSegDataModule

    refused = {k: why for k in PER_JOB_DATA_KEYS}
    allowed = [k for k in data_parameters() if k not in refused]
    return _section(data, where, _hints(CTSegDataModule.__init__), allowed, refused)


def _trainer_section(data: Any, where: str) -> dict[str, Any]:
    return _section(data, where, _trainer_hints(), list(TRAINER_KEYS), {})


_STUDY_MODEL_REFUSED = {
    **{k: "set per method (methods[].name/ranks/finetune/adapter/training_rule, or adapter_methods)"
       for k in PER_JOB_MODEL_KEYS},
    "spatial_dims": "set data.spatial_dims (as in medlora fit, where model.spatial_dims follows it)",
}
_METHOD_REFUSED = {
    **{k: "the same for every method: set it in the study's model section" for k in STUDY_WIDE_MODEL_KEYS},
}


# ----------------------------------------------------------------------------- the study's own records


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
class MethodEntry:
    """One method of the comparison: a method name, the ranks of adapter methods, and an override of the study's
    ``model`` section (``model``: finetune, training_rule, forgetting_weight, lr, adapter, ...)."""

    name: str
    ranks: list[int] = field(default_factory=lambda: [4])
    model: dict[str, Any] = field(default_factory=dict)
    sparsity: float | None = None  # loraprune: the final share of units pruned per channel group
    prune_method: str | None = None  # loraprune: the adapter method trained with the pruner (YAML key ``method``)

    @property
    def family(self) -> str:
        return FAMILIES.get(self.name, "adapter")

    @property
    def adapter_method(self) -> str | None:
        """The adapter method the entry's jobs train (None: the entry trains no adapter)."""
        return self.name if self.family == "adapter" else self.prune_method if self.family == "loraprune" else None

    def job_name(self, rank: int | None) -> str:
        m = self.model
        return job_name(self.name, rank, m.get("finetune"), m.get("training_rule"),
                        float(m.get("forgetting_weight") or 0.0), self.sparsity, self.prune_method)


@dataclass
class PretrainSpec:
    """Overrides of the study's ``model``/``data``/``trainer`` sections for pretraining on ``source``."""

    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)


class RunSections:
    """What a config with a run's ``model:`` and ``data:`` sections (a study, a federation) derives from them."""

    model: dict[str, Any]
    data: dict[str, Any]

    @property
    def spatial_dims(self) -> int:
        return int(self.data.get("spatial_dims", data_parameters()["spatial_dims"].default))

    @property
    def base_given(self) -> str | None:
        """The pretrained base the config names (``model.pretrained``); None: pretrain on ``source``."""
        return self.model.get("pretrained")


@dataclass
class StudyConfig(RunSections):
    """A k-fold cross-validated comparison of fine-tuning methods on a target dataset."""

    target: DatasetSpec
    name: str = "study"
    seeds: list[int] = field(default_factory=lambda: [0])
    pretrain_seeds: list[int] | None = None
    folds: int = 3
    splits_file: str | None = None
    train_cases: list[int | str] = field(default_factory=lambda: [ALL_CASES])
    source: DatasetSpec | None = None
    source_eval: DatasetSpec | None = None
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    adapter_methods: dict[str, Any] = field(default_factory=dict)
    methods: list[MethodEntry] = field(default_factory=list)
    findings: list[str] | None = None
    comparisons: list[list[str]] | None = None

    # ---- the run config of one job

    def method_overrides(self, entry: MethodEntry) -> dict[str, Any]:
        """The model-section override of ``entry``: ``adapter_methods`` (adapter methods) then its own."""
        own = copy.deepcopy(entry.model)
        if entry.adapter_method is None:
            return own
        merged = {**copy.deepcopy(self.adapter_methods), **own}
        merged["adapter"] = {**self.adapter_methods.get("adapter", {}), **own.get("adapter", {})}
        return merged

    def job_model(self, entry: MethodEntry, rank: int | None, base: str | None) -> dict[str, Any]:
        """The ``model:`` section (keyword arguments of ``segmentation_module``) of a job of ``entry`` at
        ``rank`` starting from the base weights ``base``."""
        model = {**copy.deepcopy(self.model), **self.method_overrides(entry), "pretrained": base,
                 "spatial_dims": self.spatial_dims}
        if entry.adapter_method is not None:
            # methods without a rank (svd) take rank 1, which they ignore
            model["adapter"] = {**model.get("adapter", {}), "method": entry.adapter_method, "rank": rank or 1}
        elif entry.family == "full":
            model["finetune"] = "all"
        elif entry.family == "none":
            model["finetune"] = "none"
        return model

    def pretrain_model(self) -> dict[str, Any]:
        """The ``model:`` section of pretraining: the study's, with ``pretrain.model`` over it; all trains, from
        random weights, without a forgetting term (there is no base to forget)."""
        return {**copy.deepcopy(self.model), **copy.deepcopy(self.pretrain.model), "pretrained": None,
                "spatial_dims": self.spatial_dims, "finetune": "all", "forgetting_weight": 0.0}

    def pretrain_trainer(self) -> dict[str, Any]:
        """The ``trainer:`` section of pretraining: the study's with ``pretrain.trainer`` over it, where a budget
        (``max_epochs`` or ``max_steps``) given for pretraining replaces the study's budget as a whole."""
        budget = {"max_epochs", "max_steps"}
        base = {k: v for k, v in self.trainer.items() if not (budget & set(self.pretrain.trainer) and k in budget)}
        return {**base, **self.pretrain.trainer}

    def pretrain_data(self) -> dict[str, Any]:
        """The ``data:`` section of pretraining: the study's with ``pretrain.data`` over it."""
        return {**self.data, **self.pretrain.data}

    def to_record(self) -> dict[str, Any]:
        """The config as JSON-native data (``study.json``), its ``model`` and ``data`` sections completed with the
        defaults of the signatures they are checked against, so that a reader of the run folder needs none."""
        import json

        record = dataclasses.asdict(self)
        for entry in record["methods"]:  # only loraprune entries have these: other records stay as they were
            for key in ("sparsity", "prune_method"):
                if entry[key] is None:
                    del entry[key]
        record["model"] = {**{k: v for k, v in _defaults(model_parameters()).items()
                              if k not in PER_JOB_MODEL_KEYS + LINKED_MODEL_KEYS}, **self.model}
        record["data"] = {**{k: v for k, v in _defaults(data_parameters()).items() if k not in PER_JOB_DATA_KEYS},
                          **self.data}
        return json.loads(json.dumps(record))


_STUDY_SECTIONS = {"model", "data", "trainer", "pretrain", "adapter_methods", "methods"}


def _method_entry(data: Any, where: str) -> MethodEntry:
    if not isinstance(data, dict):
        raise StudyConfigError(f"{where}: expected a mapping, got {data!r}")
    if "name" not in data:
        raise StudyConfigError(f"{where}: missing required key 'name'")
    name, ranks = data["name"], data.get("ranks", [4])
    if not isinstance(name, str):
        raise StudyConfigError(f"{where}.name: expected str, got {name!r}")
    ranks = _convert(list[int], ranks, f"{where}.ranks")
    overrides = {k: v for k, v in data.items() if k not in ("name", "ranks", "stage", "sparsity", "method")}
    sparsity, prune_method = None, None
    if name == "loraprune":  # LoRAPrune: an adapter trained with the pruner, evaluated on the pruned base
        sparsity = data.get("sparsity")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise StudyConfigError(f"{where}.sparsity: loraprune needs the share of units pruned per channel group, "
                                   f"a number in [0, 1), got {sparsity!r}")
        prune_method = data.get("method", "lora")
        if prune_method not in list_methods():
            raise StudyConfigError(f"{where}.method: unknown adapter method {prune_method!r} (valid: "
                                   f"{', '.join(sorted(list_methods()))})")
        sparsity = float(sparsity)
    else:
        for key in ("sparsity", "method"):
            if key in data:
                raise StudyConfigError(f"{where}.{key}: only the loraprune method takes a {key}")
    if name == "transplant":  # NOT: the stage trains, as model.finetune stage:<stage>
        if "finetune" in data:
            raise StudyConfigError(f"{where}.finetune: a transplant trains its stage; name it with stage: <stage>")
        stage = data.get("stage")
        if not isinstance(stage, str) or not stage.strip():
            raise StudyConfigError(f"{where}.stage: a transplant needs a stage (a module name such as down_list.1, "
                                   f"or <container>.<i>:<j>), got {stage!r}")
        overrides["finetune"] = f"{STAGE_PREFIX}{stage}"
    elif "stage" in data:
        raise StudyConfigError(f"{where}.stage: only the transplant method takes a stage")
    return MethodEntry(name, ranks, _model_section(overrides, where, _METHOD_REFUSED), sparsity, prune_method)


def study_from_mapping(data: Any) -> StudyConfig:
    """Build a :class:`StudyConfig` from YAML data (no file, no dataset or network checks)."""
    if not isinstance(data, dict):
        raise StudyConfigError(f"study: expected a mapping, got {data!r}")
    found = old_keys(data)
    if found:
        raise StudyConfigError("old study format: " + "; ".join(found))
    simple = {k: v for k, v in data.items() if k not in _STUDY_SECTIONS}
    hints = typing.get_type_hints(StudyConfig)
    known = [f.name for f in dataclasses.fields(StudyConfig)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise StudyConfigError(f"study: unknown key {unknown[0]!r} (valid: {', '.join(known)})")
    kwargs = {k: _convert(hints[k], v, f"study.{k}") for k, v in simple.items()}
    if "target" not in kwargs:
        raise StudyConfigError("study: missing required key 'target'")
    kwargs["model"] = _model_section(data.get("model"), "study.model", _STUDY_MODEL_REFUSED)
    kwargs["data"] = _data_section(data.get("data"), "study.data")
    kwargs["trainer"] = _trainer_section(data.get("trainer"), "study.trainer")
    pretrain = data.get("pretrain") or {}
    if not isinstance(pretrain, dict):
        raise StudyConfigError(f"study.pretrain: expected a mapping, got {pretrain!r}")
    unknown = sorted(set(pretrain) - {"model", "data", "trainer"})
    if unknown:
        raise StudyConfigError(f"study.pretrain: unknown key {unknown[0]!r} (valid: model, data, trainer)")
    kwargs["pretrain"] = PretrainSpec(
        _model_section(pretrain.get("model"), "study.pretrain.model", {**_STUDY_MODEL_REFUSED, **{
            "pretrained": "pretraining starts from random weights (a study with model.pretrained does not pretrain)",
            "forgetting_weight": "pretraining has no base to forget"}}),
        _data_section(pretrain.get("data"), "study.pretrain.data"),
        _trainer_section(pretrain.get("trainer"), "study.pretrain.trainer"))
    overrides = data.get("adapter_methods") or {}
    if isinstance(overrides, dict) and {"name", "ranks"} & set(overrides):
        raise StudyConfigError("study.adapter_methods: names and ranks belong to the method entries")
    kwargs["adapter_methods"] = _model_section(overrides, "study.adapter_methods", _METHOD_REFUSED)
    methods = data.get("methods") or []
    if not isinstance(methods, list):
        raise StudyConfigError(f"study.methods: expected a list, got {methods!r}")
    kwargs["methods"] = [_method_entry(m, f"study.methods[{i}]") for i, m in enumerate(methods)]
    return StudyConfig(**kwargs)


def load_study_config(path: str | Path) -> StudyConfig:
    """Read and check a study YAML file (everything that needs no other file; see :func:`check_study_inputs`)."""
    path = Path(path)
    if not path.is_file():
        raise StudyConfigError(f"{path}: study config not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise StudyConfigError(f"{path}: invalid YAML ({' '.join(str(exc).split())})") from None
    try:
        config = study_from_mapping(data or {})
        _check(config)
    except (StudyConfigError, checks.SettingError) as exc:
        raise StudyConfigError(f"{path}: {exc}") from None
    return config


# ----------------------------------------------------------------------------- checks


class _Sections:
    """``get("model.lr")`` over nested sections, as jsonargparse's namespace answers :func:`checks.check_run`."""

    def __init__(self, **sections: dict[str, Any]) -> None:
        self.sections = sections

    def get(self, key: str, default: Any = None) -> Any:
        node: Any = self.sections
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def _defaults(params: dict[str, inspect.Parameter]) -> dict[str, Any]:
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _check(config: StudyConfig) -> None:
    """The checks that read nothing but the config (a run folder's study.json is loaded with them too)."""
    for name in ("target", "source", "source_eval"):
        spec = getattr(config, name)
        if spec is not None and (spec.data_dir is None) == (spec.phantoms is None):
            raise StudyConfigError(f"study.{name}: give exactly one of data_dir or phantoms")
        if spec is not None and spec.phantoms is not None:
            ph, where = spec.phantoms, f"study.{name}.phantoms"
            checks.one_of(f"{where}.domain", ph.domain, ("tbi", "sah"))
            checks.at_least(f"{where}.cases", ph.cases, 1)
            for key in ("shape", "spacing"):
                if getattr(ph, key) is not None:
                    checks.axes(f"{where}.{key}", getattr(ph, key), 3)
    if config.base_given is None and config.source is None:
        raise StudyConfigError("study: give model.pretrained (pretrained base weights) or source (data to pretrain "
                               "on)")
    if config.base_given is not None and (config.pretrain.model or config.pretrain.data or config.pretrain.trainer):
        raise StudyConfigError("study.pretrain: the study starts from model.pretrained and does not pretrain")
    _check_grid(config)
    target_phantoms = config.target.phantoms
    checks.check_folds("study.folds", config.folds, target_phantoms.cases if target_phantoms else config.folds,
                       "study.target.phantoms")
    if config.source_eval is not None and config.source_eval.phantoms is not None:
        ev = config.source_eval.phantoms
        checks.check_folds("study.folds", config.folds, ev.cases, "study.source_eval.phantoms (split like the "
                           "folds)")
        src = config.source.phantoms if config.source is not None else None
        if src is not None and (src.domain, src.seed) == (ev.domain, ev.seed):
            raise StudyConfigError(f"study.source_eval.phantoms.seed: {ev.seed} is the seed of the pretraining "
                                   "phantoms (study.source): the held-out cases would be the base's training cases")
    if "max_epochs" not in config.trainer and "max_steps" not in config.trainer:
        raise StudyConfigError("study.trainer.max_epochs: required (the fine-tuning budget of every job)")
    if not config.methods:
        raise StudyConfigError("study.methods: list at least one method")
    seen: set[str] = set()
    meta: dict[tuple, Any] = {}  # the backbone on the meta device, built once for all methods
    for i, entry in enumerate(config.methods):
        for job in _check_method(config, entry, f"study.methods[{i}]", meta):
            if job in seen:
                raise StudyConfigError(f"study.methods[{i}]: job {job!r} appears twice")
            seen.add(job)
    if config.findings is not None:
        from ..evaluation.findings import select_findings

        try:
            select_findings(config.findings)
        except ValueError as exc:
            raise StudyConfigError(f"study.findings: {exc}") from None
    for i, pair in enumerate(config.comparisons or []):
        unknown = [j for j in pair if j not in seen]
        if len(pair) != 2 or unknown:
            raise StudyConfigError(f"study.comparisons[{i}]: expected [method_job, reference_job] among the study's "
                                   f"jobs ({', '.join(sorted(seen))}), got {pair}")


def _check_grid(config: StudyConfig) -> None:
    for key in ("seeds", "pretrain_seeds"):
        values = getattr(config, key)
        if values is None:
            continue
        if not values or len(set(values)) != len(values) or any(v < 0 for v in values):
            raise StudyConfigError(f"study.{key}: give distinct seeds >= 0, got {values}")
    if config.pretrain_seeds is not None:
        if config.base_given is not None:
            raise StudyConfigError("study.pretrain_seeds: the study starts from model.pretrained and does not "
                                   "pretrain")
        if len(config.pretrain_seeds) not in (1, len(config.seeds)):
            raise StudyConfigError(f"study.pretrain_seeds: give one seed, or one per fine-tuning seed "
                                   f"({len(config.seeds)}), got {config.pretrain_seeds}")
    sizes = config.train_cases
    if not sizes or len(set(map(str, sizes))) != len(sizes):
        raise StudyConfigError(f"study.train_cases: give distinct sizes, got {sizes}")
    for i, n in enumerate(sizes):
        if n != ALL_CASES and (isinstance(n, str) or n < 1):
            raise StudyConfigError(f"study.train_cases[{i}]: expected a number of cases >= 1 or '{ALL_CASES}', got "
                                   f"{n!r}")


def _checked(config: StudyConfig, model: dict[str, Any], data: dict[str, Any], trainer: dict[str, Any],
             origin: Any, meta: dict[tuple, Any]) -> None:
    """Run :func:`checks.check_run` on one job's sections; ``origin(key)`` names the study key of a failure."""
    from .module import segmentation_module

    view = _Sections(model={**_defaults(_parameters(segmentation_module)), **model},
                     data={**_defaults(data_parameters()), **data}, trainer=trainer)
    try:
        checks.check_run(view, network_cache=meta)
    except checks.SettingError as exc:
        raise StudyConfigError(f"{origin(exc.key)}: {exc.problem}") from None


def _check_method(config: StudyConfig, entry: MethodEntry, where: str, meta: dict[tuple, Any]) -> list[str]:
    """Check one method entry (its network too, built on the meta device); returns its job names."""
    adapters = set(list_methods())
    if entry.name not in BASELINES and entry.name not in adapters:
        raise StudyConfigError(
            f"{where}.name: unknown method {entry.name!r} (valid: {', '.join(BASELINES + tuple(sorted(adapters)))})"
        )
    own = entry.model
    if entry.family == "none" and own:
        raise StudyConfigError(f"{where}: no_finetune trains nothing; it takes no {sorted(own)[0]!r}")
    if entry.family == "module" and not own.get("finetune"):
        raise StudyConfigError(f"{where}.finetune: module-wise fine-tuning needs a module group")
    if entry.family == "full" and "finetune" in own:
        raise StudyConfigError(f"{where}.finetune: full fine-tuning trains every group; use name: module for a "
                               "group")
    method = entry.adapter_method
    if method is None:
        for key in ("adapter", "training_rule", "training_rule_options"):
            if key in own:
                raise StudyConfigError(f"{where}.{key}: only adapter methods take an adapter section or a training "
                                       "rule")
    if method is not None and (not entry.ranks or any(r < 1 for r in entry.ranks)):
        raise StudyConfigError(f"{where}.ranks: give positive ranks")
    ranks: list[int | None] = list(entry.ranks) if method is not None and get_method(method).uses_rank else [None]
    rule = config.method_overrides(entry).get("training_rule")
    if rule and method is not None:
        from ..adapters.optim import check_rule_method

        try:
            check_rule_method(rule, method)
        except ValueError as exc:
            raise StudyConfigError(f"{where}.training_rule: {exc}") from None
    overrides = config.method_overrides(entry)
    adapter_defaults = config.adapter_methods

    def origin(key: str, rank: int | None = None) -> str:
        section, _, leaf = key.partition(".")
        top = leaf.split(".")[0]
        if section != "model":
            return f"study.{key}"
        if top == "adapter":  # the adapter as a whole (method, rank and layers together)
            return f"{where}: rank {rank}" if len(ranks) > 1 else where
        if top == "finetune" and entry.family == "transplant":
            return f"{where}.stage"
        if top in entry.model:
            return f"{where}.{leaf}"
        if top in overrides and top in adapter_defaults:
            return f"study.adapter_methods.{leaf}"
        return f"study.{key}"

    for rank in ranks:
        model = config.job_model(entry, rank, None)
        _checked(config, model, config.data, config.trainer, lambda k, r=rank: origin(k, r), meta)
    if entry.family == "loraprune":  # the backbone needs a channel graph, known before anything trains
        from ..pruning import PruningError, channel_graph

        sections = {**_defaults(model_parameters()), **config.job_model(entry, ranks[0], None)}
        network = checks.meta_network(sections["backbone"], dict(sections.get("backbone_args") or {}),
                                      config.spatial_dims, {"backbone": "study.model.backbone",
                                                            "backbone_args": "study.model.backbone_args"})
        if network is not None:
            try:
                channel_graph(network)
            except PruningError as exc:
                raise StudyConfigError(f"{where}.name: {exc}") from None
    return [entry.job_name(rank) for rank in ranks]


def check_study_inputs(config: StudyConfig, path: str | Path) -> None:
    """What :func:`load_study_config` leaves out because it reads other files: the datasets (their case counts
    against the folds and ``train_cases``), ``splits_file``, the base weights, and pretraining's sections.
    ``medlora crossval`` runs this before it claims the run folder."""
    from ..data.dataset import DatasetError, load_splits, read_dataset

    try:
        counts = {}
        for name in ("target", "source", "source_eval"):
            spec = getattr(config, name)
            if spec is None:
                continue
            if spec.data_dir is not None:
                try:
                    counts[name] = len(read_dataset(spec.data_dir).case_ids)
                except DatasetError as exc:
                    raise StudyConfigError(f"study.{name}.data_dir: {exc}") from None
            else:
                counts[name] = spec.phantoms.cases
        checks.check_folds("study.folds", config.folds, counts["target"], "the target dataset")
        if "source_eval" in counts:
            checks.check_folds("study.folds", config.folds, counts["source_eval"], "study.source_eval (split like "
                               "the folds)")
        fewest = counts["target"] - -(-counts["target"] // config.folds)  # training cases of the largest fold
        if config.splits_file:
            try:
                splits = load_splits(config.splits_file)
            except DatasetError as exc:
                raise StudyConfigError(f"study.splits_file: {exc}") from None
            if len(splits) != config.folds:
                raise StudyConfigError(f"study.splits_file: {config.splits_file} has {len(splits)} folds, "
                                       f"study.folds is {config.folds}")
            fewest = min(len(s["train"]) for s in splits)
        for i, n in enumerate(config.train_cases):
            if n != ALL_CASES and n > fewest:
                raise StudyConfigError(f"study.train_cases[{i}]: {n} cases, but a fold has only {fewest} training "
                                       "cases")
        checks.existing_file("study.model.pretrained", config.base_given)
        if config.base_given is None:
            model, data, trainer = config.pretrain_model(), config.pretrain_data(), config.pretrain_trainer()

            def origin(key: str) -> str:
                section, _, leaf = key.partition(".")
                own = getattr(config.pretrain, section, {})
                return f"study.pretrain.{key}" if leaf.split(".")[0] in own else f"study.{key}"

            _checked(config, model, data, trainer, origin, {})
    except (StudyConfigError, checks.SettingError) as exc:
        raise StudyConfigError(f"{path}: {exc}") from None


__all__ = ["BASELINES", "DatasetSpec", "MethodEntry", "PhantomSpec", "PretrainSpec", "StudyConfig",
           "StudyConfigError", "check_study_inputs", "load_study_config", "old_keys", "renamed_keys",
           "study_from_mapping"]
