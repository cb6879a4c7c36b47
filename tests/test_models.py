"""Tests for medlora.models: the seed authors' multi-view UNet, its module groups, and the model registry."""

from __future__ import annotations

import pytest
import torch
from monai.utils import optional_import
from torch import nn

from medlora.models import (
    MultiViewUNet,
    create_model,
    group_module_names,
    group_parameters,
    list_models,
    module_groups,
    register_model,
    set_trainable,
)
from medlora.models import registry as registry_mod


def n_params(params) -> int:
    return sum(p.numel() for p in params)


@pytest.fixture(scope="module")
def mv2d() -> MultiViewUNet:
    # The authors' configuration: 2D, 1 channel in, 1 logit out, level 2, width 32.
    torch.manual_seed(0)
    return MultiViewUNet(spatial_dims=2, in_channels=1, out_channels=1, level=2, width=32)


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("level", [1, 2, 3])
@pytest.mark.parametrize("out_channels", [1, 2])
def test_output_shape_2d(level: int, out_channels: int) -> None:
    model = MultiViewUNet(spatial_dims=2, out_channels=out_channels, level=level, width=8)
    y = model(torch.randn(2, 1, 32, 24))
    assert y.shape == (2, out_channels, 32, 24)


@pytest.mark.parametrize("level", [1, 2])
def test_output_shape_3d(level: int) -> None:
    model = MultiViewUNet(spatial_dims=3, in_channels=2, level=level, width=8, norm="instance")
    y = model(torch.randn(1, 2, 16, 16, 8))
    assert y.shape == (1, 1, 16, 16, 8)


def test_anisotropic_kernel_and_pool_keep_slices_independent() -> None:
    torch.manual_seed(0)
    model = MultiViewUNet(spatial_dims=3, level=2, width=8, kernel_size=(3, 3, 1), pool_size=(2, 2, 1)).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert all(c.kernel_size in {(3, 3, 1), (1, 1, 1)} for c in convs)
    assert model.down_list[0].Down.kernel_size == (2, 2, 1)
    assert model.size_divisor == (4, 4, 1)

    x = torch.randn(1, 1, 32, 32, 8)
    with torch.no_grad():
        y = model(x)
        x2 = x.clone()
        x2[..., 3] += 1.0
        y2 = model(x2)
    assert y.shape == (1, 1, 32, 32, 8)
    # No kernel, pooling or upsampling spans the slice axis, so only slice 3 may change (eval-mode BN).
    changed = (y2 - y).abs().amax(dim=(0, 1, 2, 3))
    assert changed[3] > 0
    assert torch.all(changed[torch.arange(8) != 3] == 0)


def test_dilated_same_padding_keeps_size() -> None:
    model = MultiViewUNet(spatial_dims=2, level=1, width=4, kernel_size=5, dilations=(1, 3, 5))
    convs = dict(model.named_modules())
    assert convs["M2.TripleDia.6"].dilation == (5, 5)
    assert convs["M2.TripleDia.6"].padding == (10, 10)
    assert model(torch.randn(1, 1, 22, 22)).shape == (1, 1, 22, 22)


# ---------------------------------------------------------------------------- the authors' network


def test_authors_parameter_count(mv2d: MultiViewUNet) -> None:
    total = n_params(mv2d.parameters())
    assert total == 232_737
    assert abs(total - 232_700) / 232_700 < 0.01
    assert sum(isinstance(m, nn.Conv2d) for m in mv2d.modules()) == 22
    assert sum(isinstance(m, nn.BatchNorm2d) for m in mv2d.modules()) == 21


def test_state_dict_uses_authors_names(mv2d: MultiViewUNet) -> None:
    keys = set(mv2d.state_dict())
    # Names taken from the authors' fine-tuning script, so their checkpoints load with load_state_dict.
    for k in [
        "M1.DoubleConv.0.weight",
        "M1.DoubleConv.3.weight",
        "down_list.0.M1.DoubleConv.0.weight",
        "down_list.1.M1.DoubleConv.3.weight",
        "down_list.1.M2.TripleDia.6.weight",
        "M2.TripleDia.3.bias",
        "up_list.0.M1.DoubleConv.0.weight",
        "up_list.1.M1.DoubleConv.3.weight",
        "M3.TripleOut.0.weight",
        "M3.TripleOut.3.weight",
        "M3.TripleOut.6.weight",
        "M3.TripleOut.4.running_var",
    ]:
        assert k in keys, k
    assert mv2d.up_list[0].M1.DoubleConv[0].in_channels == 64
    assert mv2d.up_list[1].M1.DoubleConv[0].in_channels == 96
    assert mv2d.M3.TripleOut[0].in_channels == 96
    # Round trip through a plain state dict (what loading a checkpoint does).
    clone = MultiViewUNet(spatial_dims=2)
    clone.load_state_dict(mv2d.state_dict(), strict=True)


def test_xavier_init_reproduces_authors() -> None:
    torch.manual_seed(0)
    model = MultiViewUNet(spatial_dims=2, init="xavier")
    conv = model.M1.DoubleConv[3]
    bn = model.M1.DoubleConv[4]
    # xavier_normal_ with gain 0.02: std = 0.02 * sqrt(2 / (fan_in + fan_out)) = 0.02 * sqrt(2 / 576).
    assert conv.weight.std().item() == pytest.approx(0.02 * (2 / 576) ** 0.5, rel=0.1)
    assert torch.all(conv.bias == 0)
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert bn.weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert torch.all(bn.bias == 0)


# ------------------------------------------------------------------------------------------- groups

AUTHORS_GROUPS = {
    "shallow": ["M1", "M3"],
    "deep": ["down_list.1.M1", "up_list.0.M1"],
    "encoder": ["M1", "down_list.0.M1", "down_list.1.M1"],
    "decoder": ["up_list.0.M1", "up_list.1.M1", "M3"],
}


def test_groups_are_authors_sets(mv2d: MultiViewUNet) -> None:
    groups = module_groups(mv2d)
    for name, prefixes in AUTHORS_GROUPS.items():
        assert groups[name] == prefixes
    assert groups["all"] == ["M1", "down_list", "M2", "up_list", "M3"]
    assert groups["none"] == []


def test_groups_generalise_to_other_levels() -> None:
    groups = MultiViewUNet(spatial_dims=2, level=3, width=4).module_groups()
    assert groups["deep"] == ["down_list.2.M1", "up_list.0.M1"]
    assert groups["encoder"] == ["M1", "down_list.0.M1", "down_list.1.M1", "down_list.2.M1"]
    assert groups["decoder"] == ["up_list.0.M1", "up_list.1.M1", "up_list.2.M1", "M3"]


def test_group_parameter_counts(mv2d: MultiViewUNet) -> None:
    # Including the BN affine parameters, as the authors' freeze_layers trains them.
    full = {name: n_params(group_parameters(mv2d, name)) for name in [*AUTHORS_GROUPS, "all", "none"]}
    assert full == {
        "shallow": 46_785,
        "deep": 46_464,
        "encoder": 46_944,
        "decoder": 101_985,
        "all": 232_737,
        "none": 0,
    }
    # The published figures (~46.5k, ~46.2k, ~46.6k, ~101.6k) count the convolutions only.
    conv_only = {
        name: n_params(p for m in group_module_names(mv2d, name) for p in mv2d.get_submodule(m).parameters())
        for name in AUTHORS_GROUPS
    }
    assert conv_only == {"shallow": 46_529, "deep": 46_208, "encoder": 46_560, "decoder": 101_601}
    for name, published in {"shallow": 46_500, "deep": 46_200, "encoder": 46_600, "decoder": 101_600}.items():
        assert abs(conv_only[name] - published) / published < 0.001


def test_group_aliases(mv2d: MultiViewUNet) -> None:
    for alias, name in {"top": "shallow", "bottom": "deep", "left": "encoder", "right": "decoder"}.items():
        assert group_module_names(mv2d, alias) == group_module_names(mv2d, name)
    with pytest.raises(ValueError, match="has no module group .middle.; it has: shallow, deep"):
        group_parameters(mv2d, "middle")


def test_group_module_names(mv2d: MultiViewUNet) -> None:
    assert group_module_names(mv2d, "shallow") == [
        "M1.DoubleConv.0",
        "M1.DoubleConv.3",
        "M3.TripleOut.0",
        "M3.TripleOut.3",
        "M3.TripleOut.6",
    ]
    assert group_module_names(mv2d, "deep") == [
        "down_list.1.M1.DoubleConv.0",
        "down_list.1.M1.DoubleConv.3",
        "up_list.0.M1.DoubleConv.0",
        "up_list.0.M1.DoubleConv.3",
    ]
    assert len(group_module_names(mv2d, "all")) == 22
    assert group_module_names(mv2d, "none") == []
    bns = group_module_names(mv2d, "encoder", types=(nn.BatchNorm2d,))
    assert bns == [
        "M1.DoubleConv.1",
        "M1.DoubleConv.4",
        "down_list.0.M1.DoubleConv.1",
        "down_list.0.M1.DoubleConv.4",
        "down_list.1.M1.DoubleConv.1",
        "down_list.1.M1.DoubleConv.4",
    ]


@pytest.mark.parametrize("group", ["shallow", "deep", "encoder", "decoder", "all", "none"])
def test_set_trainable_exactly_the_group(group: str) -> None:
    model = MultiViewUNet(spatial_dims=2, width=4)
    set_trainable(model, "none")
    set_trainable(model, group)
    prefixes = module_groups(model)[group]
    expected = {n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in prefixes)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert {id(p) for p in group_parameters(model, group)} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    if group == "encoder":
        # Norm affine parameters follow their module; M2 skips stay frozen.
        assert model.M1.DoubleConv[1].weight.requires_grad
        assert not model.down_list[0].M2.TripleDia[0].weight.requires_grad
        assert not model.M3.TripleOut[6].weight.requires_grad


def test_set_trainable_gradients_reach_only_the_group() -> None:
    torch.manual_seed(0)
    model = MultiViewUNet(spatial_dims=2, width=4)
    set_trainable(model, "deep")
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_generic_model_has_only_all_and_none() -> None:
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU(), nn.Conv3d(2, 1, 1))
    assert module_groups(model) == {"all": [""], "none": []}
    assert group_module_names(model, "all") == ["0", "2"]
    set_trainable(model, "none")
    assert not any(p.requires_grad for p in model.parameters())
    set_trainable(model, "all")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="no module group 'shallow'"):
        set_trainable(model, "shallow")


# ---------------------------------------------------------------------------------------- validation


def test_non_divisible_size_error() -> None:
    model = MultiViewUNet(spatial_dims=3, level=2, width=4, kernel_size=(3, 3, 1), pool_size=(2, 2, 1))
    # The slice axis is not pooled, so 7 slices are fine; 30 is not a multiple of 4.
    with pytest.raises(ValueError, match=r"divisible by \(4, 4, 1\), got \(30, 32, 7\)"):
        model(torch.randn(1, 1, 30, 32, 7))
    with pytest.raises(ValueError, match="expects a 5-D tensor"):
        model(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"level": 0}, "level"),
        ({"kernel_size": (3, 2)}, "odd"),
        ({"pool_size": (2, 2, 2)}, "one value per spatial axis"),
        ({"norm": "group"}, "norm"),
        ({"upsample": "deconv"}, "upsample"),
        ({"init": "kaiming"}, "init"),
        ({"dilations": ()}, "dilations"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MultiViewUNet(**{"spatial_dims": 2, **kwargs})


def test_nearest_upsample_and_instance_norm_same_parameter_count(mv2d: MultiViewUNet) -> None:
    model = MultiViewUNet(spatial_dims=2, norm="instance", upsample="nearest")
    assert n_params(model.parameters()) == n_params(mv2d.parameters())
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 1, 16, 16)


# ------------------------------------------------------------------------------------------ registry


def test_list_models() -> None:
    names = list_models()
    assert names == sorted(names)
    assert {"mv_unet", "unet", "dynunet", "segresnet", "swin_unetr"} <= set(names)
    assert list_models("*unet*") == [n for n in names if "unet" in n]


TINY = [
    ("mv_unet", {"spatial_dims": 2, "width": 8}, (1, 1, 32, 32)),
    ("mv_unet", {"width": 4, "kernel_size": (3, 3, 1), "pool_size": (2, 2, 1)}, (1, 1, 16, 16, 4)),
    ("unet", {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1}, (1, 1, 16, 16, 16)),
    ("unet", {"spatial_dims": 2, "channels": (4, 8), "strides": (2,), "out_channels": 2}, (1, 1, 16, 16)),
    ("dynunet", {"strides": (1, (2, 2, 1), (2, 2, 1)), "filters": (4, 8, 16)}, (1, 1, 16, 16, 4)),
    ("segresnet", {"blocks_down": (1, 1, 1), "blocks_up": (1, 1)}, (1, 1, 16, 16, 16)),
    # 64 and not 32: five 2x stages must leave more than one voxel for SwinUNETR's instance norm.
    ("swin_unetr", {"feature_size": 12, "depths": (1, 1, 1, 1)}, (1, 1, 64, 64, 64)),
]


@pytest.mark.parametrize(("name", "kwargs", "shape"), TINY, ids=[t[0] for t in TINY])
def test_create_model_forward(name: str, kwargs: dict, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    if name == "swin_unetr" and not optional_import("einops")[1]:
        with pytest.raises(ImportError, match="einops"):
            create_model(name, **kwargs)
        pytest.skip("einops is not installed: checked the build-time error instead")
    model = create_model(name, **kwargs).eval()
    with torch.no_grad():
        y = model(torch.randn(*shape))
    out_channels = kwargs.get("out_channels", 1)
    assert y.shape == (shape[0], out_channels, *shape[2:])


def test_create_model_passes_kwargs_through() -> None:
    model = create_model("mv_unet", spatial_dims=2, level=3, width=4)
    assert isinstance(model, MultiViewUNet)
    assert (model.spatial_dims, model.level, model.width) == (2, 3, 4)
    with pytest.raises(TypeError):
        create_model("unet", no_such_argument=1)


def test_unknown_model_lists_available() -> None:
    with pytest.raises(ValueError, match="unknown model 'vnet'") as info:
        create_model("vnet")
    for name in ["dynunet", "mv_unet", "segresnet", "swin_unetr", "unet"]:
        assert name in str(info.value)


def test_register_model() -> None:
    @register_model("_test_tiny")
    def tiny(channels: int = 3) -> nn.Module:
        return nn.Conv2d(1, channels, 1)

    try:
        assert "_test_tiny" in list_models()
        assert create_model("_test_tiny", channels=5).out_channels == 5
        with pytest.raises(ValueError, match="already registered"):
            register_model("_test_tiny")(lambda: nn.Identity())
        register_model("_test_tiny", overwrite=True)(lambda: nn.Identity())
        assert isinstance(create_model("_test_tiny"), nn.Identity)
    finally:
        registry_mod._MODELS.pop("_test_tiny", None)
    assert "_test_tiny" not in list_models()
