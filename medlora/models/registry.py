"""Model registry: build any supported backbone by name (timm-style ``register_model``/``create_model``).

Configs and the CLI name a backbone (``model: mv_unet``) and pass its keyword arguments through unchanged,
so MONAI networks take MONAI's own argument names. Registered here:

* ``mv_unet``: :class:`~medlora.models.mv_unet.MultiViewUNet`, the seed authors' network
  (kayvanlabs/Transfer-Learning-SAH-Seg ``mv.py``; Minoccheri et al. 2025, arXiv 2508.01772);
* ``unet``, ``dynunet``, ``segresnet``, ``swin_unetr``: ``monai.networks.nets`` UNet, DynUNet, SegResNet,
  SwinUNETR;
* ``sam``: Segment Anything (ViT-B/L/H or a tiny variant) on 2D CT slices, official checkpoints load
  (:mod:`medlora.models.sam`);
* ``pruned``: a channel-pruned ``mv_unet`` or ``sam`` written by ``medlora prune`` (:mod:`medlora.pruning`).

Defaults are for one-channel CT in and a binary mask out as a single logit channel (sigmoid), the
convention of the MV net, so losses and post-processing do not depend on the backbone; pass
``out_channels=2`` for a softmax head. MONAI networks are imported only when built.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

ModelFactory = Callable[..., nn.Module]

_MODELS: dict[str, ModelFactory] = {}


def register_model(name: str, *, overwrite: bool = False) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering a model factory (a function or class taking keyword arguments) as ``name``.

    Registering a name twice raises ``ValueError`` unless ``overwrite=True``, so two plugins cannot
    silently shadow each other.
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _MODELS and _MODELS[name] is not factory and not overwrite:
            raise ValueError(f"model {name!r} is already registered (pass overwrite=True to replace it)")
        _MODELS[name] = factory
        return factory

    return decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered model names, optionally filtered by a shell-style ``pattern`` (e.g. ``"*unet*"``)."""
    names = sorted(_MODELS)
    return fnmatch.filter(names, pattern) if pattern else names


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name``; ``kwargs`` override its defaults and pass through unchanged."""
    factory = _MODELS.get(name)
    if factory is None:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    return factory(**kwargs)


@register_model("mv_unet")
def mv_unet(**kwargs: Any) -> nn.Module:
    """The seed authors' multi-view UNet; defaults are :class:`MultiViewUNet`'s (3D, level 2, width 32)."""
    from medlora.models.mv_unet import MultiViewUNet

    return MultiViewUNet(**kwargs)


@register_model("unet")
def unet(**kwargs: Any) -> nn.Module:
    """MONAI ``UNet`` as in MONAI's CT segmentation tutorials (5 levels, 2 residual units, batch norm)."""
    from monai.networks.nets import UNet

    cfg: dict[str, Any] = {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "channels": (16, 32, 64, 128, 256),
        "strides": (2, 2, 2, 2),
        "num_res_units": 2,
        "norm": "batch",
    }
    cfg.update(kwargs)
    return UNet(**cfg)


@register_model("dynunet")
def dynunet(**kwargs: Any) -> nn.Module:
    """MONAI ``DynUNet``, nnU-Net style; per-level ``strides`` like ``(1, (2, 2, 1), ...)`` fit thick slices.

    When only ``strides`` is given, ``kernel_size`` defaults to 3 at every level and
    ``upsample_kernel_size`` to ``strides[1:]``, so the three stay consistent.
    """
    from monai.networks.nets import DynUNet

    strides: Sequence[Any] = kwargs.pop("strides", (1, 2, 2, 2, 2))
    cfg: dict[str, Any] = {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "kernel_size": [3] * len(strides),
        "strides": strides,
        "upsample_kernel_size": list(strides)[1:],
    }
    cfg.update(kwargs)
    return DynUNet(**cfg)


@register_model("segresnet")
def segresnet(**kwargs: Any) -> nn.Module:
    """MONAI ``SegResNet`` with its own defaults except one output channel."""
    from monai.networks.nets import SegResNet

    cfg: dict[str, Any] = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1}
    cfg.update(kwargs)
    return SegResNet(**cfg)


@register_model("swin_unetr")
def swin_unetr(**kwargs: Any) -> nn.Module:
    """MONAI ``SwinUNETR`` (no ``img_size`` since MONAI 1.5; inputs must be divisible by ``patch_size**5``).

    ``feature_size`` must be a multiple of 12. Needs the ``einops`` package, which MONAI treats as optional.
    """
    from monai.networks.nets import SwinUNETR
    from monai.utils import optional_import

    # MONAI would only fail at the first forward pass, deep inside a training run; fail at build time.
    if not optional_import("einops")[1]:
        raise ImportError("model 'swin_unetr' needs the 'einops' package: pip install einops")

    cfg: dict[str, Any] = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "feature_size": 24}
    cfg.update(kwargs)
    return SwinUNETR(**cfg)


@register_model("sam")
def sam(**kwargs: Any) -> nn.Module:
    """Segment Anything for CT slices (:class:`~medlora.models.sam.SamSegmenter`): ``variant`` ``vit_b``
    (default), ``vit_l``, ``vit_h`` or ``tiny``; ``checkpoint`` loads an official SAM or MedSAM file."""
    from medlora.models.sam import SamSegmenter

    return SamSegmenter(**kwargs)


@register_model("pruned")
def pruned(**kwargs: Any) -> nn.Module:
    """A channel-pruned base (``medlora prune``): ``backbone``/``backbone_args`` of the full network, ``keep`` the
    kept units per channel group (:func:`medlora.pruning.files.build_pruned`)."""
    from medlora.pruning.files import build_pruned

    return build_pruned(**kwargs)
