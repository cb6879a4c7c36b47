"""Factored backward for weight-space adapters: the layer runs once with ``W_eff``, the factors train in rank space.

The dense path (autograd through the reparameterisation) computes the whole weight gradient
``G = dL/dW_eff`` of a layer, a convolution's worth of work, only to contract it with small factors. For an
update of the form ``dW = B ⊛ A`` (``A`` an ``r``-output kernel, ``B`` a kernel mixing the ``r`` channels into
the ``O`` outputs, on disjoint kernel axes) the factors' gradients follow without ``G``:

- ``h = layer_A(x)``: ``x`` through ``A`` as a convolution with ``r`` outputs per group (the layer's stride,
  padding, dilation on ``A``'s axes);
- ``dL/dB``: the weight gradient of the ``B`` stage with input ``h`` and output gradient ``dy`` (for LoRA, whose
  ``B`` is a 1x1 kernel, a contraction over batch and voxels);
- ``dL/dA``: the weight gradient of the ``A`` stage with input ``x`` and output gradient ``B^T dy`` (the input
  gradient of the ``B`` stage).

The input gradient is the usual one through ``W_eff`` (one convolution), the forward the usual merged one, so
outputs are bit-identical to the dense path. Per batch element the factored terms cost ``2 r (I k_A + O k_B)``
multiply-adds per output voxel against ``O I k`` for ``G`` (Linear: ``2 r (I + O)`` against ``O I`` per
token). PaCA (Woo et al. 2025, arXiv 2503.01905) starts from the same observation that PEFT's weight gradient
costs what full fine-tuning's costs; its remedy (train a few columns of ``W``) differs.

DoRA (Liu et al. 2024, arXiv 2402.09353), ``W_eff = m V / ||V||`` with ``V = W0 + dW``: the direction's factors
get the LoRA terms with ``dy`` scaled by ``m / ||V||`` per output channel (folded into ``B``'s rows, so no
output-sized copy of ``dy`` is made), and the magnitude's gradient is a per-channel contraction of ``dy`` with the
layer's output: ``dL/dm_o = sum dy_o (y_o - b_o) / m_o``. With the norm not detached, the norm's term
``-(m dL/dm / ||V||^2) V`` is weight-sized and chains to the factors through autograd. Where the contraction
cannot be used, the magnitude's gradient comes from the dense ``G`` instead (exact, at dense cost): a channel
with ``m = 0`` (checked in backward: one host synchronisation per DoRA layer on a GPU), or an output that a later
in-place operation (``ReLU(inplace=True)``) changed before backward.

Methods declare their factors with :meth:`medlora.adapters.Reparam.factored`:

- ``lora`` (and its fused q/v blocks), ``pissa``/``lora_ga`` (their frozen offset is a constant): ``A`` is the
  ``r x I x k`` kernel, ``B`` the ``O x r`` 1x1 mixing;
- ``lora_c``: ``B`` carries the first kernel axis, ``A`` the others (two separable convolutions);
- ``cp_lora``: ``A`` is the sum-free stack of the ``R`` rank-one kernels ``U_I o U_1 o ... o U_d``, ``B = U_O``. A
  chain of one 1x1 and ``d`` depthwise one-axis convolutions would cost less again (``R (I + sum k)`` per
  voxel) but is ``d + 2`` small memory-bound operations; not done;
- ``conv_lora`` on ``Linear`` and 1D layers, where loralib's ``(O k2..kd) x (I k1)`` view is the plain
  ``O x (I k)`` matricisation. On 2D/3D kernels that view's rows mix input channels and kernel taps of several
  output rows, so ``B A`` is no composition of a convolution of ``x`` with an output mixing: dense path;
- the DoRA wrappers of these.

Which path: :func:`set_backward` (``"auto"``, the default; ``"dense"``; ``"factored"``) for the whole process, or
``reparam.backward_path`` per layer (``None``: follow the process setting). ``"auto"`` picks the factored path
where its multiply-adds are at most :data:`COST_RATIO` of the dense weight gradient's: narrow layers (``O = 16``
at ``r = 8``: no cheaper in principle, and small-channel convolutions run below their flop rate on CPU) stay
dense. The dense path is also taken without gradient mode, when ``W0`` itself trains, under tracing or
``torch.compile``, for ``transformers``' ``Conv1D``, and for any method without factors. Merged inference is
untouched: after ``merge``/``remove`` the layer is a plain layer again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd

from .config import AdapterConfigError

MODES = ("auto", "dense", "factored")

# "auto": factored where its rank-space terms cost at most this share of the dense weight gradient's multiply-adds.
# Measured on 2 CPU cores (docs/benchmarks.md): a 16-channel 3x3x3 layer at r = 2 (flop share 0.26) is ~20 %
# faster factored, at r = 4 (0.52) about as fast as dense, at r = 8 (1.04) slower.
COST_RATIO = 0.6

# The output-channel count below which a convolution runs no faster on CPU (oneDNN's blocking): the direct A stage
# (r outputs per group) is costed as this many.
NARROW_OUTPUTS = 16

_MODE = "auto"


def _check_mode(mode: Any, where: str) -> str:
    if mode not in MODES:
        raise AdapterConfigError(f"{where}: backward path must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


class set_backward:  # noqa: N801  (a function that is also a context manager, like torch.set_grad_enabled)
    """Choose the backward path of every adapted layer: ``"auto"`` (default), ``"dense"`` or ``"factored"``.

    Takes effect at once and stays until changed; used as ``with set_backward("dense"): ...`` it restores the
    previous setting on exit. ``"factored"`` forces the factored path wherever it exists (also on narrow layers);
    a layer's own ``reparam.backward_path`` takes precedence.
    """

    def __init__(self, mode: str) -> None:
        global _MODE
        self.previous = _MODE
        _MODE = _check_mode(mode, "set_backward")

    def __enter__(self) -> set_backward:
        return self

    def __exit__(self, *exc: object) -> None:
        global _MODE
        _MODE = self.previous


def get_backward() -> str:
    """The process-wide backward path set by :func:`set_backward`."""
    return _MODE


@dataclasses.dataclass
class Factors:
    """An adapter's update as ``dW = B ⊛ A`` in canonical layout, plus DoRA's magnitude if any.

    ``a``: ``(r, I/groups, *k_A)``; ``b``: ``(O, r, *k_B)``, scaling included; ``b_axes``: the spatial axes (0-based)
    whose taps ``b`` carries, with size 1 in ``a`` (all other axes have size 1 in ``b``), so that
    ``dW[o, i, k] = sum_j b[o, j, k_B] a[j, i, k_A]``. For DoRA ``b``'s rows are also scaled by ``m / ||V||``
    (detached) and ``magnitude`` is ``m``, ``direction`` ``V = W0 + dW`` (with gradient when the norm is not
    detached), ``norm`` the unclamped ``||V||`` per output channel.
    """

    a: torch.Tensor
    b: torch.Tensor
    b_axes: tuple[int, ...] = ()
    magnitude: torch.Tensor | None = None
    direction: torch.Tensor | None = None
    norm: torch.Tensor | None = None


def low_rank_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, w0: torch.Tensor) -> Factors:
    """The factors of ``s * (B @ A).view(W.shape)``: ``A`` as an ``r``-output kernel, ``B`` a 1x1 mixing."""
    rank = lora_a.shape[0]
    return Factors(a=lora_a.view(rank, *w0.shape[1:]), b=(lora_b * scaling).view(*lora_b.shape, *[1] * (w0.dim() - 2)))


# --- the layer operation and the two stages of B ⊛ A --------------------------------------------------------------


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


# Elements per temporary in the magnitude contraction: no output-sized copy is made.
_CHUNK = 1 << 20


class _Linear:
    """``y = x W^T + b`` over the last axis; the stages are matrix products over all tokens."""

    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def input_grad(self, dy, x_shape, weight):
        return dy @ weight

    def bias_grad(self, dy):
        return dy.reshape(-1, dy.shape[-1]).sum(0)

    def stage_a(self, x, k1):
        return x @ k1.t()

    def stage_b_backward(self, dy, h, k2, x, need_h, need_k2):
        g_h = (dy @ k2) if need_h else None
        g_k2 = (dy.reshape(-1, dy.shape[-1]).t() @ h.reshape(-1, h.shape[-1])) if need_k2 else None
        return g_h, g_k2

    def stage_a_weight_grad(self, x, g_h, k1):
        return g_h.reshape(-1, g_h.shape[-1]).t() @ x.reshape(-1, x.shape[-1])

    def weight_grad(self, x, dy, weight):
        return self.stage_a_weight_grad(x, dy, weight)

    def channel_dot(self, dy, y, bias, acc):
        """``acc[o] += sum over tokens of dy[..., o] (y[..., o] - bias[o])``."""
        dy, y = dy.reshape(-1, dy.shape[-1]), y.reshape(-1, y.shape[-1])
        step = max(1, _CHUNK // max(1, dy.shape[1]))
        for start in range(0, dy.shape[0], step):
            part = y[start:start + step].to(acc.dtype)
            if bias is not None:
                part = part - bias
            acc += (dy[start:start + step].to(acc.dtype) * part).sum(0)

    def costs(self, x_shape, out_channels, rank, factors):
        """Multiply-adds of the dense weight gradient and of one pass of the A and the B stage, and the outputs."""
        tokens, in_channels = math.prod(x_shape[:-1]), x_shape[-1]
        return tokens * out_channels * in_channels, tokens * rank * (in_channels + out_channels), tokens * out_channels


@dataclasses.dataclass(frozen=True)
class _Conv:
    """A (transposed) convolution as ``aten.convolution`` runs it, and the two stages of ``B ⊛ A`` on its geometry."""

    transposed: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...]
    groups: int
    b_axes: tuple[int, ...] = ()

    def _args(self, on_b: bool | None) -> tuple:
        # None: the layer itself; True/False: the B/A stage, which keeps the geometry of its own axes only.
        def pick(values, neutral):
            if on_b is None:
                return list(values)
            return [v if (j in self.b_axes) == on_b else neutral for j, v in enumerate(values)]

        return (pick(self.stride, 1), pick(self.padding, 0), pick(self.dilation, 1), self.transposed,
                pick(self.output_padding, 0), self.groups)

    def _backward(self, dy, x, weight, on_b, mask):
        return torch.ops.aten.convolution_backward(dy, x, weight, None, *self._args(on_b), mask)

    def forward(self, x, weight, bias):
        return torch.ops.aten.convolution(x, weight, bias, *self._args(None))

    def _input_grad_padding(self, weight_shape) -> list[int] | None:
        """Padding of the input gradient run as a forward convolution, or None where that is not done.

        The input gradient of a stride-1 convolution is the convolution of ``dy`` with the per-group transposed,
        flipped kernel and padding ``d (k - 1) - p``. oneDNN's backward-data kernel is slow when ``dy`` has few
        channels (2 CPU cores: 2 -> 2 channels at 64^3 3.9x, 16 -> 2 at 32^3 3x slower than this forward
        convolution; from 16 channels on both take the same time), so layers with fewer than NARROW_OUTPUTS
        outputs take this form.
        """
        out_channels, _, *kernel = weight_shape
        if self.transposed or out_channels >= NARROW_OUTPUTS or any(s != 1 for s in self.stride):
            return None
        adjoint = [d * (k - 1) - p for k, p, d in zip(kernel, self.padding, self.dilation, strict=True)]
        return None if any(p < 0 for p in adjoint) else adjoint

    def input_grad(self, dy, x_shape, weight):
        adjoint = self._input_grad_padding(weight.shape)
        if adjoint is not None:
            ones = [1] * len(adjoint)
            return torch.ops.aten.convolution(dy, self._adjoint_kernel(weight), None, ones, adjoint,
                                              list(self.dilation), False, [0] * len(adjoint), self.groups)
        return self._backward(dy, dy.new_empty(1).expand(x_shape), weight, None, [True, False, False])[0]

    def bias_grad(self, dy):
        return dy.sum(dim=[0, *range(2, dy.dim())])

    def _adjoint_padding(self, kernel) -> list[int] | None:
        """Padding of the A stage run in the adjoint orientation, or None where that orientation does not apply.

        oneDNN runs a convolution with few output channels far below its flop rate (on 2 CPU cores, the weight
        gradient of a 16 -> 2 channel 3x3x3 convolution took 4-6x longer than the same numbers computed as below).
        For a stride-1 A stage (not transposed) the same numbers come from the convolution in the other direction,
        from the r-channel map to the I-channel input, whose output channels are the layer's inputs: with the kernel
        flipped and padding ``p' = d (k - 1) - p``, ``h`` is its input gradient (a transposed convolution of x)
        and ``dL/dA`` its weight gradient against ``x``. A transposed layer's A stage already runs that way.
        """
        if self.transposed:
            return None
        stride, padding, dilation, _, output_padding, _ = self._args(False)
        adjoint = [d * (k - 1) - p for k, p, d in zip(kernel, padding, dilation, strict=True)]
        if any(s != 1 for s in stride) or any(p < 0 for p in adjoint) or any(output_padding):
            return None
        return adjoint

    def _adjoint_kernel(self, k1):
        """``(g r, I/g, *k)`` -> the adjoint convolution's ``(I, r, *k)`` (per group transposed, taps flipped).

        Read as a transposed convolution's weight it maps I to r channels per group, as a convolution's weight r
        (per group) to I channels."""
        g = self.groups
        rows, per_group, *kernel = k1.shape
        w = k1.reshape(g, rows // g, per_group, *kernel).transpose(1, 2).reshape(g * per_group, rows // g, *kernel)
        return w.flip(list(range(2, w.dim())))

    def stage_a(self, x, k1):
        adjoint = self._adjoint_padding(k1.shape[2:])
        if adjoint is None:
            return torch.ops.aten.convolution(x, k1, None, *self._args(False))
        _, _, dilation, _, _, g = self._args(False)
        return torch.ops.aten.convolution(x, self._adjoint_kernel(k1), None, [1] * len(adjoint), adjoint, dilation,
                                          True, [0] * len(adjoint), g)

    def stage_b_backward(self, dy, h, k2, x, need_h, need_k2):
        if h is None:  # B is frozen: only the shape of h is needed
            channels = k2.shape[0] if self.transposed else k2.shape[1] * self.groups
            h = dy.new_empty(1).expand(dy.shape[0], channels, *self.h_spatial(x.shape[2:], dy.shape[2:]))
        g_h, g_k2, _ = self._backward(dy, h, k2, True, [need_h, need_k2, False])
        return g_h, g_k2

    def stage_a_weight_grad(self, x, g_h, k1):
        adjoint = self._adjoint_padding(k1.shape[2:])
        if adjoint is None:
            return self._backward(g_h, x, k1, False, [False, True, False])[1]
        _, _, dilation, _, _, g = self._args(False)
        shape = self._adjoint_kernel(k1).shape
        grad = torch.ops.aten.convolution_backward(x, g_h, x.new_empty(1).expand(shape), None, [1] * len(adjoint),
                                                   adjoint, dilation, False, [0] * len(adjoint), g,
                                                   [False, True, False])[1]
        # back from (I, r, *k): flip the taps, undo the per-group transpose
        grad = grad.flip(list(range(2, grad.dim())))
        rows, per_group, *kernel = k1.shape
        return grad.reshape(g, per_group, rows // g, *kernel).transpose(1, 2).reshape(k1.shape)

    def weight_grad(self, x, dy, weight):
        return self._backward(dy, x, weight, None, [False, True, False])[1]

    def channel_dot(self, dy, y, bias, acc):
        """``acc[o] += sum over samples and voxels of dy[:, o] (y[:, o] - bias[o])``."""
        column = None if bias is None else bias[:, None]
        for dy_n, y_n in zip(dy, y, strict=True):
            dy_n, y_n = dy_n.reshape(dy_n.shape[0], -1), y_n.reshape(y_n.shape[0], -1)
            step = max(1, _CHUNK // max(1, dy_n.shape[0]))
            for start in range(0, dy_n.shape[1], step):
                part = y_n[:, start:start + step].to(acc.dtype)
                if column is not None:
                    part = part - column
                acc += (dy_n[:, start:start + step].to(acc.dtype) * part).sum(1)

    def h_spatial(self, x_spatial, y_spatial):
        # The A stage leaves B's axes at the input's resolution and brings its own to the output's.
        return [x if j in self.b_axes else y for j, (x, y) in enumerate(zip(x_spatial, y_spatial, strict=True))]

    def out_spatial(self, x_spatial, kernel):
        if self.transposed:
            return [(n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, s, p, d, k, op in
                    zip(x_spatial, self.stride, self.padding, self.dilation, kernel, self.output_padding, strict=True)]
        return [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, s, p, d, k in
                zip(x_spatial, self.stride, self.padding, self.dilation, kernel, strict=True)]

    def costs(self, x_shape, out_channels, rank, factors):
        """Multiply-adds of the dense weight gradient and of one pass of the A and the B stage, and the outputs.

        A convolution's weight gradient costs what its forward costs: ``P_out C_out (C_in/g) k`` (transposed:
        ``P_in C_in (C_out/g) k``), ``P`` the voxels of the batch.
        """
        n, in_channels, x_spatial = x_shape[0], x_shape[1], list(x_shape[2:])
        kernel_a, kernel_b = list(factors.a.shape[2:]), list(factors.b.shape[2:])
        kernel = [ka * kb for ka, kb in zip(kernel_a, kernel_b, strict=True)]
        y_spatial = self.out_spatial(x_spatial, kernel)
        h_spatial = self.h_spatial(x_spatial, y_spatial)
        g = self.groups

        def macs(p_in, p_out, c_in, c_out, k):
            voxels, fan = (math.prod(p_in), c_in * (c_out // g)) if self.transposed else \
                (math.prod(p_out), c_out * (c_in // g))
            return n * voxels * fan * math.prod(k)

        dense = macs(x_spatial, y_spatial, in_channels, out_channels, kernel)
        # A strided A stage runs with r outputs per group, which CPU kernels pad to a vector's width (see
        # _adjoint_padding): counted as NARROW_OUTPUTS output channels.
        direct = not self.transposed and self._adjoint_padding(kernel_a) is None
        stage_a = macs(x_spatial, h_spatial, in_channels, g * max(rank, NARROW_OUTPUTS if direct else 1), kernel_a)
        stage_b = macs(h_spatial, y_spatial, g * rank, out_channels, kernel_b)
        return dense, stage_a + stage_b, n * math.prod(y_spatial) * out_channels


def _cost_ratio(op: _Linear | _Conv, x_shape: tuple[int, ...], factors: Factors) -> float:
    """Multiply-adds of the factored terms over those of the dense weight gradient.

    Each stage runs twice in backward (A: forward for ``h`` and weight gradient; B: input and weight gradient);
    DoRA adds one multiply-add per output element for the magnitude.
    """
    dense, one_pass, outputs = op.costs(x_shape, factors.b.shape[0], factors.a.shape[0], factors)
    return (2 * one_pass + (outputs if factors.magnitude is not None else 0)) / max(dense, 1)


class _FactoredLayer(torch.autograd.Function):
    """``y = layer(x; W_eff)``; backward: the input gradient through ``W_eff``, the factors' in rank space."""

    @staticmethod
    def forward(ctx, x, weight, bias, k1, k2, magnitude, direction, norm, op, to_canonical):
        y = op.forward(x, weight, bias)
        ctx.op, ctx.to_canonical, ctx.x_shape = op, to_canonical, x.shape
        keep_x = ctx.needs_input_grad[3] or ctx.needs_input_grad[4] or magnitude is not None
        ctx.save_for_backward(x if keep_x else None, weight, bias, k1, k2, magnitude, direction, norm)
        if magnitude is not None:
            # The output is kept outside save_for_backward so that a later in-place change of it (a
            # ReLU(inplace=True)) shows in its version counter and is handled instead of failing backward.
            ctx.output, ctx.output_version = y.detach(), y._version
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, k1, k2, magnitude, direction, norm = ctx.saved_tensors
        op = ctx.op
        need_x, _, need_bias, need_k1, need_k2, need_m, need_dir = ctx.needs_input_grad[:7]
        dy = dy.contiguous()
        grad_x = op.input_grad(dy, ctx.x_shape, weight) if need_x else None
        grad_bias = op.bias_grad(dy) if need_bias else None
        grad_k1 = grad_k2 = None
        if need_k1 or need_k2:
            h = op.stage_a(x, k1) if need_k2 else None
            g_h, grad_k2 = op.stage_b_backward(dy, h, k2, x, need_k1, need_k2)
            del h
            if need_k1:
                grad_k1 = op.stage_a_weight_grad(x, g_h, k1)
        grad_m = grad_dir = None
        if magnitude is not None and (need_m or need_dir):
            grad_m = _magnitude_grad(ctx, op, x, dy, weight, bias, magnitude, direction, norm)
            if need_dir:
                # ||V|| enters W_eff through clamp_min(tiny), whose gradient vanishes below tiny.
                tiny = _tiny(norm.dtype)
                clamped = norm.clamp_min(tiny)
                coeff = torch.where(norm >= tiny, -magnitude * grad_m / (clamped * clamped), 0.0)
                grad_dir = coeff.view(-1, *[1] * (direction.dim() - 1)) * direction.detach()
        return grad_x, None, grad_bias, grad_k1, grad_k2, grad_m if need_m else None, grad_dir, None, None, None


class _DenseLayer(torch.autograd.Function):
    """``y = layer(x; W_eff)`` with the dense weight gradient, for narrow convolutions that keep the dense path.

    Autograd's own backward would run the same two kernels except for the input gradient, which is computed here
    as a forward convolution where that is faster (:meth:`_Conv._input_grad_padding`); the weight gradient
    reaches the adapter through autograd as on the dense path.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, op):
        ctx.op, ctx.x_shape = op, x.shape
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return op.forward(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        op = ctx.op
        dy = dy.contiguous()
        grad_x = op.input_grad(dy, ctx.x_shape, weight) if ctx.needs_input_grad[0] else None
        grad_w = op.weight_grad(x, dy, weight) if ctx.needs_input_grad[1] else None
        grad_b = op.bias_grad(dy) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def _magnitude_grad(ctx, op, x, dy, weight, bias, magnitude, direction, norm):
    """``dL/dm_o = sum dy_o (y_o - b_o) / m_o``; from the dense ``G`` for ``m_o = 0`` or a changed output."""
    intact = ctx.output._version == ctx.output_version
    zero = magnitude == 0
    dense = None
    if not intact or bool(zero.any()):
        g = ctx.to_canonical(op.weight_grad(x, dy, weight))
        dense = (g.flatten(1) * direction.detach().flatten(1)).sum(1) / norm.clamp_min(_tiny(norm.dtype))
        if not intact:
            return dense.to(magnitude.dtype)
    acc = torch.zeros(magnitude.shape[0], dtype=torch.promote_types(magnitude.dtype, torch.float32),
                      device=magnitude.device)
    op.channel_dot(dy, ctx.output, None if bias is None else bias.to(acc.dtype), acc)
    grad = acc / torch.where(zero, 1.0, magnitude.to(acc.dtype))
    if dense is not None:
        grad = torch.where(zero, dense.to(acc.dtype), grad)
    return grad.to(magnitude.dtype)


# --- routing a layer's forward ----------------------------------------------------------------------------------


def _layer_op(module: nn.Module, x: torch.Tensor, output_size: Any) -> tuple[torch.Tensor, Any, bool] | None:
    """``(input as the operation sees it, operation, unbatched)``, or None for a call the dense path should take.

    A convolution that pads itself (non-zero padding modes, ``"same"`` with an even total) gets its input padded
    here as torch's own forward pads it; the operation then pads with zeros symmetrically.
    """
    if isinstance(module, nn.Linear):
        return x, _Linear(), False
    if not isinstance(module, _ConvNd):
        return None
    d = len(module.kernel_size)
    if x.dim() not in (d + 1, d + 2):
        return None
    unbatched = x.dim() == d + 1
    if unbatched:
        x = x.unsqueeze(0)
    if module.transposed:
        if module.padding_mode != "zeros":
            return None  # torch's own forward refuses these with its message
        output_padding = module._output_padding(x, output_size, module.stride, module.padding, module.kernel_size,
                                                d, module.dilation)
        return x, _Conv(True, tuple(module.stride), tuple(module.padding), tuple(module.dilation),
                        tuple(output_padding), module.groups), unbatched
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0,) * d
    elif module.padding == "valid":
        padding = (0,) * d
    elif module.padding == "same":
        # torch's rule: d (k - 1) in total per axis, an odd remainder on the far side.
        total = [dil * (k - 1) for dil, k in zip(module.dilation, module.kernel_size, strict=True)]
        padding = tuple(t // 2 for t in total)
        if any(t % 2 for t in total):
            x = F.pad(x, [v for t in reversed(total) for v in (0, t % 2)])
    else:
        padding = tuple(module.padding)
    return x, _Conv(False, tuple(module.stride), padding, tuple(module.dilation), (0,) * d, module.groups), unbatched


def _mode_of(reparam: nn.Module) -> str:
    return getattr(reparam, "backward_path", None) or _MODE


def _plan(module: nn.Module, x: torch.Tensor, output_size: Any) -> tuple | None:
    """``(reparam, factors, input, operation, unbatched)`` for the factored path (``factors`` None: the dense weight
    gradient in :class:`_DenseLayer`), or None for the layer's own forward and autograd."""
    plist = module.parametrizations["weight"]
    reparam = plist[0]
    mode = _mode_of(reparam)
    if mode == "dense" or len(plist) != 1 or plist.original.requires_grad:
        return None
    routed = _layer_op(module, x, output_size)
    if routed is None:
        return None
    x, op, unbatched = routed
    factors = reparam.factored(reparam.layout.to_canonical(plist.original))
    if factors is not None:
        if isinstance(op, _Conv):
            op = dataclasses.replace(op, b_axes=tuple(factors.b_axes))
        if mode == "factored" or _cost_ratio(op, tuple(x.shape), factors) <= COST_RATIO:
            return reparam, factors, x, op, unbatched
    shape = reparam.layout.canonical_shape(plist.original.shape)
    if isinstance(op, _Conv) and op._input_grad_padding(shape) is not None:
        return reparam, None, x, op, unbatched
    return None


def _factored_call(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The layer's output through :class:`_FactoredLayer`, or None where the dense path is to be taken."""
    if not torch.is_grad_enabled() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return None
    if torch.compiler.is_compiling():
        return None
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    if isinstance(module, nn.Linear) and len(args) + len(kwargs) != 1:
        return None
    if type(x) is not torch.Tensor and torch.overrides.has_torch_function((x,)):
        # A tensor subclass (MONAI's MetaTensor): the computation runs on the plain tensor (MetaTensor's own
        # ``new_empty`` rejects the size arguments aten passes), and the subclass wraps the output as it wraps the
        # dense path's convolution, metadata included.
        output_size = args[1] if len(args) > 1 else kwargs.get("output_size")
        return torch.overrides.handle_torch_function(_plain_tensor_call, (x,), module, x, output_size)
    output_size = args[1] if len(args) > 1 else kwargs.get("output_size")
    return _plain_tensor_call(module, x, output_size)


def _plain_tensor_call(module: nn.Module, x: torch.Tensor, output_size: Any) -> torch.Tensor | None:
    if type(x) is not torch.Tensor:
        x = x.as_subclass(torch.Tensor)
    reparam = module.parametrizations["weight"][0]
    if not any(p.requires_grad for p in reparam.parameters()):
        return None
    plan = _plan(module, x, output_size)
    if plan is None:
        return None
    reparam, factors, x, op, unbatched = plan
    layout = reparam.layout
    w0 = module.parametrizations["weight"].original
    if factors is None:
        return _dense_call(module, reparam(w0), x, op, unbatched)
    with torch.no_grad():
        weight = reparam(w0)  # exactly the dense path's forward weight
    groups = getattr(module, "groups", 1)
    a = factors.a.repeat(groups, *[1] * (factors.a.dim() - 1)) if groups > 1 else factors.a
    k1, k2 = layout.from_canonical(a), layout.from_canonical(factors.b)
    if isinstance(op, _Linear):
        k1, k2 = k1.reshape(k1.shape[0], -1), k2.reshape(k2.shape[0], -1)
    bias = module.bias
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:  # what autocast does to the layer's own convolution / linear: compute in its lower precision
        cast = torch.get_autocast_dtype(device_type)
        x, weight, k1, k2 = x.to(cast), weight.to(cast), k1.to(cast), k2.to(cast)
        bias = None if bias is None else bias.to(cast)
    dora = factors.magnitude is not None
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        y = _FactoredLayer.apply(x, weight, bias, k1, k2, factors.magnitude, factors.direction if dora else None,
                                 factors.norm if dora else None, op, layout.to_canonical)
    return y.squeeze(0) if unbatched else y


def _dense_call(module: nn.Module, weight: torch.Tensor, x: torch.Tensor, op: _Conv, unbatched: bool) -> torch.Tensor:
    bias = module.bias
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        cast = torch.get_autocast_dtype(device_type)
        x, weight, bias = x.to(cast), weight.to(cast), None if bias is None else bias.to(cast)
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        y = _DenseLayer.apply(x, weight, bias, op)
    return y.squeeze(0) if unbatched else y


def install(module: nn.Module) -> None:
    """Route an adapted layer's forward through the factored path where it applies (called by ``inject``).

    The forward is set on the class that ``torch.nn.utils.parametrize`` made for this parametrised layer, so that
    ``merge``/``remove`` (which restore the plain class) take it away again and deep copies keep it; it falls back
    to the layer type's own forward whenever the dense path is to be taken.
    """
    if not isinstance(module, (nn.Linear, _ConvNd)):
        return
    cls = type(module)
    if getattr(cls.__dict__.get("forward"), "medlora_factored", False):
        return
    plain_forward = cls.__mro__[1].forward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        y = _factored_call(self, args, kwargs)
        return plain_forward(self, *args, **kwargs) if y is None else y

    forward.medlora_factored = True  # type: ignore[attr-defined]
    forward.__doc__ = plain_forward.__doc__
    cls.forward = forward


def backward_path(module: nn.Module, input_shape: tuple[int, ...] | torch.Size) -> str:
    """``"factored"`` or ``"dense"``: the path an adapted layer takes in training on an input of this shape.

    Follows the layer's ``backward_path``, the process setting and, for ``"auto"``, the cost model; assumes the
    run-time conditions of the module docstring (gradient mode, no tracing) are met.
    """
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(module, "weight") or not getattr(type(module).forward, "medlora_factored",
                                                                        False):
        return "dense"
    with torch.no_grad():
        plan = _plan(module, torch.empty(tuple(input_shape), device="meta"), None)
    return "dense" if plan is None or plan[1] is None else "factored"


def cost_ratio(module: nn.Module, input_shape: tuple[int, ...] | torch.Size) -> float | None:
    """The cost model's ratio for an adapted layer on an input of this shape (``"auto"`` goes factored where it is at
    most :data:`COST_RATIO`), or None where the layer has no factored form."""
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(module, "weight"):
        return None
    with torch.no_grad(), set_backward("factored"):
        reparam = module.parametrizations["weight"][0]
        saved, reparam.backward_path = reparam.backward_path, None
        try:
            plan = _plan(module, torch.empty(tuple(input_shape), device="meta"), None)
        finally:
            reparam.backward_path = saved
    if plan is None or plan[1] is None:
        return None
    _, factors, x, op, _ = plan
    return _cost_ratio(op, tuple(x.shape), factors)
