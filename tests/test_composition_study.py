"""``medlora compose`` end to end on a tiny cohort: files, table rows, search budgets, bad input."""

from __future__ import annotations

import json

import pytest

from medlora.cli import main
from medlora.training.composition import run_composition_study

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*adapter parameters >= the layer")]


def test_tiny_study_writes_every_method_and_keeps_the_search_budget(tmp_path):
    r = run_composition_study(tmp_path, types=["sah", "ivh", "sah+ivh"], train_cases=3, test_cases=2, few_cases=1,
                              base_steps=1, adapter_steps=1, budget=3, width=4, rloo_steps=3, log=lambda msg: None)
    assert r["classes"] == ["intraventricular", "subarachnoid"]
    methods = set(r["dice"])
    assert {"single adapter", "composition (probability)", "composition (priority)", "fresh adapter (same few cases)",
            "merge (other classes' adapters)", "merge (pool incl. own adapter)", "merge (random adapters)",
            "router top-1 + composition", "router top-2 + composition", "RLOO router top-1 + composition",
            "RLOO router top-2 + composition"} <= methods
    assert r["routing"]["chosen"]["router top-1 + composition"]["effective_experts"] == pytest.approx(1.0)
    assert r["routing"]["chosen"]["router top-2 + composition"]["mean_adapters"] == 2
    for c in r["classes"]:
        assert r["merges"][c]["others"]["evaluations"] <= 3 and len(r["merges"][c]["others"]["weights"]) == 1
        assert len(r["merges"][c]["all"]["weights"]) == 2
        assert all(abs(w) <= 1.5 for key in ("others", "all", "random") for w in r["merges"][c][key]["weights"])
        assert all(len(r["dice"][m][c]) == 2 for m in methods)
    saved = json.loads((tmp_path / "composition.json").read_text())
    assert saved["classes"] == r["classes"]
    table = (tmp_path / "composition.md").read_text()
    assert "| composition (probability) |" in table and "| merge (random adapters) |" in table
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == [
        "intraventricular.safetensors", "subarachnoid.safetensors"]
    assert sorted(p.name for p in (tmp_path / "compositions").iterdir()) == [
        "output_priority.safetensors", "output_probability.safetensors", "rloo_top1.safetensors",
        "rloo_top2.safetensors", "router_present.safetensors", "router_top1.safetensors", "router_top2.safetensors"]
    assert (tmp_path / "base.safetensors").is_file()
    rloo = r["routing"]["rloo"]["top-1"]
    assert len(rloo["reward"]) == 2 and 0 <= rloo["best_reward"] <= 1 and rloo["effective_experts"][0] <= 2
    assert "RLOO routers" in table and "against composition (probability)" in table
    versus = {v["method"]: v for v in r["versus_output"]}
    assert set(versus) == {"composition (priority)", "router top-1 + composition", "router top-2 + composition",
                           "router (score > 0) + composition", "RLOO router top-1 + composition",
                           "RLOO router top-2 + composition"}
    for m, v in versus.items():  # the paired difference is that of the per-case scores kept in the result
        out = r["case_scores"]["composition (probability)"]
        diffs = [a - b for a, b in zip(r["case_scores"][m], out, strict=True)]
        assert v["n"] == 2 and v["mean_diff"] == pytest.approx(sum(diffs) / 2)


def test_compose_needs_two_classes(tmp_path, capsys):
    assert main(["compose", "--out", str(tmp_path / "o"), "--types", "sah"]) == 2
    assert "composition needs at least two hemorrhage types" in capsys.readouterr().err
    assert main(["compose", "--out", str(tmp_path / "o"), "--types", "blood"]) == 2


def test_compose_preset_is_read_and_checked(tmp_path, capsys):
    from medlora.training.composition import read_compose_config

    settings = read_compose_config("configs/study/ich_composition.yaml")
    assert settings["train_cases"] >= 30 and settings["test_cases"] >= 30
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_cases: 12\nsteps: 3\n")
    assert main(["compose", "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.yaml: unknown setting 'steps'" in err and not (tmp_path / "o").exists()
    bad.write_text("train_cases: twelve\n")
    assert main(["compose", "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert "train_cases: expected a number" in capsys.readouterr().err
