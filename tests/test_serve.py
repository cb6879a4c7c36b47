"""``medlora serve``: answers equal offline ``medlora infer`` (byte for byte), concurrent requests for different
adapters share mixed-adapter network calls, the LRU adapter cache, error answers, and the HTTP server under load.

The reference is always ``run_inference`` on the same files: merged adapters, one volume at a time, the path that
``tests/test_inference.py`` checks against MONAI's own transforms. Tiny MV-UNets (level 1, width 4) with random
weights on 24 x 20 x 12 phantoms (the helpers of ``tests/test_inference.py``); the HTTP tests share one server in a
subprocess.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from monai.inferers import sliding_window_inference
from safetensors.torch import save_file
from test_inference import ARCH, NATIVE, RAS_AFFINE, ROI2, SHAPE, adapter_meta, oblique_affine, phantom, random_base
from test_inference import with_adapter as make_adapter

from medlora.data.dataset import save_nifti
from medlora.inference import run_inference
from medlora.serving import ServeError, Service

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTERS = {"sah": "cp_dora", "ivh": "lora", "site3": "dora"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    out: dict[str, Path] = {"root": root}
    base = random_base(3, 0)
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file(state, str(root / "base.safetensors"))
    out["base"] = root / "base.safetensors"
    # the same weights as a Lightning checkpoint of a full model: architecture and preprocessing recorded
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()},
                "hyper_parameters": {"backbone": "mv_unet", "backbone_args": dict(ARCH), "spatial_dims": 3,
                                     "adapter": None, "threshold": 0.5},
                "medlora_preprocessing": dict(NATIVE)}, root / "base.ckpt")
    out["ckpt"] = root / "base.ckpt"
    adapters = root / "adapters"
    adapters.mkdir()
    for seed, (name, method) in enumerate(ADAPTERS.items(), start=1):
        out[name] = make_adapter(base, method, seed, adapters / f"{name}.safetensors", adapter_meta())
    (adapters / "job").mkdir()  # a crossval job folder's layout
    out["job"] = make_adapter(base, "lora", 9, adapters / "job" / "adapter.safetensors", adapter_meta())
    out["foreign"] = make_adapter(random_base(3, 7), "lora", 4, adapters / "foreign.safetensors", adapter_meta())
    (adapters / "broken.safetensors").write_bytes(b"\x00" * 40)
    out["adapters"] = adapters
    for i, (shape, affine) in enumerate([(SHAPE, RAS_AFFINE), ((20, 26, 10), oblique_affine()),
                                         ((28, 18, 14), np.diag([-0.8, 1.1, 2.5, 1.0]))]):
        out[f"vol{i}"] = save_nifti(root / f"vol{i}.nii.gz", phantom(i, shape), affine)
    base2 = random_base(2, 5)
    (root / "adapters2d").mkdir()
    save_file({k: v.contiguous() for k, v in base2.state_dict().items()}, str(root / "base2d.safetensors"))
    out["base2d"] = root / "base2d.safetensors"
    out["a2d"] = make_adapter(base2, "dora", 6, root / "adapters2d" / "a2d.safetensors",
                              adapter_meta(dims=2, prep={**NATIVE, "roi_size": ROI2}))
    return out


@pytest.fixture(scope="module")
def offline(files) -> dict[tuple[str | None, str], tuple[bytes, float]]:
    """``medlora infer`` (run_inference) of every volume with every adapter and the base: label bytes, mL."""
    refs = {}
    root = files["root"] / "offline"
    for adapter in (*ADAPTERS, "job", None):
        out = root / str(adapter)
        vols = [files[f"vol{i}"] for i in range(3)]
        if adapter is None:
            summary = run_inference(files["ckpt"], vols, out, progress=False)
        else:
            summary = run_inference(files["base"], vols, out, adapters=[files[adapter]], progress=False)
        assert summary.exit_code == 0
        for row in summary.done:
            refs[adapter, row["case_id"]] = ((out / row["output"]).read_bytes(), row["volume_ml"])
    return refs


def decoded(files: dict[str, Path], vol: str, adapter: str | None):
    return Service.decode(files[vol].read_bytes(), files[vol].name, adapter)


class CallLog:
    """The adapters of every window in every network call of a bank (a forward pre-hook: independent of the
    service's own bookkeeping)."""

    def __init__(self, bank: torch.nn.Module) -> None:
        self.calls: list[list[str | None]] = []
        bank.register_forward_pre_hook(lambda module, args, kwargs: self.calls.append(list(kwargs["adapters"])),
                                       with_kwargs=True)


def flat_geometry(path: Path, data: np.ndarray) -> Path:
    """A NIfTI-1 file whose sform maps every voxel to one plane (third row zero): a degenerate geometry. Written
    byte by byte, because nibabel refuses to save such an affine."""
    image = nib.Nifti1Image(data, RAS_AFFINE)
    image.header.set_qform(None, code=0)
    raw = bytearray(image.to_bytes())
    raw[312:328] = np.zeros(4, "<f4").tobytes()  # srow_z (NIfTI-1 header offset 312)
    path.write_bytes(bytes(raw))
    return path


# ---------------------------------------------------------------------------------------- the core


def test_lockstep_batches_calls_and_survives_a_failing_caller():
    """Callers making 3, 1 and 5 calls, one of them failing after its second call: every call is answered with its
    own result, rounds hold every live caller, and nobody waits for the failed or finished ones."""
    import threading

    from medlora.serving import Lockstep

    rounds: list[list[str]] = []
    lockstep = Lockstep(["a", "b", "c", "bad"], lambda pending: (rounds.append(sorted(pending)),
                                                                 {k: v * 10 for k, v in pending.items()})[1])
    got: dict[str, list[int]] = {}

    def caller(key: str, calls: int, fail_after: int | None = None) -> None:
        try:
            for i in range(calls):
                if i == fail_after:
                    raise RuntimeError("this caller fails")
                got.setdefault(key, []).append(lockstep.call(key, i + ord(key[0])))
        except RuntimeError:
            pass
        finally:
            lockstep.done(key)

    threads = [threading.Thread(target=caller, args=a) for a in (("a", 3), ("b", 1), ("c", 5), ("bad", 9, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert got == {k: [10 * (i + ord(k[0])) for i in range(n)] for k, n in (("a", 3), ("b", 1), ("c", 5), ("bad", 2))}
    assert rounds == [["a", "b", "bad", "c"], ["a", "bad", "c"], ["a", "c"], ["c"], ["c"]]


def test_mixed_batch_equals_offline_infer_per_request(files, offline):
    service = Service(files["ckpt"], files["adapters"], cache_size=4)
    log = CallLog(service.bank)
    plan = [("sah", "vol0"), ("ivh", "vol1"), (None, "vol2"), ("sah", "vol1"), ("site3", "vol0"), ("job", "vol2")]
    answers = service.segment([decoded(files, vol, adapter) for adapter, vol in plan])
    for (adapter, vol), answer in zip(plan, answers, strict=True):
        assert not isinstance(answer, ServeError), answer
        ref_bytes, ref_ml = offline[adapter, vol]
        assert answer.nifti == ref_bytes  # same labels, same header and geometry as the file medlora infer writes
        assert answer.volume_ml == pytest.approx(ref_ml, rel=1e-12) and answer.adapter == adapter
        label = nib.Nifti1Image.from_bytes(gzip.decompress(answer.nifti))
        assert np.array_equal(label.affine, nib.load(str(files[vol])).affine)
    # Lockstep: the six sliding-window passes share their network calls. MONAI's own window schedule of each
    # preprocessed volume says how many windows and calls each pass makes alone.
    windows, calls = [], []
    for adapter, vol in plan:
        request = decoded(files, vol, adapter)
        image = service._predictor(service.base_preprocessing).preprocess(request.volume.data, request.volume.affine)
        seen: list[int] = []
        sliding_window_inference(image[None].as_tensor(), (16, 16, 8), 2, lambda x, seen=seen: seen.append(len(x)) or x,
                                 overlap=0.25, mode="gaussian")
        windows.append(sum(seen))
        calls.append(len(seen))
    assert len(log.calls) == max(calls) < sum(calls)
    assert sum(len(c) for c in log.calls) == sum(windows)
    assert set(log.calls[0]) == {"sah", "ivh", None, "site3", "job"} and len(log.calls[0]) == 6 * 2


def test_modes_and_2d_network_agree_with_offline_infer(files, offline):
    plan = [("ivh", "vol1"), ("sah", "vol0"), ("ivh", "vol2")]
    for mode in ("merged", "per-request"):
        service = Service(files["base"], files["adapters"], mode=mode, cache_size=2)
        answers = service.segment([decoded(files, vol, adapter) for adapter, vol in plan])
        assert [a.nifti for a in answers] == [offline[p][0] for p in plan], mode
        assert service.loads == {"merged": 2, "per-request": 3}[mode]  # per request: ivh is read twice
    service = Service(files["base2d"], files["root"] / "adapters2d")
    answer = service.segment([decoded(files, "vol1", "a2d")])[0]
    out = files["root"] / "offline2d"
    run_inference(files["base2d"], [files["vol1"]], out, adapters=[files["a2d"]], progress=False)
    assert answer.nifti == (out / "vol1.nii.gz").read_bytes()


def test_lru_cache_evicts_and_reloads_to_the_same_answer(files, offline):
    service = Service(files["base"], files["adapters"], cache_size=2)
    caches, answers = [], []
    for adapter in ("sah", "ivh", "sah", "site3", "ivh", "sah"):
        answer = service.segment([decoded(files, "vol0", adapter)])[0]
        caches.append(answer.cache)
        answers.append(answer)
        assert answer.nifti == offline[adapter, "vol0"][0]
        assert len(service.resident) <= 2 and sorted(service.bank.names) == sorted(service.resident)
    # sah, ivh loaded; sah hit; site3 evicts ivh (least recently used); ivh evicts sah; sah evicts site3
    assert caches == ["miss", "miss", "hit", "miss", "miss", "miss"]
    assert service.resident == ["ivh", "sah"] and service.loads == 5
    # a batch needing more adapters than the cache holds is answered in rounds, still correctly
    plan = [("sah", "vol0"), ("ivh", "vol1"), ("site3", "vol2"), ("job", "vol0")]
    answers = service.segment([decoded(files, vol, adapter) for adapter, vol in plan])
    assert [a.nifti for a in answers] == [offline[p][0] for p in plan]


def test_bad_requests_fail_alone(files, offline, tmp_path):
    service = Service(files["base"], files["adapters"], cache_size=2)
    good = decoded(files, "vol0", "ivh")
    cases = {
        "unknown": (decoded(files, "vol0", "nope"), 404, "unknown adapter 'nope'"),
        "path": (decoded(files, "vol0", "../adapters/ivh"), 400, "adapter name"),
        "foreign": (decoded(files, "vol0", "foreign"), 422, "foreign.safetensors"),
        "broken": (decoded(files, "vol0", "broken"), 422, "broken.safetensors"),
        "no adapter for a plain base": (decoded(files, "vol1", None), 400, "name an adapter"),
    }
    batch = [good] + [c[0] for c in cases.values()] + [good]
    answers = service.segment(batch)
    assert answers[0].nifti == answers[-1].nifti == offline["ivh", "vol0"][0]
    for (what, (_, status, text)), answer in zip(cases.items(), answers[1:-1], strict=True):
        assert isinstance(answer, ServeError) and answer.status == status and text in str(answer), what
        assert "\n" not in str(answer)
    assert service.resident == ["ivh"]  # failed loads leave nothing behind
    data = phantom(0)
    uploads = {
        "garbage": (b"not a nifti file at all", "garbage.nii.gz", "garbage.nii.gz"),
        "NaN": (save_nifti(tmp_path / "nan.nii.gz", np.where(data > 500, np.nan, data), RAS_AFFINE), None, "NaN"),
        "not HU": (save_nifti(tmp_path / "unit.nii.gz", (data + 1000) / 2000, RAS_AFFINE), None, "Hounsfield"),
        "2D": (save_nifti(tmp_path / "slice.nii.gz", data[:, :, 3], RAS_AFFINE), None, "3D"),
        "4D": (save_nifti(tmp_path / "series.nii.gz", np.stack([data, data], -1), RAS_AFFINE), None, "3D"),
        "zero slice spacing": (flat_geometry(tmp_path / "flat.nii", data), None, "affine"),
        "empty": (b"", "empty.nii", "empty upload"),
    }
    for what, (source, name, text) in uploads.items():
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
        with pytest.raises(ServeError, match=text) as info:
            Service.decode(raw, name or Path(source).name, "ivh")
        assert info.value.status == 400 and "\n" not in str(info.value) and "medlora-serve-" not in str(info.value), \
            what
    assert service.segment([good])[0].nifti == offline["ivh", "vol0"][0]  # still serving


# ---------------------------------------------------------------------------------------- over HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(files):
    """``medlora serve`` in its own process group on localhost (cache of 2 adapters, batches of up to 8)."""
    pytest.importorskip("litserve")
    port = free_port()
    log = open(files["root"] / "server.log", "wb")  # noqa: SIM115 - closed below
    paths = [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "medlora.cli", "serve", "--model", str(files["ckpt"]),
                             "--adapters", str(files["adapters"]), "--port", str(port), "--cache-size", "2",
                             "--max-batch-size", "8", "--batch-timeout", "0.3"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # imports in two processes on a busy machine
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (files["root"] / "server.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"medlora serve did not start: {tail}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and LitServe's worker, API and manager processes
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of the group is left (LitServe's API process may outlive the server briefly)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()


def post(url: str, path: Path | None, adapter: str | None, data: bytes | None = None) -> requests.Response:
    form = {"adapter": adapter} if adapter is not None else {}
    upload = {"file": (path.name if path else "scan.nii.gz", data if data is not None else path.read_bytes())}
    return requests.post(f"{url}/predict", files=upload if (path or data is not None) else None, data=form,
                         timeout=300)


def test_http_round_trip_and_errors(server, files, offline):
    answer = post(server, files["vol1"], "sah")
    assert answer.status_code == 200, answer.text
    assert answer.content == offline["sah", "vol1"][0]
    assert float(answer.headers["X-Medlora-Volume-mL"]) == pytest.approx(offline["sah", "vol1"][1], rel=1e-12)
    assert answer.headers["X-Medlora-Adapter"] == "sah"
    assert 'filename="vol1.nii.gz"' in answer.headers["Content-Disposition"]
    nan = phantom(0)
    nan[3, 4, 5] = np.nan
    errors = [
        (post(server, files["vol0"], "nope"), 404, "unknown adapter 'nope'"),
        (post(server, files["vol0"], "foreign"), 422, "foreign.safetensors"),
        (post(server, None, "sah", data=b"\x1f\x8b garbage"), 400, "scan.nii.gz"),
        (post(server, save_nifti(files["root"] / "nan.nii.gz", nan, RAS_AFFINE), "sah"), 400, "1 NaN"),
        (requests.post(f"{server}/predict", data={"adapter": "sah"}, timeout=60), 400, "multipart file field"),
    ]
    for response, status, text in errors:
        assert response.status_code == status and text in response.json()["detail"], response.text
        assert "\n" not in response.json()["detail"]
    answer = post(server, files["vol0"], None)  # the base, from the checkpoint's records: still serving
    assert answer.status_code == 200 and answer.content == offline[None, "vol0"][0]


def test_http_load_16_concurrent_clients(server, files, offline):
    """16 clients at once over three adapters, a crossval job folder's adapter and the base: every answer is
    the offline answer for its own adapter and volume, and requests for different adapters shared batches."""
    plan = [(adapter, f"vol{i % 3}") for i, adapter in enumerate(["sah", "ivh", None, "site3", "job"] * 4)][:16]
    for vol in ("vol0", "vol1", "vol2"):  # every adapter labels differently: a mixed-up answer would show
        assert len({offline[a, vol][0] for a in (*ADAPTERS, "job", None)}) == len(ADAPTERS) + 2
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda p: post(server, files[p[1]], p[0]), plan))
    batches = []
    for (adapter, vol), answer in zip(plan, answers, strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.content == offline[adapter, vol][0], (adapter, vol)
        assert answer.headers["X-Medlora-Adapter"] == (adapter or "")
        batches.append(json.loads(answer.headers["X-Medlora-Batch"]))
    assert max(b["size"] for b in batches) > 1 and max(len(b["adapters"]) for b in batches) > 1


def test_cli_refuses_bad_options_in_one_line(files, tmp_path, capsys):
    from medlora.cli import main

    pytest.importorskip("litserve")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--model", str(tmp_path / "missing.safetensors"), "--adapters", str(files["adapters"])],
         "missing.safetensors: weights file not found"),
        (["--model", str(files["base"]), "--adapters", str(tmp_path / "nowhere")], "nowhere: adapter folder not found"),
        (["--model", str(files["base"]), "--adapters", str(empty)], "holds no readable adapter file"),
        (["--model", str(files["base"]), "--adapters", str(files["adapters"]), "--cache-size", "0"],
         "--cache-size must be at least 1"),
        (["--model", str(files["base"]), "--adapters", str(files["adapters"]), "--port", "80"], "--port 80"),
    ]
    for argv, text in cases:
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("medlora: error: ") and text in err and "\n" not in err, err
