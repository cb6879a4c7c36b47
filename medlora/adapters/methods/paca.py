"""PaCA: partial connection adaptation, fine-tuning a few input connections of the weight itself.

Woo et al., "PaCA: Partial Connection Adaptation for Efficient Fine-Tuning", ICLR 2025, arXiv 2503.01905
(official code WooSunghyeon/paca). ``r`` randomly chosen input connections ``idx`` of ``W`` become
trainable: the parameter ``paca_w = W0[:, idx] / s`` (``s = alpha / r``) and ``W_eff = W0`` with those
connections replaced by ``s * paca_w``. There is no adapter branch; ``W_eff`` is the layer's weight, so
it merges exactly.

Connections: for ``nn.Linear`` an input column, as the paper; for a convolution (``unit="channel"``,
default, our resolution for kernels) an input *channel* of the canonical ``(O, I/groups, *k)`` weight with
all its kernel taps, so that the weight gradient needs only those input channels of the activation:
``grad paca_w = s * conv_weight_grad(x[:, idx], grad_y)``. ``unit="column"`` picks columns of the
``O x (I*prod k)`` matricisation instead (single kernel taps; no activation saving).

:func:`paca_save_activations` switches the adapted ``Linear``/``ConvNd`` layers (not transposed, one
group) to a custom autograd path that keeps only ``x[:, idx]`` (plus the weight) for backward instead of
the whole input, the paper's activation-memory saving; outputs and gradients are the same. Measured on a
conv-norm-LeakyReLU x2 block of 32-channel 3x3x3 convolutions at rank 8 on a 48^3 input (13.5 MiB):
81.3 MiB saved for backward with the plain path (the same as weight-space LoRA), 61.0 MiB with the
saving path (each adapted conv keeps 8 of its 32 input channels).

The chosen indices are stored with the adapter as the integer, non-trainable parameter ``paca_index``
so that a saved adapter reloads with its own connections. Start point: ``W0`` up to the round-off of
``s * (W0 / s)`` (exact when s is a power of two, e.g. the README default alpha 16 at r 8).
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..base import Reparam
from ..config import option, register_method


@dataclass
class PaCAOptions:
    unit: str = option("channel", "what a partial connection is: channel (an input channel with all kernel taps; "
                       "the same as a column for Linear) or column (one column of the O x I*prod k matrix)")


@register_method(
    "paca",
    label="PaCA",
    family="structure",
    options=PaCAOptions,
    summary="PaCA: train r randomly chosen input connections (columns / input channels) of W itself; "
            "trainable O*r (conv channel: O*r*prod k)",
    citation="Woo et al. 2025 (ICLR), arXiv 2503.01905",
    alpha_over_rank=2.0,
    trains="paca_w (the chosen input connections of W, O x r [x k]); paca_index is stored, not trained",
)
class PaCA(Reparam):
    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: PaCAOptions) -> None:
        super().__init__()
        if options.unit not in ("channel", "column"):
            raise ValueError(f"paca: unit must be 'channel' or 'column', got {options.unit!r}")
        self.unit, self.scaling = options.unit, scaling
        self.by_channel = options.unit == "channel"
        n = w0.shape[1] if self.by_channel else math.prod(w0.shape[1:])
        if rank > n:
            raise ValueError(f"paca: rank {rank} exceeds the {n} input {options.unit}s of a weight of shape "
                             f"{tuple(w0.shape)}")
        idx = torch.randperm(n, device=w0.device)[:rank]
        self.paca_index = nn.Parameter(idx, requires_grad=False)
        self.paca_w = nn.Parameter(self._columns(w0).detach() / scaling)

    def _view(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 if self.by_channel else w0.flatten(1)

    def _columns(self, w0: torch.Tensor) -> torch.Tensor:
        return self._view(w0).index_select(1, self.paca_index)

    def effective(self, w0: torch.Tensor) -> torch.Tensor:
        w = self._view(w0).index_copy(1, self.paca_index, self.paca_w * self.scaling)
        return w.view(w0.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, unit={self.unit!r}"


# --- activation-saving path -------------------------------------------------------------------------------

_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _PaCAFunction(torch.autograd.Function):
    """``y = layer(x; W_eff)``; backward keeps only ``x[:, idx]`` (conv) / ``x[..., idx]`` (Linear) and ``W_eff``."""

    @staticmethod
    def forward(ctx, x, paca_w, bias, w0, idx, scaling, conv):  # conv: None (Linear) or (d, stride, pad, dil)
        with torch.no_grad():
            w = w0.index_copy(1, idx, paca_w * scaling)
        if conv is None:
            y = F.linear(x, w, bias)
            x_sel = x.index_select(-1, idx)
        else:
            d, stride, padding, dilation = conv
            y = _CONV[d](x, w, bias, stride, padding, dilation)
            x_sel = x.index_select(1, idx)
        ctx.save_for_backward(x_sel if paca_w.requires_grad else None, w)
        ctx.meta = (x.shape, scaling, conv, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_sel, w = ctx.saved_tensors
        x_shape, scaling, conv, has_bias = ctx.meta
        grad_x = grad_w = grad_b = None
        if conv is None:
            if ctx.needs_input_grad[0]:
                grad_x = grad_y @ w
            if ctx.needs_input_grad[1]:
                grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x_sel.reshape(-1, x_sel.shape[-1]) * scaling
            if has_bias and ctx.needs_input_grad[2]:
                grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        else:
            d, stride, padding, dilation = conv
            if ctx.needs_input_grad[0]:
                grad_x = _INPUT_GRAD[d](x_shape, w, grad_y, stride, padding, dilation)
            if ctx.needs_input_grad[1]:
                shape = (w.shape[0], x_sel.shape[1], *w.shape[2:])
                grad_w = _WEIGHT_GRAD[d](x_sel, shape, grad_y, stride, padding, dilation) * scaling
            if has_bias and ctx.needs_input_grad[2]:
                grad_b = grad_y.sum(dim=[i for i in range(grad_y.dim()) if i != 1])
        return grad_x, grad_w, grad_b, None, None, None, None


def _paca_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from ..inject import adapters_of, base_weight

    reparam = adapters_of(self)
    w0 = base_weight(self) if reparam is not None else None
    usable = (
        isinstance(reparam, PaCA) and reparam.by_channel and torch.is_grad_enabled() and not w0.requires_grad
        and getattr(self, "groups", 1) == 1
    )
    if not usable:
        return type(self).forward(self, x)
    if isinstance(self, nn.Linear):
        return _PaCAFunction.apply(x, reparam.paca_w, self.bias, w0, reparam.paca_index, reparam.scaling, None)
    d = x.dim() - 2
    padding = self.padding
    if self.padding_mode != "zeros":
        x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        padding = 0
    elif isinstance(padding, str):  # 'same' / 'valid'
        return type(self).forward(self, x)
    conv = (d, self.stride, padding, self.dilation)
    return _PaCAFunction.apply(x, reparam.paca_w, self.bias, w0, reparam.paca_index, reparam.scaling, conv)


def paca_save_activations(model: nn.Module, enable: bool = True) -> int:
    """Make the PaCA layers of ``model`` keep only the chosen input channels for backward.

    Applies to ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (one group, numeric padding) adapted with
    ``paca`` (``unit="channel"``); other layers keep the plain weight-space path. Outputs and gradients
    are the same either way. The switch survives ``load_adapter``; after ``merge``/``remove`` the layer
    falls back to its own forward. ``enable=False`` restores the plain path. Returns how many layers use
    the saving path.
    """
    from ..inject import iter_adapters

    count = 0
    for _, module, reparam in iter_adapters(model):
        if not isinstance(reparam, PaCA):
            continue
        eligible = isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and reparam.by_channel
        if enable and eligible and getattr(module, "groups", 1) == 1:
            module.forward = types.MethodType(_paca_forward, module)
            count += 1
        elif "forward" in module.__dict__:
            del module.forward
    return count
