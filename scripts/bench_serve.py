"""``medlora serve`` under load: the mixed-adapter server against a merged model per adapter and against merging
per request, with 1, 8 and 64 adapters, for a 3D network and a 2D one (SAM-style, on axial slices).

For each network the script writes a random base, 64 random LoRA adapters (rank 4) and a few CT phantoms into a
temporary folder and starts three servers side by side on localhost, one per ``--mode``:

* ``mixed``: one base, adapters held apart in an ``AdapterBank``; the windows of concurrent requests for different
  adapters go through one mixed-adapter call (S-LoRA's heterogeneous batch);
* ``merged``: a merged copy of the base per adapter, all resident; one call per adapter present in a batch;
* ``per-request``: the adapter file is read and merged for every request.

All three hold every adapter in their cache (``--cache-size 64``), and the resident modes are warmed up (one
request per adapter) before timing, so the table compares computing, not loading. Then ``--clients`` client
threads send ``--requests`` requests (adapters round-robin over the first N, volumes round-robin), through
LitServe's dynamic batching (``--max-batch-size``, ``--batch-timeout``); modes are interleaved round by round so
that noise from other processes hits all alike. Reported: requests per second (all requests / wall time), latency
p50 and p95 (request sent to answer received), throughput relative to the ``merged`` and ``per-request`` servers,
and the most label voxels by which one answer differs from the ``merged`` server's answer to the same request
(the mixed path sums in another order: a voxel whose probability lies within round-off of the threshold may
flip). "Weights held" is computed from the file sizes: the base plus the adapters (mixed), the base plus one merged
copy per adapter (merged), the base alone (per-request, plus one transient copy).

    python scripts/bench_serve.py                          # the table in docs/serving.md
    python scripts/bench_serve.py --nets unet3d --adapters 1 8 --requests 16   # quick
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from medlora.adapters import AdapterConfig, inject, save_adapter  # noqa: E402
from medlora.data.dataset import save_nifti  # noqa: E402
from medlora.models import create_model  # noqa: E402

MODES = ("mixed", "merged", "per-request")

# name -> backbone record, adapter config, sliding-window size, volume shape, HU window
NETS = {
    "unet3d": ({"backbone": "mv_unet", "backbone_args": {"level": 1, "width": 8}, "spatial_dims": 3},
               AdapterConfig("lora", rank=4, target_types=["Conv3d"]), [32, 32, 16], (40, 36, 16), [0.0, 140.0]),
    "sam2d": ({"backbone": "sam", "spatial_dims": 2,
               "backbone_args": {"variant": "tiny", "image_size": 64, "num_classes": 1, "prompt": "none",
                                 "windows": [[40, 80], [80, 200], [600, 2800]], "input_window": [-1024, 3071]}},
              AdapterConfig("lora", rank=4, targets=["image_encoder.blocks.*.attn.qkv"]), [64, 64], (64, 64, 6),
              [-1024.0, 3071.0]),
}


def phantom(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(x**2 + y**2 + (0.8 * z) ** 2)
    vol = np.full(shape, -1000.0)
    vol[r < 0.95] = 900.0
    vol[r < 0.8] = 35.0
    vol[((x - 0.3 + 0.1 * seed) ** 2 + (y + 0.25) ** 2 + (z - 0.2) ** 2) < 0.1] = 75.0
    return (vol + rng.normal(0.0, 8.0, shape)).astype(np.float32)


def write_files(net: str, root: Path, n_adapters: int) -> dict[str, object]:
    record, adapter, roi, shape, window = NETS[net]
    torch.manual_seed(0)
    base = create_model(record["backbone"], spatial_dims=record["spatial_dims"], **record["backbone_args"]).eval()
    if record["backbone"] == "mv_unet":  # a random UNet labels everything: shift its output so ~35% is foreground
        x = torch.as_tensor(np.clip(phantom(0, shape) / window[1], 0, 1))[None, None, : roi[0], : roi[1], : roi[2]]
        with torch.no_grad():
            base.M3.TripleOut[6].bias -= torch.quantile(base(x).flatten(), 0.65)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(root / "base.safetensors"))
    meta = {**record, "pretrained": None,
            "preprocessing": {"hu_window": window, "target_spacing": None, "roi_size": roi, "threshold": 0.5}}
    (root / "adapters").mkdir()
    for i in range(n_adapters):
        model = create_model(record["backbone"], spatial_dims=record["spatial_dims"], **record["backbone_args"])
        model.load_state_dict(base.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inject(model, adapter)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        save_adapter(model, root / "adapters" / f"a{i:02d}.safetensors", extra_metadata=meta)
    volumes = []
    for i in range(4):
        affine = np.diag([0.9, 0.8, 3.0, 1.0])
        volumes.append(save_nifti(root / f"vol{i}.nii.gz", phantom(i, shape), affine).read_bytes())
    return {"base": root / "base.safetensors", "adapters": root / "adapters", "volumes": volumes}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(mode: str, files: dict[str, object], args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(p for p in [str(Path(__file__).resolve().parents[1]),
                                                     os.environ.get("PYTHONPATH", "")] if p)}
    cmd = [sys.executable, "-m", "medlora.cli", "serve", "--model", str(files["base"]), "--adapters",
           str(files["adapters"]), "--port", str(port), "--mode", mode, "--cache-size", "64",
           "--max-batch-size", str(args.max_batch_size), "--batch-timeout", str(args.batch_timeout)]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} did not start in 600 s")


def stop(procs: list[subprocess.Popen]) -> None:
    """End the servers' process groups (the server, LitServe's worker, API and manager processes)."""
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of the group is left (LitServe's API process may outlive the server briefly)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def send(url: str, volume: bytes, adapter: str) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    r = requests.post(f"{url}/predict", files={"file": ("scan.nii.gz", volume)}, data={"adapter": adapter},
                      timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"{url}: {r.status_code} {r.text}")
    return time.perf_counter() - t0, r.content


def load(url: str, plan: list[tuple[str, int]], volumes: list[bytes], clients: int) -> tuple[float, list, list]:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: send(url, volumes[p[1]], p[0]), plan))
    return time.perf_counter() - t0, [r[0] for r in results], [r[1] for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--adapters", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=24, help="timed requests per configuration and round")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    args = parser.parse_args()
    rows = []
    for net in args.nets:
        with tempfile.TemporaryDirectory(prefix=f"bench_serve_{net}_") as tmp:
            root = Path(tmp)
            t0 = time.perf_counter()
            files = write_files(net, root, max(args.adapters))
            print(f"{net}: {max(args.adapters)} adapters written in {time.perf_counter() - t0:.1f} s", flush=True)
            servers = {m: start(m, files, args, root / f"{m}.log") for m in MODES}
            try:
                for m, (proc, url) in servers.items():
                    wait_ready(proc, url, root / f"{m}.log")
                print(f"{net}: servers up", flush=True)
                volumes = files["volumes"]
                for n in args.adapters:
                    names = [f"a{i:02d}" for i in range(n)]
                    for m in ("mixed", "merged"):  # load every adapter once: the table compares computing
                        load(servers[m][1], [(a, 0) for a in names], volumes, args.clients)
                    plan = [(names[i % n], i % len(volumes)) for i in range(args.requests)]
                    stats = {m: {"wall": [], "lat": [], "differ": 0} for m in MODES}
                    for _ in range(args.rounds):
                        outs = {}
                        for m in MODES:
                            wall, lat, outs[m] = load(servers[m][1], plan, volumes, args.clients)
                            stats[m]["wall"].append(wall)
                            stats[m]["lat"] += lat
                        for m in MODES:  # label voxels that differ from the merged server's answer
                            pairs = zip(outs[m], outs["merged"], strict=True)
                            stats[m]["differ"] = max(stats[m]["differ"],
                                                     *(int((labels(a) != labels(b)).sum()) for a, b in pairs))
                    tput = {m: args.requests / statistics.median(s["wall"]) for m, s in stats.items()}
                    base_mb = Path(files["base"]).stat().st_size / 2**20
                    adapter_mb = sum((Path(files["adapters"]) / f"{a}.safetensors").stat().st_size
                                     for a in names) / 2**20
                    held = {"mixed": base_mb + adapter_mb, "merged": base_mb * (1 + n), "per-request": base_mb}
                    for m in MODES:
                        lat = np.asarray(stats[m]["lat"]) * 1000
                        rows.append((net, n, m, tput[m], float(np.percentile(lat, 50)), float(np.percentile(lat, 95)),
                                     tput[m] / tput["merged"], tput[m] / tput["per-request"], held[m],
                                     stats[m]["differ"]))
                        print("| " + " | ".join(fmt(v) for v in rows[-1]) + " |", flush=True)
            finally:
                stop([proc for proc, _ in servers.values()])
    print()
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; python {platform.python_version()}, torch "
          f"{torch.__version__}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"{args.clients} clients, {args.requests} requests x {args.rounds} round(s), max batch "
          f"{args.max_batch_size}, batch timeout {args.batch_timeout} s, {args.threads} torch thread(s) per server")
    print()
    print("| network | adapters | server | requests/s | p50 ms | p95 ms | vs merged | vs per-request "
          "| weights held MB | voxels != merged |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(fmt(v) for v in row) + " |")


def labels(nifti_gz: bytes) -> np.ndarray:
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(nifti_gz)).dataobj)


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return str(v)


if __name__ == "__main__":
    main()
