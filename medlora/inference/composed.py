"""``medlora infer --composition FILE``: several single-class adapters of one base, routed and fused per case.

The composition file (:mod:`medlora.adapters.multi.files`) names the adapters, how they are chosen per case (all
of them, or a case router's top-k / those it scores present) and how their class maps are fused; it records the
base's fingerprint and each adapter file's. Loading refuses, before any case runs and in one line, a base or an
adapter that differs from those it was saved with.

Per case: the training preprocessing (:class:`~.infer.Predictor`); the router's features from the base on the
whole preprocessed case (every axial slice of a 2D base, the volume of a 3D one); each chosen adapter (merged into
a copy of the base, so it costs what the base costs) runs with the same sliding windows as a single model; each
adapter's probabilities are brought back to the input's grid first and the fusion
(:func:`~medlora.adapters.multi.fuse_class_maps`) is done there, so that no label value is ever interpolated. The
label map holds the class values the composition records (those of the dataset's ``dataset.json``).

A mixer file (selection ``mixer``): one network, the base with every routed layer replaced by a
:class:`~medlora.adapters.multi.mixer.MixerLinear` over the experts (the adapter files) and the stored gates, so a
case costs one pass of the base plus the E low-rank products per routed layer, not E networks. Its output channels
(``outputs``) are brought to the input's grid and fused into the recorded label values in the same way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..adapters.multi.compose import fuse_class_maps
from ..adapters.multi.files import (
    CompositionFileError,
    CompositionSpec,
    check_base,
    read_composition,
    resolve_adapter_files,
)
from ..errors import MedloraError
from .provenance import ModelFile

if TYPE_CHECKING:
    from .infer import CasePrediction, InferenceModels, Predictor

__all__ = ["ComposedModels", "load_composed_models", "predict_composed"]


@dataclass
class ComposedModels:
    """The composition of an inference run: its spec and the plain base (for the router's features)."""

    spec: CompositionSpec
    base: nn.Module
    path: Path

    def record(self) -> dict:
        s = self.spec
        return {"file": str(self.path), "adapters": list(s.names), "values": list(s.values), "select": s.select,
                "k": s.k, "pooled_layer": s.pooled_layer, "rule": s.rule,
                "priority": None if s.priority is None else [s.names[i] for i in s.priority],
                **({} if s.mixer is None else {"mixer": {
                    "layers": len(s.mixer.layers), "routing": s.mixer.routing, "k": s.mixer.k,
                    "outputs": [list(o) for o in s.mixer.outputs]}})}


def load_composed_models(model: Path, composition: Path, adapters: list[Path]) -> InferenceModels:
    from .infer import Architecture, InferenceError, InferenceModels, Preprocessing, _load_base, _with_adapter

    if model.is_dir():
        raise InferenceError(f"{model}: --composition needs the base weights as --model, not a folder")
    spec, meta = read_composition(composition)
    arch = Architecture.from_record(meta.get("architecture"), str(composition))
    record = meta.get("preprocessing")
    if isinstance(record, dict) and record.get("threshold") is None:
        record = {**record, "threshold": spec.threshold}
    prep = Preprocessing.from_record(record, str(composition))
    files = resolve_adapter_files(composition, meta, adapters)
    base = _load_base(model, arch)
    check_base(composition, meta, base)
    if spec.mixer is not None:
        try:
            models = [spec.mixer.attach(copy.deepcopy(base), files, spec.names).eval()]
        except MedloraError as exc:
            raise CompositionFileError(f"{composition}: {exc}") from None
        members = [f"{model} + mixer of {', '.join(map(str, files))}"]
    else:
        models = [_with_adapter(base, f) for f in files]
        members = [f"{model} + {f} ({n})" for f, n in zip(files, spec.names, strict=True)]
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return InferenceModels(models, members, arch,
                           prep, [ModelFile("base", model), ModelFile("composition", composition),
                                  *(ModelFile("adapter", f) for f in files)],
                           composition=ComposedModels(spec, base, composition))


def predict_composed(predictor: Predictor, data: np.ndarray, affine: np.ndarray) -> CasePrediction:
    from .infer import CasePrediction

    comp: ComposedModels = predictor.models.composition
    spec = comp.spec
    image = predictor.preprocess(data, affine)
    if spec.mixer is not None:
        outs = spec.mixer.outputs
        probs = np.stack([predictor.to_input_grid(predictor.probabilities(image, channel=c), image) for c, _ in outs])
        labels = fuse_class_maps(torch.from_numpy(probs)[None], [v for _, v in outs], rule="probability",
                                 threshold=predictor.threshold)[0].numpy().astype(np.uint8)
        return CasePrediction(probability=probs.max(axis=0), label=labels, chosen=list(spec.names),
                              class_voxels={f"label {v}": int(np.count_nonzero(labels == v)) for _, v in outs})
    features = None
    if spec.select != "all":
        x = torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor") else image)  # (1, X, Y, Z)
        x = x.permute(3, 0, 1, 2) if predictor.models.spatial_dims == 2 else x[None]
        base = comp.base.to(predictor.device)
        features = spec.case_features(base, x.to(predictor.device)).cpu()
    chosen = spec.choose(features)[0]
    probs = np.stack([predictor.to_input_grid(predictor.probabilities(image, [predictor.models.models[i]],
                                                                      channel=spec.channels[i]), image)
                      for i in chosen])
    values = [spec.values[i] for i in chosen]
    labels = fuse_class_maps(torch.from_numpy(probs)[None], values, rule=spec.rule, threshold=predictor.threshold,
                             priority=spec.sub_priority(chosen))[0].numpy().astype(np.uint8)
    return CasePrediction(probability=probs.max(axis=0), label=labels, chosen=[spec.names[i] for i in chosen],
                          class_voxels={spec.names[i]: int(np.count_nonzero(labels == spec.values[i]))
                                        for i in range(len(spec.names))})
