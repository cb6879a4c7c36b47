"""Several single-class adapters, one answer: output composition and adaptive (LoraHub-style) merging.

Output composition is the baseline that any router or merge of adapters must beat
(``reference/federated_and_beyond.md`` section 4.6). Each adapter was trained for one class (one foreground map); all
of them run over the same input in one mixed-adapter batch of an :class:`~.bank.AdapterBank`, each adapter's own
class map is read from its output, and voxels claimed by several adapters are settled by the highest probability or
by a fixed priority. It is CLoRA (Meral et al., arXiv 2403.19776) reduced to what a one-pass segmenter has: CLoRA
fuses the per-concept passes of a diffusion model through masks taken from each LoRA's own attention maps; here each
adapter's own foreground probability is that mask, and no test-time optimisation of attention is needed.

Adaptive merging follows LoraHub (Huang et al., arXiv 2307.13269) as examined by "The Appeal and Reality of
Recycling LoRAs with Adaptive Merging" (Liu et al., arXiv 2602.12323): one update ``sum_k w_k dW_k`` over a pool of
adapters, the coefficients ``w`` found by a gradient-free search on a few labelled cases. :class:`AdapterDeltas`
holds the pool's weight updates and writes any weighting into a plain copy of the base; :func:`search_coefficients`
is the search. Where we differ from LoraHub's code: LoraHub averages the factors (``A = sum w_k A_k``,
``B = sum w_k B_k``), which adds cross terms ``B_i A_j`` between unrelated adapters; we merge the updates themselves
(exactly what :func:`medlora.adapters.merge_adapters` ``method="linear"`` writes), which works for every method of
the registry, not LoRA alone. LoraHub searches with nevergrad's NGOpt (budget 40, bounds +-1.5, start 0, L1 penalty
0.05 times the mean absolute weight); we use SciPy's bounded Nelder-Mead with the same budget, bounds, start and
penalty, so no new dependency is needed. Per the recycling paper, a merge means something only next to its two
controls: a fresh adapter trained on the same few cases and the same search over randomly initialised adapters
(:func:`random_like`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..inject import base_weight, iter_adapters
from .routing import MultiAdapterError

__all__ = ["FUSION_RULES", "AdapterDeltas", "compose_outputs", "fuse_class_maps", "random_like",
           "search_coefficients"]

FUSION_RULES = ("probability", "priority")


def fuse_class_maps(probs: torch.Tensor, values: Sequence[int] | None = None, *, rule: str = "probability",
                    threshold: float = 0.5, priority: Sequence[int] | None = None) -> torch.Tensor:
    """One label map from per-class foreground probabilities ``probs`` of shape ``(N, K, *spatial)``.

    A voxel is foreground when some class reaches ``threshold``; it then gets ``values[k]`` (default ``k + 1``) of
    the class with the highest probability (``rule="probability"``; the lower k on a tie) or of the first class in
    ``priority`` (indices into the K classes, default 0..K-1) that reaches the threshold (``rule="priority"``).
    """
    if probs.dim() < 2:
        raise MultiAdapterError(f"class maps must be (N, K, *spatial), got shape {tuple(probs.shape)}")
    k = probs.shape[1]
    codes = torch.arange(1, k + 1) if values is None else torch.as_tensor(list(values))
    if codes.numel() != k:
        raise MultiAdapterError(f"{codes.numel()} label values for {k} class maps")
    codes = codes.to(probs.device)
    hit = probs >= threshold
    if rule == "probability":
        owner = torch.argmax(probs, dim=1)
    elif rule == "priority":
        order = list(range(k)) if priority is None else [int(i) for i in priority]
        if sorted(order) != list(range(k)):
            raise MultiAdapterError(f"priority must order the {k} classes 0..{k - 1}, got {order}")
        owner = torch.full(probs.shape[:1] + probs.shape[2:], order[-1], dtype=torch.long, device=probs.device)
        for c in reversed(order):  # the first in priority that reaches the threshold is written last
            owner = torch.where(hit[:, c], torch.full_like(owner, c), owner)
    else:
        raise MultiAdapterError(f"unknown fusion rule {rule!r}; choose one of {', '.join(FUSION_RULES)}")
    return torch.where(hit.any(dim=1), codes[owner], torch.zeros_like(owner))


def compose_outputs(bank: nn.Module, x: torch.Tensor, adapters: Sequence[str], *,
                    channels: Sequence[int] | None = None, values: Sequence[int] | None = None,
                    rule: str = "probability", threshold: float = 0.5,
                    priority: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every adapter of ``adapters`` over the batch ``x`` in one mixed-adapter forward of ``bank`` and fuse
    their class maps (:func:`fuse_class_maps`). Returns ``(labels (N, *spatial), probabilities (N, K, *spatial))``.

    Adapter k's class map is the sigmoid of its output channel ``channels[k]`` (default 0: a one-channel head per
    adapter). The batch is laid out adapter by adapter (the blocked layout, no gather in the routed layers).
    """
    k, n = len(adapters), x.shape[0]
    if k == 0:
        raise MultiAdapterError("compose_outputs: no adapters named")
    chans = [0] * k if channels is None else [int(c) for c in channels]
    if len(chans) != k:
        raise MultiAdapterError(f"compose_outputs: {len(chans)} channels for {k} adapters")
    names = [a for a in adapters for _ in range(n)]
    logits = bank(x.repeat(k, *([1] * (x.dim() - 1))), adapters=names)
    per = logits.reshape(k, n, *logits.shape[1:])
    probs = torch.stack([torch.sigmoid(per[i, :, chans[i]]) for i in range(k)], dim=1)
    return fuse_class_maps(probs, values, rule=rule, threshold=threshold, priority=priority), probs


class AdapterDeltas:
    """The weight updates ``dW_k = W_eff,k - W0`` of K adapted models of one base, and merges of them.

    ``members``: adapted models of ``base`` (any method of the registry; each is read once, with its effective
    weights). ``apply(w)`` writes ``W0 + sum_k w_k dW_k`` into every adapted layer of :attr:`model`, a plain copy of
    the base, and returns it; a layer an adapter does not adapt has ``dW_k = 0``. Only adapted weights are merged:
    state an adapter file carries besides (normalisation statistics) is not.
    """

    def __init__(self, base: nn.Module, members: Sequence[nn.Module]) -> None:
        if not members:
            raise MultiAdapterError("AdapterDeltas: no adapted models given")
        if next(iter_adapters(base), None) is not None:
            raise MultiAdapterError("AdapterDeltas: give the plain base model, not an adapted one")
        self.model = copy.deepcopy(base)
        for p in self.model.parameters():
            p.requires_grad_(False)
        plain = dict(self.model.named_modules())
        per_member: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for m in members:
                deltas = {}
                for name, module, _ in iter_adapters(m):
                    if name not in plain or not hasattr(plain[name], "weight"):
                        raise MultiAdapterError(f"AdapterDeltas: adapted layer {name!r} is not in the base model")
                    deltas[name] = (module.weight - base_weight(module)).detach().clone()
                per_member.append(deltas)
        self.layers = sorted({n for d in per_member for n in d})
        self.w0 = {n: plain[n].weight.detach().clone() for n in self.layers}
        self.deltas = {n: torch.stack([d.get(n, torch.zeros_like(self.w0[n])) for d in per_member])
                       for n in self.layers}
        self.k = len(members)

    def apply(self, weights: Sequence[float]) -> nn.Module:
        w = torch.as_tensor([float(v) for v in weights], dtype=torch.float64)
        if w.numel() != self.k or not torch.isfinite(w).all():
            raise MultiAdapterError(f"AdapterDeltas.apply: need {self.k} finite weights, got {list(weights)}")
        plain = dict(self.model.named_modules())
        with torch.no_grad():
            for n in self.layers:
                d = self.deltas[n]
                upd = torch.tensordot(w.to(d.dtype), d, dims=1)
                plain[n].weight.copy_(self.w0[n] + upd)
        return self.model

    def norms(self) -> list[float]:
        """Frobenius norm of each member's whole update (all layers together)."""
        return [math.sqrt(sum(float(self.deltas[n][k].pow(2).sum()) for n in self.layers)) for k in range(self.k)]


def random_like(adapted: nn.Module, generator: torch.Generator, scale_to: nn.Module | None = None) -> nn.Module:
    """A copy of ``adapted`` whose adapter parameters are all redrawn at random (normal), the recycling paper's
    "randomly initialised LoRAs" control. Every tensor keeps its shape; the LoRA ``B = 0`` start would give no
    update at all, so every factor is drawn. With ``scale_to`` (an adapted model of the same structure) each layer's
    update is rescaled to that model's update norm on the layer, so the search sees updates of the same size as the
    trained pool's; without it, the raw draws (std 1 / sqrt(fan-in of the factor)) are kept."""
    out = copy.deepcopy(adapted)
    ref = {n: m for n, m, _ in iter_adapters(scale_to)} if scale_to is not None else {}
    with torch.no_grad():
        for name, module, reparam in iter_adapters(out):
            for p in reparam.parameters():
                fan = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) / math.sqrt(fan))
            if name in ref:
                w0 = base_weight(module)
                got = (module.weight - w0).norm()
                want = (ref[name].weight - base_weight(ref[name])).norm()
                if got > 0 and want > 0:
                    _scale_update(reparam, float(want / got))
    return out


def _scale_update(reparam: nn.Module, factor: float) -> None:
    """Multiply a LoRA-type update by ``factor`` through its output-side factor (``lora_B``, else every parameter
    whose name ends in B, else the first parameter; exact for any update linear in that factor)."""
    params = dict(reparam.named_parameters())
    target = params.get("lora_B")
    if target is None:
        raise MultiAdapterError(f"random_like(scale_to=...): {type(reparam).__name__} has no lora_B to rescale; "
                                "use a LoRA-type pool or leave scale_to out")
    target.mul_(factor)


def search_coefficients(objective: Callable[[Sequence[float]], float], k: int, *, budget: int = 40,
                        bound: float = 1.5, l1: float = 0.05, start: float = 0.0, step: float = 0.5
                        ) -> tuple[list[float], list[tuple[list[float], float]]]:
    """Gradient-free search of K merge coefficients (LoraHub's setting: start ``start``, box ``[-bound, bound]``,
    ``budget`` objective evaluations, penalty ``l1 * mean|w|`` added to ``objective(w)``) by SciPy's bounded
    Nelder-Mead from the simplex ``start + step * e_i``. Returns the best coefficients seen and every evaluation
    ``(w, penalised value)`` in order."""
    from scipy.optimize import minimize

    if k < 1 or budget < 1:
        raise MultiAdapterError(f"search_coefficients: need k >= 1 and budget >= 1, got k={k}, budget={budget}")
    history: list[tuple[list[float], float]] = []

    def penalised(w) -> float:
        if len(history) >= budget:  # Nelder-Mead may ask once more than maxfev within an iteration
            return math.inf
        ws = [float(v) for v in w]
        value = float(objective(ws)) + l1 * sum(abs(v) for v in ws) / k
        history.append((ws, value))
        return value

    x0 = torch.full((k,), float(start), dtype=torch.float64).numpy()
    simplex = [x0.copy()] + [x0 + step * torch.eye(k, dtype=torch.float64)[i].numpy() for i in range(k)]
    minimize(penalised, x0, method="Nelder-Mead", bounds=[(-bound, bound)] * k,
             options={"maxfev": budget, "initial_simplex": simplex, "xatol": 1e-4, "fatol": 1e-6})
    best = min(history, key=lambda h: h[1])
    return best[0], history
