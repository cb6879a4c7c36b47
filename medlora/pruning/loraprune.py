"""LoRAPrune: structured pruning of the base network guided by the adapter's weights and gradients.

Zhang et al., "LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning", arXiv 2305.18403;
official code ``aim-uofa/LoRAPrune`` (``loraprune/utils.py``, ``loraprune/trainer.py``), whose arithmetic this
follows:

* importance of one adapted layer (``compute_sensitivity``, ``prune_metric='lora'``)::

      S = |(G_B A + B G_A - G_B G_A) ⊙ (W0 + s B A)|

  The first factor is ``BA - (B - G_B)(A - G_A)``: how much ``BA`` moves under one unit SGD step on the factors,
  a stand-in for the frozen weight's gradient that never computes it. We evaluate it as
  ``(dW(θ) - dW(θ - G)) / s`` with the layer's own update ``dW``, which is that formula for plain LoRA and gives
  the same quantity for any additive method (fused-qkv LoRA, LoRA-C, ...). ``S`` is summed over each unit's
  rows (producers) or columns (consumers; the official code does this for ``o_proj``/``down_proj`` with
  ``transpose=True``), per head over ``head_dim`` rows, L2-normalised per layer (per layer and group here: one
  of our consumer convolutions reads several groups through a skip concatenation), and summed over the group's
  layers;
* a moving average ``I = 0.9 I + 0.1 S`` after every backward pass, starting from zeros; a step whose
  importance is not finite is skipped (``update_sensitivity_dict``);
* a cubic sparsity schedule (``schedule_sparsity_ratio``): ``init`` during the first ``warmup`` share of the
  steps, ``final`` during the last ``cooldown`` share, ``final + (init - final) (1 - (t - w0 T)/(T - (w0+w1) T))^3``
  in between; every ``frequency`` steps each group masks ``int(size * ratio)`` units of lowest importance
  (``local_prune``).

Deviations, each because the official rule does not carry over as written: the masks zero a unit where it is
consumed, not the producer's output (see :mod:`medlora.pruning.graph`); a unit once masked stays masked (the
official argsort over ``importance * mask`` can swap a masked unit for a kept one of importance 0); the final
ratio is applied at the first step of the cool-down (the official condition ``ratio < final`` never applies it
during training); at least one unit of every group is kept. Groups without any adapted layer have no
importance and are not pruned (the official code prunes only LoRA-adapted layers as well).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..adapters.base import AdditiveReparam
from ..adapters.inject import adapters_of, base_weight
from .graph import ChannelGraph, ChannelGroup, PruningError, channel_graph, mask_hooks

__all__ = ["LoRAPruner", "group_importance", "layer_importance", "schedule_sparsity", "select_keep"]

EMA_BETA = 0.9


def schedule_sparsity(step: int, total: int, final: float, init: float = 0.0, warmup: float = 0.1,
                      cooldown: float = 0.1) -> float:
    """LoRAPrune's cubic schedule: the sparsity to reach at ``step`` of ``total``."""
    if step <= warmup * total:
        return init
    if step > total - cooldown * total:
        return final
    progress = 1.0 - (step - warmup * total) / (total - (warmup + cooldown) * total)
    return final + (init - final) * progress**3


@torch.no_grad()
def layer_importance(module: nn.Module) -> torch.Tensor | None:
    """``|(G_B A + B G_A - G_B G_A) ⊙ (W0 + dW)|`` of an adapted layer, in the canonical ``(O, I, *k)`` layout;
    None when the layer has no additive adapter or its factors have no gradient yet."""
    reparam = adapters_of(module)
    if reparam is None:
        return None
    if not isinstance(reparam, AdditiveReparam):
        raise PruningError(f"LoRAPrune needs additive adapters (lora, lora_c, ...); a {reparam.config.method} "
                           "adapter has no LoRA-guided importance")
    params = [p for p in reparam.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return None
    w0 = reparam.layout.to_canonical(base_weight(module))
    now = reparam.delta(w0)
    saved = [p.detach().clone() for p in params]
    try:
        for p in params:
            p.sub_(p.grad)
        stepped = reparam.delta(w0)
    finally:
        for p, value in zip(params, saved, strict=True):
            p.copy_(value)
    return ((now - stepped) / reparam.scaling * (w0 + now)).abs()


def _slot_scores(score: torch.Tensor, group: ChannelGroup, axis: str, offset: int) -> torch.Tensor:
    n = group.size * group.unit
    if axis == "out":
        per_channel = score[offset:offset + n].reshape(n, -1).sum(1)
    else:
        per_channel = score[:, offset:offset + n].transpose(0, 1).reshape(n, -1).sum(1)
    return per_channel.reshape(group.size, group.unit).sum(1)


def group_importance(model: nn.Module, graph: ChannelGraph) -> dict[str, torch.Tensor]:
    """One step's importance of every group that has an adapted layer: per slot the unit sums of
    :func:`layer_importance`, each L2-normalised, summed over the group's slots."""
    modules = dict(model.named_modules())
    scores: dict[str, torch.Tensor | None] = {}
    out: dict[str, torch.Tensor] = {}
    for g in graph:
        total = None
        for s in g.slots:
            if s.layer not in scores:
                scores[s.layer] = layer_importance(modules[s.layer])
            score = scores[s.layer]
            if score is None:
                continue
            v = _slot_scores(score, g, s.axis, s.offset).double()
            v = v / (torch.linalg.vector_norm(v) + 1e-8)
            total = v if total is None else total + v
        if total is not None:
            out[g.name] = total
    return out


def select_keep(importance: torch.Tensor, sparsity: float, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted units kept at ``sparsity`` (``int(size * sparsity)`` pruned, at least one kept): units not in
    ``kept`` stay pruned, more are pruned in order of lowest importance (ties: lower index first)."""
    size = importance.numel()
    alive = torch.ones(size, dtype=torch.bool) if kept is None else torch.zeros(size, dtype=torch.bool)
    if kept is not None:
        alive[kept] = True
    n_prune = min(int(size * sparsity), size - 1)
    more = n_prune - int((~alive).sum())
    if more > 0:
        candidates = torch.nonzero(alive).reshape(-1)
        order = torch.sort(importance[candidates].cpu(), stable=True).indices
        alive[candidates[order[:more]]] = False
    return torch.nonzero(alive).reshape(-1)


class LoRAPruner:
    """Iterative LoRAPrune during adapter training; call :meth:`step` after each ``backward()``, before the
    optimiser step (it needs the factors' gradients).

    While training, the pruned units are masked (forward pre-hooks on their consumers); :meth:`keep` gives the
    kept units per group for :func:`medlora.pruning.prune_structure` and :meth:`record` the JSON stored in the
    adapter file, which ``medlora prune`` reads.
    """

    def __init__(self, model: nn.Module, sparsity: float, total_steps: int, *, init: float = 0.0,
                 warmup: float = 0.1, cooldown: float = 0.1, frequency: int = 10,
                 graph: ChannelGraph | None = None) -> None:
        if not 0.0 <= init <= sparsity < 1.0:
            raise PruningError(f"sparsity must satisfy 0 <= init ({init}) <= sparsity ({sparsity}) < 1")
        if total_steps < 1 or frequency < 1:
            raise PruningError(f"total_steps ({total_steps}) and frequency ({frequency}) must be positive")
        self.model, self.sparsity, self.total_steps = model, float(sparsity), int(total_steps)
        self.init, self.warmup, self.cooldown, self.frequency = float(init), warmup, cooldown, int(frequency)
        self.graph = graph if graph is not None else channel_graph(model)
        modules = dict(model.named_modules())
        self.prunable = [g.name for g in self.graph
                         if any(adapters_of(modules[s.layer]) is not None for s in g.slots)]
        if not self.prunable:
            raise PruningError("no channel group has an adapted layer: LoRAPrune needs adapters on the layers "
                               "it prunes")
        self.importance = {n: torch.zeros(self.graph.groups[n].size, dtype=torch.float64) for n in self.prunable}
        self.kept = {n: torch.arange(self.graph.groups[n].size) for n in self.prunable}
        self.steps, self.ratio, self.skipped = 0, 0.0, 0
        self._hooks: list = []

    def step(self) -> float:
        """Update the moving importance, prune to the scheduled ratio when due; returns the current ratio."""
        self.steps += 1
        fresh = group_importance(self.model, self.graph)
        if all(n in fresh for n in self.prunable) and all(bool(torch.isfinite(v).all()) for v in fresh.values()):
            for n in self.prunable:
                self.importance[n] = EMA_BETA * self.importance[n] + (1 - EMA_BETA) * fresh[n].cpu()
        else:
            self.skipped += 1
        ratio = schedule_sparsity(self.steps, self.total_steps, self.sparsity, self.init, self.warmup,
                                  self.cooldown)
        due = self.steps % self.frequency == 0 and self.init < ratio < self.sparsity
        if (due or (ratio >= self.sparsity and self.ratio < self.sparsity)) and ratio > self.ratio:
            self.apply(ratio)
        return self.ratio

    def apply(self, ratio: float) -> None:
        """Mask every prunable group to ``ratio`` now."""
        self.ratio = float(ratio)
        for n in self.prunable:
            self.kept[n] = select_keep(self.importance[n], ratio, self.kept[n])
        self.remove_masks()
        self._hooks = mask_hooks(self.model, self.graph, self.kept)

    def keep(self) -> dict[str, torch.Tensor]:
        return {n: k.clone() for n, k in self.kept.items()}

    def remove_masks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def record(self) -> dict[str, Any]:
        """JSON for the adapter file's metadata (``extra["loraprune"]``)."""
        return {
            "paper": "LoRAPrune, arXiv 2305.18403",
            "sparsity": self.sparsity, "reached": self.ratio, "steps": self.steps, "skipped_steps": self.skipped,
            "schedule": {"init": self.init, "warmup": self.warmup, "cooldown": self.cooldown,
                         "frequency": self.frequency, "total_steps": self.total_steps},
            "groups": {n: {"size": self.graph.groups[n].size,
                           "importance": [float(x) if math.isfinite(float(x)) else 0.0 for x in self.importance[n]],
                           "keep": self.kept[n].tolist()} for n in self.prunable},
        }
