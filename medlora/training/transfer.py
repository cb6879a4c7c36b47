"""Moving an adapter to a new base without the patient data: Trans-LoRA for segmentation (``medlora transfer``).

Trans-LoRA (Wang, Ghosh, Cox, Antognini, Oliva, Feris, Karlinsky; NeurIPS 2024; arXiv 2405.17258) trains the
adapter of a *target* model by knowledge distillation from the *source* model with its adapter (the teacher), on
synthetic task inputs, optionally filtered by a discriminator trained on a handful of real seed examples to tell
them from synthetic ones. The paper works on LLMs, which synthesise their own inputs; here:

* **Inputs** come from the phantom generator (:mod:`medlora.data.phantoms`): head-CT volumes of both domains
  (TBI and SAH) with nuisance drawn wider than any real scanner (:class:`SyntheticSpec`: HU calibration offset,
  head size, noise), so no patient scan is needed. 2D networks get every axial slice, 3D networks random patches
  of the teacher's sliding-window size; the HU window is the teacher's recorded one.
* **Teacher**: the old base with its adapter merged (the adapter file's base fingerprint is checked), evaluation
  mode. **Student**: the new base (any width or backbone: only outputs are matched) with a fresh adapter of any
  method of the core, also run in evaluation mode, so its BatchNorm statistics stay those of the new base (our
  choice: re-estimating them on synthetic inputs would fit them to the generator, not to patients). It keeps the
  teacher's layer selection (and, for the same method, its options: SAMed's q/v blocks, SALT's ``svd_rank``) and
  trains the teacher's recorded ``finetune`` group beside it (SAMed's mask decoder); its output classes, spatial
  size and, for SAM, ``input_window`` must be the teacher's, which is checked before any phantom is drawn.
* **Loss** (:func:`distillation_loss`), per voxel, on the Bernoulli distribution ``σ(z/T)`` of a single-logit
  head (the class distribution of a softmax head):
  ``L = T² · Σ_v w_v KL(softmax(z_T/T) ‖ softmax(z_S/T)) / Σ_v w_v + β · (D(σ(z_S), y_T) − D(σ(z_T), y_T))``
  with temperature ``T = 2`` (Hinton, Vinyals, Dean 2015, arXiv 1503.02531: the ``T²`` keeps the gradient scale
  independent of ``T``), ``y_T`` the teacher's hard labels at the model's probability threshold, ``w_v = 5`` on
  voxels the teacher labels as lesion and 1 elsewhere (lesions are about 1% of a head CT), ``D`` the batch soft
  Dice loss (smoothing 1e-5) and ``β = 1``. Deviations from the paper, which distils next-token distributions with
  plain KL: the Dice term, the lesion weights and the tempered binary KL are ours (the issue's and the
  literature note's segmentation mapping). The teacher's own Dice loss is subtracted (a constant, so gradients
  are unchanged), so the loss is exactly 0 when the student computes the teacher's logits (and below 0 when the
  student's probabilities fit the teacher's labels better than the teacher's own: a sharper student).
* **Batches** hold one half of samples in which the teacher sees a lesion and one half without (where both
  exist), as the seed authors' slice sampler (``PosNegSliceBatchSampler``).
* **Discriminator filter** (:func:`discriminator_filter`): with seed cases (0 to about 5 real volumes), a
  class-balanced L2-regularised logistic regression on pooled features of the frozen old base (the spatial mean
  of every convolution's and linear layer's output, standardised) is trained real-vs-synthetic, and the
  synthetic samples with ``p(real) >= 0.5`` are kept (at least 10% of the pool: the most real-like ones if fewer
  pass). The paper trains a LoRA discriminator on the LLM itself; a linear probe on frozen features is the
  cheaper alternative the literature note names, and the only one that 5 volumes can fit. Without seed cases
  there is no filter.

The data-free premise holds only as far as the generator resembles the target population: on the embedded
phantoms the "real" cases come from the same generator family, so the numbers in ``docs/transfer.md`` are an
optimistic toy, not evidence for real scans.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdapterConfig, AdapterFileError, load_adapter, read_adapter_file, save_adapter
from ..assembly import ModelSpec, ModelSpecError, build_model, load_adapter_onto
from ..errors import MedloraError
from .checks import input_window_problem

__all__ = [
    "DEFAULT_DICE_WEIGHT",
    "DEFAULT_LESION_WEIGHT",
    "DEFAULT_TEMPERATURE",
    "SyntheticSpec",
    "TransferError",
    "discriminator_filter",
    "distill",
    "distillation_loss",
    "pooled_features",
    "run_transfer",
    "synthetic_samples",
    "volume_samples",
]

DEFAULT_TEMPERATURE = 2.0
DEFAULT_LESION_WEIGHT = 5.0
DEFAULT_DICE_WEIGHT = 1.0
_DICE_SMOOTH = 1e-5
MIN_KEEP_FRACTION = 0.1


class TransferError(MedloraError, ValueError):
    """A transfer that cannot run as asked; one line naming the file or the option."""


# ------------------------------------------------------------------------------------------ the loss


def _soft_dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Batch soft Dice loss over the foreground classes (dim 1), averaged over classes."""
    dims = [0, *range(2, prob.ndim)]
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    return (1.0 - (2.0 * inter + _DICE_SMOOTH) / (denom + _DICE_SMOOTH)).mean()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    lesion_weight: float = DEFAULT_LESION_WEIGHT,
    dice_weight: float = DEFAULT_DICE_WEIGHT,
    threshold: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The voxel-wise distillation loss of the module docstring and its parts ``{"kl", "dice"}``.

    ``*_logits``: ``(N, C, *spatial)``, ``C = 1`` (sigmoid) or the classes of a softmax head. The teacher's hard
    labels are ``σ(z) >= threshold`` (``C = 1``) or the argmax.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    teacher_logits = teacher_logits.detach()
    t = float(temperature)
    if teacher_logits.shape[1] == 1:
        # KL(Bernoulli(p_T) ‖ Bernoulli(p_S)) = BCE(z_S/T; p_T) − BCE(z_T/T; p_T); in this form the gradient
        # σ(z_S/T) − p_T is exactly 0 when the student computes the teacher's logits (the softmax form leaves
        # rounding residues that Adam would blow up to full steps)
        p_t = torch.sigmoid(teacher_logits / t)
        kl = (F.binary_cross_entropy_with_logits(student_logits / t, p_t, reduction="none")
              - F.binary_cross_entropy_with_logits(teacher_logits / t, p_t, reduction="none"))[:, 0]
    else:
        log_s = F.log_softmax(student_logits / t, dim=1)
        log_t = F.log_softmax(teacher_logits / t, dim=1)
        kl = (log_t.exp() * (log_t - log_s)).sum(1)  # per voxel
    if teacher_logits.shape[1] == 1:
        fg = (torch.sigmoid(teacher_logits) >= threshold).to(student_logits.dtype)  # (N, 1, ...)
        prob_s, prob_t = torch.sigmoid(student_logits), torch.sigmoid(teacher_logits)
    else:
        hard = teacher_logits.argmax(1)
        fg = F.one_hot(hard, teacher_logits.shape[1]).movedim(-1, 1)[:, 1:].to(student_logits.dtype)
        prob_s, prob_t = student_logits.softmax(1)[:, 1:], teacher_logits.softmax(1)[:, 1:]
    weight = 1.0 + (float(lesion_weight) - 1.0) * fg.amax(1)
    kl_term = t * t * (weight * kl).sum() / weight.sum()
    dice_term = _soft_dice_loss(prob_s, fg) - _soft_dice_loss(prob_t, fg)
    loss = kl_term + float(dice_weight) * dice_term
    return loss, {"kl": float(kl_term.detach()), "dice": float(dice_term.detach())}


# ------------------------------------------------------------------------------------------ samples


@dataclass
class SyntheticSpec:
    """The data-free input distribution: phantom volumes with nuisance drawn per volume.

    ``domains`` are drawn uniformly, the HU calibration offset uniformly in ``±hu_offset``, the head scale
    uniformly in ``head_scale``; the grid is ``shape`` at ``spacing`` (default: the seed cases' grid, else the
    generator's 96 x 96 x 32 at 2 x 2 x 5 mm). Volume ``i`` depends only on ``(seed, i)``.
    """

    volumes: int = 24
    seed: int = 1000
    domains: tuple[str, ...] = ("sah", "tbi")
    hu_offset: float = 60.0
    head_scale: tuple[float, float] = (0.85, 1.1)
    shape: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None


def _window(hu: torch.Tensor, hu_window: Sequence[float]) -> torch.Tensor:
    """HU to [0, 1], as :func:`medlora.data.transforms.preprocessing` (``ScaleIntensityRanged``, clipped)."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    return ((hu - lo) / (hi - lo)).clamp(0.0, 1.0)


def _fit(x: torch.Tensor, size: Sequence[int], starts: Sequence[int] | None = None) -> torch.Tensor:
    """``x`` (..., *spatial) zero-padded up to and cropped to ``size`` (centred unless ``starts`` are given)."""
    spatial = x.shape[-len(size):]
    pad: list[int] = []
    for s, want in zip(reversed(spatial), reversed(list(size)), strict=True):
        extra = max(int(want) - int(s), 0)
        pad += [extra // 2, extra - extra // 2]
    if any(pad):
        x = F.pad(x, pad)
    index = [slice(None)] * (x.ndim - len(size))
    for axis, want in enumerate(size):
        have = x.shape[x.ndim - len(size) + axis]
        start = (have - int(want)) // 2 if starts is None else min(int(starts[axis]), have - int(want))
        index.append(slice(start, start + int(want)))
    return x[tuple(index)]


def volume_samples(volume: torch.Tensor, spatial_dims: int, roi_size: Sequence[int], *, patches: int = 4,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Training samples ``(n, 1, *roi)`` of one windowed volume ``(X, Y, Z)``: every axial slice (last axis) for a
    2D network, ``patches`` random crops for a 3D one (volumes smaller than the window are zero-padded)."""
    if spatial_dims == 2:
        slices = volume.permute(2, 0, 1).unsqueeze(1)  # (Z, 1, X, Y)
        return _fit(slices, roi_size)
    padded = _fit(volume, [max(s, r) for s, r in zip(volume.shape, roi_size, strict=True)])
    out = []
    for _ in range(patches):
        starts = [int(torch.randint(0, s - r + 1, (1,), generator=generator)) for s, r in
                  zip(padded.shape, roi_size, strict=True)]
        out.append(_fit(padded, roi_size, starts))
    return torch.stack(out).unsqueeze(1)


def synthetic_samples(spec: SyntheticSpec, spatial_dims: int, roi_size: Sequence[int], hu_window: Sequence[float],
                      *, patches: int = 4, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Samples of ``spec.volumes`` phantom volumes (:func:`volume_samples`), in one tensor (the last pool is kept
    in memory: several transfers in one process reuse it)."""
    from ..data.phantoms import DEFAULT_SHAPE, DEFAULT_SPACING, generate_case

    key = repr((asdict(spec), spatial_dims, list(roi_size), list(hu_window), patches))
    if key in _LAST_POOL:
        return _LAST_POOL[key]
    shape = spec.shape or DEFAULT_SHAPE
    spacing = spec.spacing or DEFAULT_SPACING
    out = []
    generator = torch.Generator().manual_seed(spec.seed)
    for i in range(spec.volumes):
        rng = np.random.default_rng([spec.seed, i])
        domain = spec.domains[int(rng.integers(len(spec.domains)))]
        offset = float(rng.uniform(-spec.hu_offset, spec.hu_offset)) if spec.hu_offset else 0.0
        scale = float(rng.uniform(*spec.head_scale))
        image, _, _, _ = generate_case(domain, spec.seed, i, shape, spacing, hu_offset=round(offset),
                                       head_scale=scale)
        out.append(volume_samples(_window(torch.from_numpy(image), hu_window), spatial_dims, roi_size,
                                  patches=patches, generator=generator))
        if progress is not None:
            progress(i + 1, spec.volumes)
    _LAST_POOL.clear()
    _LAST_POOL[key] = torch.cat(out)
    return _LAST_POOL[key]


_LAST_POOL: dict[str, torch.Tensor] = {}


def _seed_files(folder: Path) -> list[Path]:
    images = folder / "imagesTr" if (folder / "imagesTr").is_dir() else folder
    files = sorted(p for p in images.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz"))
                   and not p.name.startswith("."))
    if not files:
        raise TransferError(f"{folder}: --seed-cases: no NIfTI files (.nii, .nii.gz) here or in its imagesTr")
    return files


def seed_volumes(folder: str | Path, hu_window: Sequence[float],
                 target_spacing: Sequence[float] | None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The real seed cases of ``folder`` (an nnU-Net dataset or a folder of NIfTI files), preprocessed as training
    does (RAS, the recorded spacing, the HU window), and their grid ``{"shape", "spacing"}``."""
    from ..data.transforms import compose, preprocessing

    folder = Path(folder)
    if not folder.is_dir():
        raise TransferError(f"{folder}: --seed-cases: not a folder")
    pipeline = compose(preprocessing(keys=("image",), hu_window=hu_window, target_spacing=target_spacing))
    volumes, grid = [], {}
    for path in _seed_files(folder):
        try:
            image = pipeline({"image": str(path)})["image"]
        except Exception as exc:  # MONAI wraps reader errors in RuntimeError; any of them is this file's problem
            raise TransferError(f"{path}: cannot read this seed case ({' '.join(str(exc).split())[:200]})") from None
        if image.ndim != 4 or image.shape[0] != 1:
            raise TransferError(f"{path}: expected one 3D CT volume, got shape {tuple(image.shape)}")
        volumes.append(image.as_tensor()[0].float())
        if not grid:
            spacing = [float(v) for v in torch.linalg.norm(torch.as_tensor(image.affine)[:3, :3].double(), dim=0)]
            grid = {"shape": [int(s) for s in image.shape[1:]], "spacing": spacing}
    return volumes, grid


# ------------------------------------------------------------------------------------------ the filter


def _pool(output: Any, module: nn.Module) -> torch.Tensor | None:
    if not isinstance(output, torch.Tensor) or output.ndim < 2:
        return None
    if isinstance(module, nn.Linear):  # (N, ..., C): channels last
        return output.reshape(output.shape[0], -1, output.shape[-1]).mean(1)
    return output.reshape(output.shape[0], output.shape[1], -1).mean(2)  # (N, C, *spatial)


@torch.no_grad()
def pooled_features(network: nn.Module, samples: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """``(n, F)``: the spatial mean of every convolution's and linear layer's output, concatenated in forward
    order, for each sample (the network in evaluation mode; its mode is restored)."""
    layers = [m for m in network.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, _, out: captured.append(_pool(out, mod))) for m in layers]
    was_training = network.training
    network.eval()
    rows = []
    try:
        for start in range(0, len(samples), batch_size):
            captured.clear()
            network(samples[start:start + batch_size])
            rows.append(torch.cat([c.float() for c in captured if c is not None], dim=1))
    finally:
        for h in hooks:
            h.remove()
        network.train(was_training)
    return torch.cat(rows)


def discriminator_filter(
    network: nn.Module, real: torch.Tensor, synthetic: torch.Tensor, *, threshold: float = 0.5,
    l2: float = 1.0, steps: int = 200, min_keep: float = MIN_KEEP_FRACTION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which synthetic samples look real: ``(keep mask, p_real)`` over ``synthetic``.

    A logistic regression on :func:`pooled_features` of the frozen ``network`` (standardised over both sets),
    class-balanced (each set weighs one half), with an L2 penalty ``l2`` on the weights, fitted by full-batch
    L-BFGS (deterministic). A synthetic sample is kept when ``p_real >= threshold``; when fewer than ``min_keep``
    of the pool pass, the ``min_keep`` most real-like are kept instead.
    """
    if len(real) == 0 or len(synthetic) == 0:
        raise ValueError("the discriminator needs real and synthetic samples")
    features = pooled_features(network, torch.cat((real, synthetic))).double()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    y = torch.cat((torch.ones(len(real)), torch.zeros(len(synthetic)))).double()
    sample_weight = torch.cat((torch.full((len(real),), 0.5 / len(real)),
                               torch.full((len(synthetic),), 0.5 / len(synthetic)))).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = (sample_weight * F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")).sum()
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        p_real = torch.sigmoid(x[len(real):] @ w + b).float()
    keep = p_real >= threshold
    least = max(1, math.ceil(min_keep * len(synthetic)))
    if int(keep.sum()) < least:
        keep = torch.zeros_like(keep)
        keep[p_real.argsort(descending=True)[:least]] = True
    return keep, p_real


# ------------------------------------------------------------------------------------------ distillation


@torch.no_grad()
def _logits(network: nn.Module, samples: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([network(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)])


def distill(
    teacher: nn.Module, student: nn.Module, samples: torch.Tensor, *, steps: int = 200, batch_size: int = 8,
    lr: float = 5e-3, temperature: float = DEFAULT_TEMPERATURE, lesion_weight: float = DEFAULT_LESION_WEIGHT,
    dice_weight: float = DEFAULT_DICE_WEIGHT, threshold: float = 0.5, seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train the trainable parameters of ``student`` (Adam, ``lr``) to reproduce ``teacher`` on ``samples``.

    Both networks run in evaluation mode (normalisation statistics fixed); the teacher's logits are computed
    once. Returns ``{"first_loss", "last_loss", "losses"}`` (the loss of every step, before its update).
    """
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has nothing to train (no parameter requires grad)")
    teacher.eval()
    student.eval()
    target = _logits(teacher, samples, batch_size)
    positive_at = (torch.sigmoid(target) >= threshold) if target.shape[1] == 1 else (target.argmax(1, True) > 0)
    positive = positive_at.flatten(1).any(1)
    pos, neg = positive.nonzero().flatten(), (~positive).nonzero().flatten()
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        if len(pos) and len(neg):
            half = batch_size // 2
            idx = torch.cat((pos[torch.randint(len(pos), (half,), generator=generator)],
                             neg[torch.randint(len(neg), (batch_size - half,), generator=generator)]))
        else:
            idx = torch.randint(len(samples), (batch_size,), generator=generator)
        loss, _ = distillation_loss(student(samples[idx]), target[idx], temperature=temperature,
                                    lesion_weight=lesion_weight, dice_weight=dice_weight, threshold=threshold)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    if losses and not all(math.isfinite(v) for v in losses):
        raise TransferError("the distillation diverged (non-finite loss); lower --lr")
    return {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "losses": losses}


# ------------------------------------------------------------------------------------------ the command


def _architecture(meta: dict[str, Any], path: Path) -> tuple[str, dict[str, Any], int]:
    extra = meta.get("extra") or {}
    if not extra.get("backbone"):
        raise TransferError(f"{path}: the adapter file records no backbone (backbone, backbone_args, spatial_dims); "
                            "it was not written by medlora fit/crossval")
    return str(extra["backbone"]), dict(extra.get("backbone_args") or {}), int(extra.get("spatial_dims", 3))


def _new_adapter_config(meta: dict[str, Any], method: str, rank: int, alpha: float | None) -> AdapterConfig:
    """The new adapter's config: ``method``/``rank``/``alpha`` on the teacher adapter's layer selection, with the
    teacher's ``options``/``options_pattern`` when the method is the teacher's (SALT's ``svd_rank`` per layer type,
    SAMed's LoRA on the q and v blocks of a fused qkv); another method's options would not apply."""
    selection = meta["configs"][0]
    same = selection.get("method") == method
    try:
        return AdapterConfig(method, rank=rank, alpha=alpha, targets=selection.get("targets"),
                             target_types=selection.get("target_types"), exclude=selection.get("exclude"),
                             options=dict(selection.get("options") or {}) if same else {},
                             options_pattern=dict(selection.get("options_pattern") or {}) if same else {})
    except ValueError as exc:
        raise TransferError(f"--method {method}: {exc}") from None


@torch.no_grad()
def _check_outputs(teacher: nn.Module, student: nn.Module, roi: Sequence[int], teacher_adapter: Path,
                   model: Path) -> None:
    """Refuse, before any phantom is drawn, a student whose output differs from the teacher's on one blank sample
    of the teacher's window: only outputs are matched, so their classes (and spatial size) must agree."""
    probe = torch.zeros(1, 1, *[int(r) for r in roi])
    was = teacher.training, student.training
    teacher.eval()
    student.eval()
    try:
        shape_t, shape_s = tuple(teacher(probe).shape), tuple(student(probe).shape)
    except (RuntimeError, ValueError) as exc:
        raise TransferError(f"{model}: the new base cannot run on the teacher's {len(roi)}D samples of "
                            f"{list(roi)} ({' '.join(str(exc).split())[:200]})") from None
    finally:
        teacher.train(was[0])
        student.train(was[1])
    if shape_s != shape_t:
        raise TransferError(f"{model}: the new base outputs {shape_s[1]} channel(s) of {list(shape_s[2:])}, the "
                            f"teacher ({teacher_adapter}) {shape_t[1]} of {list(shape_t[2:])}; only outputs are "
                            "matched, so classes must agree (set num_classes/out_channels in --backbone-args)")


def run_transfer(
    *, teacher_model: str | Path, teacher_adapter: str | Path, model: str | Path, out: str | Path, method: str,
    rank: int = 4, alpha: float | None = None, backbone: str | None = None,
    backbone_args: dict[str, Any] | None = None, seed_cases: str | Path | None = None, steps: int = 200,
    batch_size: int = 8, lr: float = 5e-3, synthetic: SyntheticSpec | None = None, patches: int = 4,
    temperature: float = DEFAULT_TEMPERATURE, lesion_weight: float = DEFAULT_LESION_WEIGHT,
    dice_weight: float = DEFAULT_DICE_WEIGHT, seed: int = 0, overwrite: bool = False, finetune: str | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``medlora transfer``: distil the teacher (``teacher_model`` + ``teacher_adapter``) into a new adapter of
    ``method``/``rank`` on ``model`` (the new base; its architecture ``backbone``/``backbone_args``, default the
    teacher's), write it to ``out`` and return the run's record (also stored in the file's metadata, ``transfer``).

    ``finetune``: a module group of the new base trained beside the adapter (default: the teacher's recorded
    ``finetune``, e.g. SAMed's ``prompt_encoder+mask_decoder`` or SALT's ``norms+pos_embed``; ``none`` for the
    adapter alone); its tensors travel in the new file as the teacher's did. When the new base is the teacher's
    base and the new adapter is configured like the teacher's, the student starts from the teacher's adapter
    (identity transfer: the loss starts at 0).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise TransferError(f"{out}: exists; pass --overwrite to replace it")
    for name, value in (("--steps", steps), ("--batch-size", batch_size), ("--rank", rank)):
        if int(value) < 1:
            raise TransferError(f"{name}: must be at least 1, got {value}")
    if not (lr > 0 and temperature > 0 and lesion_weight >= 1 and dice_weight >= 0):
        raise TransferError("--lr and --temperature must be > 0, --lesion-weight >= 1, --dice-weight >= 0")
    teacher_adapter, teacher_model, model = Path(teacher_adapter), Path(teacher_model), Path(model)
    meta, _ = read_adapter_file(teacher_adapter)
    t_backbone, t_args, spatial_dims = _architecture(meta, teacher_adapter)
    prep = (meta.get("extra") or {}).get("preprocessing") or {}
    hu_window = prep.get("hu_window") or [0.0, 140.0]
    roi = prep.get("roi_size")
    if not roi or len(roi) != spatial_dims:
        raise TransferError(f"{teacher_adapter}: no {spatial_dims}D sliding-window size (roi_size) recorded")
    threshold = float(prep.get("threshold") or 0.5)
    torch.manual_seed(seed)  # before the new adapter is drawn: a seeded transfer is reproducible
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*adapter parameters >= the layer")
        old_base = build_model(ModelSpec(t_backbone, t_args, spatial_dims, pretrained=str(teacher_model)))
        teacher = load_adapter_onto(old_base, teacher_adapter)  # checks the adapter was trained on this base
        config = _new_adapter_config(meta, method, rank, alpha)
        if finetune is None:
            finetune = (meta.get("extra") or {}).get("finetune")
        new_spec = ModelSpec(backbone or t_backbone, dict(t_args if backbone_args is None else backbone_args),
                             spatial_dims, pretrained=str(model), adapter=config,
                             finetune=None if finetune == "none" else finetune)
        try:
            student = build_model(new_spec)
        except ModelSpecError as exc:  # e.g. SAM (2D only) as the student of a 3D teacher
            raise TransferError(f"{model}: the new base ({spatial_dims}D, as the teacher {teacher_adapter}): "
                                f"{exc}") from None
    problem = input_window_problem(student, hu_window)
    if problem is not None:  # SAM maps [0, 1] back to HU: the teacher's window must be the student's
        raise TransferError(f"{model}: the teacher's HU window {problem}; set input_window in --backbone-args")
    _check_outputs(teacher, student, roi, teacher_adapter, model)
    started_from_teacher = False
    if new_spec.backbone == t_backbone and new_spec.backbone_args == t_args and \
            AdapterConfig.from_dict(meta["configs"][0]).to_dict() == config.to_dict():
        try:
            load_adapter(student, teacher_adapter)  # refuses unless the new base is the teacher's base
            started_from_teacher = True
        except AdapterFileError:
            pass
    spec = copy.deepcopy(synthetic or SyntheticSpec())
    real = None
    if seed_cases is not None:
        volumes, grid = seed_volumes(seed_cases, hu_window, prep.get("target_spacing"))
        spec.shape = spec.shape or tuple(grid["shape"])
        spec.spacing = spec.spacing or tuple(grid["spacing"])
        generator = torch.Generator().manual_seed(seed)
        real = torch.cat([volume_samples(v, spatial_dims, roi, patches=patches, generator=generator)
                          for v in volumes])
    say(f"generating {spec.volumes} synthetic phantom volumes ...")
    try:
        pool = synthetic_samples(spec, spatial_dims, roi, hu_window, patches=patches)
    except ValueError as exc:  # the generator's own check of the grid (field of view, shape)
        source = "the seed cases' grid" if seed_cases is not None else "--synthetic-shape/--synthetic-spacing"
        raise TransferError(f"synthetic phantoms on {source}: {exc}") from None
    record: dict[str, Any] = {
        "paper": "Trans-LoRA, arXiv 2405.17258", "teacher_model": str(teacher_model),
        "teacher_adapter": str(teacher_adapter), "teacher_method": meta["configs"][0]["method"],
        "teacher_backbone_args": t_args, "synthetic": {**asdict(spec), "samples": len(pool)},
        "seed_cases": None if seed_cases is None else str(seed_cases), "steps": steps, "batch_size": batch_size,
        "lr": lr, "temperature": temperature, "lesion_weight": lesion_weight, "dice_weight": dice_weight,
        "seed": seed, "started_from_teacher": started_from_teacher, "finetune": new_spec.finetune,
    }
    if real is not None:
        keep, p_real = discriminator_filter(old_base, real, pool)
        record["filter"] = {"real_samples": len(real), "kept": int(keep.sum()), "pool": len(pool),
                            "mean_p_real": float(p_real.mean())}
        say(f"discriminator filter: kept {int(keep.sum())} of {len(pool)} synthetic samples "
            f"({len(real)} real samples from the seed cases)")
        pool = pool[keep]
    history = distill(teacher, student, pool, steps=steps, batch_size=batch_size, lr=lr, temperature=temperature,
                      lesion_weight=lesion_weight, dice_weight=dice_weight, threshold=threshold, seed=seed)
    record.update(first_loss=history["first_loss"], last_loss=history["last_loss"])
    say(f"distillation loss {history['first_loss']:.4f} -> {history['last_loss']:.4f} over {steps} steps")
    extra = {**new_spec.to_dict(), "preprocessing": prep, "transfer": record}
    extra.pop("adapter")
    if out.exists() and not overwrite:  # created while we trained
        raise TransferError(f"{out}: exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # an identity transfer copied the teacher's extra tensors (e.g. its BatchNorm statistics): they travel along
    carried = list(meta.get("extra_tensors") or []) if started_from_teacher else []
    from .callbacks import extra_state_names  # lightning is imported only here

    carried += [n for n in extra_state_names(student, "freeze") if n not in carried]  # the trained group
    save_adapter(student, out, extra_metadata=extra, extra_tensors=carried)
    say(f"wrote {out}")
    return record
