"""One layer evaluated with a different weight per row: convolutions, transposed convolutions and Linear layers.

Convolutions (every ``nn.ConvNd`` / ``nn.ConvTransposeNd``: groups, stride, dilation, padding and padding modes as
the layer has them). Three strategies compute the same numbers:

* ``grouped`` (default): one grouped convolution. Blocked rows (S adapters, B rows each) become a batch of B with
  the S adapters' channels side by side, ``groups = S * g``, weights ``cat_s W_s``; any other routing becomes one
  row of ``N * C`` channels with ``groups = N * g`` and one gathered weight per row. This is the conv form of
  S-LoRA/Punica's batched gather (arXiv 2311.03285; punica ``bgmv``), written out as in
  ``reference/federated_and_beyond.md`` section 3.4.
* ``vmap``: ``torch.func.vmap`` of the functional convolution over the adapters (blocked) or the rows, which
  PyTorch's batching rule for convolution lowers to the same grouped convolution
  (``BatchRulesConvolution.cpp``: a batched weight folds into ``groups``).
* ``loop``: one convolution per adapter on its rows (PEFT's ``_mixed_batch_forward``).

Linear layers: when every adapter present is LoRA-shaped (``W0 + sum_j s_j B_j A_j``), the base product runs
once for all rows and the adapters' factors are gathered per row (blocked: one ``bmm`` per factor), S-LoRA's
shrink-then-expand; ranks differ freely (factors are zero-padded to the largest, which adds exact zeros).
Otherwise each adapter's dense effective weight: one ``bmm`` (blocked) or one matmul per adapter's rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .routing import Routing

STRATEGIES = ("grouped", "vmap", "loop")

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_operator(module: nn.modules.conv._ConvNd, x: torch.Tensor,
                  output_size: Sequence[int] | None = None) -> tuple[torch.Tensor, Callable]:
    """``(x', op)`` with ``op(x', weight, bias, groups)`` the layer's own convolution at ``groups`` groups.

    Mirrors ``_ConvNd._conv_forward`` / ``_ConvTransposeNd.forward``: a non-zero padding mode pads ``x`` first
    (``x'``) and convolves with zero padding; a transposed layer's ``output_padding`` comes from the layer's own
    ``_output_padding`` (which honours ``output_size``).
    """
    d = x.dim() - 2
    if module.transposed:
        pad = module._output_padding(x, output_size, module.stride, module.padding, module.kernel_size, d,
                                     module.dilation)
        fn = _CONV_T[d]

        def op(inp, w, b, groups):
            return fn(inp, w, b, module.stride, module.padding, pad, groups, module.dilation)

        return x, op
    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0,) * d
    fn = _CONV[d]

    def op(inp, w, b, groups):
        return fn(inp, w, b, module.stride, padding, module.dilation, groups)

    return x, op


def _stack_bias(biases: Sequence[torch.Tensor | None], out: int, like: torch.Tensor) -> torch.Tensor | None:
    if all(b is None for b in biases):
        return None
    return torch.stack([b if b is not None else like.new_zeros(out) for b in biases])


def split_rows(routing: Routing, x: torch.Tensor) -> list[torch.Tensor]:
    """Each slot's rows of ``x`` (views in the blocked layout)."""
    if routing.block is not None:
        return list(x.split(routing.block))
    return [x.index_select(0, idx) for idx in routing.segments(x.device)]


def join_rows(routing: Routing, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The inverse of :func:`split_rows`."""
    y = torch.cat(list(parts))
    order = routing.gather_order(y.device)
    return y if order is None else y.index_select(0, order)


def mixed_conv(module: nn.modules.conv._ConvNd, x: torch.Tensor, routing: Routing,
               weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
               strategy: str = "grouped", output_size: Sequence[int] | None = None) -> torch.Tensor:
    """The layer on ``x`` with row i computed with ``weights[routing.index[i]]`` (stored layout) and that bias."""
    x, op = conv_operator(module, x, output_size)
    g = module.groups
    if len(weights) == 1:
        return op(x, weights[0], biases[0], g)
    if strategy == "loop":
        return join_rows(routing, [op(xs, w, b, g) for xs, w, b in zip(split_rows(routing, x), weights, biases,
                                                                        strict=True)])
    n, c, *spatial = x.shape
    w_stack = torch.stack(list(weights))
    out_channels = w_stack.shape[2] * g if module.transposed else w_stack.shape[1]
    b_stack = _stack_bias(biases, out_channels, w_stack)
    if routing.block is not None:
        s, b = len(weights), routing.block
        if strategy == "vmap":
            xs = x.view(s, b, c, *spatial)
            y = _vmap_conv(op, g, xs, w_stack, b_stack)
            return y.reshape(n, *y.shape[2:])
        xg = x.view(s, b, c, *spatial).transpose(0, 1).reshape(b, s * c, *spatial)
        bias = None if b_stack is None else b_stack.flatten()
        y = op(xg, w_stack.flatten(0, 1), bias, s * g)
        return y.view(b, s, -1, *y.shape[2:]).transpose(0, 1).reshape(n, -1, *y.shape[2:])
    index = routing.index_on(x.device)
    w_rows = w_stack.index_select(0, index)
    b_rows = None if b_stack is None else b_stack.index_select(0, index)
    if strategy == "vmap":
        y = _vmap_conv(op, g, x.unsqueeze(1), w_rows, b_rows)
        return y.squeeze(1)
    bias = None if b_rows is None else b_rows.flatten()
    y = op(x.reshape(1, n * c, *spatial), w_rows.flatten(0, 1), bias, n * g)
    return y.view(n, -1, *y.shape[2:])


def _vmap_conv(op: Callable, groups: int, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if b is None:
        return torch.func.vmap(lambda xi, wi: op(xi, wi, None, groups))(x, w)
    return torch.func.vmap(lambda xi, wi, bi: op(xi, wi, bi, groups))(x, w, b)


def mixed_linear(x: torch.Tensor, routing: Routing, weights: Sequence[torch.Tensor],
                 biases: Sequence[torch.Tensor | None], factors: Sequence[list] | None = None,
                 base: torch.Tensor | None = None, strategy: str = "grouped") -> torch.Tensor:
    """``F.linear`` on ``x`` (rows first, features last) with row i using ``weights[routing.index[i]]``
    (canonical ``O x I``) and that bias.

    ``factors`` (optional): per slot a list of ``(A: r x I, B: O x r, s)`` with that slot's weight equal to
    ``base + sum s B A``; then only ``base`` is multiplied densely and the factors are gathered per row.
    """
    if len(weights) == 1:
        return F.linear(x, weights[0], biases[0])
    if strategy == "loop":
        return join_rows(routing, [F.linear(xs, w, b) for xs, w, b in zip(split_rows(routing, x), weights, biases,
                                                                           strict=True)])
    rows, features = x.shape[0], x.shape[-1]
    lead = x.shape[1:-1]
    x3 = x.reshape(rows, -1, features)
    out = weights[0].shape[0]
    same_bias = all(b is biases[0] for b in biases)
    if factors is not None and base is not None:
        y = F.linear(x3, base, biases[0] if same_bias else None)
        a_stack, b_stack = _padded_factors(factors, features, out, like=base)
        if a_stack is not None:
            if routing.block is not None:
                s = len(factors)
                xs = x3.reshape(s, -1, features)
                delta = torch.bmm(torch.bmm(xs, a_stack.transpose(1, 2)), b_stack.transpose(1, 2))
                y = y + delta.reshape_as(y)
            else:
                index = routing.index_on(x.device)
                t = torch.einsum("nti,nri->ntr", x3, a_stack.index_select(0, index))
                y = y + torch.einsum("ntr,nor->nto", t, b_stack.index_select(0, index))
    elif routing.block is not None:
        s = len(weights)
        w_stack = torch.stack(list(weights))
        y = torch.bmm(x3.reshape(s, -1, features), w_stack.transpose(1, 2)).reshape(rows, -1, out)
        if same_bias and biases[0] is not None:
            y = y + biases[0]
    else:
        return join_rows(routing, [F.linear(xs, w, b) for xs, w, b in zip(split_rows(routing, x), weights, biases,
                                                                           strict=True)])
    if not same_bias:
        b_stack = _stack_bias(biases, out, weights[0])
        y = y + b_stack.index_select(0, routing.index_on(x.device)).unsqueeze(1)
    return y.reshape(rows, *lead, out)


def _padded_factors(factors: Sequence[list], features: int, out: int,
                    like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per slot ``[A_1; A_2; ...]`` (r x I) and ``[s_1 B_1, s_2 B_2, ...]`` (O x r), zero-padded to one rank."""
    per_slot = []
    for terms in factors:
        if terms:
            a = torch.cat([t[0] for t in terms])
            b = torch.cat([t[1] * t[2] for t in terms], dim=1)
        else:
            a, b = like.new_zeros(0, features), like.new_zeros(out, 0)
        per_slot.append((a, b))
    rank = max(a.shape[0] for a, _ in per_slot)
    if rank == 0:
        return None, None
    a_stack = torch.stack([F.pad(a, (0, 0, 0, rank - a.shape[0])) for a, _ in per_slot])
    b_stack = torch.stack([F.pad(b, (0, rank - b.shape[1])) for _, b in per_slot])
    return a_stack, b_stack
