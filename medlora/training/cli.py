"""``medlora fit|validate|test|predict --config X.yaml``: the LightningCLI of the toolkit.

The ``model:`` section is :func:`~medlora.training.module.segmentation_module`: the model record's keys
(backbone, base weights, adapter or module group, training rule) and the module's settings, built through
:func:`medlora.assembly.build_model`. The CLI always carries a ``checkpoint`` section (Lightning's
``ModelCheckpoint`` with ``save_last``) so that ``--ckpt_path last`` resumes an interrupted run, an
``adapter_file`` section (where the adapter file goes) and an ``adapter_init`` section (data-driven adapter
starts), adds the checkpoint records (:mod:`medlora.training.callbacks`), and links the data's
``spatial_dims`` to the model's, so it is written once. ``model.roi_size`` (the sliding-window size of
evaluation) defaults to the data's ``patch_size``. A study (``medlora crossval``) reads these same sections.

Bad configs end in one line, ``medlora: error: <file>: <key path>: <problem>`` (exit 2), where ``<file>``
is the last ``--config`` file that sets the key (or ``command line``): jsonargparse's parse errors (a
misspelt key, a wrong type) are rewritten so, and before anything is built the settings are checked
(:mod:`medlora.training.checks`: value ranges, the dataset's folds, the network with its adapter or module
group built on the meta device). Ctrl-C ends with one line and exit code 130.
"""

from __future__ import annotations

import logging
import re
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from ..data.datamodule import CTSegDataModule
from ..errors import MedloraError
from . import checks
from .callbacks import AdapterFileWriter, AdapterInitFromData, CheckpointRecords, InterruptBetweenSteps
from .module import segmentation_module

COMMAND_LINE = "command line"


class MedloraCLI(LightningCLI):
    def init_parser(self, **kwargs: Any) -> Any:
        # parse errors are raised (and rewritten into one line by `run`) instead of printing the whole usage
        return super().init_parser(**{**kwargs, "exit_on_error": False})

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.monitor": "val/Dice",
                             "checkpoint.mode": "max", "checkpoint.save_top_k": 1,
                             "checkpoint.filename": "best-{epoch:03d}"})
        parser.add_lightning_class_args(AdapterFileWriter, "adapter_file")
        parser.add_lightning_class_args(AdapterInitFromData, "adapter_init")
        parser.link_arguments("data.spatial_dims", "model.spatial_dims")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        # checked here, before Lightning seeds, instantiates or prints anything
        subcommand = self.config.get("subcommand")
        try:
            check_settings(self.config[subcommand] if subcommand else self.config)
        except checks.SettingError as exc:
            raise MedloraError(f"{config_origin(exc.key, sys.argv[1:])}: {exc}") from None

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SystemExit:
            # Lightning turns Ctrl-C into sys.exit(1) after its teardown; tell the caller what it was
            if self.trainer.interrupted:
                raise KeyboardInterrupt("resume from the last saved checkpoint with the same command and "
                                        "--ckpt_path last") from None
            raise


def check_settings(config: Any) -> None:
    """Check a parsed ``fit``/``validate``/``test``/``predict`` config (:func:`~.checks.check_run`, the checks a
    study's sections get too) and that its fold exists; :class:`~.checks.SettingError` names the key."""
    checks.check_run(config)
    _check_fold(config)


def _check_fold(config: Any) -> None:
    """The fold must exist: in ``splits_file``, in the dataset's own ``splits_final.json``, or among ``num_folds``."""
    from ..data.dataset import SPLITS_FILE, DatasetError, load_splits, read_dataset

    data_dir = Path(str(config.get("data.data_dir"))).expanduser()
    try:
        n_cases = len(read_dataset(data_dir).case_ids)
    except DatasetError as exc:
        raise checks.SettingError("data.data_dir", str(exc)) from None
    fold, splits_file = config.get("data.fold"), config.get("data.splits_file")
    if fold == "all":
        return
    if not isinstance(fold, int) or isinstance(fold, bool):
        raise checks.SettingError("data.fold", f"must be a fold index or 'all', got {fold!r}")
    if splits_file or (data_dir / SPLITS_FILE).is_file():
        key = "data.splits_file" if splits_file else "data.data_dir"
        try:
            k, source = len(load_splits(splits_file or data_dir)), str(splits_file or data_dir / SPLITS_FILE)
        except DatasetError as exc:
            raise checks.SettingError(key, str(exc)) from None
    else:
        k, source = config.get("data.num_folds"), f"data.num_folds {config.get('data.num_folds')}"
        checks.check_folds("data.num_folds", k, n_cases, str(data_dir))
    if not 0 <= fold < k:
        raise checks.SettingError("data.fold", f"fold {fold} does not exist: {source} gives folds 0..{k - 1} "
                                               "(or all)")


def _arguments(args: list[str]) -> list[tuple[str, str | None]]:
    """``(option, config file)`` pairs in order: ``("config", path)`` for ``--config``, ``(option, None)`` else."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name == "--config":
            out.append(("config", value if eq else (args[i + 1] if i + 1 < len(args) else "")))
            i += 1 if eq else 2
            continue
        if name.startswith("--"):
            out.append((name[2:], None))
        i += 1
    return out


def _config_files(args: list[str]) -> list[str]:
    return [path for option, path in _arguments(args) if path is not None]


def config_origin(key: str, args: list[str]) -> str:
    """Where ``key`` (``model.lr``) was set last: a ``--config`` file, or ``command line`` for ``--model.lr``.

    Later arguments override earlier ones, as in jsonargparse. A key set nowhere (a default, a missing
    required key) is reported against the last config file.
    """
    origin = None
    for option, path in _arguments(args):
        if path is not None and _file_sets(path, key):
            origin = path
        elif path is None and (key == option or key.startswith(option + ".") or option.startswith(key + ".")):
            origin = COMMAND_LINE
    files = _config_files(args)
    return origin or (files[-1] if files else COMMAND_LINE)


def _file_sets(path: str, key: str) -> bool:
    try:
        node: Any = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    for part in key.split("."):
        if not isinstance(node, dict):
            return True  # a value set above this level (e.g. the whole section as a string)
        if part not in node:
            return False
        node = node[part]
    return True


def parse_error_line(message: str, args: list[str]) -> MedloraError:
    """A jsonargparse error (several indented lines, nested for a dataclass such as ``model.adapter``) as one
    line: ``<file>: <key path>: <problem>``."""
    missing = re.search(r"File does not exist: '([^']+)'", message)
    if missing:
        return MedloraError(f"{missing.group(1)}: config file not found")
    if "Problems parsing config" in message:
        for path in _config_files(args):
            try:
                yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            except yaml.YAMLError as exc:
                return MedloraError(f"{path}: invalid YAML ({' '.join(str(exc).split())})")
            except OSError:
                continue
    unknown = re.search(r"does not accept option '([^']+)'", message)
    nested = re.findall(r'Parser key "([^"]+)":\s*\n\s*([^\n]+)', message)
    required = re.search(r'Key "([^"]+)" is required', message)
    if unknown:
        key, problem = unknown.group(1), "unknown key"
    elif nested:
        key, problem = ".".join(k for k, _ in nested), nested[-1][1].strip()
        inner = re.search(r"Option '([^']+)' is not accepted", message)
        if inner:
            key, problem = f"{key}.{inner.group(1)}", "unknown key"
    elif required:
        key, problem = required.group(1), "required, but set nowhere"
    else:
        return MedloraError(" ".join(line.strip() for line in message.splitlines() if line.strip()))
    if problem == "unknown key":
        problem += f" (`medlora {args[0] if args else 'fit'} --help` lists the valid ones)"
    problem = re.sub(r"<class '(\w+)'>", r"\1", problem)
    return MedloraError(f"{config_origin(key, args)}: {key}: {problem}")


class _HideInterruptNotice(logging.Filter):
    """Lightning logs its own "Detected KeyboardInterrupt" notice; ours is the one line the user sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Detected KeyboardInterrupt" not in record.getMessage()


def run(args: list[str]) -> int:
    """Run a LightningCLI subcommand with ``args`` (e.g. ``["fit", "--config", "configs/x.yaml"]``).

    The arguments go through ``sys.argv`` because Lightning's DDP launcher starts the other ranks by
    re-running the command line.
    """
    saved = sys.argv
    sys.argv = [saved[0] if saved else "medlora", *args]
    notices = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    hide = _HideInterruptNotice()
    notices.addFilter(hide)
    try:
        MedloraCLI(
            segmentation_module,
            CTSegDataModule,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": False},
            trainer_defaults={"callbacks": [CheckpointRecords(), InterruptBetweenSteps()]},
        )
    except ArgumentError as exc:
        raise parse_error_line(str(exc), args) from None
    finally:
        sys.argv = saved
        notices.removeFilter(hide)
    return 0
