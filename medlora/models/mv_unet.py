"""Multi-view UNet ("MV") of the seed authors, for 2D slices or 3D volumes, plus named module groups.

This is the small (~233k parameter) segmentation network used for hemorrhage segmentation in head CT by
the Michigan group (Yao et al. 2020 lineage; public code ``kayvanlabs/Transfer-Learning-SAH-Seg``,
``util/models/experiment/mv.py``), the base network of the LoRA/CP-LoRA transfer study of Minoccheri et al.
2025 (arXiv 2508.01772). The structure is reproduced exactly:

* every convolution has ``width`` (32) output channels, "same" padding, and is followed by norm + ReLU
  (except the final 1x1 head);
* ``M1(cin)``: two convolutions;
* ``M2(cin)``: three convolutions with dilation 1, 2, 4 (the "views"), whose output is concatenated with
  the block's input (``cin + width`` channels, a long skip);
* ``Down``: ``down = maxpool(M1(x))`` goes deeper, ``right = M2(x)`` is the skip (``2 * width`` channels);
* bottom ``M2(width)``; ``Up(cin)``: ``M1(cin)`` then linear upsampling, concatenated with the skip;
* ``M3(3 * width)``: two convolutions then a 1x1 convolution to ``out_channels`` logits.

Attribute and sub-module names (``M1.DoubleConv.0``, ``down_list.1.M2.TripleDia.6``, ``M3.TripleOut.6``, ...)
are the authors', so their 2D checkpoints load with ``load_state_dict`` and adapter targets can be written
with the same names. Unlike the original, one class serves ``spatial_dims`` 2 and 3 (MONAI style), with
per-axis kernels and pooling for thick-slice CT (e.g. ``kernel_size=(3, 3, 1)``, ``pool_size=(2, 2, 1)``).

The module groups used by the authors' module-wise fine-tuning (``tune_cv.py::freeze_layers``) are exposed
as ``shallow``/``deep``/``encoder``/``decoder``/``all``/``none`` (the authors' ``top``/``bottom``/``left``/
``right`` are accepted as aliases); see :meth:`MultiViewUNet.module_groups`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv, Norm, Pool
from monai.networks.layers.convutils import same_padding
from monai.utils import ensure_tuple_rep
from torch import nn

__all__ = [
    "GROUP_ALIASES",
    "GROUP_NAMES",
    "MultiViewUNet",
    "group_module_names",
    "group_parameters",
    "module_groups",
    "set_trainable",
]

# Canonical group names, and the names the authors' code and figures use for the same sets.
GROUP_NAMES: tuple[str, ...] = ("shallow", "deep", "encoder", "decoder", "all", "none")
GROUP_ALIASES: dict[str, str] = {"top": "shallow", "bottom": "deep", "left": "encoder", "right": "decoder"}

_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Conv3d)
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


def _conv_norm_relu(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, ...],
    dilation: int,
    norm: str,
) -> list[nn.Module]:
    """A plain ``ConvNd`` (so adapters can wrap it and find its ``.weight``), a norm layer and a ReLU."""
    conv = Conv[Conv.CONV, spatial_dims](
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        padding=same_padding(kernel_size, dilation),
        dilation=dilation,
    )
    if norm == "batch":
        norm_layer = Norm[Norm.BATCH, spatial_dims](out_channels)
    else:
        # Affine on, so the instance-norm variant has trainable scale/shift like BN (nnU-Net does the same).
        norm_layer = Norm[Norm.INSTANCE, spatial_dims](out_channels, affine=True)
    # Not in-place: hooks and adapters that keep a block's output must not see it overwritten.
    return [conv, norm_layer, nn.ReLU()]


class M1(nn.Module):
    """Double convolution ``cin -> width -> width``."""

    def __init__(
        self, spatial_dims: int, in_channels: int, width: int, kernel_size: tuple[int, ...], norm: str
    ) -> None:
        super().__init__()
        self.DoubleConv = nn.Sequential(
            *_conv_norm_relu(spatial_dims, in_channels, width, kernel_size, 1, norm),
            *_conv_norm_relu(spatial_dims, width, width, kernel_size, 1, norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.DoubleConv(x)


class M2(nn.Module):
    """Dilated convolutions in sequence (the "views"), concatenated after the input: ``cin + width`` out."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        width: int,
        kernel_size: tuple[int, ...],
        dilations: Sequence[int],
        norm: str,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for d in dilations:
            layers += _conv_norm_relu(spatial_dims, cin, width, kernel_size, d, norm)
            cin = width
        self.TripleDia = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Input first, then the dilated features: the authors' channel order, which their weights rely on.
        return torch.cat((x, self.TripleDia(x)), dim=1)


class Down(nn.Module):
    """Encoder step: returns ``(maxpool(M1(x)), M2(x))``; the second is the skip to the decoder."""

    def __init__(
        self,
        spatial_dims: int,
        width: int,
        kernel_size: tuple[int, ...],
        pool_size: tuple[int, ...],
        dilations: Sequence[int],
        norm: str,
    ) -> None:
        super().__init__()
        self.M1 = M1(spatial_dims, width, width, kernel_size, norm)
        self.M2 = M2(spatial_dims, width, width, kernel_size, dilations, norm)
        self.Down = Pool[Pool.MAX, spatial_dims](kernel_size=pool_size, stride=pool_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.Down(self.M1(x)), self.M2(x)


class Up(nn.Module):
    """Decoder step: ``M1(cin)`` then upsampling by the pooling factor."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        width: int,
        kernel_size: tuple[int, ...],
        scale_factor: tuple[int, ...],
        mode: str,
        norm: str,
    ) -> None:
        super().__init__()
        self.M1 = M1(spatial_dims, in_channels, width, kernel_size, norm)
        self.scale_factor = tuple(float(s) for s in scale_factor)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.M1(x)
        if self.mode == "nearest":
            return F.interpolate(x, scale_factor=self.scale_factor, mode="nearest")
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=False)


class M3(nn.Module):
    """Head: two convolutions ``cin -> width -> width`` then a 1x1 convolution to the output logits."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        width: int,
        out_channels: int,
        kernel_size: tuple[int, ...],
        norm: str,
    ) -> None:
        super().__init__()
        self.TripleOut = nn.Sequential(
            *_conv_norm_relu(spatial_dims, in_channels, width, kernel_size, 1, norm),
            *_conv_norm_relu(spatial_dims, width, width, kernel_size, 1, norm),
            Conv[Conv.CONV, spatial_dims](width, out_channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.TripleOut(x)


class MultiViewUNet(nn.Module):
    """The authors' multi-view UNet, for 2D or 3D inputs.

    Args:
        spatial_dims: 2 for slices (the authors' setting), 3 for volumes.
        in_channels: input channels (1 for windowed CT).
        out_channels: output logit channels (1 = binary with sigmoid, as the authors; 2+ for softmax).
        level: number of poolings (the authors used 2). Must be >= 1.
        width: channels of every convolution (the authors used 32).
        kernel_size: kernel of every non-head convolution, an int or one odd size per spatial axis,
            e.g. ``(3, 3, 1)`` so 5 mm slices are not convolved across.
        pool_size: max-pool kernel/stride and upsampling factor, an int or per-axis tuple, e.g. ``(2, 2, 1)``
            to keep the slice count.
        dilations: dilation of each convolution of the ``M2`` blocks, in order (the authors' 1, 2, 4).
        norm: ``"batch"`` (the authors') or ``"instance"`` (affine), after every non-head convolution.
        upsample: ``"linear"`` (bilinear/trilinear with ``align_corners=False``, as the authors' bilinear)
            or ``"nearest"``.
        init: ``None`` keeps PyTorch's default initialisation; ``"xavier"`` reproduces the authors'
            ``get_model``: convolutions ``xavier_normal_(gain=0.02)`` with zero bias, norm weight
            ~ N(1, 0.02) with zero bias. Irrelevant when a pretrained state dict is loaded afterwards.

    Every spatial size of the input must be divisible by ``pool_size ** level`` per axis
    (:attr:`size_divisor`); otherwise ``forward`` raises ``ValueError``. Pad beforehand (MONAI
    ``DivisiblePad``) or run sliding-window inference with a divisible ``roi_size``.

    With ``spatial_dims=2, in_channels=1, out_channels=1, level=2, width=32`` the network has
    232,737 parameters, the authors' count.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        level: int = 2,
        width: int = 32,
        kernel_size: int | Sequence[int] = 3,
        pool_size: int | Sequence[int] = 2,
        dilations: Sequence[int] = (1, 2, 4),
        norm: str = "batch",
        upsample: str = "linear",
        init: str | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if level < 1:
            # With no pooling the authors' layout has no skip to concatenate before M3(3*width).
            raise ValueError(f"level must be >= 1, got {level}")
        if norm not in ("batch", "instance"):
            raise ValueError(f"norm must be 'batch' or 'instance', got {norm!r}")
        if upsample not in ("linear", "nearest"):
            raise ValueError(f"upsample must be 'linear' or 'nearest', got {upsample!r}")
        if init not in (None, "xavier"):
            raise ValueError(f"init must be None or 'xavier', got {init!r}")
        if len(dilations) < 1 or any(int(d) < 1 for d in dilations):
            raise ValueError(f"dilations must be a non-empty sequence of positive ints, got {dilations}")
        ks = _per_axis(kernel_size, spatial_dims, "kernel_size")
        ps = _per_axis(pool_size, spatial_dims, "pool_size")
        if any(k < 1 or k % 2 == 0 for k in ks):
            raise ValueError(f"kernel_size must be odd per axis for 'same' padding, got {ks}")
        if any(p < 1 for p in ps):
            raise ValueError(f"pool_size must be positive per axis, got {ps}")

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.level = level
        self.width = width
        self.kernel_size = ks
        self.pool_size = ps
        self.dilations = tuple(int(d) for d in dilations)
        self.norm = norm
        self.upsample = upsample

        mode = {2: "bilinear", 3: "trilinear"}[spatial_dims] if upsample == "linear" else "nearest"
        w = width
        self.M1 = M1(spatial_dims, in_channels, w, ks, norm)
        self.down_list = nn.ModuleList(
            [Down(spatial_dims, w, ks, ps, self.dilations, norm) for _ in range(level)]
        )
        self.M2 = M2(spatial_dims, w, w, ks, self.dilations, norm)
        # The bottom M2 gives 2w channels; every later Up sees w (upsampled) + 2w (skip) = 3w.
        self.up_list = nn.ModuleList(
            [Up(spatial_dims, 2 * w if i == 0 else 3 * w, w, ks, ps, mode, norm) for i in range(level)]
        )
        self.M3 = M3(spatial_dims, 3 * w, w, out_channels, ks, norm)

        if init == "xavier":
            self.apply(_authors_init)

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Per-axis number every input spatial size must be a multiple of (``pool_size ** level``)."""
        return tuple(p**self.level for p in self.pool_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"MultiViewUNet(spatial_dims={self.spatial_dims}) expects a "
                f"{self.spatial_dims + 2}-D tensor (N, C, *spatial), got shape {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        div = self.size_divisor
        if any(s % d for s, d in zip(spatial, div, strict=True)):
            raise ValueError(
                f"MultiViewUNet(level={self.level}, pool_size={self.pool_size}) needs spatial sizes "
                f"divisible by {div}, got {spatial}; pad the input (e.g. MONAI DivisiblePad(k={div})) "
                f"or use a divisible roi_size for sliding-window inference"
            )
        down = self.M1(x)
        rights = []
        for block in self.down_list:
            down, right = block(down)
            rights.append(right)
        up = self.M2(down)
        for i, block in enumerate(self.up_list):
            up = torch.cat((block(up), rights[-(i + 1)]), dim=1)
        return self.M3(up)

    def module_groups(self) -> dict[str, list[str]]:
        """Module-name prefixes of each named group, for module-wise fine-tuning and adapter targets.

        For ``level=2`` these are exactly the authors' sets (``tune_cv.py::freeze_layers``):

        * ``shallow`` (authors' ``top``): ``M1``, ``M3``;
        * ``deep`` (``bottom``): ``down_list.1.M1``, ``up_list.0.M1``;
        * ``encoder`` (``left``): ``M1``, ``down_list.0.M1``, ``down_list.1.M1``;
        * ``decoder`` (``right``): ``up_list.0.M1``, ``up_list.1.M1``, ``M3``;
        * ``all``: every module, the ``M2`` skip blocks included; ``none``: nothing.

        Other levels generalise by position: ``deep`` is the deepest encoder ``M1`` plus the first
        decoder ``M1``; ``encoder``/``decoder`` take every ``down_list[i].M1``/``up_list[i].M1``. As in the
        authors' code the ``M2`` blocks belong to no partial group.
        """
        downs = [f"down_list.{i}.M1" for i in range(self.level)]
        ups = [f"up_list.{i}.M1" for i in range(self.level)]
        return {
            "shallow": ["M1", "M3"],
            "deep": [downs[-1], ups[0]],
            "encoder": ["M1", *downs],
            "decoder": [*ups, "M3"],
            "all": [name for name, _ in self.named_children()],
            "none": [],
        }


def _per_axis(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in ensure_tuple_rep(value, spatial_dims))
    except ValueError:
        raise ValueError(
            f"{name} must be an int or one value per spatial axis ({spatial_dims}), got {value}"
        ) from None


@torch.no_grad()
def _authors_init(m: nn.Module) -> None:
    if isinstance(m, _CONV_TYPES + (nn.Linear,)):
        nn.init.xavier_normal_(m.weight, gain=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, _NORM_TYPES) and m.affine:
        # The authors only had BatchNorm2d; the 3D and instance-norm variants get the same treatment.
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def module_groups(model: nn.Module) -> dict[str, list[str]]:
    """Module-name prefixes of each named group of ``model``.

    Models with a ``module_groups()`` method (e.g. :class:`MultiViewUNet`) define their own groups; any
    other model only has ``all`` (prefix ``""``, the whole model) and ``none``.
    """
    method = getattr(model, "module_groups", None)
    if callable(method):
        return method()
    return {"all": [""], "none": []}


def _prefixes(model: nn.Module, group: str) -> list[str]:
    """Prefixes of ``group``; ``"a+b"`` is the union of groups ``a`` and ``b`` (e.g. ``mask_decoder+norms``);
    ``stage:<stage>`` is a NOT stage (a module name or ``<container>.<i>:<j>``, see
    :func:`medlora.adapters.transplant.stage_modules`)."""
    from ..adapters.transplant import stage_modules

    groups = module_groups(model)
    prefixes: list[str] = []
    for part in (p.strip() for p in group.split("+")):
        if part.startswith("stage:"):
            prefixes += stage_modules(model, part[len("stage:"):])
            continue
        name = GROUP_ALIASES.get(part, part) if "shallow" in groups else part
        if name not in groups:
            raise ValueError(f"{type(model).__name__} has no module group {part!r}; it has: {', '.join(groups)}")
        prefixes += groups[name]
    return prefixes


def _in_prefixes(name: str, prefixes: Sequence[str]) -> bool:
    # Match whole dotted components so that "M1" never captures "M10" or "down_list.0.M1" by accident.
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def group_parameters(model: nn.Module, group: str) -> list[nn.Parameter]:
    """The parameters (weights, biases, norm affine) of the modules in ``group``, without duplicates."""
    prefixes = _prefixes(model, group)
    return [p for n, p in model.named_parameters() if _in_prefixes(n, prefixes)]


def set_trainable(model: nn.Module, group: str) -> nn.Module:
    """Freeze every parameter of ``model``, then unfreeze those of ``group`` (norm affine included).

    As in the authors' fine-tuning, this does not touch train/eval mode: batch-norm running statistics of
    frozen layers keep updating while the model is in ``train()`` mode.
    """
    prefixes = _prefixes(model, group)
    for n, p in model.named_parameters():
        p.requires_grad_(_in_prefixes(n, prefixes))
    return model


def group_module_names(
    model: nn.Module, group: str, types: tuple[type[nn.Module], ...] = _CONV_TYPES
) -> list[str]:
    """Full dotted names of the modules of the given ``types`` (convolutions by default) inside ``group``.

    Meant for adapter configs that target a group, e.g. ``group_module_names(model, "shallow")`` gives
    ``["M1.DoubleConv.0", "M1.DoubleConv.3", "M3.TripleOut.0", "M3.TripleOut.3", "M3.TripleOut.6"]``
    for the MV net; the last one is the 1x1 head, which callers may drop.
    """
    prefixes = _prefixes(model, group)
    return [n for n, m in model.named_modules() if n and isinstance(m, types) and _in_prefixes(n, prefixes)]
