"""Server-side aggregation of federated adapters: pure functions of the sites' tensors and weights.

Nothing here knows Flower, torch or a network: every function takes the sites' replies
(:class:`SiteUpdate`: a site name, its adapter tensors as numpy arrays, its weight = its number of training
cases, fingerprints) and the description of which tensors form plain LoRA pairs (:class:`Pair`: ``A`` is
``r x n``, ``B`` is ``m x r``, the layer's update is ``s * unfold(B @ A)``), and returns an
:class:`Aggregate`. The Flower strategy (:mod:`medlora.federated.server`) only decodes messages and calls
these.

The aggregation error of FedAvg on factors (FedIT), with weights ``p_k`` summing to one, is exactly
``s * sum_k p_k (B_k - B_bar)(A_k - A_bar)`` (the weighted cross-site covariance of the factors; the cross
terms vanish because ``sum_k p_k (A_k - A_bar) = 0``): zero whenever one factor is the same on every site.

Strategies:

* ``fedit``: FedAvg of every tensor (Zhang et al., "Towards Building the Federated GPT: Federated Instruction
  Tuning", arXiv 2305.05644), the common baseline, with the error above.
* ``ffa``: FFA-LoRA (Sun, Li, Li, Ding, ICLR 2024, arXiv 2403.12313): ``A`` is frozen and identical on every
  site (built from one shared seed), only ``B`` trains and is averaged, which is exact. Every reply carries
  a fingerprint of its ``A``; a reply whose ``A`` differs from the global one is refused, naming the site.
* ``lora_fair``: LoRA-FAIR (Bian, Wang, Zhang, Xu, ICCV 2025, arXiv 2411.14961): after averaging, the server
  refines ``B_bar`` by ``dB* = argmin_dB [1 - cos(dW, (B_bar + dB) A_bar)] + lam * ||dB||_F`` with
  ``dW = sum_k p_k B_k A_k`` (the paper's cosine discrepancy and norm penalty, default ``lam = 0.01``) and the
  sites start the next round from ``(A_bar, B_bar + dB*)``. The paper solves the problem with SGD; we use
  proximal gradient descent with backtracking (deterministic, and exactly ``dB* = 0`` where ``dW`` already
  equals ``B_bar A_bar``: the non-smooth norm is handled by its proximal map, not by a subgradient).
* ``fedsmooth``: FedSmoothLoRA (Wang et al., arXiv 2605.29460; official code wangzehao0704/FedSmoothLoRA,
  ``IC_exp``): the server averages the sites' full-rank products ``sum_c w_c B_c A_c``, projects the mean to
  rank r by a truncated SVD (``U sqrt(S)``, ``sqrt(S) V^T``) and merges that into the global base every
  round; the sites' start (gradient-aligned and round-matching) is built by the helpers :func:`ga_factors`,
  :func:`zeta_schedule`, :func:`fedsmooth_start` and :func:`fedsmooth_upload`. Deviation from the official
  code: ``average_weights`` there weights the ``i``-th selected client by ``count_list[i]`` (the loop
  position) instead of the selected client's own count; we weight every site by its own case count.
* ``full_fedavg``: FedAvg of a whole model's tensors (McMahan et al. 2017, arXiv 1602.05629).

Tensors that are not part of a plain pair (CP-LoRA cores, DoRA magnitudes, SALT's singular-value shifts)
are averaged as FedIT does whatever the strategy; the result then says ``exact=False`` with a note, since
the average of such parameters is not the average of the sites' weights.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import MedloraError

__all__ = [
    "STRATEGIES",
    "Aggregate",
    "AggregationError",
    "Pair",
    "SiteUpdate",
    "aggregate",
    "check_bases",
    "fedit",
    "fedit_error",
    "ffa",
    "fingerprint",
    "full_fedavg",
    "fedsmooth",
    "fedsmooth_lr",
    "fedsmooth_start",
    "fedsmooth_upload",
    "ga_factors",
    "lora_fair",
    "lora_fair_objective",
    "site_weights",
    "truncated_svd",
    "zeta_schedule",
]


class AggregationError(MedloraError, ValueError):
    """Replies that cannot be aggregated (a different base, a different frozen A, missing tensors): one line
    naming the site."""


@dataclass(frozen=True)
class Pair:
    """One plain LoRA pair of the adapter state: tensor names of ``A`` (``r x n``) and ``B`` (``m x r``) and the
    scale ``s``; the layer's update is ``s * unfold(B @ A)`` (:meth:`medlora.adapters.Reparam.rule_pairs`)."""

    a: str
    b: str
    scaling: float


@dataclass
class SiteUpdate:
    """One site's reply: its adapter (or model) tensors after local training and its weight (training cases)."""

    site: str
    tensors: dict[str, np.ndarray]
    weight: float
    base_fingerprint: str = ""
    a_fingerprint: str = ""


@dataclass
class Aggregate:
    """The new global state: ``tensors`` (what every site starts the next round from), whether it equals the
    weighted average of the sites' effective weights (``exact``), and notes for the report. ``merged`` holds
    FedSmoothLoRA's rank-r global factors of this round (``{pair.b: B_s, pair.a: A_s}``) that are merged into
    the base."""

    tensors: dict[str, np.ndarray]
    exact: bool
    notes: list[str] = field(default_factory=list)
    merged: dict[str, np.ndarray] | None = None


def fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, shapes and float32 values in sorted name order (independent of the site's dtype)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[name], dtype=np.float32))
        digest.update(f"{name}\0{a.shape}\0".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def site_weights(updates: Sequence[SiteUpdate]) -> np.ndarray:
    """Each site's own weight over the total (FedAvg's ``n_k / n``), float64."""
    if not updates:
        raise AggregationError("no site replied: nothing to aggregate")
    w = np.array([float(u.weight) for u in updates], dtype=np.float64)
    bad = [u.site for u, x in zip(updates, w, strict=True) if not (math.isfinite(x) and x > 0)]
    if bad:
        raise AggregationError(f"site {bad[0]}: its weight (number of training cases) must be positive")
    return w / w.sum()


def check_bases(updates: Sequence[SiteUpdate], expected: str) -> None:
    """Refuse a reply trained on another base model than the server's (fingerprint of the whole frozen base)."""
    for u in updates:
        if u.base_fingerprint != expected:
            raise AggregationError(
                f"site {u.site}: trained on a different base model (base fingerprint {u.base_fingerprint[:12] or '?'}"
                f", the federation's is {expected[:12]}); every site must start from the same base weights")


def _check_keys(updates: Sequence[SiteUpdate]) -> list[str]:
    keys = sorted(updates[0].tensors)
    for u in updates[1:]:
        if sorted(u.tensors) != keys:
            missing = sorted(set(keys) ^ set(u.tensors))
            raise AggregationError(f"site {u.site}: its tensors differ from site {updates[0].site}'s "
                                   f"(first: {missing[0]!r}); every site must train the same adapter")
        for k in keys:
            if u.tensors[k].shape != updates[0].tensors[k].shape:
                raise AggregationError(f"site {u.site}: tensor {k!r} has shape {u.tensors[k].shape}, site "
                                       f"{updates[0].site}'s has {updates[0].tensors[k].shape}")
    return keys


def _mean(updates: Sequence[SiteUpdate], p: np.ndarray, key: str) -> np.ndarray:
    first = updates[0].tensors[key]
    if all(np.array_equal(u.tensors[key], first) for u in updates[1:]):
        return np.asarray(first, dtype=np.float64).copy()  # weights summing to 1 +- 1 ulp would perturb it
    total = np.zeros(updates[0].tensors[key].shape, dtype=np.float64)
    for u, pk in zip(updates, p, strict=True):
        total += pk * np.asarray(u.tensors[key], dtype=np.float64)
    return total


def _cast_like(tensors: dict[str, np.ndarray], like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(like[k].dtype, copy=False) for k, v in tensors.items()}


def _others(keys: Sequence[str], pairs: Sequence[Pair]) -> list[str]:
    in_pairs = {p.a for p in pairs} | {p.b for p in pairs}
    return [k for k in keys if k not in in_pairs]


def _trained_others(updates: Sequence[SiteUpdate], others: Sequence[str]) -> list[str]:
    """Non-pair tensors that differ between sites (i.e. trained); frozen ones (identical everywhere) are exact."""
    first = updates[0].tensors
    return [k for k in others if any(not np.array_equal(u.tensors[k], first[k]) for u in updates[1:])]


def _not_exact_note(trained: Sequence[str]) -> list[str]:
    if not trained:
        return []
    return [f"not exact: {len(trained)} tensor(s) outside plain LoRA pairs (e.g. {trained[0]}) are averaged "
            "FedIT-style, which is not the average of the sites' weights"]


# ------------------------------------------------------------------------------------------- FedIT / FedAvg


def fedit(updates: Sequence[SiteUpdate], pairs: Sequence[Pair]) -> Aggregate:
    """FedAvg of every adapter tensor, factors included: the global update ``s B_bar A_bar`` misses
    :func:`fedit_error`."""
    p = site_weights(updates)
    keys = _check_keys(updates)
    out = {k: _mean(updates, p, k) for k in keys}
    trained = _trained_others(updates, _others(keys, pairs))
    pair_error = bool(set(pairs) - set(_shared_factor_pairs(updates, pairs)))
    notes = _not_exact_note(trained)
    if pair_error:
        notes.append("not exact: FedAvg of A and B separately misses s * sum_k p_k (B_k - B_bar)(A_k - A_bar)")
    return Aggregate(_cast_like(out, updates[0].tensors), exact=not (trained or pair_error), notes=notes)


def _shared_factor_pairs(updates: Sequence[SiteUpdate], pairs: Sequence[Pair]) -> list[Pair]:
    """Pairs whose A or whose B is the same on every site: FedIT is exact on them."""
    return [pair for pair in pairs if any(_trained_others(updates, [k]) == [] for k in (pair.a, pair.b))]


def fedit_error(updates: Sequence[SiteUpdate], pair: Pair, p: np.ndarray | None = None) -> np.ndarray:
    """``s * sum_k p_k (B_k - B_bar)(A_k - A_bar)`` (``m x n``, float64): the ideal update minus FedIT's."""
    p = site_weights(updates) if p is None else p
    a_bar, b_bar = _mean(updates, p, pair.a), _mean(updates, p, pair.b)
    err = np.zeros((b_bar.shape[0], a_bar.shape[1]))
    for u, pk in zip(updates, p, strict=True):
        err += pk * (np.asarray(u.tensors[pair.b], np.float64) - b_bar) @ (np.asarray(u.tensors[pair.a], np.float64)
                                                                          - a_bar)
    return pair.scaling * err


def full_fedavg(updates: Sequence[SiteUpdate], pairs: Sequence[Pair] = ()) -> Aggregate:
    """FedAvg of whole models: every floating tensor averaged by case counts (exact: the model is linear in its
    parameters' average only in the sense FedAvg means); integer buffers (BatchNorm's step counters) are taken
    from the first site."""
    p = site_weights(updates)
    keys = _check_keys(updates)
    out = {}
    for k in keys:
        first = updates[0].tensors[k]
        out[k] = _mean(updates, p, k).astype(first.dtype) if np.issubdtype(first.dtype, np.floating) else first
    return Aggregate(out, exact=True)


# --------------------------------------------------------------------------------------------------- FFA


def ffa(updates: Sequence[SiteUpdate], pairs: Sequence[Pair], global_a: Mapping[str, np.ndarray]) -> Aggregate:
    """FFA-LoRA: ``B`` averaged, ``A`` kept; every site's ``A`` must be the global one (its fingerprint, then its
    values: a site whose A moved or was drawn from another seed is refused)."""
    if not pairs:
        raise AggregationError("ffa: the adapter has no plain LoRA pairs (A frozen, B trained); use fedit")
    p = site_weights(updates)
    keys = _check_keys(updates)
    a_keys = {pair.a: global_a[pair.a] for pair in pairs}
    expected = fingerprint(a_keys)
    for u in updates:
        mine = {k: u.tensors[k] for k in a_keys}
        if u.a_fingerprint != expected or fingerprint(mine) != expected:
            raise AggregationError(
                f"site {u.site}: its frozen A differs from the federation's (A fingerprint "
                f"{(u.a_fingerprint or fingerprint(mine))[:12]}, expected {expected[:12]}); FFA-LoRA needs the "
                "same A on every site (one shared seed, A never trained)")
    out = {k: np.asarray(v, dtype=np.float64) for k, v in a_keys.items()}
    for pair in pairs:
        out[pair.b] = _mean(updates, p, pair.b)
    others = _others(keys, pairs)
    for k in others:
        out[k] = _mean(updates, p, k)
    trained = _trained_others(updates, others)
    return Aggregate(_cast_like(out, updates[0].tensors), exact=not trained, notes=_not_exact_note(trained))


# ---------------------------------------------------------------------------------------------- LoRA-FAIR


def lora_fair_objective(d_b: np.ndarray, b_bar: np.ndarray, a_bar: np.ndarray, delta_w: np.ndarray,
                        lam: float) -> float:
    """LoRA-FAIR's server objective ``1 - cos(dW, (B_bar + dB) A_bar) + lam ||dB||_F`` (matrices flattened)."""
    m = (b_bar + d_b) @ a_bar
    denominator = np.linalg.norm(delta_w) * np.linalg.norm(m)
    cos = float(np.sum(delta_w * m) / denominator) if denominator > 0 else 0.0
    return 1.0 - cos + lam * float(np.linalg.norm(d_b))


def _cos_gradient(d_b: np.ndarray, b_bar: np.ndarray, a_bar: np.ndarray, delta_w: np.ndarray) -> np.ndarray:
    m = (b_bar + d_b) @ a_bar
    nw, nm = np.linalg.norm(delta_w), np.linalg.norm(m)
    if nw == 0 or nm == 0:
        return np.zeros_like(d_b)
    cos = np.sum(delta_w * m) / (nw * nm)
    d_cos_d_m = delta_w / (nw * nm) - cos * m / (nm * nm)
    return -(d_cos_d_m @ a_bar.T)


def _refine_b(b_bar: np.ndarray, a_bar: np.ndarray, delta_w: np.ndarray, lam: float, max_iter: int = 500,
              tol: float = 1e-13) -> np.ndarray:
    """Proximal gradient descent with backtracking (Beck & Teboulle 2009) on LoRA-FAIR's objective, from dB = 0."""
    if np.linalg.norm(delta_w) == 0 or np.linalg.norm(b_bar @ a_bar) == 0:
        return np.zeros_like(b_bar)  # the cosine is undefined: nothing to align

    def smooth(d: np.ndarray) -> float:
        return lora_fair_objective(d, b_bar, a_bar, delta_w, 0.0)

    def prox(d: np.ndarray, t: float) -> np.ndarray:
        norm = np.linalg.norm(d)
        return np.zeros_like(d) if norm <= t * lam else d * (1.0 - t * lam / norm)

    d = np.zeros_like(b_bar)
    # a first step that moves B_bar by about its own size; backtracking shrinks it as needed
    t = float(np.linalg.norm(b_bar) ** 2 + 1e-300)
    value = smooth(d) + lam * np.linalg.norm(d)
    for _ in range(max_iter):
        g, f = _cos_gradient(d, b_bar, a_bar, delta_w), smooth(d)
        while True:
            new = prox(d - t * g, t)
            step = new - d
            if smooth(new) <= f + np.sum(g * step) + np.sum(step * step) / (2 * t) + 1e-15 or t < 1e-300:
                break
            t *= 0.5
        new_value = smooth(new) + lam * np.linalg.norm(new)
        d, converged = new, abs(value - new_value) <= tol * max(1.0, abs(value))
        value = new_value
        if converged:
            break
        t *= 2.0  # let the step grow again where the curvature allows
    return d


def lora_fair(updates: Sequence[SiteUpdate], pairs: Sequence[Pair], lam: float = 0.01) -> Aggregate:
    """LoRA-FAIR: FedAvg of the factors, then ``B_bar`` refined towards the sites' weighted ``dW``."""
    if not pairs:
        raise AggregationError("lora_fair: the adapter has no plain LoRA pairs to refine; use fedit")
    if not (math.isfinite(lam) and lam >= 0):
        raise AggregationError(f"lora_fair: lambda must be a finite number >= 0, got {lam!r}")
    p = site_weights(updates)
    keys = _check_keys(updates)
    out = {k: _mean(updates, p, k) for k in keys}
    for pair in pairs:
        delta_w = sum(pk * np.asarray(u.tensors[pair.b], np.float64) @ np.asarray(u.tensors[pair.a], np.float64)
                      for u, pk in zip(updates, p, strict=True))
        out[pair.b] = out[pair.b] + _refine_b(out[pair.b], out[pair.a], delta_w, lam)
    trained = _trained_others(updates, _others(keys, pairs))
    notes = _not_exact_note(trained) + ["LoRA-FAIR: B_bar refined towards the sites' weighted dW (cosine objective "
                                        f"+ {lam:g} ||dB||); the part of dW outside rank r is dropped"]
    return Aggregate(_cast_like(out, updates[0].tensors), exact=False, notes=notes)


# ------------------------------------------------------------------------------------------ FedSmoothLoRA


def truncated_svd(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``rank`` factors ``(U_r sqrt(S_r), sqrt(S_r) V_r^T)`` of ``m`` (float64; zero-padded when ``m`` has
    fewer singular values than ``rank``), as the official ``matrix_truncated_svd_every_layer``."""
    u, s, vt = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    k = min(rank, s.size)
    b = np.zeros((m.shape[0], rank))
    a = np.zeros((rank, m.shape[1]))
    root = np.sqrt(s[:k])
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vt[:k]
    return b, a


def ga_factors(gradient: np.ndarray, rank: int, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """FedSmoothLoRA's gradient-aligned factors (LoRA-GA's construction, official ``get_ga_dict``): with
    ``G = U S V^T``, ``B_ga = U[:, r:2r] p^(1/4) / sqrt(gamma)`` and ``A_ga = V^T[:r] p^(1/4) / sqrt(gamma)``,
    ``p`` the number of rows of ``G`` (``gamma = 0``: unscaled). Columns beyond ``G``'s rank are zero."""
    g = np.asarray(gradient, np.float64)
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    scale = g.shape[0] ** 0.25 / math.sqrt(gamma) if gamma else 1.0
    b = np.zeros((g.shape[0], rank))
    a = np.zeros((rank, g.shape[1]))
    cols = u[:, rank:2 * rank]
    b[:, :cols.shape[1]] = cols * scale
    rows = vt[:rank]
    a[:rows.shape[0]] = rows * scale
    return b, a


def zeta_schedule(round_index: int, total_rounds: int, mode: str = "decay", zeta0: float = 1.0,
                  zeta_min: float = 0.0) -> float:
    """The round-matching coefficient: ``constant`` gives ``zeta0``; ``decay`` (the official default for non-IID
    sites) ``zeta_min + (zeta0 - zeta_min)(1 + cos(pi t / T)) / 2`` with ``t`` the 0-based round."""
    if mode == "constant":
        return float(zeta0)
    if mode != "decay":
        raise AggregationError(f"fedsmooth: zeta_mode must be 'constant' or 'decay', got {mode!r}")
    return zeta_min + 0.5 * (zeta0 - zeta_min) * (1.0 + math.cos(math.pi * round_index / total_rounds))


def fedsmooth_lr(round_index: int, total_rounds: int, lr0: float, lr_min: float = 0.0,
                 schedule: str = "cosine") -> float:
    """The sites' learning rate in round ``round_index`` (0-based), as the official FedSmoothLoRA code
    (``IC_exp/utils.py::cosine_learning_rate``, called once per round with the round index and ``args.epochs``
    rounds): ``lr_min + (lr0 - lr_min)(1 + cos(pi t / T)) / 2``, constant within a round; the official code
    never passes ``min_lr``, so its floor is 0 (our default). The last round (``t = T - 1``) keeps a small
    positive rate. ``constant`` gives ``lr0`` every round."""
    if schedule == "constant":
        return float(lr0)
    if schedule != "cosine":
        raise AggregationError(f"fedsmooth: lr_schedule must be 'cosine' or 'constant', got {schedule!r}")
    return lr_min + 0.5 * (lr0 - lr_min) * (1.0 + math.cos(math.pi * round_index / total_rounds))


def fedsmooth_start(ga: tuple[np.ndarray, np.ndarray], rank: int, round_matching: np.ndarray | None = None
                    ) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """A site's start of a round: ``((B0, A0), shift)`` with the base to be moved by ``-s * shift``.

    First round (no round-matching term): ``(B0, A0) = (B_ga, A_ga)`` and ``shift = B_ga A_ga``, so the
    effective weight ``W - s B_ga A_ga + s B0 A0`` is exactly ``W``. Later rounds: ``(B0, A0) =
    SVD_r(B_ga A_ga + RM)`` with ``RM = zeta (B_c A_c - B_s A_s)``; the effective start is ``W + s RM`` up to
    the rank-r truncation.
    """
    b_ga, a_ga = ga
    shift = b_ga @ a_ga
    if round_matching is None:
        return (b_ga.copy(), a_ga.copy()), shift
    return truncated_svd(shift + round_matching, rank), shift


def fedsmooth_upload(b: np.ndarray, a: np.ndarray, shift: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """What a site sends: ``SVD_r(B A - B_ga A_ga)``, i.e. its end point minus the round's global base over ``s``."""
    return truncated_svd(np.asarray(b, np.float64) @ np.asarray(a, np.float64) - shift, rank)


def fedsmooth(updates: Sequence[SiteUpdate], pairs: Sequence[Pair], rank: int | None = None) -> Aggregate:
    """FedSmoothLoRA's server step: ``SVD_r(sum_c w_c B_c A_c)`` per pair, ``w_c`` each site's own case count;
    ``r`` is ``rank`` or, when None, each pair's own rank (the rows of its ``A``).

    ``merged`` (and ``tensors``) hold the round's global factors ``(B_s, A_s)``, which the federation merges into
    the base; the merged base is the weighted mean of the sites' end points up to the rank-r projection.
    """
    if not pairs:
        raise AggregationError("fedsmooth: the adapter has no plain LoRA pairs")
    p = site_weights(updates)
    keys = _check_keys(updates)
    stray = _others(keys, pairs)
    if stray:
        raise AggregationError(f"fedsmooth: tensor {stray[0]!r} is not part of a plain LoRA pair; FedSmoothLoRA "
                               "needs an adapter made of LoRA pairs only (lora, conv_lora)")
    out: dict[str, np.ndarray] = {}
    for pair in pairs:
        full = sum(pk * np.asarray(u.tensors[pair.b], np.float64) @ np.asarray(u.tensors[pair.a], np.float64)
                   for u, pk in zip(updates, p, strict=True))
        out[pair.b], out[pair.a] = truncated_svd(full, rank or updates[0].tensors[pair.a].shape[0])
    cast = _cast_like(out, updates[0].tensors)
    return Aggregate(cast, exact=False, merged=cast,
                     notes=["FedSmoothLoRA: the full-rank weighted mean of the sites' updates is projected to rank r "
                            "and merged into the base every round"])


STRATEGIES: dict[str, Callable[..., Aggregate]] = {
    "fedit": fedit, "ffa": ffa, "lora_fair": lora_fair, "fedsmooth": fedsmooth, "full_fedavg": full_fedavg,
}


def aggregate(name: str, updates: Sequence[SiteUpdate], pairs: Sequence[Pair], *, base_fingerprint: str,
              global_tensors: Mapping[str, np.ndarray] | None = None, options: Mapping[str, object] | None = None
              ) -> Aggregate:
    """Check the replies' base and run strategy ``name`` (options: ``lam`` for lora_fair; ``rank`` for fedsmooth,
    default each pair's own)."""
    options = dict(options or {})
    check_bases(updates, base_fingerprint)
    if name == "ffa":
        return ffa(updates, pairs, global_tensors or {})
    if name == "lora_fair":
        return lora_fair(updates, pairs, lam=float(options.get("lam", 0.01)))
    if name == "fedsmooth":
        return fedsmooth(updates, pairs, rank=None if options.get("rank") is None else int(options["rank"]))
    if name in ("fedit", "full_fedavg"):
        return STRATEGIES[name](updates, pairs)
    raise AggregationError(f"unknown strategy {name!r}; available: {', '.join(STRATEGIES)}")
