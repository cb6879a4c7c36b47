"""Where a study job's wall time goes, one by one (``--pack 1``) against packed (``--pack K``), in one process.

The study is the README's main job (``configs/study/sah_transfer.yaml``) with a reduced pretraining
(``--pretrain-steps``, run once into ``OUT/prepared``) and a selection of its jobs (``--only``). The same jobs then
run one by one (``Study.run_job``: one Lightning Trainer each) and packed (``packing.train_packed``), alternating
over ``--rounds`` so that a change of the machine's load hits both alike. Timed regions (wall clock, exclusive:
a region's time excludes the regions nested in it):

* job set-up: ``Study.prepare_job`` (folder, module built on the base, data module object); Trainer set-up;
* data set-up: ``CTSegDataModule.setup`` (reading and preprocessing the volumes);
* batches: the training loader's ``__next__`` (slice sampling, flips, collation);
* forward / loss / backward / optimiser (``Optimizer.step`` minus what runs in its closure, plus ``zero_grad``);
* evaluation: sliding-window forwards, the rest of the inferer, metrics, calibration histogram;
* files: summaries, adapter and model files, logs;
* other: what is left of each top-level region (Lightning's loop, logging, random-state swaps, ...).

    python scripts/profile_pack.py --out /tmp/profile_pack --only seed=0,train_cases=all,fold=0,family=adapter

Process start-up (``import medlora.cli`` and the crossval stack) is timed in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Regions:
    """Exclusive wall time per region path."""

    def __init__(self) -> None:
        self.stack: list[list] = []  # [name, start, time of nested regions]
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not name.startswith("evaluation") and any(e[0].startswith("evaluation") for e in self.stack):
            name = f"evaluation: {name}"
        self.stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            label, start, nested = self.stack.pop()
            spent = time.perf_counter() - start
            self.totals[label] += spent - nested
            if self.stack:
                self.stack[-1][2] += spent

    def wrap(self, owner, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)


def instrument(regions: Regions, backbone: type) -> None:
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import dataloader

    import medlora.training.crossval as crossval
    import medlora.training.packing as packing
    from medlora.adapters.multi import PackedJobs
    from medlora.data.datamodule import CTSegDataModule
    from medlora.training.module import SegmentationModule

    regions.wrap(crossval.Study, "prepare_job", "job set-up (build module, data module)")
    regions.wrap(crossval, "_trainer", "Trainer set-up")
    regions.wrap(CTSegDataModule, "setup", "data set-up (read + preprocess volumes)")
    regions.wrap(dataloader._BaseDataLoaderIter, "__next__", "batches (sample, flip, collate)")
    regions.wrap(backbone, "forward", "forward (network)")
    regions.wrap(PackedJobs, "forward", "forward (pack: concat, routing, split)")
    regions.wrap(SegmentationModule, "training_loss", "loss")
    regions.wrap(torch.Tensor, "backward", "backward")
    regions.wrap(torch.optim.Optimizer, "zero_grad", "optimiser")
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        regions.wrap(cls, "step", "optimiser")
    regions.wrap(crossval.Study, "_evaluate", "evaluation: inferer, data, rest")
    regions.wrap(crossval, "calibration_histogram", "evaluation: calibration histogram")
    import medlora.training.module as module_mod

    regions.wrap(module_mod, "case_metrics", "evaluation: metrics (Dice, HD95, ...)")
    regions.wrap(crossval, "write_summary", "files")
    regions.wrap(crossval.Study, "_summary", "files")
    regions.wrap(crossval, "atomic_save_safetensors", "files")
    regions.wrap(packing, "write_adapter_file", "files")
    import medlora.training.callbacks as callbacks

    regions.wrap(callbacks, "write_adapter_file", "files")
    regions.wrap(CSVLogger, "save", "files")
    # the evaluation's forwards are the backbone's forward under _evaluate: told apart when tabulating
    regions.wrap(crossval.Study, "run_job", "other (Lightning loop, logging, hooks)")
    regions.wrap(packing, "train_packed", "other (pack loop, random states, logging)")


def startup_seconds() -> tuple[float, float]:
    code = "import time; t = time.perf_counter(); import medlora.cli, medlora.training.crossval; " \
           "print(time.perf_counter() - t)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    inner = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 check=True).stdout)
    return time.perf_counter() - start, inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "study" / "sah_transfer.yaml")
    parser.add_argument("--out", type=Path, required=True,
                        help="work folder; its pretraining (OUT/prepared, OUT/study.yaml) is reused when present")
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per job (the study: 30)")
    parser.add_argument("--pretrain-steps", type=int, default=40, help="pretraining steps (the study: 400)")
    parser.add_argument("--only", default="seed=0,train_cases=all,fold=0,family=adapter", help="crossval --only")
    parser.add_argument("--pack", type=int, default=6, help="jobs per pack in the packed mode")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the two modes this many times")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from medlora.training import crossval, packing

    prepared = args.out / "prepared"
    if not (prepared / "pretrain").exists():
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
        study = yaml.safe_load(args.config.read_text(encoding="utf-8"))
        study["trainer"] = {**study.get("trainer", {}), "max_steps": args.steps}
        study.setdefault("pretrain", {}).setdefault("trainer", {})["max_steps"] = args.pretrain_steps
        (args.out / "study.yaml").write_text(yaml.safe_dump(study), encoding="utf-8")
        crossval.run_crossval(str(args.out / "study.yaml"), str(prepared), only="pretrain")
    config = args.out / "study.yaml"

    def fresh(name: str) -> crossval.Study:
        folder = args.out / name
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(prepared, folder)
        study = crossval.Study(config, folder)
        study.prepare_data()
        return study

    probe = fresh("probe")
    jobs = [j for j in probe.jobs if j.matches(crossval.parse_only(args.only))]
    backbone = type(probe.prepare_job(jobs[0]).module.model)
    results = {mode: Regions() for mode in ("one by one", f"packed {args.pack}")}
    instrumented = {}
    for _ in range(args.rounds):
        for mode, regions in results.items():
            # a fresh set of wrappers per mode: the wrappers of the other mode are removed first
            for (owner, attribute), original in instrumented.items():
                setattr(owner, attribute, original)
            instrumented = snapshot(backbone)
            instrument(regions, backbone)
            study = fresh(mode.replace(" ", "_"))
            start = time.perf_counter()
            if mode == "one by one":
                for job in jobs:
                    study.run_job(job)
            else:
                for first in range(0, len(jobs), args.pack):
                    unit = jobs[first:first + args.pack]
                    packing.train_packed(study, unit, lambda k, s: None, say=lambda line: None)
            regions.totals["wall"] += time.perf_counter() - start
    for (owner, attribute), original in instrumented.items():
        setattr(owner, attribute, original)
    outer, inner = startup_seconds()
    print(f"\n{len(jobs)} jobs ({args.only}), {args.steps} steps each, {args.rounds} round(s), 1 thread; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"process start-up: interpreter + imports {outer:.2f} s (imports {inner:.2f} s), once per process\n")
    names = sorted({k for r in results.values() for k in r.totals} - {"wall", "total"},
                   key=lambda k: -results["one by one"].totals.get(k, 0.0))
    header = " | ".join(f"{m} s | {m} s/job" for m in results)
    print(f"| region | {header} |")
    print("|---|" + "---|" * (2 * len(results)))
    per = args.rounds * len(jobs)
    for name in [*names, "wall"]:
        cells = " | ".join(f"{r.totals.get(name, 0.0):.2f} | {r.totals.get(name, 0.0) / per:.3f}"
                           for r in results.values())
        print(f"| {name} | {cells} |")
    (args.out / "profile.json").write_text(json.dumps({m: dict(r.totals) for m, r in results.items()}),
                                           encoding="utf-8")


def snapshot(backbone: type) -> dict:
    import lightning.pytorch.loggers as loggers
    import torch
    from torch.utils.data import dataloader

    import medlora.training.callbacks as callbacks
    import medlora.training.crossval as crossval
    import medlora.training.module as module_mod
    import medlora.training.packing as packing
    from medlora.adapters.multi import PackedJobs
    from medlora.data.datamodule import CTSegDataModule
    from medlora.training.module import SegmentationModule

    names = {crossval.Study: ["prepare_job", "_evaluate", "_summary", "run_job"],
             crossval: ["_trainer", "calibration_histogram", "write_summary", "atomic_save_safetensors"],
             CTSegDataModule: ["setup"], dataloader._BaseDataLoaderIter: ["__next__"],
             PackedJobs: ["forward"], SegmentationModule: ["training_loss"], torch.Tensor: ["backward"],
             torch.optim.Optimizer: ["zero_grad"], torch.optim.Adam: ["step"], torch.optim.AdamW: ["step"],
             module_mod: ["case_metrics"], packing: ["write_adapter_file", "train_packed"],
             callbacks: ["write_adapter_file"], loggers.CSVLogger: ["save"], backbone: ["forward"]}
    saved = {(owner, a): owner.__dict__[a] if a in owner.__dict__ else getattr(owner, a)
             for owner, attrs in names.items() for a in attrs}
    return saved


if __name__ == "__main__":
    main()
