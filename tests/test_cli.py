"""The console entry point: help, method listing, phantom generation, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from medlora.cli import build_parser, main


def test_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "medlora.cli", "--help"], capture_output=True, encoding="utf-8",
                          errors="replace")
    assert proc.returncode == 0
    for command in ("adapters", "fit", "data", "crossval", "report"):
        assert command in proc.stdout


def test_output_into_a_closed_pipe_ends_quietly():
    """`medlora adapters | head -1`: the reader has left; no traceback, exit 141 (128 + SIGPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the child writes, so every write meets a broken pipe whatever the buffer size
    try:
        proc = subprocess.run([sys.executable, "-m", "medlora.cli", "adapters"], stdout=write_end,
                              stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr.decode("utf-8", "replace") == ""


def test_adapters_lists_every_method_with_its_options(capsys):
    assert main(["adapters"]) == 0
    out = capsys.readouterr().out
    for method in ("lora", "lora_c", "conv_lora", "cp_lora", "dora", "dora_c", "conv_dora", "cp_dora", "salt", "svd"):
        assert f"\n{method}: " in f"\n{out}"
    assert "options.svd_rank" in out and "arXiv 2503.16055" in out


def test_adapters_lists_the_training_rules_and_rejects_an_unknown_method(capsys):
    from medlora.adapters import list_methods
    from medlora.adapters.optim import list_rules

    assert main(["adapters", "--rules"]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if line and not line.startswith(" ")] == list_rules()
    assert "lora_pro" in out and "arXiv 2407.18242" in out
    assert main(["adapters", "pissa"]) == 0
    assert capsys.readouterr().out.startswith("pissa: ")
    assert main(["adapters", "lorra"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"medlora: error: unknown adapter method 'lorra'; available: {', '.join(list_methods())}"


def test_data_phantoms_writes_a_dataset_and_refuses_to_clobber(tmp_path, capsys):
    out = tmp_path / "sah"
    assert main(["data", "phantoms", "--out", str(out), "--domain", "sah", "--cases", "2", "--seed", "3"]) == 0
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["numTraining"] == 2 and sorted(p.name for p in (out / "labelsTr").iterdir()) == [
        "SAH_000.nii.gz", "SAH_001.nii.gz"]
    before = (out / "imagesTr" / "SAH_000_0000.nii.gz").read_bytes()
    capsys.readouterr()
    assert main(["data", "phantoms", "--out", str(out), "--domain", "tbi", "--cases", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medlora: error: ") and "different dataset already exists" in err
    assert (out / "imagesTr" / "SAH_000_0000.nii.gz").read_bytes() == before


def test_a_renamed_option_names_its_new_name(tmp_path, capsys):
    # one name per concept: the sliding-window overlap is model.sw_overlap in fit configs and --sw-overlap here
    code = main(["infer", "--model", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "o"), "--overlap",
                 "0.5", str(tmp_path / "x.nii.gz")])
    assert code == 2 and capsys.readouterr().err.strip() == "medlora: error: --overlap: renamed to --sw-overlap"
    assert not (tmp_path / "o").exists()
    args = build_parser().parse_args(["infer", "--model", "m", "--out", "o", "--sw-overlap", "0.5", "x.nii.gz"])
    assert args.sw_overlap == 0.5
