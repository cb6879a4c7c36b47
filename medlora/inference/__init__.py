"""Inference on new CT volumes: NIfTI or DICOM in, a label map (and volumes) out in the input's geometry.

``medlora infer`` is :func:`run_inference`; :func:`load_models` builds the network(s) of a checkpoint,
a base plus adapters, or a crossval run folder, and :class:`Predictor` runs one volume in memory.
"""

from .infer import (
    CasePrediction,
    InferenceError,
    InferenceModels,
    InferenceSummary,
    Predictor,
    Preprocessing,
    case_outputs,
    load_models,
    resolve_device,
    run_inference,
)
from .io import InputCase, InputError, check_ct, find_inputs, read_case, read_dicom_series, read_nifti_volume

__all__ = [
    "CasePrediction",
    "InferenceError",
    "InferenceModels",
    "InferenceSummary",
    "InputCase",
    "InputError",
    "Predictor",
    "Preprocessing",
    "case_outputs",
    "check_ct",
    "find_inputs",
    "load_models",
    "read_case",
    "read_dicom_series",
    "read_nifti_volume",
    "resolve_device",
    "run_inference",
]
