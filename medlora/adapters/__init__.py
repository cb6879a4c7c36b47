"""The generic adapter core: parameter-efficient reparameterisations of frozen weights.

Works on any ``nn.Module`` (a 3D UNet as much as a GPT-style transformer): ``nn.Linear``,
``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` (any groups, stride, dilation, padding mode or
anisotropic kernel). No medical or training-framework imports live here. In training, the factors of LoRA-type
methods get their gradients in rank space where that is cheaper (:mod:`medlora.adapters.factored`,
:func:`set_backward`).

    >>> from medlora.adapters import AdapterConfig, inject, merge, parameter_report
    >>> model = inject(model, AdapterConfig("cp_dora", rank=4, targets=["encoder.*"]))
    >>> print(parameter_report(model))
"""

from .base import AdditiveReparam, Reparam
from .config import AdapterConfig, MethodSpec, describe_method, get_method, list_methods, option, register_method
from .data_init import initialise_from_data
from .factored import backward_path, get_backward, set_backward
from .inject import (
    LayerReport,
    ParameterReport,
    adapters_of,
    base_weight,
    candidate_layers,
    inject,
    iter_adapters,
    merge,
    parameter_report,
    remove,
)
from .io import AdapterFileError, base_fingerprint, load_adapter, read_adapter_file, save_adapter
from .layout import WeightLayout, layout_of
from .merging import merge_adapters
from .methods.dylora import draw_dylora_rank
from .methods.paca import paca_save_activations
from .multi import AdapterBank, MultiAdapterError, PackedJobs
from .peft_interop import export_peft, import_peft
from .squeeze import RankAnnealer, RankSchedule, set_active_rank, squeeze, truncate_rank

__all__ = [
    "AdapterBank",
    "AdapterConfig",
    "AdapterFileError",
    "AdditiveReparam",
    "LayerReport",
    "MethodSpec",
    "MultiAdapterError",
    "PackedJobs",
    "ParameterReport",
    "RankAnnealer",
    "RankSchedule",
    "Reparam",
    "WeightLayout",
    "adapters_of",
    "backward_path",
    "base_fingerprint",
    "base_weight",
    "candidate_layers",
    "describe_method",
    "draw_dylora_rank",
    "export_peft",
    "get_backward",
    "get_method",
    "import_peft",
    "initialise_from_data",
    "inject",
    "iter_adapters",
    "layout_of",
    "list_methods",
    "load_adapter",
    "merge",
    "merge_adapters",
    "option",
    "paca_save_activations",
    "parameter_report",
    "read_adapter_file",
    "register_method",
    "remove",
    "save_adapter",
    "set_active_rank",
    "set_backward",
    "squeeze",
    "truncate_rank",
]
