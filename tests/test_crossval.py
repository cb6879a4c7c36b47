"""The k-fold transfer study: jobs, resumability, determinism, --only/--list, config errors, the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from medlora.cli import main
from medlora.training.crossval import Study, plan_jobs
from medlora.training.study_config import StudyConfigError, load_study_config

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny",
    "seed": 0,
    "folds": 2,
    "source": {"phantoms": {"domain": "tbi", "cases": 3, "seed": 0, "shape": [48, 48, 16], "spacing": [4, 4, 10]}},
    "target": {"phantoms": {"domain": "sah", "cases": 4, "seed": 1, "shape": [48, 48, 16], "spacing": [4, 4, 10]}},
    "model": {"backbone": "mv_unet", "backbone_args": {"level": 1, "width": 4}, "spatial_dims": 3},
    "data": {"patch_size": [32, 32, 16], "batch_size": 1, "samples_per_volume": 1},
    "pretrain": {"epochs": 1},
    "finetune": {"epochs": 1},
    "methods": [
        {"name": "no_finetune"},
        {"name": "full"},
        {"name": "module", "group": "decoder"},
        {"name": "cp_dora", "ranks": [1, 2]},
        {"name": "svd"},
    ],
}


def write_config(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}), encoding="utf-8")
    return path


def summaries(run: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(run / "jobs")): json.loads(p.read_text(encoding="utf-8"))
            for p in sorted((run / "jobs").glob("*/fold_*/summary.json"))}


def test_shipped_study_configs_load():
    quick = load_study_config(ROOT / "configs" / "study" / "sah_transfer.yaml")
    full = load_study_config(ROOT / "configs" / "study" / "sah_transfer_full.yaml")
    assert quick.folds == full.folds == 3
    methods = {j.method for j in plan_jobs(full)}
    assert methods >= {"no_finetune", "full", "module", "lora", "lora_c", "conv_lora", "cp_lora", "dora",
                       "dora_c", "conv_dora", "cp_dora", "salt", "svd"}


def test_study_runs_resumes_and_is_deterministic(tmp_path, capsys):
    config = write_config(tmp_path)
    run = tmp_path / "run"
    jobs = plan_jobs(load_study_config(config))
    assert [j.name for j in jobs[:6]] == ["no_finetune", "full", "module_decoder", "cp_dora_r1", "cp_dora_r2", "svd"]

    # a scheduler's view: pretraining first, then one selected job
    assert main(["crossval", "--config", str(config), "--out", str(run), "--only", "pretrain"]) == 0
    assert (run / "pretrain" / "base.safetensors").is_file()
    assert main(["crossval", "--config", str(config), "--out", str(run), "--only", "job=cp_dora_r2,fold=1"]) == 0
    assert list(summaries(run)) == ["cp_dora_r2/fold_1"]
    kept = (run / "jobs" / "cp_dora_r2" / "fold_1" / "summary.json").stat().st_mtime_ns

    # an interrupted job leaves a folder without summary.json: it is redone from scratch
    partial = run / "jobs" / "full" / "fold_0"
    partial.mkdir(parents=True)
    (partial / "junk.txt").write_text("half-written", encoding="utf-8")
    assert main(["crossval", "--config", str(config), "--out", str(run)]) == 0
    assert not (partial / "junk.txt").exists()
    assert (run / "jobs" / "cp_dora_r2" / "fold_1" / "summary.json").stat().st_mtime_ns == kept
    done = summaries(run)
    assert len(done) == len(jobs) == 12

    s = done["cp_dora_r1/fold_0"]
    assert set(s) >= {"metric_per_case", "mean", "foreground_mean", "medlora"}
    assert s["medlora"]["trainable_params"] > 0 and s["medlora"]["rank"] == 1
    case = s["metric_per_case"][0]
    assert {"Dice", "soft_Dice", "HD95_mm", "volume_true_ml", "volume_pred_ml"} <= set(case["metrics"]["1"])
    assert done["no_finetune/fold_0"]["medlora"]["trainable_params"] == 0
    assert (run / "jobs" / "cp_dora_r1" / "fold_0" / "adapter.safetensors").is_file()
    assert (run / "jobs" / "full" / "fold_0" / "model.safetensors").is_file()
    folds = json.loads((run / "splits_final.json").read_text(encoding="utf-8"))
    evaluated = [c["case_id"] for c in s["metric_per_case"]]
    assert evaluated == folds[0]["val"]

    # the report is built from the job folders alone
    with open(run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 * 4  # 6 jobs x 4 target cases (each case held out once)
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "CP-DoRA r2" in report and (run / "plots").is_dir()
    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0 and (run / "report.md").read_text(encoding="utf-8") == report

    # same config and seed, fresh folder: the same numbers (pretraining included)
    again = tmp_path / "again"
    for only in ("pretrain", "job=cp_dora_r1,fold=0", "job=full,fold=1"):
        assert main(["crossval", "--config", str(config), "--out", str(again), "--only", only]) == 0
    repeated = summaries(again)
    assert sorted(repeated) == ["cp_dora_r1/fold_0", "full/fold_1"]
    for key, value in repeated.items():
        assert [c["metrics"] for c in value["metric_per_case"]] == [c["metrics"] for c in done[key]["metric_per_case"]]


def test_list_only_and_config_errors(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["crossval", "--config", str(config), "--out", str(tmp_path / "r"), "--list"]) == 0
    lines = capsys.readouterr().out.split()
    assert lines[0] == "pretrain" and "job=cp_dora_r1,fold=1" in lines and len(lines) == 13

    code = main(["crossval", "--config", str(config), "--out", str(tmp_path / "r"), "--only", "methd=full"])
    assert code == 2 and "--only 'methd=full'" in capsys.readouterr().err

    bad = write_config(tmp_path, finetune={"epoch": 3})
    code = main(["crossval", "--config", str(bad), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"medlora: error: {bad}: study.finetune: unknown key 'epoch' "
                                 "(valid: epochs, lr, adapter_lr, loss, norm_stats)")
    bad = write_config(tmp_path, methods=[{"name": "lroa"}])
    with pytest.raises(StudyConfigError, match=r"study.methods\[0\].name: unknown method 'lroa'"):
        load_study_config(bad)
    bad = write_config(tmp_path, methods=[{"name": "salt", "options": {"svdrank": 2}}])
    with pytest.raises(StudyConfigError, match=r"study.methods\[0\]: unknown option\(s\) svdrank"):
        load_study_config(bad)


def test_a_run_folder_refuses_a_different_study(tmp_path, capsys):
    run = tmp_path / "run"
    study = Study(write_config(tmp_path), run)
    study.claim_run_dir()
    other = write_config(tmp_path, seed=1)
    code = main(["crossval", "--config", str(other), "--out", str(run)])
    assert code == 2 and "holds a different study" in capsys.readouterr().err


def test_parallel_workers_run_every_job(tmp_path, capsys):
    config = write_config(tmp_path, methods=[{"name": "no_finetune"}, {"name": "lora", "ranks": [2]}])
    run = tmp_path / "run"
    assert main(["crossval", "--config", str(config), "--out", str(run), "--workers", "2"]) == 0
    assert sorted(summaries(run)) == ["lora_r2/fold_0", "lora_r2/fold_1", "no_finetune/fold_0", "no_finetune/fold_1"]
    out = capsys.readouterr().out
    assert out.count("fold 1: Dice") == 2 and "report:" in out
