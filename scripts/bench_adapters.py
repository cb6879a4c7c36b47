"""Benchmark: training-step time and peak memory of medlora adapters vs full fine-tuning and PEFT.

Measures, side by side in one run, on two 3D networks (``--models``; batch 2, cubic random patches, 64^3 and
96^3 by default):

- ``monai``: MONAI's UNet, channels 16..256, strides 2, two residual units;
- ``mv``: the seed authors' multi-view UNet (``medlora.models.mv_unet``), every convolution 32 channels, level 2;

and on each:

- ``full``: full fine-tuning, every parameter trainable;
- medlora's conv methods at rank r on every ``nn.Conv3d`` (``lora``, ``lora_c``, ``conv_lora``, ``cp_lora``,
  ``dora``, ``dora_c``, ``conv_dora``, ``cp_dora``; ``salt`` and ``svd`` with ``--with-svd``) with the default
  backward (``medlora.adapters.set_backward("auto")``: rank-space factor gradients where the cost model finds
  them cheaper); ``lora:dense`` and ``dora:dense`` run the dense path (autograd through ``W_eff``, medlora's
  backward before the factored one) as the reference "today". Any method takes ``:auto``, ``:dense`` or
  ``:factored``;
- ``peft_lora`` / ``peft_dora``: PEFT's ``LoraConfig(r, lora_alpha=r, target_modules=<every Conv3d>,
  use_dora=...)`` injected with ``peft.inject_adapter_in_model`` on the same layers.

The rank defaults to an eighth of the network's narrowest width (MONAI UNet: 2, multi-view UNet: 4), the regime
the factored backward is for; ``--rank`` sets one rank for both.

One training step is forward + DiceCE loss + backward + ``Adam(lr=1e-4).step()`` + ``zero_grad()``. Every
(method, patch size) runs in a fresh subprocess (this script re-invoked with ``--single``), so that
peak memory is measured from a clean process; the whole list of methods is run ``--rounds`` times in
alternating order (forward, reversed, forward, ...) so that machine noise hits every method alike, and
the reported step time is the median over rounds of each run's median step time.

Peak memory is the growth during the steps above a baseline taken after building model, adapters,
optimiser and data: on CPU, the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) minus the resident set before the first step; on CUDA,
``torch.cuda.max_memory_allocated()`` minus ``torch.cuda.memory_allocated()`` before the first step. It
thus counts activations, gradients, optimiser states and workspace, not the frozen model itself.

Targets checked (issues 2 and 19), for methods on the default backward: each LoRA-type method <= 0.85x the
full-FT step time, each DoRA-type <= 0.95x, each <= 0.6x PEFT's LoRA / DoRA, and none slower than its own
``:dense`` run (today's path) beyond 3 % measurement noise where that run is in the list; peak memory of each
medlora method <= full FT's. This is a benchmark: the exit code is 0 unless ``--check`` is given and a target
fails.

On a machine other processes load, ``--clock cpu --threads 1`` times each step by the process's CPU time
(``time.process_time``), which preemption does not inflate (cache sharing still does, a little).

    PYTHONPATH=. python scripts/bench_adapters.py --quick          # 64^3 only, few steps
    PYTHONPATH=. python scripts/bench_adapters.py --threads 2      # 64^3 and 96^3, both networks
    PYTHONPATH=. python scripts/bench_adapters.py --device cuda --sizes 128 --amp bf16 --check
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

LORA_TYPE = ("lora", "lora_c", "conv_lora", "cp_lora")
DORA_TYPE = ("dora", "dora_c", "conv_dora", "cp_dora")
SVD_TYPE = ("salt", "svd")
PEFT_METHODS = ("peft_lora", "peft_dora")
FULL = "full"

LORA_TIME_VS_FULL = 0.85
DORA_TIME_VS_FULL = 0.95
TIME_VS_PEFT = 0.6
TIME_VS_DENSE = 1.03  # "never slower than today", up to measurement noise
MEMORY_VS_FULL = 1.0
BACKWARD_PATHS = ("auto", "dense", "factored")
MODELS = {
    "monai": "MONAI UNet 3D channels (16, 32, 64, 128, 256) strides (2, 2, 2, 2) num_res_units 2",
    "mv": "multi-view UNet 3D (medlora.models.mv_unet) width 32, level 2, batch norm",
}
NARROWEST = {"monai": 16, "mv": 32}
# PEFT's conv LoRA builds lora_A from kernel size, stride and padding only, without the layer's dilation, so its
# branch has the wrong output size on the multi-view UNet's dilated convolutions (the M2 blocks): no PEFT rows there.
PEFT_MODELS = ("monai",)

RESULT_PREFIX = "BENCH_RESULT "

# CPU memory runs: glibc otherwise raises its mmap threshold after the first large free and serves later
# tensors from a heap it trims lazily, so the resident set overstates live memory by tens of MB, differently
# for each allocation pattern. A fixed 64 KiB threshold maps every tensor larger than that on its own and
# unmaps it when freed: the resident-set peak then tracks the peak of live tensor memory (repeatable to
# about 1 MB). It slows steps down (page faults), hence separate runs for memory and for time.
MEMORY_RUN_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# --------------------------------------------------------------------------------------------------
# child process: one (method, size) configuration
# --------------------------------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), or None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_seconds() -> tuple[float, float] | None:
    """System-wide (busy, total) CPU seconds since boot from ``/proc/stat``, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - idle) / tick, total / tick


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) to the current RSS; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build_unet(model: str = "monai") -> Any:
    if model == "mv":
        from medlora.models.mv_unet import MultiViewUNet

        return MultiViewUNet(spatial_dims=3, in_channels=1, out_channels=2)
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
    )


def conv3d_names(model: Any) -> list[str]:
    """Dotted names of every plain ``nn.Conv3d`` (not ConvTranspose3d) in ``model``."""
    from torch import nn

    return [name for name, module in model.named_modules() if type(module) is nn.Conv3d]


def split_method(name: str) -> tuple[str, str]:
    """``"lora:dense"`` -> ``("lora", "dense")``; no suffix: the default backward, ``"auto"``."""
    method, _, path = name.partition(":")
    return method, path or "auto"


def prepare_model(method: str, rank: int, seed: int, model_name: str = "monai") -> Any:
    """The network with ``method`` attached (or nothing, for full fine-tuning)."""
    import torch

    torch.manual_seed(seed)
    model = build_unet(model_name)
    if method == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    names = conv3d_names(model)
    if method in PEFT_METHODS:
        import peft

        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=names, use_dora=method == "peft_dora")
        return peft.inject_adapter_in_model(config, model)
    from medlora.adapters import AdapterConfig, inject

    with warnings.catch_warnings():
        # the 2-channel output conv gets more adapter than layer weights at rank 8; expected here
        warnings.simplefilter("ignore", UserWarning)
        return inject(model, AdapterConfig(method, rank=rank, targets=names, target_types=["Conv3d"]))


def run_single(args: argparse.Namespace) -> dict[str, Any]:
    """Time ``args.steps`` training steps of one configuration in this process and measure its peak memory."""
    import torch
    from monai.losses import DiceCELoss

    from medlora.adapters import set_backward

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    method, path = split_method(args.single)
    set_backward(path)
    model = prepare_model(method, args.rank, args.seed, args.model).to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.Adam(trainable, lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True) if args.loss == "dicece" else torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(args.seed)
    size = args.size
    image = torch.randn(args.batch, 1, size, size, size, generator=generator).to(device)
    label = torch.randint(0, 2, (args.batch, 1, size, size, size), generator=generator).to(device)
    target = label if args.loss == "dicece" else label[:, 0]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")

    def step() -> None:
        with autocast:
            loss = loss_fn(model(image), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    import gc

    gc.collect()
    sync()
    peak_method = "none"
    baseline_kib = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline_bytes = torch.cuda.memory_allocated(device)
        peak_method = "cuda.max_memory_allocated"
    else:
        baseline_kib = _proc_status_kib("VmRSS") or 0
        if _reset_peak_rss():
            peak_method = "VmHWM (clear_refs reset)"
        else:  # no /proc/self/clear_refs: process-lifetime peak, which includes setup
            peak_method = "ru_maxrss (not reset)"

    # On a shared CPU, a step during which other processes took CPU time is not counted (oversubscribed
    # OpenMP threads slow a step down many times over); extra steps replace it, up to a limit.
    times_ms: list[float] = []
    disturbed_ms: list[float] = []
    # CPU-time steps (--clock cpu) are not disturbed by preemption: no filtering.
    check_others = device.type == "cpu" and _cpu_seconds() is not None and args.clock == "wall"
    max_timed = args.steps * 6
    i = 0
    while len(times_ms) < args.steps and len(times_ms) + len(disturbed_ms) < max_timed:
        sync()
        cpu0, own0 = _cpu_seconds() if check_others else None, time.process_time()
        start = time.perf_counter()
        step()
        sync()
        end = time.process_time() if args.clock == "cpu" else time.perf_counter()
        elapsed_ms = (end - (own0 if args.clock == "cpu" else start)) * 1e3
        cpu1, own1 = _cpu_seconds() if check_others else None, time.process_time()
        if i >= args.warmup:
            others = 0.0
            if cpu0 is not None and cpu1 is not None and cpu1[1] > cpu0[1]:
                others = max(0.0, (cpu1[0] - cpu0[0]) - (own1 - own0)) / (cpu1[1] - cpu0[1])
            (times_ms if others <= args.max_foreign_load else disturbed_ms).append(elapsed_ms)
        i += 1
    clean = len(times_ms) >= args.steps
    if not clean:  # too few undisturbed steps: report all of them, flagged
        times_ms = times_ms + disturbed_ms

    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - baseline_bytes) / 2**20
        rss_peak_mb = None
    else:
        hwm = _proc_status_kib("VmHWM")
        if hwm is None or peak_method.startswith("ru_maxrss"):
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = (hwm - baseline_kib) / 1024
        rss_peak_mb = hwm / 1024
    return {
        "method": args.single,
        "model": args.model,
        "size": size,
        "trainable": n_trainable,
        "times_ms": times_ms,
        "disturbed_steps": len(disturbed_ms),
        "clean": clean,
        "median_ms": statistics.median(times_ms),
        "peak_mb": peak_mb,
        "baseline_mb": (baseline_kib / 1024) if device.type != "cuda" else baseline_bytes / 2**20,
        "process_peak_mb": rss_peak_mb,
        "peak_method": peak_method,
    }


def run_group(args: argparse.Namespace) -> dict[str, Any]:
    """``--interleave``: every method's training step in one process, one step of each in turn.

    ``--warmup`` passes, then ``--rounds`` x ``--steps`` timed passes over the methods, the order reversed on
    every other pass, so that a slow spell of a loaded machine hits every method alike. Per method: its step
    times and the median of each round's steps.
    """
    import torch
    from monai.losses import DiceCELoss

    from medlora.adapters import set_backward

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True) if args.loss == "dicece" else torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(args.seed)
    size = args.size
    image = torch.randn(args.batch, 1, size, size, size, generator=generator).to(device)
    label = torch.randint(0, 2, (args.batch, 1, size, size, size), generator=generator).to(device)
    target = label if args.loss == "dicece" else label[:, 0]
    methods = args.group.split(",")
    runs = {}
    for name in methods:
        method, path = split_method(name)
        model = prepare_model(method, args.rank, args.seed, args.model).to(device).train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        runs[name] = (model, torch.optim.Adam(trainable, lr=1e-4), path, sum(p.numel() for p in trainable))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(args.warmup + args.rounds * args.steps):
        for name in methods if i % 2 == 0 else methods[::-1]:
            model, optimizer, path, _ = runs[name]
            with set_backward(path):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = clock()
                with autocast:
                    loss = loss_fn(model(image), target)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= args.warmup:
                    times[name].append((clock() - start) * 1e3)
    return {name: {"times_ms": times[name], "trainable": runs[name][3],
                   "round_medians_ms": [statistics.median(times[name][r * args.steps:(r + 1) * args.steps])
                                        for r in range(args.rounds)]}
            for name in methods}


def per_layer(args: argparse.Namespace) -> list[str]:
    """``--per-layer``: each adapted layer's forward + backward alone on the dense and the factored path.

    The calibration data of the cost model (``medlora.adapters.factored.COST_RATIO``): per layer its ratio of
    multiply-adds, the path ``"auto"`` takes, and the measured times (best of ``--steps``). Input shapes are those
    the layer sees in the network at the first ``--sizes`` patch size; the upstream gradient is random.
    """
    import torch

    from medlora.adapters import backward_path, iter_adapters, set_backward
    from medlora.adapters.factored import COST_RATIO, cost_ratio

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = args.sizes[0]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    lines = [f"\n## per layer: forward + backward alone, {size}^3 input to the network, batch {args.batch}, "
             f"{args.device}, best of {args.steps}; auto goes factored where the model ratio <= {COST_RATIO}\n",
             "| model | method | layer | weight | input | model ratio | auto | dense ms | factored ms | time ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model_name in args.models:
        for method in args.methods or ["lora", "dora"]:
            base = split_method(method)[0]
            model = prepare_model(base, rank_for(args, model_name), args.seed, model_name).to(device)
            shapes: dict[str, tuple[int, ...]] = {}

            def record(module, inputs, name, shapes=shapes):
                shapes.setdefault(name, tuple(inputs[0].shape))

            hooks = [module.register_forward_pre_hook(functools.partial(record, name=name))
                     for name, module, _ in iter_adapters(model)]
            with torch.no_grad():
                model(torch.randn(args.batch, 1, size, size, size, device=device))
            for hook in hooks:
                hook.remove()
            for name, module, _ in iter_adapters(model):
                shape = shapes.get(name)
                if shape is None:
                    continue
                x = torch.randn(shape, device=device, requires_grad=True)
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
                    grad = torch.randn_like(module(x))
                times = {}
                for path in ("dense", "factored"):
                    best = float("inf")
                    with set_backward(path):
                        for i in range(args.steps + 1):
                            if device.type == "cuda":
                                torch.cuda.synchronize(device)
                            start = clock()
                            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
                                y = module(x)
                            y.backward(grad)
                            if device.type == "cuda":
                                torch.cuda.synchronize(device)
                            if i:  # the first round warms up
                                best = min(best, clock() - start)
                    times[path] = best * 1e3
                ratio = cost_ratio(module, shape)
                weight = "x".join(map(str, module.parametrizations["weight"].original.shape))
                lines.append(
                    f"| {model_name} | {method} | {name} | {weight} | {'x'.join(map(str, shape))} | "
                    + ("-" if ratio is None else f"{ratio:.2f}") + f" | {backward_path(module, shape)} | "
                    f"{times['dense']:.2f} | {times['factored']:.2f} | {times['factored'] / times['dense']:.2f} |")
                print(lines[-1], file=sys.stderr, flush=True)
    return lines


# --------------------------------------------------------------------------------------------------
# parent: schedule children, aggregate, print
# --------------------------------------------------------------------------------------------------


@dataclass
class Aggregate:
    method: str
    size: int
    trainable: int = 0
    run_medians_ms: list[float] = field(default_factory=list)
    peaks_mb: list[float] = field(default_factory=list)  # from the timing runs (CPU: default malloc RSS)
    live_peaks_mb: list[float] = field(default_factory=list)  # from the CPU memory runs
    errors: list[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.run_medians_ms) if self.run_medians_ms else None

    @property
    def spread_pct(self) -> float | None:
        """(max - min) of the per-run medians, in percent of their median."""
        med = self.median_ms
        if med is None or len(self.run_medians_ms) < 2:
            return None
        return 100.0 * (max(self.run_medians_ms) - min(self.run_medians_ms)) / med

    @property
    def peak_mb(self) -> float | None:
        """Peak memory used for the memory target: the memory runs' if any, else the timing runs'."""
        values = self.live_peaks_mb or self.peaks_mb
        return statistics.median(values) if values else None

    @property
    def rss_peak_mb(self) -> float | None:
        return statistics.median(self.peaks_mb) if self.peaks_mb else None


def kind_of(method: str) -> str:
    """``lora``/``dora``/``svd`` for medlora methods on the default backward, ``reference`` for their
    ``:dense``/``:factored`` runs, ``baseline`` for full FT and PEFT."""
    method, path = split_method(method)
    if path != "auto" and method in LORA_TYPE + DORA_TYPE + SVD_TYPE:
        return "reference"
    if method in LORA_TYPE:
        return "lora"
    if method in DORA_TYPE:
        return "dora"
    if method in SVD_TYPE:
        return "svd"
    return "baseline"


def child_command(args: argparse.Namespace, method: str, size: int, memory: bool) -> list[str]:
    # a memory run: 3 steps (the second already holds optimiser state and activations), no step filtering
    steps, warmup, max_foreign = (2, 1, 1.0) if memory else (args.steps, args.warmup, args.max_foreign_load)
    return [
        sys.executable, str(Path(__file__).resolve()), "--single", method, "--size", str(size),
        "--rank", str(args.rank), "--batch", str(args.batch), "--steps", str(steps),
        "--warmup", str(warmup), "--threads", str(args.threads), "--device", args.device,
        "--seed", str(args.seed), "--loss", args.loss, "--max-foreign-load", str(max_foreign),
        "--model", args.model, "--clock", args.clock, "--amp", args.amp,
    ]


def _children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_idle(max_busy: float, max_wait: float) -> float:
    """Wait until the machine's CPU use (by others: this process idles) stays below ``max_busy`` for 1 s.

    Returns the seconds waited; gives up after ``max_wait`` seconds (the run then carries its measured
    foreign load, see :func:`run_child`).
    """
    start = time.perf_counter()
    announced = False
    while True:
        a = _cpu_seconds()
        time.sleep(1.0)
        b = _cpu_seconds()
        if a is None or b is None or b[1] <= a[1]:
            return 0.0
        if (b[0] - a[0]) / (b[1] - a[1]) < max_busy or time.perf_counter() - start > max_wait:
            return time.perf_counter() - start
        if not announced:
            print(f"  (other processes are using the CPU; waiting up to {max_wait:.0f} s)", file=sys.stderr, flush=True)
            announced = True
        time.sleep(4.0)


def run_child(args: argparse.Namespace, method: str, size: int, memory: bool = False) -> dict[str, Any]:
    """Run one configuration in a fresh process; retry it when other processes loaded the CPU meanwhile.

    ``memory``: a short CPU run for peak memory only, with glibc's mmap threshold fixed (see
    :data:`MEMORY_RUN_ENV`) so that the resident set follows live tensor memory.
    """
    result: dict[str, Any] = {}
    for attempt in range(args.retries + 1):
        waiting = args.device == "cpu" and args.clock == "wall"
        waited = wait_for_idle(args.max_foreign_load, args.max_wait) if waiting else 0.0
        cpu0, child0, wall0 = _cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
        result = _run_child_once(args, method, size, memory)
        cpu1, child1, wall1 = _cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
        foreign = None
        if cpu0 is not None and cpu1 is not None and cpu1[1] > cpu0[1]:
            # CPU time spent by every process other than the child, as a share of all cores' time
            foreign = max(0.0, (cpu1[0] - cpu0[0]) - (child1 - child0)) / (cpu1[1] - cpu0[1])
        result.update({"foreign_load": foreign, "attempt": attempt, "waited_s": waited, "wall_s": wall1 - wall0})
        if "error" in result or result.get("clean", True):
            break
        print(f"  ({method} @ {size}^3: too few steps undisturbed by other processes; retrying)",
              file=sys.stderr, flush=True)
    return result


def run_group_child(args: argparse.Namespace, methods: list[str], size: int) -> dict[str, Any]:
    """:func:`run_group` for ``methods`` in a fresh process; ``{"error": ...}`` if it fails."""
    command = child_command(args, methods[0], size, memory=False)
    command[command.index("--single") + 1] = "-"
    command += ["--group", ",".join(methods), "--rounds", str(args.rounds)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout * len(methods))
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def _run_child_once(args: argparse.Namespace, method: str, size: int, memory: bool) -> dict[str, Any]:
    env = dict(os.environ)
    if memory:
        env.update(MEMORY_RUN_ENV)
    root = str(REPO_ROOT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    try:
        proc = subprocess.run(
            child_command(args, method, size, memory), capture_output=True, text=True, env=env, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def environment(args: argparse.Namespace) -> list[str]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    mem_kib = None
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration):
        pass
    versions = [f"torch {torch.__version__}"]
    for mod in ("monai", "peft", "tensorly"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            versions.append(f"{mod} missing")
    lines = [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"python {platform.python_version()}, " + ", ".join(versions),
        f"cpu: {cpu}, {os.cpu_count()} logical cores"
        + (f", {mem_kib / 2**20:.1f} GiB RAM" if mem_kib else ""),
        f"device: {args.device}"
        + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" and torch.cuda.is_available() else ""),
        f"threads: {args.threads} (torch.set_num_threads, OMP_NUM_THREADS); clock: "
        + ("process CPU time per step" if args.clock == "cpu" else "wall time per step")
        + (", bf16 autocast" if args.amp == "bf16" else ""),
        *[f"model {name}: {MODELS[name]}, rank {rank_for(args, name)} on every Conv3d"
          for name in args.models],
        f"batch {args.batch}, loss {args.loss}, Adam lr 1e-4",
        f"schedule: {args.rounds} round(s) x {args.warmup} warmup + {args.steps} timed steps per run, "
        f"each run in a fresh process; step time = median over rounds of per-run median",
    ]
    return lines


def rank_for(args: argparse.Namespace, model: str) -> int:
    """``--rank``, or an eighth of the network's narrowest width."""
    return args.rank if args.rank is not None else max(1, NARROWEST[model] // 8)


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def _verdict(ratio: float | None, limit: float) -> str:
    if ratio is None:
        return "n/a"
    return f"{'PASS' if ratio <= limit else 'FAIL'} (<={limit:g})"


def table_for_size(results: dict[str, Aggregate], methods: list[str], where: str = "") -> tuple[list[str], list[str]]:
    """Markdown table rows for one network and patch size, and the failed targets."""
    full = results[FULL]
    headers = [
        "method", "trainable params", "step ms (median)", "run spread %", "x full FT", "x PEFT ref", "x dense path",
        "peak MB", "mem x full FT", "RSS peak MB", "time vs full", "time vs PEFT", "vs today", "memory",
    ]
    rows: list[list[str]] = []
    failures: list[str] = []

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    for method in methods:
        agg = results[method]
        kind = kind_of(method)
        base = split_method(method)[0]
        base_kind = kind_of(base)
        ref = {"lora": "peft_lora", "dora": "peft_dora", "svd": "peft_lora"}.get(base_kind)
        if method == "peft_dora":
            ref = "peft_lora"  # shown for information: PEFT DoRA vs PEFT LoRA
        ref_ms = results[ref].median_ms if ref in results else None
        r_full = _ratio(agg.median_ms, full.median_ms)
        r_ref = _ratio(agg.median_ms, ref_ms) if ref and ref != method else None
        r_mem = _ratio(agg.peak_mb, full.peak_mb)
        dense = f"{base}:dense"
        r_dense = _ratio(agg.median_ms, results[dense].median_ms) if kind != "reference" and dense in results else None
        time_full = time_peft = today = memory = "-"
        if kind in ("lora", "dora"):
            time_full = _verdict(r_full, LORA_TIME_VS_FULL if kind == "lora" else DORA_TIME_VS_FULL)
            time_peft = _verdict(r_ref, TIME_VS_PEFT)
            if dense in results:
                today = _verdict(r_dense, TIME_VS_DENSE)
        if kind in ("lora", "dora", "svd", "reference"):
            memory = _verdict(r_mem, MEMORY_VS_FULL)
        for name, verdict in (("time vs full FT", time_full), ("time vs PEFT", time_peft),
                              ("time vs the dense path", today), ("memory", memory)):
            if verdict.startswith("FAIL") or (verdict == "n/a" and kind in ("lora", "dora") and agg.median_ms is None):
                failures.append(f"{method} @ {where}{agg.size}^3: {name} {verdict}")
        label = method + (f" (vs {ref})" if ref and ref != method and r_ref is not None else "")
        if agg.errors and agg.median_ms is None:
            label += " ERROR"
        rows.append([
            label, f"{agg.trainable:,}", fmt(agg.median_ms, ".0f"), fmt(agg.spread_pct, ".1f"),
            fmt(r_full, ".3f"), fmt(r_ref, ".3f"), fmt(r_dense, ".3f"), fmt(agg.peak_mb, ".0f"), fmt(r_mem, ".3f"),
            fmt(agg.rss_peak_mb, ".0f"), time_full, time_peft, today, memory,
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return lines, failures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                   help="networks (default: monai mv)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96], help="cubic patch sizes (default 64 96)")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"medlora methods, each optionally :auto/:dense/:factored (default: lora:dense "
                        f"dora:dense {' '.join(LORA_TYPE + DORA_TYPE)});\n"
                        f"full, peft_lora, peft_dora always run as references")
    p.add_argument("--with-svd", action="store_true", help="also run salt and svd")
    p.add_argument("--rank", type=int, default=None, help="one rank for every network (default: narrowest width / 8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 5; --quick 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default 2; --quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="passes over the method list (default 3; --quick 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--amp", choices=["none", "bf16"], default="none", help="bf16: forward and loss under autocast")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: wall time per step; cpu: this process's CPU time per step (use with --threads 1\n"
                        "on a loaded machine: preemption does not count, no run is waited for or retried)")
    p.add_argument("--loss", choices=["dicece", "ce"], default="dicece", help="MONAI DiceCELoss or plain CE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="64^3 only, few steps")
    p.add_argument("--check", action="store_true", help="exit 1 if any target fails")
    p.add_argument("--per-layer", action="store_true",
                   help="instead: time each adapted layer alone on the dense and the factored path\n"
                        "(the cost model's calibration data; first --sizes value, --methods default lora dora)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw per-run results here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per child run")
    p.add_argument("--max-foreign-load", type=float, default=0.15,
                   help="CPU: before each run, wait until other processes use less than this share of the\n"
                        "CPU; rerun a run during which they used more (default 0.15)")
    p.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for an idle CPU (default 600)")
    p.add_argument("--memory-runs", type=int, default=1,
                   help="CPU: separate short runs per method for peak memory with a fixed malloc mmap\n"
                        "threshold (default 1; 0: take memory from the timing runs' RSS)")
    p.add_argument("--retries", type=int, default=2, help="reruns of a run disturbed by other processes")
    p.add_argument("--interleave", action="store_true",
                   help="time all methods of a network and size in one process, one step of each in turn\n"
                        "(robust on a loaded machine; peak memory still from --memory-runs' fresh processes)")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    p.add_argument("--group", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--model", choices=list(MODELS), default="monai", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        if "--sizes" not in (argv if argv is not None else sys.argv[1:]):
            args.sizes = [64]
        defaults = {"steps": 4, "warmup": 1, "rounds": 2}
    else:
        defaults = {"steps": 5, "warmup": 2, "rounds": 3}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step allocates optimiser state and, for salt/svd, the SVD)")
    for method in args.methods or []:
        if split_method(method)[1] not in BACKWARD_PATHS:
            p.error(f"--methods: {method!r}: the backward after ':' must be one of {', '.join(BACKWARD_PATHS)}")
    if args.amp == "bf16" and args.device != "cuda":
        p.error("--amp bf16 is for --device cuda (CPU autocast times are not comparable to float32 ones)")
    return args


def _record(results: dict[str, Aggregate], raw: list[dict[str, Any]], res: dict[str, Any], memory: bool) -> str:
    """Store one child's result; the progress message for it."""
    raw.append(res)
    agg = results[res["method"]]
    if "error" in res:
        agg.errors.append(res["error"])
        return f"ERROR {res['error']}"
    if memory:
        agg.live_peaks_mb.append(res["peak_mb"])
        return f"live peak +{res['peak_mb']:.0f} MB"
    agg.trainable = res["trainable"]
    agg.run_medians_ms.append(res["median_ms"])
    if res.get("interleaved"):
        return f"{res['median_ms']:.0f} ms"
    agg.peaks_mb.append(res["peak_mb"])
    msg = f"{res['median_ms']:.0f} ms, RSS peak +{res['peak_mb']:.0f} MB"
    if res.get("foreign_load") is not None:
        msg += f", others' CPU {100 * res['foreign_load']:.0f}%, {res.get('disturbed_steps', 0)} steps dropped"
    return msg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.group is not None:
        print(RESULT_PREFIX + json.dumps(run_group(args)), flush=True)
        return 0
    if args.single is not None:
        print(RESULT_PREFIX + json.dumps(run_single(args)), flush=True)
        return 0
    if args.per_layer:
        print("# medlora factored backward: per-layer timings")
        print("\n".join(environment(args) + per_layer(args)))
        return 0

    ours = list(args.methods) if args.methods else ["lora:dense", "dora:dense", *LORA_TYPE, *DORA_TYPE]
    if args.with_svd:
        ours += [m for m in SVD_TYPE if m not in ours]
    methods = [FULL, *PEFT_METHODS, *[m for m in ours if m not in (FULL, *PEFT_METHODS)]]

    print("# medlora adapter benchmark", flush=True)
    for line in environment(args):
        print(line, flush=True)
    print(flush=True)

    cells = [(model, size) for model in args.models for size in args.sizes]
    results = {cell: {m: Aggregate(m, cell[1]) for m in methods} for cell in cells}
    raw: list[dict[str, Any]] = []
    memory_runs = args.memory_runs if args.device == "cpu" else 0
    def runs_on(model: str) -> list[str]:
        return [m for m in methods if model in PEFT_MODELS or m not in PEFT_METHODS]

    total = sum((args.rounds + memory_runs) * len(runs_on(model)) for model, _ in cells)
    done = 0
    t0 = time.perf_counter()
    for model, size in cells:
        child_args = argparse.Namespace(**{**vars(args), "model": model, "rank": rank_for(args, model)})
        here = runs_on(model)
        runs = [(rnd, True, here) for rnd in range(memory_runs)]
        if args.interleave:
            start = time.perf_counter()
            group = run_group_child(child_args, here, size)
            done += args.rounds * len(here)
            for method in here:
                res = group.get(method, {"error": group.get("error", "no result")})
                for rnd, median_ms in enumerate(res.get("round_medians_ms", [None])):
                    one = {"method": method, "model": model, "size": size, "round": rnd, "memory_run": False,
                           "interleaved": True}
                    one.update({"error": res["error"]} if "error" in res else
                               {"median_ms": median_ms, "trainable": res["trainable"],
                                "times_ms": res["times_ms"][rnd * args.steps:(rnd + 1) * args.steps]})
                    _record(results[(model, size)], raw, one, memory=False)
            print(f"[{done}/{total} {time.perf_counter() - t0:.0f}s] {model} {size}^3 interleaved timing of "
                  f"{len(here)} methods: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        else:
            runs += [(rnd, False, here if rnd % 2 == 0 else here[::-1]) for rnd in range(args.rounds)]
        for rnd, memory, order in runs:
            for method in order:
                res = run_child(child_args, method, size, memory=memory)
                done += 1
                res.update({"round": rnd, "method": method, "model": model, "size": size, "memory_run": memory})
                msg = _record(results[(model, size)], raw, res, memory)
                what = "memory run" if memory else "round"
                print(f"[{done}/{total} {time.perf_counter() - t0:.0f}s] {model} {size}^3 {what} {rnd + 1} {method}: "
                      f"{msg}", file=sys.stderr, flush=True)

    all_failures: list[str] = []
    for model, size in cells:
        lines, failures = table_for_size(results[(model, size)], runs_on(model), where=f"{model} ")
        all_failures += failures
        print(f"\n## {model} ({MODELS[model].split(' (')[0]}, rank {rank_for(args, model)}), {size}^3 patches, "
              f"batch {args.batch}, {args.device}, {args.threads} thread(s)\n")
        print("\n".join(lines))
    peak_methods = sorted({r.get("peak_method", "?") for r in raw if "error" not in r})
    print(f"\npeak memory: growth during the steps above the post-setup baseline, via {', '.join(peak_methods)}.")
    if memory_runs:
        print(f"peak MB: median of {memory_runs} separate 3-step run(s) per method with "
              + " ".join(f"{k}={v}" for k, v in MEMORY_RUN_ENV.items())
              + " (resident set follows live tensors); RSS peak MB: median of the timing runs, default malloc "
              "(includes allocator caching, shown for information).")
    else:
        print("peak MB and RSS peak MB: median of the timing runs.")
    if any(model not in PEFT_MODELS for model in args.models):
        print("no PEFT rows for the multi-view UNet: PEFT's conv LoRA ignores the layers' dilation (lora_A is built "
              "from kernel size, stride and padding only) and fails on its dilated convolutions.")
    print("x PEFT ref: LoRA-type vs peft_lora, DoRA-type vs peft_dora (peft_dora row: vs peft_lora); x dense path: "
          "vs the same method's :dense run (today's backward); run spread: (max - min) / median of the per-run "
          "median step times.")
    if args.interleave:
        print("step times: all methods of a table timed in one process, one step of each in turn "
              f"({args.warmup} warm-up pass(es), {args.rounds} x {args.steps} timed); run spread: over the rounds' "
              "medians; RSS peak MB: not measured.")
    print(f"targets (default backward): LoRA-type <= {LORA_TIME_VS_FULL}x full FT and <= {TIME_VS_PEFT}x peft_lora; "
          f"DoRA-type <= {DORA_TIME_VS_FULL}x full FT and <= {TIME_VS_PEFT}x peft_dora; <= {TIME_VS_DENSE}x their "
          f":dense run; peak memory <= {MEMORY_VS_FULL}x full FT.")
    loads = [r["foreign_load"] for r in raw if r.get("foreign_load") is not None]
    if loads:
        dropped = sum(r.get("disturbed_steps", 0) for r in raw)
        unclean = sum(1 for r in raw if r.get("clean") is False)
        print("other processes' CPU use during runs (whole child process): "
              f"median {100 * statistics.median(loads):.1f}%, "
              f"max {100 * max(loads):.1f}%; timed steps dropped as disturbed (> {100 * args.max_foreign_load:.0f}% "
              f"of the CPU used by others): {dropped}; runs kept with too few undisturbed steps: {unclean}")
    if all_failures:
        print(f"\n{len(all_failures)} target(s) missed:")
        for f in all_failures:
            print(f"  - {f}")
    else:
        print("\nall targets met")
    if args.json is not None:
        args.json.write_text(json.dumps({"environment": environment(args), "runs": raw}, indent=1))
    return 1 if (args.check and all_failures) else 0


if __name__ == "__main__":
    sys.exit(main())
