"""The run-folder reader (medlora.runs) against what ``medlora crossval`` plans and writes."""

from __future__ import annotations

import json

import pytest

from medlora.runs import RunFolder, RunFolderError
from medlora.training.crossval import plan_jobs
from medlora.training.study_config import DatasetSpec, MethodEntry, StudyConfig


def study(tmp_path, **changes) -> StudyConfig:
    methods = [MethodEntry("no_finetune"), MethodEntry("full"), MethodEntry("module", model={"finetune": "decoder"}),
               MethodEntry("lora", ranks=[2, 4]), MethodEntry("svd"), MethodEntry("cp_dora", ranks=[1]),
               MethodEntry("lora", ranks=[8], model={"training_rule": "lora_pro"}),
               MethodEntry("lora", ranks=[8], model={"forgetting_weight": 0.5})]
    config = StudyConfig(target=DatasetSpec(data_dir=str(tmp_path / "data")), folds=3,
                         model={"pretrained": str(tmp_path / "given.safetensors"), "roi_size": [16, 16, 8]},
                         data={"patch_size": [8, 8, 4]}, methods=methods)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def write_record(root, config: StudyConfig) -> RunFolder:
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps(config.to_record()), encoding="utf-8")  # as Study.claim_run_dir
    return RunFolder(root)


def test_jobs_and_paths_are_those_crossval_plans(tmp_path):
    config = study(tmp_path)
    run = write_record(tmp_path / "run", config)
    planned = plan_jobs(config)
    assert run.jobs == planned
    assert run.job_names[:4] == ["no_finetune", "full", "module_decoder", "lora_r2"]
    assert "svd" in run.job_names and "lora_lora_pro_r8" in run.job_names and "lora_fw0.5_r8" in run.job_names
    labels = {j.name: j.label for j in run.jobs}
    assert labels["cp_dora_r1"] == "CP-DoRA r1" and labels["lora_lora_pro_r8"] == "LoRA + lora_pro r8"
    assert labels["module_decoder"] == "module-wise (decoder)" and labels["lora_fw0.5_r8"] == "LoRA λ=0.5 r8"
    (job,) = [j for j in run.jobs_named("cp_dora_r1") if j.fold == 2]
    assert run.job_dir(job) == tmp_path / "run" / "jobs" / "cp_dora_r1" / "seed_0" / "cases_all" / "fold_2"
    assert run.weights_path(job) == run.job_dir(job) / "adapter.safetensors"
    (full,) = [j for j in run.jobs_named("full") if j.fold == 0]
    assert run.weights_path(full) == run.job_dir(full) / "model.safetensors"
    assert run.weights_path(run.jobs_named("no_finetune")[0]) is None
    assert run.base_path == tmp_path / "given.safetensors" and run.pretrain_done()
    # study.json holds the sections completed with the defaults of fit's signatures
    assert run.preprocessing == {"hu_window": [0.0, 140.0], "target_spacing": None, "roi_size": [16, 16, 8]}
    assert run.architecture == {"backbone": "mv_unet", "backbone_args": {}, "spatial_dims": 3}
    assert not run.job_done(job)
    run.job_dir(job).mkdir(parents=True)
    (run.job_dir(job) / "summary.json").write_text("{}", encoding="utf-8")
    assert run.job_done(job)


def test_seeds_and_training_set_sizes_are_job_folders_of_their_own(tmp_path):
    config = study(tmp_path, seeds=[3, 5], train_cases=[2, "all"], methods=[MethodEntry("lora", ranks=[4])],
                   folds=2, model={"roi_size": [16, 16, 8]}, pretrain_seeds=[0, 1],
                   source=DatasetSpec(data_dir=str(tmp_path / "src")))
    run = write_record(tmp_path / "run", config)
    # one loop per grid dimension, outermost first, as documented in medlora.runs
    expected = [(seed, cases, k) for seed in (3, 5) for cases in (2, "all") for k in (0, 1)]
    assert [(j.seed, j.train_cases, j.fold) for j in run.jobs] == expected
    assert [j.pretrain_seed for j in run.jobs] == [0] * 4 + [1] * 4
    assert {run.job_dir(j).relative_to(tmp_path / "run").as_posix() for j in run.jobs} == {
        f"jobs/lora_r4/seed_{s}/cases_{n}/fold_{k}" for s, n, k in expected}
    # inference ensembles the whole-fold models of the first seed, on the base they started from
    assert [(j.seed, j.train_cases, j.fold) for j in run.jobs_named("lora_r4")] == [(3, "all", 0), (3, "all", 1)]
    assert [(j.seed, j.fold) for j in run.jobs_named("lora_r4", seed=5)] == [(5, 0), (5, 1)]
    assert run.base_path == tmp_path / "run" / "pretrain" / "seed_0" / "base.safetensors"
    assert run.base_path_of(run.jobs_named("lora_r4", seed=5)[0]) == tmp_path / "run" / "pretrain" / "seed_1" / \
        "base.safetensors"
    assert [j for j in run.jobs if j.matches({"seed": "5", "train_cases": "2"})] == run.jobs[4:6]


def test_an_old_run_folder_is_one_line(tmp_path):
    (tmp_path / "study.json").write_text(json.dumps({"seed": 0, "folds": 2, "methods": []}), encoding="utf-8")
    with pytest.raises(RunFolderError, match=r"older medlora \(jobs/<job>/fold_<k> layout\)") as exc:
        RunFolder(tmp_path)
    assert "\n" not in str(exc.value)


def test_pretrained_base_lives_in_the_run_folder(tmp_path):
    run = write_record(tmp_path / "run", study(tmp_path, model={},
                                                 source=DatasetSpec(data_dir=str(tmp_path / "src"))))
    assert run.base_path == tmp_path / "run" / "pretrain" / "base.safetensors" and not run.pretrain_done()
    (tmp_path / "run" / "pretrain").mkdir()
    (tmp_path / "run" / "pretrain" / "summary.json").write_text("{}", encoding="utf-8")
    assert run.pretrain_done()


@pytest.mark.parametrize("content, problem", [
    (None, "not a medlora crossval run folder (no study.json)"),
    ("{not json", "unreadable"),
    ("[1, 2]", "expected a JSON object"),
    ('{"folds": 2}', "needs 'folds' (an integer) and 'methods' (a list)"),
    ('{"folds": 2, "methods": [{"name": "no_such_method", "ranks": [4]}]}', "methods[0]"),
])
def test_bad_run_folders_are_one_line_errors(tmp_path, content, problem):
    if content is not None:
        (tmp_path / "study.json").write_text(content, encoding="utf-8")
    with pytest.raises(RunFolderError) as exc:
        RunFolder(tmp_path)
    assert problem in str(exc.value) and "\n" not in str(exc.value) and str(tmp_path) in str(exc.value)
