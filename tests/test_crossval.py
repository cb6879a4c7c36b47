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
    done = run / "jobs" / "full" / "fold_0" / "summary.json"  # something of the first study has completed
    done.parent.mkdir(parents=True)
    done.write_text("{}", encoding="utf-8")
    other = write_config(tmp_path, seed=1)
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
    assert json.loads((running / "study.json").read_text(encoding="utf-8"))["seed"] == 0


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
    config = {**TINY, "base_checkpoint": str(small["base"]), "target": {"data_dir": str(small["data"])},
              "methods": [{"name": "no_finetune"}, {"name": "lora", "ranks": [2]}]}
    config.pop("source")
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**config, **changes}), encoding="utf-8")
    return path


# (changes to the study, the key path the error names, words of the problem)
BAD_STUDIES = [
    ({"folds": 5}, "study.folds", "5 folds need at least 5 cases"),
    ({"model": {"backbone": "mv_unett", "spatial_dims": 3}}, "study.model.backbone", "unknown backbone 'mv_unett'"),
    ({"model": {"backbone": "mv_unet", "backbone_args": {"level": 1, "widht": 4}}}, "study.model.backbone_args",
     "unexpected keyword argument 'widht'"),
    ({"data": {"patch_size": [32, 32, 16], "batch_size": 0}}, "study.data.batch_size", "must be at least 1, got 0"),
    ({"data": {"patch_size": [32, 32, 16], "samples_per_volume": 0}}, "study.data.samples_per_volume", "at least 1"),
    ({"data": {"patch_size": [32, 32, 16], "pos_fraction": 1.5}}, "study.data.pos_fraction", "in [0, 1], got 1.5"),
    ({"data": {"patch_size": [32, 32]}}, "study.data.patch_size", "must be 3 positive numbers"),
    ({"data": {"patch_size": [32, 32, 16], "hu_window": [140.0, 0.0]}}, "study.data.hu_window", "low < high"),
    ({"finetune": {"epochs": 1, "lr": -0.001}}, "study.finetune.lr", "must be greater than 0, got -0.001"),
    ({"finetune": {"epochs": 1, "adapter_lr": 0}}, "study.finetune.adapter_lr", "must be greater than 0, got 0"),
    ({"finetune": {"epochs": -1}}, "study.finetune.epochs", "must be at least 0, got -1"),
    ({"methods": [{"name": "lora", "ranks": [2], "lr": -1.0}]}, "study.methods[0].lr", "greater than 0"),
    ({"methods": [{"name": "lora", "ranks": [2], "targets": ["nothing_here"]}]}, "study.methods[0]", "nothing_here"),
    ({"methods": [{"name": "paca", "ranks": [1, 8]}]}, "study.methods[0]", "rank 8: paca: rank 8 exceeds"),
    ({"base_checkpoint": "no/such/base.safetensors"}, "study.base_checkpoint", "file not found"),
]


@pytest.mark.parametrize("changes,key,problem", BAD_STUDIES, ids=[k for _, k, _ in BAD_STUDIES])
def test_a_bad_study_value_is_one_line_and_claims_nothing(changes, key, problem, small, tmp_path, capsys):
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
    assert (run / "jobs" / "no_finetune" / "fold_0" / "summary.json").is_file()
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
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_concurrent_processes_share_a_run_folder_by_job_locks(small, tmp_path, capsys):
    config = small_config(tmp_path, small, methods=[{"name": "no_finetune"}, {"name": "full"}])
    run = tmp_path / "run"
    marker = run / "jobs" / "full" / "fold_0" / "partial.txt"
    child = _hold(run / "locks" / "job_full_fold_0.lock", marker)
    try:
        assert main(["crossval", "--config", str(config), "--out", str(run)]) == 0
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if x.startswith("full fine-tuning") and "fold 0" in x)
        assert re.fullmatch(rf"full fine-tuning +fold 0: running in another process \(pid {child.pid} on \S+\); "
                            "skipped", line)
        assert marker.read_text() == "in progress"  # the other process's job folder is left alone
        assert sorted(summaries(run)) == ["full/fold_1", "no_finetune/fold_0", "no_finetune/fold_1"]
        assert "report not built: 1 of 4 jobs are not done" in out and not (run / "report.md").exists()
    finally:
        child.kill()  # dies without releasing anything: its lock is stale now
        child.wait()
    assert main(["crossval", "--config", str(config), "--out", str(run)]) == 0
    assert len(summaries(run)) == 4 and not marker.exists() and (run / "report.md").is_file()
    assert (run / "locks" / "job_full_fold_0.lock").read_text().startswith(f"pid {os.getpid()} on ")
    capsys.readouterr()


def test_a_process_waits_for_pretraining_held_by_another(small, tmp_path, capsys):
    from medlora.training.locks import FileLock

    source = {"phantoms": {"domain": "tbi", "cases": 2, "seed": 0, "shape": [48, 48, 16], "spacing": [4, 4, 10]}}
    config = small_config(tmp_path, small, base_checkpoint=None, source=source, methods=[{"name": "no_finetune"}])
    run = tmp_path / "run"
    other = FileLock(run / "locks" / "pretrain.lock")  # another holder (a second open file: flock conflicts)
    assert other.acquire(wait=False)
    threading.Timer(2.0, other.release).start()  # it ends without a base: this process pretrains then
    assert main(["crossval", "--config", str(config), "--out", str(run), "--only", "pretrain"]) == 0
    out = capsys.readouterr().out
    assert f"pretraining is running in another process (pid {os.getpid()} on " in out and "waiting for it" in out
    assert (run / "pretrain" / "summary.json").is_file()


def test_ctrl_c_during_a_job_is_one_line_and_exit_130(small, tmp_path):
    config = small_config(tmp_path, small, finetune={"epochs": 200}, methods=[{"name": "full"}])
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "medlora.cli", "crossval", "--config", str(config), "--out",
                             str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = run / "jobs" / "full" / "fold_0" / "logs"
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
    assert sorted(summaries(run)) == ["lora_r2/fold_0", "lora_r2/fold_1", "no_finetune/fold_0", "no_finetune/fold_1"]
    out = capsys.readouterr().out
    assert out.count("fold 1: Dice") == 2 and "report:" in out
