"""Token-level routing of several LoRA experts inside a network's linear projections (LoRA-Mixer style).

LoRA-Mixer (Li, Song, Zhou, Zhang, Yu, Yang; ICLR 2026, arXiv 2507.00029) puts E task-specific LoRA experts into
the attention input/output projections and lets a router choose among them per token. :class:`MixerLinear`
wraps one ``nn.Linear`` (a ``q``/``k``/``v``/``o`` projection, or a ViT's fused ``qkv``) and computes, for a token
``x`` (the last axis of the input),

    ``y = W0 x + b + sum_e g_e(x) * s_e * B_e A_e x``,    ``g(x) = route(W_g x + b_g)``,

with the router a linear gate on the layer's own input. Routing (``routing=``):

* ``"soft"``: ``g = softmax(z / T)``, every expert weighted (trained through the task loss);
* ``"topk"``: the softmax kept on each token's k largest logits and renormalised over them (a sparse MoE
  gate; its weights are differentiable, the choice is not). LoRA-Mixer's "hard-soft top-k" is of this kind; its
  exact form is not in what we could read (the official repository held only a README when this was written);
* ``"topk_equal"``: ReMix (Qiu et al., arXiv 2603.10160): weight ``1/k`` on each of the k chosen experts
  (:func:`~medlora.adapters.multi.router.topk_equal_weights`), because learned softmax weights collapse onto one
  expert. The task loss gives the router no gradient here (ReMix trains it by RLOO,
  :func:`~medlora.adapters.multi.router.rloo_surrogate`); a router trained soft can be evaluated with it;
* ``"sample_equal"``: ReMix in training: each token draws k experts from the softmax (k draws without
  replacement, :func:`~medlora.adapters.multi.router.sample_subsets`) and weights them ``1/k``; the draw's
  log-probability is kept for the RLOO estimator (:func:`mixer_log_prob`: one policy over all layers and tokens of
  a sample, rewarded by that sample's loss; ReMix's exact granularity of the reward is not in what we could read).

Two regimes, as in the paper: plug-and-play (default, ``train_experts=False``): the experts are frozen copies of
existing adapters and only the routers train; or experts and routers trained together (``train_experts=True``).

:func:`specialisation_balance_loss` is our reading of the paper's router loss (v1 "Specialization Balance Loss",
v2 "Routing Specialization Loss": "global load balance and input-aware specialisation via an entropy-shaping
objective"; the weights and exact terms are not in the abstract). For router probabilities ``p_t`` of T tokens
and their mean ``p_bar``::

    L = lambda_bal * (log E - H(p_bar)) + lambda_spec * (1/T) sum_t H(p_t)

The first term is ``KL(p_bar || uniform)``: zero when the experts are used equally over the batch (global balance,
an entropy form of the Switch-Transformer load-balance term, differentiable without counting argmax choices). The
second is the mean per-token entropy: zero when every token commits to one expert (specialisation). With equal
weights ``L = log E - I(token; expert)``: the loss rewards routing that depends on the input, and it punishes
collapse (one expert for every token: the first term is ``log E``) as well as indecision (uniform weights for every
token: the second term is ``log E``).

Limits (refused with one line): an expert whose update on a routed layer is not a low-rank product ``B A`` (DoRA's
magnitude, input-dependent methods); experts of another base; a target that is not a plain ``nn.Linear``. Every
expert runs on every token (dense mixture: E small low-rank products per layer; the gate only weights them).
``sample_equal`` draws through ``router.sample_subsets``, which builds its masks on the CPU: CPU tensors only.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..base import AdditiveReparam, Reparam
from ..inject import _matches, adapters_of, base_weight, iter_adapters
from .bank import lora_terms
from .router import effective_experts, sample_subsets, topk_equal_weights
from .routing import MultiAdapterError

__all__ = ["ROUTINGS", "MixerLinear", "attach_mixer", "detach_mixer", "expert_factors", "fix_gates",
           "mixer_balance_loss", "mixer_layers", "mixer_log_prob", "mixer_stats", "specialisation_balance_loss"]

ROUTINGS = ("soft", "topk", "topk_equal", "sample_equal")

# A factor pair (A: r x I, B: O x r, s) with the layer update s * B @ A.
Factor = tuple[torch.Tensor, torch.Tensor, float]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """``-sum p log p`` over the last axis (0 log 0 = 0)."""
    return -(p * torch.where(p > 0, p, torch.ones_like(p)).log()).sum(dim=-1)


def specialisation_balance_loss(probs: torch.Tensor, balance: float = 1.0, specialisation: float = 1.0
                                ) -> torch.Tensor:
    """``balance * (log E - H(mean_t p_t)) + specialisation * mean_t H(p_t)`` of router probabilities ``probs``
    ``(..., E)`` (every leading axis is tokens). See the module docstring for why this form."""
    if probs.dim() < 1 or probs.shape[-1] < 1:
        raise MultiAdapterError(f"specialisation_balance_loss needs (..., E) probabilities, got {tuple(probs.shape)}")
    p = probs.reshape(-1, probs.shape[-1])
    n_experts = p.shape[1]
    global_term = math.log(n_experts) - _entropy(p.mean(dim=0))
    return balance * global_term + specialisation * _entropy(p).mean()


def expert_factors(reparam: Reparam, module: nn.Module, where: str) -> Factor:
    """One ``(A, B, s)`` with ``W_eff = W0 + s B A`` for an adapted ``nn.Linear`` (copies, detached).

    Plain LoRA and PiSSA's offset LoRA (two terms, stacked along the rank; ``s`` is the adapter's scaling), and any
    additive method whose training factors (``Reparam.factored``) describe its whole update, such as SAMed's
    fused-block LoRA (a block-diagonal B; the scaling folded into B, ``s = 1``). The pair is checked against the
    layer's effective weight; a method whose update is not such a product is refused.
    """
    w0 = base_weight(module).detach()
    terms = lora_terms(reparam)
    if terms is not None:
        s = terms[0][2]
        a = torch.cat([t[0].detach() for t in terms])
        b = torch.cat([t[1].detach() * (t[2] / s) for t in terms], dim=1)
        pair: Factor = (a, b, s)
    else:
        factors = reparam.factored(w0) if isinstance(reparam, AdditiveReparam) else None
        if factors is None or factors.magnitude is not None or factors.a.dim() != 2:
            raise MultiAdapterError(
                f"{where}: a {reparam.config.method} update is not a low-rank product B A that a mixer can route "
                "(use lora, pissa or another additive low-rank method)")
        pair = (factors.a.detach(), factors.b.detach().reshape(w0.shape[0], -1), 1.0)
    with torch.no_grad():
        want = reparam(w0) - w0
        got = pair[2] * pair[1] @ pair[0]
        tol = 1e-4 * (1.0 + float(want.abs().max()))
        if got.shape != want.shape or float((got - want).abs().max()) > tol:
            raise MultiAdapterError(f"{where}: the {reparam.config.method} update is not the product of its factors "
                                    "(the mixer would compute another update); this method cannot be routed")
    return pair[0].clone(), pair[1].clone(), float(pair[2])


class MixerLinear(nn.Module):
    """``base`` (a frozen ``nn.Linear``) plus E LoRA experts weighted per token by a linear router.

    ``lora_A`` ``(E, R, I)``, ``lora_B`` ``(E, O, R)`` (experts of lower rank padded with zeros, which keep zero
    gradients, so padding never changes an expert), ``scaling`` ``(E,)``; ``router`` ``Linear(I, E)``. After
    each forward ``last_probs`` holds the router's softmax ``(..., E)`` (with gradient, for
    :func:`specialisation_balance_loss`) and ``last_gates`` the weights actually applied (detached).
    """

    def __init__(self, base: nn.Linear, factors: Sequence[Factor | None], *, routing: str = "soft", k: int = 1,
                 temperature: float = 1.0, train_experts: bool = False, names: Sequence[str] | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear) or adapters_of(base) is not None:
            raise MultiAdapterError(f"a mixer wraps a plain nn.Linear, got {type(base).__name__}")
        out_f, in_f = base.weight.shape
        n = len(factors)
        rank = max([f[0].shape[0] for f in factors if f is not None] or [1])
        a = base.weight.new_zeros(n, rank, in_f)
        b = base.weight.new_zeros(n, out_f, rank)
        scaling = torch.zeros(n, dtype=base.weight.dtype)
        for e, f in enumerate(factors):
            if f is None:  # this expert leaves the layer as it is
                continue
            r = f[0].shape[0]
            if f[0].shape[1] != in_f or f[1].shape[0] != out_f:
                raise MultiAdapterError(f"expert {e}: factors {tuple(f[1].shape)} x {tuple(f[0].shape)} do not fit a "
                                        f"layer of weight {tuple(base.weight.shape)}")
            a[e, :r], b[e, :, :r], scaling[e] = f[0], f[1], f[2]
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(a, requires_grad=train_experts)
        self.lora_B = nn.Parameter(b, requires_grad=train_experts)
        self.register_buffer("scaling", scaling.to(base.weight.device))
        self.router = nn.Linear(in_f, n, device=base.weight.device, dtype=base.weight.dtype)
        # Small random gate: routing starts near uniform (the average of the experts) but not at the exact saddle
        # where the entropy terms have no gradient.
        nn.init.normal_(self.router.weight, std=0.01)
        nn.init.zeros_(self.router.bias)
        self.names = list(names) if names is not None else [str(e) for e in range(n)]
        self.set_routing(routing, k, temperature)
        self.fixed: torch.Tensor | None = None
        self.last_probs: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None
        self.last_log_prob: torch.Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The last forward's probabilities carry an autograd graph, which deepcopy and pickle refuse.
        return {**self.__dict__, "last_probs": None, "last_gates": None, "last_log_prob": None}

    @property
    def n_experts(self) -> int:
        return self.lora_A.shape[0]

    def set_routing(self, routing: str, k: int = 1, temperature: float = 1.0) -> None:
        if routing not in ROUTINGS:
            raise MultiAdapterError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)}")
        if routing != "soft" and not 1 <= k <= self.n_experts:
            raise MultiAdapterError(f"top-k routing needs 1 <= k <= {self.n_experts} experts, got k={k}")
        if not temperature > 0:
            raise MultiAdapterError(f"the router temperature must be > 0, got {temperature}")
        self.routing, self.k, self.temperature = routing, int(k), float(temperature)

    def gates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax probabilities, the weights applied) of router logits ``(..., E)``."""
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.fixed is not None:
            return probs, self.fixed.to(probs).expand_as(probs)
        if self.routing == "soft":
            return probs, probs
        flat = logits.reshape(-1, logits.shape[-1])
        if self.routing == "sample_equal":
            chosen, log_prob = sample_subsets(flat / self.temperature, self.k, 1)
            self.last_log_prob = log_prob[0].view(logits.shape[:-1])
            weights = torch.zeros_like(flat).scatter_(1, chosen[0], 1.0 / self.k)
            return probs, weights.view_as(probs)
        if self.routing == "topk_equal":
            return probs, topk_equal_weights(flat, self.k).to(probs.dtype).view_as(probs)
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, torch.topk(flat, self.k, dim=1).indices, True)
        kept = probs * keep.view_as(probs)
        return probs, kept / kept.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, g = self.gates(self.router(x))
        self.last_probs, self.last_gates = probs, g.detach()
        z = torch.einsum("...i,eri->...er", x, self.lora_A)
        z = z * (g * self.scaling.to(g.dtype)).unsqueeze(-1)
        return self.base(x) + torch.einsum("...er,eor->...o", z, self.lora_B)

    def extra_repr(self) -> str:
        return (f"experts={self.names}, rank={self.lora_A.shape[1]}, routing={self.routing!r}, k={self.k}, "
                f"train_experts={self.lora_A.requires_grad}")


def _expert_model(model: nn.Module, source: Any, e: int) -> nn.Module | Mapping[str, Factor]:
    if isinstance(source, nn.Module):
        return source
    if isinstance(source, Mapping):
        return source
    if isinstance(source, (str, os.PathLike)):
        from ..io import load_adapter

        return load_adapter(copy.deepcopy(model), source)
    raise MultiAdapterError(f"expert {e}: expected an adapted model, an adapter file or a mapping "
                            f"{{layer: (A, B, s)}}, got {type(source).__name__}")


def _warn_other_tensors(model: nn.Module, expert: nn.Module, e: int) -> None:
    """Warn when an expert differs from the model outside its adapters (an unfrozen norm or head, statistics
    re-estimated on its data): the mixer routes only the adapters' updates and keeps the model's own tensors."""
    mine = model.state_dict()
    differ = [k for k, v in expert.state_dict().items()
              if k in mine and (v.shape != mine[k].shape or not torch.equal(v, mine[k]))]
    if differ:
        warnings.warn(f"attach_mixer: expert {e} also differs from the model outside its adapters "
                      f"({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}); only its adapters' updates "
                      "are routed, the model keeps its own values there", stacklevel=3)


def attach_mixer(model: nn.Module, experts: Sequence[Any], targets: Sequence[str] | None = None, *,
                 routing: str = "soft", k: int = 1, temperature: float = 1.0, train_experts: bool = False,
                 names: Sequence[str] | None = None) -> nn.Module:
    """Replace ``model``'s targeted ``nn.Linear`` layers by :class:`MixerLinear` over ``experts``, in place.

    ``experts``: adapted copies of ``model`` (from :func:`~medlora.adapters.inject`), adapter files (loaded onto
    a copy of ``model``; the base is checked), or mappings ``{layer name: (A, B, s)}`` of raw LoRA factors.
    ``targets``: layer-name patterns as in ``AdapterConfig.targets`` (``q``, ``attn.qkv``, ``re:...``); default,
    every ``nn.Linear`` that some expert adapts (a targeted layer of another type is refused). A routed layer that an
    expert does not adapt gets a zero update from that expert. Every model parameter is frozen; the routers train,
    and the experts too with ``train_experts``. An expert's updates on layers that are not routed are dropped, with
    a warning.
    """
    if len(experts) < 1:
        raise MultiAdapterError("attach_mixer needs at least one expert")
    if names is not None and len(names) != len(experts):
        raise MultiAdapterError(f"attach_mixer: {len(names)} names for {len(experts)} experts")
    modules = dict(model.named_modules())
    adapted_here = [n for n, _, _ in iter_adapters(model)]
    if adapted_here:
        raise MultiAdapterError(f"attach_mixer needs the plain base model; layer {adapted_here[0]!r} holds an adapter")
    per_expert: list[dict[str, Factor | None]] = []
    for e, source in enumerate(experts):
        expert = _expert_model(model, source, e)
        found: dict[str, Factor | None] = {}
        if isinstance(expert, Mapping):
            for name, (a, b, s) in expert.items():
                if not isinstance(modules.get(name), nn.Linear):
                    raise MultiAdapterError(f"expert {e}: layer {name!r} is not an nn.Linear of the model")
                found[name] = (a.detach().clone(), b.detach().clone(), float(s))
        else:
            for name, module, reparam in iter_adapters(expert):
                mine = modules.get(name)
                if not isinstance(mine, nn.Linear) or not isinstance(module, nn.Linear):
                    found[name] = None  # not routable; reported below if targeted
                    continue
                if base_weight(module).shape != mine.weight.shape or not torch.equal(base_weight(module), mine.weight):
                    raise MultiAdapterError(f"expert {e}: layer {name!r} has another base weight than the model "
                                            "(an adapter of another base)")
                found[name] = expert_factors(reparam, module, f"expert {e}, layer {name!r}")
            _warn_other_tensors(model, expert, e)
        per_expert.append(found)
    layers = sorted({n for found in per_expert for n in found}, key=list(modules).index)
    if targets is not None:
        layers = [n for n in layers if any(_matches(n, p) for p in targets)]
    else:
        layers = [n for n in layers if isinstance(modules[n], nn.Linear)]
    if not layers:
        adapted = sorted({n for found in per_expert for n in found})
        raise MultiAdapterError(f"attach_mixer: no layer adapted by the experts matches targets={list(targets or [])}"
                                f"; adapted layers: {', '.join(adapted[:20]) or 'none'}")
    bad = [n for n in layers if not isinstance(modules[n], nn.Linear)
           or any(found.get(n, 0) is None for found in per_expert)]
    if bad:
        raise MultiAdapterError(f"attach_mixer routes nn.Linear layers only; {bad[0]!r} is a "
                                f"{type(modules[bad[0]]).__name__}")
    dropped = sorted({n for found in per_expert for n in found} - set(layers))
    if dropped:
        warnings.warn(f"attach_mixer: the experts' updates on {len(dropped)} layer(s) outside the targets are "
                      f"dropped ({', '.join(dropped[:5])}{', ...' if len(dropped) > 5 else ''})", stacklevel=2)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in layers:
        mixer = MixerLinear(modules[name], [found.get(name) for found in per_expert], routing=routing, k=k,
                            temperature=temperature, train_experts=train_experts, names=names)
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, mixer)
    return model


def mixer_layers(model: nn.Module) -> list[tuple[str, MixerLinear]]:
    """``(name, layer)`` of every :class:`MixerLinear` in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MixerLinear)]


def detach_mixer(model: nn.Module) -> nn.Module:
    """Put the plain base layers back (routers and experts discarded)."""
    for name, mixer in mixer_layers(model):
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, mixer.base)
    return model


def fix_gates(model: nn.Module, weights: Sequence[float] | torch.Tensor | None) -> None:
    """Apply the same expert weights to every token of every mixer layer (``None``: the routers again).
    Uniform weights are the plain average of the experts; a one-hot vector runs one expert alone."""
    for _, mixer in mixer_layers(model):
        if weights is None:
            mixer.fixed = None
            continue
        w = torch.as_tensor(weights, dtype=mixer.lora_A.dtype, device=mixer.lora_A.device)
        if w.shape != (mixer.n_experts,):
            raise MultiAdapterError(f"fix_gates: {tuple(w.shape)} weights for {mixer.n_experts} experts")
        mixer.fixed = w


def mixer_balance_loss(model: nn.Module, balance: float = 1.0, specialisation: float = 1.0) -> torch.Tensor:
    """The mean over mixer layers of :func:`specialisation_balance_loss` of their last forward's router
    probabilities."""
    probs = [m.last_probs for _, m in mixer_layers(model) if m.last_probs is not None]
    if not probs:
        raise MultiAdapterError("mixer_balance_loss: no mixer layer has run a forward yet")
    return torch.stack([specialisation_balance_loss(p, balance, specialisation) for p in probs]).mean()


def mixer_log_prob(model: nn.Module, samples: int) -> torch.Tensor:
    """``log pi`` of the last forward's sampled routing per sample ``(samples,)``: the sum over every mixer layer in
    ``sample_equal`` routing and every token of the sample (a layer's leading rows hold each sample's tokens
    contiguously, as a ViT's window partition does). With one reward per sample this is what
    :func:`~medlora.adapters.multi.router.rloo_surrogate` takes, one row per draw."""
    parts = [m.last_log_prob.reshape(samples, -1).sum(dim=1) for _, m in mixer_layers(model)
             if m.routing == "sample_equal" and m.last_log_prob is not None]
    if not parts:
        raise MultiAdapterError("mixer_log_prob: no mixer layer has run a forward in sample_equal routing")
    return torch.stack(parts).sum(dim=0)


def mixer_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per mixer layer, from its last forward: ``effective`` (mean over tokens of ``exp(H(g))`` of the applied
    weights: 1 = one expert per token, E = all equally), ``usage`` (mean applied weight per expert) and
    ``usage_effective`` (``exp(H(usage))``: 1 = the same expert for every token, i.e. collapse)."""
    out = {}
    for name, m in mixer_layers(model):
        if m.last_gates is None:
            continue
        g = m.last_gates.reshape(-1, m.n_experts).float()
        usage = g.mean(dim=0)
        out[name] = {"effective": float(effective_experts(g).mean()), "usage": [float(u) for u in usage],
                     "usage_effective": float(effective_experts(usage[None])[0])}
    return out
