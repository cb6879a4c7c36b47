"""Packed study jobs (``crossval --pack``), the Ray launcher and the SLURM array script against unpacked local runs.

The reference of every comparison is the study run the ordinary way: one Lightning ``Trainer.fit`` per job in
one process (``--pack 1``, the local launcher), whose code the packed loop does not share.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medlora.cli import main
from medlora.runs import RunJob
from medlora.training.crossval import Study
from medlora.training.packing import plan_units, trainer_problem

ROOT = Path(__file__).resolve().parents[1]
METHODS = [{"name": "no_finetune"}, {"name": "full"}, {"name": "lora", "ranks": [2]}, {"name": "dora_c", "ranks": [2]},
           {"name": "lora", "ranks": [2], "forgetting_weight": 1.0}]
# Float tolerance of packed against unpacked jobs (float32, two threads): the packed forward sums in another order
# (grouped convolutions), a difference of ~1e-7 relative per step.
PER_CASE_ABS = 1e-5      # Dice, soft Dice, IoU, HD95 (mm) of every case
VOLUME_REL = 1e-4        # soft volume (a float32 sum over the volume)
# LoRA factors, relative to the tensor's largest entry: Adam (lr 0.01) divides by the gradient's own size, which
# magnifies round-off where a gradient is nearly zero (measured up to 1e-4); a wrong batch, seed or BatchNorm
# statistic changes the factors at order 1
LORA_REL = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny 3D study on a given random base (no pretraining): 2 folds of 4 SAH phantoms, 2 epochs per job."""
    from safetensors.torch import save_file

    from medlora.data.phantoms import write_dataset
    from medlora.models import create_model

    root = tmp_path_factory.mktemp("pack")
    torch.manual_seed(0)
    save_file(create_model("mv_unet", spatial_dims=3, level=1, width=4).state_dict(), str(root / "base.safetensors"))
    data = write_dataset(root / "sah", "sah", 4, seed=1, shape=(48, 48, 16), spacing=(4, 4, 10))
    config = {"name": "tiny", "seeds": [0], "folds": 2, "target": {"data_dir": str(data)},
              "model": {"backbone": "mv_unet", "backbone_args": {"level": 1, "width": 4},
                        "pretrained": str(root / "base.safetensors")},
              "data": {"spatial_dims": 3, "patch_size": [32, 32, 16], "batch_size": 1, "samples_per_volume": 1},
              "trainer": {"max_epochs": 2, "gradient_clip_val": 1.0},
              "adapter_methods": {"lr": 0.01}, "methods": METHODS}
    (root / "study.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return root / "study.yaml"


@pytest.fixture(scope="module")
def unpacked(tiny, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("unpacked") / "run"
    assert main(["crossval", "--config", str(tiny), "--out", str(run)]) == 0
    return run


def job_folders(run: Path) -> list[str]:
    return sorted(p.parent.relative_to(run).as_posix() for p in run.glob("jobs/*/seed_*/cases_*/fold_*/summary.json"))


def assert_same_jobs(run: Path, reference: Path, folders: list[str]) -> None:
    for folder in folders:
        ours = json.loads((run / folder / "summary.json").read_text(encoding="utf-8"))
        theirs = json.loads((reference / folder / "summary.json").read_text(encoding="utf-8"))
        assert [c["case_id"] for c in ours["metric_per_case"]] == [c["case_id"] for c in theirs["metric_per_case"]]
        for a, b in zip(ours["metric_per_case"], theirs["metric_per_case"], strict=True):
            a, b = a["metrics"]["1"], b["metrics"]["1"]
            for key in ("Dice", "soft_Dice", "IoU", "HD95_mm"):
                assert (math.isnan(a[key]) and math.isnan(b[key])) or abs(a[key] - b[key]) <= PER_CASE_ABS, \
                    (folder, key, a[key], b[key])
            for key in ("TP", "FP", "FN", "n_pred"):
                assert a[key] == b[key], (folder, key)
            assert abs(a["volume_soft_ml"] - b["volume_soft_ml"]) <= VOLUME_REL * abs(b["volume_soft_ml"])
        if (reference / folder / "adapter.safetensors").exists() and "/lora_" in folder:
            ours_t, theirs_t = (load_file(str(r / folder / "adapter.safetensors")) for r in (run, reference))
            assert ours_t.keys() == theirs_t.keys()
            for key, value in theirs_t.items():
                if value.is_floating_point() and "lora" in key:
                    scale = value.abs().max().clamp_min(1e-12)
                    assert ((ours_t[key] - value).abs().max() / scale) <= LORA_REL, (folder, key)


def test_packed_study_equals_the_unpacked_study(tiny, unpacked, tmp_path, capsys):
    run = tmp_path / "packed"
    assert main(["crossval", "--config", str(tiny), "--out", str(run), "--pack", "3"]) == 0
    folders = job_folders(unpacked)
    assert job_folders(run) == folders and len(folders) == 10
    assert_same_jobs(run, unpacked, folders)
    for folder in folders:
        ours, theirs = run / folder, unpacked / folder
        # the same files in every job folder, the logs with the same steps and losses
        assert sorted(p.relative_to(ours).as_posix() for p in ours.rglob("*")) == \
            sorted(p.relative_to(theirs).as_posix() for p in theirs.rglob("*"))
        info = json.loads((ours / "summary.json").read_text(encoding="utf-8"))["medlora"]
        if "no_finetune" in folder:
            assert "pack_size" not in info
            continue
        assert info["pack_size"] in (2, 3) and info["trainable_params"] > 0
        rows = [line.split(",") for line in (ours / "logs/version_0/metrics.csv").read_text().splitlines()]
        reference = [line.split(",") for line in (theirs / "logs/version_0/metrics.csv").read_text().splitlines()]
        assert rows[0] == reference[0] and len(rows) == len(reference)
        loss = reference[0].index("train/loss_step")
        for a, b in zip(rows[1:], reference[1:], strict=True):
            assert a[:2] == b[:2]  # epoch, step
            if b[loss]:
                assert abs(float(a[loss]) - float(b[loss])) <= 1e-5 * abs(float(b[loss]))
    out = capsys.readouterr().out
    assert out.count(": Dice ") == 10 and "report:" in out


def test_a_killed_pack_redoes_only_its_unfinished_jobs(tiny, unpacked, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    finish = Study.finish_job
    calls = []

    def finish_then_die(self, job_run, *args, **kwargs):
        calls.append(job_run.job.name)
        if len(calls) == 3:  # Ctrl-C while the first pack's second job is being evaluated
            raise KeyboardInterrupt
        return finish(self, job_run, *args, **kwargs)

    monkeypatch.setattr(Study, "finish_job", finish_then_die)
    args = ["crossval", "--config", str(tiny), "--out", str(run), "--only", "fold=0", "--pack", "2"]
    assert main(args) == 130
    # no_finetune ran alone first; then the pack (full, lora_r2) was trained and its first job written before the
    # interrupt
    assert calls == ["no_finetune", "full", "lora_r2"]
    assert job_folders(run) == [f"jobs/{name}/seed_0/cases_all/fold_0" for name in ("full", "no_finetune")]
    kept = (run / "jobs/full/seed_0/cases_all/fold_0/summary.json").stat().st_mtime_ns
    monkeypatch.setattr(Study, "finish_job", finish)
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "full fine-tuning" not in out and "no fine-tuning" not in out and out.count(": Dice ") == 3
    assert (run / "jobs/full/seed_0/cases_all/fold_0/summary.json").stat().st_mtime_ns == kept
    folders = [f for f in job_folders(unpacked) if f.endswith("fold_0")]
    assert job_folders(run) == folders
    assert_same_jobs(run, unpacked, folders)
    sizes = {f: json.loads((run / f / "summary.json").read_text())["medlora"].get("pack_size") for f in folders}
    # the rerun packs lora_r2 with dora_c_r2; lora_fw1_r2, left alone, runs unpacked
    assert sizes == {"jobs/no_finetune/seed_0/cases_all/fold_0": None, "jobs/full/seed_0/cases_all/fold_0": 2,
                     "jobs/lora_r2/seed_0/cases_all/fold_0": 2, "jobs/dora_c_r2/seed_0/cases_all/fold_0": 2,
                     "jobs/lora_fw1_r2/seed_0/cases_all/fold_0": None}


def _job(name: str, family: str = "adapter", fold: int = 0, pretrain_seed: int = 0) -> RunJob:
    return RunJob(name=name, method=name, family=family, rank=None, fold=fold, pretrain_seed=pretrain_seed)


def test_packs_group_trainable_jobs_of_one_base_in_plan_order():
    jobs = [_job("none", "none"), _job("a"), _job("b", pretrain_seed=1), _job("c", "full"), _job("d"),
            _job("e", "module", pretrain_seed=1), _job("f")]
    names = [[j.name for j in unit] for unit in plan_units(jobs, 2, {"max_epochs": 1})]
    assert names == [["none"], ["a", "c"], ["b", "e"], ["d", "f"]]
    assert [[j.name for j in u] for u in plan_units(jobs, 1, {})] == [[j.name] for j in jobs]
    # what the packed loop does not repeat: every job alone
    assert trainer_problem({"accumulate_grad_batches": 2}) == "trainer.accumulate_grad_batches is 2"
    assert "precision" in trainer_problem({"precision": "bf16-mixed"})
    assert trainer_problem({"precision": "32-true", "accelerator": "cpu", "gradient_clip_val": 1.0}) is None
    assert [len(u) for u in plan_units(jobs, 4, {"precision": "16-mixed"})] == [1] * len(jobs)


@pytest.mark.parametrize("extra, message", [
    (["--pack", "0"], "--pack must be at least 1, got 0"),
    (["--ray-address", "auto"], "--ray-address needs --launcher ray"),
])
def test_bad_pack_and_launcher_options_are_one_line(tiny, tmp_path, capsys, extra, message):
    assert main(["crossval", "--config", str(tiny), "--out", str(tmp_path / "run"), *extra]) == 2
    assert capsys.readouterr().err.strip() == f"medlora: error: {message}"
    assert not (tmp_path / "run").exists()


def test_ray_launcher_runs_the_study_as_the_local_launcher(tiny, tmp_path, capsys, one_thread):
    pytest.importorskip("ray")
    only = ["--only", "job=lora_r2,fold=1"]
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert main(["crossval", "--config", str(tiny), "--out", str(local), *only]) == 0
    assert main(["crossval", "--config", str(tiny), "--out", str(remote), *only, "--launcher", "ray",
                 "--workers", "2"]) == 0
    folders = job_folders(local)
    assert job_folders(remote) == folders == ["jobs/lora_r2/seed_0/cases_all/fold_1"]
    # the same function in a Ray worker with the same thread count (one: --workers 2 on one thread) is bitwise equal
    ours = json.loads((remote / folders[0] / "summary.json").read_text(encoding="utf-8"))
    theirs = json.loads((local / folders[0] / "summary.json").read_text(encoding="utf-8"))
    assert ours["metric_per_case"] == theirs["metric_per_case"]
    a, b = (load_file(str(r / folders[0] / "adapter.safetensors")) for r in (remote, local))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert capsys.readouterr().out.count("LoRA r2") == 2


def test_slurm_array_script_runs_one_job_per_task_and_submits_with_dependencies(tiny, tmp_path):
    script = ROOT / "scripts" / "slurm_array.sh"
    run = tmp_path / "run"
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "sbatch.log"
    # a stand-in sbatch: records its arguments, answers a job id as `sbatch --parsable` does
    (fake / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {log}\necho $(( $(wc -l < {log}) + 100 ))\n')
    (fake / "sbatch").chmod(0o755)
    medlora = f"{sys.executable} -m medlora.cli"
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "MEDLORA": medlora,
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    listed = subprocess.run([sys.executable, "-m", "medlora.cli", "crossval", "--config", str(tiny), "--out",
                             str(run), "--list"], capture_output=True, text=True, env=env, check=True).stdout.split()
    out = subprocess.run(["bash", str(script), "submit", str(tiny), str(run)], capture_output=True, text=True,
                         env=env, check=True).stdout
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and "101" in out and "102" in out  # the array, then the report after it
    assert calls[0].startswith(f"--parsable --array=0-{len(listed) - 1} ") and calls[0].endswith(
        f"{script} task {tiny} {run}")
    assert calls[1].startswith("--parsable --dependency=afterany:101 ") and calls[1].endswith(
        f"{script} report {tiny} {run}")

    # array task 5: the sixth line of --list (no_finetune on fold 1), nothing else
    subprocess.run(["bash", str(script), "task", str(tiny), str(run)], env={**env, "SLURM_ARRAY_TASK_ID": "5"},
                   check=True, capture_output=True, text=True)
    selector = dict(part.split("=") for part in listed[5].split(","))
    expected = f"jobs/{selector['job']}/seed_{selector['seed']}/cases_{selector['train_cases']}/fold_{selector['fold']}"
    assert job_folders(run) == [expected] == ["jobs/no_finetune/seed_0/cases_all/fold_1"]


def test_a_pack_the_bank_refuses_runs_its_jobs_one_by_one(tiny, tmp_path, capsys):
    config = yaml.safe_load(tiny.read_text(encoding="utf-8"))
    config["methods"] = [{"name": "flylora", "ranks": [2]}, {"name": "lora", "ranks": [2]}]
    path = tmp_path / "fly.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["crossval", "--config", str(path), "--out", str(run), "--only", "fold=0", "--pack", "2"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "cannot be packed" in line)
    assert line.startswith("2 jobs (flylora_r2, lora_r2) cannot be packed: ") and "flylora" in line[40:]
    assert line.endswith("running them one by one")
    folders = job_folders(run)
    assert folders == ["jobs/flylora_r2/seed_0/cases_all/fold_0", "jobs/lora_r2/seed_0/cases_all/fold_0"]
    for folder in folders:
        info = json.loads((run / folder / "summary.json").read_text(encoding="utf-8"))["medlora"]
        assert "pack_size" not in info and (run / folder / "adapter.safetensors").is_file()


def test_workers_with_packs_give_the_results_of_one_worker_without_packs(tiny, unpacked, tmp_path, capsys):
    """``--workers 2 --pack 2`` (packs trained in pool processes) against ``--workers 1 --pack 1``: results.csv row by
    row; a first run of fold 0 alone and a job folder a killed pack left behind are resumed."""
    run = tmp_path / "run"
    args = ["crossval", "--config", str(tiny), "--out", str(run), "--workers", "2", "--pack", "2"]
    assert main([*args, "--only", "fold=0"]) == 0
    first = job_folders(run)
    assert first == [f for f in job_folders(unpacked) if f.endswith("fold_0")]
    # what a pack killed while training leaves: the job's folder, a partial adapter file, no summary.json
    victim = "jobs/lora_r2/seed_0/cases_all/fold_0"
    (run / victim / "summary.json").unlink()
    (run / victim / "adapter.safetensors").write_bytes(b"partial")
    kept = {f: (run / f / "summary.json").stat().st_mtime_ns for f in first if f != victim}
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count(": Dice ") == 6 and "report:" in out  # fold 1's five jobs and the victim, nothing else
    assert {f: (run / f / "summary.json").stat().st_mtime_ns for f in kept} == kept
    assert job_folders(run) == job_folders(unpacked)
    sizes = [json.loads((run / f / "summary.json").read_text())["medlora"].get("pack_size") for f in job_folders(run)]
    assert sizes.count(2) >= 6  # most trainable jobs were trained two at a time in the workers

    def rows(folder: Path) -> list[dict[str, str]]:
        with (folder / "results.csv").open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))

    ours, theirs = rows(run), rows(unpacked)
    assert len(ours) == len(theirs) == 10 * 2  # ten jobs, two held-out cases per fold
    assert list(ours[0]) == list(theirs[0])
    for a, b in zip(ours, theirs, strict=True):
        for key in b:
            if key in ("Dice", "soft_Dice", "IoU", "HD95_mm"):
                x, y = float(a[key] or "nan"), float(b[key] or "nan")
                assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= PER_CASE_ABS, (b["job"], key, x, y)
            elif key.startswith("volume_") and key != "volume_bin":
                assert abs(float(a[key]) - float(b[key])) <= VOLUME_REL * max(abs(float(b[key])), 1e-3), (key,)
            elif key != "train_seconds":
                assert a[key] == b[key], (b["job"], b["case_id"], key, a[key], b[key])
