"""SAM backbone: official key layout and outputs, checkpoint adaptation, the CT wrapper, adapters on it."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import types
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medlora.adapters import (
    AdapterConfig,
    export_peft,
    inject,
    iter_adapters,
    load_adapter,
    merge,
    parameter_report,
    save_adapter,
)
from medlora.models import create_model, group_parameters
from medlora.models.sam import SamSegmenter
from medlora.models.weights import WeightsError, load_weights


def official_modeling():
    """``segment_anything.modeling`` without the package ``__init__`` (which imports torchvision)."""
    loaded = sys.modules.get("segment_anything.modeling")  # MONAI's optional imports may have loaded it already
    if loaded is not None and hasattr(loaded, "Sam"):
        return loaded
    spec = importlib.util.find_spec("segment_anything")
    if spec is None:
        pytest.skip("segment-anything (the official implementation) is not installed")
    for name in [n for n in sys.modules if n == "segment_anything" or n.startswith("segment_anything.")]:
        del sys.modules[name]
    pkg = types.ModuleType("segment_anything")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["segment_anything"] = pkg
    import segment_anything.modeling as modeling

    return modeling


def official_tiny(num_multimask_outputs: int = 3):
    """The official classes configured like our ``tiny`` variant."""
    m = official_modeling()
    size, patch, dim = 64, 8, 32
    return m.Sam(
        image_encoder=m.ImageEncoderViT(
            img_size=size, patch_size=patch, embed_dim=64, depth=4, num_heads=2, mlp_ratio=4, out_chans=dim,
            qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, global_attn_indexes=(1, 3),
            window_size=4,
        ),
        prompt_encoder=m.PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch,) * 2,
                                       input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=num_multimask_outputs, transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
        ),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (official inits leave zeros, e.g. relative positions)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_same_outputs_as_official_implementation() -> None:
    official = official_tiny()
    randomise(official)
    ours = SamSegmenter("tiny", num_classes=3).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[5.0, 7.0, 40.0, 50.0]])
    points = (torch.tensor([[[10.0, 12.0], [30.0, 33.0]]]), torch.tensor([[1, 0]]))
    mask = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        emb = official.image_encoder(x)
        torch.testing.assert_close(ours.image_encoder(x), emb, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours.prompt_encoder.get_dense_pe(), official.prompt_encoder.get_dense_pe())
        for prompts in ({"points": None, "boxes": boxes, "masks": None},
                        {"points": points, "boxes": None, "masks": None},
                        {"points": points, "boxes": boxes, "masks": mask},
                        {"points": None, "boxes": None, "masks": None}):
            sparse, dense = official.prompt_encoder(**prompts)
            sparse_ours, dense_ours = ours.prompt_encoder(**prompts)
            torch.testing.assert_close(sparse_ours, sparse)
            torch.testing.assert_close(dense_ours, dense)
            for multimask in (True, False):
                expected = official.mask_decoder(emb[:1], official.prompt_encoder.get_dense_pe(), sparse, dense,
                                                 multimask)
                got = ours.mask_decoder(emb[:1], ours.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
                torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-4)


def vit_b_reference_shapes() -> dict[str, tuple[int, ...]]:
    """Some ViT-B checkpoint shapes, written down from the official layout (not from our model)."""
    shapes = {
        "image_encoder.patch_embed.proj.weight": (768, 3, 16, 16),
        "image_encoder.pos_embed": (1, 64, 64, 768),
        "image_encoder.neck.0.weight": (256, 768, 1, 1),
        "image_encoder.neck.2.weight": (256, 256, 3, 3),
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
        "prompt_encoder.mask_downscaling.0.weight": (4, 1, 2, 2),
        "mask_decoder.mask_tokens.weight": (4, 256),
        "mask_decoder.iou_token.weight": (1, 256),
        "mask_decoder.output_upscaling.0.weight": (256, 64, 2, 2),
        "mask_decoder.output_hypernetworks_mlps.3.layers.2.weight": (32, 256),
        "mask_decoder.iou_prediction_head.layers.2.weight": (4, 256),
        "mask_decoder.transformer.layers.1.cross_attn_token_to_image.q_proj.weight": (128, 256),
        "mask_decoder.transformer.final_attn_token_to_image.out_proj.weight": (256, 128),
    }
    for i in range(12):
        rel = 127 if i in (2, 5, 8, 11) else 27  # global blocks see 64x64 tokens, the others 14x14 windows
        shapes[f"image_encoder.blocks.{i}.attn.qkv.weight"] = (2304, 768)
        shapes[f"image_encoder.blocks.{i}.attn.rel_pos_h"] = (rel, 64)
        shapes[f"image_encoder.blocks.{i}.mlp.lin1.weight"] = (3072, 768)
    return shapes


@pytest.fixture(scope="module")
def vit_b_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A randomly initialised ViT-B checkpoint in the official layout, as a plain state dict and in MedSAM's
    ``{"model": ...}`` wrapping with DDP ``module.`` prefixes."""
    folder = tmp_path_factory.mktemp("sam")
    try:
        modeling = official_modeling()
        from segment_anything.build_sam import build_sam_vit_b

        assert modeling is not None
        state = build_sam_vit_b(checkpoint=None).state_dict()
    except pytest.skip.Exception:
        state = SamSegmenter("vit_b").state_dict()  # still checks our own layout against the written shapes
    plain, medsam = folder / "sam_vit_b.pth", folder / "medsam_vit_b.pth"
    torch.save(state, plain)
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, medsam)
    return {"plain": plain, "medsam": medsam}  # the plain layout is loaded by the tiny-model tests


def test_vit_b_checkpoint_loads_strictly(vit_b_files: dict[str, Path]) -> None:
    state = torch.load(vit_b_files["plain"], weights_only=True)
    for key, shape in vit_b_reference_shapes().items():
        assert tuple(state[key].shape) == shape, key
    # SAM ViT-B: 93,735,472 parameters + the 2 x 128 random Fourier matrix (a buffer)
    assert sum(v.numel() for v in state.values()) == 93_735_472 + 256
    model = create_model("sam", variant="vit_b", prompt="box", checkpoint=str(vit_b_files["medsam"]))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_checkpoint_for_other_size_and_head_is_adapted(tmp_path: Path) -> None:
    source = SamSegmenter("tiny", num_classes=3)
    randomise(source, seed=1)
    path = tmp_path / "tiny.pth"
    torch.save(source.state_dict(), path)
    target = SamSegmenter("tiny", image_size=128, num_classes=1)
    fresh_tokens = target.mask_decoder.mask_tokens.weight.detach().clone()
    load_weights(target, path)
    own, src = target.state_dict(), source.state_dict()
    # pos_embed: 8x8 -> 16x16 tokens, bilinear (checked against an explicit interpolation of one channel)
    pe = src["image_encoder.pos_embed"]
    expected = F.interpolate(pe[..., 5][None], size=(16, 16), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(own["image_encoder.pos_embed"][..., 5], expected)
    # global blocks (1, 3): tables for 2*16-1 offsets; windowed blocks keep their 2*4-1
    assert own["image_encoder.blocks.1.attn.rel_pos_h"].shape == (31, 32)
    assert torch.equal(own["image_encoder.blocks.0.attn.rel_pos_h"], src["image_encoder.blocks.0.attn.rel_pos_h"])
    table = src["image_encoder.blocks.3.attn.rel_pos_w"]
    for j in (0, 15, 30):  # linear interpolation along the offset axis, sample by sample
        pos = (j + 0.5) * table.shape[0] / 31 - 0.5
        lo = min(max(math.floor(pos), 0), table.shape[0] - 1)
        hi, frac = min(lo + 1, table.shape[0] - 1), min(max(pos - lo, 0.0), 1.0)
        expected_row = table[lo] * (1 - frac) + table[hi] * frac
        torch.testing.assert_close(own["image_encoder.blocks.3.attn.rel_pos_w"][j], expected_row)
    # 2 mask tokens instead of 4: the head stays as initialised, the rest is the checkpoint's
    assert torch.equal(target.mask_decoder.mask_tokens.weight, fresh_tokens)
    assert torch.equal(own["mask_decoder.transformer.layers.0.norm1.weight"],
                       src["mask_decoder.transformer.layers.0.norm1.weight"])
    assert target(torch.rand(1, 1, 40, 40)).shape == (1, 1, 40, 40)


def test_wrong_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "unet.pt"
    torch.save(create_model("mv_unet", spatial_dims=2, level=1, width=4).state_dict(), path)
    with pytest.raises(WeightsError, match=r"unet\.pt: weights do not fit this model"):
        create_model("sam", variant="tiny", checkpoint=str(path))


def test_ct_windows_and_output_geometry() -> None:
    model = SamSegmenter("tiny", windows=[[40, 80], [80, 200], [600, 2800]], input_window=[-1024, 3071]).eval()
    hu = torch.tensor([-1024.0, 0.0, 20.0, 40.0, 100.0, 180.0, 1000.0, 3071.0])
    x = ((hu + 1024) / 4095).view(1, 1, 1, -1)
    chans = model.window_channels(x)[0, :, 0]
    for c, (level, width) in enumerate([(40, 80), (80, 200), (600, 2800)]):
        lo = level - width / 2
        expected = [min(max((v - lo) / width, 0.0), 1.0) for v in hu.tolist()]
        torch.testing.assert_close(chans[c], torch.tensor(expected), atol=1e-5, rtol=0)
    out = model(torch.rand(3, 1, 48, 40))
    assert out.shape == (3, 1, 48, 40)
    single = SamSegmenter("tiny", windows=[[40, 80]])
    assert torch.equal(single.window_channels(x)[0, 0], single.window_channels(x)[0, 2])
    with pytest.raises(ValueError, match="spatial_dims=3"):
        SamSegmenter("tiny", spatial_dims=3)
    with pytest.raises(ValueError, match="num_classes must be 1"):
        SamSegmenter("tiny", prompt="box", num_classes=2)


def test_box_mode_scales_boxes_to_the_encoder_and_defaults_to_the_whole_slice() -> None:
    torch.manual_seed(0)
    model = SamSegmenter("tiny", prompt="box").eval()
    randomise(model, seed=2)
    x = torch.rand(2, 1, 32, 32)
    boxes = torch.tensor([[4.0, 6.0, 20.0, 24.0], [0.0, 0.0, 31.0, 31.0]])
    with torch.no_grad():
        out = model(x, boxes=boxes)
        # by hand: encoder at 64 px, boxes scaled by 64/32, official single-mask output, upsampled to 32 px
        emb = model.image_encoder(model.encoder_input(x))
        sparse, dense = model.prompt_encoder(None, boxes * 2, None)
        masks, _ = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, False)
        torch.testing.assert_close(out, F.interpolate(masks, size=(32, 32), mode="bilinear", align_corners=False))
        torch.testing.assert_close(model(x)[1:], out[1:])  # no boxes: the whole slice
    labels = torch.zeros(3, 1, 32, 32)
    labels[0, 0, 10:15, 5:9] = 1
    model.box_full_prob, model.box_jitter = 0.0, 0.0
    got = model.training_boxes(labels)
    assert got[0].tolist() == [5.0, 10.0, 8.0, 14.0]  # x0, y0, x1, y1 of the foreground
    assert got[1].tolist() == [0.0, 0.0, 31.0, 31.0]  # empty slice: whole-slice box


SAM_LAYERS = ["image_encoder.blocks.*.attn.qkv", "image_encoder.blocks.*.attn.proj",
              "image_encoder.blocks.*.mlp.lin1", "image_encoder.blocks.*.mlp.lin2"]


def test_salt_with_per_layer_type_ranks_and_the_trainable_report(tmp_path: Path) -> None:
    model = SamSegmenter("tiny")
    other = copy.deepcopy(model)
    config = AdapterConfig("salt", rank=4, targets=SAM_LAYERS, options={"svd_rank": 16},
                           options_pattern={"image_encoder.blocks.*.mlp.*": {"svd_rank": 8}})
    inject(model, config)
    for p in group_parameters(model, "norms+pos_embed"):
        p.requires_grad_(True)
    ranks = {name: r.svd_rank for name, _, r in iter_adapters(model)}
    assert len(ranks) == 16
    assert all(r == (8 if ".mlp." in name else 16) for name, r in ranks.items())
    report = parameter_report(model)
    k_attn, k_mlp = 64, 64  # min(O, I) of every adapted layer of the tiny model
    per_block = 2 * (2 * 16 + 2 * 4 * (k_attn - 16)) + 2 * (2 * 8 + 2 * 4 * (k_mlp - 8))
    assert report.adapter_params == 4 * per_block
    norms_and_pe = sum(p.numel() for p in group_parameters(model, "norms+pos_embed"))
    assert report.total_trainable_params == 4 * per_block + norms_and_pe
    with torch.no_grad():
        for _, _, reparam in iter_adapters(model):
            reparam.salt_shift.add_(0.01)
    save_adapter(model, tmp_path / "salt.safetensors")
    load_adapter(other, tmp_path / "salt.safetensors")
    assert {n: r.svd_rank for n, _, r in iter_adapters(other)} == ranks
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_samed_qv_lora_matches_the_per_projection_formula(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SamSegmenter("tiny").eval()
    qkv = model.image_encoder.blocks[0].attn.qkv
    w0, b0 = qkv.weight.detach().clone(), qkv.bias.detach().clone()
    inject(model, AdapterConfig("lora", rank=2, alpha=2, targets=SAM_LAYERS[:1],
                                options={"fused_outputs": 3, "adapt_outputs": [0, 2]}))
    reparam = dict((n, r) for n, _, r in iter_adapters(model))["image_encoder.blocks.0.attn.qkv"]
    with torch.no_grad():
        reparam.lora_B.normal_()
    a_q, a_v = reparam.lora_A[:2], reparam.lora_A[2:]
    b_q, b_v = reparam.lora_B[:64], reparam.lora_B[64:]
    x = torch.randn(5, 64)
    base = x @ w0.T + b0
    expected = torch.cat([base[:, :64] + x @ a_q.T @ b_q.T, base[:, 64:128], base[:, 128:] + x @ a_v.T @ b_v.T], 1)
    torch.testing.assert_close(qkv(x), expected.detach(), atol=1e-5, rtol=1e-5)
    assert reparam.lora_A.numel() + reparam.lora_B.numel() == 2 * 2 * (64 + 64)
    loss = qkv(x).square().sum()
    loss.backward()
    assert qkv.parametrizations.weight.original.grad is None
    with pytest.raises(ValueError, match=r"attn\.qkv: LoRA on fused output blocks \[0, 2\]"):
        export_peft(model, tmp_path / "peft")
    merged = qkv(x).detach()
    merge(model)
    torch.testing.assert_close(model.image_encoder.blocks[0].attn.qkv(x), merged)
    with pytest.raises(ValueError, match="adapt_outputs"):
        inject(SamSegmenter("tiny"), AdapterConfig("dora", rank=2, targets=SAM_LAYERS[:1],
                                                    options={"fused_outputs": 5, "adapt_outputs": [0]}))


# ------------------------------------------------------------------------------------------ use


def test_infer_runs_a_sam_adapter_slice_by_slice_in_the_input_geometry(tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np
    from safetensors.torch import save_file

    from medlora.data.dataset import save_nifti
    from medlora.data.transforms import compose, preprocessing
    from medlora.inference import run_inference
    from medlora.training.module import predict_volume

    args = {"variant": "tiny", "image_size": 32}
    torch.manual_seed(0)
    base = SamSegmenter(**args).eval()
    randomise(base, seed=3)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "sam.safetensors"))
    adapted = copy.deepcopy(base)
    inject(adapted, AdapterConfig("salt", rank=2, targets=SAM_LAYERS, options={"svd_rank": 4}))
    with torch.no_grad():
        for _, _, reparam in iter_adapters(adapted):
            reparam.salt_shift.normal_(0, 0.05)
    window = [-1024.0, 3071.0]
    prep = {"hu_window": window, "target_spacing": None, "roi_size": [16, 16], "threshold": 0.5}
    save_adapter(adapted, tmp_path / "salt.safetensors", extra_metadata={
        "backbone": "sam", "backbone_args": args, "spatial_dims": 2, "pretrained": None, "preprocessing": prep})
    rng = np.random.default_rng(0)
    volume = (rng.normal(40, 300, (20, 18, 5))).astype(np.float32)
    affine = np.array([[-0.7, 0, 0, 10.0], [0, 0.9, 0, -8.0], [0, 0, 4.0, -15.0], [0, 0, 0, 1]])  # LAS
    save_nifti(tmp_path / "case.nii.gz", volume, affine)
    summary = run_inference(tmp_path / "sam.safetensors", [tmp_path / "case.nii.gz"], tmp_path / "out",
                            adapters=[tmp_path / "salt.safetensors"], progress=False, save_probabilities=True)
    assert summary.exit_code == 0
    out = nib.load(str(tmp_path / "out" / "case.nii.gz"))
    assert out.shape == volume.shape and np.allclose(out.affine, affine)
    x = compose(preprocessing(keys=("image",), hu_window=window))({"image": str(tmp_path / "case.nii.gz")})["image"]
    with torch.no_grad():
        ref = predict_volume(adapted, x[None], 2, [16, 16])[0, 0].numpy()
    prob = np.asarray(nib.load(str(tmp_path / "out" / "case_prob.nii.gz")).dataobj)
    assert np.allclose(prob, ref[::-1], atol=1e-5)  # RAS processing, written back on the input's L->R flipped axis


def test_crossval_study_with_the_sam_backbone(tmp_path: Path) -> None:
    import json

    import yaml

    from medlora.cli import main
    from medlora.training.crossval import plan_jobs
    from medlora.training.study_config import StudyConfigError, load_study_config

    shipped = load_study_config(Path(__file__).resolve().parents[1] / "configs" / "study" / "sam_transfer.yaml")
    assert {j.method for j in plan_jobs(shipped)} >= {"salt", "svd", "lora", "dora", "full"}
    study = {
        "name": "sam tiny", "seeds": [0], "folds": 2,
        "source": {"phantoms": {"domain": "tbi", "cases": 2, "seed": 0, "shape": [32, 32, 6], "spacing": [6, 6, 20]}},
        "target": {"phantoms": {"domain": "sah", "cases": 4, "seed": 1, "shape": [32, 32, 6], "spacing": [6, 6, 20]}},
        "model": {"backbone": "sam", "backbone_args": {"variant": "tiny", "image_size": 32}},
        "data": {"spatial_dims": 2, "patch_size": [32, 32], "batch_size": 2, "hu_window": [-1024, 3071]},
        "trainer": {"max_epochs": 1},
        "adapter_methods": {"adapter": {"targets": SAM_LAYERS}},
        "methods": [{"name": "salt", "ranks": [2], "finetune": "norms+pos_embed",
                     "adapter": {"options": {"svd_rank": 4},
                                 "options_pattern": {"image_encoder.blocks.*.mlp.*": {"svd_rank": 2}}}},
                    {"name": "lora", "ranks": [2], "finetune": "mask_decoder",
                     "adapter": {"targets": SAM_LAYERS[:1], "options": {"fused_outputs": 3, "adapt_outputs": [0, 2]}}},
                    {"name": "lora", "ranks": [2], "adapter": {"targets": SAM_LAYERS[:1]}, "training_rule": "ffa"}],
    }
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["crossval", "--config", str(config), "--out", str(run), "--only", "pretrain"]) == 0
    for job in ("salt_r2", "lora_r2", "lora_ffa_r2"):
        assert main(["crossval", "--config", str(config), "--out", str(run), "--only", f"job={job},fold=0"]) == 0
    fold0 = Path("seed_0", "cases_all", "fold_0", "summary.json")
    salt = json.loads((run / "jobs" / "salt_r2" / fold0).read_text(encoding="utf-8"))
    lora = json.loads((run / "jobs" / "lora_r2" / fold0).read_text(encoding="utf-8"))
    model = SamSegmenter("tiny", image_size=32)
    norms_pe = sum(p.numel() for p in group_parameters(model, "norms+pos_embed"))
    salt_adapters = 4 * (2 * (2 * 4 + 2 * 2 * 60) + 2 * (2 * 2 + 2 * 2 * 62))
    assert salt["medlora"]["trainable_params"] == salt_adapters + norms_pe
    decoder = sum(p.numel() for p in group_parameters(model, "mask_decoder"))
    assert lora["medlora"]["trainable_params"] == 4 * 2 * 2 * (64 + 64) + decoder
    assert len(salt["metric_per_case"]) == 2
    ffa = json.loads((run / "jobs" / "lora_ffa_r2" / fold0).read_text(encoding="utf-8"))
    assert ffa["medlora"]["label"] == "LoRA + ffa r2"
    assert ffa["medlora"]["trainable_params"] == 4 * 2 * 192  # FFA: only B (192 x 2 per qkv) trains

    bad = dict(study, methods=[{"name": "lora", "training_rule": "lora_pr0"}])
    config.write_text(yaml.safe_dump(bad), encoding="utf-8")
    with pytest.raises(StudyConfigError, match=r"methods\[0\]\.training_rule: unknown training rule 'lora_pr0'"):
        load_study_config(config)
    bad = dict(study, methods=[{"name": "salt", "finetune": "norms+decoder"}])
    config.write_text(yaml.safe_dump(bad), encoding="utf-8")
    with pytest.raises(StudyConfigError, match=r"methods\[0\]\.finetune: SamSegmenter has no module group 'decoder'"):
        load_study_config(config)


SAM_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sam"


@pytest.fixture(scope="module")
def sam_phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from medlora.data.phantoms import write_dataset

    root = tmp_path_factory.mktemp("sam_phantoms")
    return {d: write_dataset(root / d, d, 4, seed=0, shape=(32, 32, 6), spacing=(6.0, 6.0, 20.0))
            for d in ("tbi", "sah")}


def _sam_fit(files: list[Path], tmp: Path, data: Path, *extra: str) -> list[str]:
    args = ["fit"]
    for f in files:
        args += ["--config", str(f)]
    return args + ["--data.data_dir", str(data), "--data.patch_size", "[32, 32]", "--data.num_folds", "2",
                   "--model.backbone_args.image_size", "32", "--trainer.default_root_dir", str(tmp),
                   "--trainer.logger.init_args.save_dir", str(tmp), "--checkpoint.dirpath", str(tmp / "ck"),
                   "--trainer.enable_progress_bar", "false", "--trainer.fast_dev_run", "true", *extra]


@pytest.mark.parametrize("method", ["salt", "ssam", "lora_qv", "dora_qv", "full"])
def test_sam_configs_fast_dev_run(method: str, sam_phantoms: dict[str, Path], tmp_path: Path) -> None:
    from medlora.cli import main

    base = tmp_path / "base.pt"
    torch.save(SamSegmenter("tiny", image_size=32).state_dict(), base)
    main(_sam_fit([SAM_CONFIGS / "finetune_sah_tiny.yaml", SAM_CONFIGS / f"{method}.yaml"], tmp_path,
                  sam_phantoms["sah"], "--model.pretrained", str(base)))
    if method != "full":
        from medlora.adapters import read_adapter_file

        meta, _ = read_adapter_file(tmp_path / "ck" / "adapter.safetensors")
        assert meta["extra"]["backbone"] == "sam" and meta["extra"]["preprocessing"]["hu_window"] == [-1024, 3071]


def test_sam_pretrain_config_and_the_window_check(sam_phantoms: dict[str, Path], tmp_path: Path, capsys) -> None:
    from medlora.cli import main

    main(_sam_fit([SAM_CONFIGS / "pretrain_tbi_tiny.yaml"], tmp_path / "ok", sam_phantoms["tbi"]))
    capsys.readouterr()
    code = main(_sam_fit([SAM_CONFIGS / "pretrain_tbi_tiny.yaml"], tmp_path / "bad", sam_phantoms["tbi"],
                         "--data.hu_window", "[0, 140]"))
    assert code == 2 and capsys.readouterr().err.strip().startswith(
        "medlora: error: command line: data.hu_window: [0.0, 140.0] differs from the backbone's input_window")
    assert not (tmp_path / "bad").exists()
