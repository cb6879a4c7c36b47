"""LoRA-Mixer-style routing of two single-class adapters on the SAM-style backbone (``docs/composition.md``).

Multi-class ``ich`` phantoms (the cohort of ``medlora compose``: 48 x 48 x 16, 2D axial slices, type groups
``sah ivh iph sah+ivh``). A tiny SAM (``SamSegmenter("tiny")``, no pretrained weights) is trained on the binary
"any blood" view; one LoRA adapter on the encoder's ``attn.qkv``/``attn.proj`` per class (subarachnoid,
intraventricular) on that class alone. Wanted: one map holding both classes and nothing else (intraparenchymal
blood excluded). Compared on held-out cases: each adapter alone, output composition (the higher of the two
adapters' probabilities, the baseline of docs/composition.md), the mixer with uniform weights, and routers
(experts frozen, trained on the two-class target) without and with the specialisation-balance loss, soft and as
ReMix's top-1 equal weights. Printed: Dice of the two-class map (all test voxels pooled), recall of each class,
voxels predicted outside the two classes, and the effective number of experts.

    python scripts/mixer_sam_study.py --seeds 0,1,2      # about 4 min per seed on one core
    python scripts/mixer_sam_study.py --save runs/mixer  # also write base, experts and each trained mixer

``--save DIR`` writes, per seed, ``DIR/seed<n>/base.safetensors``, the two experts as adapter files and each
soft-trained mixer as a composition file (``save_mixer``, selection ``mixer``; label value 1 = either class) that
``medlora infer --model .../base.safetensors --composition .../mixer_soft_balance<b>.safetensors`` runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medlora.adapters import AdapterConfig, inject, save_adapter  # noqa: E402
from medlora.adapters.multi import attach_mixer, fix_gates, mixer_balance_loss, mixer_stats  # noqa: E402
from medlora.adapters.multi.files import save_mixer  # noqa: E402
from medlora.adapters.multi.mixer import mixer_layers  # noqa: E402
from medlora.data.phantoms import TYPE_LABELS, parse_types  # noqa: E402
from medlora.fileio import atomic_save_safetensors  # noqa: E402
from medlora.models.sam import SamSegmenter  # noqa: E402

# The composition study's cohort, slicing, loss and half-positive sampler, so that both studies see the same data.
from medlora.training.composition import _HU, _cohort, _loss, _probs, _slices, _train  # noqa: E402

TARGETS = ["attn.qkv", "attn.proj"]
CLASSES = ("subarachnoid", "intraventricular")


def train_router(model: torch.nn.Module, x: torch.Tensor, fg: torch.Tensor, steps: int, lr: float, seed: int,
                 balance: float, batch: int = 8) -> float:
    """Adam on the routers with half-positive batches, ``balance`` weighing the balance loss. Returns seconds."""
    g = torch.Generator().manual_seed(seed)
    has = fg.flatten(1).any(1)
    pools = [torch.nonzero(has).flatten(), torch.nonzero(~has).flatten()]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.cat([p[torch.randint(len(p), (batch // 2,), generator=g)] for p in pools if len(p)])
        loss = _loss(model(x[idx]), fg[idx, None].float())
        if balance:
            loss = loss + balance * mixer_balance_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return time.perf_counter() - start


def scores(prob: torch.Tensor, labels: torch.Tensor, values: list[int]) -> dict:
    pred = prob > 0.5
    want = torch.isin(labels, torch.tensor(values))
    row = {"dice": float(2 * (pred & want).sum() / max(int(pred.sum() + want.sum()), 1)),
           "outside": int((pred & ~want).sum())}
    for name, v in zip(CLASSES, values, strict=True):
        row[f"recall {name}"] = float((pred & (labels == v)).sum() / max(int((labels == v).sum()), 1))
    return row


def run(args, seed: int) -> list[dict]:
    groups = parse_types(["sah", "ivh", "iph", "sah+ivh"])
    xtr, ytr = _slices(_cohort(args.train_cases, seed, 0, groups))
    xte, yte = _slices(_cohort(args.test_cases, seed, args.train_cases, groups))
    values = [TYPE_LABELS[c] for c in CLASSES]
    two = torch.isin(ytr, torch.tensor(values))
    torch.manual_seed(seed)
    base = SamSegmenter("tiny", image_size=48)
    for p in base.parameters():
        p.requires_grad_(True)
    _train(base, xtr, ytr > 0, args.base_steps, 1e-3, seed)
    rows: list[dict] = []

    def record(name: str, prob: torch.Tensor, model: torch.nn.Module | None = None) -> None:
        row = {"model": name, **scores(prob, yte, values)}
        stats = mixer_stats(model) if model is not None else {}
        if stats:
            row["effective"] = sum(s["effective"] for s in stats.values()) / len(stats)
            row["usage_effective"] = sum(s["usage_effective"] for s in stats.values()) / len(stats)
        rows.append(row)
        print(f"{name:<34} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in row.items() if k != "model"), flush=True)

    record("base (any blood)", _probs(base, xte))
    experts = []
    for j, name in enumerate(CLASSES):
        torch.manual_seed(seed + 10 + j)
        expert = inject(copy.deepcopy(base), AdapterConfig("lora", rank=args.rank, targets=TARGETS))
        experts.append(_train(expert, xtr, ytr == values[j], args.adapter_steps, 3e-3, seed + 20 + j))
        record(f"adapter {name} alone", _probs(expert, xte))
    save = Path(args.save) / f"seed{seed}" if args.save else None
    files: list[Path] = []
    if save is not None:  # what medlora infer needs to rebuild and feed the base
        arch = {"backbone": "sam", "backbone_args": {"variant": "tiny", "image_size": 48}, "spatial_dims": 2}
        prep = {"hu_window": list(_HU), "target_spacing": None, "roi_size": [48, 48], "threshold": 0.5}
        (save / "experts").mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(base.state_dict(), save / "base.safetensors")
        files = [save_adapter(e, save / "experts" / f"{c}.safetensors", extra_metadata={
            "class": c, "value": v, **arch, "preprocessing": prep}) for e, c, v in zip(experts, CLASSES, values,
                                                                                      strict=True)]
    record("output composition (max prob.)", torch.maximum(*[_probs(e, xte) for e in experts]))
    mixer = attach_mixer(copy.deepcopy(base), experts, targets=TARGETS, names=list(CLASSES))
    fix_gates(mixer, [0.5, 0.5])
    record("mixer, uniform weights", _probs(mixer, xte), mixer)
    for balance in (0.0, args.balance):
        torch.manual_seed(seed + 30)
        model = attach_mixer(copy.deepcopy(base), experts, targets=TARGETS, names=list(CLASSES))
        train_router(model, xtr, two, args.router_steps, args.router_lr, seed + 40, balance)
        record(f"router soft (balance {balance:g})", _probs(model, xte), model)
        if save is not None:
            save_mixer(save / f"mixer_soft_balance{balance:g}.safetensors", model, base, files, values,
                       architecture=arch, preprocessing=prep)
        for _, layer in mixer_layers(model):
            layer.set_routing("topk_equal", k=1)
        record(f"router top-1 equal (balance {balance:g})", _probs(model, xte), model)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-cases", type=int, default=12)
    parser.add_argument("--test-cases", type=int, default=8)
    parser.add_argument("--base-steps", type=int, default=400)
    parser.add_argument("--adapter-steps", type=int, default=300)
    parser.add_argument("--router-steps", type=int, default=150)
    parser.add_argument("--router-lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--balance", type=float, default=0.1, help="weight of the specialisation-balance loss")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", help="write base, experts and the trained soft mixers under this folder")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in [int(s) for s in args.seeds.split(",")]:
            print(f"-- seed {seed}", flush=True)
            runs.append(run(args, seed))
    keys = list(dict.fromkeys(k for row in runs[0] for k in row if k != "model"))
    print("\n| model | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for rows in zip(*runs, strict=True):
        cells = []
        for k in keys:
            vals = [r.get(k) for r in rows if r.get(k) is not None]
            cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "")
        print(f"| {rows[0]['model']} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2), encoding="utf-8")
    return runs


if __name__ == "__main__":
    main()
