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
5. routes per case (:class:`~medlora.adapters.multi.CaseRouter` on the base's bottleneck averaged where the base
   sees blood, trained on which classes each training case holds, or by RLOO on a Dice reward as ReMix) and
   composes only the chosen adapters (top-1, top-2, or those scored present); every composition and router is
   saved as a composition file that ``medlora infer --composition`` runs;
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
    CompositionSpec,
    compose_outputs,
    effective_experts,
    fuse_class_maps,
    random_like,
    save_composition,
    search_coefficients,
)
from ..data.phantoms import TYPE_LABELS, generate_case, parse_types
from ..errors import MedloraError
from ..evaluation.statistics import bootstrap_ci, holm, wilcoxon_p
from ..fileio import atomic_save_safetensors, atomic_write_bytes

__all__ = ["DEFAULT_TYPES", "composition_reward", "run_composition_study"]

DEFAULT_TYPES = ("sah", "ivh", "iph", "sdh", "sah+ivh", "iph+sdh")
_SHAPE, _SPACING, _HU = (48, 48, 16), (4.0, 4.0, 10.0), (0.0, 140.0)


_SETTINGS = ("types", "train_cases", "test_cases", "few_cases", "seed", "base_steps", "adapter_steps", "adapter_lr",
             "rank", "budget", "width", "rloo_steps")


def read_compose_config(path: str | Path) -> dict[str, Any]:
    """The settings of a ``medlora compose --config`` preset: a YAML mapping of :func:`run_composition_study`'s
    keyword arguments (``name`` and ``description`` are allowed and ignored). One line naming the file and the
    key on anything else."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MedloraError(f"{path}: cannot read the compose preset ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise MedloraError(f"{path}: a compose preset is a mapping of settings, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k not in ("name", "description")}
    unknown = sorted(set(data) - set(_SETTINGS))
    if unknown:
        raise MedloraError(f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(_SETTINGS)})")
    for key, value in data.items():
        want = (list,) if key == "types" else (float, int) if key == "adapter_lr" else (int,)
        if not isinstance(value, want) or isinstance(value, bool):
            raise MedloraError(f"{path}: {key}: expected {'a list of type groups' if key == 'types' else 'a number'},"
                               f" got {value!r}")
    return data


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


def composition_reward(labels: torch.Tensor, truth: torch.Tensor, values: Sequence[int]) -> float:
    """The RLOO router's reward for one case: the mean Dice over the classes (label ``values``) that the truth or
    the prediction holds, so a missed class and a class predicted where there is none both cost; 1 when neither
    holds any."""
    scores = []
    for v in values:
        p, t = labels == v, truth == v
        total = int(p.sum()) + int(t.sum())
        if total:
            scores.append(2.0 * int((p & t).sum()) / total)
    return float(np.mean(scores)) if scores else 1.0


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
                          rloo_steps: int = 200, adapter_lr: float = 5e-3, log=None) -> dict[str, Any]:
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
    atomic_save_safetensors(base.state_dict(), out / "base.safetensors")
    # what medlora infer needs to rebuild and feed the base (the records training writes into adapter files)
    records = {"backbone": "mv_unet", "spatial_dims": 2,
               "backbone_args": {"in_channels": 1, "out_channels": 1, "width": width, "norm": "instance"},
               "preprocessing": {"hu_window": list(_HU), "target_spacing": None, "roi_size": list(_SHAPE[:2]),
                                 "threshold": 0.5}}
    config = AdapterConfig("lora", rank=rank, alpha=2.0 * rank)

    def fresh(x, fg, s):
        torch.manual_seed(s)
        return _train(inject(copy.deepcopy(base), config), x, fg, adapter_steps, adapter_lr, s)

    singles = {c: fresh(xtr, ytr == TYPE_LABELS[c], seed + 10 + i) for i, c in enumerate(classes)}
    (out / "adapters").mkdir(exist_ok=True)
    for c, m in singles.items():
        save_adapter(m, out / "adapters" / f"{c}.safetensors",
                     extra_metadata={"class": c, "value": TYPE_LABELS[c], **records})
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
    files = [out / "adapters" / f"{c}.safetensors" for c in classes]
    (out / "compositions").mkdir(exist_ok=True)
    arch = {k: records[k] for k in ("backbone", "backbone_args", "spatial_dims")}
    with torch.no_grad():
        for rule in ("probability", "priority"):
            t1 = time.perf_counter()
            labels, _ = compose_outputs(bank, xte, classes, values=values, rule=rule, priority=priority)
            timing[f"composition ({rule})"] = (time.perf_counter() - t1) / test_cases
            preds[f"composition ({rule})"] = {c: labels for c in classes}
            save_composition(out / "compositions" / f"output_{rule}.safetensors",
                             CompositionSpec(classes, values, rule=rule, priority=priority), base, files,
                             architecture=arch, preprocessing=records["preprocessing"])
        t1 = time.perf_counter()
        for c in classes:
            singles[c](xte)
        timing["single adapters, one after another"] = (time.perf_counter() - t1) / test_cases
        t1 = time.perf_counter()
        base(xte)
        timing["one network (base, a merged adapter)"] = (time.perf_counter() - t1) / test_cases
    log(f"composition done ({time.perf_counter() - t0:.1f} s)")
    routing = _route_cases(base, bank, classes, values, train, xte, depth, preds, timing, seed, rloo_steps,
                           lambda name, spec: save_composition(out / "compositions" / f"{name}.safetensors", spec,
                                                               base, files, architecture=arch,
                                                               preprocessing=records["preprocessing"]))
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
    case_scores, versus = _against_output(preds, yte, depth, test_cases, classes, values)
    n_params = parameter_report(singles[classes[0]]).adapter_params
    result = {"classes": classes, "types": [list(g) for g in groups], "train_cases": train_cases,
              "test_cases": test_cases, "few_cases": few_cases, "seed": seed, "base_steps": base_steps,
              "adapter_steps": adapter_steps, "rank": rank, "budget": budget, "rloo_steps": rloo_steps,
              "adapter_lr": adapter_lr,
              "priority": [classes[k] for k in priority],
              "dice": dice, "false_positive_cases": false_pos, "stats": stats, "merges": merges,
              "seconds_per_case": timing,
              "routing": routing, "adapter_parameters": n_params, "case_scores": case_scores,
              "versus_output": versus,
              "base_parameters": sum(p.numel() for p in base.parameters()),
              "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_bytes(out / "composition.json", json.dumps(result, indent=1, default=float) + "\n")
    atomic_write_bytes(out / "composition.md", _markdown(result))
    log(f"wrote {out / 'composition.md'} ({result['seconds']} s)")
    return result


_ROUTERS = {  # table row -> (composition file name, training, selection, k)
    "router top-1 + composition": ("router_top1", "supervised", "top-k", 1),
    "router top-2 + composition": ("router_top2", "supervised", "top-k", 2),
    "router (score > 0) + composition": ("router_present", "supervised", "present", None),
    "RLOO router top-1 + composition": ("rloo_top1", "rloo", "top-k", 1),
    "RLOO router top-2 + composition": ("rloo_top2", "rloo", "top-k", 2),
}


def _route_cases(base, bank, classes, values, train, xte, depth, preds, timing, seed, rloo_steps,
                 save) -> dict[str, Any]:
    """Case routers on the base's pooled bottleneck (``M2``, averaged where the base sees blood: ``foreground``
    pooling of :class:`CompositionSpec`) that pick the adapters whose outputs are composed.

    Supervised (:meth:`CaseRouter.fit`: which classes each training case holds): top-1, top-2 or every adapter it
    scores present (score > 0). ReMix-style (:meth:`CaseRouter.fit_rloo`, one router per k): a policy over
    k-subsets trained by RLOO with :func:`composition_reward` of the chosen adapters' composition on the training
    case; at test its deterministic top-k. Each chosen adapter runs with its whole update (ReMix's fixed equal
    weights). Every router is saved as a composition file (``save(name, spec)``) and the test cases run through
    the same :class:`CompositionSpec` that ``medlora infer --composition`` loads."""
    torch.manual_seed(seed)
    xtr, ytr = _slices(train)
    cases = [xtr[i * depth:(i + 1) * depth] for i in range(len(train))]
    probe = CompositionSpec(classes, values, select="all", pooled_layer="M2", pooling="foreground")
    ftr = torch.cat([probe.case_features(base, x) for x in cases])
    present = torch.stack([torch.tensor([bool((ytr[i * depth:(i + 1) * depth] == v).any()) for v in values])
                           for i in range(len(train))])
    supervised = CaseRouter(ftr.shape[1], len(classes), classes)
    losses = supervised.fit(ftr, present)
    with torch.no_grad():  # each adapter's class map on each training case, once: a subset's reward is a fusion
        train_probs = [compose_outputs(bank, x, classes, values=values)[1] for x in cases]
    cache: dict[tuple[int, tuple[int, ...]], float] = {}

    def reward(i: int, subset: tuple[int, ...]) -> float:
        if (i, subset) not in cache:
            labels = fuse_class_maps(train_probs[i][:, list(subset)], [values[j] for j in subset])
            cache[(i, subset)] = composition_reward(labels, ytr[i * depth:(i + 1) * depth], values)
        return cache[(i, subset)]

    info: dict[str, Any] = {"train_loss": [round(losses[0], 4), round(losses[-1], 4)], "chosen": {}, "rloo": {}}
    routers = {"supervised": supervised}
    for k in (1, 2):
        r = CaseRouter(ftr.shape[1], len(classes), classes)
        hist = r.fit_rloo(ftr, reward, k, steps=rloo_steps, generator=torch.Generator().manual_seed(seed + k))
        routers[f"rloo{k}"] = r
        w = max(1, len(hist["reward"]) // 10)  # first and last tenth of the steps
        info["rloo"][f"top-{k}"] = {
            "reward": [round(float(np.mean(hist["reward"][:w])), 4), round(float(np.mean(hist["reward"][-w:])), 4)],
            "effective_experts": [round(hist["effective_experts"][0], 3), round(hist["effective_experts"][-1], 3)],
            "best_reward": round(float(np.mean([max(reward(i, s) for s in _subsets(len(classes), k))
                                                for i in range(len(train))])), 4)}
    test_feats = torch.cat([probe.case_features(base, xte[i * depth:(i + 1) * depth])
                            for i in range(xte.shape[0] // depth)])
    for name, r in (("supervised", supervised), *((f"rloo top-{k}", routers[f"rloo{k}"]) for k in (1, 2))):
        with torch.no_grad():
            info.setdefault("effective_experts_softmax", {})[name] = round(float(
                effective_experts(torch.softmax(r(test_feats), 1)).mean()), 3)
    n_test = xte.shape[0] // depth
    for row, (file, training, select, k) in _ROUTERS.items():
        router = supervised if training == "supervised" else routers[f"rloo{k}"]
        spec = CompositionSpec(classes, values, select=select, k=k, router=router, pooled_layer="M2",
                               pooling="foreground")
        save(file, spec)
        t1 = time.perf_counter()
        labels, chosen = [], []
        with torch.no_grad():
            for i in range(n_test):
                lab, ks = spec.segment(bank, base, xte[i * depth:(i + 1) * depth])
                labels.append(lab)
                chosen.append(ks)
        timing[row] = (time.perf_counter() - t1) / n_test
        merged = torch.cat(labels)
        preds[row] = {c: merged for c in classes}
        w = torch.zeros(n_test, len(classes))
        for i, ks in enumerate(chosen):
            w[i, ks] = 1.0 / len(ks)
        info["chosen"][row] = {"mean_adapters": round(sum(map(len, chosen)) / n_test, 2),
                               "effective_experts": round(float(effective_experts(w).mean()), 3),
                               "picks": {c: sum(j in ks for ks in chosen) for j, c in enumerate(classes)}}
    return info


_OUTPUT = "composition (probability)"


def _against_output(preds, yte, depth, n_test, classes, values) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
    """Every method that gives one multi-class segmentation (the compositions and the routers), scored per test
    case by :func:`composition_reward` (mean Dice over the classes the truth or the prediction holds, so false
    classes count), paired against the output composition by probability over all test cases (one comparison per
    method, instead of one per class: every test case counts, which gives the Wilcoxon test its power); bootstrap
    CI of the mean difference and Holm over these comparisons."""
    multi = [m for m in preds if m.startswith("composition") or "router" in m]
    scores = {m: [composition_reward(preds[m][classes[0]][i * depth:(i + 1) * depth], yte[i * depth:(i + 1) * depth],
                                     values) for i in range(n_test)] for m in multi}
    versus = []
    for m in multi:
        if m == _OUTPUT:
            continue
        d = np.array(scores[m]) - np.array(scores[_OUTPUT])
        lo, hi = bootstrap_ci(d)
        versus.append({"method": m, "n": int(d.size), "mean": float(np.mean(scores[m])),
                       "mean_diff": float(np.mean(d)), "ci": [lo, hi], "p": wilcoxon_p(d)})
    for v, p_adj in zip(versus, holm([v["p"] for v in versus]), strict=True):
        v["p_holm"] = p_adj
    return scores, versus


def _subsets(n: int, k: int) -> list[tuple[int, ...]]:
    from itertools import combinations

    return list(combinations(range(n), k))


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
    base_mean = float(np.mean(r["case_scores"][_OUTPUT]))
    lines += ["", f"One multi-class segmentation per case, scored per case by the mean Dice over the classes the truth "
              f"or the prediction holds (false classes count), against {_OUTPUT} (mean {base_mean:.3f}; paired over "
              "all test cases; 95% bootstrap CI; Wilcoxon, Holm):", "",
              "| method | n | mean | mean diff | CI | p (Holm) |", "|---|---|---|---|---|---|"]
    for v in r["versus_output"]:
        lines.append(f"| {v['method']} | {v['n']} | {v['mean']:.3f} | {v['mean_diff']:+.3f} | "
                     f"[{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}] | {v['p_holm']:.3g} |")
    lines += ["", "Inference time per case (s, CPU):", ""]
    lines += [f"- {k}: {v:.4f}" for k, v in r["seconds_per_case"].items()]
    ro = r["routing"]
    soft = ", ".join(f"{k} {v}" for k, v in ro["effective_experts_softmax"].items())
    lines += ["", f"Supervised router: training BCE {ro['train_loss'][0]} -> {ro['train_loss'][1]}. Effective number "
              f"of experts of each router's softmax over the {len(classes)} adapters on the test cases: {soft}.",
              "", "RLOO routers (reward: mean Dice of the composed chosen adapters on a training case; first -> last "
              "tenth of the steps; effective experts of the softmax, first -> last step):", ""]
    lines += [f"- {k}: reward {v['reward'][0]} -> {v['reward'][1]} (best subset per case: {v['best_reward']}); "
              f"effective experts {v['effective_experts'][0]} -> {v['effective_experts'][1]}"
              for k, v in ro["rloo"].items()]
    lines += ["", "Adapters chosen on the test cases (mean per case; cases per adapter):", ""]
    lines += [f"- {k}: {v['mean_adapters']}; " + ", ".join(f"{c} {n}" for c, n in v["picks"].items())
              for k, v in ro["chosen"].items()]
    lines += ["", f"Adapter parameters (each): {r['adapter_parameters']}; base parameters: {r['base_parameters']}.",
              f"Priority order: {', '.join(r['priority'])}.", ""]
    return "\n".join(lines)
