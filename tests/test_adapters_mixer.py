"""LoRA-Mixer-style token routing (medlora.adapters.multi.mixer) against references computed by hand."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from medlora.adapters import AdapterConfig, inject, merge, save_adapter
from medlora.adapters.multi import (
    MixerLinear,
    MultiAdapterError,
    attach_mixer,
    fix_gates,
    mixer_balance_loss,
    mixer_log_prob,
    mixer_stats,
    specialisation_balance_loss,
)
from medlora.llm import TinyLM, TinyLMConfig
from medlora.models.sam import SamSegmenter

TARGETS = ["q", "k", "v", "o"]


def _tiny_lm() -> TinyLM:
    return TinyLM(TinyLMConfig(context=8, dim=16, n_layers=1, n_heads=2, mlp_ratio=2)).eval()


def _expert(base: nn.Module, method: str, rank: int, targets=TARGETS, **options) -> nn.Module:
    """An adapted copy of ``base`` with a non-zero update (B is zero at initialisation)."""
    model = inject(copy.deepcopy(base), AdapterConfig(method, rank=rank, alpha=2 * rank, targets=targets,
                                                      options=options))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _layer_reference(mixer: MixerLinear, expert_layers, x: torch.Tensor, weights: np.ndarray) -> np.ndarray:
    """``W0 x + b + sum_e w_e (expert_e(x) - W0 x - b)`` with each expert's own adapted layer, one at a time."""
    with torch.no_grad():
        base = mixer.base(x).numpy()
        out = base.copy()
        for e, layer in enumerate(expert_layers):
            out += weights[..., e:e + 1] * (layer(x).numpy() - base)
    return out


def _router_logits(mixer: MixerLinear, x: torch.Tensor) -> np.ndarray:
    w, b = mixer.router.weight.detach().numpy(), mixer.router.bias.detach().numpy()
    return x.numpy() @ w.T + b


def test_soft_mixer_equals_loop_over_experts_with_gate_weights():
    base = _tiny_lm()
    experts = [_expert(base, "lora", 2), _expert(base, "pissa", 3)]  # unequal ranks (padding), two-term PiSSA
    model = attach_mixer(copy.deepcopy(base), experts, targets=TARGETS)
    mixer = model.blocks[0].attn.v
    with torch.no_grad():
        mixer.router.weight.normal_(std=1.0)
        mixer.router.bias.normal_()
    x = torch.randn(3, 5, 16)
    gates = _np_softmax(_router_logits(mixer, x))
    ref = _layer_reference(mixer, [e.blocks[0].attn.v for e in experts], x, gates)
    with torch.no_grad():
        got = mixer(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ref, mixer.base(x).detach().numpy(), atol=1e-3)  # the experts do change the layer


@pytest.mark.parametrize("which", [0, 1])
def test_one_hot_gate_equals_that_adapter_merged_into_the_base(which):
    base = _tiny_lm()
    experts = [_expert(base, "lora", 2), _expert(base, "lora", 4)]
    model = attach_mixer(copy.deepcopy(base), experts, targets=TARGETS)
    fix_gates(model, [1.0 if e == which else 0.0 for e in range(2)])
    merged = merge(copy.deepcopy(experts[which]))
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), merged(tokens), rtol=1e-5, atol=1e-5)
        fix_gates(model, None)  # the router again: not one expert alone
        assert not torch.allclose(model(tokens), merged(tokens), atol=1e-4)


def test_sam_fused_qkv_and_proj_one_hot_equals_merged_adapter():
    base = SamSegmenter("tiny", image_size=32).eval()
    targets = ["image_encoder.blocks.*.attn.qkv", "image_encoder.blocks.*.attn.proj"]
    samed = _expert(base, "lora", 2, targets=targets[:1], fused_outputs=3, adapt_outputs=[0, 2])  # q/v only
    plain = _expert(base, "lora", 2, targets=targets)
    model = attach_mixer(copy.deepcopy(base), [samed, plain], targets=["attn.qkv", "attn.proj"])
    assert isinstance(model.image_encoder.blocks[0].attn.qkv, MixerLinear)
    x = torch.rand(2, 1, 32, 32)
    for which, expert in enumerate([samed, plain]):
        fix_gates(model, [1.0 - which, float(which)])
        with torch.no_grad():
            torch.testing.assert_close(model(x), merge(copy.deepcopy(expert))(x), rtol=1e-4, atol=1e-4)


def test_balance_loss_equals_direct_numpy_computation():
    logits = torch.randn(2, 4, 3, dtype=torch.float64)
    probs = torch.softmax(logits, dim=-1)
    p = probs.reshape(-1, 3).numpy()
    pbar = p.mean(axis=0)
    balance_np = math.log(3) + float((pbar * np.log(pbar)).sum())
    specialisation_np = float(-(p * np.log(p)).sum(axis=1).mean())
    got = specialisation_balance_loss(probs, balance=0.7, specialisation=0.2)
    assert got.item() == pytest.approx(0.7 * balance_np + 0.2 * specialisation_np, rel=1e-12)
    # The two failure modes each cost log E: every token on one expert, or every token undecided.
    collapse = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    undecided = torch.full((4, 3), 1 / 3)
    assert specialisation_balance_loss(collapse).item() == pytest.approx(math.log(3))
    assert specialisation_balance_loss(undecided).item() == pytest.approx(math.log(3))
    specialised = torch.eye(3).repeat(2, 1)  # each token sure, the experts used equally
    assert specialisation_balance_loss(specialised).item() == pytest.approx(0.0, abs=1e-12)


def test_topk_equal_and_renormalised_topk_gates():
    base = _tiny_lm()
    experts = [_expert(base, "lora", 2, targets=["q"]) for _ in range(3)]
    model = attach_mixer(copy.deepcopy(base), experts, targets=["q"], routing="topk_equal", k=2)
    mixer = model.blocks[0].attn.q
    with torch.no_grad():
        mixer.router.weight.normal_(std=1.0)
    x = torch.randn(6, 16)
    logits = _router_logits(mixer, x)
    top2 = np.argsort(-logits, axis=1)[:, :2]
    equal = np.zeros_like(logits)
    np.put_along_axis(equal, top2, 0.5, axis=1)
    layers = [e.blocks[0].attn.q for e in experts]
    with torch.no_grad():
        np.testing.assert_allclose(mixer(x).numpy(), _layer_reference(mixer, layers, x, equal), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mixer.last_gates.numpy(), equal)
    mixer.set_routing("topk", k=2)
    soft = _np_softmax(logits)
    kept = np.where(equal > 0, soft, 0.0)
    kept /= kept.sum(axis=1, keepdims=True)
    with torch.no_grad():
        np.testing.assert_allclose(mixer(x).numpy(), _layer_reference(mixer, layers, x, kept), rtol=1e-5, atol=1e-5)
    with pytest.raises(MultiAdapterError, match="1 <= k <= 3"):
        mixer.set_routing("topk", k=4)


@pytest.mark.parametrize("train_experts", [False, True])
def test_plug_and_play_trains_only_the_routers(train_experts):
    base = _tiny_lm()
    model = attach_mixer(copy.deepcopy(base), [_expert(base, "lora", 2), _expert(base, "lora", 2)],
                         targets=TARGETS, train_experts=train_experts).train()
    tokens = torch.randint(0, 256, (2, 8))
    loss = model(tokens).logsumexp(-1).mean() + mixer_balance_loss(model)
    loss.backward()
    routers = {n for n, _ in model.named_parameters() if ".router." in n}
    experts = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert len(routers) == 8 and len(experts) == 8
    for name, p in model.named_parameters():
        if name in routers or (train_experts and name in experts):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_effective_experts_show_collapse_and_spread():
    base = _tiny_lm()
    model = attach_mixer(copy.deepcopy(base), [_expert(base, "lora", 2, targets=["q"]) for _ in range(3)],
                         targets=["q"])
    mixer = model.blocks[0].attn.q
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        mixer.router.weight.zero_()
        mixer.router.bias.copy_(torch.tensor([30.0, 0.0, 0.0]))  # every token on expert 0: collapse
        model(tokens)
        stats = mixer_stats(model)["blocks.0.attn.q"]
        assert stats["effective"] == pytest.approx(1.0, abs=1e-6)
        assert stats["usage_effective"] == pytest.approx(1.0, abs=1e-6)
        mixer.router.bias.zero_()  # every token undecided
        model(tokens)
        assert mixer_stats(model)["blocks.0.attn.q"]["effective"] == pytest.approx(3.0, abs=1e-6)


def test_adapter_files_as_experts_and_refusals(tmp_path):
    base = _tiny_lm()
    expert = _expert(base, "lora", 2)
    path = save_adapter(expert, tmp_path / "a.safetensors")
    model = attach_mixer(copy.deepcopy(base), [path, expert], targets=TARGETS)
    fix_gates(model, [1.0, 0.0])
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), merge(copy.deepcopy(expert))(tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(MultiAdapterError, match="dora update is not a low-rank product"):
        attach_mixer(copy.deepcopy(base), [_expert(base, "dora", 2)], targets=TARGETS)
    other = _expert(_tiny_lm(), "lora", 2)  # another random base
    with pytest.raises(MultiAdapterError, match="another base"):
        attach_mixer(copy.deepcopy(base), [other], targets=TARGETS)
    with pytest.raises(MultiAdapterError, match="no layer adapted by the experts matches"):
        attach_mixer(copy.deepcopy(base), [expert], targets=["fc1"])
    with pytest.warns(UserWarning, match="outside the targets are dropped"):
        attach_mixer(copy.deepcopy(base), [expert], targets=["q"])


def test_mixer_model_copies_after_a_training_forward_and_trains_experts_from_their_values():
    base = _tiny_lm()
    expert = _expert(base, "lora", 2)
    model = attach_mixer(copy.deepcopy(base), [expert], targets=TARGETS, train_experts=True).train()
    tokens = torch.randint(0, 256, (2, 8))
    with pytest.raises(MultiAdapterError, match="no mixer layer has run a forward"):
        mixer_balance_loss(model)
    model(tokens).sum().backward()  # the layers now hold probabilities with an autograd graph
    twin = copy.deepcopy(model)
    fix_gates(twin, [1.0])
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(tokens), merge(copy.deepcopy(expert))(tokens), rtol=1e-5, atol=1e-5)


def test_default_targets_route_linear_layers_and_leave_convolutions():
    base = SamSegmenter("tiny", image_size=32).eval()
    expert = _expert(base, "lora", 2, targets=["image_encoder.patch_embed.proj", "image_encoder.blocks.0.attn.qkv"])
    with pytest.warns(UserWarning, match=r"patch_embed\.proj"):
        model = attach_mixer(copy.deepcopy(base), [expert])
    assert [n for n, m in model.named_modules() if isinstance(m, MixerLinear)] == ["image_encoder.blocks.0.attn.qkv"]
    with pytest.raises(MultiAdapterError, match="nn.Linear layers only; 'image_encoder.patch_embed.proj' is a Conv2d"):
        attach_mixer(copy.deepcopy(base), [expert], targets=["patch_embed.proj"])


def test_mixer_study_script_rows(tmp_path):
    """scripts/mixer_study.py at toy size: the rows the docs table shows, with the routing each row claims."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "mixer_study.py"
    spec = importlib.util.spec_from_file_location("mixer_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    threads = torch.get_num_threads()
    try:
        study.main(["--base-steps", "2", "--expert-steps", "2", "--router-steps", "2", "--context", "16",
                    "--batch-size", "4", "--json", str(tmp_path / "rows.json")])
    finally:
        torch.set_num_threads(threads)
    rows = {r["model"]: r for r in json.loads((tmp_path / "rows.json").read_text())["mean"]}
    assert list(rows)[:4] == ["base", "expert harbour", "expert reports", "uniform average"]
    for d in ("harbour", "reports"):
        assert rows["uniform average"][d]["effective"] == pytest.approx(2.0)
        assert rows["uniform average"][d]["usage_reports"] == pytest.approx(0.5)
        assert rows["router top-1 equal (balance 0.1)"][d]["effective"] == pytest.approx(1.0)
        assert 1.0 < rows["router soft (balance 0)"][d]["effective"] < 2.0
        own = rows[f"expert {d}"][d]
        assert own["ppl"] == pytest.approx(math.exp(own["loss"]))


def test_sampled_equal_routing_and_its_log_probability_per_sample():
    base = _tiny_lm()
    model = attach_mixer(copy.deepcopy(base), [_expert(base, "lora", 2, targets=["q", "v"]) for _ in range(3)],
                         targets=["q", "v"], routing="sample_equal", k=1)
    inputs = {}
    for name, layer in [("q", model.blocks[0].attn.q), ("v", model.blocks[0].attn.v)]:
        with torch.no_grad():
            layer.router.weight.normal_(std=1.0)
        layer.register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, args[0].detach()))
    tokens = torch.randint(0, 256, (3, 8))
    model(tokens)
    want = np.zeros(3)
    for name, layer in [("q", model.blocks[0].attn.q), ("v", model.blocks[0].attn.v)]:
        gates = layer.last_gates.numpy()
        assert set(np.unique(gates)) == {0.0, 1.0} and np.all(gates.sum(-1) == 1)  # one expert per token
        logits = _router_logits(layer, inputs[name])
        log_soft = logits - logits.max(-1, keepdims=True)
        log_soft -= np.log(np.exp(log_soft).sum(-1, keepdims=True))
        want += (log_soft * gates).sum(axis=(1, 2))
    got = mixer_log_prob(model, 3)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5)
    got.sum().backward()
    assert model.blocks[0].attn.q.router.weight.grad.abs().sum() > 0
    model.blocks[0].attn.q.set_routing("sample_equal", k=2)
    model(tokens)
    gates = model.blocks[0].attn.q.last_gates.numpy()
    assert np.all(np.sort(gates, axis=-1)[..., 1:] == 0.5)  # two distinct experts, 1/2 each


def test_expert_with_trained_tensors_outside_its_adapters_is_reported():
    base = _tiny_lm()
    expert = _expert(base, "lora", 2)
    with torch.no_grad():
        expert.norm.weight.add_(1.0)  # a recipe that also unfroze the final norm
    with pytest.warns(UserWarning, match=r"expert 0 also differs from the model outside its adapters \(norm.weight"):
        model = attach_mixer(copy.deepcopy(base), [expert], targets=TARGETS)
    torch.testing.assert_close(model.norm.weight, base.norm.weight)  # the model keeps its own values
