"""LoRA-Mixer-style token routing over two domain experts on the tiny language model (``docs/composition.md``).

The bundled corpus has two text domains (part 1: notes from a harbour town; part 2: imaging-report style). The last
``--test-share`` of each domain is held out. A TinyLM is pretrained briefly on the training text of both domains,
then one LoRA expert per domain is trained on its domain alone (q/k/v/o, rank ``--rank``). The experts are frozen
and put into every attention projection with :func:`medlora.adapters.multi.attach_mixer` (plug-and-play: only the
routers train, on batches with both domains), once without and once with the specialisation-balance loss. Printed
per domain: held-out loss and perplexity of the base, each expert alone, the uniform average of the experts, each
router soft and as ReMix's top-1 equal weights, a router trained as ReMix does (sampled top-1 routings, RLOO with
each sequence's negative loss as reward) and run with top-1 equal weights, and the effective number of experts per
token and over all tokens.

    python scripts/mixer_study.py --seeds 0,1,2         # the table in docs/composition.md, about 7 min on 1 core
    python scripts/mixer_study.py --router-steps 50 --expert-steps 100 --base-steps 100   # quicker
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medlora.adapters import AdapterConfig, inject  # noqa: E402
from medlora.adapters.multi import (  # noqa: E402
    attach_mixer,
    fix_gates,
    mixer_balance_loss,
    mixer_log_prob,
    mixer_stats,
    rloo_surrogate,
)
from medlora.adapters.multi.mixer import mixer_layers  # noqa: E402
from medlora.llm import ByteTokenizer, TinyLM, TinyLMConfig, corpus_text, lm_loss, make_batches, pretrain  # noqa: E402

TARGETS = ["q", "k", "v", "o"]


def domains(test_share: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{domain: (training tokens, held-out tokens)}`` from the bundled corpus' two parts."""
    text = corpus_text()
    i = text.index("# Part 2")
    out = {}
    for name, part in (("harbour", text[:i]), ("reports", text[i:])):
        tokens = ByteTokenizer().encode(part)
        cut = int(len(tokens) * (1 - test_share))
        out[name] = (tokens[:cut], tokens[cut:])
    return out


def windows(tokens: torch.Tensor, context: int, stride: int) -> torch.Tensor:
    """Every ``context + 1`` window at ``stride`` (deterministic held-out evaluation)."""
    starts = torch.arange(0, len(tokens) - context - 1, stride)
    return tokens[starts[:, None] + torch.arange(context + 1)]


def evaluate(model: torch.nn.Module, batch: torch.Tensor) -> dict:
    """Held-out loss, perplexity and (for a mixer) the mean effective experts per token and over all tokens."""
    with torch.no_grad():
        loss = float(lm_loss(model, batch))
    row = {"loss": loss, "ppl": math.exp(loss)}
    stats = mixer_stats(model)
    if stats:
        row["effective"] = sum(s["effective"] for s in stats.values()) / len(stats)
        row["usage_effective"] = sum(s["usage_effective"] for s in stats.values()) / len(stats)
        row["usage_reports"] = sum(s["usage"][1] for s in stats.values()) / len(stats)
    return row


def train(model: torch.nn.Module, batches: list[torch.Tensor], lr: float, balance: float = 0.0,
          trace: list | None = None, every: int = 50) -> float:
    """Adam on the trainable parameters; ``balance`` weighs the specialisation-balance loss. Returns seconds.
    ``trace`` receives ``(step, effective per token, effective overall)`` of the training batch every ``every`` steps
    (means over the mixer layers), to watch collapse happen."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        loss = lm_loss(model, batch)
        if trace is not None and (step % every == 0 or step == len(batches) - 1):
            stats = mixer_stats(model).values()
            trace.append((step, sum(s["effective"] for s in stats) / len(stats),
                          sum(s["usage_effective"] for s in stats) / len(stats)))
        if balance:
            loss = loss + balance * mixer_balance_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def train_rloo(model: torch.nn.Module, batches: list[torch.Tensor], lr: float, draws: int) -> float:
    """ReMix: each step runs ``draws`` sampled routings (``sample_equal``) of the batch and follows the RLOO
    estimate with each sequence's negative loss as its reward. Returns seconds."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    start = time.perf_counter()
    for batch in batches:
        log_probs, rewards = [], []
        for _ in range(draws):
            logits = model(batch[:, :-1])
            per_sequence = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(dim=1)
            rewards.append(-per_sequence.detach())
            log_probs.append(mixer_log_prob(model, batch.shape[0]))
        loss = rloo_surrogate(torch.stack(log_probs), torch.stack(rewards))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def mixed_batches(data: dict, n: int, batch_size: int, context: int, seed: int) -> list[torch.Tensor]:
    """Batches with half their windows from each domain's training text."""
    per = [make_batches(train_tokens, n, batch_size // 2, context, seed + j)
           for j, (train_tokens, _) in enumerate(data.values())]
    return [torch.cat(parts) for parts in zip(*per, strict=True)]


def run(args) -> list[dict]:
    torch.manual_seed(args.seed)
    data = domains(args.test_share)
    cfg = TinyLMConfig(context=args.context)
    base = TinyLM(cfg)
    pretrain(base, torch.cat([tr for tr, _ in data.values()]), args.base_steps, seed=args.seed)
    base.eval()
    held_out = {d: windows(te, args.context, args.stride) for d, (_, te) in data.items()}
    rows: list[dict] = []

    def record(name: str, model: torch.nn.Module, **extra) -> None:
        row = {"model": name, **extra}
        for d, batch in held_out.items():
            row[d] = evaluate(model, batch)
        rows.append(row)
        cells = "  ".join(f"{d} {row[d]['loss']:.3f} (ppl {row[d]['ppl']:.2f}"
                          + (f", eff {row[d]['effective']:.2f}/{row[d]['usage_effective']:.2f}"
                             if "effective" in row[d] else "") + ")" for d in held_out)
        print(f"{name:<34} {cells}", flush=True)

    record("base", base)
    experts = []
    for j, (d, (train_tokens, _)) in enumerate(data.items()):
        torch.manual_seed(args.seed + 10 + j)
        expert = inject(copy.deepcopy(base), AdapterConfig("lora", rank=args.rank, targets=TARGETS))
        seconds = train(expert, make_batches(train_tokens, args.expert_steps, args.batch_size, args.context,
                                             args.seed + 20 + j), args.expert_lr)
        experts.append(expert.eval())
        record(f"expert {d}", expert, seconds=seconds)
    names = list(data)
    mixer = attach_mixer(copy.deepcopy(base), experts, targets=TARGETS, names=names)
    fix_gates(mixer, [1 / len(experts)] * len(experts))
    record("uniform average", mixer)
    for balance in (0.0, args.balance):
        torch.manual_seed(args.seed + 30)
        model = attach_mixer(copy.deepcopy(base), experts, targets=TARGETS, names=names)
        router_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trace: list = []
        seconds = train(model.train(), mixed_batches(data, args.router_steps, args.batch_size, args.context,
                                                     args.seed + 40), args.router_lr, balance, trace)
        model.eval()
        tag = f"balance {balance:g}"
        print("  training: " + ", ".join(f"step {i} {a:.2f}/{b:.2f}" for i, a, b in trace), flush=True)
        record(f"router soft ({tag})", model, router_params=router_params, seconds=seconds, trace=trace)
        for _, layer in mixer_layers(model):
            layer.set_routing("topk_equal", k=1)
        record(f"router top-1 equal ({tag})", model)
    if args.rloo_draws:
        torch.manual_seed(args.seed + 30)
        model = attach_mixer(copy.deepcopy(base), experts, targets=TARGETS, names=names, routing="sample_equal")
        seconds = train_rloo(model.train(), mixed_batches(data, args.router_steps, args.batch_size, args.context,
                                                          args.seed + 40), args.router_lr, args.rloo_draws)
        model.eval()
        for _, layer in mixer_layers(model):
            layer.set_routing("topk_equal", k=1)  # ReMix's inference: the deterministic top-k
        record("router top-1 equal (ReMix, RLOO)", model, seconds=seconds)
    return rows


def table(rows: list[dict], domains_: list[str]) -> str:
    head = "| model | " + " | ".join(f"{d} loss (ppl) | {d} eff. per token / overall | {d} weight on reports"
                                     for d in domains_) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(domains_)]
    for r in rows:
        cells = []
        for d in domains_:
            c = r[d]
            sd = f" ± {c['loss_sd']:.3f}" if r.get("seeds", 1) > 1 else ""
            cells.append(f"{c['loss']:.3f}{sd} ({c['ppl']:.2f})")
            cells.append(f"{c['effective']:.2f} / {c['usage_effective']:.2f}" if "effective" in c else "")
            cells.append(f"{c['usage_reports']:.2f}" if "usage_reports" in c else "")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_rows(runs: list[list[dict]]) -> list[dict]:
    """Rows with every number averaged over the runs (seeds) and ``<key>_sd`` the sample standard deviation."""
    out = []
    for rows in zip(*runs, strict=True):
        row = {"model": rows[0]["model"], "seeds": len(rows)}
        for d in ("harbour", "reports"):
            row[d] = {}
            for key in rows[0][d]:
                values = torch.tensor([r[d][key] for r in rows], dtype=torch.float64)
                row[d][key] = float(values.mean())
                row[d][f"{key}_sd"] = float(values.std()) if len(rows) > 1 else 0.0
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-steps", type=int, default=100, help="TinyLM pretraining steps on both domains")
    parser.add_argument("--expert-steps", type=int, default=400, help="training steps of each domain expert")
    parser.add_argument("--router-steps", type=int, default=200, help="router training steps (experts frozen)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--expert-lr", type=float, default=3e-3)
    parser.add_argument("--router-lr", type=float, default=1e-2)
    parser.add_argument("--balance", type=float, default=0.1, help="weight of the specialisation-balance loss")
    parser.add_argument("--rloo-draws", type=int, default=4,
                        help="sampled routings per step of the ReMix router trained by RLOO (0: skip it)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--stride", type=int, default=16, help="held-out window stride")
    parser.add_argument("--test-share", type=float, default=0.25, help="held-out share of each domain")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; the table shows their mean")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = []
        for seed in [int(x) for x in args.seeds.split(",")]:
            print(f"-- seed {seed}", flush=True)
            args.seed = seed
            runs.append(run(args))
    rows = mean_rows(runs)
    print()
    if len(runs) > 1:
        print(f"mean over seeds {args.seeds} (loss sd over seeds: at most "
              f"{max(r[d]['loss_sd'] for r in rows for d in ('harbour', 'reports')):.3f})")
    print(table(rows, ["harbour", "reports"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"mean": rows, "runs": runs}, indent=2), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
