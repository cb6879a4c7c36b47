"""Segmentation backbones: the seed authors' multi-view UNet, MONAI networks, and a registry of both.

See :mod:`medlora.models.mv_unet` (kayvanlabs/Transfer-Learning-SAH-Seg ``mv.py``; Yao et al. 2020 lineage;
Minoccheri et al. 2025, arXiv 2508.01772) and :mod:`medlora.models.registry`.
"""

from medlora.models.mv_unet import (
    GROUP_ALIASES,
    GROUP_NAMES,
    MultiViewUNet,
    group_module_names,
    group_parameters,
    module_groups,
    set_trainable,
)
from medlora.models.registry import create_model, list_models, register_model

__all__ = [
    "GROUP_ALIASES",
    "GROUP_NAMES",
    "MultiViewUNet",
    "create_model",
    "group_module_names",
    "group_parameters",
    "list_models",
    "module_groups",
    "register_model",
    "set_trainable",
]
