"""Uni-LoRA: every LoRA factor of the model is a fixed isometric projection of one trainable vector.

Li et al., "Uni-LoRA: One Vector is All You Need", arXiv 2506.00799 (2025). Concatenate the entries of all
layers' LoRA factors (per layer ``A: r x (I*prod k)`` then ``B: O x r``, layers in module order) into
``theta_D`` (length D). Uni-LoRA sets ``theta_D = P theta_d`` with ``theta_d`` of length d trainable and ``P``
a fixed D x d matrix with one nonzero per row: entry j reads ``theta_d[idx_j]`` scaled by
``1 / sqrt(#{i : idx_i = idx_j})``, which makes the columns of ``P`` orthonormal (an isometry). Each layer then
computes ``dW = (B @ A).view(W.shape)`` with no further scale (``AdapterConfig.alpha`` is ignored, as in PEFT's
``unilora``). The indices are PEFT's balanced assignment: each of the d slots is used ``floor(D/d)`` or
``ceil(D/d)`` times, shuffled with numpy's ``default_rng(seed)``; so the same seed gives PEFT's projection.
``theta_d`` starts uniform in ``[-init_bound, init_bound]``: as in the paper and PEFT, training does **not**
start at ``W0`` (both factors are nonzero). Defaults as PEFT: r = 4, d = 256, seed 42, bound 0.02; the paper's
RoBERTa-base MRPC run uses d = 23,040. Convolutions use the ``O x (I*prod k)`` matricisation (PEFT's
``unilora`` takes Linear only). ``theta_d`` is the only trainable tensor of the whole model; the indices are
regenerated from the seed on load unless ``save_indices``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..base import AdditiveReparam
from ..config import AdapterConfig, option, register_method
from ..peft_interop import PeftFormat, register_peft_format
from ..shared import SharedState


@dataclass
class UniLoRAOptions:
    theta_d_length: int = option(256, "length d of the one trainable vector shared by every adapted layer")
    seed: int = option(42, "seed of the fixed random projection (PEFT's proj_seed)")
    init_bound: float = option(0.02, "theta_d starts uniform in [-init_bound, init_bound] (PEFT's init_theta_d_bound)")
    save_indices: bool = option(False, "store the projection's indices and scales in adapter files")


def balanced_indices(total: int, length: int, seed: int) -> torch.Tensor:
    """``total`` indices into ``range(length)``, each used floor or ceil of ``total/length`` times, shuffled."""
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(length), total // length)
    if total % length:
        data = np.concatenate([data, rng.choice(length, size=total % length, replace=False)])
    rng.shuffle(data)
    return torch.as_tensor(data, dtype=torch.long)


def factor_sizes(w0: torch.Tensor, rank: int) -> tuple[int, int]:
    return rank * math.prod(w0.shape[1:]), w0.shape[0] * rank


def build_unilora_vector(layers: list[tuple[str, torch.Tensor, AdapterConfig]], config: AdapterConfig) -> SharedState:
    options = config.method_options()
    if options.theta_d_length < 1:
        raise ValueError(f"unilora: theta_d_length must be positive, got {options.theta_d_length}")
    like = layers[0][1]
    total = sum(sum(factor_sizes(w0, own.rank)) for _, w0, own in layers)
    indices = balanced_indices(total, options.theta_d_length, options.seed)
    counts = torch.bincount(indices, minlength=options.theta_d_length)
    inv_sqrt = torch.zeros(options.theta_d_length, dtype=torch.float64)
    inv_sqrt[counts > 0] = counts[counts > 0].double().rsqrt()
    shared = SharedState(config, [name for name, _, _ in layers])
    theta = torch.empty(options.theta_d_length, dtype=like.dtype, device=like.device)
    shared.unilora_theta_d = nn.Parameter(theta.uniform_(-options.init_bound, options.init_bound))
    shared.register_buffer("unilora_indices", indices.to(like.device))
    shared.register_buffer("unilora_scales", inv_sqrt[indices].to(like.device, like.dtype))
    shared.saved_buffers = ("unilora_indices", "unilora_scales") if options.save_indices else ()
    shared.next_offset = 0  # handed out to the layers in inject order
    return shared


@register_method(
    "unilora",
    label="Uni-LoRA",
    family="shared-basis",
    options=UniLoRAOptions,
    summary="Uni-LoRA: all layers' LoRA factors are one fixed isometric projection of a single trainable vector",
    citation="Li et al. 2025, arXiv 2506.00799",
    starts_at_base=False,
    trains="unilora_theta_d (d, one vector for the whole model)",
    shared=build_unilora_vector,
)
class UniLoRA(AdditiveReparam):
    shared: SharedState

    def __init__(self, w0: torch.Tensor, *, rank: int, scaling: float, options: UniLoRAOptions,
                 shared: SharedState) -> None:
        super().__init__(1.0)
        self.rank, self.fan_in = rank, math.prod(w0.shape[1:])
        self.size_A, self.size_B = factor_sizes(w0, rank)
        self.offset = shared.next_offset
        shared.next_offset += self.size_A + self.size_B

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's ``lora_A`` (r x I*prod k) and ``lora_B`` (O x r), read from the shared vector."""
        s = self.shared
        values = s.unilora_theta_d[s.unilora_indices[self.offset:self.offset + self.size_A + self.size_B]]
        values = values * s.unilora_scales[self.offset:self.offset + self.size_A + self.size_B]
        a, b = values.split([self.size_A, self.size_B])
        return a.view(self.rank, self.fan_in), b.view(-1, self.rank)

    def delta(self, w0: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return (b @ a).view(w0.shape)


# PEFT's UNILORA format (medlora.adapters.peft_interop): the vector once; per layer the projection's indices and
# scales of its A and B (written always, so the file does not depend on either library's generator; a file without
# them regenerates them from proj_seed over the layers of target_modules); no alpha.
def _peft_config(config: AdapterConfig) -> dict[str, Any]:
    options = config.method_options()
    return {"theta_d_length": options.theta_d_length, "proj_seed": options.seed,
            "init_theta_d_bound": options.init_bound, "save_indices": True, "unilora_dropout": 0.0}


def _peft_options(peft_config: dict[str, Any]) -> tuple[dict[str, Any], None]:
    return {"theta_d_length": peft_config.get("theta_d_length", 256), "seed": peft_config.get("proj_seed", 42),
            "init_bound": peft_config.get("init_theta_d_bound", 0.02),
            "save_indices": bool(peft_config.get("save_indices", False))}, None


def _peft_layer_tensors(reparam: UniLoRA, shared: SharedState) -> dict[str, torch.Tensor]:
    start, stop, sizes = reparam.offset, reparam.offset + reparam.size_A + reparam.size_B, [reparam.size_A,
                                                                                           reparam.size_B]
    idx_a, idx_b = shared.unilora_indices[start:stop].split(sizes)
    sc_a, sc_b = shared.unilora_scales[start:stop].split(sizes)
    return {"unilora_indices_A": idx_a.view(reparam.rank, reparam.fan_in),
            "unilora_indices_B": idx_b.view(-1, reparam.rank),
            "unilora_scales_A": sc_a.view(reparam.rank, reparam.fan_in),
            "unilora_scales_B": sc_b.view(-1, reparam.rank)}


def _peft_load_layers(adapted: list, per_layer: dict[str, dict[str, torch.Tensor]], shared: SharedState,
                      copy: Callable[[torch.Tensor, torch.Tensor, str], None]) -> None:
    if not per_layer:  # indices not saved: the ones regenerated from the seed are PEFT's
        return
    parts = [per_layer[name] for name, _, _ in adapted]
    copy(shared.unilora_indices, torch.cat([p[f"unilora_indices_{f}"].flatten() for p in parts for f in "AB"]),
         "unilora_indices")
    copy(shared.unilora_scales, torch.cat([p[f"unilora_scales_{f}"].flatten() for p in parts for f in "AB"]),
         "unilora_scales")


register_peft_format("unilora", PeftFormat(
    peft_type="UNILORA",
    layer_keys=("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"),
    shared_keys=("unilora_theta_d",), default_rank=4, config=_peft_config, import_options=_peft_options,
    layer_tensors=_peft_layer_tensors, load_layers=_peft_load_layers, targets_from_config=True,
))
