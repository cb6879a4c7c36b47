"""Federation on Flower: the strategy on hand-built replies, a tiny end-to-end run (2 sites, 2 rounds), resume
after a kill, the final adapter through `medlora infer`, FedSmoothLoRA's start on a real network, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("flwr")  # the optional extra `federated` (make setup installs it)
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from medlora.adapters import read_adapter_file
from medlora.assembly import ModelSpec, build_model
from medlora.cli import main
from medlora.data.phantoms import write_dataset
from medlora.federated.client import SiteTrainer, adapter_pairs
from medlora.federated.config import FederatedConfigError, load_federated_config
from medlora.federated.federation import Federation, run_federate
from medlora.federated.server import FederatedStrategy, LocalGrid, to_record
from medlora.federated.strategies import Pair, SiteUpdate, aggregate, fingerprint
from medlora.fileio import atomic_save_safetensors

ROOT = Path(__file__).resolve().parents[1]
GRID = {"shape": [48, 48, 16], "spacing": [4.0, 4.0, 10.0]}


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Two small phantom hospitals (written once) and a base model file."""
    root = tmp_path_factory.mktemp("fed")
    a = write_dataset(root / "A", "sah", 3, seed=11, **GRID)
    b = write_dataset(root / "B", "sah", 3, seed=12, shape=[48, 48, 20], spacing=[4.0, 4.0, 8.0], hu_offset=10.0,
                      head_scale=0.9, volume_bins=[2, 3])
    torch.manual_seed(0)
    base = root / "base.safetensors"
    atomic_save_safetensors(build_model(ModelSpec("mv_unet", {"level": 1, "width": 4})).state_dict(), base)
    return {"A": a, "B": b, "base": base, "root": root}


def write_config(path: Path, sites, strategies=("ffa",), model=None, **changes) -> Path:
    """A two-site federation in the run/study schema; ``model`` updates the model section."""
    config = {
        "name": "tiny", "seed": 0, "rounds": 2, "local_epochs": 1,
        "model": {"backbone": "mv_unet", "backbone_args": {"level": 1, "width": 4}, "pretrained": str(sites["base"]),
                  "adapter": {"method": "lora", "rank": 2, "target_types": ["Conv3d"], "exclude": ["M3.TripleOut.6"]},
                  "lr": 0.05, "norm_stats": "freeze", "roi_size": [48, 48, 16], **(model or {})},
        "data": {"spatial_dims": 3, "patch_size": [32, 32, 16], "batch_size": 1, "samples_per_volume": 1},
        "sites": [{"name": "A", "data_dir": str(sites["A"]), "heldout": 1},
                  {"name": "B", "data_dir": str(sites["B"]), "heldout": 1}],
        "strategies": [{"name": s} for s in strategies],
        "baselines": [],
        **changes,
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def same_adapter(x: Path, y: Path) -> bool:
    """Equal metadata and bitwise equal tensors (safetensors orders its header's metadata map per process)."""
    (meta_x, tx), (meta_y, ty) = read_adapter_file(x), read_adapter_file(y)
    return meta_x == meta_y and tx.keys() == ty.keys() and all(torch.equal(tx[k], ty[k]) for k in tx)


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs" / "federated").glob("*.yaml")):
        config = load_federated_config(path)
        assert len(config.sites) >= 2 and config.strategies


def test_end_to_end_resume_and_infer(sites, tmp_path, capsys):
    config = write_config(tmp_path / "fed.yaml", sites)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["federate", "--config", str(config), "--out", str(whole)]) == 0
    history = json.loads((whole / "ffa" / "history.json").read_text(encoding="utf-8"))
    assert sorted(history["evaluations"]) == ["0", "1", "2"] and history["exact"] is True
    assert set(history["evaluations"]["2"]) == {"A", "B"}
    assert all(m["train_loss"] > 0 for m in history["train_metrics"]["2"].values())
    adapter = whole / "ffa" / "global_adapter.safetensors"
    meta, tensors = read_adapter_file(adapter)
    assert meta["extra"]["federated"]["strategy"] == "ffa" and any(t.abs().sum() > 0 for k, t in tensors.items()
                                                                      if k.endswith("lora_B"))

    # killed after round 1: the rerun resumes from the checkpoint and ends with the same global adapter
    assert run_federate(str(config), str(killed), stop_after=1) == 0
    assert not (killed / "ffa" / "history.json").exists()
    assert [p.name for p in (killed / "ffa" / "checkpoints").iterdir()] == ["round_001.safetensors"]
    assert main(["federate", "--config", str(config), "--out", str(killed)]) == 0
    assert "resuming after round 1" in capsys.readouterr().out
    assert same_adapter(killed / "ffa" / "global_adapter.safetensors", adapter)
    assert json.loads((killed / "ffa" / "history.json").read_text(encoding="utf-8")) == history

    # the global adapter is a normal adapter file: `medlora infer` runs it on the base, as the federation
    # evaluated the global model on the site's held-out case
    assert meta["extra"]["federated"]["config_sha256"] and meta["extra"]["pretrained"] == str(sites["base"])
    infer_matches_evaluation(history, "A", sites["A"], ["--model", str(sites["base"]), "--adapter", str(adapter)],
                             tmp_path / "pred")

    # a different config in the same folder is refused, nothing overwritten
    mtime = adapter.stat().st_mtime_ns
    other = write_config(tmp_path / "other.yaml", sites, rounds=3)
    assert main(["federate", "--config", str(other), "--out", str(whole)]) == 2
    assert "holds a different federation" in capsys.readouterr().err
    assert same_adapter(adapter, killed / "ffa" / "global_adapter.safetensors")
    assert adapter.stat().st_mtime_ns == mtime


def infer_matches_evaluation(history, site: str, data_dir: Path, model_args: list[str], out: Path) -> None:
    """`medlora infer` on the site's held-out case predicts the voxels the federation's last evaluation counted:
    TP/FP/FN of the written mask against the label file equal the history's row."""
    import nibabel as nib

    (row,) = history["evaluations"][str(history["rounds"])][site]["rows"]
    image = data_dir / "imagesTr" / f"{row['case_id']}_0000.nii.gz"
    assert main(["infer", str(image), *model_args, "--out", str(out)]) == 0
    pred = np.asarray(nib.load(out / f"{row['case_id']}.nii.gz").dataobj) > 0
    ref = np.asarray(nib.load(data_dir / "labelsTr" / f"{row['case_id']}.nii.gz").dataobj) > 0
    counts = {"TP": int((pred & ref).sum()), "FP": int((pred & ~ref).sum()), "FN": int((~pred & ref).sum())}
    assert row["n_pred"] > 0  # the comparison means something: the model predicts hemorrhage there
    assert counts == {k: row[k] for k in counts}
    assert json.loads((out / "provenance.json").read_text(encoding="utf-8"))


def test_full_fedavg_model_runs_in_medlora_infer(sites, tmp_path):
    config = write_config(tmp_path / "fed.yaml", sites, strategies=("full_fedavg",), rounds=1)
    assert run_federate(str(config), str(tmp_path / "run")) == 0
    history = json.loads((tmp_path / "run" / "full_fedavg" / "history.json").read_text(encoding="utf-8"))
    model = tmp_path / "run" / "full_fedavg" / "model.ckpt"
    checkpoint = torch.load(model, weights_only=True)
    assert checkpoint["medlora_federated"]["strategy"] == "full_fedavg"
    assert checkpoint["hyper_parameters"]["lr"] == 0.05 and checkpoint["hyper_parameters"]["adapter"] is None
    infer_matches_evaluation(history, "B", sites["B"], ["--model", str(model)], tmp_path / "pred")


def _train_message(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), node, MessageType.TRAIN)


def _reply(node: int, site: str, tensors, cases: int, base: str, a_fp: str) -> Message:
    content = RecordDict({"arrays": to_record(tensors), "metrics": MetricRecord({"num-examples": cases,
                                                                                  "train_loss": 0.5}),
                          "site": ConfigRecord({"name": site, "base-fingerprint": base, "a-fingerprint": a_fp})})
    return Message(content, reply_to=_train_message(node))


@pytest.mark.parametrize("name", ["fedit", "ffa", "lora_fair", "fedsmooth"])
def test_strategy_aggregation_on_replies_equals_the_pure_function(name):
    LocalGrid(None, {})  # sets Flower's task identity, as its runtime does in a ServerApp process
    rng = np.random.default_rng(0)
    pair = Pair("enc.lora_A", "enc.lora_B", 0.5)
    a = rng.standard_normal((2, 6)).astype(np.float32)
    replies, updates = [], []
    for node, (site, cases) in enumerate([("B", 3), ("A", 5)], start=1):
        t = {pair.a: a if name == "ffa" else rng.standard_normal((2, 6)).astype(np.float32),
             pair.b: rng.standard_normal((4, 2)).astype(np.float32)}
        fp = fingerprint({pair.a: t[pair.a]})
        replies.append(_reply(node, site, t, cases, "base", fp))
        updates.append(SiteUpdate(site, t, cases, "base", fp))
    strategy = FederatedStrategy(name, [pair], base_fingerprint="base", global_tensors={pair.a: a})
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = aggregate(name, sorted(updates, key=lambda u: u.site), [pair], base_fingerprint="base",
                         global_tensors={pair.a: a})
    got = {k: v.numpy() for k, v in arrays.items()}
    want = expected.tensors if name != "fedsmooth" else {f"{p}{k}": v for k, v in expected.merged.items()
                                                          for p in ("stack::", "global::")}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert metrics["train_loss"] == pytest.approx(0.5)
    # a reply from another base is refused with one line naming its site
    bad = _reply(3, "C", {pair.a: a, pair.b: np.zeros((4, 2), np.float32)}, 2, "other", "")
    with pytest.raises(Exception, match="site C: trained on a different base model"):
        strategy.aggregate_train(2, [*replies, bad])


def test_fedsmooth_start_keeps_the_network_effective_weight(sites, tmp_path):
    config = load_federated_config(write_config(tmp_path / "fed.yaml", sites, strategies=("fedsmooth",)))
    fed = Federation(config, tmp_path / "run")
    fed.claim()
    fed.prepare()
    site = SiteTrainer(config, "fedsmooth", "A", fed.data["A"], fed.splits["A"], base=fed.base)
    site.check_fedsmooth()
    before = {n: m.weight.detach().clone() for n, m in site.model.named_modules() if hasattr(m, "parametrizations")}
    site.fedsmooth_round(1, {}, {"zeta_mode": "decay", "zeta0": 1.0, "zeta_min": 0.0, "gamma": 16.0,
                                 "ga_batches": 1})
    moved = 0
    for n, m in site.model.named_modules():
        if n in before:
            torch.testing.assert_close(m.weight.detach(), before[n], rtol=0, atol=1e-6)
            moved += int(m.parametrizations["weight"].original.ne(before[n]).any())
    assert moved == len(adapter_pairs(site.model)) > 0  # the base did move by -s B_ga A_ga, the adapter back


def test_config_errors_name_the_file_and_key(sites, tmp_path):
    path = write_config(tmp_path / "bad.yaml", sites, rounds=2, round=3)
    with pytest.raises(FederatedConfigError, match=r"bad\.yaml: federation: unknown key 'round'"):
        load_federated_config(path)
    path = write_config(tmp_path / "cp.yaml", sites, strategies=("ffa",))
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["model"]["adapter"]["method"] = "cp_lora"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(FederatedConfigError, match="ffa needs an adapter of plain LoRA pairs; cp_lora has none"):
        load_federated_config(path)
    data["strategies"] = [{"name": "lora_fair", "options": {"lambda": 0.1}}]
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(FederatedConfigError, match="unknown option 'lambda' for lora_fair"):
        load_federated_config(path)


@pytest.mark.parametrize(("change", "message"), [
    # the sections of `medlora fit`, checked as fit and a study check them
    ({"model": {"lr": -1.0}}, r"federation\.model\.lr: must be greater than 0"),
    ({"model": {"dropout": 0.1}}, r"federation\.model: unknown key 'dropout' \(valid: backbone, "),
    ({"model": {"adapter": {"method": "lora", "rank": 2, "targets": ["nowhere"]}}}, r"federation\.model\.adapter: "),
    ({"data": {"patch_size": [32, 32]}}, r"federation\.data\.patch_size: must be 3 positive numbers"),
    ({"data": {"data_dir": "x"}}, r"federation\.data\.data_dir: set per site"),
    ({"trainer": {"max_epochs": 3}}, r"federation\.trainer\.max_epochs: the local budget is local_epochs"),
    ({"trainer": {"precision": "bf16-mixed"}}, r"federation\.trainer\.precision: the federated local loop runs"),
    # the federation's own keys
    ({"strategies": [{"name": "full_fedavg", "lr": 0.0}]}, r"federation\.strategies\[0\]\.lr: must be greater"),
    ({"strategies": [{"name": "ffa", "backbone": "x"}]}, r"federation\.strategies\[0\]\.backbone: the same for"),
    ({"local_steps": 3}, r"federation\.local_steps: give local_epochs or local_steps, not both"),
    ({"pretrain": {"trainer": {"max_epochs": 2}}}, r"federation\.pretrain: give source"),
    ({"source": {"phantoms": {"domain": "tbi", "cases": 3}}, "pretrain": {"model": {"lr": 0.01}}},
     r"federation\.source: the federation starts from model\.pretrained"),
])
def test_model_data_trainer_sections_are_those_of_fit(sites, tmp_path, change, message):
    data = yaml.safe_load(write_config(tmp_path / "c.yaml", sites).read_text(encoding="utf-8"))
    for key, value in change.items():
        data[key] = {**data[key], **value} if key in ("model", "data") else value
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(FederatedConfigError, match=r"c\.yaml: " + message) as err:
        load_federated_config(tmp_path / "c.yaml")
    assert "\n" not in str(err.value)


def test_old_federation_keys_fail_with_one_line_naming_the_new_ones(sites, tmp_path):
    data = yaml.safe_load(write_config(tmp_path / "old.yaml", sites).read_text(encoding="utf-8"))
    data["train"] = {"local_epochs": 1, "lr": 0.05, "full_lr": 0.001}
    data["data"]["inference_roi"] = [48, 48, 16]
    data["model"]["spatial_dims"] = 3
    data["pretrain"] = {"phantoms": {"domain": "tbi"}, "epochs": 2}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(FederatedConfigError) as err:
        load_federated_config(tmp_path / "old.yaml")
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{tmp_path / 'old.yaml'}: old federation format: ")
    for old, new in (("train.local_epochs", "local_epochs"), ("train.lr", "model.lr"), ("train.full_lr", "strategies"),
                     ("data.inference_roi", "model.roi_size"), ("model.spatial_dims", "data.spatial_dims"),
                     ("pretrain.phantoms", "source.phantoms"), ("pretrain.epochs", "pretrain.trainer.max_epochs")):
        assert f"federation.{old}: renamed to {new}" in text


def test_site_trainer_takes_fit_s_model_and_data_settings_and_a_step_budget(sites, tmp_path):
    config = load_federated_config(write_config(tmp_path / "fed.yaml", sites, model={"weight_decay": 0.01},
                                                data={"spatial_dims": 3, "patch_size": [32, 32, 16], "batch_size": 1,
                                                      "samples_per_volume": 1, "pos_fraction": 1.0}))
    fed = Federation(config, tmp_path / "run")
    fed.claim()
    fed.prepare()
    site = SiteTrainer(config, "fedit", "A", fed.data["A"], fed.splits["A"], base=fed.base)
    assert site.module.configure_optimizers().param_groups[0]["weight_decay"] == 0.01
    assert site.dm.hparams.pos_fraction == 1.0 and site.module.hparams.roi_size == [48, 48, 16]
    assert len(site.dm.train_ids) == 2  # one case per batch: an epoch is 2 steps
    assert site.train(1, epochs=1)["steps"] == 2
    assert site.train(1, steps=3)["steps"] == 3  # the loader restarts for the third step
    assert site.train(1, steps=1, lr=0.125)["lr"] == 0.125
    # trainer.gradient_clip_val clips as Lightning does: by value at 1e-30, Adam's step is ~lr * 1e-30 / eps
    # (without weight decay, which Adam adds after clipping)
    clipped = SiteTrainer(config, "fedit", "A", fed.data["A"], fed.splits["A"], base=fed.base,
                          model={**config.strategy_model("fedit"), "weight_decay": 0.0},
                          trainer={"gradient_clip_val": 1e-30, "gradient_clip_algorithm": "value"})
    for trainer, moves in ((site, True), (clipped, False)):
        before = {k: v.copy() for k, v in trainer.get_tensors().items()}
        trainer.train(2, steps=1)
        change = max(float(np.abs(v - before[k]).max()) for k, v in trainer.get_tensors().items())
        assert (change > 1e-4) if moves else (change < 1e-12)


def test_fedsmooth_resumes_with_its_carried_state_and_writes_a_loadable_adapter(sites, tmp_path):
    from medlora.assembly import load_adapter_onto
    from medlora.models.weights import load_weights

    config = write_config(tmp_path / "fed.yaml", sites, strategies=("fedsmooth",))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_federate(str(config), str(whole)) == 0
    assert run_federate(str(config), str(killed), stop_after=1) == 0
    from medlora.fileio import read_safetensors

    saved, _ = read_safetensors(killed / "fedsmooth" / "checkpoints" / "round_001.safetensors")
    assert any(k.startswith("carried/1/") for k in saved) and any(k.startswith("stack/") for k in saved)
    assert run_federate(str(config), str(killed)) == 0
    adapter = whole / "fedsmooth" / "global_adapter.safetensors"
    assert same_adapter(killed / "fedsmooth" / "global_adapter.safetensors", adapter)
    # the official cosine over 2 rounds from model.lr 0.05: 0.05, then 0.05 (1 + cos(pi / 2)) / 2 = 0.025
    history = json.loads((whole / "fedsmooth" / "history.json").read_text(encoding="utf-8"))
    lrs = {r: sorted({m["lr"] for m in per_site.values()}) for r, per_site in history["train_metrics"].items()}
    assert lrs == {"1": [pytest.approx(0.05)], "2": [pytest.approx(0.025)]}
    # the merged global model loads onto the base it was trained on, and differs from it
    base = build_model(ModelSpec("mv_unet", {"level": 1, "width": 4}))
    load_weights(base, sites["base"])
    merged = load_adapter_onto(base, adapter)
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all(n.endswith("weight") for n in changed)


def test_a_run_folder_written_before_a_new_default_key_is_the_same_federation(sites, tmp_path):
    config = load_federated_config(write_config(tmp_path / "fed.yaml", sites))
    first = Federation(config, tmp_path / "run")
    first.claim()
    stored = json.loads((tmp_path / "run" / "federation.json").read_text(encoding="utf-8"))
    del stored["dp"]  # as written by a medlora without DP-SGD
    (tmp_path / "run" / "federation.json").write_text(json.dumps(stored), encoding="utf-8")
    again = Federation(config, tmp_path / "run")
    again.claim()
    assert again.digest != first.digest  # the checkpoints' stamp is the record as first written
    changed = load_federated_config(write_config(tmp_path / "fed2.yaml", sites, rounds=4))
    with pytest.raises(FederatedConfigError, match="holds a different federation"):
        Federation(changed, tmp_path / "run").claim()


def test_sites_of_a_round_are_sampled_from_seed_and_round():
    strategy = FederatedStrategy("fedit", [], base_fingerprint="", global_tensors={}, fraction=0.5, seed=3)
    nodes = [1, 2, 3, 4, 5]
    draws = [strategy.sample(r, nodes) for r in range(1, 21)]
    assert all(len(d) == 2 and set(d) <= set(nodes) for d in draws)
    assert draws == [strategy.sample(r, reversed(nodes)) for r in range(1, 21)]  # not the nodes' order
    assert len({tuple(d) for d in draws}) > 3  # different sites in different rounds
    assert FederatedStrategy("fedit", [], base_fingerprint="", global_tensors={}, fraction=0.1).sample(1, nodes) \
        in [[n] for n in nodes]  # at least one site
