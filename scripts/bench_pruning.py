"""LoRAPrune and LoRAM on the embedded phantoms: Dice, inference time, training time and memory against sparsity.

A 2D multi-view UNet (the seed's slice setting, width 16, level 2) is pretrained on TBI phantoms, then adapted to
SAH phantoms with LoRA (rank 4, every convolution but the logit head; norms frozen in evaluation mode):

* LoRAPrune: LoRA training with :class:`medlora.pruning.LoRAPruner` to each target sparsity (cubic schedule), then
  ``medlora prune`` (:func:`medlora.pruning.files.run_prune`) writes the smaller base with the adapter merged;
  held-out Dice and inference time of that base (sparsity 0: plain LoRA on the full base, nothing pruned);
* LoRAM: the base pruned from ``W0`` with the same masks (``medlora prune --no-merge``), a LoRA trained on it
  (training time per step, activation memory saved for backward, base weights), its Dice on the small base, then
  ``medlora recover`` to the full base, merged, and its Dice there;
* with ``--align-steps N``, LoRAM again on the pruned ``W0`` aligned to the full base first (``medlora prune
  --align-steps``: distillation on 16 synthetic phantom volumes of the data's grid), timed;
* the agreement (Spearman, per channel group) of LoRA-guided importance with the true-gradient one.

    python scripts/bench_pruning.py --out /tmp/bench_pruning            # ~12 min on one CPU thread
    python scripts/bench_pruning.py --steps 40 --sparsities 0,0.5      # a quick look
    python scripts/bench_pruning.py --sparsities 0,0.5 --align-steps 200   # LoRAM at 50%, with and without alignment

Times are the minimum of 7 rounds in which the models take turns (``--threads`` CPU threads), so that a shared
machine's load hits them alike; ``--timing-only`` re-times the files of an earlier run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medlora.adapters import AdapterConfig, inject, merge, save_adapter  # noqa: E402
from medlora.assembly import ModelSpec, build_model  # noqa: E402
from medlora.data.phantoms import generate_case  # noqa: E402
from medlora.models.mv_unet import MultiViewUNet  # noqa: E402
from medlora.pruning import LoRAPruner  # noqa: E402
from medlora.pruning.files import pruned_spec, run_prune, run_recover  # noqa: E402
from medlora.training.transfer import SyntheticSpec  # noqa: E402

ARGS = {"width": 16, "level": 2}
SHAPE, SPACING = (64, 64, 20), (3.2, 3.2, 5.5)
ADAPTER = {"method": "lora", "rank": 4, "targets": ["*"], "target_types": ["Conv2d"], "exclude": ["M3.TripleOut.6"]}


def cases(domain: str, seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(Z, 1, H, W) images windowed to [0, 140] HU and scaled to [0, 1], with their labels."""
    out = []
    for i in range(n):
        img, lab, _, _ = generate_case(domain, seed, i, shape=SHAPE, spacing=SPACING)
        x = torch.from_numpy(np.clip(img, 0.0, 140.0) / 140.0).permute(2, 0, 1)[:, None].float()
        y = torch.from_numpy(lab > 0).permute(2, 0, 1)[:, None].float()
        out.append((x, y))
    return out


def batches(data, batch: int, steps: int, seed: int):
    xs = torch.cat([x for x, _ in data])
    ys = torch.cat([y for _, y in data])
    g = torch.Generator().manual_seed(seed)
    weight = 0.2 + ys.flatten(1).amax(1)  # slices with blood drawn 6x as often as the others
    for _ in range(steps):
        idx = torch.multinomial(weight, batch, replacement=True, generator=g)
        yield xs[idx], ys[idx]


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
    return nn.functional.binary_cross_entropy_with_logits(logits, y) + dice


def train(model: nn.Module, data, steps: int, lr: float, seed: int, pruner: LoRAPruner | None = None,
          batch: int = 8) -> dict:
    """Adam on the trainable parameters; norms stay in evaluation mode (frozen statistics)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    times, saved_bytes = [], []
    for x, y in batches(data, batch, steps, seed):
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor, seen: dict[int, int] = seen) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        if pruner is not None:
            pruner.step()
        opt.step()
        times.append(time.perf_counter() - start)
        saved_bytes.append(sum(seen.values()))
    return {"step_s": statistics.median(times), "saved_for_backward_mb": max(saved_bytes) / 2**20,
            "final_loss": float(loss.detach())}


@torch.no_grad()
def dice(model: nn.Module, data) -> float:
    model.eval()
    scores = []
    for x, y in data:
        pred = (torch.sigmoid(model(x)) > 0.5).float()
        denom = float(pred.sum() + y.sum())
        if denom:
            scores.append(2 * float((pred * y).sum()) / denom)
    return float(np.mean(scores))


@torch.no_grad()
def infer_time(model: nn.Module, data, repeats: int = 3) -> float:
    model.eval()
    x = torch.cat([x for x, _ in data])
    model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(out: Path, sparsities: list[float], test, train_data, repeats: int = 7) -> dict:
    """Minimum over ``repeats`` rounds, the models taking turns within each round, so that the load of a shared
    machine hits them alike: inference on the merged/pruned bases, one LoRA training step on the full and on the
    pruned-W0 bases."""
    from medlora.models.weights import load_weights

    base = load_weights(MultiViewUNet(spatial_dims=2, **ARGS), out / "base.safetensors").eval()
    infer = {0.0: base}
    train_nets = {0.0: inject(copy.deepcopy(base), AdapterConfig.from_dict(ADAPTER))}
    for s in sparsities:
        if s > 0:
            infer[s] = build_model(pruned_spec(out / f"pruned_s{s}.safetensors")).eval()
            spec = pruned_spec(out / f"pruned_w0_s{s}.safetensors", adapter=AdapterConfig.from_dict(ADAPTER))
            train_nets[s] = build_model(spec).eval()
    x = torch.cat([x for x, _ in test[:2]])
    xb, yb = next(batches(train_data, 8, 1, seed=5))
    best_infer = {s: float("inf") for s in infer}
    best_step = {s: float("inf") for s in train_nets}
    for _ in range(repeats):
        for s, net in infer.items():
            with torch.no_grad():
                start = time.perf_counter()
                net(x)
                best_infer[s] = min(best_infer[s], time.perf_counter() - start)
        for s, net in train_nets.items():
            start = time.perf_counter()
            loss_fn(net(xb), yb).backward()
            best_step[s] = min(best_step[s], time.perf_counter() - start)
    return {"infer_s": best_infer, "train_step_s": best_step}


def importance_agreement(out: Path, data, batches_n: int = 10) -> dict:
    """Spearman rank correlation, per channel group, between LoRAPrune's LoRA-guided importance and the one from
    the frozen weight's true gradient (the official ``prune_metric='grad'``: ``|dL/dW ⊙ (W0 + s BA)|``), both
    summed over ``batches_n`` batches, for the plain LoRA adapter of the run (sparsity 0)."""
    from scipy.stats import spearmanr

    from medlora.adapters import iter_adapters, load_adapter
    from medlora.models.weights import load_weights
    from medlora.pruning import channel_graph, group_importance
    from medlora.pruning.loraprune import _slot_scores

    model = load_weights(MultiViewUNet(spatial_dims=2, **ARGS), out / "base.safetensors").eval()
    load_adapter(model, out / "loraprune_s0.0.safetensors")
    graph = channel_graph(model)
    layers = {name: (module, r) for name, module, r in iter_adapters(model)}
    for module, _ in layers.values():
        module.parametrizations["weight"].original.requires_grad_(True)
    lora_sum: dict[str, torch.Tensor] = {}
    true_sum: dict[str, torch.Tensor] = {}
    for x, y in batches(data, 8, batches_n, seed=9):
        model.zero_grad()
        loss_fn(model(x), y).backward()
        for name, v in group_importance(model, graph).items():
            lora_sum[name] = lora_sum.get(name, 0) + v
        with torch.no_grad():
            scores = {n: (r.layout.to_canonical(m.parametrizations["weight"].original.grad)
                          * r.layout.to_canonical(m.weight)).abs() for n, (m, r) in layers.items()}
        for g in graph:
            total = None
            for slot in g.slots:
                if slot.layer in scores:
                    v = _slot_scores(scores[slot.layer], g, slot.axis, slot.offset).double()
                    v = v / (torch.linalg.vector_norm(v) + 1e-8)
                    total = v if total is None else total + v
            if total is not None:
                true_sum[g.name] = true_sum.get(g.name, 0) + total
    rho = {n: float(spearmanr(lora_sum[n].numpy(), true_sum[n].numpy()).statistic) for n in lora_sum}
    values = list(rho.values())
    return {"groups": len(values), "mean": float(np.mean(values)), "min": float(np.min(values)),
            "max": float(np.max(values)), "per_group": rho}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def base_mb(model: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_pruning", help="folder for the bases, adapters and results.json")
    ap.add_argument("--steps", type=int, default=120, help="adapter training steps per run")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--sparsities", default="0,0.25,0.5,0.75")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--align-steps", type=int, default=0, help="also run LoRAM on the pruned base aligned this many "
                    "distillation steps (0: not)")
    ap.add_argument("--agreement-only", action="store_true",
                    help="only compute the Spearman agreement of LoRA-guided and true-gradient importance")
    ap.add_argument("--timing-only", action="store_true",
                    help="only re-time the files of an earlier run in --out (interleaved, minimum of 7)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sparsities = [float(s) for s in args.sparsities.split(",")]

    tbi, sah = cases("tbi", 0, 12), cases("sah", 1, 12)
    sah_train, sah_test = sah[:8], sah[8:]
    if args.agreement_only:
        agreement = importance_agreement(out, sah_train)
        print(json.dumps({k: v for k, v in agreement.items() if k != "per_group"}))
        return
    if args.timing_only:
        results = json.loads((out / "results.json").read_text())
        retime(results, out, sparsities, sah_test, sah_train)
        return
    torch.manual_seed(0)
    base = MultiViewUNet(spatial_dims=2, **ARGS).eval()
    base_path = out / "base.safetensors"
    if base_path.is_file():
        from medlora.models.weights import load_weights

        load_weights(base, base_path)
    else:
        train(base, tbi, args.pretrain_steps, 2e-3, seed=0)
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_path))
    results = {"base": {"dice_sah": dice(base, sah_test), "dice_tbi": dice(base, tbi[:4]), "params": n_params(base),
                        "infer_s": infer_time(base, sah_test[:2])}, "loraprune": [], "loram": []}
    print(json.dumps(results["base"]))
    record = {"backbone": "mv_unet", "backbone_args": ARGS, "spatial_dims": 2,
              "preprocessing": {"hu_window": [0.0, 140.0], "target_spacing": None, "roi_size": list(SHAPE[:2]),
                                "threshold": 0.5}}

    for s in sparsities:
        model = copy.deepcopy(base)
        inject(model, AdapterConfig.from_dict(ADAPTER))
        pruner = LoRAPruner(model, s, total_steps=args.steps) if s > 0 else None
        stats = train(model, sah_train, args.steps, 1e-3, seed=1, pruner=pruner)
        adapter = out / f"loraprune_s{s}.safetensors"
        extra = {**record, **({"loraprune": pruner.record()} if pruner else {})}
        if pruner:
            pruner.remove_masks()
        save_adapter(model, adapter, extra_metadata=extra)
        row = {"sparsity": s, "train_step_s": stats["step_s"]}
        if pruner is None:
            small = merge(model).eval()
        else:
            small_path = out / f"pruned_s{s}.safetensors"
            run_prune(base_path, adapter, small_path, overwrite=True)
            small = build_model(pruned_spec(small_path)).eval()
        row.update(dice=dice(small, sah_test), params=n_params(small), infer_s=infer_time(small, sah_test[:2]))
        results["loraprune"].append(row)
        print(json.dumps(row), flush=True)
        if pruner is None:
            results["full_lora"] = {**stats, "dice": row["dice"], "base_mb": base_mb(base)}
            continue
        # LoRAM on the base pruned from W0 with these masks (and aligned to the full base first)
        for align in [0] + ([args.align_steps] if args.align_steps else []):
            tag = f"s{s}" + (f"_aligned{align}" if align else "")
            w0_path = out / f"pruned_w0_{tag}.safetensors"
            start = time.perf_counter()
            pruned = run_prune(base_path, adapter, w0_path, merge=False, overwrite=True, align_steps=align,
                               align_synthetic=SyntheticSpec(volumes=16, shape=SHAPE, spacing=SPACING))
            prune_s = time.perf_counter() - start
            spec = pruned_spec(w0_path, adapter=AdapterConfig.from_dict(ADAPTER))
            small = build_model(spec).eval()
            small_dice0 = dice(small, sah_test)
            torch.manual_seed(0)
            start = time.perf_counter()
            stats = train(small, sah_train, args.steps, 1e-3, seed=1)
            train_s = time.perf_counter() - start
            small_adapter = out / f"loram_small_{tag}.safetensors"
            rec = spec.to_dict()
            save_adapter(small, small_adapter, extra_metadata={k: rec[k] for k in ("backbone", "backbone_args",
                                                                                 "spatial_dims")})
            merged_path = out / f"loram_full_merged_{tag}.safetensors"
            run_recover(base_path, small_adapter, out / f"loram_full_{tag}.safetensors", merged_out=merged_path,
                        overwrite=True)
            full = build_model(ModelSpec("mv_unet", ARGS, 2, pretrained=str(merged_path))).eval()
            row = {"sparsity": s, "align_steps": align, "prune_s": prune_s, "train_s": train_s,
                   "align_loss": [pruned["aligned"][k] for k in ("first_loss", "last_loss")] if align else None,
                   "train_step_s": stats["step_s"], "saved_for_backward_mb": stats["saved_for_backward_mb"],
                   "base_mb": base_mb(small), "dice_pruned_base_alone": small_dice0,
                   "dice_small": dice(small, sah_test), "dice_recovered_full": dice(full, sah_test)}
            results["loram"].append(row)
            print(json.dumps(row), flush=True)

    if 0.0 in sparsities:
        results["importance_agreement"] = importance_agreement(out, sah_train)
    retime(results, out, sparsities, sah_test, sah_train)


def retime(results: dict, out: Path, sparsities: list[float], test, train_data) -> None:
    """Replace the in-run times by interleaved minimum times (the in-run ones drift with the machine's load)."""
    times = interleaved_times(out, sparsities, test, train_data)
    steps = times["train_step_s"]
    results["base"]["infer_s"] = times["infer_s"][0.0]
    for row in results["loraprune"]:
        row["infer_s"] = times["infer_s"][row["sparsity"]]
    results["full_lora"]["step_s"] = steps[0.0]
    for row in results["loram"]:
        row["train_step_s"] = steps[row["sparsity"]]
    results["timing"] = "interleaved minimum of 7 rounds"
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))


def table(r: dict) -> str:
    b, f = r["base"], r.get("full_lora", {})
    lines = [f"base alone (TBI-pretrained): SAH Dice {b['dice_sah']:.3f}, {b['params']:,} parameters, "
             f"inference {b['infer_s'] * 1000:.0f} ms", "",
             "| sparsity | parameters | SAH Dice | inference (ms) | speed-up |", "|---|---|---|---|---|"]
    full_t = next((x["infer_s"] for x in r["loraprune"] if x["sparsity"] == 0), b["infer_s"])
    for x in r["loraprune"]:
        lines.append(f"| {x['sparsity']:.2f} | {x['params']:,} | {x['dice']:.3f} | {x['infer_s'] * 1000:.0f} | "
                     f"{full_t / x['infer_s']:.2f}x |")
    lines += ["", "| LoRA trained on | step (ms) | saved for backward (MB) | base weights (MB) | Dice on the small "
              "base | Dice recovered to the full base |", "|---|---|---|---|---|---|"]
    if f:
        lines.append(f"| full base | {f['step_s'] * 1000:.0f} | {f['saved_for_backward_mb']:.1f} | "
                     f"{f['base_mb']:.2f} | - | {f['dice']:.3f} |")
    for x in r["loram"]:
        aligned = f", aligned {x['align_steps']} steps ({x['prune_s']:.0f} s)" if x.get("align_steps") else ""
        lines.append(f"| pruned base, s={x['sparsity']:.2f}{aligned} | {x['train_step_s'] * 1000:.0f} | "
                     f"{x['saved_for_backward_mb']:.1f} | {x['base_mb']:.2f} | {x['dice_small']:.3f} "
                     f"(before training {x['dice_pruned_base_alone']:.3f}) | {x['dice_recovered_full']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
