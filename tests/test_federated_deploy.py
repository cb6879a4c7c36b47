"""Flower's deployment engine on localhost: a SuperLink, two SuperNodes (one per site) and `flwr run` of
deploy/flower (deploy/flower/run_local.sh) give the same federation as `medlora federate` in one process.

Flower 1.42 starts a fresh ClientApp process for every message (torch imported, the site built), so even
2 sites x 1 round takes minutes on a shared 2-core machine (docs/federated.md): the test runs only with
MEDLORA_TEST_DEPLOYMENT=1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("flwr")
pytestmark = pytest.mark.skipif(os.environ.get("MEDLORA_TEST_DEPLOYMENT") != "1",
                                reason="minutes long (a process per Flower message); MEDLORA_TEST_DEPLOYMENT=1")

ROOT = Path(__file__).resolve().parents[1]
GRID = {"shape": [48, 48, 16], "spacing": [4.0, 4.0, 10.0]}


def _free_port_block(n: int) -> int:
    """A port whose next ``n`` ports are free too (the SuperLink and one SuperNode per site)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + n > 65535:
            continue
        try:
            for p in range(port, port + n + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port block")


def test_deployment_on_localhost_equals_the_in_process_federation(tmp_path):
    from medlora.federated.federation import run_federate

    config = {
        "name": "deployed", "seed": 0, "rounds": 1, "local_steps": 2,
        "model": {"backbone": "mv_unet", "backbone_args": {"level": 1, "width": 4}, "lr": 0.05, "norm_stats": "freeze",
                  "adapter": {"method": "lora", "rank": 2, "target_types": ["Conv3d"], "exclude": ["M3.TripleOut.6"]}},
        "data": {"patch_size": [32, 32, 16], "batch_size": 1, "samples_per_volume": 1},
        "sites": [{"name": "A", "phantoms": {"cases": 2, "seed": 11, **GRID}, "heldout": 1},
                  {"name": "B", "phantoms": {"cases": 3, "seed": 12, "hu_offset": 10.0, **GRID}, "heldout": 1}],
        "strategies": [{"name": "fedit"}], "baselines": [],
    }
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "PYTHON": sys.executable, "PORT": str(_free_port_block(2)),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["bash", str(ROOT / "deploy" / "flower" / "run_local.sh"), str(path),
                           str(tmp_path / "deployed")], env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    deployed = json.loads((tmp_path / "deployed" / "fedit" / "history.json").read_text(encoding="utf-8"))
    assert run_federate(str(path), str(tmp_path / "local")) == 0
    local = json.loads((tmp_path / "local" / "fedit" / "history.json").read_text(encoding="utf-8"))
    # the same sites, seeds and aggregation: every round's per-case rows and training losses are equal, to float
    # precision (Flower's processes may sum in another order: 1e-7 relative differences were seen in soft Dice)
    assert set(deployed["evaluations"]["1"]) == {"A", "B"}
    assert deployed["evaluations"].keys() == local["evaluations"].keys()
    for rnd, per_site in local["evaluations"].items():
        assert deployed["evaluations"][rnd].keys() == per_site.keys()
        for site, result in per_site.items():
            for got, want in zip(deployed["evaluations"][rnd][site]["rows"], result["rows"], strict=True):
                assert got["case_id"] == want["case_id"]
                for key in ("TP", "FP", "FN", "n_pred"):
                    assert got[key] == want[key]
                assert got["soft_Dice"] == pytest.approx(want["soft_Dice"], rel=1e-5)
    losses = {r: {s: m["train_loss"] for s, m in v.items()} for r, v in deployed["train_metrics"].items()}
    assert losses == {r: {s: pytest.approx(m["train_loss"], rel=1e-5) for s, m in v.items()}
                      for r, v in local["train_metrics"].items()}
    assert (tmp_path / "deployed" / "fedit" / "global_adapter.safetensors").is_file()
