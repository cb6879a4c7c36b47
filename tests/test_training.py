"""The Lightning side: every config runs (fast_dev_run), resume, adapter checkpoints, DDP on 2 CPU processes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from medlora.adapters import read_adapter_file
from medlora.cli import main
from medlora.data.datamodule import CTSegDataModule, PosNegSliceBatchSampler
from medlora.data.phantoms import write_dataset
from medlora.models import create_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHAPE, SPACING = (48, 48, 16), (4.0, 4.0, 10.0)
METHOD_FILES = sorted((CONFIGS / "adapters").glob("*.yaml"))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("phantoms")
    return {d: write_dataset(root / d, d, 5, seed=0, shape=SHAPE, spacing=SPACING) for d in ("tbi", "sah")}


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory) -> dict[int, Path]:
    """Random 'pretrained' weights for the configs' backbones (3D width 16, 2D width 32)."""
    root = tmp_path_factory.mktemp("base")
    out = {}
    for dims, width in ((3, 16), (2, 32)):
        torch.manual_seed(dims)
        path = root / f"base{dims}d.pt"
        torch.save(create_model("mv_unet", spatial_dims=dims, level=2, width=width).state_dict(), path)
        out[dims] = path
    return out


def fit_args(config_files: list[Path], tmp: Path, data_dir: Path, dims: int, *extra: str) -> list[str]:
    args = ["fit"]
    for c in config_files:
        args += ["--config", str(c)]
    patch = "[32, 32, 16]" if dims == 3 else "[48, 48]"
    args += [
        "--data.data_dir", str(data_dir), "--data.patch_size", patch, "--data.num_folds", "2",
        "--trainer.default_root_dir", str(tmp), "--trainer.logger.init_args.save_dir", str(tmp),
        "--checkpoint.dirpath", str(tmp / "checkpoints"), "--trainer.enable_progress_bar", "false",
        *extra,
    ]
    return args


def test_pretrain_config_fast_dev_run(phantoms, tmp_path):
    main(fit_args([CONFIGS / "pretrain_tbi_3d.yaml"], tmp_path, phantoms["tbi"], 3, "--trainer.fast_dev_run", "true"))


@pytest.mark.parametrize("method_file", [None, *METHOD_FILES], ids=lambda p: "full" if p is None else p.stem)
def test_finetune_configs_fast_dev_run(method_file, phantoms, base_weights, tmp_path):
    files = [CONFIGS / "finetune_sah_3d.yaml"] + ([method_file] if method_file else [])
    main(fit_args(files, tmp_path, phantoms["sah"], 3, "--model.pretrained", str(base_weights[3]),
                  "--trainer.fast_dev_run", "true"))


@pytest.mark.parametrize("method_file", [None, CONFIGS / "adapters" / "cp_lora.yaml"], ids=["full", "cp_lora"])
def test_seed_2d_configs_fast_dev_run(method_file, phantoms, base_weights, tmp_path):
    main(fit_args([CONFIGS / "seed_2d_pretrain_tbi.yaml"], tmp_path / "pre", phantoms["tbi"], 2,
                  "--trainer.fast_dev_run", "true"))
    files = [CONFIGS / "seed_2d_finetune_sah.yaml"] + ([method_file] if method_file else [])
    main(fit_args(files, tmp_path / "ft", phantoms["sah"], 2, "--model.pretrained", str(base_weights[2]),
                  "--trainer.fast_dev_run", "true"))


def _metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    files = sorted(run_dir.rglob("metrics.csv"))
    assert files, f"no metrics.csv under {run_dir}"
    with open(files[-1]) as f:
        return list(csv.DictReader(f))


def test_adapter_run_resumes_and_writes_a_small_checkpoint_and_the_adapter(phantoms, base_weights, tmp_path):
    files = [CONFIGS / "finetune_sah_3d.yaml", CONFIGS / "adapters" / "cp_dora.yaml"]
    common = ("--model.pretrained", str(base_weights[3]), "--trainer.check_val_every_n_epoch", "1",
              "--trainer.limit_train_batches", "2")
    main(fit_args(files, tmp_path, phantoms["sah"], 3, *common, "--trainer.max_epochs", "1"))
    ckpt_dir = tmp_path / "checkpoints"
    first = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert first["epoch"] == 0
    # only what training changed: adapters and BatchNorm statistics, never a frozen conv weight
    keys = list(first["state_dict"])
    assert keys and all(".parametrizations.weight.0." in k or ".running_" in k or "num_batches" in k for k in keys)
    assert first["medlora"]["pretrained"] == str(base_weights[3])

    main(fit_args(files, tmp_path, phantoms["sah"], 3, *common, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    second = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert second["epoch"] > first["epoch"] and second["global_step"] == 2 * first["global_step"]
    meta, tensors = read_adapter_file(ckpt_dir / "adapter.safetensors")
    assert meta["configs"][0]["method"] == "cp_dora" and meta["extra"]["pretrained"] == str(base_weights[3])
    assert any(k.endswith("running_mean") for k in meta["extra_tensors"])
    adapter_key = next(k for k in second["state_dict"] if k.endswith("magnitude"))
    file_key = adapter_key[len("model."):].replace(".parametrizations.weight.0", "")
    assert torch.equal(tensors[file_key], second["state_dict"][adapter_key])
    rows = _metrics_rows(tmp_path)
    assert any(r.get("val/Dice") for r in rows) and any(r.get("val/HD95_mm") is not None for r in rows)


def test_print_config(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(CONFIGS / "finetune_sah_3d.yaml"), "--config",
              str(CONFIGS / "adapters" / "salt.yaml"), "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "method: salt" in out and "svd_rank: 4" in out and "patch_size" in out


@pytest.fixture(scope="module")
def four_cases(tmp_path_factory) -> Path:
    """A target dataset of its own: no splits_final.json written into it by other tests."""
    return write_dataset(tmp_path_factory.mktemp("four") / "sah", "sah", 4, seed=2, shape=SHAPE, spacing=SPACING)


# (the bad config file's text, the key path the error names, words of the problem)
BAD_FIT_CONFIGS = [
    ("model:\n  adaptr:\n    method: lora\n", "model.adaptr.method", "unknown key"),
    ("model:\n  lr: fast\n", "model.lr", "Expected a float. Got value: fast"),
    ("model:\n  lr: -0.001\n", "model.lr", "must be greater than 0, got -0.001"),
    ("model:\n  backbone: mv_unett\n", "model.backbone", "unknown backbone 'mv_unett'; available: dynunet, mv_unet"),
    ("model:\n  backbone_args: {level: 2, widht: 16}\n", "model.backbone_args", "unexpected keyword argument 'widht'"),
    ("model:\n  finetune: decodr\n", "model.finetune", "no module group 'decodr'"),
    ("model:\n  loss: dice\n", "model.loss", "must be one of dice_ce, soft_dice, got 'dice'"),
    ("model:\n  adapter: {method: lroa}\n", "model.adapter", "unknown adapter method 'lroa'; available: bd_lora"),
    ("model:\n  adapter: {method: lora, rank: x}\n", "model.adapter.rank", "Expected a int. Got value: x"),
    ("model:\n  adapter: {method: lora, targets: [nothing_here]}\n", "model.adapter", "nothing_here"),
    ("model:\n  training_rule: lora_pro\n  training_rule_options: {nonsense: 1}\n"
     "  adapter: {method: lora, target_types: [Conv3d]}\n", "model.training_rule_options",
     "unknown option(s) nonsense for training rule 'lora_pro'"),
    ("data:\n  fold: 4\n", "data.fold", "fold 4 does not exist: data.num_folds 2 gives folds 0..1"),
    ("data:\n  num_folds: 5\n", "data.num_folds", "5 folds need at least 5 cases"),
    ("data:\n  patch_size: [32, 32]\n", "data.patch_size", "must be 3 positive numbers (one per axis), got [32, 32]"),
    ("data:\n  patch_size: [32, 0, 16]\n", "data.patch_size", "must be 3 positive numbers"),
    ("data:\n  batch_size: 0\n", "data.batch_size", "must be at least 1, got 0"),
    ("data:\n  samples_per_volume: 0\n", "data.samples_per_volume", "must be at least 1, got 0"),
    ("data:\n  pos_fraction: 1.5\n", "data.pos_fraction", "must be in [0, 1], got 1.5"),
    ("data:\n  hu_window: [140, 0]\n", "data.hu_window", "low < high"),
    ("trainer:\n  max_epochs: -1\n", "trainer.max_epochs", "must be at least 0, got -1"),
]


@pytest.mark.parametrize("text,key,problem", BAD_FIT_CONFIGS, ids=[k + ":" + p[:12] for _, k, p in BAD_FIT_CONFIGS])
def test_a_bad_fit_config_is_one_line_naming_the_file_and_key(text, key, problem, capsys, four_cases, base_weights,
                                                               tmp_path):
    run = tmp_path / "run"
    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump({
        "trainer": {"default_root_dir": str(run), "logger": {"init_args": {"save_dir": str(run)}}},
        "checkpoint": {"dirpath": str(run / "checkpoints")},
        "model": {"pretrained": str(base_weights[3])},
        "data": {"data_dir": str(four_cases), "patch_size": [32, 32, 16], "num_folds": 2},
    }), encoding="utf-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text, encoding="utf-8")
    code = main(["fit", "--config", str(CONFIGS / "finetune_sah_3d.yaml"), "--config", str(local),
                 "--config", str(bad)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1, captured.err
    assert err[0].startswith(f"medlora: error: {bad}: {key}: ") and problem in err[0], err[0]
    assert not run.exists() and not (four_cases / "splits_final.json").exists()  # nothing built, nothing written
    # an option given on the command line is reported as such
    code = main(["fit", "--config", str(CONFIGS / "finetune_sah_3d.yaml"), "--config", str(local),
                 "--data.batch_size", "0"])
    assert code == 2 and capsys.readouterr().err.strip() == (
        "medlora: error: command line: data.batch_size: must be at least 1, got 0")


def test_a_missing_or_unparsable_config_file_is_one_line(capsys, tmp_path):
    missing = tmp_path / "missing.yaml"
    assert main(["fit", "--config", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"medlora: error: {missing}: config file not found"
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [\n", encoding="utf-8")
    assert main(["fit", "--config", str(CONFIGS / "finetune_sah_3d.yaml"), f"--config={broken}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medlora: error: {broken}: invalid YAML (")


def test_missing_dataset_and_bad_weights_are_one_line_errors(capsys, phantoms, tmp_path):
    code = main(fit_args([CONFIGS / "pretrain_tbi_3d.yaml"], tmp_path, tmp_path / "nowhere", 3))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("medlora: error: ") and "nowhere" in err[0]
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    code = main(fit_args([CONFIGS / "finetune_sah_3d.yaml"], tmp_path, phantoms["sah"], 3,
                         "--model.pretrained", str(junk)))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"medlora: error: {junk}: cannot read weights")


def test_unknown_module_group_or_backbone_is_a_one_line_error(capsys, phantoms, base_weights, tmp_path):
    common = ("--model.pretrained", str(base_weights[3]))
    code = main(fit_args([CONFIGS / "finetune_sah_3d.yaml"], tmp_path, phantoms["sah"], 3, *common,
                         "--model.finetune", "decodr"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("medlora: error: command line: model.finetune: MultiViewUNet has no "
                                            "module group 'decodr'; it has: shallow, deep, encoder, decoder, all, none")
    code = main(fit_args([CONFIGS / "finetune_sah_3d.yaml"], tmp_path, phantoms["sah"], 3, *common,
                         "--model.backbone", "mv_unt"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("medlora: error: command line: model.backbone: unknown backbone 'mv_unt'; "
                                            "available: ")


def test_slice_sampler_pairs_a_positive_with_a_negative_slice(phantoms):
    dm = CTSegDataModule(str(phantoms["sah"]), fold=0, num_folds=2, spatial_dims=2, patch_size=(48, 48))
    dm.setup("fit")
    ds = dm._train
    batches = list(PosNegSliceBatchSampler(ds.positive, ds.negative, batch_size=2, seed=0))
    assert len(batches) == len(ds.positive)
    for pos, neg in batches:
        assert ds[pos]["label"].sum() > 0 and ds[neg]["label"].sum() == 0
    assert sorted(b[0] for b in batches) == sorted(ds.positive)  # every positive slice once per epoch
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 48, 48)
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0


def test_3d_patches_are_balanced_and_the_fold_is_nnunet_s(phantoms):
    dm = CTSegDataModule(str(phantoms["sah"]), fold=1, num_folds=2, patch_size=(32, 32, 16), batch_size=1,
                         samples_per_volume=8, pos_fraction=1.0)
    dm.setup("fit")
    assert sorted(dm.train_ids + dm.val_ids) == [f"SAH_{i:03d}" for i in range(5)]
    assert not set(dm.train_ids) & set(dm.val_ids)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 1, 32, 32, 16)
    assert all(batch["label"][i].sum() > 0 for i in range(8))  # pos_fraction 1: every patch holds hemorrhage


@pytest.mark.skipif(sys.platform != "linux", reason="DDP on CPU via gloo is exercised on Linux CI")
def test_ddp_on_two_cpu_processes(phantoms, base_weights, tmp_path):
    args = fit_args([CONFIGS / "finetune_sah_3d.yaml", CONFIGS / "adapters" / "lora.yaml"], tmp_path,
                    phantoms["sah"], 3, "--model.pretrained", str(base_weights[3]),
                    "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
                    "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
                    "--data.fold", "all")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "medlora.cli", *args], env=env, capture_output=True, encoding="utf-8",
                          errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics_rows(tmp_path)
    cases = [float(r["val/cases"]) for r in rows if r.get("val/cases")]
    # 5 validation cases over 2 ranks: the sampler pads to 6; gathering and de-duplication restores 5
    assert cases == [5.0]
    assert (tmp_path / "checkpoints" / "adapter.safetensors").is_file()


def test_gradient_initialised_adapter_with_a_training_rule(phantoms, base_weights, tmp_path):
    """LoRA-GA gets its start from training batches at on_train_start; FFA keeps A there while B trains."""
    adapter = ('{"method": "lora_ga", "rank": 2, "target_types": ["Conv2d"], "exclude": ["M3.TripleOut.6"]}')
    main(fit_args([CONFIGS / "seed_2d_finetune_sah.yaml"], tmp_path, phantoms["sah"], 2,
                  "--model.pretrained", str(base_weights[2]), "--model.adapter", adapter, "--model.finetune", "none",
                  "--model.training_rule", "ffa", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                  "--trainer.limit_val_batches", "1", "--trainer.check_val_every_n_epoch", "1"))
    meta, tensors = read_adapter_file(tmp_path / "checkpoints" / "adapter.safetensors")
    layers = sorted(meta["layers"])
    assert layers and meta["configs"][0]["method"] == "lora_ga"
    for layer in layers:
        a, b = tensors[f"{layer}.lora_A"], tensors[f"{layer}.lora_B"]
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert torch.equal(a, tensors[f"{layer}.offset_A"])  # FFA: A never moved from the gradient-SVD start
    assert any(not torch.equal(tensors[f"{n}.lora_B"], tensors[f"{n}.offset_B"]) for n in layers)  # B trained


def test_training_rule_options_are_checked(phantoms, base_weights, tmp_path, capsys):
    files = [CONFIGS / "seed_2d_finetune_sah.yaml", CONFIGS / "adapters" / "lora.yaml"]
    code = main(fit_args(files, tmp_path, phantoms["sah"], 2, "--model.pretrained", str(base_weights[2]),
                         "--model.training_rule", "lora_pro", "--model.training_rule_options", '{"nonsense": 1}',
                         "--trainer.fast_dev_run", "true"))
    assert code == 2 and capsys.readouterr().err.strip() == (
        "medlora: error: command line: model.training_rule_options: unknown option(s) nonsense for training rule "
        "'lora_pro'; valid: betas, delta, eps, use_sylvester, weight_decay")


def test_ctrl_c_during_fit_is_one_line_and_exit_130(phantoms, base_weights, tmp_path):
    args = fit_args([CONFIGS / "finetune_sah_3d.yaml", CONFIGS / "adapters" / "lora.yaml"], tmp_path,
                    phantoms["sah"], 3, "--model.pretrained", str(base_weights[3]), "--trainer.max_epochs", "500")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "medlora.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
    deadline = time.monotonic() + 240
    while not (tmp_path / "logs").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the CSV logger's folder appears when Lightning starts fitting
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == ("medlora: interrupted; resume from the last saved checkpoint with the "
                                            "same command and --ckpt_path last")
    assert "Traceback" not in err and "Detected KeyboardInterrupt" not in err + out


def test_a_ctrl_c_inside_a_step_takes_effect_after_the_step():
    """The signal lands mid-step (where a library may hold a lock); the step finishes and fitting stops after it."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from medlora.training.callbacks import InterruptBetweenSteps

    finished = []

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, index):
            if index == 1:
                os.kill(os.getpid(), signal.SIGINT)
            finished.append(index)  # without the callback the interrupt is raised before this line
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    before = signal.getsignal(signal.SIGINT)
    trainer = pl.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[InterruptBetweenSteps()])
    with pytest.raises(SystemExit):  # Lightning's own handling of an interrupt
        trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(20, 2)), batch_size=2))
    signal.signal(signal.SIGINT, before)
    assert trainer.interrupted and finished == [0, 1] and trainer.global_step == 2
