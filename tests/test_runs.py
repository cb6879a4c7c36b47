"""The run-folder reader (medlora.runs) against what ``medlora crossval`` plans and writes."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from medlora.runs import RunFolder, RunFolderError
from medlora.training.crossval import plan_jobs
from medlora.training.study_config import DatasetSpec, DataSpec, MethodEntry, StudyConfig


def study(tmp_path, **changes) -> StudyConfig:
    methods = [MethodEntry("no_finetune"), MethodEntry("full"), MethodEntry("module", group="decoder"),
               MethodEntry("lora", ranks=[2, 4]), MethodEntry("svd"), MethodEntry("cp_dora", ranks=[1]),
               MethodEntry("lora", ranks=[8], training_rule="lora_pro")]
    config = StudyConfig(target=DatasetSpec(data_dir=str(tmp_path / "data")), folds=3,
                         base_checkpoint=str(tmp_path / "given.safetensors"),
                         data=DataSpec(patch_size=[8, 8, 4], inference_roi=[16, 16, 8]), methods=methods)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def write_record(root, config: StudyConfig) -> RunFolder:
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps(asdict(config)), encoding="utf-8")  # as Study.claim_run_dir
    return RunFolder(root)


def test_jobs_and_paths_are_those_crossval_plans(tmp_path):
    config = study(tmp_path)
    run = write_record(tmp_path / "run", config)
    planned = plan_jobs(config)
    assert [(j.name, j.method, j.family, j.rank, j.fold) for j in run.jobs] == [
        (j.name, j.method, j.family, j.rank, j.fold) for j in planned]
    assert run.job_names[:4] == ["no_finetune", "full", "module_decoder", "lora_r2"]
    assert "svd" in run.job_names and "lora_lora_pro_r8" in run.job_names
    (job,) = [j for j in run.jobs_named("cp_dora_r1") if j.fold == 2]
    assert run.job_dir(job) == tmp_path / "run" / "jobs" / "cp_dora_r1" / "fold_2"
    assert run.weights_path(job) == run.job_dir(job) / "adapter.safetensors"
    (full,) = [j for j in run.jobs_named("full") if j.fold == 0]
    assert run.weights_path(full) == tmp_path / "run" / "jobs" / "full" / "fold_0" / "model.safetensors"
    assert run.weights_path(run.jobs_named("no_finetune")[0]) is None
    assert run.base_path == tmp_path / "given.safetensors" and run.pretrain_done()
    assert run.preprocessing == {"hu_window": [0.0, 140.0], "target_spacing": None, "roi_size": [16, 16, 8]}
    assert run.architecture == {"backbone": "mv_unet", "backbone_args": {}, "spatial_dims": 3}
    assert not run.job_done(job)
    run.job_dir(job).mkdir(parents=True)
    (run.job_dir(job) / "summary.json").write_text("{}", encoding="utf-8")
    assert run.job_done(job)


def test_pretrained_base_lives_in_the_run_folder(tmp_path):
    run = write_record(tmp_path / "run", study(tmp_path, base_checkpoint=None,
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
