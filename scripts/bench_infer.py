"""Benchmark of ``medlora infer``: what the toolkit adds around the network, and what an adapter costs.

Two comparisons, each measured side by side in one process (the variants alternate within every
repetition, so machine load drifts hit them alike), reported as medians:

1. ``medlora infer`` end to end (load base + adapter and merge, read the .nii.gz, check it, preprocess,
   sliding windows, invert to the input grid, write the label map and the volume table) against a
   plain MONAI loop over the same merged network: ``sliding_window_inference`` (Gaussian blending,
   same ROI, overlap and window batch) + sigmoid + threshold on a tensor that is already in memory
   and preprocessed. Target ratio <= 1.1.
2. ``medlora infer`` with base + adapter (merged before inference) against the base checkpoint alone,
   both end to end. Target ratio <= 1.02.

The network is a random 3D MV-UNet (weights do not change the cost); the volume a synthetic head CT
(int16 HU, 0.45 x 0.45 x 5 mm). Run ``python scripts/bench_infer.py --help`` for the settings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medlora.adapters import AdapterConfig, inject, save_adapter  # noqa: E402
from medlora.data.dataset import save_nifti  # noqa: E402
from medlora.evaluation.predict import DEFAULT_SW_OVERLAP  # noqa: E402
from medlora.inference import Predictor, load_models, run_inference  # noqa: E402
from medlora.inference.io import read_nifti_volume  # noqa: E402
from medlora.models import create_model  # noqa: E402


def synthetic_head(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Air, skull, brain and a bleed in HU (int16), cheap to build at 512 x 512 x 32."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    r = np.sqrt(x**2 + y**2 + (0.7 * z) ** 2)
    vol = np.full(shape, -1024.0, dtype=np.float32)
    vol[r < 0.85] = 1200.0
    vol[r < 0.78] = 35.0
    vol[((x - 0.3) ** 2 + (y + 0.2) ** 2 + z**2) < 0.02] = 70.0
    vol += rng.normal(0.0, 5.0, shape).astype(np.float32)
    return np.round(vol).astype(np.int16)


def build_models(folder: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """A 'full model' Lightning-style checkpoint of the base, and a CP-DoRA adapter file for it."""
    arch = {"level": args.level, "width": args.width, "kernel_size": list(args.kernel), "pool_size": list(args.pool)}
    prep = {"hu_window": [0.0, 140.0], "target_spacing": None, "roi_size": list(args.roi), "threshold": 0.5}
    torch.manual_seed(0)
    base = create_model("mv_unet", spatial_dims=3, **arch)
    ckpt = folder / "base.ckpt"
    # The layout Lightning writes (the CheckpointRecords callback's records included); weights-only loadable.
    torch.save({"state_dict": {f"model.{k}": v for k, v in base.state_dict().items()},
                "hyper_parameters": {"backbone": "mv_unet", "backbone_args": arch, "spatial_dims": 3,
                                     "pretrained": None, "adapter": None, "threshold": 0.5},
                "medlora_preprocessing": prep}, ckpt)
    with warnings.catch_warnings():  # small first layer: "adapter parameters >= the layer" is expected here
        warnings.simplefilter("ignore")
        inject(base, AdapterConfig("cp_dora", rank=4, target_types=["Conv3d"], exclude=["M3.TripleOut.6"]))
    with torch.no_grad():
        for p in base.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    adapter = save_adapter(base, folder / "cp_dora_r4.safetensors",
                           extra_metadata={"backbone": "mv_unet", "backbone_args": arch, "spatial_dims": 3,
                                           "pretrained": str(ckpt), "preprocessing": prep})
    return ckpt, adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 32])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--level", type=int, default=2)
    ap.add_argument("--kernel", type=int, nargs=3, default=[3, 3, 1], help="(3, 3, 1): thick-slice kernels")
    ap.add_argument("--pool", type=int, nargs=3, default=[2, 2, 1])
    ap.add_argument("--roi", type=int, nargs=3, default=[128, 128, 32])
    ap.add_argument("--sw-overlap", type=float, default=DEFAULT_SW_OVERLAP)
    ap.add_argument("--sw-batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine OpenMP hand-offs make 2+ threads erratic)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from monai.inferers import sliding_window_inference

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt, adapter = build_models(folder, args)
        image = folder / "head.nii.gz"
        affine = np.diag([0.45, 0.45, 5.0, 1.0])
        save_nifti(image, synthetic_head(tuple(args.shape)), affine)

        # The plain loop's inputs: the same merged network, the volume already read and preprocessed.
        merged = load_models(ckpt, [adapter])
        predictor = Predictor(merged, device=args.device, sw_batch_size=args.sw_batch_size, overlap=args.sw_overlap)
        volume = read_nifti_volume(image)
        x = predictor.preprocess(volume.data, volume.affine).as_tensor()[None].to(predictor.device)
        net = merged.models[0]
        settings = {"sw_batch_size": args.sw_batch_size, "overlap": args.sw_overlap, "device": args.device}

        def plain() -> None:
            with torch.inference_mode():
                logits = sliding_window_inference(x, tuple(args.roi), args.sw_batch_size, net, overlap=args.sw_overlap,
                                                  mode="gaussian")
                _ = (torch.sigmoid(logits) >= 0.5).to(torch.uint8).cpu()

        def infer_adapter() -> None:
            run_inference(ckpt, [image], folder / "out_adapter", adapters=[adapter], overwrite=True, progress=False,
                          **settings)

        def infer_base() -> None:
            run_inference(ckpt, [image], folder / "out_base", overwrite=True, progress=False, **settings)

        variants = {"plain MONAI loop (merged net)": plain, "medlora infer, base + adapter": infer_adapter,
                    "medlora infer, base alone": infer_base}
        times: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        print(f"volume {tuple(args.shape)}, MV-UNet 3D width {args.width} level {args.level} kernel "
              f"{tuple(args.kernel)}, ROI {tuple(args.roi)}, overlap {args.sw_overlap}, sw batch {args.sw_batch_size}, "
              f"{torch.get_num_threads()} torch thread(s), device {args.device}, {args.reps} repetitions", flush=True)
        for rep in range(args.reps):
            order = list(variants) if rep % 2 == 0 else list(reversed(variants))  # ABC CBA: drift hits all alike
            for name in order:
                start, start_cpu = time.perf_counter(), time.process_time()
                variants[name]()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                print(f"  rep {rep + 1}: {name}: {times[name][-1]:.2f} s wall, {cpu[name][-1]:.2f} s CPU", flush=True)

    # Wall time is what a user waits; CPU time of this process is less disturbed by other jobs on a shared
    # machine (it still includes OpenMP spinning when more than one thread is used).
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    names = list(variants)
    print("\n| variant | median wall s | median CPU s | wall runs (s) |")
    print("|---|---|---|---|")
    for k in names:
        print(f"| {k} | {med[k]:.2f} | {med_cpu[k]:.2f} | {', '.join(f'{t:.2f}' for t in times[k])} |")
    print("\n| ratio | wall | CPU | target |")
    print("|---|---|---|---|")
    for label, a, b, target in (("medlora infer (base + adapter) / plain loop", 1, 0, "<= 1.1"),
                                ("base + adapter (merged) / base alone", 1, 2, "<= 1.02")):
        print(f"| {label} | {med[names[a]] / med[names[b]]:.3f} | {med_cpu[names[a]] / med_cpu[names[b]]:.3f} "
              f"| {target} |")


if __name__ == "__main__":
    main()
