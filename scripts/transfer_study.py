"""Trans-LoRA and NOT on the embedded phantoms: the numbers of docs/transfer.md.

    python scripts/transfer_study.py --out runs/transfer_study

Two 3-fold studies (``medlora crossval``) on the same TBI source and SAH target phantoms (2D, 64 x 64 x 32 at
3 x 3 x 5 mm, as the demo study):

* A, the *old* base: the multi-view UNet at width 8, pretrained on TBI; LoRA r4 fine-tuned per fold on SAH;
* B, the *new* base: the same network at width 16 (another department's retrained, wider base); no fine-tuning,
  LoRA r4 on the real SAH cases (the upper bound), and NOT transplants of one stage (at a trainable budget near
  LoRA's).

Then, per fold, the fold's A adapter is moved to B with ``medlora transfer`` (Trans-LoRA: distillation on
synthetic phantoms) without and with the discriminator filter (3 of the fold's training cases as seed cases),
and evaluated on the fold's held-out cases exactly as the study evaluates its jobs. Prints a Markdown table of
held-out SAH Dice (mean over the 15 held-out cases, nan-aware) and trainable parameters.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medlora.adapters import load_adapter, read_adapter_file  # noqa: E402
from medlora.data.dataset import load_splits, read_dataset  # noqa: E402
from medlora.data.phantoms import write_dataset  # noqa: E402
from medlora.evaluation.statistics import bootstrap_ci  # noqa: E402
from medlora.training.crossval import Study, run_crossval  # noqa: E402
from medlora.training.transfer import SyntheticSpec, run_transfer  # noqa: E402

GRID = {"shape": [64, 64, 32], "spacing": [3.0, 3.0, 5.0]}
STAGES = ["down_list.1", "M2"]


def study_config(out: Path, data: dict[str, Path], width: int, methods: list[dict], steps: int) -> Path:
    config = {
        "name": f"transfer study, width {width}", "seeds": [0], "folds": 3,
        "source": {"data_dir": str(data["source"])}, "target": {"data_dir": str(data["target"])},
        "model": {"backbone": "mv_unet", "backbone_args": {"level": 2, "width": width}, "lr": 0.001,
                  "sw_batch_size": 8},
        "data": {"spatial_dims": 2, "patch_size": [64, 64], "batch_size": 2, "hu_window": [0.0, 140.0]},
        "trainer": {"max_steps": steps},
        "pretrain": {"trainer": {"max_steps": 400}, "model": {"lr": 0.003}},
        "adapter_methods": {"lr": 0.005, "adapter": {"target_types": ["Conv2d"], "exclude": ["M3.TripleOut.6"]}},
        "methods": methods,
    }
    path = out / f"study_w{width}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def case_dice(summary_path: Path) -> dict[str, float]:
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return {c["case_id"]: c["metrics"]["1"]["Dice"] for c in summary["metric_per_case"]}


def nanmean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def paired(a: dict[str, float], b: dict[str, float]) -> str:
    """Mean per-case Dice difference a − b over the cases where both are defined, with its 95% bootstrap CI."""
    d = [a[c] - b[c] for c in a if c in b and not (math.isnan(a[c]) or math.isnan(b[c]))]
    low, high = bootstrap_ci(d)
    return f"{sum(d) / len(d):+.3f} [{low:+.3f}, {high:+.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/transfer_study")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps of every study job")
    parser.add_argument("--transfer-steps", type=int, default=300, help="distillation steps")
    parser.add_argument("--synthetic-volumes", type=int, default=16)
    parser.add_argument("--reuse", action="store_true", help="keep transferred adapters already in --out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    data = {"source": write_dataset(out / "data" / "source", "tbi", 16, seed=0, **GRID),
            "target": write_dataset(out / "data" / "target", "sah", 15, seed=1, **GRID)}
    lora = {"name": "lora", "ranks": [4]}
    old = study_config(out, data, 8, [{"name": "no_finetune"}, lora], args.steps)
    new = study_config(out, data, 16, [{"name": "no_finetune"}, lora,
                                       *({"name": "transplant", "stage": s} for s in STAGES)], args.steps)
    timings = {}
    for path, run in ((old, out / "old_w8"), (new, out / "new_w16")):
        start = time.perf_counter()
        run_crossval(str(path), str(run))
        timings[run.name] = time.perf_counter() - start
    study_old, study_new = Study(old, out / "old_w8"), Study(new, out / "new_w16")
    study_new.prepare_data()
    splits = load_splits(out / "new_w16" / "splits_final.json")
    dataset = read_dataset(data["target"])
    rows: dict[str, dict[str, float]] = {}
    trainable: dict[str, int] = {}
    for study, tag in ((study_old, "w8"), (study_new, "w16")):
        for job in study.jobs:
            key = f"{job.name} ({tag})"
            rows.setdefault(key, {}).update(case_dice(study.job_dir(job) / "summary.json"))
            trainable[key] = json.loads((study.job_dir(job) / "summary.json").read_text())["medlora"][
                "trainable_params"]
    transfer_seconds = []
    for k in range(3):
        teacher = study_old.job_dir(next(j for j in study_old.jobs if j.name == "lora_r4" and j.fold == k))
        seeds = out / f"seed_cases_fold_{k}"
        seeds.mkdir(exist_ok=True)
        for cid in sorted(splits[k]["train"])[:3]:
            link = seeds / dataset.case(cid).images[0].name
            if not link.exists():
                link.symlink_to(dataset.case(cid).images[0].resolve())
        for variant, seed_cases in (("transfer", None), ("transfer+filter", seeds)):
            adapter = out / "transferred" / f"fold_{k}_{variant}.safetensors"
            start = time.perf_counter()
            if args.reuse and adapter.exists():
                record = read_adapter_file(adapter)[0]["extra"]["transfer"]
            else:
                record = run_transfer(
                    teacher_model=study_old.base_path(), teacher_adapter=teacher / "adapter.safetensors",
                    model=study_new.base_path(), backbone_args={"level": 2, "width": 16}, method="lora", rank=4,
                    out=adapter, seed_cases=seed_cases, steps=args.transfer_steps,
                    synthetic=SyntheticSpec(volumes=args.synthetic_volumes, shape=tuple(GRID["shape"]),
                                            spacing=tuple(GRID["spacing"])), overwrite=True)
                transfer_seconds.append(time.perf_counter() - start)
            module = study_new._module(study_new.config.job_model(study_new.config.methods[0], None,
                                                                  str(study_new.base_path())))
            load_adapter(module.model, adapter)
            dm = study_new._datamodule(study_new.target_dir, k, 0)
            case_rows, _ = study_new._evaluate(module, dm)
            label = "no filter" if seed_cases is None else "filter, 3 seed cases"
            rows.setdefault(f"lora_r4 transferred w8 -> w16 ({label})", {}).update(
                {r["case_id"]: r["Dice"] for r in case_rows})
            if seed_cases is not None:
                print(f"fold {k}: filter kept {record['filter']['kept']} of {record['filter']['pool']}")
    print(f"\nstudies: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}; transfer runs: "
          f"{', '.join(f'{s:.0f}' for s in transfer_seconds)} s\n")
    print("| model | held-out SAH Dice (15 cases) | trainable parameters |\n|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {nanmean(values.values()):.3f} | {trainable.get(name, '')} |")
    references = ["no_finetune (w16)", "lora_r4 (w8)", "lora_r4 (w16)"]
    print("\n| transferred adapter | Δ Dice vs " + " | vs ".join(references) + " |\n|---|---|---|---|")
    for name in [n for n in rows if "transferred" in n]:
        print(f"| {name} | " + " | ".join(paired(rows[name], rows[r]) for r in references) + " |")
    print("| filter − no filter | " + paired(rows["lora_r4 transferred w8 -> w16 (filter, 3 seed cases)"],
                                           rows["lora_r4 transferred w8 -> w16 (no filter)"]) + " | | |")
    print("| transplant_down_list.1 − lora_r4 (w16) | " + paired(rows["transplant_down_list.1 (w16)"],
                                                              rows["lora_r4 (w16)"]) + " | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
