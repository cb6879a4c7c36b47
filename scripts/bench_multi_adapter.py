"""Packed training of K adapter jobs (``medlora.adapters.PackedJobs``) against the same K jobs one by one.

One training step = forward, Dice+CE loss, backward and an AdamW step for each of K jobs that share a frozen 3D
network (the study's situation: one base, several methods/folds/seeds). *One by one* runs the K jobs' steps
sequentially, each job alone (what a study does today); *packed* runs one forward and one backward over the K
batches together, once per strategy of routed convolutions (``grouped``, ``vmap``, ``loop``). The jobs cycle
through the main study's adapter methods (``configs/study/sah_transfer.yaml``). Variants are interleaved round by
round so that noise from other processes hits all alike; the table shows the median over rounds and the speed-up
``(time one by one) / (time packed)``, all variants side by side. Each row also checks that the packed outputs
equal the jobs' own (max relative difference of the first step's outputs).

    python scripts/bench_multi_adapter.py --threads 2 --rounds 3
    python scripts/bench_multi_adapter.py --models mv_unet_w8 --ks 1 4 --rounds 2   # quick
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from torch import nn  # noqa: E402

from medlora.adapters import AdapterConfig, PackedJobs, candidate_layers, inject, layout_of  # noqa: E402
from medlora.adapters.multi import STRATEGIES  # noqa: E402
from medlora.models.registry import create_model  # noqa: E402

# The adapter methods of the main study (configs/study/sah_transfer.yaml), cycled over the K jobs.
METHODS = [("lora", 4, {}), ("conv_lora", 2, {}), ("cp_lora", 4, {}), ("dora_c", 4, {}), ("cp_dora", 4, {}),
           ("salt", 4, {"svd_rank": 2})]


def monai_unet() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                num_res_units=2)


# name -> (builder, patch size); the README's main job's network and slice first (configs/study/sah_transfer.yaml)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mv_unet_2d_w32": (lambda: create_model("mv_unet", spatial_dims=2, level=2, width=32), (64, 64)),
    "mv_unet_w8": (lambda: create_model("mv_unet", spatial_dims=3, level=2, width=8), (48, 48, 16)),
    "mv_unet_w16": (lambda: create_model("mv_unet", spatial_dims=3, level=2, width=16), (64, 64, 16)),
    "monai_unet_16-128": (monai_unet, (48, 48, 16)),
}


def build_job(model: str, k: int) -> nn.Module:
    method, rank, options = METHODS[k % len(METHODS)]
    torch.manual_seed(0)
    net = MODELS[model][0]()
    # SALT's svd_rank must fit every layer: leave out single-output heads, as a study would
    exclude = [n for n, m in candidate_layers(net)
               if layout_of(m).canonical_shape(m.weight.shape)[0] < options.get("svd_rank", 0) + 1] or None
    torch.manual_seed(100 + k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return inject(net, AdapterConfig(method, rank=rank, options=options, exclude=exclude)).train()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def bench(model: str, k: int, batch: int, rounds: int, strategies: list[str]) -> dict[str, object]:
    patch = MODELS[model][1]
    g = torch.Generator().manual_seed(k)
    xs = [torch.randn(batch, 1, *patch, generator=g) for _ in range(k)]
    ys = [(torch.rand(batch, 1, *patch, generator=g) > 0.8).float() for _ in range(k)]
    loss_fn = DiceCELoss(sigmoid=True)
    jobs = [build_job(model, j) for j in range(k)]
    opts = [torch.optim.AdamW(trainable(job), lr=1e-3) for job in jobs]
    packs = {s: PackedJobs(jobs, strategy=s).train() for s in strategies}

    with torch.no_grad():  # the packed outputs are the jobs' own outputs
        alone = [job(x) for job, x in zip(jobs, xs, strict=True)]
        diff = max(max(((o - a).abs().max() / a.abs().max()).item()
                       for o, a in zip(packs[s](xs), alone, strict=True)) for s in strategies)

    def one_by_one() -> None:
        for job, opt, x, y in zip(jobs, opts, xs, ys, strict=True):
            loss_fn(job(x), y).backward()
            opt.step()
            opt.zero_grad()

    def packed_step(strategy: str) -> Callable[[], None]:
        def step() -> None:
            outs = packs[strategy](xs)
            sum(loss_fn(o, y) for o, y in zip(outs, ys, strict=True)).backward()
            for opt in opts:
                opt.step()
                opt.zero_grad()
        return step

    variants = {"one_by_one": one_by_one, **{s: packed_step(s) for s in strategies}}
    for fn in variants.values():  # warm-up (allocator, SALT's lazy SVD, mkldnn primitives)
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    spread = {name: 100 * (max(t) - min(t)) / statistics.median(t) for name, t in times.items()}
    return {"model": model, "k": k, "median": med, "spread": spread, "diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--batch", type=int, default=2, help="samples per job and step (the study's batch_size)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import monai

    print(f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, monai {monai.__version__}")
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; "
          f"threads: {args.threads}; load average at start: {os.getloadavg()[0]:.1f}")
    print(f"batch {args.batch} per job, AdamW, Dice+CE; rounds: {args.rounds} (median); jobs cycle through "
          + ", ".join(f"{m} r{r}" for m, r, _ in METHODS))
    print()
    header = ["model", "patch", "K", "one by one ms"] + [f"packed {s} ms" for s in args.strategies] \
        + [f"speed-up {s}" for s in args.strategies] + ["spread % (max)", "max rel diff"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for model in args.models:
        for k in args.ks:
            r = bench(model, k, args.batch, args.rounds, args.strategies)
            med = r["median"]
            row = [model, "x".join(map(str, MODELS[model][1])), str(k), f"{1e3 * med['one_by_one']:.0f}"]
            row += [f"{1e3 * med[s]:.0f}" for s in args.strategies]
            row += [f"{med['one_by_one'] / med[s]:.2f}x" for s in args.strategies]
            row += [f"{max(r['spread'].values()):.0f}", f"{r['diff']:.1e}"]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
