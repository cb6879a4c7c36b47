"""Every adapter method and training rule on a small MONAI 3D UNet: parameters, loss, step time.

A toy segmentation transfer task that runs in a few minutes on a CPU: a MONAI ``UNet`` (3D, channels 16-32-64,
one residual unit; Conv3d and ConvTranspose3d layers) is first trained on bright spheres in noise (source task),
then fine-tuned on the shifted target task (dark spheres on a brighter, noisier background with an intensity
ramp) with every registered adapter method (``medlora.adapters.list_methods()``) on every convolution with at
least 16 input and output channels (the 1-channel stem and the 2-class head stay frozen), with LoRA
under every training rule (``medlora.adapters.optim.list_rules()``), and with full fine-tuning as the reference.
Columns: trainable parameters, their percentage of the model, held-out Dice-CE loss before/after, and the
median training-step time relative to full fine-tuning (the weight-space adapters run one convolution per
layer, so they should cost about the same as full fine-tuning).

    python scripts/methods_unet_table.py                          # every method and rule (~1-3 min, 1 thread)
    python scripts/methods_unet_table.py --methods lora,dora --rules lora_pro --steps 10
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medlora.adapters import AdapterConfig, candidate_layers, get_method, inject, list_methods  # noqa: E402
from medlora.adapters.optim import build_optimizer, list_rules  # noqa: E402

RULE_LR_MULTIPLIER = {"altlora": 10.0}  # a preconditioned-gradient step without Adam normalisation


def make_unet() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64), strides=(2, 2),
                num_res_units=1)


def make_data(n: int, size: int, target: bool, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of 2 volumes with one random sphere each; ``target`` shifts contrast, background and noise."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    batches = []
    for _ in range(n):
        xs, ys = [], []
        for _ in range(2):
            centre = torch.rand(3, 1, 1, 1, generator=g) * size * 0.5 + size * 0.25
            radius = size * (0.15 + 0.15 * torch.rand((), generator=g))
            mask = ((grid - centre) ** 2).sum(0).sqrt() < radius
            if target:
                image = 0.8 - 1.0 * mask.float() + 0.3 * grid[0] / size + 0.45 * torch.randn(mask.shape, generator=g)
            else:
                image = mask.float() + 0.25 * torch.randn(mask.shape, generator=g)
            xs.append(image[None])
            ys.append(mask.long()[None])
        batches.append((torch.stack(xs), torch.stack(ys)))
    return batches


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    from monai.losses import DiceCELoss

    x, y = batch
    return DiceCELoss(to_onehot_y=True, softmax=True)(model(x), y)


def evaluate(model: nn.Module, batches) -> float:
    with torch.no_grad():
        return sum(loss_fn(model, b).item() for b in batches) / len(batches)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches) -> float:
    """Train; returns the median step time in seconds."""
    times = []
    for batch in batches:
        start = time.perf_counter()
        loss = loss_fn(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def data_initialiser():
    try:
        return getattr(importlib.import_module("medlora.adapters.data_init"), "initialise_from_data", None)
    except ImportError:
        return None


def inner_convs(model: nn.Module, min_channels: int) -> list[str]:
    """Names of the convolutions with at least ``min_channels`` input and output channels (not stem or head)."""
    return [name for name, m in candidate_layers(model)
            if min(m.in_channels // m.groups, m.out_channels) >= min_channels]


def run(base: nn.Module, method: str | None, rule: str, args, train_batches, eval_batches) -> dict:
    model = copy.deepcopy(base)
    row: dict = {"method": method or "full fine-tuning", "rule": rule}
    lr = args.lr * RULE_LR_MULTIPLIER.get(rule, 1.0)
    base_params = sum(p.numel() for p in model.parameters())
    if method is None:
        lr = args.full_lr
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        alpha = float(args.rank) if rule == "allora" else None  # ALLoRA is scaling-free
        spec = get_method(method)
        options = spec.schedule_options(lr, args.steps) if spec.schedule_options else {}  # LoRA-SB's warm-up step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inject(model, AdapterConfig(method, rank=args.rank, alpha=alpha, targets=args.targets, options=options))
        init = data_initialiser()
        if init is not None:
            init(model, train_batches[: args.init_batches], loss_fn)
    optimizer = build_optimizer(model, rule, lr=lr)  # before counting: a rule may freeze factors (FFA)
    row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row["percent"] = 100.0 * row["trainable"] / base_params
    row["loss_before"] = evaluate(model, eval_batches)
    row["step_s"] = train(model, optimizer, train_batches)
    row["loss_after"] = evaluate(model, eval_batches)
    return row


def format_table(rows: list[dict]) -> str:
    full = next((r["step_s"] for r in rows if r["method"] == "full fine-tuning" and "step_s" in r), None)
    lines = [
        "| method | rule | trainable params | % of model | loss before | loss after | step time vs full FT |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r['rule']} | skipped: {r['skipped']} | | | | |")
            continue
        rel = f"{r['step_s'] / full:.2f}x" if full else f"{1000 * r['step_s']:.0f} ms"
        lines.append(
            f"| {r['method']} | {r['rule']} | {r['trainable']:,} | {r['percent']:.2f} | {r['loss_before']:.3f} | "
            f"{r['loss_after']:.3f} | {rel} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", help="comma-separated adapter methods (default: every registered one)")
    parser.add_argument("--rules", help="comma-separated training rules run with LoRA (default: every rule)")
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps per run")
    parser.add_argument("--pretrain-steps", type=int, default=80, help="source-task training steps")
    parser.add_argument("--size", type=int, default=16, help="volume edge length")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2, help="adapter learning rate")
    parser.add_argument("--full-lr", type=float, default=3e-3, help="full fine-tuning learning rate")
    parser.add_argument("--min-channels", type=int, default=16,
                        help="adapt only convolutions with at least this many input and output channels")
    parser.add_argument("--init-batches", type=int, default=2, help="batches given to data-driven initialisers")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    base = make_unet()
    opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
    for batch in make_data(args.pretrain_steps, args.size, target=False, seed=args.seed):
        loss = loss_fn(base, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    args.targets = inner_convs(base, args.min_channels)
    skipped = [n for n, _ in candidate_layers(base) if n not in args.targets]
    print(f"adapting {len(args.targets)} convolutions; frozen, not adapted (fewer than {args.min_channels} in/out "
          f"channels: stem and head): {', '.join(skipped)}")
    train_batches = make_data(args.steps, args.size, target=True, seed=args.seed + 1)
    eval_batches = make_data(4, args.size, target=True, seed=args.seed + 2)

    methods = args.methods.split(",") if args.methods else list_methods()
    rules = args.rules.split(",") if args.rules else list_rules()
    plan: list[tuple[str | None, str]] = [(None, "adamw")] + [(m, "adamw") for m in methods]
    plan += [("lora", r) for r in rules if r != "adamw" or "lora" not in methods]
    rows = []
    for method, rule in plan:
        torch.manual_seed(args.seed)
        try:
            row = run(base, method, rule, args, train_batches, eval_batches)
        except Exception as err:  # a method that does not apply to this model is reported, not fatal
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:160]
            print(f"skipping {method} / {rule}: {reason}", flush=True)
            row = {"method": method, "rule": rule, "skipped": reason}
        else:
            print(f"{row['method']:>16} {rule:>12}  trainable {row['trainable']:>8,} ({row['percent']:.2f}%)  loss "
                  f"{row['loss_before']:.3f} -> {row['loss_after']:.3f}  {1000 * row['step_s']:.0f} ms/step",
                  flush=True)
        rows.append(row)
    print()
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
