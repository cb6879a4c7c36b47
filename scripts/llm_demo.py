"""Every adapter method and training rule on a causal language model: the adapter core is not UNet-specific.

By default a tiny GPT-style model (medlora.llm.TinyLM, byte tokens) is pretrained briefly on the first part of the
bundled corpus (cached after the first run), then fine-tuned on the second part (a different style of text) with
every registered adapter method (``medlora.adapters.list_methods()``, so new methods appear here by themselves)
and with LoRA under every training rule (``medlora.adapters.optim.list_rules()``), plus full fine-tuning as the
reference. It prints: method, rule, trainable parameters, held-out loss before/after, steps per second.

    python scripts/llm_demo.py                         # everything, about 1-3 minutes on 2 CPU cores
    python scripts/llm_demo.py --methods lora,dora --rules adamw --steps 20
    python scripts/llm_demo.py --model /path/to/hf-causal-lm  # a local Hugging Face model (needs transformers)
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medlora.adapters import AdapterConfig, get_method, inject, list_methods  # noqa: E402
from medlora.adapters.optim import build_optimizer, list_rules  # noqa: E402
from medlora.llm import ByteTokenizer, TinyLMConfig, corpus_text, lm_loss, make_batches, pretrained_tiny_lm  # noqa: E402

TINY_TARGETS = ["q", "k", "v", "o", "fc1", "fc2"]
# AltLoRA's step is a preconditioned gradient without Adam normalisation: it needs a larger learning rate.
RULE_LR_MULTIPLIER = {"altlora": 10.0}


def split_corpus(text: str) -> tuple[str, str]:
    """(pretraining text, fine-tuning text): the bundled corpus' two parts."""
    marker = "# Part 2"
    i = text.index(marker)
    return text[:i], text[i:]


def data_initialiser():
    """``medlora.adapters.data_init.initialise_from_data`` when that module exists, else None."""
    try:
        module = importlib.import_module("medlora.adapters.data_init")
    except ImportError:
        return None
    return getattr(module, "initialise_from_data", None)


def evaluate(model: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(lm_loss(model, b).item() for b in batches) / len(batches)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor]) -> float:
    """Train on ``batches``; returns steps per second."""
    start = time.perf_counter()
    for batch in batches:
        loss = lm_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return len(batches) / max(time.perf_counter() - start, 1e-9)


def run(base: nn.Module, method: str | None, rule: str, args, train_batches, eval_batches, targets, exclude) -> dict:
    """One fine-tuning run on a copy of ``base``; ``method=None`` is full fine-tuning."""
    model = copy.deepcopy(base)
    row = {"method": method or "full fine-tuning", "rule": rule}
    lr = args.lr * RULE_LR_MULTIPLIER.get(rule, 1.0)
    if method is None:
        lr = args.full_lr
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        spec = get_method(method)
        # ALLoRA is scaling-free: alpha = rank gives scale 1.
        alpha = float(args.rank) if rule == "allora" else None
        # options that follow from this run's schedule (LoRA-SB's first warm-up step), as a training run derives them
        options = spec.schedule_options(lr, args.steps) if spec.schedule_options else {}
        config = AdapterConfig(method, rank=args.rank, alpha=alpha, targets=targets, exclude=exclude, options=options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inject(model, config)
        init = data_initialiser()
        if init is not None:
            init(model, train_batches[: args.init_batches], lm_loss)
        row["mergeable"] = spec.mergeable
    optimizer = build_optimizer(model, rule, lr=lr)  # before counting: a rule may freeze factors (FFA)
    row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row["loss_before"] = evaluate(model, eval_batches)
    row["steps_per_s"] = train(model, optimizer, train_batches)
    row["loss_after"] = evaluate(model, eval_batches)
    return row


def load_model(args):
    """(model, token tensor of the fine-tuning text, adapter targets, exclude patterns)."""
    pre_text, fine_text = split_corpus(corpus_text())
    if args.model is None:
        cfg = TinyLMConfig(context=args.context)
        model = pretrained_tiny_lm(pre_text, steps=args.pretrain_steps, cfg=cfg, cache_dir=args.cache_dir)
        return model, ByteTokenizer().encode(fine_text), TINY_TARGETS, None
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise SystemExit("--model needs the transformers package (pip install transformers)") from None
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()  # no dropout: the comparison is about the update rule
    tokens = torch.tensor(tokenizer(fine_text)["input_ids"], dtype=torch.long)
    # every Linear / Conv1D except the output head and embeddings
    return model, tokens, None, ["lm_head", "embed_out", "wte", "wpe", "embed_tokens"]


def format_table(rows: list[dict]) -> str:
    lines = [
        "| method | rule | trainable params | loss before | loss after | steps/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r['rule']} | skipped: {r['skipped']} | | | |")
        else:
            lines.append(
                f"| {r['method']} | {r['rule']} | {r['trainable']:,} | {r['loss_before']:.3f} | "
                f"{r['loss_after']:.3f} | {r['steps_per_s']:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local Hugging Face causal LM directory (default: the bundled TinyLM)")
    parser.add_argument("--methods", help="comma-separated adapter methods (default: every registered one)")
    parser.add_argument("--rules", help="comma-separated training rules run with LoRA (default: every rule)")
    parser.add_argument("--no-full", action="store_true", help="skip the full fine-tuning reference row")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps per run")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="TinyLM pretraining steps (cached)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3, help="adapter learning rate")
    parser.add_argument("--full-lr", type=float, default=1e-3, help="full fine-tuning learning rate")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--init-batches", type=int, default=4, help="batches given to data-driven initialisers")
    parser.add_argument("--cache-dir", help="where the pretrained TinyLM checkpoint is cached")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny model: 1 is fastest)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    base, tokens, targets, exclude = load_model(args)
    train_batches = make_batches(tokens, args.steps, args.batch_size, args.context, seed=args.seed + 1)
    eval_batches = make_batches(tokens, 4, 16, args.context, seed=args.seed + 2)
    methods = args.methods.split(",") if args.methods else list_methods()
    rules = args.rules.split(",") if args.rules else list_rules()

    plan: list[tuple[str | None, str]] = [] if args.no_full else [(None, "adamw")]
    plan += [(m, "adamw") for m in methods]
    plan += [("lora", r) for r in rules if r != "adamw" or "lora" not in methods]
    rows = []
    for method, rule in plan:
        torch.manual_seed(args.seed)
        try:
            row = run(base, method, rule, args, train_batches, eval_batches, targets, exclude)
        except Exception as err:  # a method that cannot be built on this model is reported, not fatal
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:160]
            print(f"skipping {method} / {rule}: {reason}", flush=True)
            row = {"method": method, "rule": rule, "skipped": reason}
        else:
            print(f"{row['method']:>16} {rule:>12}  trainable {row['trainable']:>9,}  loss "
                  f"{row['loss_before']:.3f} -> {row['loss_after']:.3f}  {row['steps_per_s']:.1f} steps/s", flush=True)
        rows.append(row)
    print()
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
