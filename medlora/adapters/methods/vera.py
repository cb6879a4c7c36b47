"""VeRA: one pair of frozen random matrices for the whole model, two trainable scaling vectors per layer.

Kopiczko, Blankevoort & Asano, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024, arXiv 2310.11454.
For a layer with canonical weight ``O x (I*prod k)``:

    dW = diag(b) B[:O, :r] diag(d) A[:r, :I*prod k]

``A: r_max x n_max`` and ``B: m_max x r_max`` are drawn once per ``inject`` from ``seed`` (kaiming-uniform with
gain sqrt 2 on each matrix's fan-in, bound ``sqrt(6 / fan_in)``, as PEFT's ``VeraModel``) at the largest fan-in
and output size of the selected layers, and every layer uses its top-left block. ``b`` (O) starts at zero and
``d`` (r) at ``d_initial``, so training starts at ``W0``. There is no alpha: the scale lives in ``b`` and ``d``
(``AdapterConfig.alpha`` is ignored, as PEFT's VeRA has none). The paper uses large ranks (256 for RoBERTa).

Convolutions use the ``O x (I*prod k)`` matricisation, the same one PEFT's conv LoRA uses; PEFT's VeRA itself
takes Linear (and transformers' Conv1D) only. With ``save_projection`` (default, as PEFT) the bases go into
adapter files; otherwise they are regenerated from ``seed`` on load. The bases for a given seed are the same
numbers PEFT draws for the same ``projection_prng_key`` and largest shape.
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
class VeRAOptions:
    d_initial: float = option(0.1, "initial value of every entry of the per-layer vector d (PEFT default 0.1)")
    seed: int = option(0, "seed of the shared frozen random matrices A and B (PEFT's projection_prng_key)")
    save_projection: bool = option(True, "store A and B in adapter files; False: regenerate them from seed")


def kaiming_uniform_gain2(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform on ``[-sqrt(6 / cols), sqrt(6 / cols)]`` (kaiming-uniform, gain sqrt 2, fan-in ``cols``)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(cols)
    return torch.empty(rows, cols, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def build_vera_bases(layers: list[tuple[str, torch.Tensor, AdapterConfig]], config: AdapterConfig) -> SharedState:
    options = config.method_options()
    like = layers[0][1]
    rank = max(own.rank for _, _, own in layers)
    fan_in = max(math.prod(w0.shape[1:]) for _, w0, _ in layers)
    fan_out = max(w0.shape[0] for _, w0, _ in layers)
    generator = torch.Generator(device="cpu").manual_seed(options.seed)
    a = kaiming_uniform_gain2(rank, fan_in, generator)
    b = kaiming_uniform_gain2(fan_out, rank, generator)
    return SharedState.frozen_bases(config, layers, like, options.save_projection, vera_A=a, vera_B=b)


@register_method(
    "vera",
    label="VeRA",
    family="shared-basis",
    options=VeRAOptions,
    summary="VeRA: frozen shared random A, B; trainable per-layer scaling vectors b (O) and d (r)",
    citation="Kopiczko et al. 2024, arXiv 2310.11454",
    trains="vera_lambda_b (O), vera_lambda_d (r); A, B frozen and shared",
    shared=build_vera_bases,
)
class VeRA(AdditiveReparam):
    shared: SharedState

    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: VeRAOptions,
                 shared: SharedState) -> None:
        super().__init__(1.0)
        self.rank, self.fan_in = rank, math.prod(w0.shape[1:])
        self.vera_lambda_b = nn.Parameter(torch.zeros(w0.shape[0], dtype=w0.dtype, device=w0.device))
        self.vera_lambda_d = nn.Parameter(torch.full((rank,), options.d_initial, dtype=w0.dtype, device=w0.device))

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        a = self.shared.vera_A[: self.rank, : self.fan_in]
        b = self.shared.vera_B[: w0.shape[0], : self.rank]
        return ((self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)).view(w0.shape)


# PEFT's VERA format (medlora.adapters.peft_interop): per layer lambda_b, lambda_d; the bases once; no alpha.
def _peft_config(config: AdapterConfig) -> dict[str, Any]:
    options = config.method_options()
    return {"projection_prng_key": options.seed, "save_projection": True, "vera_dropout": 0.0,
            "d_initial": options.d_initial}


def _peft_options(peft_config: dict[str, Any]) -> tuple[dict[str, Any], None]:
    return {"seed": peft_config.get("projection_prng_key", 0), "d_initial": peft_config.get("d_initial", 0.1),
            "save_projection": bool(peft_config.get("save_projection", True))}, None


register_peft_format("vera", PeftFormat(
    peft_type="VERA", layer_keys=("vera_lambda_b", "vera_lambda_d"), shared_keys=("vera_A", "vera_B"),
    default_rank=256, config=_peft_config, import_options=_peft_options,
))
