"""PEFT 0.21's vera, randlora and unilora formats: same tensors, same outputs, both directions."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from medlora.adapters import AdapterConfig, export_peft, import_peft, inject, iter_adapters
from medlora.adapters.shared import shared_of

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 10)
        self.b = nn.Linear(10, 4)
        self.c = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def base_net() -> Net:
    torch.manual_seed(0)
    return Net()


X = torch.randn(7, 6, generator=torch.Generator().manual_seed(5))

MEDLORA = {
    "vera": dict(rank=3, options={"seed": 7}),
    "randlora": dict(rank=3, alpha=12.0, options={"seed": 7}),
    "unilora": dict(rank=2, options={"theta_d_length": 24, "seed": 3}),
}


def peft_config(method: str, **extra):
    common = dict(target_modules=["a", "b"], **extra)
    if method == "vera":
        return peft.VeraConfig(r=3, projection_prng_key=7, **common)
    if method == "randlora":
        return peft.RandLoraConfig(r=3, randlora_alpha=12, projection_prng_key=7, **common)
    return peft.UniLoraConfig(r=2, theta_d_length=24, proj_seed=3, **common)


def perturb(params, seed: int = 11) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def from_pretrained(directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base_net(), str(directory)).eval()


@pytest.mark.parametrize("method", list(MEDLORA))
def test_medlora_to_peft_same_outputs(tmp_path, method):
    model = base_net()
    inject(model, AdapterConfig(method, targets=["a", "b"], **MEDLORA[method]))
    perturb(p for p in model.parameters() if p.requires_grad)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == method.upper()
    loaded = from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(loaded(X), base_net()(X), atol=1e-3)


@pytest.mark.parametrize("method", list(MEDLORA))
@pytest.mark.parametrize("save_shared", [True, False])
def test_peft_to_medlora_same_outputs(tmp_path, method, save_shared):
    extra = {"save_indices": save_shared} if method == "unilora" else {"save_projection": save_shared}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(base_net(), peft_config(method, **extra)).eval()
    perturb(p for p in reference.parameters() if p.requires_grad)
    reference.save_pretrained(str(tmp_path))
    model = import_peft(base_net(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference(X), rtol=1e-5, atol=1e-6)
    names = [n for n, _, _ in iter_adapters(model)]
    assert names == ["a", "b"]
    shared = shared_of(next(iter_adapters(model))[2])
    assert all(shared_of(r) is shared for _, _, r in iter_adapters(model))


def test_seeded_bases_equal_peft(tmp_path):
    """Without saved bases both libraries draw the same numbers from the same seed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vera = peft.get_peft_model(base_net(), peft_config("vera"))
        rand = peft.get_peft_model(base_net(), peft_config("randlora"))
    ours = base_net()
    inject(ours, AdapterConfig("vera", targets=["a", "b"], **MEDLORA["vera"]))
    shared = shared_of(next(iter_adapters(ours))[2])
    assert torch.equal(shared.vera_A, vera.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, vera.base_model.vera_B["default"])
    ours = base_net()
    inject(ours, AdapterConfig("randlora", targets=["a", "b"], **MEDLORA["randlora"]))
    shared = shared_of(next(iter_adapters(ours))[2])
    assert torch.equal(shared.randlora_A, rand.base_model.randlora_A["default"].float())
    assert torch.equal(shared.randlora_B, rand.base_model.randlora_B["default"].float())


def test_conv_layers_do_not_export(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 4))
    inject(model, AdapterConfig("vera", rank=2))
    with pytest.raises(ValueError, match="Linear and transformers' Conv1D only"):
        export_peft(model, tmp_path)


def test_two_inject_calls_do_not_export(tmp_path):
    model = base_net()
    inject(model, AdapterConfig("unilora", targets=["a"], rank=2, options={"theta_d_length": 8}))
    inject(model, AdapterConfig("unilora", targets=["b"], rank=2, options={"theta_d_length": 8}))
    with pytest.raises(ValueError, match="one inject"):
        export_peft(model, tmp_path)


def test_round_trip_through_peft_is_exact(tmp_path):
    model = base_net()
    inject(model, AdapterConfig("unilora", targets=["a", "b"], **MEDLORA["unilora"]))
    perturb(p for p in model.parameters() if p.requires_grad)
    export_peft(model, tmp_path / "x")
    again = import_peft(base_net(), tmp_path / "x")
    assert torch.equal(again(X), model(X))
    assert torch.equal(copy.deepcopy(again)(X), model(X))
