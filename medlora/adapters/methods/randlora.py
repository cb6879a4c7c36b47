"""RandLoRA: a full-rank update from shared frozen random bases and small trainable diagonal scalings.

Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large models", ICLR 2025,
arXiv 2502.00987. For a layer with canonical weight ``O x n`` (n = I*prod k), ``lo = min(O, n)``,
``hi = max(O, n)`` and ``N = ceil(lo / r)`` bases (so that ``N r >= lo``: the update can reach full rank):

    M  = sum_i B_i diag(lambda_i) A diag(gamma_i)        (hi x lo),     dW = s * M   (n <= O)
                                                                        dW = s * M^T (n > O)

with frozen random ``B_i: hi x r`` and one frozen random ``A: r x lo`` shared by the N bases (the authors' and
PEFT's memory-saving choice), trainable ``lambda: r x N`` and ``gamma: N x lo``, ``s = alpha / r``. The bases
are drawn once per ``inject`` at the largest shapes of the selected layers and sliced per layer, as PEFT's
``randlora``: ``A`` is stored ``(r, 1, lo_max)``, ``B`` is ``(hi_max, N_max, r)``, and the i-th B basis pairs
with the A rows in PEFT's flattening order (``B.flatten(1) @ (lambda[:, :, None] * A * gamma).flatten(0, 1)``;
since the bases are i.i.d. random this is the paper's sum with the random columns relabelled). Defaults as
PEFT: r = 32, alpha = 640 (s = 20), ``lambda = 0`` and ``gamma = 1 / max(N, lo)`` so training starts at ``W0``
(the authors' code zeroes gamma and sets lambda constant instead: also ``W0``). Dense bases are kaiming-uniform
(a = sqrt 5) drawn in bfloat16 from ``seed`` and divided by their standard deviation, the same numbers as PEFT
for the same ``projection_prng_key``; ``sparse``/``very_sparse`` give ternary bases (density 1/3 and
``1/sqrt(lo_max)``). PEFT's custom autograd function, which avoids storing the scaled A, is not used: autograd
keeps the ``r x N x lo`` scaled basis, small for convolution kernels. Convolutions use the ``O x (I*prod k)``
matricisation (PEFT's RandLoRA takes Linear only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..base import AdditiveReparam
from ..config import AdapterConfig, option, register_method
from ..peft_interop import PeftFormat, register_peft_format
from ..shared import SharedState


@dataclass
class RandLoRAOptions:
    seed: int = option(0, "seed of the shared frozen random bases (PEFT's projection_prng_key)")
    sparse: bool = option(False, "ternary {-1, 0, 1} bases with density 1/3 (then divided by their std)")
    very_sparse: bool = option(False, "ternary bases with density 1/sqrt(min dimension) (overrides sparse)")
    save_projection: bool = option(True, "store the bases in adapter files; False: regenerate them from seed")


def n_bases(out_features: int, in_features: int, rank: int) -> int:
    return math.ceil(min(out_features, in_features) / rank)


def _kaiming_bf16(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.bfloat16)
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)


def _ternary(shape: tuple[int, ...], generator: torch.Generator, sparsity: float) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, dtype=torch.float32)
    out = torch.zeros(shape, dtype=torch.float32)
    out[u < 1 / (2 * sparsity)] = -1
    out[u > 1 - 1 / (2 * sparsity)] = 1
    return out


def build_randlora_bases(layers: list[tuple[str, torch.Tensor, AdapterConfig]], config: AdapterConfig) -> SharedState:
    options = config.method_options()
    like = layers[0][1]
    rank = max(own.rank for _, _, own in layers)
    fan_out = max(w0.shape[0] for _, w0, _ in layers)
    fan_in = max(math.prod(w0.shape[1:]) for _, w0, _ in layers)
    hi, lo = max(fan_out, fan_in), min(fan_out, fan_in)
    n = math.ceil(lo / min(own.rank for _, _, own in layers))
    generator = torch.Generator(device="cpu").manual_seed(options.seed)
    if options.sparse or options.very_sparse:
        sparsity = math.sqrt(lo) if options.very_sparse else 3
        a = _ternary((rank, 1, lo), generator, sparsity)
        b = _ternary((hi, n, rank), generator, sparsity)
    else:
        a = _kaiming_bf16((rank, 1, lo), generator)
        b = torch.cat([_kaiming_bf16((hi, 1, rank), generator) for _ in range(n)], dim=1)
    a, b = a / a.std(), b / b.std()
    return SharedState.frozen_bases(config, layers, like, options.save_projection, randlora_A=a, randlora_B=b)


@register_method(
    "randlora",
    label="RandLoRA",
    family="shared-basis",
    options=RandLoRAOptions,
    summary="RandLoRA: full-rank sum of shared frozen random bases with trainable diagonal scalings",
    citation="Albert et al. 2025, arXiv 2502.00987",
    alpha_over_rank=20.0,
    trains="randlora_lambda (r x N), randlora_gamma (N x min(O, I*prod k)); bases frozen and shared",
    shared=build_randlora_bases,
)
class RandLoRA(AdditiveReparam):
    shared: SharedState

    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: RandLoRAOptions,
                 shared: SharedState) -> None:
        super().__init__(scaling)
        self.rank, self.out_features, self.fan_in = rank, w0.shape[0], math.prod(w0.shape[1:])
        lo = min(self.out_features, self.fan_in)
        self.n_bases = n_bases(self.out_features, self.fan_in, rank)
        factory = {"dtype": w0.dtype, "device": w0.device}
        self.randlora_lambda = nn.Parameter(torch.zeros(rank, self.n_bases, **factory))
        self.randlora_gamma = nn.Parameter(torch.full((self.n_bases, lo), 1 / max(self.n_bases, lo), **factory))

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        lo, hi = min(self.out_features, self.fan_in), max(self.out_features, self.fan_in)
        a = self.shared.randlora_A[: self.rank, : self.n_bases, :lo]
        b = self.shared.randlora_B[:hi, : self.n_bases, : self.rank]
        scaled_a = self.randlora_lambda[:, :, None] * a * self.randlora_gamma[None]
        m = b.flatten(1) @ scaled_a.flatten(0, 1)
        if self.fan_in > self.out_features:
            m = m.T
        return (m * self.scaling).reshape(w0.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bases={self.n_bases}"


# PEFT's RANDLORA format (medlora.adapters.peft_interop): per layer lambda and gamma, plus each layer's view of the
# shared bases (PEFT writes them; medlora reads the model-wide copy); alpha is randlora_alpha.
_SHARED_KEYS = ("randlora_A", "randlora_B")


def _peft_config(config: AdapterConfig) -> dict[str, Any]:
    options = config.method_options()
    return {"projection_prng_key": options.seed, "save_projection": True, "randlora_alpha": config.resolved_alpha(),
            "randlora_dropout": 0.0, "sparse": options.sparse, "very_sparse": options.very_sparse}


def _peft_options(peft_config: dict[str, Any]) -> tuple[dict[str, Any], float]:
    options = {"seed": peft_config.get("projection_prng_key", 0), "sparse": bool(peft_config.get("sparse", False)),
               "very_sparse": bool(peft_config.get("very_sparse", False)),
               "save_projection": bool(peft_config.get("save_projection", True))}
    return options, float(peft_config.get("randlora_alpha", 640))


def _peft_layer_tensors(reparam: nn.Module, shared: nn.Module) -> dict[str, torch.Tensor]:
    own = {key: getattr(reparam, key) for key in ("randlora_lambda", "randlora_gamma")}
    return {**own, **{key: getattr(shared, key) for key in _SHARED_KEYS}}


register_peft_format("randlora", PeftFormat(
    peft_type="RANDLORA", layer_keys=("randlora_lambda", "randlora_gamma"), shared_keys=_SHARED_KEYS,
    default_rank=32, config=_peft_config, import_options=_peft_options, layer_tensors=_peft_layer_tensors,
))
