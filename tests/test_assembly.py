"""The one model assembly (medlora.assembly): seeded builds equal the hand-made construction, what trains per
module group / adapter, group: targets, the weightless (meta) build, the JSON record, adapter files onto a base,
and one-line errors.

The reference network is always put together by hand from the pieces (the MultiViewUNet class itself, a plain
load_state_dict, inject with explicit layer names, requires_grad set from the authors' group prefixes written out
here), not through the registry or the group helpers that build_model uses.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from medlora.adapters import AdapterConfig, AdapterFileError, inject, iter_adapters, save_adapter
from medlora.assembly import ModelSpec, ModelSpecError, build_architecture, build_model, load_adapter_onto
from medlora.models import MultiViewUNet

ARCH = {"level": 1, "width": 4}
# The authors' groups of a level-1 MV-UNet written out (tune_cv.py::freeze_layers, right/top): module prefixes.
DECODER = ("up_list.0.M1", "M3")
SHALLOW = ("M1", "M3")

pytestmark = pytest.mark.usefixtures("one_thread")


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> str:
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("base") / "base.pt"
    torch.save(MultiViewUNet(spatial_dims=3, **ARCH).state_dict(), path)
    return str(path)


def decoder_convs(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, nn.Conv3d) and under(n, DECODER)]


CASES = {
    # name: (spec fields, adapter targets written out for the reference (None: no adapter), trainable prefixes)
    "full": ({}, None, ("",)),
    "module_decoder": ({"finetune": "decoder"}, None, DECODER),
    "module_union": ({"finetune": "shallow+decoder"}, None, SHALLOW + DECODER),
    "nothing": ({"finetune": "none"}, None, ()),
    "lora_group_targets": ({"adapter": {"method": "lora", "rank": 2, "targets": ["group:decoder"],
                                        "exclude": ["M3.TripleOut.6"]}}, "decoder", ()),
    "dora_c_plus_group": ({"adapter": {"method": "dora_c", "rank": 1, "target_types": ["Conv3d"],
                                       "exclude": ["M3.TripleOut.6"]}, "finetune": "shallow"}, "convs", SHALLOW),
}


@pytest.mark.filterwarnings("ignore:.*adapter parameters >= the layer")
@pytest.mark.parametrize("case", sorted(CASES))
def test_seeded_build_equals_the_hand_made_construction(case, base_file):
    fields, adapter_layers, trainable = CASES[case]
    spec = ModelSpec("mv_unet", dict(ARCH), 3, pretrained=base_file if fields else None, **fields)
    torch.manual_seed(7)
    net = build_model(spec)

    torch.manual_seed(7)
    ref = MultiViewUNet(spatial_dims=3, **ARCH)
    if fields:
        ref.load_state_dict(torch.load(base_file, weights_only=True))
    if adapter_layers is not None:
        names = decoder_convs(ref) if adapter_layers == "decoder" else [
            n for n, m in ref.named_modules() if isinstance(m, nn.Conv3d)]
        names = [n for n in names if n != "M3.TripleOut.6"]
        cfg = {k: v for k, v in fields["adapter"].items() if k not in ("targets", "target_types", "exclude")}
        inject(ref, AdapterConfig(**cfg, targets=[f"re:{re.escape(n)}" for n in names]))
    state, expected = net.state_dict(), ref.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)

    # what trains: adapter parameters (never a frozen W0 outside the group) plus the group's parameters
    wanted = {n for n, _ in ref.named_parameters()
              if (adapter_layers is not None and ".parametrizations.weight.0." in n)
              or any(p == "" or under(n, (p,)) for p in trainable)}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == wanted
    if adapter_layers == "decoder":
        assert sorted(n for n, _, _ in iter_adapters(net)) == sorted(n for n in decoder_convs(ref)
                                                                     if n != "M3.TripleOut.6")
    if case == "full":
        assert len(wanted) == len(list(ref.parameters()))
    if case == "nothing":
        assert not wanted


def test_group_targets_expand_to_the_group_s_layers_and_other_targets_stay():
    spec = ModelSpec("mv_unet", dict(ARCH), adapter=AdapterConfig("lora", rank=1, targets=["group:shallow", "M2.*"]),
                     finetune="none")
    with pytest.warns(UserWarning, match="adapter parameters >= the layer"):  # the 1x1 head
        net = build_model(spec)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv3d)]
    expected = [n for n in convs if under(n, SHALLOW) or n.startswith("M2.")]
    assert [n for n, _, _ in iter_adapters(net)] == expected
    assert "M3.TripleOut.6" in expected and "down_list.0.M1.DoubleConv.0" not in expected
    # the record keeps what the user wrote, not the expansion
    assert spec.to_dict()["adapter"]["targets"] == ["group:shallow", "M2.*"]


def test_meta_build_allocates_nothing_and_checks_groups_and_targets(tmp_path):
    spec = ModelSpec("mv_unet", dict(ARCH), pretrained=str(tmp_path / "not_read.pt"), finetune="shallow",
                     adapter=AdapterConfig("lora", rank=2, targets=["group:decoder"]))
    net = build_architecture(spec)
    params = dict(net.named_parameters())
    assert params and all(p.is_meta for p in params.values())
    assert not list(iter_adapters(net))  # no adapters, no base weights: the architecture only
    real = MultiViewUNet(spatial_dims=3, **ARCH)
    assert {n: p.shape for n, p in params.items()} == {n: p.shape for n, p in real.named_parameters()}

    with pytest.raises(ModelSpecError, match=r"^model\.finetune: MultiViewUNet has no module group 'decodr'"):
        build_architecture(ModelSpec("mv_unet", dict(ARCH), finetune="decodr"))
    with pytest.raises(ModelSpecError, match=r"^model\.adapter\.targets: group:encodr: .*no module group 'encodr'"):
        build_architecture(ModelSpec("mv_unet", dict(ARCH), adapter=AdapterConfig("lora", targets=["group:encodr"])))
    with pytest.raises(ModelSpecError, match=r"^model\.adapter: no layer matches targets=\['nothing\.here'\]"):
        build_architecture(ModelSpec("mv_unet", dict(ARCH), adapter=AdapterConfig("lora", targets=["nothing.here"])))


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.filterwarnings("ignore:.*adapter parameters >= the layer")
def test_bad_backbone_group_and_record_are_one_line_errors(base_file):
    with pytest.raises(ModelSpecError) as exc:
        build_model(ModelSpec("mv_unt"))
    assert one_line(exc).startswith("model.backbone: unknown model 'mv_unt'; available: ") and "mv_unet" in str(
        exc.value)
    with pytest.raises(ModelSpecError) as exc:
        build_model(ModelSpec("mv_unet", {"levle": 1}))
    assert one_line(exc).startswith("model.backbone_args: cannot build 'mv_unet' with {'levle': 1}: ")
    assert "levle" in str(exc.value).split(": ", 2)[2]
    for fields in ({"finetune": "decodr"}, {"finetune": "decodr", "adapter": AdapterConfig("lora", rank=1)}):
        with pytest.raises(ModelSpecError) as exc:
            build_model(ModelSpec("mv_unet", dict(ARCH), pretrained=base_file, **fields))
        assert one_line(exc).startswith("model.finetune: MultiViewUNet has no module group 'decodr'; it has: shallow")
    with pytest.raises(ModelSpecError, match=r"^model\.spatial_dims: must be 2 or 3, got 4$"):
        ModelSpec(spatial_dims=4)
    with pytest.raises(ModelSpecError, match=r"^model\.adapter: unknown adapter method 'lroa'"):
        ModelSpec(adapter={"method": "lroa"})
    with pytest.raises(ModelSpecError, match=r"^model\.training_rule: unknown training rule 'lora_pr0'"):
        ModelSpec(adapter=AdapterConfig("lora"), training_rule="lora_pr0")
    with pytest.raises(ModelSpecError, match=r"^model\.training_rule_options: unknown option\(s\) nonsense for "
                                             r"training rule 'ffa'; valid: "):
        ModelSpec(adapter=AdapterConfig("lora"), training_rule="ffa", training_rule_options={"nonsense": 1})
    with pytest.raises(ModelSpecError, match=r"^model: unknown key 'backbnoe' \(valid: backbone, backbone_args, "):
        ModelSpec.from_dict({"backbnoe": "mv_unet"})


def test_record_is_json_and_round_trips():
    spec = ModelSpec("mv_unet", {"level": 1, "width": 4, "kernel_size": (3, 3, 1)}, 3, pretrained="base.pt",
                     adapter=AdapterConfig("salt", rank=2, targets=["group:decoder"], options={"svd_rank": 1},
                                           options_pattern={"M3.*": {"svd_rank": 2}}),
                     finetune="shallow", training_rule="ffa", training_rule_options={"weight_decay": 0.1})
    record = spec.to_dict()
    assert json.loads(json.dumps(record)) == record
    assert record["backbone_args"]["kernel_size"] == [3, 3, 1]  # JSON has no tuples
    assert set(record) == {"backbone", "backbone_args", "spatial_dims", "pretrained", "adapter", "finetune",
                           "training_rule", "training_rule_options"}
    again = ModelSpec.from_dict(json.loads(json.dumps(record)))
    assert again.to_dict() == record and again.adapter == spec.adapter and again.finetune == "shallow"
    assert ModelSpec.from_dict(ModelSpec().to_dict()) == ModelSpec()
    assert ModelSpec().trains_group == "all" and ModelSpec(adapter=AdapterConfig("lora")).trains_group == "none"


def test_adapter_file_onto_a_built_base(base_file, tmp_path):
    spec = ModelSpec("mv_unet", dict(ARCH), pretrained=base_file)
    base = build_model(spec).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    trained = build_model(ModelSpec("mv_unet", dict(ARCH), pretrained=base_file,
                                    adapter=AdapterConfig("cp_dora", rank=2, target_types=["Conv3d"],
                                                          exclude=["M3.TripleOut.6"])))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    path = save_adapter(trained, tmp_path / "a.safetensors")
    trained.eval()
    x = torch.rand(1, 1, 16, 16, 8)

    merged = load_adapter_onto(base, path)
    assert not list(iter_adapters(merged))  # plain layers only
    kept = load_adapter_onto(base, path, merge_weights=False)
    assert len(list(iter_adapters(kept))) == len(list(iter_adapters(trained)))
    with torch.no_grad():
        reference = trained(x)
        assert torch.allclose(merged.eval()(x), reference, atol=1e-6)
        assert torch.allclose(kept.eval()(x), reference, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the base is untouched

    torch.manual_seed(99)
    other = build_model(ModelSpec("mv_unet", dict(ARCH)))
    with pytest.raises(AdapterFileError) as exc:
        load_adapter_onto(other, path)
    assert one_line(exc).startswith(f"{path}: base weights differ")


def test_device_moves_the_built_network():
    net = build_model(ModelSpec("mv_unet", dict(ARCH)), device="meta")
    assert all(p.is_meta for p in net.parameters())
