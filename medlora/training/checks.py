"""Checks of run settings made before any work: value ranges, and the network built on the meta device.

``medlora fit`` and ``medlora crossval`` call these on their configs before a folder is claimed, data is
read or a weight is loaded, so that a bad value is one line naming the file and the key instead of a
traceback after the first job (or a run that never ends: Lightning reads ``max_epochs: -1`` as "no limit").
Every check raises :class:`SettingError` with the key path the caller gave and the problem; the caller
prefixes the file.

The network is assembled on PyTorch's ``meta`` device (shapes without storage), so even a large backbone
costs no memory and no time to check that its name and arguments, the module group and the adapter fit.
A backbone or adapter method whose construction needs real numbers (an SVD, ``Tensor.item()``) cannot be
checked this way; it is then checked when its job builds it.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import MedloraError

LOSSES = ("dice_ce", "soft_dice")
NORM_STATS = ("update", "freeze")
# Errors by which a constructor rejects its arguments; anything else (NotImplementedError, RuntimeError)
# is the meta device's limit, not the user's mistake.
_ARGUMENT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, MedloraError)


class SettingError(MedloraError, ValueError):
    """A setting out of range or unusable: ``key`` is its path (``data.batch_size``), ``problem`` what is wrong."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(key: str, value: Any, low: float) -> None:
    if not _is_number(value) or value < low:
        raise SettingError(key, f"must be at least {low:g}, got {value!r}")


def positive(key: str, value: Any) -> None:
    if not _is_number(value) or value <= 0:
        raise SettingError(key, f"must be greater than 0, got {value!r}")


def within(key: str, value: Any, low: float, high: float, high_open: bool = False) -> None:
    """``low <= value <= high`` (``< high`` if ``high_open``)."""
    if not _is_number(value) or value < low or value > high or (high_open and value == high):
        raise SettingError(key, f"must be in [{low:g}, {high:g}{')' if high_open else ']'}, got {value!r}")


def one_of(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise SettingError(key, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def axes(key: str, value: Any, n: int) -> None:
    """A patch, window or spacing: ``n`` positive numbers."""
    if not isinstance(value, (list, tuple)) or len(value) != n or not all(_is_number(v) and v > 0 for v in value):
        raise SettingError(key, f"must be {n} positive numbers (one per axis), got {_plain(value)}")


def hu_window(key: str, value: Any) -> None:
    if (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value)
            or not value[0] < value[1]):
        raise SettingError(key, f"must be [low, high] in HU with low < high, got {_plain(value)}")


def existing_file(key: str, value: Any) -> None:
    if value is not None and not Path(str(value)).expanduser().is_file():
        raise SettingError(key, f"{value}: file not found")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_data(prefix: str, *, spatial_dims: Any, patch_size: Any, batch_size: Any, samples_per_volume: Any,
               pos_fraction: Any, hu_window_: Any, target_spacing: Any = None) -> None:
    """The data settings shared by ``CTSegDataModule`` and a study's ``data`` block; keys are ``prefix + name``."""
    one_of(f"{prefix}spatial_dims", spatial_dims, (2, 3))
    axes(f"{prefix}patch_size", patch_size, spatial_dims)
    at_least(f"{prefix}batch_size", batch_size, 1)
    if spatial_dims == 2 and batch_size % 2:
        raise SettingError(f"{prefix}batch_size", f"2D slice batches are half positive, half negative: must be even, "
                                                  f"got {batch_size}")
    at_least(f"{prefix}samples_per_volume", samples_per_volume, 1)
    within(f"{prefix}pos_fraction", pos_fraction, 0.0, 1.0)
    hu_window(f"{prefix}hu_window", hu_window_)
    if target_spacing is not None:
        axes(f"{prefix}target_spacing", target_spacing, 3)  # resampling acts on the 3D volumes, also in 2D mode


def check_training(keys: dict[str, str], *, epochs: Any = 0, lr: Any = 1.0, loss: Any = LOSSES[0],
                   norm_stats: Any = NORM_STATS[0]) -> None:
    """Budget and optimiser settings; ``keys`` maps ``epochs``/``lr``/``loss``/``norm_stats`` to key paths."""
    at_least(keys.get("epochs", "epochs"), epochs, 0)
    positive(keys.get("lr", "lr"), lr)
    one_of(keys.get("loss", "loss"), loss, LOSSES)
    one_of(keys.get("norm_stats", "norm_stats"), norm_stats, NORM_STATS)


def check_folds(key: str, folds: int, n_cases: int, where: str) -> None:
    """k-fold cross-validation needs 2 <= k <= the number of cases (every fold holds a case out)."""
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise SettingError(key, f"need at least 2 folds, got {folds!r}")
    if folds > n_cases:
        raise SettingError(key, f"{folds} folds need at least {folds} cases; {where} has {n_cases}")


def meta_network(backbone: str, backbone_args: dict[str, Any], spatial_dims: int,
                 keys: dict[str, str]) -> nn.Module | None:
    """The backbone built on the meta device by the assembly (:func:`medlora.assembly.build_architecture`); None if
    it cannot be built there (checked when the job runs).

    An unknown name is reported under ``keys["backbone"]``, rejected arguments under ``keys["backbone_args"]``.
    """
    from ..assembly import ModelSpec, ModelSpecError, build_architecture
    from ..models import list_models

    if backbone not in list_models():
        raise SettingError(keys["backbone"], f"unknown backbone {backbone!r}; available: {', '.join(list_models())}")
    try:
        return build_architecture(ModelSpec(backbone, dict(backbone_args), spatial_dims=spatial_dims), device="meta")
    except ModelSpecError as exc:
        problem = exc.problem.split(f"cannot build {backbone!r} with {backbone_args}: ", 1)[-1]
        raise SettingError(keys["backbone_args"], f"{backbone}: {problem}") from None
    except _ARGUMENT_ERRORS as exc:  # e.g. a backbone that reads a checkpoint while built names the file
        raise SettingError(keys["backbone_args"], f"{backbone}: {_first_line(exc)}") from None
    except Exception:  # noqa: BLE001 - the meta device's limits, see the module docstring
        return None


def check_run(config: Any, network_cache: dict[tuple, Any] | None = None) -> None:
    """Every check of a run's ``model``/``data``/``trainer`` sections that reads no dataset: value ranges, the
    adapter section, the training rule, and the network with its adapter or module group on the meta device.

    ``config.get("data.patch_size")`` answers dotted keys (a parsed ``medlora fit`` config, or one job's
    sections of a study); a :class:`SettingError` names the key (``model.lr``). ``network_cache`` keeps the
    meta-device backbones between calls (a study checks many jobs of one backbone).
    """
    from ..adapters import AdapterConfig

    def get(key: str, default: Any = None) -> Any:
        value = config.get(key, default)
        return default if value is None else value

    dims = get("data.spatial_dims")
    check_data("data.", spatial_dims=dims, patch_size=get("data.patch_size"), batch_size=get("data.batch_size"),
               samples_per_volume=get("data.samples_per_volume"), pos_fraction=get("data.pos_fraction"),
               hu_window_=get("data.hu_window"), target_spacing=config.get("data.target_spacing"))
    epochs = config.get("trainer.max_epochs")
    bounded = (get("trainer.max_steps", -1) or -1) > 0 or config.get("trainer.max_time") is not None
    if epochs is not None and not (epochs == -1 and bounded):  # -1 with a step or time limit: Lightning's "no limit"
        at_least("trainer.max_epochs", epochs, 0)
    check_training({k: f"model.{k}" for k in ("lr", "loss", "norm_stats")}, lr=get("model.lr"),
                   loss=get("model.loss"), norm_stats=get("model.norm_stats"))
    at_least("model.weight_decay", get("model.weight_decay", 0.0), 0)
    at_least("model.forgetting_weight", get("model.forgetting_weight", 0.0), 0)
    at_least("model.sw_batch_size", get("model.sw_batch_size", 1), 1)
    within("model.sw_overlap", get("model.sw_overlap", 0.0), 0.0, 1.0, high_open=True)
    within("model.threshold", get("model.threshold", 0.5), 0.0, 1.0)
    if config.get("model.roi_size") is not None:
        axes("model.roi_size", list(config.get("model.roi_size")), dims)
    adapter = config.get("model.adapter")
    rule = config.get("model.training_rule")
    if adapter is not None:
        try:
            adapter = AdapterConfig.from_dict(_plain_dict(adapter))
        except ValueError as exc:
            raise SettingError("model.adapter", _first_line(exc)) from None
        if rule not in (None, "adamw"):
            from ..adapters.optim import check_rule_method, get_rule

            try:
                get_rule(rule)
                check_rule_method(rule, adapter.method)
            except ValueError as exc:
                raise SettingError("model.training_rule", _first_line(exc)) from None
    key = (get("model.backbone"), repr(get("model.backbone_args", {})), dims)
    cache = {} if network_cache is None else network_cache
    if key not in cache:
        cache[key] = meta_network(get("model.backbone"), dict(get("model.backbone_args", {})), dims,
                                  {"backbone": "model.backbone", "backbone_args": "model.backbone_args"})
    check_network(cache[key], {"adapter": "model.adapter", "finetune": "model.finetune",
                               "training_rule": "model.training_rule", "hu_window": "data.hu_window"},
                  adapter=adapter, finetune=config.get("model.finetune"), training_rule=rule,
                  rule_options=_plain_dict(get("model.training_rule_options", {})), hu_window_=get("data.hu_window"))
    existing_file("model.pretrained", config.get("model.pretrained"))


def _plain_dict(value: Any) -> dict[str, Any]:
    return value.as_dict() if hasattr(value, "as_dict") else dict(value)


def check_network(base: nn.Module | None, keys: dict[str, str], *, adapter: Any = None, finetune: str | None = None,
                  training_rule: str | None = None, rule_options: dict[str, Any] | None = None,
                  hu_window_: Sequence[float] | None = None) -> None:
    """Attach ``adapter`` / unfreeze ``finetune`` on a copy of the meta-device ``base`` as training will.

    ``keys`` names the key path of each setting (``adapter``, ``finetune``, ``training_rule``, ``hu_window``).
    ``adapter`` is an :class:`~medlora.adapters.AdapterConfig`.
    """
    from ..assembly import ModelSpecError, make_trainable
    from ..models import group_parameters

    if training_rule is not None:
        _check_rule_options(keys["training_rule"], training_rule, rule_options or {})
    if base is None:
        return
    problem = input_window_problem(base, hu_window_)
    if problem:
        raise SettingError(keys["hu_window"], problem)
    if finetune not in (None, "none"):
        try:
            group_parameters(base, finetune)
        except ValueError as exc:
            raise SettingError(keys["finetune"], _first_line(exc)) from None
    model = copy.deepcopy(base)
    try:
        with warnings.catch_warnings():  # the job repeats them (e.g. an adapter as large as its layer)
            warnings.simplefilter("ignore")
            make_trainable(model, adapter, finetune)
    except ModelSpecError as exc:
        key = keys["finetune"] if exc.key == "model.finetune" else keys["adapter"]
        raise SettingError(key, exc.problem) from None
    except _ARGUMENT_ERRORS as exc:
        raise SettingError(keys["adapter" if adapter is not None else "finetune"], _first_line(exc)) from None
    except Exception:  # noqa: BLE001 - the meta device's limits, see the module docstring
        return
    if training_rule not in (None, "adamw"):
        from ..adapters.optim import lora_pairs

        if not lora_pairs(model):
            raise SettingError(keys["training_rule"], f"rule {training_rule!r} needs LoRA-shaped adapters (lora_A "
                                                      "and lora_B), e.g. lora, lora_c, conv_lora or dora")


def input_window_problem(model: nn.Module, window: Sequence[float] | None) -> str | None:
    """A backbone that maps intensities back to HU (SAM's CT windows) must see the data's HU window."""
    expected = getattr(model, "input_window", None)
    if window is None or expected is None or [float(v) for v in window] == [float(v) for v in expected]:
        return None
    return (f"{list(window)} differs from the backbone's input_window {list(expected)}: use the same HU range "
            "(SAM configs use [-1024, 3071] and window inside the model)")


def _check_rule_options(key: str, rule: str, options: dict[str, Any]) -> None:
    import dataclasses

    from ..adapters.optim import get_rule

    try:
        spec = get_rule(rule)
    except ValueError as exc:
        raise SettingError(key, _first_line(exc)) from None
    known = {f.name for f in dataclasses.fields(spec.options_cls)}
    bad = sorted(set(options) - known)
    if bad:
        raise SettingError(f"{key}_options", f"unknown option(s) {', '.join(bad)} for training rule {rule!r}; valid: "
                                             f"{', '.join(sorted(known))}")


def _first_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
