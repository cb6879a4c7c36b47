"""FlyLoRA: a frozen sparse random down-projection with top-k routing over the rank components.

Zou et al., "FlyLoRA: Boosting Task Decoupling and Parameter Efficiency via Implicit Rank-Wise Mixture-of-Experts",
NeurIPS 2025 (official code gfyddha/FlyLoRA, ``flylora.py``). Inspired by the fly olfactory circuit:

    y = A x,   S = top-k indices of |y + d|,   output = W0 x + (alpha / r) * B (y * 1[S])

``A: r x (I*prod k)`` is frozen, each row with ``p = max(1, int(rho * n))`` nonzeros drawn from ``N(0, 1/r^2)``
(``rho = k / r`` by default); ``B: O x r`` starts at zero and trains; ``d`` (r) is a routing bias that is not
trained by gradient: after each training forward it moves by ``bias_lr * sign(mean(c) - c)`` with ``c`` the
number of tokens (voxels) routed to each component in that forward (the paper's auxiliary-loss-free load balancing).
The update happens per training forward, not per optimiser step: with n micro-batches accumulated into one step
the bias moves n times, and a second forward in training mode (e.g. a closure) moves it again. The official
repository's minimal ``flylora.py`` accumulates the counts over forwards until an explicit ``update_bias()``, which
compares them with ``k / r`` (a frequency, not a count), and its training script never calls it; we follow the
paper's formula instead.
Defaults as the official code: r = 32, k = 8, alpha = 2r; for other ranks k defaults to r // 4 (at least 1),
the same ratio.

The update depends on the input, so it cannot be merged into a plain weight: the method is registered with
``mergeable=False`` and ``merge`` raises. The weight itself is left as ``W0`` (the reparameterisation is the
identity) and the branch is added by a forward hook. On a convolution (the reference calls FlyLoRA MAYBE there)
``A`` acts as the layer's own convolution (same stride, padding, dilation) into r channels, routing is top-k
over those r channels per output position, and ``B`` is a 1x1 convolution; grouped and transposed convolutions
are refused. ``lora_A`` and ``d`` are buffers and travel in adapter files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Reparam
from ..config import option, register_method
from ..layout import _is_hf_conv1d


@dataclass
class FlyLoRAOptions:
    top_k: int | None = option(
        None, "number k of rank components each token/voxel activates; None: max(1, r // 4), the official 8 of r = 32"
    )
    sparsity_ratio: float | None = option(None, "fraction rho of nonzeros per row of A; None: top_k / r")
    bias_lr: float = option(1e-3, "step u of the routing-bias update d += u sign(mean(c) - c) in training")


@register_method(
    "flylora",
    label="FlyLoRA",
    family="shared-basis",
    options=FlyLoRAOptions,
    summary="FlyLoRA: frozen sparse random A, top-k routing of the r components per token, trainable B",
    citation="Zou et al. 2025 (NeurIPS), official code gfyddha/FlyLoRA",
    alpha_over_rank=2.0,
    mergeable=False,
    trains="lora_B (O x r); lora_A frozen sparse random, routing bias d updated without gradient",
    layer_types="Linear, ConvNd (groups=1)",
)
class FlyLoRA(Reparam):
    saved_buffers = ("lora_A", "route_bias")

    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: FlyLoRAOptions) -> None:
        super().__init__()
        top_k = options.top_k if options.top_k is not None else max(1, rank // 4)
        if not 1 <= top_k <= rank:
            raise ValueError(f"flylora: top_k must be in 1..rank={rank}, got {top_k}")
        fan_in = math.prod(w0.shape[1:])
        rho = options.sparsity_ratio if options.sparsity_ratio is not None else top_k / rank
        p = max(1, int(fan_in * rho))
        a = torch.zeros(rank, fan_in, dtype=w0.dtype, device=w0.device)
        for row in range(rank):
            cols = torch.randperm(fan_in, device=w0.device)[:p]
            a[row, cols] = torch.randn(p, dtype=w0.dtype, device=w0.device) / rank
        self.register_buffer("lora_A", a)
        self.register_buffer("route_bias", torch.zeros(rank, dtype=w0.dtype, device=w0.device))
        self.lora_B = nn.Parameter(torch.zeros(w0.shape[0], rank, dtype=w0.dtype, device=w0.device))
        self.rank, self.top_k, self.bias_lr, self.scaling = rank, top_k, options.bias_lr, scaling
        self._hook = None

    def effective(self, w0: torch.Tensor) -> torch.Tensor:
        return w0

    def attach(self, module: nn.Module) -> None:
        conv = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        if not (isinstance(module, nn.Linear) or _is_hf_conv1d(module) or conv) or (conv and module.groups != 1):
            raise ValueError(f"flylora: {type(module).__name__} (groups={getattr(module, 'groups', 1)}) is not "
                             "supported; FlyLoRA adapts Linear and ungrouped Conv1d/2d/3d layers")
        self._hook = module.register_forward_hook(self._branch)

    def detach(self, module: nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def route(self, y: torch.Tensor, dim: int) -> torch.Tensor:
        """``y`` with all but the top-k components (by ``|y + d|`` along ``dim``) zeroed; updates ``d`` in training."""
        shape = [1] * y.dim()
        shape[dim] = self.rank
        chosen = (y + self.route_bias.view(shape)).abs().topk(self.top_k, dim=dim).indices
        mask = torch.zeros_like(y).scatter_(dim, chosen, 1.0)
        if self.training:
            with torch.no_grad():
                counts = torch.bincount(chosen.flatten(), minlength=self.rank).to(self.route_bias.dtype)
                self.route_bias.add_(self.bias_lr * torch.sign(counts.mean() - counts))
        return y * mask

    def _branch(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kernel = a.view(self.rank, *module.parametrizations["weight"].original.shape[1:])
            y = self.route(module._conv_forward(x, kernel, None), dim=1)
            extra = torch.einsum("or,nr...->no...", b, y)
        else:
            extra = F.linear(self.route(F.linear(x, a), dim=-1), b)
        return output + extra * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}"
