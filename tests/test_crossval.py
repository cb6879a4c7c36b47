"""The k-fold transfer study: jobs, resumability, determinism, --only/--list, config errors, the report."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from medlora.cli import main
from medlora.training.crossval import Study, plan_jobs
from medlora.training.study_config import StudyConfigError, load_study_config

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny",
    "seeds": [0],
    "folds": 2,
    "source": {"phantoms": {"domain": "tbi", "cases": 3, "seed": 0, "shape": [48, 48, 16], "spacing": [4, 4, 10]}},
    "target": {"phantoms": {"domain": "sah", "cases": 4, "seed": 1, "shape": [48, 48, 16], "spacing": [4, 4, 10]}},
    "model": {"backbone": "mv_unet", "backbone_args": {"level": 1, "width": 4}},
    "data": {"spatial_dims": 3, "patch_size": [32, 32, 16], "batch_size": 1, "samples_per_volume": 1},
    "trainer": {"max_epochs": 1},
    "methods": [
        {"name": "no_finetune"},
        {"name": "full"},
        {"name": "module", "finetune": "decoder"},
        {"name": "cp_dora", "ranks": [1, 2]},
        {"name": "svd"},
    ],
}


def fold(job: str, k: int, seed: int = 0, cases: int | str = "all") -> str:
    """A job fold's folder under RUN/jobs (medlora.runs' layout)."""
    return f"{job}/seed_{seed}/cases_{cases}/fold_{k}"


def write_config(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}), encoding="utf-8")
    return path


def summaries(run: Path) -> dict[str, dict]:
    return {p.parent.relative_to(run / "jobs").as_posix(): json.loads(p.read_text(encoding="utf-8"))
            for p in sorted((run / "jobs").glob("*/seed_*/cases_*/fold_*/summary.json"))}


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
    assert list(summaries(run)) == [fold("cp_dora_r2", 1)]
    kept = (run / "jobs" / fold("cp_dora_r2", 1) / "summary.json").stat().st_mtime_ns

    # an interrupted job leaves a folder without summary.json: it is redone from scratch
    partial = run / "jobs" / fold("full", 0)
    partial.mkdir(parents=True)
    (partial / "junk.txt").write_text("half-written", encoding="utf-8")
    assert main(["crossval", "--config", str(config), "--out", str(run)]) == 0
    assert not (partial / "junk.txt").exists()
    assert (run / "jobs" / fold("cp_dora_r2", 1) / "summary.json").stat().st_mtime_ns == kept
    done = summaries(run)
    assert len(done) == len(jobs) == 12

    s = done[fold("cp_dora_r1", 0)]
    assert set(s) >= {"metric_per_case", "mean", "foreground_mean", "medlora"}
    assert s["medlora"]["trainable_params"] > 0 and s["medlora"]["rank"] == 1
    case = s["metric_per_case"][0]
    assert {"Dice", "soft_Dice", "HD95_mm", "volume_true_ml", "volume_pred_ml"} <= set(case["metrics"]["1"])
    assert done[fold("no_finetune", 0)]["medlora"]["trainable_params"] == 0
    assert (run / "jobs" / fold("cp_dora_r1", 0) / "adapter.safetensors").is_file()
    assert (run / "jobs" / fold("full", 0) / "model.safetensors").is_file()
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
    assert sorted(repeated) == [fold("cp_dora_r1", 0), fold("full", 1)]
    for key, value in repeated.items():
        assert [c["metrics"] for c in value["metric_per_case"]] == [c["metrics"] for c in done[key]["metric_per_case"]]


def test_list_only_and_config_errors(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["crossval", "--config", str(config), "--out", str(tmp_path / "r"), "--list"]) == 0
    lines = capsys.readouterr().out.split()
    assert lines[0] == "pretrain" and "job=cp_dora_r1,seed=0,train_cases=all,fold=1" in lines and len(lines) == 13

    code = main(["crossval", "--config", str(config), "--out", str(tmp_path / "r"), "--only", "methd=full"])
    assert code == 2 and "--only 'methd=full'" in capsys.readouterr().err

    bad = write_config(tmp_path, trainer={"max_epoch": 3})
    code = main(["crossval", "--config", str(bad), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"medlora: error: {bad}: study.trainer: unknown key 'max_epoch' (valid: max_epochs, "
                                 "max_steps, accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm, "
                                 "precision, accelerator)")
    bad = write_config(tmp_path, methods=[{"name": "lroa"}])
    with pytest.raises(StudyConfigError, match=r"study.methods\[0\].name: unknown method 'lroa'"):
        load_study_config(bad)
    bad = write_config(tmp_path, methods=[{"name": "salt", "adapter": {"options": {"svdrank": 2}}}])
    with pytest.raises(StudyConfigError, match=r"study.methods\[0\]: unknown option\(s\) svdrank"):
        load_study_config(bad)
    assert not (tmp_path / "r").exists()


def test_old_study_keys_name_their_replacement_in_one_line(tmp_path, capsys):
    old = {**TINY, "seed": 0, "base_checkpoint": "base.safetensors", "finetune": {"epochs": 3, "adapter_lr": 0.005},
           "data": {"patch_size": [32, 32, 16], "inference_roi": [48, 48, 16]},
           "methods": [{"name": "module", "group": "decoder"}, {"name": "salt", "options": {"svd_rank": 2}}]}
    old.pop("seeds")
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old), encoding="utf-8")
    code = main(["crossval", "--config", str(path), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        f"medlora: error: {path}: old study format: study.seed: renamed to seeds (a list: seeds: [0]); "
        "study.base_checkpoint: renamed to model.pretrained; study.finetune.epochs: renamed to trainer.max_epochs; "
        "study.finetune.adapter_lr: renamed to adapter_methods.lr; study.data.inference_roi: renamed to "
        "model.roi_size; study.methods[0].group: renamed to finetune (the module group, as model.finetune in "
        "medlora fit); study.methods[1].options: renamed to adapter.options (as model.adapter.options in medlora fit)")
    assert not (tmp_path / "r").exists()


def test_a_study_reads_the_sections_medlora_fit_reads(tmp_path):
    """The model/data/trainer sections of a fit config are a study's, and the other way round."""
    fit = yaml.safe_load((ROOT / "configs" / "finetune_sah_3d.yaml").read_text(encoding="utf-8"))
    model = {k: v for k, v in fit["model"].items() if k not in ("pretrained", "finetune")}  # set per job
    data = {k: v for k, v in fit["data"].items() if k not in ("data_dir", "fold", "num_folds")}
    model.update(weight_decay=0.01, sw_overlap=0.5, threshold=0.4)  # module settings the old study format lacked
    data.update(cache=False)
    config = load_study_config(write_config(tmp_path, model=model, data=data,
                                            trainer={"max_epochs": fit["trainer"]["max_epochs"]}))
    (full,) = [m for m in config.methods if m.name == "full"]
    job = config.job_model(full, None, "base.safetensors")
    assert {k: job[k] for k in model} == model and job["finetune"] == "all" and job["pretrained"] == "base.safetensors"
    assert config.data == data and config.trainer == {"max_epochs": 20}

    # the shipped study's sections are accepted by medlora fit as they stand (jsonargparse's own check)
    study = yaml.safe_load((ROOT / "configs" / "study" / "sah_transfer.yaml").read_text(encoding="utf-8"))
    as_fit = tmp_path / "fit.yaml"
    as_fit.write_text(yaml.safe_dump({"model": study["model"], "trainer": study["trainer"],
                                      "data": {**study["data"], "data_dir": str(tmp_path)}}), encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "medlora.cli", "fit", "--config", str(as_fit), "--print_config"],
                         capture_output=True, encoding="utf-8", errors="replace",
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    printed = yaml.safe_load(out.stdout)
    assert {k: printed["model"][k] for k in study["model"]} == study["model"]
    assert {k: printed["data"][k] for k in study["data"]} == study["data"]
    assert {k: printed["trainer"][k] for k in study["trainer"]} == study["trainer"]


def test_pretraining_overrides_the_study_sections(tmp_path):
    config = load_study_config(write_config(
        tmp_path, model={**TINY["model"], "lr": 0.001, "forgetting_weight": 0.5}, trainer={"max_steps": 30},
        pretrain={"trainer": {"max_epochs": 5}, "model": {"lr": 0.003}, "data": {"batch_size": 2}}))
    assert config.pretrain_trainer() == {"max_epochs": 5}  # its own budget replaces the study's max_steps
    model = config.pretrain_model()
    assert (model["lr"], model["forgetting_weight"], model["finetune"], model["pretrained"]) == (0.003, 0.0, "all",
                                                                                                 None)
    assert config.pretrain_data()["batch_size"] == 2 and config.data["batch_size"] == 1
    (lora,) = [m for m in config.methods if m.name == "cp_dora"]
    assert config.job_model(lora, 2, "b.safetensors")["forgetting_weight"] == 0.5  # the study's model section


def test_a_run_folder_refuses_a_different_study(tmp_path, capsys):
    run = tmp_path / "run"
    study = Study(write_config(tmp_path), run)
    study.claim_run_dir()
    done = run / "jobs" / fold("full", 0) / "summary.json"  # something of the first study has completed
    done.parent.mkdir(parents=True)
    done.write_text("{}", encoding="utf-8")
    other = write_config(tmp_path, seeds=[1])
    code = main(["crossval", "--config", str(other), "--out", str(run)])
    assert code == 2 and "holds a different study" in capsys.readouterr().err
    assert done.is_file()

    # nothing completed, but a live process runs the first study (it holds the folder's shared lock)
    from medlora.training.locks import FileLock

    running = tmp_path / "running"
    (tmp_path / "first").mkdir()
    first = Study(write_config(tmp_path / "first"), running)
    first.claim_run_dir()
    holder = FileLock(running / "locks" / "study.lock", shared=True)
    assert holder.acquire(wait=False)
    try:
        code = main(["crossval", "--config", str(other), "--out", str(running)])
    finally:
        holder.release()
    assert code == 2 and "holds a different study" in capsys.readouterr().err
    assert json.loads((running / "study.json").read_text(encoding="utf-8"))["seeds"] == [0]


# ------------------------------------------------------------------ small studies on a given base and dataset


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """Four target phantoms and a random base for the mv_unet of TINY: studies that skip pretraining."""
    import torch

    from medlora.data.phantoms import write_dataset
    from medlora.models import create_model

    root = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    base = root / "base.safetensors"
    from safetensors.torch import save_file

    save_file(create_model("mv_unet", spatial_dims=3, level=1, width=4).state_dict(), str(base))
    return {"data": write_dataset(root / "sah", "sah", 4, seed=1, shape=(48, 48, 16), spacing=(4, 4, 10)),
            "base": base}


def small_config(tmp_path: Path, small: dict[str, Path], name: str = "study.yaml", **changes) -> Path:
    config = {**TINY, "model": {**TINY["model"], "pretrained": str(small["base"])},
              "target": {"data_dir": str(small["data"])},
              "methods": [{"name": "no_finetune"}, {"name": "lora", "ranks": [2]}]}
    config.pop("source")
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**config, **changes}), encoding="utf-8")
    return path


# (changes to the study, the key path the error names, words of the problem)
BAD_STUDIES = [
    ({"folds": 5}, "study.folds", "5 folds need at least 5 cases"),
    ({"model": {"backbone": "mv_unett"}}, "study.model.backbone", "unknown backbone 'mv_unett'"),
    ({"model": {"backbone": "mv_unet", "backbone_args": {"level": 1, "widht": 4}}}, "study.model.backbone_args",
     "unexpected keyword argument 'widht'"),
    ({"data": {"patch_size": [32, 32, 16], "batch_size": 0}}, "study.data.batch_size", "must be at least 1, got 0"),
    ({"data": {"patch_size": [32, 32, 16], "samples_per_volume": 0}}, "study.data.samples_per_volume", "at least 1"),
    ({"data": {"patch_size": [32, 32, 16], "pos_fraction": 1.5}}, "study.data.pos_fraction", "in [0, 1], got 1.5"),
    ({"data": {"patch_size": [32, 32]}}, "study.data.patch_size", "must be 3 positive numbers"),
    ({"data": {"patch_size": [32, 32, 16], "hu_window": [140.0, 0.0]}}, "study.data.hu_window", "low < high"),
    ({"model": {"lr": -0.001}}, "study.model.lr", "must be greater than 0, got -0.001"),
    ({"adapter_methods": {"lr": 0}}, "study.adapter_methods.lr", "must be greater than 0, got 0"),
    ({"trainer": {"max_epochs": -1}}, "study.trainer.max_epochs", "must be at least 0, got -1"),
    ({"model": {"sw_overlap": 1.0}}, "study.model.sw_overlap", "must be in [0, 1), got 1.0"),
    ({"methods": [{"name": "lora", "ranks": [2], "lr": -1.0}]}, "study.methods[0].lr", "greater than 0"),
    ({"methods": [{"name": "lora", "ranks": [2], "forgetting_weight": -1.0}]}, "study.methods[0].forgetting_weight",
     "must be at least 0, got -1.0"),
    ({"methods": [{"name": "lora", "ranks": [2], "adapter": {"targets": ["nothing_here"]}}]}, "study.methods[0]",
     "nothing_here"),
    ({"methods": [{"name": "paca", "ranks": [1, 8]}]}, "study.methods[0]", "rank 8: paca: rank 8 exceeds"),
    ({"methods": [{"name": "cp_lora", "ranks": [2], "training_rule": "lora_pro"}]}, "study.methods[0].training_rule",
     "training rule 'lora_pro' cannot train 'cp_lora' adapters"),
    ({"model": {"pretrained": "no/such/base.safetensors"}}, "study.model.pretrained", "file not found"),
    ({"train_cases": [2, 3]}, "study.train_cases[1]", "3 cases, but a fold has only 2 training cases"),
]


@pytest.mark.parametrize("changes,key,problem", BAD_STUDIES, ids=[k for _, k, _ in BAD_STUDIES])
def test_a_bad_study_value_is_one_line_and_claims_nothing(changes, key, problem, small, tmp_path, capsys):
    if "model" in changes:
        changes = {**changes, "model": {**TINY["model"], "pretrained": str(small["base"]), **changes["model"]}}
    if "data" in changes:
        changes = {**changes, "data": {"spatial_dims": 3, **changes["data"]}}
    config = small_config(tmp_path, small, **changes)
    run = tmp_path / "run"
    code = main(["crossval", "--config", str(config), "--out", str(run)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1, captured.err
    assert err[0].startswith(f"medlora: error: {config}: {key}: ") and problem in err[0], err[0]
    assert not run.exists()


def test_a_study_that_failed_while_preparing_does_not_block_the_corrected_one(small, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(small["data"], broken)
    image = broken / "imagesTr" / "SAH_002_0000.nii.gz"
    image.write_bytes(image.read_bytes()[:200])  # truncated: only the voxel check while preparing finds it
    run = tmp_path / "run"
    first = small_config(tmp_path, small, "first.yaml", target={"data_dir": str(broken)})
    assert main(["crossval", "--config", str(first), "--out", str(run)]) == 2
    assert "SAH_002_0000.nii.gz" in capsys.readouterr().err and (run / "study.json").is_file()

    fixed = small_config(tmp_path, small, "fixed.yaml")
    assert main(["crossval", "--config", str(fixed), "--out", str(run), "--only", "job=no_finetune,fold=0"]) == 0
    assert (run / "jobs" / fold("no_finetune", 0) / "summary.json").is_file()
    record = json.loads((run / "study.json").read_text(encoding="utf-8"))
    assert record["target"]["data_dir"] == str(small["data"])
    capsys.readouterr()


def _hold(lock_path: Path, marker: Path) -> subprocess.Popen:
    """A live child process holding ``lock_path`` with a half-written job folder, as a running job has.

    Plain ``fcntl.flock`` (the protocol, not our class) and the holder line, so that the child starts fast.
    """
    code = ("import fcntl, os, socket, sys, time; from pathlib import Path\n"
            f"fd = os.open({str(lock_path)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "os.write(fd, f'pid {os.getpid()} on {socket.gethostname()}'.encode())\n"
            f"m = Path({str(marker)!r}); m.parent.mkdir(parents=True); m.write_text('in progress')\n"
            "print('held', flush=True); time.sleep(600)\n")
    lock_path.parent.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, encoding="utf-8", errors="replace")
    assert child.stdout.readline().strip() == "held"
    return child


def test_concurrent_processes_share_a_run_folder_by_job_locks(small, tmp_path, capsys):
    config = small_config(tmp_path, small, methods=[{"name": "no_finetune"}, {"name": "full"}])
    run = tmp_path / "run"
    marker = run / "jobs" / fold("full", 0) / "partial.txt"
    child = _hold(run / "locks" / "jobs_full_seed_0_cases_all_fold_0.lock", marker)
    try:
        assert main(["crossval", "--config", str(config), "--out", str(run)]) == 0
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if x.startswith("full fine-tuning") and "fold 0" in x)
        assert re.fullmatch(rf"full fine-tuning +fold 0: running in another process \(pid {child.pid} on \S+\); "
                            "skipped", line)
        assert marker.read_text() == "in progress"  # the other process's job folder is left alone
        assert sorted(summaries(run)) == [fold("full", 1), fold("no_finetune", 0), fold("no_finetune", 1)]
        assert "report not built: 1 of 4 jobs are not done" in out and not (run / "report.md").exists()
    finally:
        child.kill()  # dies without releasing anything: its lock is stale now
        child.wait()
    assert main(["crossval", "--config", str(config), "--out", str(run)]) == 0
    assert len(summaries(run)) == 4 and not marker.exists() and (run / "report.md").is_file()
    assert (run / "locks" / "jobs_full_seed_0_cases_all_fold_0.lock").read_text().startswith(f"pid {os.getpid()} on ")
    capsys.readouterr()


def test_a_process_waits_for_pretraining_held_by_another(small, tmp_path, capsys):
    from medlora.training.locks import FileLock

    source = {"phantoms": {"domain": "tbi", "cases": 2, "seed": 0, "shape": [48, 48, 16], "spacing": [4, 4, 10]}}
    config = small_config(tmp_path, small, model=TINY["model"], source=source, methods=[{"name": "no_finetune"}])
    run = tmp_path / "run"
    other = FileLock(run / "locks" / "pretrain.lock")  # another holder (a second open file: flock conflicts)
    assert other.acquire(wait=False)
    threading.Timer(2.0, other.release).start()  # it ends without a base: this process pretrains then
    assert main(["crossval", "--config", str(config), "--out", str(run), "--only", "pretrain"]) == 0
    out = capsys.readouterr().out
    assert f"pretraining is running in another process (pid {os.getpid()} on " in out and "waiting for it" in out
    assert (run / "pretrain" / "summary.json").is_file()


def test_ctrl_c_during_a_job_is_one_line_and_exit_130(small, tmp_path):
    config = small_config(tmp_path, small, trainer={"max_epochs": 200}, methods=[{"name": "full"}])
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "medlora.cli", "crossval", "--config", str(config), "--out",
                             str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8",
                            errors="replace")
    logs = run / "jobs" / fold("full", 0) / "logs"
    deadline = time.monotonic() + 240
    while not logs.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # inside Lightning's training loop
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "medlora: interrupted; run the same command again to resume: 0 of 2 jobs done")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_parallel_workers_run_every_job(tmp_path, capsys):
    config = write_config(tmp_path, methods=[{"name": "no_finetune"}, {"name": "lora", "ranks": [2]}])
    run = tmp_path / "run"
    assert main(["crossval", "--config", str(config), "--out", str(run), "--workers", "2"]) == 0
    assert sorted(summaries(run)) == [fold("lora_r2", 0), fold("lora_r2", 1), fold("no_finetune", 0),
                                      fold("no_finetune", 1)]
    out = capsys.readouterr().out
    assert out.count("fold 1: Dice") == 2 and "report:" in out


# ------------------------------------------------------------------ the study grid: seeds, data sizes, forgetting


def test_training_subsets_are_deterministic_nested_and_seeded():
    from medlora.training.crossval import subset_splits

    splits = [{"train": [f"C{i:02d}" for i in range(20) if i % 3 != k], "val": [f"C{i:02d}" for i in range(20)
                                                                                   if i % 3 == k]} for k in range(3)]
    for seed in (0, 1):
        small, large = subset_splits(splits, 4, seed), subset_splits(splits, 8, seed)
        assert small == subset_splits(splits, 4, seed)  # deterministic
        for k in range(3):
            assert len(small[k]["train"]) == 4 and len(large[k]["train"]) == 8
            assert set(small[k]["train"]) < set(large[k]["train"]) < set(splits[k]["train"])  # nested, in the fold
            assert small[k]["val"] == large[k]["val"] == splits[k]["val"]  # the held-out cases stay
    assert any(subset_splits(splits, 4, 0)[k] != subset_splits(splits, 4, 1)[k] for k in range(3))  # seeded
    # the draw depends on the fold's cases, not on their listed order
    shuffled = [{"train": list(reversed(f["train"])), "val": f["val"]} for f in splits]
    assert subset_splits(shuffled, 4, 0) == subset_splits(splits, 4, 0)
    with pytest.raises(StudyConfigError, match="13 training cases"):
        subset_splits(splits, 14, 0)


def test_seeds_sizes_and_source_cases_are_resumable_selectable_jobs(small, tmp_path, capsys):
    phantoms = {"shape": [48, 48, 16], "spacing": [4, 4, 10]}
    config = small_config(
        tmp_path, small, seeds=[0, 1], train_cases=[2, "all"],
        target={"phantoms": {"domain": "sah", "cases": 6, "seed": 1, **phantoms}},
        source_eval={"phantoms": {"domain": "tbi", "cases": 2, "seed": 7, **phantoms}},
        methods=[{"name": "no_finetune"}, {"name": "lora", "ranks": [2]},
                 {"name": "lora", "ranks": [2], "forgetting_weight": 1.0}],
        findings=["fine_tuning_helps"], comparisons=[["lora_fw1_r2", "lora_r2"]])
    run = tmp_path / "run"
    assert main(["crossval", "--config", str(config), "--out", str(run), "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert len(listed) == 2 * 2 * 2 * 3 and "job=lora_fw1_r2,seed=1,train_cases=2,fold=0" in listed

    # one seed and size alone (a scheduler's array task), then the rest; the first ones are kept
    assert main(["crossval", "--config", str(config), "--out", str(run), "--only", "seed=1,train_cases=2"]) == 0
    first = summaries(run)
    assert sorted(first) == sorted(fold(j, k, 1, 2) for j in ("no_finetune", "lora_r2", "lora_fw1_r2")
                                   for k in (0, 1))
    stamps = {key: (run / "jobs" / key / "summary.json").stat().st_mtime_ns for key in first}
    assert main(["crossval", "--config", str(config), "--out", str(run)]) == 0
    done = summaries(run)
    assert len(done) == 24 and all((run / "jobs" / k / "summary.json").stat().st_mtime_ns == t
                                   for k, t in stamps.items())

    # the subsets: 2 of the fold's 3 training cases, nested in the fold, the same held-out cases
    folds = json.loads((run / "splits_final.json").read_text(encoding="utf-8"))
    for seed in (0, 1):
        cut = json.loads((run / "splits" / f"seed_{seed}_cases_2.json").read_text(encoding="utf-8"))
        for k in (0, 1):
            assert set(cut[k]["train"]) < set(folds[k]["train"]) and cut[k]["val"] == folds[k]["val"]
            assert done[fold("lora_r2", k, seed, 2)]["medlora"]["n_train_cases"] == 2
            assert done[fold("lora_r2", k, seed)]["medlora"]["n_train_cases"] == len(folds[k]["train"]) == 3

    # rows: every (job, seed, size, fold) on its target cases and its share of the held-out source cases
    with open(run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    source = [r for r in rows if r["domain"] == "source"]
    target = [r for r in rows if r["domain"] == "target"]
    assert len(target) == 24 * 3 and len(source) == 24 * 1
    assert {r["case_id"][:3] for r in source} == {"TBI"} and {r["case_id"][:3] for r in target} == {"SAH"}
    for job in ("no_finetune", "lora_r2", "lora_fw1_r2"):
        for seed in ("0", "1"):
            for size in ("2", "all"):
                cases = sorted(r["case_id"] for r in source if (r["job"], r["seed"], r["train_cases"]) ==
                               (job, seed, size))
                assert len(cases) == 2 and len(set(cases)) == 2  # each held-out source case once
    assert {r["forgetting_weight"] for r in rows if r["job"] == "lora_fw1_r2"} == {"1.0"}

    report = (run / "report.md").read_text(encoding="utf-8")
    for section in ("## Seeds", "## Training-set size", "## Forgetting on the source domain"):
        assert section in report
    assert "LoRA λ=1 r2 vs LoRA r2: lowers forgetting at equal target Dice — " in report
    assert (run / "plots" / "dice_vs_train_cases.png").is_file()
    info = json.loads((run / "study_info.json").read_text(encoding="utf-8"))
    assert info["findings"] == ["fine_tuning_helps"] and info["comparisons"] == [["lora_fw1_r2", "lora_r2"]]
    assert info["seeds"] == [0, 1] and info["train_cases"] == [2, "all"]


def test_progress_counts_steps_when_a_step_budget_binds():
    """A pretraining with `max_steps` and no `max_epochs` shows steps done of max_steps, not epochs of 1."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from medlora.training.crossval import _EpochProgress, _progress_budget

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen = []
    trainer = pl.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[_EpochProgress(lambda d, t: seen.append((d, t)))])
    trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2))  # 2 steps per epoch
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert _progress_budget({"max_steps": 400}) == 400 and _progress_budget({"max_epochs": 3}) == 3
    assert _progress_budget({}) == 1000
