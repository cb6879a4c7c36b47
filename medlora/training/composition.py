"""``medlora compose``: several single-class adapters on one base, composed or merged, with honest controls.

On a multi-class phantom cohort (the ``ich`` domain, labels by hemorrhage type) the study

1. trains a base network on the binary view of the training cases (any blood);
2. trains one LoRA adapter per class on that class alone (the department's "one adapter per hemorrhage type");
3. composes them at the output (:func:`medlora.adapters.multi.compose_outputs`: one mixed-adapter batch, each
   adapter's own class map, overlaps settled by probability or by a fixed priority);
4. per class, merges adapters LoraHub-style (:func:`~medlora.adapters.multi.search_coefficients` on
   ``few_cases`` labelled training cases of that class) from the pool of the *other* classes' adapters (recycling:
   no adapter for the class exists) and from the pool with its own adapter added (the "highly relevant LoRA in
   the pool" case), against the two controls of the recycling paper (arXiv 2602.12323): a fresh adapter trained on
   the same few cases with the same steps, and the same search over norm-matched random adapters;
5. routes per case (:class:`~medlora.adapters.multi.CaseRouter` on the base's pooled bottleneck, trained on which
   classes each training case holds) and composes only the chosen adapters (top-1, top-2, or those scored present);
6. reports per-class Dice on held-out cases (3D, per case, over the cases that hold the class, so every method
   has the same denominator; predictions of a class in cases without it are counted as false-positive cases),
   paired bootstrap intervals and Wilcoxon p-values (Holm) of each method against the class's own single adapter,
   parameter counts and inference time per case.

Deliberately small (2D slices of a 48 x 48 x 16 grid, an 8-channel multi-view UNet) so it runs in minutes on a
CPU; the numbers are a phantom study, not a clinical claim. The table in ``docs/composition.md`` was made with it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdapterBank, AdapterConfig, inject, parameter_report, save_adapter
from ..adapters.multi import (
    AdapterDeltas,
    CaseRouter,
    compose_outputs,
    effective_experts,
    pooled_features,
    random_like,
    search_coefficients,
)
from ..data.phantoms import TYPE_LABELS, generate_case, parse_types
from ..errors import MedloraError
from ..evaluation.statistics import bootstrap_ci, holm, wilcoxon_p
from ..fileio import atomic_write_bytes

__all__ = ["DEFAULT_TYPES", "run_composition_study"]

DEFAULT_TYPES = ("sah", "ivh", "iph", "sdh", "sah+ivh", "iph+sdh")
_SHAPE, _SPACING, _HU = (48, 48, 16), (4.0, 4.0, 10.0), (0.0, 140.0)


def _cohort(n: int, seed: int, offset: int, groups) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for i in range(offset, offset + n):
        image, label, _, _ = generate_case("ich", seed, i, _SHAPE, _SPACING, types=groups)
        x = np.clip((image - _HU[0]) / (_HU[1] - _HU[0]), 0.0, 1.0).astype(np.float32)
        out.append((x, label))
    return out


def _slices(cases) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial slices of every case: images (S, 1, X, Y) and integer labels (S, X, Y)."""
    x = torch.from_numpy(np.concatenate([np.moveaxis(c[0], -1, 0) for c in cases]))[:, None]
    y = torch.from_numpy(np.concatenate([np.moveaxis(c[1], -1, 0) for c in cases]).astype(np.int64))
    return x, y


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice over the batch (one foreground channel)."""
    p = torch.sigmoid(logits)
    inter, denom = (p * target).sum(), p.sum() + target.sum()
    return F.binary_cross_entropy_with_logits(logits, target) + 1.0 - (2 * inter + 1e-5) / (denom + 1e-5)


def _train(model: nn.Module, x: torch.Tensor, fg: torch.Tensor, steps: int, lr: float, seed: int,
           batch: int = 8) -> nn.Module:
    """Adam on half-positive batches of slices (positive: the slice holds foreground), as the seed's 2D sampler."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.nonzero(fg.flatten(1).any(1)).flatten()
    neg = torch.nonzero(~fg.flatten(1).any(1)).flatten()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        parts = [pool[torch.randint(len(pool), (batch // 2,), generator=g)] for pool in (pos, neg) if len(pool)]
        idx = torch.cat(parts)
        loss = _loss(model(x[idx]), fg[idx, None].float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def _probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(model(x)[:, 0])


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of a case that holds the class (0 when nothing is predicted); NaN when the truth lacks the class, so every
    method is averaged over the same cases (a prediction there is counted by :func:`_false_positive_cases`)."""
    if not truth.any():
        return float("nan")
    return 2.0 * int((pred & truth).sum()) / (int(pred.sum()) + int(truth.sum()))


def _split(label_slices: torch.Tensor, truth_slices: torch.Tensor, depth: int, value: int):
    p = (label_slices == value).numpy().reshape(-1, depth, *label_slices.shape[1:])
    t = (truth_slices == value).numpy().reshape(-1, depth, *truth_slices.shape[1:])
    return p, t


def _per_case(label_slices: torch.Tensor, truth_slices: torch.Tensor, depth: int, value: int) -> list[float]:
    return [_dice(a, b) for a, b in zip(*_split(label_slices, truth_slices, depth, value), strict=True)]


def _false_positive_cases(label_slices: torch.Tensor, truth_slices: torch.Tensor, depth: int, value: int) -> int:
    return sum(bool(a.any() and not b.any()) for a, b in zip(*_split(label_slices, truth_slices, depth, value),
                                                             strict=True))


def run_composition_study(out: str | Path, *, types: Sequence[str] = DEFAULT_TYPES, train_cases: int = 12,
                          test_cases: int = 8, few_cases: int = 3, seed: int = 0, base_steps: int = 200,
                          adapter_steps: int = 100, rank: int = 4, budget: int = 40, width: int = 8,
                          log=None) -> dict[str, Any]:
    """Run the study (see the module docstring); writes ``composition.json`` and ``composition.md`` to ``out``."""
    if log is None:
        def log(msg: str) -> None:
            print(msg, flush=True)
    try:
        groups = parse_types(types)
    except ValueError as exc:
        raise MedloraError(f"--types: {exc}") from None
    classes = sorted({t for g in groups for t in g}, key=TYPE_LABELS.__getitem__)
    if len(classes) < 2:
        raise MedloraError(f"--types: composition needs at least two hemorrhage types, got {classes}")
    if min(train_cases, test_cases, few_cases) < 1 or few_cases > train_cases:
        raise MedloraError("compose: need train_cases >= few_cases >= 1 and test_cases >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train, test = _cohort(train_cases, seed, 0, groups), _cohort(test_cases, seed, train_cases, groups)
    xtr, ytr = _slices(train)
    xte, yte = _slices(test)
    depth = _SHAPE[2]
    log(f"cohort: {train_cases} training + {test_cases} test cases, classes {', '.join(classes)} "
        f"({time.perf_counter() - t0:.1f} s)")

    from ..models.mv_unet import MultiViewUNet

    base = MultiViewUNet(spatial_dims=2, in_channels=1, out_channels=1, width=width, norm="instance")
    _train(base, xtr, ytr > 0, base_steps, 3e-3, seed)
    for p in base.parameters():
        p.requires_grad_(False)
    log(f"base: {base_steps} steps on the binary view ({time.perf_counter() - t0:.1f} s)")
    config = AdapterConfig("lora", rank=rank, alpha=2.0 * rank)

    def fresh(x, fg, s):
        torch.manual_seed(s)
        return _train(inject(copy.deepcopy(base), config), x, fg, adapter_steps, 5e-3, s)

    singles = {c: fresh(xtr, ytr == TYPE_LABELS[c], seed + 10 + i) for i, c in enumerate(classes)}
    (out / "adapters").mkdir(exist_ok=True)
    for c, m in singles.items():
        save_adapter(m, out / "adapters" / f"{c}.safetensors", extra_metadata={"class": c, "value": TYPE_LABELS[c]})
    log(f"single adapters: {len(classes)} x {adapter_steps} steps ({time.perf_counter() - t0:.1f} s)")

    values = [TYPE_LABELS[c] for c in classes]
    preds: dict[str, dict[str, torch.Tensor]] = {}  # method -> class -> label slices (class value or 0)
    base_p = _probs(base, xte)
    preds["base (any blood)"] = {c: (base_p >= 0.5).long() * TYPE_LABELS[c] for c in classes}
    preds["single adapter"] = {c: (_probs(singles[c], xte) >= 0.5).long() * TYPE_LABELS[c] for c in classes}
    bank = AdapterBank(base)
    for c in classes:
        bank.add(c, singles[c])
    # Priority: the smaller, rarer collections first (they lose most when a large neighbour claims their edge).
    prio_order = ("epidural", "intraventricular", "subdural", "intraparenchymal", "subarachnoid")
    priority = sorted(range(len(classes)), key=lambda k: prio_order.index(classes[k]))
    timing: dict[str, float] = {}
    with torch.no_grad():
        for rule in ("probability", "priority"):
            t1 = time.perf_counter()
            labels, _ = compose_outputs(bank, xte, classes, values=values, rule=rule, priority=priority)
            timing[f"composition ({rule})"] = (time.perf_counter() - t1) / test_cases
            preds[f"composition ({rule})"] = {c: labels for c in classes}
        t1 = time.perf_counter()
        for c in classes:
            singles[c](xte)
        timing["single adapters, one after another"] = (time.perf_counter() - t1) / test_cases
        t1 = time.perf_counter()
        base(xte)
        timing["one network (base, a merged adapter)"] = (time.perf_counter() - t1) / test_cases
    log(f"composition done ({time.perf_counter() - t0:.1f} s)")
    routing = _route_cases(base, bank, classes, values, train, xte, test_cases, depth, preds, timing, seed)
    log(f"router done ({time.perf_counter() - t0:.1f} s)")

    merges: dict[str, Any] = {}
    rows = {"merge (other classes' adapters)": {}, "merge (pool incl. own adapter)": {},
            "fresh adapter (same few cases)": {}, "merge (random adapters)": {}}
    for i, c in enumerate(classes):
        v = TYPE_LABELS[c]
        holders = [j for j, (_, lab) in enumerate(train) if np.any(lab == v)][:few_cases]
        xf, yf = _slices([train[j] for j in holders])
        has = (yf == v).flatten(1).any(1)  # the search sees the slices holding the class (few evaluations' worth)
        xs, fg = xf[has], (yf[has] == v)[:, None].float()

        def fit(members, name, fg=fg, xs=xs, c=c, v=v):
            deltas = AdapterDeltas(base, members)

            def objective(w):
                with torch.no_grad():
                    return float(_loss(deltas.apply(w)(xs), fg))

            w, hist = search_coefficients(objective, len(members), budget=budget)
            merges.setdefault(c, {})[name] = {"weights": [round(x, 4) for x in w], "evaluations": len(hist),
                                              "objective": round(min(h[1] for h in hist), 4)}
            return (_probs(deltas.apply(w), xte) >= 0.5).long() * v

        others = [singles[o] for o in classes if o != c]
        rows["merge (other classes' adapters)"][c] = fit(others, "others")
        rows["merge (pool incl. own adapter)"][c] = fit([singles[o] for o in classes], "all")
        g = torch.Generator().manual_seed(seed + 100 + i)
        rnd = [random_like(m, g, scale_to=m) for m in others]
        rows["merge (random adapters)"][c] = fit(rnd, "random")
        few = fresh(xf, yf == v, seed + 200 + i)
        rows["fresh adapter (same few cases)"][c] = (_probs(few, xte) >= 0.5).long() * v
        merges[c]["few_cases"] = [f"ICH_{j:03d}" for j in holders]
        log(f"merging {c}: done ({time.perf_counter() - t0:.1f} s)")
    preds.update(rows)

    dice = {m: {c: _per_case(p[c], yte, depth, TYPE_LABELS[c]) for c in classes} for m, p in preds.items()}
    false_pos = {m: {c: _false_positive_cases(p[c], yte, depth, TYPE_LABELS[c]) for c in classes}
                 for m, p in preds.items()}
    stats = []
    for m in dice:
        if m == "single adapter":
            continue
        for c in classes:
            a, b = np.array(dice[m][c]), np.array(dice["single adapter"][c])
            keep = ~(np.isnan(a) | np.isnan(b))
            d = a[keep] - b[keep]
            lo, hi = bootstrap_ci(d)
            stats.append({"method": m, "class": c, "n": int(keep.sum()), "mean_diff": float(np.mean(d)) if d.size
                          else math.nan, "ci": [lo, hi], "p": wilcoxon_p(d) if d.size else math.nan})
    for s, p_adj in zip(stats, holm([s["p"] for s in stats]), strict=True):
        s["p_holm"] = p_adj
    n_params = parameter_report(singles[classes[0]]).adapter_params
    result = {"classes": classes, "types": [list(g) for g in groups], "train_cases": train_cases,
              "test_cases": test_cases, "few_cases": few_cases, "seed": seed, "base_steps": base_steps,
              "adapter_steps": adapter_steps, "rank": rank, "budget": budget,
              "priority": [classes[k] for k in priority],
              "dice": dice, "false_positive_cases": false_pos, "stats": stats, "merges": merges,
              "seconds_per_case": timing,
              "routing": routing, "adapter_parameters": n_params,
              "base_parameters": sum(p.numel() for p in base.parameters()),
              "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_bytes(out / "composition.json", json.dumps(result, indent=1, default=float) + "\n")
    atomic_write_bytes(out / "composition.md", _markdown(result))
    log(f"wrote {out / 'composition.md'} ({result['seconds']} s)")
    return result


def _route_cases(base, bank, classes, values, train, xte, test_cases, depth, preds, timing, seed) -> dict[str, Any]:
    """Case-level router on the base's pooled bottleneck (``M2``), trained on which classes each training case holds;
    at test it picks the adapters whose outputs are composed: top-1, top-2 (ReMix's fixed equal weights: each
    chosen adapter runs with its whole update), or every adapter it scores present (score > 0)."""
    torch.manual_seed(seed)

    def case_features(x):
        return torch.stack([pooled_features(base, "M2", x[i * depth:(i + 1) * depth]).mean(0)
                            for i in range(x.shape[0] // depth)])

    xtr, ytr = _slices(train)
    present = torch.stack([torch.tensor([bool((ytr[i * depth:(i + 1) * depth] == v).any()) for v in values])
                           for i in range(len(train))])
    router = CaseRouter(int(case_features(xtr[:depth]).shape[1]), len(classes), classes)
    losses = router.fit(case_features(xtr), present)
    ftest = case_features(xte)
    with torch.no_grad():
        scores = router(ftest)
    soft = torch.softmax(scores, dim=1)
    info: dict[str, Any] = {"train_loss": [round(losses[0], 4), round(losses[-1], 4)],
                            "effective_experts_softmax": round(float(effective_experts(soft).mean()), 3),
                            "chosen": {}}
    choices = {"router top-1 + composition": [torch.topk(scores[i], 1).indices.tolist() for i in range(test_cases)],
               "router top-2 + composition": [torch.topk(scores[i], 2).indices.tolist() for i in range(test_cases)],
               "router (score > 0) + composition": [
                   [k for k in range(len(classes)) if scores[i, k] > 0] or [int(scores[i].argmax())]
                   for i in range(test_cases)]}
    for name, chosen in choices.items():
        t1 = time.perf_counter()
        labels = []
        with torch.no_grad():
            for i, ks in enumerate(chosen):
                lab, _ = compose_outputs(bank, xte[i * depth:(i + 1) * depth], [classes[k] for k in ks],
                                         values=[values[k] for k in ks])
                labels.append(lab)
        timing[name] = (time.perf_counter() - t1) / test_cases
        merged = torch.cat(labels)
        preds[name] = {c: merged for c in classes}
        w = torch.zeros(test_cases, len(classes))
        for i, ks in enumerate(chosen):
            w[i, ks] = 1.0 / len(ks)
        info["chosen"][name] = {"mean_adapters": round(sum(map(len, chosen)) / test_cases, 2),
                                "effective_experts": round(float(effective_experts(w).mean()), 3)}
    return info


def _fmt(values: Sequence[float]) -> str:
    v = np.array(values, dtype=float)
    v = v[~np.isnan(v)]
    return "-" if v.size == 0 else f"{v.mean():.3f} ({v.size})"


def _markdown(r: dict[str, Any]) -> str:
    classes = r["classes"]
    lines = ["# Composition study (medlora compose)", "",
             f"Classes: {', '.join(classes)}; {r['train_cases']} training / {r['test_cases']} test cases; "
             f"merges fitted on {r['few_cases']} cases per class; seed {r['seed']}.", "",
             "Per-class Dice, mean over the test cases that hold the class (n); in brackets, the cases without the "
             "class where it was predicted anyway (false-positive cases):", "",
             "| method | " + " | ".join(classes) + " | mean |", "|---" * (len(classes) + 2) + "|"]
    for m, per in r["dice"].items():
        means = [np.nanmean(np.array(per[c], dtype=float)) if not np.all(np.isnan(per[c])) else math.nan
                 for c in classes]
        fp = r["false_positive_cases"][m]
        lines.append(f"| {m} | " + " | ".join(f"{_fmt(per[c])} [{fp[c]}]" for c in classes)
                     + f" | {np.nanmean(means):.3f} |")
    lines += ["", "Against the class's own single adapter (paired per case; 95% bootstrap CI; Wilcoxon, Holm):", "",
              "| method | class | n | mean diff | CI | p (Holm) |", "|---|---|---|---|---|---|"]
    for s in r["stats"]:
        lines.append(f"| {s['method']} | {s['class']} | {s['n']} | {s['mean_diff']:+.3f} | "
                     f"[{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}] | {s['p_holm']:.3g} |")
    lines += ["", "Inference time per case (s, CPU):", ""]
    lines += [f"- {k}: {v:.4f}" for k, v in r["seconds_per_case"].items()]
    ro = r["routing"]
    lines += ["", f"Router: training BCE {ro['train_loss'][0]} -> {ro['train_loss'][1]}; effective number of experts "
              f"of its softmax over the {len(classes)} adapters: {ro['effective_experts_softmax']}; "
              + "; ".join(f"{k}: {v['mean_adapters']} adapters per case" for k, v in ro["chosen"].items()) + "."]
    lines += ["", f"Adapter parameters (each): {r['adapter_parameters']}; base parameters: {r['base_parameters']}.",
              f"Priority order: {', '.join(r['priority'])}.", ""]
    return "\n".join(lines)
