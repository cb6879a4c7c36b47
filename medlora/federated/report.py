"""The federation report: held-out Dice per site for every strategy and baseline, the Dice-per-round plot, and
paired per-case statistics of the best entry against the others (:mod:`medlora.evaluation.statistics`: paired
bootstrap CI, Wilcoxon signed-rank, Holm over the family; a CI that spans 0 is inconclusive)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation.statistics import compare_all
from ..fileio import atomic_write_bytes

LABELS = {"fedit": "FedIT", "ffa": "FFA-LoRA", "lora_fair": "LoRA-FAIR", "fedsmooth": "FedSmoothLoRA",
          "full_fedavg": "full FedAvg", "local": "local only", "centralised": "centralised (pooled)"}


def _entries(run: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"sites": {site: {"dice", "cases", "rows"}}, ...}}`` for strategies (final round) and baselines."""
    record = json.loads((run / "federation.json").read_text(encoding="utf-8"))
    out: dict[str, dict[str, Any]] = {}
    for spec in record["strategies"]:
        path = run / spec["name"] / "history.json"
        if path.exists():
            h = json.loads(path.read_text(encoding="utf-8"))
            out[spec["name"]] = {"sites": h["evaluations"][str(h["rounds"])], "history": h}
    for name in record["baselines"]:
        path = run / "baselines" / f"{name}.json"
        if path.exists():
            out[name] = {"sites": json.loads(path.read_text(encoding="utf-8"))["sites"]}
    return out


def _pooled(sites: dict[str, Any]) -> float:
    dice = [r["Dice"] for s in sites.values() for r in s["rows"] if not math.isnan(r["Dice"])]
    return float(np.mean(dice)) if dice else float("nan")


def _plot(entries: dict[str, dict[str, Any]], path: Path) -> Path | None:
    curves = {k: v["history"] for k, v in entries.items() if "history" in v}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, h in curves.items():
        rounds = sorted(int(r) for r in h["evaluations"])
        ax.plot(rounds, [_pooled(h["evaluations"][str(r)]) for r in rounds], marker="o", label=LABELS.get(name, name))
    for name in ("local", "centralised"):
        if name in entries:
            ax.axhline(_pooled(entries[name]["sites"]), linestyle="--", linewidth=1, label=LABELS[name],
                       color="grey" if name == "local" else "black")
    ax.set_xlabel("round (0: the base before federation)")
    ax.set_ylabel("held-out Dice (all sites' cases)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def build_report(run: str | Path) -> Path:
    """Write ``report.md``, ``results.csv`` and ``dice_per_round.png`` into the run folder; returns the report."""
    run = Path(run)
    record = json.loads((run / "federation.json").read_text(encoding="utf-8"))
    entries = _entries(run)
    sites = [s["name"] for s in record["sites"]]
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["entry", *sites, "all_sites"])
    local = (f"{record['local_steps']} local step(s)" if record.get("local_steps") is not None
             else f"{record.get('local_epochs') or 1} local epoch(s)")
    lines = [f"# {record['name']}", "",
             f"{len(sites)} sites, {record['rounds']} rounds x {local}, "
             f"fraction {record['fraction']}, adapter {(record['model'].get('adapter') or {}).get('method')} "
             f"r{(record['model'].get('adapter') or {}).get('rank')}. Held-out Dice (mean over each site's held-out "
             "cases; the last column pools every site's cases); baselines train for the same budget.", "",
             "| | " + " | ".join(sites) + " | all sites |", "|---" * (len(sites) + 2) + "|"]
    for name, entry in entries.items():
        values = [entry["sites"].get(s, {}).get("dice", float("nan")) for s in sites] + [_pooled(entry["sites"])]
        writer.writerow([name, *(f"{v:.4f}" for v in values)])
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    atomic_write_bytes(run / "results.csv", table.getvalue())
    notes = [(n, e["history"]) for n, e in entries.items() if "history" in e]
    if notes:
        lines += ["", "Aggregation:"]
        lines += [f"- {LABELS.get(n, n)}: {'exact' if h['exact'] else 'not exact'}"
                  + (f" ({'; '.join(h['notes'])})" if h["notes"] else "") for n, h in notes]
    private = [(n, h) for n, h in notes if record.get("dp")]
    if private:
        delta = record["dp"]["delta"]
        lines += ["", f"DP-SGD per patient (noise multiplier {record['dp']['noise_multiplier']}, clipping "
                  f"{record['dp']['max_grad_norm']}); epsilon per site after the last round it trained "
                  f"(delta = {delta:g}, RDP accountant):"]
        for n, h in private:
            eps: dict[str, float] = {}
            for metrics in h["train_metrics"].values():
                eps.update({site: m["epsilon"] for site, m in metrics.items() if "epsilon" in m})
            lines.append(f"- {LABELS.get(n, n)}: " + ", ".join(f"{s} {v:.2f}" for s, v in sorted(eps.items())))
    rows = [{"job": name, "case_id": f"{site}/{r['case_id']}", "Dice": r["Dice"]}
            for name, entry in entries.items() for site, s in entry["sites"].items() for r in s["rows"]]
    if len(entries) > 1:
        best = max(entries, key=lambda n: _pooled(entries[n]["sites"]))
        comparisons = compare_all(rows, [(best, other) for other in entries if other != best])
        lines += ["", f"Best on all held-out cases: **{LABELS.get(best, best)}**. Paired per-case comparisons "
                  "(Dice difference, bootstrap 95% CI, Wilcoxon p Holm-adjusted):", "",
                  "| vs | cases | mean difference | 95% CI | p (Holm) | verdict |", "|---|---|---|---|---|---|"]
        for cmp in comparisons:
            lines.append(f"| {LABELS.get(cmp.reference, cmp.reference)} | {cmp.n} | {cmp.delta:+.3f} | "
                         f"[{cmp.ci[0]:+.3f}, {cmp.ci[1]:+.3f}] | {cmp.p_adj:.3g} | {cmp.verdict} |")
    plot = _plot(entries, run / "dice_per_round.png")
    if plot is not None:
        lines += ["", "![held-out Dice per round](dice_per_round.png)"]
    path = run / "report.md"
    atomic_write_bytes(path, "\n".join(lines) + "\n")
    return path
