"""``medlora infer``: segment CT volumes with a trained model, an adapter, or a cross-validation ensemble.

Models come from three kinds of ``--model``:

* a Lightning checkpoint of a full model (pretraining or full fine-tuning): backbone from its
  ``hyper_parameters``, preprocessing from its ``medlora_preprocessing`` record;
* a plain state dict (``.safetensors``/``.pt``) or a checkpoint plus one or more ``--adapter`` files:
  each adapter gives one model (base + adapter, merged, so it costs what the base costs); backbone
  and preprocessing come from the adapter's metadata (``extra``). Every adapter's base fingerprint is
  checked before any case runs;
* a ``medlora crossval`` run folder plus ``--method JOB``: the k fold models of that job;
* base weights plus ``--composition FILE``: several single-class adapters, chosen per case by a router or all of
  them, their class maps fused into one multi-class label map (:mod:`medlora.inference.composed`).

Several models form an ensemble: the mean of their probabilities. The preprocessing is the training
one (:func:`medlora.data.transforms.preprocessing`: RAS orientation, optional resampling, HU window),
never typed by the user. The network runs on the RAS (resampled) image with MONAI sliding windows
and Gaussian blending (:func:`medlora.evaluation.predict.predict_volume`, as validation); the
probabilities are brought back to the input's own voxel grid by inverting the transforms with MONAI
(their applied-operations record: an exact axis flip/permutation for the orientation, the forward
interpolation (bilinear) for resampling), then thresholded. So every output has the input's shape and
geometry (NIfTI class, qform/sform and their codes, affine: see :mod:`medlora.inference.io`), whatever
the input's orientation, obliquity or spacing. A case whose probabilities are not all finite fails
(one line) and writes nothing.

Outputs per case in ``OUT_DIR``: ``<case>.nii.gz`` (uint8 labels), optionally ``<case>_prob.nii.gz``
(float32) and ``<case>_overlay.png``; ``volumes.csv``/``volumes.json`` (hemorrhage volume per case,
updated after every case); ``provenance.json`` (:mod:`medlora.inference.provenance`: model files and
their SHA-256, preprocessing, threshold, version, command line, for every run that wrote into the
folder). Existing case outputs are never replaced without ``overwrite``: such a case is reported and
counted as failed. Every file is written to a temporary name and renamed. An output folder that this
run created stays only if some case was written.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adapters import read_adapter_file
from ..assembly import ModelSpec, build_model, load_adapter_onto
from ..data.nifti import write_nifti
from ..errors import MedloraError
from ..evaluation.predict import DEFAULT_SW_BATCH_SIZE, DEFAULT_SW_OVERLAP, DEFAULT_THRESHOLD
from ..fileio import read_torch_file
from ..models.weights import WeightsError
from ..runs import SUMMARY_FILE, RunFolder
from .io import (
    InputCase,
    find_inputs,
    read_case,
    read_volume_rows,
    voxel_volume_mm3,
    write_overlay,
    write_volume_tables,
)
from .provenance import ModelFile, ProvenanceLog

__all__ = [
    "CasePrediction",
    "InferenceError",
    "InferenceModels",
    "InferenceSummary",
    "Predictor",
    "Preprocessing",
    "case_outputs",
    "load_models",
    "resolve_device",
    "run_inference",
]


class InferenceError(MedloraError, ValueError):
    """A model, option or output folder that inference cannot use (one line naming it)."""


# ------------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class Preprocessing:
    """What inference repeats from training: HU window, resampling, sliding-window size, threshold."""

    hu_window: tuple[float, float]
    target_spacing: tuple[float, ...] | None
    roi_size: tuple[int, ...] | None
    threshold: float

    @classmethod
    def from_record(cls, record: Any, source: str, default_threshold: float = DEFAULT_THRESHOLD) -> Preprocessing:
        """From the ``{"hu_window", "target_spacing", "roi_size", "threshold"}`` record that training writes
        into checkpoints and adapter files."""
        if not isinstance(record, dict) or "hu_window" not in record:
            raise InferenceError(f"{source}: no preprocessing record (HU window, spacing, ROI): it was written by "
                                 "an older medlora; retrain or re-export it")
        try:
            window = tuple(float(v) for v in record["hu_window"])
            spacing = record.get("target_spacing")
            roi = record.get("roi_size")
            threshold = record.get("threshold")
            prep = cls(
                hu_window=window,  # type: ignore[arg-type]
                target_spacing=None if spacing is None else tuple(float(v) for v in spacing),
                roi_size=None if roi is None else tuple(int(v) for v in roi),
                threshold=default_threshold if threshold is None else float(threshold),
            )
        except (TypeError, ValueError) as exc:
            raise InferenceError(f"{source}: malformed preprocessing record {record!r} ({exc})") from None
        if len(prep.hu_window) != 2 or not prep.hu_window[0] < prep.hu_window[1]:
            raise InferenceError(f"{source}: HU window {list(prep.hu_window)} must be [low, high] with low < high")
        return prep


@dataclass(frozen=True)
class Architecture:
    """How to build the network (:func:`medlora.assembly.build_model`, as training built it): the backbone's
    registry name, its arguments and dimensionality, as training records them (checkpoint ``hyper_parameters``,
    adapter metadata, a run folder's ``study.json``)."""

    backbone: str
    backbone_args: dict[str, Any]
    spatial_dims: int

    @classmethod
    def from_record(cls, record: Any, source: str) -> Architecture:
        if not isinstance(record, dict) or not record.get("backbone"):
            raise InferenceError(f"{source}: no backbone recorded (backbone, backbone_args, spatial_dims)")
        # JSON round trip: tuples and lists, ints and floats compare equal across checkpoint and adapter
        args = json.loads(json.dumps(dict(record.get("backbone_args") or {})))
        return cls(str(record["backbone"]), args, int(record.get("spatial_dims", 3)))

    def build(self) -> nn.Module:
        return build_model(ModelSpec(self.backbone, dict(self.backbone_args), self.spatial_dims))


@dataclass
class InferenceModels:
    """The networks of one inference run (one, or an ensemble averaged on probabilities), evaluation mode."""

    models: list[nn.Module]
    members: list[str]
    architecture: Architecture
    preprocessing: Preprocessing
    files: list[ModelFile] = field(default_factory=list)  # what the models were loaded from (provenance)
    # --composition: the models are the composition's adapters, routed and fused per case (.composed)
    composition: Any = None

    @property
    def spatial_dims(self) -> int:
        return self.architecture.spatial_dims


def _pruned_record(path: Path) -> dict[str, Any] | None:
    """The model record in the header of a pruned base written by ``medlora prune``; None for other files."""
    from ..pruning.files import pruned_base_record

    return pruned_base_record(path)


def _read_lightning_checkpoint(path: Path) -> dict[str, Any] | None:
    """``hyper_parameters`` and ``medlora_preprocessing`` of a Lightning checkpoint; None for a plain state dict.

    Read with :func:`medlora.fileio.read_torch_file` (weights-only, memory-mapped): a checkpoint cannot run code.
    """
    if path.suffix == ".safetensors":
        return None
    try:
        obj = read_torch_file(path, error=WeightsError)
    except WeightsError as exc:
        if str(getattr(exc, "refused_global", "")).endswith("AdapterConfig"):
            # older SegmentationModules kept an AdapterConfig object in hyper_parameters: an adapter run
            raise InferenceError(f"{path}: checkpoint of an adapter run (it holds only the adapter); use "
                                 "--model <its base weights> --adapter <its adapter.safetensors>") from None
        raise
    if isinstance(obj, dict) and "state_dict" in obj and "hyper_parameters" in obj:
        return {"hyper_parameters": dict(obj["hyper_parameters"] or {}),
                "medlora_preprocessing": obj.get("medlora_preprocessing")}
    return None


def _load_base(path: Path, architecture: Architecture) -> nn.Module:
    return build_model(ModelSpec(architecture.backbone, dict(architecture.backbone_args), architecture.spatial_dims,
                                 pretrained=str(path)))


def _with_adapter(base: nn.Module, adapter: Path) -> nn.Module:
    """Base + adapter merged into plain layers (the base itself is left untouched)."""
    return load_adapter_onto(base, adapter, merge_weights=True)  # checks the base fingerprint


def _same_setting(values: list[tuple[str, Any]], what: str) -> Any:
    first_source, first = values[0]
    for source, value in values[1:]:
        if value != first:
            raise InferenceError(f"{source}: {what} {value} differs from {first} of {first_source}; an ensemble "
                                 "needs models trained alike")
    return first


def _load_run_dir(run_dir: Path, method: str | None) -> InferenceModels:
    """The k fold models of one job of a ``medlora crossval`` run folder (read with :class:`RunFolder`)."""
    run = RunFolder(run_dir)
    names = run.job_names
    if not method:
        raise InferenceError(f"{run_dir}: a crossval run folder needs --method JOB (one of: {', '.join(names)})")
    jobs = run.jobs_named(method)
    if not jobs:
        raise InferenceError(f"{run_dir}: no job {method!r} in this study (jobs: {', '.join(names)})")
    for job in jobs:
        if not run.job_done(job):
            raise InferenceError(f"{run.job_dir(job)}: fold {job.fold} of {method} is not finished (no "
                                 f"{SUMMARY_FILE}); finish it with medlora crossval --config <the study's config> "
                                 f"--out {run_dir} --only job={method}")
    arch = Architecture.from_record(run.architecture, str(run.record))
    base_path = run.base_path
    if not base_path.is_file():
        raise InferenceError(f"{base_path}: the study's base weights are missing")
    base = _load_base(base_path, arch)
    study_prep = Preprocessing.from_record({**run.preprocessing, "threshold": DEFAULT_THRESHOLD}, str(run.record))
    files = [ModelFile("base", base_path)]
    if jobs[0].family == "none":  # every fold evaluates the untouched base: one model
        return InferenceModels([base], [f"{base_path} ({method})"], arch, study_prep, files)
    models, members, preps = [], [], []
    for job in jobs:
        path = run.weights_path(job)
        assert path is not None
        if job.family == "adapter":
            meta, _ = read_adapter_file(path)
            preps.append((str(path), Preprocessing.from_record(meta.get("extra", {}).get("preprocessing"),
                                                               str(path))))
            models.append(_with_adapter(base, path))
            files.append(ModelFile("adapter", path))
        elif job.family == "loraprune":  # a pruned base (medlora prune): its own record gives its architecture
            from ..pruning.files import pruned_spec

            models.append(build_model(pruned_spec(path)))
            files.append(ModelFile("model", path))
        else:
            models.append(_load_base(path, arch))
            files.append(ModelFile("model", path))
        members.append(str(path))
    prep = _same_setting(preps, "preprocessing") if preps else study_prep
    return InferenceModels(models, members, arch, prep, files)


def load_models(
    model: str | os.PathLike[str], adapters: Sequence[str | os.PathLike[str]] = (), method: str | None = None,
    composition: str | os.PathLike[str] | None = None,
) -> InferenceModels:
    """Build and load every network of an inference run, merged and in evaluation mode.

    Everything that can be wrong with the model files (unreadable weights, an adapter for another base,
    missing metadata, an unfinished crossval job) raises here, before any case is touched. With ``composition``
    (a composition file, :mod:`medlora.inference.composed`) the ``adapters`` are that composition's, found beside
    it when none are given.
    """
    path = Path(model)
    adapter_paths = [Path(a) for a in adapters]
    if not path.exists():
        what = "crossval run folder" if method else "weights file"
        raise WeightsError(f"{path}: {what} not found (--model)")
    if composition is not None:
        if method:
            raise InferenceError(f"--method {method}: cannot be combined with --composition")
        from .composed import load_composed_models

        loaded = load_composed_models(path, Path(composition), adapter_paths)
    elif path.is_dir():
        if adapter_paths:
            raise InferenceError(f"{path}: --adapter cannot be combined with a crossval run folder; use --method")
        loaded = _load_run_dir(path, method)
    else:
        if method:
            raise InferenceError(f"--method {method}: needs a crossval run folder as --model, got {path}")
        if not path.is_file():
            raise WeightsError(f"{path}: not a weights file (--model)")
        ckpt = _read_lightning_checkpoint(path)
        hp = ckpt["hyper_parameters"] if ckpt else None
        if hp is not None and hp.get("adapter") is not None:
            base = hp.get("pretrained") or "BASE"
            raise InferenceError(f"{path}: checkpoint of an adapter run (it holds only the adapter); use "
                                 f"--model {base} --adapter <its adapter.safetensors>")
        pruned = _pruned_record(path) if ckpt is None else None
        if not adapter_paths and pruned is not None:  # a base written by medlora prune records both
            arch = Architecture.from_record(pruned, str(path))
            prep = Preprocessing.from_record(pruned.get("preprocessing"), str(path))
            loaded = InferenceModels([_load_base(path, arch)], [str(path)], arch, prep, [ModelFile("model", path)])
        elif not adapter_paths:
            if ckpt is None:
                raise InferenceError(f"{path}: a plain state dict has no backbone or preprocessing record; give a "
                                     "Lightning checkpoint, this base with --adapter files, or a crossval run folder")
            arch = Architecture.from_record(hp, str(path))
            prep = Preprocessing.from_record(ckpt["medlora_preprocessing"], str(path),
                                             default_threshold=float(hp.get("threshold", DEFAULT_THRESHOLD)))
            loaded = InferenceModels([_load_base(path, arch)], [str(path)], arch, prep, [ModelFile("checkpoint", path)])
        else:
            metas = [(str(a), read_adapter_file(a)[0].get("extra") or {}) for a in adapter_paths]
            archs = [(s, Architecture.from_record(m, s)) for s, m in metas]
            if hp is not None:
                archs.insert(0, (str(path), Architecture.from_record(hp, str(path))))
            arch = _same_setting(archs, "backbone")
            prep = _same_setting([(s, Preprocessing.from_record(m.get("preprocessing"), s)) for s, m in metas],
                                 "preprocessing")
            base = _load_base(path, arch)
            models = [_with_adapter(base, a) for a in adapter_paths]
            files = [ModelFile("base", path), *(ModelFile("adapter", a) for a in adapter_paths)]
            loaded = InferenceModels(models, [f"{path} + {a}" for a in adapter_paths], arch, prep, files)
    for m in loaded.models:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    for f in loaded.files:
        f.fingerprint()  # now: the bytes that were loaded, not what the path holds when a case is done
    return loaded


# --------------------------------------------------------------------------------------- prediction


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InferenceError(f"--device {name}: not a device (cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"--device {name}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise InferenceError(f"--device {name}: only cpu and cuda are supported")
    return dev


@dataclass
class CasePrediction:
    """One case: probabilities and labels on the input's grid."""

    probability: np.ndarray   # float32, the input's shape
    label: np.ndarray         # uint8, the input's shape
    chosen: list[str] | None = None  # a composition: the adapters that ran on this case
    class_voxels: dict[str, int] | None = None  # a composition: labelled voxels per class


class _Float32Output(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).float()


class Predictor:
    """Preprocess like training, run the (ensemble of) network(s), invert back to the input grid.

    Args:
        models: from :func:`load_models`.
        device: ``cpu`` (default), ``cuda``, ``cuda:N`` or ``auto``; on CUDA the network runs under bf16
            autocast (probabilities are float32).
        sw_batch_size, overlap: MONAI sliding-window settings (defaults: training's validation ones).
        threshold: overrides the recorded probability threshold.
        roi_size: overrides the recorded sliding-window size (the training patch size).
    """

    def __init__(
        self,
        models: InferenceModels,
        device: str | torch.device = "cpu",
        sw_batch_size: int = DEFAULT_SW_BATCH_SIZE,
        overlap: float = DEFAULT_SW_OVERLAP,
        threshold: float | None = None,
        roi_size: Sequence[int] | None = None,
    ) -> None:
        from monai.transforms import Compose, LoadImaged

        from ..data.transforms import preprocessing

        prep = models.preprocessing
        self.models = models
        self.device = resolve_device(device)
        if sw_batch_size < 1:
            raise InferenceError(f"--sw-batch-size must be at least 1, got {sw_batch_size}")
        if not 0.0 <= overlap < 1.0:
            raise InferenceError(f"--overlap must be in [0, 1), got {overlap}")
        self.sw_batch_size, self.overlap = int(sw_batch_size), float(overlap)
        self.threshold = prep.threshold if threshold is None else float(threshold)
        if not 0.0 < self.threshold < 1.0:
            raise InferenceError(f"--threshold must be in (0, 1), got {self.threshold}")
        roi = tuple(roi_size) if roi_size is not None else prep.roi_size
        if roi is None:
            raise InferenceError("the model records no sliding-window size (training patch size); pass --roi-size")
        if len(roi) != models.spatial_dims:
            raise InferenceError(f"--roi-size {list(roi)} needs {models.spatial_dims} values for a "
                                 f"{models.spatial_dims}D network")
        self.roi_size = tuple(int(v) for v in roi)
        steps = preprocessing(keys=("image",), hu_window=prep.hu_window, target_spacing=prep.target_spacing)
        if not isinstance(steps[0], LoadImaged):
            raise RuntimeError("medlora.data.transforms.preprocessing no longer starts with LoadImaged")
        # Volumes are read (and checked) before the transforms: the rest of the chain is training's own.
        self.transform = Compose(steps[1:])
        for m in models.models:
            m.to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def preprocess(self, data: np.ndarray, affine: np.ndarray) -> torch.Tensor:
        """The training preprocessing of a volume read as LoadImaged would: a (1, X, Y, Z) MetaTensor."""
        from monai.data import MetaTensor

        meta = {"original_channel_dim": "no_channel", "space": "RAS", "spatial_shape": np.asarray(data.shape),
                "original_affine": np.asarray(affine, dtype=np.float64)}
        image = MetaTensor(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)),
                           affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)
        return self.transform({"image": image})["image"]

    def probabilities(self, image: torch.Tensor, networks: Sequence[nn.Module] | None = None,
                      channel: int = 0) -> torch.Tensor:
        """Mean probability of the ensemble on the preprocessed grid: (X', Y', Z') float32 on the CPU.

        ``networks`` replaces the loaded models (``medlora serve`` passes a callable that batches the windows of
        concurrent requests together, :mod:`medlora.serving`)."""
        from ..evaluation.predict import predict_volume

        networks = list(self.models.models if networks is None else networks)

        # A plain tensor: MetaTensor bookkeeping on every window would cost time and carry nothing needed.
        x = torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor") else image)[None].to(self.device)
        total: torch.Tensor | None = None
        autocast = self._autocast()
        with torch.inference_mode(), autocast:
            for model in networks:
                # Under bf16 autocast the windows are blended in float32: bf16 sums would lose the Gaussian weights.
                net = model if isinstance(autocast, contextlib.nullcontext) else _Float32Output(model)
                p = predict_volume(net, x, self.models.spatial_dims, self.roi_size, self.sw_batch_size,
                                   self.overlap).float()
                total = p if total is None else total + p
        assert total is not None
        mean = total / len(networks) if len(networks) > 1 else total
        return mean[0, channel].cpu().clone()  # clone: a normal tensor again, usable outside inference mode

    def to_input_grid(self, values: torch.Tensor, image: torch.Tensor) -> np.ndarray:
        """Invert the preprocessing's spatial transforms (orientation, resampling) for ``values``."""
        from monai.data import MetaTensor

        meta = copy.deepcopy(dict(image.meta))
        meta["affine"] = image.affine.clone()
        pred = MetaTensor(values[None], meta=meta)
        pred.applied_operations = copy.deepcopy(image.applied_operations)
        inverted = self.transform.inverse({"image": pred})["image"]
        return np.asarray(torch.as_tensor(inverted)[0].numpy(), dtype=np.float32)

    def predict(self, data: np.ndarray, affine: np.ndarray,
                networks: Sequence[nn.Module] | None = None) -> CasePrediction:
        if self.models.composition is not None:
            from .composed import predict_composed

            return predict_composed(self, data, affine)
        image = self.preprocess(data, affine)
        prob_ras = self.probabilities(image, networks)
        prob = self.to_input_grid(prob_ras, image)
        if prob.shape != data.shape:
            raise RuntimeError(f"inverted prediction has shape {prob.shape}, the input {data.shape}")
        return CasePrediction(probability=prob, label=(prob >= self.threshold).astype(np.uint8))


# ------------------------------------------------------------------------------------------ the run


def case_outputs(out_dir: Path, case_id: str, save_probabilities: bool, overlay: bool) -> dict[str, Path]:
    """The files one case writes (the label map last, so that it marks a finished case)."""
    outputs = {}
    if save_probabilities:
        outputs["probability"] = out_dir / f"{case_id}_prob.nii.gz"
    if overlay:
        outputs["overlay"] = out_dir / f"{case_id}_overlay.png"
    outputs["label"] = out_dir / f"{case_id}.nii.gz"
    return outputs


@dataclass
class InferenceSummary:
    done: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case id, message)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 2 if self.failed else 0

    def line(self) -> str:
        return (f"{len(self.done)} case(s) done, {len(self.failed)} failed, "
                f"{len(self.done) + len(self.failed)} in total, {self.seconds:.1f} s")


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Any]:
    """A rich progress bar across cases on stderr (only on a terminal: logs get one line per case)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal, transient=True) as bar:
        task = bar.add_task("segmenting", total=total)
        yield lambda: bar.advance(task)


def _run_case(
    case: InputCase, predictor: Predictor, out_dir: Path, save_probabilities: bool, overlay: bool, overwrite: bool,
) -> dict[str, Any]:
    outputs = case_outputs(out_dir, case.case_id, save_probabilities, overlay)
    if case.problem is None:
        source = os.path.realpath(case.path)
        for path in outputs.values():
            if os.path.realpath(path) == source:
                raise InferenceError(f"{case.label}: the output {path} would replace the input; choose another --out")
        if not overwrite:
            for path in outputs.values():
                if path.exists():
                    raise InferenceError(f"{case.label}: {path} exists; not overwritten (use --overwrite)")
    volume = read_case(case)
    result = predictor.predict(volume.data, volume.affine)
    finite = np.isfinite(result.probability)
    if not finite.all():
        # a NaN compares False with the threshold: the label map would look like "nothing found"
        raise InferenceError(f"{case.label}: {int(finite.size - finite.sum())} of {finite.size} probabilities are "
                             "not finite (NaN or Inf): broken model weights or an overflow; no output written")
    if "probability" in outputs:
        write_nifti(outputs["probability"], result.probability, volume.geometry, np.float32)
    if "overlay" in outputs:
        write_overlay(outputs["overlay"], volume, result.label, predictor.models.preprocessing.hu_window,
                      title=f"{case.case_id} (threshold {predictor.threshold:g})")
    write_nifti(outputs["label"], result.label, volume.geometry, np.uint8)
    voxels = int(np.count_nonzero(result.label))  # a composition's labels are class values, not 0/1
    vox_mm3 = voxel_volume_mm3(volume.affine)
    row = {"case_id": case.case_id, "input": case.label, "output": outputs["label"].name, "voxels": voxels,
           "voxel_volume_mm3": round(vox_mm3, 6), "volume_ml": voxels * vox_mm3 / 1000.0}
    if result.chosen is not None:  # volumes.json only: volumes.csv keeps its columns
        row["adapters"] = result.chosen
        row["class_volume_ml"] = {k: v * vox_mm3 / 1000.0 for k, v in (result.class_voxels or {}).items()}
    return row


def run_inference(
    model: str | os.PathLike[str] | InferenceModels,
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str]] = (),
    method: str | None = None,
    *,
    composition: str | os.PathLike[str] | None = None,
    sw_batch_size: int = DEFAULT_SW_BATCH_SIZE,
    overlap: float = DEFAULT_SW_OVERLAP,
    device: str = "cpu",
    threshold: float | None = None,
    roi_size: Sequence[int] | None = None,
    save_probabilities: bool = False,
    overlay: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> InferenceSummary:
    """Segment every input case into ``out_dir``; see the module docstring.

    Model problems raise (before any output exists); a problem with one case is reported in one line on
    stderr (with ``progress``) and recorded in the summary, and the other cases still run.
    """
    start = time.perf_counter()
    if not inputs:
        raise InferenceError("no input given (NIfTI files, folders of them, or DICOM series folders)")
    loaded = model if isinstance(model, InferenceModels) else load_models(model, adapters, method, composition)
    predictor = Predictor(loaded, device=device, sw_batch_size=sw_batch_size, overlap=overlap, threshold=threshold,
                          roi_size=roi_size)
    cases = find_inputs(inputs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InferenceError(f"{out}: --out exists and is not a folder")
    try:
        rows = read_volume_rows(out)
    except MedloraError:
        if not overwrite:
            raise
        rows = {}  # --overwrite: an unreadable table is replaced
    arguments = {"model": str(model) if not isinstance(model, InferenceModels) else None,
                 "adapters": [str(a) for a in adapters], "method": method,
                 "composition": None if composition is None else str(composition), "inputs": [str(i) for i in inputs],
                 "out": str(out), "sw_batch_size": sw_batch_size, "overlap": overlap, "device": device,
                 "threshold": threshold, "roi_size": None if roi_size is None else list(roi_size),
                 "save_probabilities": save_probabilities, "overlay": overlay, "overwrite": overwrite}
    log = ProvenanceLog(out, _run_record(loaded, predictor, arguments), replace_unreadable=overwrite)
    created = _missing_folders(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        summary = _run_cases(cases, predictor, out, rows, log, progress, save_probabilities, overlay, overwrite)
    finally:
        if not log.run["cases"]:
            _remove_empty(created)  # nothing written: leave no empty folder behind (never a pre-existing one)
    summary.seconds = time.perf_counter() - start
    if progress:
        print(summary.line(), flush=True)
    return summary


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()  # only succeeds on an empty folder
        except OSError:
            return


def _run_record(loaded: InferenceModels, predictor: Predictor, arguments: dict[str, Any]) -> dict[str, Any]:
    """The provenance of this run (see :mod:`medlora.inference.provenance`)."""
    arch, prep = loaded.architecture, loaded.preprocessing
    return {
        "command_line": list(sys.argv), "arguments": arguments,
        "models": [f.fingerprint() for f in loaded.files], "members": list(loaded.members),
        "architecture": {"backbone": arch.backbone, "backbone_args": arch.backbone_args,
                         "spatial_dims": arch.spatial_dims},
        "preprocessing": {"hu_window": list(prep.hu_window),
                          "target_spacing": None if prep.target_spacing is None else list(prep.target_spacing),
                          "roi_size": None if prep.roi_size is None else list(prep.roi_size),
                          "threshold": prep.threshold},
        "threshold": predictor.threshold,
        "sliding_window": {"roi_size": list(predictor.roi_size), "overlap": predictor.overlap,
                           "sw_batch_size": predictor.sw_batch_size, "mode": "gaussian"},
        "device": str(predictor.device),
        **({"composition": loaded.composition.record()} if loaded.composition is not None else {}),
    }


def _run_cases(
    cases: list[InputCase], predictor: Predictor, out: Path, rows: dict[str, dict[str, Any]], log: ProvenanceLog,
    progress: bool, save_probabilities: bool, overlay: bool, overwrite: bool,
) -> InferenceSummary:
    summary = InferenceSummary()
    say = (lambda text, err=False: print(text, file=sys.stderr if err else sys.stdout, flush=True)) if progress \
        else (lambda text, err=False: None)
    loaded = predictor.models
    if progress:
        say(f"medlora infer: {len(cases)} case(s), {len(loaded.models)} model(s) "
            f"({loaded.architecture.backbone}, {loaded.spatial_dims}D), device {predictor.device} -> {out}")
    with _progress(progress, len(cases)) as advance:
        for case in cases:
            t0 = time.perf_counter()
            try:
                row = _run_case(case, predictor, out, save_probabilities, overlay, overwrite)
            except MedloraError as exc:
                summary.failed.append((case.case_id, str(exc)))
                say(f"medlora: error: {exc}", err=True)
            except Exception as exc:  # one broken case must not stop the others (e.g. a volume too big)
                message = f"{case.label}: {type(exc).__name__}: {' '.join(str(exc).split())}"
                summary.failed.append((case.case_id, message))
                say(f"medlora: error: {message}", err=True)
            else:
                summary.done.append(row)
                rows[case.case_id] = row
                write_volume_tables(out, rows)  # after every case: an interrupted run keeps its table
                log.add_case(case.case_id)
                say(f"{case.case_id}: {row['volume_ml']:.2f} mL ({row['voxels']} voxels) -> "
                    f"{out / row['output']} ({time.perf_counter() - t0:.1f} s)")
            if advance is not None:
                advance()
    return summary
