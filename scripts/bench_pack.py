"""Study wall time with ``medlora crossval --pack 1`` against ``--pack 4`` and ``--pack 8``, side by side in one run.

The study is the README's main job (``configs/study/sah_transfer.yaml``) with a reduced budget so that the three
runs fit in minutes: ``trainer.max_steps`` and ``pretrain.trainer.max_steps`` are replaced (``--steps``,
``--pretrain-steps``) and a part of the grid is selected (``--only``, default: seed 0 on the whole training
sets, 27 jobs); ``--no-source-eval`` drops the held-out source-domain evaluation, which packing does not change.
Pretraining runs once; every ``--pack`` value then runs the same jobs in a copy of that run folder, in its own
process with ``--threads`` CPU threads, ``--rounds`` times, interleaved (``1 4 8 1 4 8``) so that a change of
the machine's load hits every value alike; times are summed over the rounds. Per-case numbers of every run are
compared with the first ``--pack 1`` run (the smallest value given).

    python scripts/bench_pack.py --out /tmp/bench_pack --steps 10 --packs 1 4 8 --rounds 2

Columns: the study's wall time (training, evaluation and start-up; each round's in brackets), the training time
(``--pack 1``: the sum of the jobs' ``train_seconds``; packed: the sum of each pack's ``pack_seconds``), the
evaluation time (the sum of the jobs' ``eval_seconds``: the same work in every run, so on a shared machine it
measures how busy the machine was), the speed-ups against ``--pack 1``, the training speed-up divided by the
evaluation speed-up (the packing gain with the change in load taken out), and the largest per-case differences of
Dice and soft Dice against ``--pack 1``. ``--tabulate`` prints the table of an earlier run's folder again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def crossval(config: Path, out: Path, threads: int, *extra: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medlora.cli", "crossval", "--config", str(config), "--out", str(out),
                    *extra], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def summaries(run: Path) -> dict[str, dict]:
    return {p.parent.relative_to(run).as_posix(): json.loads(p.read_text(encoding="utf-8"))
            for p in sorted(run.glob("jobs/*/seed_*/cases_*/fold_*/summary.json"))}


def eval_seconds(jobs: dict[str, dict]) -> float:
    return sum(job["medlora"]["eval_seconds"] for job in jobs.values())


def training_seconds(jobs: dict[str, dict]) -> float:
    packs, total = set(), 0.0
    for job in jobs.values():
        info = job["medlora"]
        if "pack_seconds" in info:
            packs.add(info["pack_seconds"])  # one entry per pack: its jobs share the same wall time
        else:
            total += info["train_seconds"]
    return total + sum(packs)


def max_difference(jobs: dict[str, dict], reference: dict[str, dict], key: str) -> float:
    worst = 0.0
    for name, job in jobs.items():
        for a, b in zip(job["metric_per_case"], reference[name]["metric_per_case"], strict=True):
            x, y = a["metrics"]["1"][key], b["metrics"]["1"][key]
            if x == x or y == y:
                worst = max(worst, abs(x - y))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "study" / "sah_transfer.yaml")
    parser.add_argument("--out", type=Path, required=True, help="work folder (replaced)")
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps per job (the study: 30)")
    parser.add_argument("--pretrain-steps", type=int, default=40, help="pretraining steps (the study: 400)")
    parser.add_argument("--only", default="seed=0,train_cases=all", help="the jobs to time (crossval --only)")
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the --packs runs this many times, interleaved (1 4 8 1 4 8 ...)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tabulate", action="store_true", help="only print the table of an earlier run in --out")
    parser.add_argument("--no-source-eval", action="store_true",
                        help="drop the study's held-out source-domain evaluation")
    args = parser.parse_args()

    if not args.tabulate:
        run_all(args)
    walls = json.loads((args.out / "walls.json").read_text(encoding="utf-8"))
    # per --pack value: one (wall, summaries) per round; a run of the earlier layout has one round in pack_<K>
    runs = {}
    lists = {pack: values if isinstance(values, list) else [values] for pack, values in walls.items()}
    complete = min(len(values) for values in lists.values())  # rounds that every --pack value finished
    for pack, values in lists.items():
        values = values[:complete]
        names = [f"pack_{pack}"] if len(values) == 1 and (args.out / f"pack_{pack}").exists() else \
            [f"pack_{pack}_round_{r}" for r in range(len(values))]
        runs[int(pack)] = [(wall, summaries(args.out / name)) for wall, name in zip(values, names, strict=True)]
    reference = runs[min(runs)][0][1]
    totals = {pack: (sum(w for w, _ in rs), sum(training_seconds(j) for _, j in rs),
                     sum(eval_seconds(j) for _, j in rs)) for pack, rs in runs.items()}
    wall_1, train_1, eval_1 = totals[min(runs)]
    load = os.getloadavg()
    print(f"\n{len(reference)} jobs, {len(runs[min(runs)])} round(s); load average now {load[0]:.1f} / "
          f"{load[1]:.1f} / {load[2]:.1f}\n")
    print("| --pack | jobs | study wall s (rounds) | training s | evaluation s | speed-up study | speed-up training "
          "| speed-up evaluation | training / evaluation speed-up | max abs dDice | max abs d soft Dice |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for pack, rs in runs.items():
        wall, train, evaluation = totals[pack]
        dice = max(max_difference(jobs, reference, "Dice") for _, jobs in rs)
        soft = max(max_difference(jobs, reference, "soft_Dice") for _, jobs in rs)
        print(f"| {pack} | {len(rs[0][1])} | {wall:.0f} ({' + '.join(f'{w:.0f}' for w, _ in rs)}) | {train:.0f} | "
              f"{evaluation:.0f} | {wall_1 / wall:.2f}x | {train_1 / train:.2f}x | {eval_1 / evaluation:.2f}x | "
              f"{train_1 / train / (eval_1 / evaluation):.2f}x | "
              f"{dice:.1e} | {soft:.1e} |")


def run_all(args: argparse.Namespace) -> None:
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    study = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    study["trainer"] = {**study.get("trainer", {}), "max_steps": args.steps}
    study.setdefault("pretrain", {}).setdefault("trainer", {})["max_steps"] = args.pretrain_steps
    if args.no_source_eval:
        study.pop("source_eval", None)
    config = args.out / "study.yaml"
    config.write_text(yaml.safe_dump(study), encoding="utf-8")
    prepared = args.out / "prepared"
    crossval(config, prepared, args.threads, "--only", "pretrain")
    walls: dict[int, list[float]] = {pack: [] for pack in args.packs}
    for r in range(args.rounds):
        for pack in args.packs:
            folder = args.out / f"pack_{pack}_round_{r}"
            shutil.copytree(prepared, folder)
            walls[pack].append(crossval(config, folder, args.threads, "--only", args.only, "--pack", str(pack)))
            print(f"round {r}, --pack {pack}: {walls[pack][-1]:.1f} s", flush=True)
            (args.out / "walls.json").write_text(json.dumps(walls), encoding="utf-8")
    print(f"{args.only}, {args.steps} steps per job, {args.threads} thread(s), source evaluation "
          f"{'off' if args.no_source_eval else 'on'}")


if __name__ == "__main__":
    main()
