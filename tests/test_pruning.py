"""LoRAPrune and LoRAM: importance against the paper's formula, pruned == masked, LoRAM recovery, the CLI."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from medlora.adapters import AdapterConfig, inject, iter_adapters, load_adapter, merge, save_adapter
from medlora.assembly import build_architecture, build_model
from medlora.cli import main
from medlora.models.mv_unet import MultiViewUNet
from medlora.models.sam import SamSegmenter
from medlora.pruning import (
    LoRAPruner,
    channel_graph,
    group_importance,
    mask_hooks,
    prune_structure,
    schedule_sparsity,
)
from medlora.pruning.files import pruned_spec

MV_ARGS = {"width": 6, "level": 2}


def _mv(seed: int = 0) -> MultiViewUNet:
    torch.manual_seed(seed)
    model = MultiViewUNet(spatial_dims=3, **MV_ARGS)
    with torch.no_grad():  # non-trivial norm statistics, so that a norm sliced wrongly shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def _random_keep(graph, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {x.name: torch.randperm(x.size, generator=g)[: max(1, x.size // 2)].sort().values for x in graph}


def _masked(model: nn.Module, graph, keep, x: torch.Tensor) -> torch.Tensor:
    handles = mask_hooks(model, graph, keep)
    try:
        return model(x)
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------------ importance


def _np_lora_score(w0, a, b, ga, gb, s):
    """The paper's S = |(G_B A + B G_A - G_B G_A) ⊙ (W + s B A)| on the O x (I k) matrix view, in numpy."""
    o = w0.shape[0]
    w = w0.reshape(o, -1).astype(np.float64)
    a, b, ga, gb = (t.astype(np.float64) for t in (a, b, ga, gb))
    return np.abs((gb @ a + b @ ga - gb @ ga) * (w + s * b @ a)).reshape(w0.shape)


def test_importance_is_the_papers_formula_with_rows_columns_and_moving_average():
    model = _mv()
    inject(model, AdapterConfig("lora", rank=2, alpha=4, targets=[r"re:M1\.DoubleConv\.[03]"]))
    graph = channel_graph(model)
    adapters = {name: r for name, _, r in iter_adapters(model)}
    rng = np.random.default_rng(0)
    grads = []
    for step in range(2):
        grads.append({})
        for name, r in adapters.items():
            with torch.no_grad():
                if step == 0:
                    r.lora_B.normal_()
            r.lora_A.grad = torch.tensor(rng.normal(size=tuple(r.lora_A.shape)), dtype=torch.float32)
            r.lora_B.grad = torch.tensor(rng.normal(size=tuple(r.lora_B.shape)), dtype=torch.float32)
            grads[step][name] = (r.lora_A.grad.numpy().copy(), r.lora_B.grad.numpy().copy())
        if step == 0:
            pruner = LoRAPruner(model, 0.5, total_steps=100, graph=graph)
        pruner.step()

    def expected(step: int) -> np.ndarray:
        modules = dict(model.named_modules())
        total = 0.0
        for name, reduce_axes in (("M1.DoubleConv.0", (1, 2, 3, 4)), ("M1.DoubleConv.3", (0, 2, 3, 4))):
            r = adapters[name]
            w0 = modules[name].parametrizations["weight"].original.detach().numpy()
            ga, gb = grads[step][name]
            score = _np_lora_score(w0, r.lora_A.detach().numpy(), r.lora_B.detach().numpy(), ga, gb, r.scaling)
            v = score.sum(axis=reduce_axes)  # rows of the producer, input columns of the consumer
            total = total + v / (np.sqrt((v**2).sum()) + 1e-8)
        return total

    one_step = group_importance(model, graph)["M1.DoubleConv.0"].numpy()
    np.testing.assert_allclose(one_step, expected(1), rtol=1e-5)
    ema = 0.9 * (0.1 * expected(0)) + 0.1 * expected(1)
    np.testing.assert_allclose(pruner.importance["M1.DoubleConv.0"].numpy(), ema, rtol=1e-5)
    # only groups with an adapted layer are ranked (M1.DoubleConv.3 by its producer alone)
    assert set(pruner.prunable) == {"M1.DoubleConv.0", "M1.DoubleConv.3"}


def test_schedule_is_lorapunes_cubic():
    def official(step, total, w0, w1, init, final):  # loraprune/utils.py schedule_sparsity_ratio, transcribed
        if step <= w0 * total:
            return init
        if step > total - w1 * total:
            return final
        mul = 1 - (step - w0 * total) / (total - (w0 + w1) * total)
        return final + (init - final) * mul**3

    for step in range(0, 101):
        assert schedule_sparsity(step, 100, 0.5) == pytest.approx(official(step, 100, 0.1, 0.1, 0.0, 0.5))
    assert schedule_sparsity(50, 100, 0.5) == pytest.approx(0.5 - 0.5 * 0.5**3)


# ----------------------------------------------------------------------------------------- pruned == masked


def test_pruned_equals_masked_on_the_skip_connected_mv_unet():
    model = _mv()
    graph = channel_graph(model)
    # the top M1's output reaches the first encoder's M1 and M2 and, through the long skips, the head
    assert {s.layer for s in graph.groups["M1.DoubleConv.3"].consumers} == {
        "down_list.0.M1.DoubleConv.0", "down_list.0.M2.TripleDia.0", "M3.TripleOut.0"}
    keep = _random_keep(graph)
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        masked, full = _masked(model, graph, keep, x), model(x)
        small = prune_structure(copy.deepcopy(model), graph, keep)
        pruned = small(x)
    assert (masked - full).abs().max() > 1e-3  # the masks change the output: the comparison means something
    assert (pruned - masked).abs().max() < 1e-6
    assert sum(p.numel() for p in small.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())


def test_pruned_equals_masked_on_sam_heads_and_mlp():
    torch.manual_seed(0)
    model = SamSegmenter("tiny", num_classes=1).eval()
    graph = channel_graph(model)
    heads = graph.groups["image_encoder.blocks.0.attn.heads"]
    assert (heads.size, heads.unit, len(heads.producers)) == (2, 32, 3)
    keep = _random_keep(graph)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        masked, full = _masked(model, graph, keep, x), model(x)
        small = prune_structure(copy.deepcopy(model), graph, keep)
        pruned = small(x)
    assert small.image_encoder.blocks[0].attn.num_heads == 1
    assert (masked - full).abs().max() > 1e-4
    assert (pruned - masked).abs().max() < 1e-6


def test_pruner_reaches_the_target_and_never_unmasks():
    model = _mv()
    model.train()
    inject(model, AdapterConfig("lora", rank=2, targets=["*"], target_types=["Conv3d"], exclude=["M3.TripleOut.6"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    pruner = LoRAPruner(model, 0.5, total_steps=10, frequency=2, cooldown=0.2)
    history = []
    torch.manual_seed(3)
    for _ in range(10):
        x = torch.randn(1, 1, 8, 8, 8)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), (x > 0.5).float())
        opt.zero_grad()
        loss.backward()
        pruner.step()
        opt.step()
        history.append({k: set(v.tolist()) for k, v in pruner.keep().items()})
    for before, after in zip(history, history[1:], strict=False):
        assert all(after[k] <= before[k] for k in before)
    assert pruner.ratio == 0.5
    assert all(len(k) == 3 for k in history[-1].values())  # 6 channels, int(6 * 0.5) pruned
    assert "M3.TripleOut.6" not in pruner.prunable  # the logit head is never pruned


# ------------------------------------------------------------------------------------------- files and CLI


def _base_file(tmp_path, seed: int = 0, name: str = "base.safetensors"):
    model = _mv(seed)
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


PREP = {"hu_window": [0.0, 140.0], "target_spacing": None, "roi_size": [8, 8, 8], "threshold": 0.5}


def _loraprune_adapter(tmp_path, base: nn.Module, sparsity: float = 0.5):
    model = copy.deepcopy(base)
    inject(model, AdapterConfig("lora", rank=2, targets=["*"], target_types=["Conv3d"], exclude=["M3.TripleOut.6"]))
    pruner = LoRAPruner(model, sparsity, total_steps=4, frequency=1, warmup=0.0, cooldown=0.25)
    torch.manual_seed(4)
    for _ in range(4):
        for _, _, r in iter_adapters(model):
            r.lora_A.grad, r.lora_B.grad = torch.randn_like(r.lora_A), torch.randn_like(r.lora_B)
        pruner.step()
        with torch.no_grad():
            for _, _, r in iter_adapters(model):
                r.lora_B.add_(0.1 * torch.randn_like(r.lora_B))
    pruner.remove_masks()
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path, extra_metadata={"backbone": "mv_unet", "backbone_args": MV_ARGS, "spatial_dims": 3,
                                              "loraprune": pruner.record(), "preprocessing": PREP})
    return path, pruner.keep()


def test_prune_command_writes_a_base_equal_to_the_masked_model(tmp_path, capsys):
    base, base_path = _base_file(tmp_path)
    adapter, keep = _loraprune_adapter(tmp_path, base)
    out = tmp_path / "small.safetensors"
    assert main(["prune", "--model", str(base_path), "--adapter", str(adapter), "--out", str(out)]) == 0
    small = build_model(pruned_spec(out)).eval()
    on_meta = build_architecture(pruned_spec(out))  # config checks build networks on the meta device
    assert {k: v.shape for k, v in on_meta.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    reference = copy.deepcopy(base)
    load_adapter(reference, adapter)
    merge(reference)
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        expected = _masked(reference.eval(), channel_graph(reference), keep, x)
        assert (small(x) - expected).abs().max() < 1e-6
    # W0 only (the LoRAM base): equals the masked plain base
    w0_out = tmp_path / "small_w0.safetensors"
    assert main(["prune", "--model", str(base_path), "--adapter", str(adapter), "--no-merge",
                 "--out", str(w0_out)]) == 0
    with torch.no_grad():
        small_w0 = build_model(pruned_spec(w0_out)).eval()
        assert (small_w0(x) - _masked(base, channel_graph(base), keep, x)).abs().max() < 1e-6


@pytest.mark.parametrize("case", ["sparsity", "other_base", "exists"])
def test_prune_command_refuses_bad_input_in_one_line(tmp_path, capsys, case):
    base, base_path = _base_file(tmp_path)
    adapter, _ = _loraprune_adapter(tmp_path, base)
    out = tmp_path / "small.safetensors"
    args = ["prune", "--model", str(base_path), "--adapter", str(adapter), "--out", str(out)]
    if case == "sparsity":
        args += ["--sparsity", "1.5"]
    elif case == "other_base":
        _, other = _base_file(tmp_path, seed=7, name="other.safetensors")
        args[2] = str(other)
    else:
        out.write_bytes(b"user's file")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medlora: error: ") and "\n" not in err
    assert {"sparsity": "--sparsity 1.5", "other_base": "base weights differ", "exists": "exists"}[case] in err
    assert (out.read_bytes() == b"user's file") if case == "exists" else not out.exists()


# ---------------------------------------------------------------------------------------------------- LoRAM


def test_loram_recovered_adapter_equals_pruned_base_plus_adapter_and_keeps_w0(tmp_path, capsys):
    base, base_path = _base_file(tmp_path)
    adapter, keep = _loraprune_adapter(tmp_path, base)
    small_path = tmp_path / "small_w0.safetensors"
    assert main(["prune", "--model", str(base_path), "--adapter", str(adapter), "--no-merge",
                 "--out", str(small_path)]) == 0
    spec = pruned_spec(small_path, adapter=AdapterConfig("lora", rank=2, targets=["*"], target_types=["Conv3d"],
                                                         exclude=["M3.TripleOut.6"]))
    small = build_model(spec).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for _, _, r in iter_adapters(small):
            r.lora_B.normal_()
    small_adapter = tmp_path / "small_adapter.safetensors"
    record = spec.to_dict()
    save_adapter(small, small_adapter, extra_metadata={k: record[k] for k in ("backbone", "backbone_args",
                                                                             "spatial_dims")})
    recovered = tmp_path / "full_adapter.safetensors"
    merged_path = tmp_path / "full_merged.safetensors"
    assert main(["recover", "--model", str(base_path), "--adapter", str(small_adapter), "--out", str(recovered),
                 "--merged-out", str(merged_path)]) == 0

    full = copy.deepcopy(base)
    load_adapter(full, recovered)
    graph = channel_graph(base)
    small_layers, full_layers = dict(small.named_modules()), dict(full.named_modules())
    base_layers = dict(base.named_modules())
    from medlora.pruning import layer_indices

    index = layer_indices(base, graph, keep)
    for name, _, _ in iter_adapters(small):
        w_full, w_small = full_layers[name].weight.detach(), small_layers[name].weight.detach()
        w0 = base_layers[name].weight.detach()
        rows = index.get((name, "out"), torch.arange(w0.shape[0]))
        cols = index.get((name, "in"), torch.arange(w0.shape[1]))
        torch.testing.assert_close(w_full[rows][:, cols], w_small, rtol=0, atol=1e-6)
        pruned_rows = torch.ones(w0.shape[0], dtype=torch.bool)
        pruned_rows[rows] = False
        pruned_cols = torch.ones(w0.shape[1], dtype=torch.bool)
        pruned_cols[cols] = False
        assert torch.equal(w_full[pruned_rows], w0[pruned_rows])  # pruned positions keep W0 exactly
        assert torch.equal(w_full[:, pruned_cols], w0[:, pruned_cols])
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert (_masked(full.eval(), graph, keep, x) - small(x)).abs().max() < 1e-6
        merged = build_model(pruned_spec(small_path).__class__("mv_unet", MV_ARGS, 3, pretrained=str(merged_path)))
        assert (merged.eval()(x) - full(x)).abs().max() < 1e-6
    # onto another base: one line, nothing written
    _, other = _base_file(tmp_path, seed=7, name="other.safetensors")
    capsys.readouterr()
    again = tmp_path / "again.safetensors"
    assert main(["recover", "--model", str(other), "--adapter", str(small_adapter), "--out", str(again)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not the base" in err and "\n" not in err and not again.exists()


def test_loram_recovery_of_fused_qkv_lora_on_sam_heads(tmp_path):
    from medlora.adapters import read_adapter_file
    from medlora.pruning.files import recover_adapter

    torch.manual_seed(0)
    full = SamSegmenter("tiny", num_classes=1).eval()
    graph = channel_graph(full)
    keep = _random_keep(graph, seed=2)
    small = prune_structure(copy.deepcopy(full), graph, keep)
    # SAMed's q/v-only LoRA on the fused qkv, plain LoRA on the projections and the MLPs
    inject(small, AdapterConfig("lora", rank=2, targets=["*.qkv"], options={"fused_outputs": 3,
                                                                          "adapt_outputs": [0, 2]}))
    inject(small, AdapterConfig("lora", rank=2, targets=["*.attn.proj", "*.lin1", "*.lin2"]))
    with torch.no_grad():
        for _, _, r in iter_adapters(small):
            r.lora_B.normal_(std=0.1)
    path = tmp_path / "small.safetensors"
    save_adapter(small, path)
    meta, tensors = read_adapter_file(path)
    recovered = copy.deepcopy(full)
    for p in recovered.parameters():
        p.requires_grad_(False)
    recover_adapter(recovered, {k: v.tolist() for k, v in keep.items()}, meta, tensors, path)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert (_masked(recovered, graph, keep, x) - small(x)).abs().max() < 1e-6
        # the pruned head's q, k and v rows keep W0 exactly (k was never adapted; q and v got zero rows of B)
        block = "image_encoder.blocks.0.attn"
        gone = 1 - int(keep[f"{block}.heads"][0])
        w_full = dict(recovered.named_modules())[f"{block}.qkv"].weight
        w0 = dict(full.named_modules())[f"{block}.qkv"].weight
        for k in range(3):
            rows = slice(k * 64 + gone * 32, k * 64 + gone * 32 + 32)
            assert torch.equal(w_full[rows], w0[rows])
        assert not torch.equal(w_full, w0)


def test_infer_runs_a_pruned_base_as_the_masked_model(tmp_path):
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from medlora.data.dataset import save_nifti
    from medlora.data.transforms import compose, preprocessing
    from medlora.evaluation.predict import DEFAULT_SW_BATCH_SIZE, DEFAULT_SW_OVERLAP
    from medlora.training.module import predict_volume

    base, base_path = _base_file(tmp_path)
    adapter, keep = _loraprune_adapter(tmp_path, base)
    small = tmp_path / "small.safetensors"
    assert main(["prune", "--model", str(base_path), "--adapter", str(adapter), "--out", str(small)]) == 0
    rng = np.random.default_rng(0)
    image = tmp_path / "case.nii.gz"
    volume = rng.uniform(-20, 160, (16, 12, 8)).astype(np.float32)
    volume[:2], volume[-2:] = -1000.0, 900.0  # air and bone, so that the input reads as CT in HU
    save_nifti(image, volume, np.diag([0.9, 0.9, 3.0, 1.0]))
    out = tmp_path / "preds"
    assert main(["infer", str(image), "--model", str(small), "--out", str(out), "--save-probabilities"]) == 0
    got = np.asarray(__import__("nibabel").load(str(out / "case_prob.nii.gz")).dataobj)
    # reference: the full base + adapter, masked, through training's preprocessing and sliding window
    reference = copy.deepcopy(base)
    load_adapter(reference, adapter)
    merge(reference)
    handles = mask_hooks(reference, channel_graph(reference), keep)
    pre = compose(preprocessing(keys=("image",), target_spacing=None))
    d = pre({"image": str(image)})
    with torch.no_grad():
        prob = predict_volume(reference, d["image"][None], 3, PREP["roi_size"], DEFAULT_SW_BATCH_SIZE,
                              DEFAULT_SW_OVERLAP)[0]
    for h in handles:
        h.remove()
    d["pred"] = MetaTensor(prob, meta=dict(d["image"].meta), applied_operations=list(d["image"].applied_operations))
    expected = np.asarray(Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(d)["pred"][0])
    assert got.shape == expected.shape == (16, 12, 8)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*(does not have many workers|LeafSpec|val_dataloader)")
def test_lightning_fit_with_the_loraprune_callback_feeds_medlora_prune(tmp_path, capsys):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from medlora.adapters import read_adapter_file
    from medlora.assembly import ModelSpec
    from medlora.pruning.lightning import LoRAPruneCallback
    from medlora.training import SegmentationModule, run_callbacks

    arch = {"level": 1, "width": 4}
    base_path = tmp_path / "base.safetensors"
    torch.manual_seed(0)
    save_file(build_model(ModelSpec("mv_unet", arch)).state_dict(), str(base_path))
    spec = ModelSpec("mv_unet", arch, pretrained=str(base_path),
                     adapter=AdapterConfig("lora", rank=1, target_types=["Conv3d"], exclude=["M3.TripleOut.6"]))
    module = SegmentationModule(build_model(spec), spec, roi_size=[8, 8, 8], lr=0.05)
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(1, 8, 8, 8, generator=g), "label": (torch.rand(1, 8, 8, 8, generator=g) > 0.7).float()}
            for _ in range(4)]
    callback = LoRAPruneCallback(0.5, warmup=0.0, cooldown=0.25, frequency=1)
    trainer = pl.Trainer(max_epochs=1, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         default_root_dir=str(tmp_path / "run"), callbacks=[*run_callbacks(), callback])
    trainer.fit(module, DataLoader(data, batch_size=1))
    adapter = tmp_path / "run" / "adapter.safetensors"
    record = read_adapter_file(adapter)[0]["extra"]["loraprune"]
    assert record["steps"] == 4 and record["reached"] == 0.5
    assert all(len(group["keep"]) == 2 for group in record["groups"].values())  # 4 channels, 2 pruned
    assert not any(m._forward_pre_hooks for m in module.model.modules())  # masks gone after fit
    out = tmp_path / "small.safetensors"
    assert main(["prune", "--model", str(base_path), "--adapter", str(adapter), "--out", str(out)]) == 0
    small = build_model(pruned_spec(out)).eval()
    assert small.M1.DoubleConv[0].out_channels == 2


# ------------------------------------------------------------------------------------------- LoRAPrune in a study


def test_loraprune_study_job_is_evaluated_as_the_pruned_network(tmp_path, capsys):
    import json

    import yaml

    from medlora.adapters import read_adapter_file
    from medlora.data.phantoms import write_dataset
    from medlora.training.crossval import Study

    torch.manual_seed(0)
    base_net = MultiViewUNet(spatial_dims=3, level=1, width=4)
    save_file(base_net.state_dict(), str(tmp_path / "base.safetensors"))
    data = write_dataset(tmp_path / "sah", "sah", 4, seed=1, shape=(48, 48, 16), spacing=(4, 4, 10))
    config = {
        "name": "tiny", "seeds": [0], "folds": 2, "target": {"data_dir": str(data)},
        "model": {"backbone": "mv_unet", "backbone_args": {"level": 1, "width": 4},
                  "pretrained": str(tmp_path / "base.safetensors")},
        "data": {"spatial_dims": 3, "patch_size": [32, 32, 16], "batch_size": 1, "samples_per_volume": 1},
        "trainer": {"max_steps": 10},
        "adapter_methods": {"lr": 0.01, "adapter": {"target_types": ["Conv3d"], "exclude": ["M3.TripleOut.6"]}},
        "methods": [{"name": "loraprune", "sparsity": 0.5, "method": "lora", "ranks": [2]}],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["crossval", "--config", str(tmp_path / "study.yaml"), "--out", str(run), "--only", "fold=0"]) == 0
    job = run / "jobs" / "loraprune50_lora_r2" / "seed_0" / "cases_all" / "fold_0"
    info = json.loads((job / "summary.json").read_text(encoding="utf-8"))["medlora"]
    full = sum(p.numel() for p in base_net.parameters())
    pruned = info["loraprune"]["parameters_pruned"]
    assert info["loraprune"]["reached"] == 0.5 and pruned < full / 2 and info["total_params"] == full
    assert pruned == sum(p.numel() for p in build_model(pruned_spec(job / "model.safetensors")).parameters())
    # reference: the full base with the job's adapter and the units it was trained without masked (dense) gives
    # the same per-case soft Dice; the same adapter without the masks does not
    study = Study(tmp_path / "study.yaml", run)
    study.prepare_data()
    entry = study.config.methods[0]
    meta = read_adapter_file(job / "adapter.safetensors")[0]
    keep = {k: torch.as_tensor(v["keep"]) for k, v in meta["extra"]["loraprune"]["groups"].items()}

    def soft_dice(masked: bool) -> list[float]:
        module = study._module(study.config.job_model(entry, 2, str(tmp_path / "base.safetensors")))
        load_adapter(module.model, job / "adapter.safetensors")
        if masked:
            mask_hooks(module.model, channel_graph(module.model), keep)
        rows, _ = study._evaluate(module, study._datamodule(study.target_dir, 0, 0, study.splits_path))
        return [r["soft_Dice"] for r in rows]

    summary = json.loads((job / "summary.json").read_text(encoding="utf-8"))
    reported = [c["metrics"]["1"]["soft_Dice"] for c in summary["metric_per_case"]]
    np.testing.assert_allclose(reported, soft_dice(True), rtol=0, atol=1e-6)
    # (a random tiny base moves soft Dice little: the unmasked network differs by ~1e-4 here)
    assert np.abs(np.asarray(reported) - np.asarray(soft_dice(False))).max() > 2e-5
    # a sparsity out of range is one line naming the method entry's key, before anything runs
    config["methods"] = [{"name": "loraprune", "sparsity": 1.0, "ranks": [2]}]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    capsys.readouterr()
    assert main(["crossval", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "study.methods[0].sparsity" in err and not (tmp_path / "run2").exists()
    # so is a backbone without a channel graph
    config["methods"] = [{"name": "loraprune", "sparsity": 0.5, "ranks": [2]}]
    config["model"] = {"backbone": "segresnet", "pretrained": str(tmp_path / "base.safetensors")}
    config["adapter_methods"]["adapter"]["exclude"] = []
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["crossval", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "study.methods[0].name" in err and "SegResNet" in err


# ----------------------------------------------------------------------------------------------- LoRAM alignment


def test_loram_alignment_brings_the_pruned_base_closer_to_the_full_one_and_recovery_keeps_w0(tmp_path, capsys):
    from medlora.adapters.inject import base_weight
    from medlora.pruning import layer_indices
    from medlora.training.transfer import SyntheticSpec, synthetic_samples

    base, base_path = _base_file(tmp_path)
    adapter, keep = _loraprune_adapter(tmp_path, base)
    plain, aligned = tmp_path / "plain_w0.safetensors", tmp_path / "aligned_w0.safetensors"
    common = ["prune", "--model", str(base_path), "--adapter", str(adapter), "--no-merge"]
    assert main([*common, "--out", str(plain)]) == 0
    assert main([*common, "--align-steps", "60", "--align-volumes", "4", "--align-shape", "24", "24", "16",
                 "--align-spacing", "8", "8", "10", "--out", str(aligned)]) == 0
    assert "aligned 60 steps" in capsys.readouterr().out
    # held out: phantoms of another generator seed than the alignment's
    held_out = synthetic_samples(SyntheticSpec(volumes=3, seed=77, shape=(24, 24, 16), spacing=(8, 8, 10)), 3,
                                 [8, 8, 8], [0.0, 140.0])
    with torch.no_grad():
        reference = torch.sigmoid(base(held_out))

        def gap(path) -> float:
            return float((torch.sigmoid(build_model(pruned_spec(path)).eval()(held_out)) - reference).abs().mean())

        before, after = gap(plain), gap(aligned)
    assert after < 0.5 * before, (before, after)

    # LoRAM on the aligned base: the recovered adapter adds on the full base exactly the update it learnt on the
    # small one at the kept positions, and leaves the pruned positions at W0 bitwise
    lora = AdapterConfig("lora", rank=2, targets=["*"], target_types=["Conv3d"], exclude=["M3.TripleOut.6"])
    spec = pruned_spec(aligned, adapter=lora)
    small = build_model(spec).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for _, _, r in iter_adapters(small):
            r.lora_B.normal_()
    small_adapter = tmp_path / "small_adapter.safetensors"
    record = spec.to_dict()
    save_adapter(small, small_adapter, extra_metadata={k: record[k] for k in ("backbone", "backbone_args",
                                                                             "spatial_dims")})
    recovered = tmp_path / "full_adapter.safetensors"
    assert main(["recover", "--model", str(base_path), "--adapter", str(small_adapter), "--out", str(recovered)]) == 0
    full = copy.deepcopy(base)
    load_adapter(full, recovered)
    index = layer_indices(base, channel_graph(base), keep)
    small_layers, full_layers, base_layers = (dict(m.named_modules()) for m in (small, full, base))
    for name, _, _ in iter_adapters(small):
        w0 = base_layers[name].weight.detach()
        w_full = full_layers[name].weight.detach()
        update_small = small_layers[name].weight.detach() - base_weight(small_layers[name]).detach()
        rows = index.get((name, "out"), torch.arange(w0.shape[0]))
        cols = index.get((name, "in"), torch.arange(w0.shape[1]))
        torch.testing.assert_close((w_full - w0)[rows][:, cols], update_small, rtol=0, atol=1e-6)
        pruned_rows = torch.ones(w0.shape[0], dtype=torch.bool)
        pruned_rows[rows] = False
        pruned_cols = torch.ones(w0.shape[1], dtype=torch.bool)
        pruned_cols[cols] = False
        assert torch.equal(w_full[pruned_rows], w0[pruned_rows])
        assert torch.equal(w_full[:, pruned_cols], w0[:, pruned_cols])


# ------------------------------------------------------------------------------------------------- MONAI's UNet

UNET_ARGS = {"spatial_dims": 3, "channels": [6, 8, 10], "strides": [2, 2]}


def _monai_unet(num_res_units: int, seed: int = 0) -> nn.Module:
    from medlora.models import create_model

    torch.manual_seed(seed)
    model = create_model("unet", **UNET_ARGS, num_res_units=num_res_units)
    with torch.no_grad():  # non-trivial norm statistics, so that a norm sliced wrongly shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


@pytest.mark.parametrize("num_res_units", [0, 2])
def test_pruned_equals_masked_on_monai_unet_with_residual_units_and_skip_concatenations(num_res_units):
    model = _monai_unet(num_res_units)
    graph = channel_graph(model)
    if num_res_units:
        # the bottom unit's residual conv is added to its last conv's output: one group, two producers; the
        # decoder's identity residual joins its transposed conv's output group
        bottom = graph.groups["model.1.submodule.1.submodule.conv.unit1.conv"]
        assert {s.layer for s in bottom.producers} == {"model.1.submodule.1.submodule.conv.unit1.conv",
                                                       "model.1.submodule.1.submodule.residual"}
        up = graph.groups["model.1.submodule.2.0.conv"]
        assert {s.layer for s in up.producers} == {"model.1.submodule.2.0.conv",
                                                   "model.1.submodule.2.1.conv.unit0.conv"}
    # the top skip concatenates the first down block's output before the inner output: the top up conv reads it at
    # offset 0 and the inner block's output behind it
    first, top_up = ("model.0.conv.unit1.conv", "model.2.0.conv") if num_res_units else ("model.0.conv", "model.2.conv")
    inner = "model.1.submodule.2.0.conv" if num_res_units else "model.1.submodule.2.conv"
    assert (_offset(graph, first, top_up), _offset(graph, inner, top_up)) == (0, 6)
    assert not any(s.layer.startswith("model.2.") for g in graph for s in g.producers)  # the logits stay
    keep = _random_keep(graph)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        masked, full = _masked(model, graph, keep, x), model(x)
        small = prune_structure(copy.deepcopy(model), graph, keep)
        pruned = small(x)
    assert (masked - full).abs().max() > 1e-3
    assert (pruned - masked).abs().max() < 1e-6
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())


def _offset(graph, group: str, layer: str) -> int:
    """Where ``group``'s channels start in ``layer``'s input."""
    return next(s.offset for s in graph.groups[group].consumers if s.layer == layer)


def test_prune_command_on_monai_unet_equals_the_masked_model(tmp_path):
    base = _monai_unet(2)
    base_path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(base_path))
    model = copy.deepcopy(base)
    inject(model, AdapterConfig("lora", rank=2, targets=["*"], target_types=["Conv3d", "ConvTranspose3d"]))
    pruner = LoRAPruner(model, 0.5, total_steps=2, frequency=1, warmup=0.0, cooldown=0.5)
    torch.manual_seed(4)
    for _ in range(2):
        for _, _, r in iter_adapters(model):
            r.lora_A.grad, r.lora_B.grad = torch.randn_like(r.lora_A), torch.randn_like(r.lora_B)
            with torch.no_grad():
                r.lora_B.add_(0.1 * torch.randn_like(r.lora_B))
        pruner.step()
    pruner.remove_masks()
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(model, adapter, extra_metadata={"backbone": "unet", "backbone_args": UNET_ARGS, "spatial_dims": 3,
                                                 "loraprune": pruner.record(), "preprocessing": PREP})
    out = tmp_path / "small.safetensors"
    assert main(["prune", "--model", str(base_path), "--adapter", str(adapter), "--out", str(out)]) == 0
    small = build_model(pruned_spec(out)).eval()
    # the reference: the full base loaded from its file (a MONAI UNet's keys all start with "model.") with the
    # adapter merged as medlora prune merges it, then masked
    from medlora.assembly import ModelSpec, load_adapter_onto

    full = build_model(ModelSpec("unet", UNET_ARGS, 3, pretrained=str(base_path)))
    reference = load_adapter_onto(full, adapter, merge_weights=True).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = _masked(reference, channel_graph(reference), pruner.keep(), x)
        assert (expected - reference(x)).abs().max() > 1e-3
        # 1e-6 relative to the output's scale (it reaches several units here: random norm statistics)
        scale = float(expected.abs().max())
        assert float((small(x) - expected).abs().max()) < 1e-6 * max(scale, 1.0), scale


def test_study_records_without_loraprune_entries_are_unchanged():
    # a run folder's study.json is compared with the config's record on resume: entries of other methods must
    # not gain keys, or every earlier run folder would count as another study
    from medlora.training.study_config import study_from_mapping

    study = {"target": {"phantoms": {"domain": "sah", "cases": 6}}, "model": {"pretrained": "base.safetensors"},
             "trainer": {"max_steps": 1},
             "methods": [{"name": "lora", "ranks": [2]}, {"name": "loraprune", "sparsity": 0.25, "ranks": [2]}]}
    methods = study_from_mapping(study).to_record()["methods"]
    assert methods[0] == {"name": "lora", "ranks": [2], "model": {}}
    assert (methods[1]["sparsity"], methods[1]["prune_method"]) == (0.25, "lora")
