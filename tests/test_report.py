"""Study reports: summary.json I/O, collecting fold summaries, results.csv, tables, plots and the findings."""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest

from medlora.evaluation.findings import SEED_FINDINGS, check_findings, select_findings
from medlora.evaluation.report import ReportError, build_report, collect
from medlora.evaluation.results import scan_run
from medlora.evaluation.statistics import JobStats, nanmean
from medlora.evaluation.summary import load_summary, summarise_job, write_json_atomic, write_summary

NAN = float("nan")
# Held-out cases per fold and their true volumes (mL): every paper bin, five small and four large bleeds, one empty.
FOLDS = {0: ["SAH_001", "SAH_002", "SAH_003", "SAH_004", "SAH_005"],
         1: ["SAH_006", "SAH_007", "SAH_008", "SAH_009", "SAH_010"],
         2: ["SAH_011", "SAH_012", "SAH_013", "SAH_014", "SAH_015"]}
TRUE_ML = {"SAH_001": 10.0, "SAH_002": 30.0, "SAH_003": 80.0, "SAH_004": 150.0, "SAH_005": 5.0, "SAH_006": 0.0,
           "SAH_007": 60.0, "SAH_008": 120.0, "SAH_009": 20.0, "SAH_010": 40.0, "SAH_011": 200.0, "SAH_012": 15.0,
           "SAH_013": 90.0, "SAH_014": 180.0, "SAH_015": 22.0}
BIN_OF = {c: ("0" if v == 0 else "0-25" if v <= 25 else "25-50" if v <= 50 else "50-100" if v <= 100 else "100-225")
          for c, v in TRUE_ML.items()}
CASES = [c for f in sorted(FOLDS) for c in FOLDS[f]]
TOTAL = 10_000
# job -> (method, label, rank, family, trainable parameters)
JOBS = {
    "no_finetune": ("no_finetune", "no fine-tuning", None, "none", 0),
    "full": ("full", "full fine-tuning", None, "full", TOTAL),
    "module_decoder": ("module", "module-wise (decoder)", None, "module", 3000),
    "lora_r4": ("lora", "LoRA r4", 4, "adapter", 800),
    "lora_r8": ("lora", "LoRA r8", 8, "adapter", 1600),
    "cp_lora_r4": ("cp_lora", "CP-LoRA", 4, "adapter", 100),  # a label without the rank suffix
}
# Dice per case (order of CASES); the empty case SAH_006 is NaN (empty prediction and reference).
AGREE = {  # fine-tuning helps, CP-LoRA beats full on every case, large bleeds segmented better
    "no_finetune": [0.10, 0.20, 0.40, 0.50, 0.05, NAN, 0.35, 0.45, 0.12, 0.22, 0.55, 0.08, 0.38, 0.52, 0.15],
    "full": [0.50, 0.60, 0.70, 0.80, 0.40, NAN, 0.72, 0.78, 0.45, 0.62, 0.85, 0.42, 0.70, 0.82, 0.48],
    "cp_lora_r4": [0.56, 0.64, 0.76, 0.85, 0.47, NAN, 0.75, 0.84, 0.49, 0.69, 0.88, 0.48, 0.74, 0.86, 0.53],
}
_FULL_C = [0.80, 0.70, 0.60, 0.50, 0.82, NAN, 0.62, 0.52, 0.78, 0.68, 0.45, 0.80, 0.58, 0.48, 0.79]
_GAP_C = [0.10, 0.08, 0.12, 0.09, 0.11, 0.0, 0.10, 0.08, 0.12, 0.09, 0.11, 0.10, 0.08, 0.12, 0.09]
CONTRADICT = {  # no fine-tuning best, full beats the adapter on every case, smaller bleeds segmented better
    "no_finetune": [0.90] * 5 + [NAN] + [0.90] * 9,
    "full": _FULL_C,
    "cp_lora_r4": [f - g for f, g in zip(_FULL_C, _GAP_C, strict=True)],
}
TRAIN_SECONDS = {0: 10.5, 1: 12.25, 2: 7.0}


def _case(job: str, case: str, dice: float) -> dict:
    i = CASES.index(case)
    true = TRUE_ML[case]
    pred = 0.0 if true == 0 else true * (0.8 + 0.1 * i)
    return {
        "Dice": dice, "IoU": dice / (2 - dice) if not math.isnan(dice) else NAN,
        "soft_Dice": 0.0 if math.isnan(dice) else dice - 0.02,
        "HD95_mm": NAN if true == 0 else 2.0 + i + len(job) / 10,
        "TP": 10 * i, "FP": i, "FN": 2 * i, "TN": 1000, "n_pred": 11 * i, "n_ref": 12 * i,
        "volume_true_ml": true, "volume_pred_ml": pred, "volume_soft_ml": pred, "volume_error_ml": pred - true,
        "case_id": case, "reference_file": f"/data/labelsTr/{case}.nii.gz",
    }


def make_run(tmp_path, dice: dict[str, list[float]]):
    run = tmp_path / "run"
    for job, values in dice.items():
        method, label, rank, family, trainable = JOBS[job]
        for fold, cases in FOLDS.items():
            rows = [_case(job, c, values[CASES.index(c)]) for c in cases]
            info = {"job": job, "method": method, "label": label, "rank": rank, "fold": fold, "family": family,
                    "trainable_params": trainable, "total_params": TOTAL,
                    "train_seconds": 0.0 if family == "none" else TRAIN_SECONDS[fold], "eval_seconds": 1.0,
                    "epochs": 3, "steps": 12}
            write_json_atomic(summarise_job(rows, info), run / "jobs" / job / f"fold_{fold}" / "summary.json")
    (run / "jobs" / "lora_r16" / "fold_0").mkdir(parents=True)  # started, never finished
    return run


def _section(text: str, title: str) -> list[str]:
    body = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in body.splitlines() if line.strip()]


def _table_row(text: str, title: str, name: str) -> list[str]:
    for line in _section(text, title):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in {title!r}")


def _finding(text: str, number: str) -> str:
    return next(line for line in _section(text, "Findings vs. the seed paper") if line.startswith(f"- ({number})"))


def _ms(values) -> str:
    arr = np.asarray(values, dtype=float)
    return f"{np.nanmean(arr):.3f} ± {np.nanstd(arr):.3f}"


def test_collect_rows_and_results_csv(tmp_path):
    run = make_run(tmp_path, AGREE)
    rows = collect(run)
    assert len(rows) == 3 * 15  # 3 jobs x 3 folds x 5 cases; the unfinished lora_r16 is skipped
    assert [r["job"] for r in rows[::15]] == ["no_finetune", "full", "cp_lora_r4"]  # the study's order
    row = next(r for r in rows if r["job"] == "cp_lora_r4" and r["case_id"] == "SAH_008")
    assert (row["method"], row["rank"], row["family"], row["fold"]) == ("cp_lora", 4, "adapter", 1)
    assert row["Dice"] == 0.84 and row["volume_bin"] == "100-225" and row["trainable_params"] == 100
    assert row["percent_trainable"] == pytest.approx(1.0)
    assert math.isnan(next(r for r in rows if r["case_id"] == "SAH_006")["Dice"])
    assert scan_run(run).unfinished == ["lora_r16/fold_0"] and len(scan_run(run).folds) == 3 * 3

    build_report(run)
    with open(run / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        table = list(reader)
    assert header[:10] == ["job", "method", "label", "rank", "family", "seed", "train_cases", "domain", "fold",
                           "case_id"]
    assert header[10:12] == ["Dice", "IoU"] and header[-7:] == [
        "volume_bin", "n_train_cases", "forgetting_weight", "trainable_params", "total_params", "percent_trainable",
        "train_seconds"]
    # summaries of the older jobs/<job>/fold_<k> layout: one seed, whole folds, target cases
    assert {(r["seed"], r["train_cases"], r["domain"]) for r in table} == {("", "all", "target")}
    assert len(table) == 45 and len({(r["job"], r["case_id"]) for r in table}) == 45
    for r in table:
        expected = AGREE[r["job"]][CASES.index(r["case_id"])]
        assert (math.isnan(float(r["Dice"])) and math.isnan(expected)) or float(r["Dice"]) == expected
        assert r["volume_bin"] == BIN_OF[r["case_id"]]
        assert float(r["volume_true_ml"]) == TRUE_ML[r["case_id"]]
    full = next(r for r in table if r["job"] == "full" and r["case_id"] == "SAH_001")
    assert full["rank"] == "" and float(full["percent_trainable"]) == 100.0 and float(full["train_seconds"]) == 10.5
    assert not list(run.glob("**/*.tmp"))


def test_report_tables_plots_and_agreeing_findings(tmp_path):
    run = make_run(tmp_path, AGREE)
    info = {"name": "phantom study", "dataset": "SAH phantoms", "folds": 2, "seed": 0, "finetune_epochs": 3,
            "expected_jobs": 12, "job_names": ["no_finetune", "full", "cp_lora_r4", "lora_r16"]}
    report = build_report(run, info)
    text = report.read_text(encoding="utf-8")
    assert report == run / "report.md"

    study = "\n".join(_section(text, "Study"))
    assert "SAH phantoms" in study and "finetune_epochs" in study
    completeness = "\n".join(_section(text, "Completeness"))
    assert "Expected job runs: 12 — found 9" in completeness and "INCOMPLETE" in completeness
    assert "missing entirely: lora_r16" in completeness and "lora_r16/fold_0" in completeness

    for job, dice in AGREE.items():
        _, label, rank, _, trainable = JOBS[job]
        name = label if rank is None or label.endswith(f"r{rank}") else f"{label} r{rank}"
        cells = _table_row(text, "Results per method and rank", name)
        rows = [_case(job, c, dice[i]) for i, c in enumerate(CASES)]
        assert cells[2] == f"{trainable:,}" and cells[3] == f"{100 * trainable / TOTAL:.3g}%"
        assert cells[4] == _ms(dice) and cells[5] == "14/15"
        assert cells[6] == _ms([r["soft_Dice"] for r in rows])
        hd = np.array([r["HD95_mm"] for r in rows])
        assert cells[7] == f"{np.nanmean(hd):.1f} ± {np.nanstd(hd):.1f}"
        assert cells[8] == f"{np.mean([abs(r['volume_error_ml']) for r in rows]):.2f}"
        for col, b in zip(range(9, 13), ("0-25", "25-50", "50-100", "100-225"), strict=True):
            in_bin = [dice[i] for i, c in enumerate(CASES) if BIN_OF[c] == b]
            assert cells[col] == f"{np.mean(in_bin):.3f}"
        assert cells[13] == ("0.0" if job == "no_finetune" else f"{sum(TRAIN_SECONDS.values()):.1f}")
        folds = _table_row(text, "Dice per fold", name)
        for k, cases in FOLDS.items():
            assert folds[1 + k] == f"{np.nanmean([dice[CASES.index(c)] for c in cases]):.3f}"

    for png in ("dice_per_method", "dice_by_volume", "volume_pred_vs_true", "dice_vs_params", "significance"):
        path = run / "plots" / f"{png}.png"
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
        assert f"](plots/{png}.png)" in text

    gain = _paired_mean(AGREE["cp_lora_r4"], AGREE["no_finetune"])
    assert "✔ agrees" in _finding(text, "1") and f"Δ +{gain:.3f}" in _finding(text, "1")
    assert "✔ agrees" in _finding(text, "2") and f"Δ +{_paired_mean(AGREE['cp_lora_r4'], AGREE['full']):.3f}" in \
        _finding(text, "2") and "1 significantly better" in _finding(text, "2")
    assert "not checked" in _finding(text, "3") and "not checked" in _finding(text, "4")
    assert "✔ agrees" in _finding(text, "5") and "Mann–Whitney p 0.016" in _finding(text, "5")  # 2/126, exact
    assert "✘" not in text and "≈ inconclusive" not in text

    # a later rebuild without study info keeps the header (saved beside the results)
    assert "SAH phantoms" in build_report(run).read_text(encoding="utf-8")


def _paired_mean(a, b) -> float:
    return float(np.nanmean(np.array(a) - np.array(b)))


def test_findings_flag_contradictions(tmp_path):
    text = build_report(make_run(tmp_path, CONTRADICT)).read_text(encoding="utf-8")
    assert "✘ contradicts" in _finding(text, "1") and "significantly BETTER" in _finding(text, "1")
    loss = _paired_mean(CONTRADICT["cp_lora_r4"], CONTRADICT["full"])
    assert "✘ contradicts" in _finding(text, "2") and f"Δ −{-loss:.3f}" in _finding(text, "2")
    assert "significantly WORSE" in _finding(text, "2")
    assert "✘ contradicts" in _finding(text, "5") and "significantly WORSE Dice on large" in _finding(text, "5")


@pytest.mark.parametrize("r8_better", [True, False])
def test_findings_rank_and_cp(tmp_path, r8_better):
    def constant(v: float) -> list[float]:  # the same Dice on every case: the volume bins differ by exactly 0
        return [NAN if c == "SAH_006" else v for c in CASES]

    low, high = constant(0.60), constant(0.70)
    dice = {"full": constant(0.5), "module_decoder": constant(0.55),
            "lora_r4": low if r8_better else high, "lora_r8": high if r8_better else low,
            "cp_lora_r4": constant(0.68)}
    text = build_report(make_run(tmp_path, dice)).read_text(encoding="utf-8")
    rank = _finding(text, "4")
    assert ("✔ agrees" if r8_better else "✘ contradicts") in rank and "r4 " in rank and "r8 " in rank
    cp = _finding(text, "3")
    fewer = "16× fewer" if r8_better else "8× fewer"  # CP-LoRA r4 has 100 params, LoRA r8 1,600, LoRA r4 800
    assert "✔ agrees" in cp and "−0.020" in cp and fewer in cp
    assert "✔ agrees" in _finding(text, "2b") and "module-wise" in _finding(text, "2b")
    assert "not checked" in _finding(text, "1")
    # a +0.000 difference between volume bins is not evidence for the paper
    assert "≈ inconclusive" in _finding(text, "5") and "Δ +0.000" in _finding(text, "5")


def test_corrupt_summary_is_one_line_error_naming_the_file(tmp_path):
    run = make_run(tmp_path, AGREE)
    bad = run / "jobs" / "full" / "fold_1" / "summary.json"
    bad.write_text('{"metric_per_case": [', encoding="utf-8")
    with pytest.raises(ValueError, match="corrupt summary.json") as info:
        collect(run)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ReportError)
    with pytest.raises(ValueError, match="no finished jobs"):
        build_report(tmp_path / "empty")


def test_summarise_job_is_nan_aware(tmp_path):
    rows = [_case("full", "SAH_005", 0.4), _case("full", "SAH_006", NAN), _case("full", "SAH_001", 0.8)]
    summary = summarise_job(rows, {"job": "full", "fold": 1})
    assert summary["mean"]["1"]["Dice"] == pytest.approx(0.6)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(0.6)
    assert summary["mean"]["1"]["HD95_mm"] == pytest.approx(np.nanmean([r["HD95_mm"] for r in rows]))
    assert summary["mean"]["1"]["TP"] == pytest.approx(np.mean([r["TP"] for r in rows]))
    case = summary["metric_per_case"][1]
    assert case["case_id"] == "SAH_006" and case["reference_file"].endswith("SAH_006.nii.gz")
    assert case["prediction_file"] is None and "case_id" not in case["metrics"]["1"]
    assert summary["medlora"] == {"job": "full", "fold": 1}

    path = tmp_path / "out" / "summary.json"
    write_json_atomic(summary, path)
    assert "NaN" in path.read_text(encoding="utf-8")
    assert math.isnan(json.loads(path.read_text(encoding="utf-8"))["metric_per_case"][1]["metrics"]["1"]["Dice"])
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]


# ------------------------------------------------------------------------------ summary.json: write/read pair

# A summary.json as nnU-Net v2 writes it (nnunetv2/evaluation/evaluate_predictions.py, compute_metrics_on_folder):
# no case ids, integer counts, NaN Dice for an empty-vs-empty case, a region key besides a label key.
NNUNET_SUMMARY = """{
    "foreground_mean": {"Dice": 0.8, "FN": 1.5, "FP": 1.0, "IoU": 0.667, "TN": 97.0, "TP": 2.0, "n_pred": 3.0,
                        "n_ref": 3.5},
    "mean": {"1": {"Dice": 0.8, "FN": 1.5, "FP": 1.0, "IoU": 0.667, "TN": 97.0, "TP": 2.0, "n_pred": 3.0,
                   "n_ref": 3.5}},
    "metric_per_case": [
        {"metrics": {"1": {"Dice": 0.8, "FN": 3, "FP": 2, "IoU": 0.6666666666666666, "TN": 91, "TP": 4,
                           "n_pred": 6, "n_ref": 7},
                     "(1, 2)": {"Dice": 0.9, "FN": 1, "FP": 1, "IoU": 0.8181818181818182, "TN": 89, "TP": 9,
                                "n_pred": 10, "n_ref": 10}},
         "prediction_file": "/pred/case_a.nii.gz", "reference_file": "/gt/case_a.nii.gz"},
        {"metrics": {"1": {"Dice": NaN, "FN": 0, "FP": 0, "IoU": NaN, "TN": 103, "TP": 0, "n_pred": 0,
                           "n_ref": 0}},
         "prediction_file": "/pred/case_b.nii.gz", "reference_file": "/gt/case_b.nii.gz"}
    ]
}"""


def test_write_summary_and_load_summary_are_a_pair(tmp_path):
    rows = [_case("lora_r4", "SAH_001", 0.7), _case("lora_r4", "SAH_006", NAN)]
    rows[0]["HD95_mm"] = None  # a metric that could not be computed
    info = {"job": "lora_r4", "fold": 0, "rank": 4}
    path = write_summary(summarise_job(rows, info), tmp_path / "fold_0" / "summary.json")
    assert path == tmp_path / "fold_0" / "summary.json" and [p.name for p in path.parent.iterdir()] == [path.name]
    raw = json.loads(path.read_text(encoding="utf-8"))  # the file as any JSON reader sees it
    assert raw["metric_per_case"][0]["metrics"]["1"]["HD95_mm"] is None

    loaded = load_summary(path)
    assert loaded["medlora"] == info
    assert [c["case_id"] for c in loaded["metric_per_case"]] == ["SAH_001", "SAH_006"]
    for case, row in zip(loaded["metric_per_case"], rows, strict=True):
        metrics = case["metrics"]["1"]
        assert set(metrics) == set(row) - {"case_id", "reference_file"}
        for key, value in metrics.items():
            expected = NAN if row[key] is None else row[key]
            assert (math.isnan(value) and math.isnan(expected)) or value == expected, key
            assert type(value) is (int if key in ("TP", "FP", "FN", "TN", "n_pred", "n_ref") else float), key
    assert loaded["mean"]["1"]["Dice"] == pytest.approx(0.7)

    # nothing that load_summary would reject is ever written, and a failed write keeps the old file
    before = path.read_bytes()
    with pytest.raises(ValueError, match="metric_per_case"):
        write_summary({"mean": {}}, path)
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_summary({"metric_per_case": [], "medlora": {"bad": object()}}, path)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == [path.name]


def test_load_summary_reads_nnunets_own_summary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(NNUNET_SUMMARY, encoding="utf-8")
    loaded = load_summary(path)
    assert "medlora" not in loaded and len(loaded["metric_per_case"]) == 2
    first, second = (c["metrics"] for c in loaded["metric_per_case"])
    assert first["1"]["TP"] == 4 and type(first["1"]["TP"]) is int and first["(1, 2)"]["Dice"] == 0.9
    assert math.isnan(second["1"]["Dice"]) and second["1"]["TN"] == 103
    # our run-folder reader needs its medlora block and says so in one line
    fold = tmp_path / "run" / "jobs" / "x" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "summary.json").write_text(NNUNET_SUMMARY, encoding="utf-8")
    with pytest.raises(ReportError, match="no 'medlora' block") as info:
        scan_run(tmp_path / "run")
    assert str(fold / "summary.json") in str(info.value)


@pytest.mark.parametrize("content, problem", [
    (b'{"metric_per_case": [', "corrupt summary.json (Expecting value"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"metric_per_case": {}}', "no 'metric_per_case' list"),
    (b'{"metric_per_case": [{"case_id": "a"}]}', "metric_per_case[0]: KeyError 'metrics'"),
    (b'{"metric_per_case": [{"metrics": [1, 2]}]}', "metric_per_case[0]: TypeError"),
    (b'{"metric_per_case": [{"metrics": {"1": {"Dice": 0.5}}}, {"metrics": {"1": {"Dice": "high"}}}]}',
     "metric_per_case[1]: ValueError"),
])
def test_load_summary_rejects_a_corrupt_file_in_one_line(tmp_path, content, problem):
    path = tmp_path / "summary.json"
    path.write_bytes(content)
    with pytest.raises(ReportError) as info:
        load_summary(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message
    assert path.read_bytes() == content


# ------------------------------------------------------------------------------ statistics


def test_nanmean_skips_nan_and_is_nan_without_values():
    values = [0.25, NAN, 0.5, None, 1.0, np.float32(0.125)]
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    assert nanmean(values) == pytest.approx(math.fsum(kept) / len(kept), abs=1e-15)
    assert nanmean(iter([3, 4])) == 3.5  # any iterable, integers included
    with warnings.catch_warnings():  # no "mean of empty slice" warning, unlike numpy.nanmean
        warnings.simplefilter("error")
        assert math.isnan(nanmean([NAN, None])) and math.isnan(nanmean([]))


# ------------------------------------------------------------------------------ findings as data


def _stats(job: str, method: str, rank: int | None, family: str, dice: float, trainable: int) -> JobStats:
    return JobStats(job=job, name=job, method=method, rank=rank, family=family, trainable=trainable, total=TOTAL,
                    percent=100 * trainable / TOTAL, n_cases=5, dice=(dice, 0.1, 5), soft_dice=(dice, 0.1, 5),
                    hd95=(3.0, 1.0, 5), abs_volume_error=1.0, bins={}, train_seconds=1.0, folds={0: dice})


def _job_rows(job: str, mean: float) -> list[dict]:
    # twelve cases spread symmetrically around the job's mean: jobs differ by the same amount on every case
    offsets = [-0.05, -0.03, -0.01, 0.01, 0.03, 0.05] * 2
    return [{"job": job, "case_id": f"c{i:02d}", "Dice": mean + o, "volume_bin": "0-25"}
            for i, o in enumerate(offsets)]


def test_check_findings_on_job_statistics():
    # LoRA at three ranks, not monotone: the finding compares the highest with the lowest rank (0.65 > 0.60)
    means = {"lora_r4": 0.60, "lora_r8": 0.70, "lora_r16": 0.65, "dora_r4": 0.66, "dora_r8": 0.64}
    stats = [_stats("lora_r4", "lora", 4, "adapter", 0.60, 800), _stats("lora_r8", "lora", 8, "adapter", 0.70, 1600),
             _stats("lora_r16", "lora", 16, "adapter", 0.65, 3200),
             _stats("dora_r4", "dora", 4, "adapter", 0.66, 900), _stats("dora_r8", "dora", 8, "adapter", 0.64, 1800)]
    rows = [r for job, m in means.items() for r in _job_rows(job, m)]
    rank = next(f for f in SEED_FINDINGS if f.name == "higher_rank_better")
    (verdict,) = check_findings(stats, rows, [rank])
    assert verdict.number == "4" and verdict.status == "contradicts"  # DoRA r8 < r4 on every case
    assert "better in 1, worse in 1 of 2 adapter methods" in verdict.text
    assert "r4 0.600 → r8 0.700 → r16 0.650; r16 vs r4 Δ +0.050" in verdict.text
    assert "r8 vs r4 Δ −0.020" in verdict.text and "higher rank WORSE" in verdict.text
    assert verdict.line().startswith("- (4) ✘ contradicts — highest vs lowest rank")
    (verdict,) = check_findings(stats[:3], rows, [rank])
    assert verdict.status == "agrees" and "better in 1, worse in 0 of 1" in verdict.text
    # a variant of LoRA at rank 16 (the forgetting term) is no point of LoRA's rank curve, even when it scores best
    variant = _stats("lora_fw1_r16", "lora", 16, "adapter", 0.72, 3200)
    (verdict,) = check_findings([*stats[:3], variant], rows + _job_rows("lora_fw1_r16", 0.72), [rank])
    assert "r4 0.600 → r8 0.700 → r16 0.650; r16 vs r4 Δ +0.050" in verdict.text and "0.720" not in verdict.text
    # without per-case rows nothing can be tested: inconclusive, never a verdict from the means
    (verdict,) = check_findings(stats[:3], [], [rank])
    assert verdict.status == "inconclusive" and "no paired cases" in verdict.text
    # only one rank per method: not tested
    (verdict,) = check_findings([stats[0], stats[3]], rows, [rank])
    assert verdict.status == "not checked" and "not tested" in verdict.text
    # module-wise fine-tuning is optional: without such a job (2b) is left out, (2) is not checked
    verdicts = check_findings(stats, rows, select_findings(["adapters_beat_full", "adapters_beat_module"]))
    assert [(v.number, v.status) for v in verdicts] == [("2", "not checked")]


def test_study_names_the_findings_to_check(tmp_path):
    run = make_run(tmp_path, AGREE)
    report = build_report(run, {"name": "subset", "findings": ["larger_volumes_better", "1"]})
    section = _section(report.read_text(encoding="utf-8"), "Findings vs. the seed paper")
    assert [line[:6] for line in section if line.startswith("- (")] == ["- (1) ", "- (5) "]  # the paper's order
    intro = section[0]
    assert "all methods are better on large volumes" in intro and "higher rank" not in intro
    assert "CP-LoRA" not in intro and "0.410 ± 0.26" in intro
    # the selection is saved with the study info and used again by a rebuild
    rebuilt = _section(build_report(run).read_text(encoding="utf-8"), "Findings vs. the seed paper")
    assert rebuilt == section


def test_unknown_finding_is_one_line_error_and_nothing_is_written(tmp_path):
    run = make_run(tmp_path, AGREE)
    with pytest.raises(ReportError, match="unknown finding 'rank_matters'") as info:
        build_report(run, {"findings": ["higher_rank_better", "rank_matters"]})
    message = str(info.value)
    assert str(run / "study_info.json") in message and "higher_rank_better" in message and "\n" not in message
    assert not (run / "study_info.json").exists() and not (run / "report.md").exists()
    assert not (run / "results.csv").exists()
    # a saved study info with a bad selection (edited by hand) is named, too
    (run / "study_info.json").write_text('{"findings": "4"}', encoding="utf-8")
    with pytest.raises(ReportError, match="must be a list of finding names") as info:
        build_report(run)
    assert str(run / "study_info.json") in str(info.value) and not (run / "report.md").exists()


# ------------------------------------------------------------------------------ significance and calibration


def _holm_by_hand(p: list[float]) -> list[float]:
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - k) * p[i]))
        out[i] = running
    return out


def test_significance_table_csv_and_the_studys_own_comparisons(tmp_path):
    import scipy.stats

    dice = dict(AGREE, lora_r4=[v - 0.03 + 0.01 * (i % 3) if not math.isnan(v) else NAN
                                for i, v in enumerate(AGREE["cp_lora_r4"])])
    run = make_run(tmp_path, dice)
    info = {"job_names": ["no_finetune", "full", "lora_r4", "cp_lora_r4", "lora_r16"],
            "comparisons": [["lora_r4", "no_finetune"], ["full", "cp_lora_r4"], ["lora_r16", "full"]]}
    text = build_report(run, info).read_text(encoding="utf-8")
    with open(run / "significance.csv", newline="") as f:
        table = list(csv.DictReader(f))
    # every job vs full, then the study's new pair ((full, cp) is (cp, full) again), then the findings' pairs
    assert [(r["method"], r["reference"], r["why"]) for r in table] == [
        ("no_finetune", "full", "vs full fine-tuning"), ("lora_r4", "full", "vs full fine-tuning"),
        ("cp_lora_r4", "full", "vs full fine-tuning"), ("lora_r4", "no_finetune", "named by the study"),
        ("cp_lora_r4", "no_finetune", "finding (1)"), ("cp_lora_r4", "lora_r4", "finding (3)")]
    p_values = []
    for r in table:
        a, b = np.array(dice[r["method"]]), np.array(dice[r["reference"]])
        d = (a - b)[~np.isnan(a - b)]
        assert int(r["n"]) == 14 and float(r["delta"]) == pytest.approx(d.mean(), abs=1e-12)
        assert float(r["p"]) == pytest.approx(scipy.stats.wilcoxon(d).pvalue, rel=1e-12)
        ci = scipy.stats.bootstrap((d,), np.mean, n_resamples=10_000, method="percentile",
                                   rng=np.random.default_rng(0)).confidence_interval
        assert (float(r["ci_low"]), float(r["ci_high"])) == pytest.approx((ci.low, ci.high), rel=1e-9)
        p_values.append(float(r["p"]))
    assert [float(r["p_adj"]) for r in table] == pytest.approx(_holm_by_hand(p_values), rel=1e-12)
    assert {r["verdict"] for r in table} == {"better", "worse"}

    row = _table_row(text, "Significance (paired per case)", "CP-LoRA r4")
    cp = table[2]
    interval = f"[+{float(cp['ci_low']):.3f}, +{float(cp['ci_high']):.3f}]"
    assert row[1:] == ["full fine-tuning", "14", f"+{float(cp['delta']):.3f}", interval, f"{float(cp['p_adj']):.3f}",
                       "better"]
    notes = "\n".join(_section(text, "Significance (paired per case)"))
    assert "comparison lora_r16 vs full left out: lora_r16 has no finished fold" in notes
    assert "](plots/significance.png)" in text


@pytest.mark.parametrize("comparisons, problem", [
    ("full vs lora", "must be a list of [method_job, reference_job] pairs"),
    ([["full", "cp_lora_r4", "no_finetune"]], "must be a list of [method_job, reference_job] pairs"),
    ([["full", "cp_lora"]], "names an unknown job 'cp_lora'"),
])
def test_bad_comparisons_are_one_line_errors_and_nothing_is_written(tmp_path, comparisons, problem):
    run = make_run(tmp_path, AGREE)
    with pytest.raises(ReportError) as info:
        build_report(run, {"comparisons": comparisons})
    message = str(info.value)
    assert message.startswith(f"{run / 'study_info.json'}: ") and problem in message and "\n" not in message
    assert not any((run / name).exists() for name in ("study_info.json", "report.md", "results.csv",
                                                      "significance.csv"))


def test_calibration_histograms_in_summaries_become_a_table_and_a_plot(tmp_path):
    from medlora.evaluation.calibration import calibration_histogram

    run = make_run(tmp_path, AGREE)
    gen = np.random.default_rng(0)
    voxels = {}
    for fold in FOLDS:
        label = gen.random(500) < 0.1
        prob = np.where(label, gen.uniform(0.3, 1.0, 500), gen.uniform(0.0, 0.2, 500))
        voxels[fold] = (prob, label)
        path = run / "jobs" / "cp_lora_r4" / f"fold_{fold}" / "summary.json"
        summary = load_summary(path)
        summary["medlora"]["calibration"] = calibration_histogram(prob, label, n_bins=10).to_dict()
        write_json_atomic(summary, path)
    text = build_report(run).read_text(encoding="utf-8")
    prob = np.concatenate([p for p, _ in voxels.values()])
    label = np.concatenate([y for _, y in voxels.values()])
    row = _table_row(text, "Calibration of the probability maps", "CP-LoRA r4")
    assert row[2] == f"{np.mean(1 - prob[label]):.4f}" and row[3] == f"{np.mean(prob[~label]):.4f}"
    assert row[4] == f"{label.sum():,}" and row[5] == f"{(~label).sum():,}"
    assert not any(line.startswith("| full") for line in _section(text, "Calibration of the probability maps"))
    assert (run / "plots" / "reliability.png").read_bytes().startswith(b"\x89PNG")

    bad = run / "jobs" / "cp_lora_r4" / "fold_1" / "summary.json"
    summary = load_summary(bad)
    summary["medlora"]["calibration"] = {"counts": [[1, 2]], "prob_sums": [[0.1, 0.2]]}
    write_json_atomic(summary, bad)
    with pytest.raises(ReportError, match="corrupt 'medlora.calibration' block") as info:
        build_report(run)
    assert str(bad) in str(info.value)
