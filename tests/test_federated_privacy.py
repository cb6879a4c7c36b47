"""DP-SGD per patient: clipped per-case gradients against torch.func per-sample gradients of an independent
functional model, the noise scale, the accountant, the config's refusals, and a private FFA federation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("flwr")  # the optional extra `federated` (make setup installs it)
from test_federated_run import sites, write_config  # noqa: F401  (the module-scoped sites fixture)
from torch import nn
from torch.func import grad, vmap

from medlora.adapters import AdapterConfig, inject, iter_adapters
from medlora.federated.config import FederatedConfigError, load_federated_config
from medlora.federated.federation import run_federate
from medlora.federated.privacy import dp_step, epsilon, poisson_batch


def _ffa_layer():
    torch.manual_seed(0)
    model = inject(nn.Sequential(nn.Conv3d(2, 3, 3, padding=1)), AdapterConfig("lora", rank=2, alpha=2.0))
    (_, layer, reparam), = iter_adapters(model)
    reparam.lora_A.requires_grad_(False)
    with torch.no_grad():
        reparam.lora_B.normal_()
    return model, layer, reparam


def test_clipped_per_case_gradients_match_torch_func(float64_default):
    model, layer, reparam = _ffa_layer()
    x = torch.randn(5, 2, 4, 4, 4)
    target = torch.randn(5, 3, 4, 4, 4)
    w0 = layer.parametrizations["weight"].original.detach()
    bias, a, s = layer.bias.detach(), reparam.lora_A.detach(), reparam.scaling

    def loss(b, xi, ti):  # the same layer written out: conv3d with W0 + s (B A) reshaped
        w = w0 + s * (b @ a).reshape(w0.shape)
        return ((torch.nn.functional.conv3d(xi[None], w, bias, padding=1) - ti[None]) ** 2).mean()

    per_case = vmap(grad(loss), in_dims=(None, 0, 0))(reparam.lora_B.detach(), x, target)
    norms = per_case.flatten(1).norm(dim=1)
    ordered = norms.sort().values
    clip = float(ordered[1] + ordered[2]) / 2  # some cases clipped, some not
    reference = (per_case * torch.clamp(clip / norms, max=1.0)[:, None, None]).sum(0) / 2.5
    closures = [lambda i=i: ((model(x[i:i + 1]) - target[i:i + 1]) ** 2).mean() for i in range(5)]
    dp_step([reparam.lora_B], closures, clip, 0.0, 2.5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(reparam.lora_B.grad, reference, rtol=1e-10, atol=1e-12)
    assert (norms > clip).any() and (norms < clip).any()  # both clipped and unclipped cases


def test_noise_has_the_dp_scale():
    p = nn.Parameter(torch.zeros(4000))
    dp_step([p], [], max_grad_norm=0.3, noise_multiplier=2.0, expected_batch=4.0,
            generator=torch.Generator().manual_seed(1))
    assert float(p.grad.std()) == pytest.approx(2.0 * 0.3 / 4.0, rel=0.05)
    assert abs(float(p.grad.mean())) < 0.01
    draws = [len(poisson_batch(10, 0.3, torch.Generator().manual_seed(k))) for k in range(400)]
    assert np.mean(draws) == pytest.approx(3.0, rel=0.1) and min(draws) < 3 < max(draws)


def test_epsilon_from_the_rdp_accountant():
    from opacus.accountants.utils import get_noise_multiplier

    sigma = get_noise_multiplier(target_epsilon=4.0, target_delta=1e-3, sample_rate=0.25, steps=40,
                                 accountant="rdp", epsilon_tolerance=0.001)
    assert epsilon(40, sigma, 0.25, 1e-3) == pytest.approx(4.0, abs=0.02)
    assert epsilon(0, sigma, 0.25, 1e-3) == 0.0 < epsilon(10, sigma, 0.25, 1e-3) < epsilon(40, sigma, 0.25, 1e-3)


def test_dp_config_refuses_batch_coupled_losses(sites, tmp_path):  # noqa: F811
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 0.001}
    for train, message in (({"loss": "soft_dice"}, "couples the samples of a batch"),
                           ({"norm_stats": "update"}, "BatchNorm statistics updated in training")):
        path = write_config(tmp_path / "dp.yaml", sites, dp=dp, model=train)
        with pytest.raises(FederatedConfigError, match=message):
            load_federated_config(path)
    data = yaml.safe_load(write_config(tmp_path / "dp.yaml", sites, dp=dp).read_text(encoding="utf-8"))
    data["data"]["samples_per_volume"] = 2
    (tmp_path / "dp.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(FederatedConfigError, match="the privacy unit is a case"):
        load_federated_config(tmp_path / "dp.yaml")


def test_private_ffa_federation_reports_epsilon_per_site(sites, tmp_path):  # noqa: F811
    path = write_config(tmp_path / "dp.yaml", sites, dp={"noise_multiplier": 1.0, "max_grad_norm": 1.0,
                                                         "delta": 0.001})
    assert run_federate(str(path), str(tmp_path / "run")) == 0
    history = json.loads((tmp_path / "run" / "ffa" / "history.json").read_text(encoding="utf-8"))
    eps = {r: {s: m["epsilon"] for s, m in v.items()} for r, v in history["train_metrics"].items()}
    assert set(eps["2"]) == {"A", "B"}
    assert all(0 < eps["1"][s] < eps["2"][s] for s in ("A", "B"))  # privacy spent accumulates over rounds
    assert history["exact"] is True
    assert "epsilon per site" in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
