"""Routing between adapters: a case-level router, ReMix's top-k equal weighting, collapse logging, RLOO.

* :class:`CaseRouter`: a linear head on a frozen model's globally pooled features, one score per adapter. Trained
  supervised (:meth:`CaseRouter.fit`: binary cross-entropy against which classes a case contains, labels that come
  free with a multi-class dataset; ``reference/federated_and_beyond.md`` section 4.6, option 2) or as a policy with
  :func:`rloo_surrogate`.
* :func:`topk_equal_weights`: ReMix (Qiu et al., arXiv 2603.10160): the router only chooses the k experts; each
  chosen one gets the fixed weight 1/k, because learned softmax weights collapse onto one expert.
* :func:`effective_experts`: ``exp(H(w))`` of the normalised routing weights per sample, the effective support
  size; 1 means collapse onto one expert, k means k experts used equally. Log it for any soft router.
* :func:`rloo_surrogate`: the REINFORCE leave-one-out estimator ReMix trains its router with. For M sampled
  choices ``S_m`` with rewards ``R_m``, ``g = (1/M) sum_m (R_m - mean_{j != m} R_j) grad log pi(S_m)``, unbiased
  for ``grad E[R]`` (Kool, van Hoof, Welling 2019, "Buy 4 REINFORCE samples, get a baseline for free"); the
  function returns a scalar whose gradient is ``-g`` (minimise it). :func:`sample_subsets` draws the k-subsets as
  k draws without replacement (Plackett-Luce), with the log-probability of the ordered draw (so the estimator is
  unbiased for that policy; ReMix's exact subset distribution is not stated in what we could read).
  :meth:`CaseRouter.fit_rloo` trains a router with it; ReMix rewards a language model's negative loss, we reward
  the Dice of the chosen adapters' composed segmentation (``medlora compose``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .routing import MultiAdapterError

__all__ = ["CaseRouter", "effective_experts", "pooled_features", "rloo_surrogate", "sample_subsets",
           "topk_equal_weights"]


def topk_equal_weights(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, K)`` scores -> ``(N, K)`` weights: ``1/k`` on each row's k highest scores (the lower index on a tie),
    0 elsewhere."""
    if scores.dim() != 2 or not 1 <= k <= scores.shape[1]:
        raise MultiAdapterError(f"top-k routing needs (N, K) scores and 1 <= k <= K, got {tuple(scores.shape)}, k={k}")
    idx = torch.topk(scores, k, dim=1, sorted=True).indices
    w = torch.zeros_like(scores, dtype=torch.float32)
    return w.scatter_(1, idx, 1.0 / k)


def effective_experts(weights: torch.Tensor) -> torch.Tensor:
    """Effective number of experts per row of non-negative routing weights: ``exp(-sum p log p)`` with
    ``p = w / sum w`` (0 log 0 = 0)."""
    w = weights.clamp_min(0)
    p = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    h = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim=-1)
    return h.exp()


def sample_subsets(logits: torch.Tensor, k: int, m: int, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """M k-subsets per row of ``(N, K)`` logits by k softmax draws without replacement. Returns the chosen
    indices ``(M, N, k)`` and ``log pi`` of each ordered draw ``(M, N)`` (differentiable in ``logits``)."""
    n, kk = logits.shape
    if not 1 <= k <= kk:
        raise MultiAdapterError(f"sample_subsets: need 1 <= k <= {kk}, got {k}")
    chosen, logps = [], []
    for _ in range(m):
        mask = torch.zeros(n, kk, dtype=torch.bool, device=logits.device)
        idx, logp = [], torch.zeros(n, dtype=logits.dtype, device=logits.device)
        for _ in range(k):
            lp = torch.log_softmax(logits.masked_fill(mask, -math.inf), dim=1)
            pick = torch.multinomial(lp.detach().exp(), 1, generator=generator).squeeze(1)
            logp = logp + lp.gather(1, pick[:, None]).squeeze(1)
            mask = mask.scatter(1, pick[:, None], True)
            idx.append(pick)
        chosen.append(torch.stack(idx, dim=1))
        logps.append(logp)
    return torch.stack(chosen), torch.stack(logps)


def rloo_surrogate(log_probs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Scalar whose gradient is minus the RLOO estimate ``(1/M) sum_m (R_m - mean_{j != m} R_j) grad log pi_m``,
    averaged over any trailing batch axes. ``log_probs`` and ``rewards`` are ``(M, ...)``, M >= 2; rewards are
    constants (detached)."""
    if log_probs.shape != rewards.shape or log_probs.shape[0] < 2:
        raise MultiAdapterError(f"RLOO needs M >= 2 samples with one reward each, got log-probabilities of shape "
                                f"{tuple(log_probs.shape)} and rewards of shape {tuple(rewards.shape)}")
    r = rewards.detach().to(log_probs.dtype)
    m = r.shape[0]
    baseline = (r.sum(dim=0, keepdim=True) - r) / (m - 1)
    return -((r - baseline) * log_probs).mean(dim=0).mean()


def pooled_features(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """Global average (over every axis after the channel axis) of the output of ``model``'s sub-module ``layer``
    when ``model`` runs on ``x`` (no gradient): ``(N, C)``."""
    modules = dict(model.named_modules())
    if layer not in modules:
        raise MultiAdapterError(f"pooled_features: the model has no sub-module {layer!r}")
    got: list[torch.Tensor] = []
    handle = modules[layer].register_forward_hook(lambda _m, _i, out: got.append(out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    out = got[-1]
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.flatten(2).mean(dim=2) if out.dim() > 2 else out


class CaseRouter(nn.Module):
    """A linear head from pooled features ``(N, C)`` to one score per adapter ``(N, K)`` (features standardised
    with statistics taken when fitted). ``route(features, k)`` gives ReMix's top-k equal weights."""

    def __init__(self, in_features: int, n_adapters: int, names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.head = nn.Linear(in_features, n_adapters)
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.names = list(names) if names is not None else [str(i) for i in range(n_adapters)]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head((features - self.mean) / self.std)

    def route(self, features: torch.Tensor, k: int) -> torch.Tensor:
        with torch.no_grad():
            return topk_equal_weights(self(features), k)

    def fit(self, features: torch.Tensor, present: torch.Tensor, steps: int = 300, lr: float = 0.05,
            weight_decay: float = 1e-3) -> list[float]:
        """Supervised: binary cross-entropy of the scores against ``present`` ``(N, K)`` (1 where the case holds the
        adapter's class). Returns the loss per step."""
        self._standardise(features)
        opt = torch.optim.Adam(self.head.parameters(), lr=lr, weight_decay=weight_decay)
        losses = []
        for _ in range(steps):
            loss = nn.functional.binary_cross_entropy_with_logits(self(features), present.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    def _standardise(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-6) if features.shape[0] > 1 else torch.ones_like(self.std))

    def fit_rloo(self, features: torch.Tensor, reward: Callable[[int, tuple[int, ...]], float], k: int,
                 steps: int = 200, samples: int = 4, lr: float = 0.05, weight_decay: float = 1e-3,
                 generator: torch.Generator | None = None) -> dict[str, list[float]]:
        """ReMix's router training: the scores are a policy over k-subsets of the adapters (:func:`sample_subsets`),
        trained with :func:`rloo_surrogate` on ``samples`` subsets per case and step; ``reward(case, subset)`` (the
        subset as sorted indices) scores the composition of that subset, each adapter with its whole update (the
        fixed equal weights). Returns per step the mean sampled reward and the mean effective number of experts
        of the softmax over the scores (:func:`effective_experts`; a fall towards 1 is the collapse ReMix
        describes)."""
        self._standardise(features)
        opt = torch.optim.Adam(self.head.parameters(), lr=lr, weight_decay=weight_decay)
        history: dict[str, list[float]] = {"reward": [], "effective_experts": []}
        for _ in range(steps):
            logits = self(features)
            chosen, logp = sample_subsets(logits, k, samples, generator)
            r = torch.tensor([[float(reward(i, tuple(sorted(chosen[m, i].tolist())))) for i in range(len(features))]
                              for m in range(samples)])
            loss = rloo_surrogate(logp, r)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history["reward"].append(float(r.mean()))
            history["effective_experts"].append(float(effective_experts(torch.softmax(logits.detach(), 1)).mean()))
        return history
