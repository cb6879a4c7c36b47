"""The engine-independent core of ``medlora serve``: one base, adapters loaded on demand, concurrent requests
segmented together.

A request is a CT volume (the bytes of a NIfTI upload) and an adapter name (None: the base itself). A batch of
requests (what the serving engine's dynamic batching collects, :mod:`medlora.serving.server`) is segmented
exactly as ``medlora infer`` segments each volume alone: the same reading and checks
(:func:`medlora.inference.read_case`), the same preprocessing, MONAI sliding windows and inversion to the
input's grid (:class:`medlora.inference.Predictor`), the same label file (:func:`medlora.data.nifti.write_nifti`).
Only the network calls are shared: each request's sliding-window pass runs in its own thread, and every
network call waits until every unfinished pass of the batch has its next windows ready (:class:`Lockstep`);
those windows then go through one call. How that call is computed is the ``mode``:

* ``mixed`` (default): one :class:`medlora.adapters.AdapterBank` call, each window through its request's
  adapter (S-LoRA's heterogeneous batch, arXiv 2311.03285; for convolutions a grouped convolution over the
  adapters present, see ``docs/multi_adapter.md``). Adapters are kept in the bank apart from the base, and an
  LRU cache of ``cache_size`` adapters decides which stay resident (S-LoRA keeps all adapters in host memory
  and pages the active ones to the GPU; here they are read from their files on a miss).
* ``merged``: one merged copy of the base per adapter (``W0 + dW`` in plain layers, as ``medlora infer`` runs
  them), ``cache_size`` of them resident; the windows of one adapter go through one call, adapters one after
  the other (what a model server without adapter support does with one model per adapter).
* ``per-request``: the adapter is read and merged for every request, each request's windows alone.

The last two exist to measure the first against (``scripts/bench_serve.py``). Adapter files are
``DIR/<name>.safetensors`` or ``DIR/<name>/adapter.safetensors`` (a crossval job folder's layout), found when
requested, so adapters added to ``DIR`` later are served too.

Every problem with one request is a :class:`ServeError` carrying an HTTP status and one line; the other
requests of the batch are not affected.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adapters import AdapterBank, read_adapter_file
from ..assembly import load_adapter_onto
from ..data.nifti import write_nifti
from ..errors import MedloraError
from ..evaluation.predict import DEFAULT_SW_BATCH_SIZE, DEFAULT_SW_OVERLAP
from ..inference.infer import (
    Architecture,
    InferenceError,
    InferenceModels,
    Predictor,
    Preprocessing,
    _load_base,
    _read_lightning_checkpoint,
    resolve_device,
)
from ..inference.io import InputCase, Volume, case_id_for, read_case, voxel_volume_mm3
from ..models.weights import WeightsError

__all__ = ["MODES", "Lockstep", "Segmentation", "ServeError", "ServeRequest", "Service"]

MODES: tuple[str, ...] = ("mixed", "merged", "per-request")
# Adapter names are file names in DIR: no path separators, no leading dot (so no '..').
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")


class ServeError(MedloraError, ValueError):
    """One request that cannot be answered: ``status`` (HTTP) and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(" ".join(message.split()))
        self.status = status


@dataclass
class ServeRequest:
    """A decoded request: the volume as ``medlora infer`` reads it, the adapter, the upload's file name."""

    volume: Volume
    adapter: str | None
    filename: str

    @property
    def case_id(self) -> str:
        return case_id_for(self.filename)


@dataclass
class Segmentation:
    """One answer: the label NIfTI (the input's geometry) and what the headers report."""

    nifti: bytes
    filename: str
    adapter: str | None
    voxels: int
    volume_ml: float
    cache: str  # hit | miss | base | merged-now
    batch: dict[str, Any] = field(default_factory=dict)  # size, adapters, seconds


class Lockstep:
    """Network calls of several concurrent callers, run together.

    Caller ``k`` calls :meth:`call` with its input and blocks until every caller that has not finished
    (:meth:`done`) has also called; the last one to arrive runs ``run`` on all inputs at once (in its own thread,
    so thread-local modes such as ``torch.inference_mode`` and autocast are those of the callers) and every
    caller gets its own output back. An exception of ``run`` is raised in every caller of that round.
    """

    def __init__(self, callers: Sequence[Hashable], run: Callable[[dict[Hashable, Any]], dict[Hashable, Any]]):
        self._run = run
        self._cond = threading.Condition()
        self._live = set(callers)
        self._pending: dict[Hashable, Any] = {}
        self._results: dict[Hashable, Any] = {}
        self._errors: dict[Hashable, BaseException] = {}
        self.rounds = 0

    def call(self, key: Hashable, value: Any) -> Any:
        with self._cond:
            if key not in self._live:
                raise RuntimeError(f"Lockstep: caller {key!r} is not (or no longer) live")
            self._pending[key] = value
            self._run_if_complete()
            while key not in self._results and key not in self._errors:
                self._cond.wait()
            if key in self._errors:
                raise self._errors.pop(key)
            return self._results.pop(key)

    def done(self, key: Hashable) -> None:
        """Caller ``key`` makes no more calls (finished or failed): the others no longer wait for it."""
        with self._cond:
            self._live.discard(key)
            self._pending.pop(key, None)
            self._run_if_complete()

    def _run_if_complete(self) -> None:
        if not self._pending or set(self._pending) != self._live:
            return
        pending, self._pending = self._pending, {}
        self.rounds += 1
        try:
            out = self._run(pending)
        except BaseException as exc:  # every caller of this round sees it; the next rounds may still run
            self._errors.update(dict.fromkeys(pending, exc))
        else:
            self._results.update({k: out[k] for k in pending})
        self._cond.notify_all()


class _Windows(nn.Module):
    """What a request's sliding-window pass calls as its network: its windows go through the lockstep."""

    def __init__(self, lockstep: Lockstep, key: Hashable) -> None:
        super().__init__()
        self.lockstep, self.key = lockstep, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lockstep.call(self.key, x)


@dataclass
class _Adapter:
    path: Path
    preprocessing: Preprocessing
    network: nn.Module | None = None  # merged modes: the merged copy


class Service:
    """One base network and its adapters, answering batches of :class:`ServeRequest` (see the module docstring).

    Args:
        model: the base weights: a plain state dict (``.safetensors``/``.pt``; the architecture is then read from
            the adapter files in ``adapters``) or a Lightning checkpoint of a full model (its architecture and
            preprocessing record also allow requests without an adapter, as ``medlora infer --model CKPT``).
        adapters: the folder of adapter files.
        cache_size: adapters (``merged``: merged models) kept resident, least recently used evicted first.
        device, sw_batch_size, overlap: as ``medlora infer`` (``--device``, ``--sw-batch-size``, ``--sw-overlap``).
        mode: ``mixed`` | ``merged`` | ``per-request``.
    """

    def __init__(self, model: str | os.PathLike[str], adapters: str | os.PathLike[str], *, cache_size: int = 8,
                 device: str | torch.device = "cpu", sw_batch_size: int = DEFAULT_SW_BATCH_SIZE,
                 overlap: float = DEFAULT_SW_OVERLAP, mode: str = "mixed") -> None:
        if mode not in MODES:
            raise InferenceError(f"--mode {mode}: choose one of {', '.join(MODES)}")
        if cache_size < 1:
            raise InferenceError(f"--cache-size must be at least 1, got {cache_size}")
        self.mode, self.cache_size = mode, int(cache_size)
        self.model_path, self.adapter_dir = Path(model), Path(adapters)
        if not self.model_path.is_file():
            raise WeightsError(f"{self.model_path}: weights file not found (--model)")
        if not self.adapter_dir.is_dir():
            raise InferenceError(f"{self.adapter_dir}: adapter folder not found (--adapters)")
        ckpt = _read_lightning_checkpoint(self.model_path)
        hp = ckpt["hyper_parameters"] if ckpt else None
        if hp is not None and hp.get("adapter") is not None:
            raise InferenceError(f"{self.model_path}: checkpoint of an adapter run (it holds only the adapter); "
                                 "serve its base weights and put its adapter.safetensors into --adapters")
        if hp is not None:
            self.architecture = Architecture.from_record(hp, str(self.model_path))
            self.base_preprocessing: Preprocessing | None = Preprocessing.from_record(
                ckpt["medlora_preprocessing"], str(self.model_path), default_threshold=float(hp.get("threshold", 0.5)))
        else:
            self.architecture = self._architecture_from_adapters()
            self.base_preprocessing = None
        self.device = resolve_device(device)
        self.sw_batch_size, self.overlap = int(sw_batch_size), float(overlap)
        base = _load_base(self.model_path, self.architecture).eval()
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base.to(self.device)
        # The bank uses the base's own tensors (no second copy): the service never changes them.
        self.bank = AdapterBank(self.base, copy_base=False).eval() if mode == "mixed" else None
        self._resident: OrderedDict[str, _Adapter] = OrderedDict()
        self._predictors: dict[Preprocessing, Predictor] = {}
        self._lock = threading.Lock()  # one batch at a time (the engine calls from one worker thread anyway)
        self.loads = 0  # adapter files read (tests and the benchmark look at it)
        if self.base_preprocessing is not None:
            self._predictor(self.base_preprocessing)  # checks the record's sliding-window size now

    # ----------------------------------------------------------------------------------------- adapters

    def _architecture_from_adapters(self) -> Architecture:
        """A plain state dict records no backbone: the first readable adapter file's record gives it (every adapter
        is checked against it when loaded)."""
        problems = []
        for path in self.adapter_files().values():
            try:
                meta, _ = read_adapter_file(path)
                return Architecture.from_record(meta.get("extra") or {}, str(path))
            except MedloraError as exc:
                problems.append(str(exc))
        raise InferenceError(f"{self.model_path}: a plain state dict records no backbone, and {self.adapter_dir} "
                             f"holds no readable adapter file to read it from ({'; '.join(problems[:2]) or 'none'}); "
                             "add one or serve a Lightning checkpoint")

    def adapter_files(self) -> dict[str, Path]:
        """The adapters in the folder now, by name."""
        found: dict[str, Path] = {}
        for entry in sorted(self.adapter_dir.iterdir()):
            if entry.is_file() and entry.name.endswith(".safetensors"):
                found.setdefault(entry.name[: -len(".safetensors")], entry)
            elif entry.is_dir() and (entry / "adapter.safetensors").is_file():
                found.setdefault(entry.name, entry / "adapter.safetensors")
        return {k: v for k, v in found.items() if _NAME_RE.match(k)}

    @property
    def resident(self) -> list[str]:
        """Adapters held now, least recently used first."""
        return list(self._resident)

    def _adapter_path(self, name: str) -> Path:
        if not _NAME_RE.match(name):
            raise ServeError(400, f"adapter name {name!r}: letters, digits and _ . + - only (a file name in "
                                  f"{self.adapter_dir}, without .safetensors)")
        for path in (self.adapter_dir / f"{name}.safetensors", self.adapter_dir / name / "adapter.safetensors"):
            if path.is_file():
                return path
        names = list(self.adapter_files())
        listed = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        raise ServeError(404, f"unknown adapter {name!r}: no {name}.safetensors or {name}/adapter.safetensors in "
                              f"{self.adapter_dir} (available: {listed or 'none'})")

    def _load(self, name: str) -> _Adapter:
        """Read adapter ``name`` (checked against the base) and make it usable; nothing changes on failure."""
        path = self._adapter_path(name)
        try:
            meta, _ = read_adapter_file(path)
            extra = meta.get("extra") or {}
            arch = Architecture.from_record(extra, str(path))
            if arch != self.architecture:
                raise ServeError(422, f"{path}: adapter of a {arch.backbone} {arch.backbone_args} "
                                      f"({arch.spatial_dims}D); the served base is a {self.architecture.backbone} "
                                      f"{self.architecture.backbone_args} ({self.architecture.spatial_dims}D)")
            prep = Preprocessing.from_record(extra.get("preprocessing"), str(path))
            self._predictor(prep)
            adapter = _Adapter(path, prep)
            if self.mode == "mixed":
                assert self.bank is not None
                with warnings.catch_warnings():  # inject's advice on adapter sizes is for training time
                    warnings.filterwarnings("ignore", message=".*adapter parameters >= the layer")
                    self.bank.add(name, path)  # checks the base fingerprint
                self.bank.to(self.device)
            else:
                adapter.network = load_adapter_onto(self.base, path, merge_weights=True).eval().to(self.device)
        except ServeError:
            raise
        except MedloraError as exc:  # a foreign base, a broken file, a method a mixed batch cannot compute
            raise ServeError(422, str(exc)) from None
        self.loads += 1
        return adapter

    def _evict(self, keep: set[str]) -> None:
        for name in list(self._resident):
            if len(self._resident) < self.cache_size:
                return
            if name not in keep:
                del self._resident[name]
                if self.bank is not None:
                    self.bank.remove(name)

    def _acquire(self, names: list[str]) -> dict[str, tuple[_Adapter | ServeError, str]]:
        """Make ``names`` resident (at most ``cache_size`` of them): per name the adapter (or its error) and
        whether it was a cache hit (nothing in ``per-request`` mode)."""
        out: dict[str, tuple[_Adapter | ServeError, str]] = {}
        wanted = set(names)
        for name in names:
            if self.mode == "per-request":  # loaded per request in _round
                continue
            if name in self._resident:
                self._resident.move_to_end(name)
                out[name] = (self._resident[name], "hit")
                continue
            self._evict(wanted)
            try:
                adapter = self._load(name)
            except ServeError as exc:
                out[name] = (exc, "")
                continue
            self._resident[name] = adapter
            out[name] = (adapter, "miss")
        return out

    def _predictor(self, prep: Preprocessing) -> Predictor:
        predictor = self._predictors.get(prep)
        if predictor is None:
            models = InferenceModels([], [], self.architecture, prep)
            predictor = Predictor(models, device=self.device, sw_batch_size=self.sw_batch_size, overlap=self.overlap)
            self._predictors[prep] = predictor
        return predictor

    # ------------------------------------------------------------------------------------------ requests

    @staticmethod
    def decode(data: bytes, filename: str | None, adapter: str | None) -> ServeRequest:
        """Read an uploaded NIfTI volume as ``medlora infer`` reads a file (and with its checks)."""
        name = Path(filename or "upload.nii.gz").name or "upload.nii.gz"
        if not data:
            raise ServeError(400, f"{name}: empty upload (send the NIfTI file as the multipart field 'file')")
        # nibabel decides by the file ending whether to decompress: take it from the bytes, not the client's name.
        suffix = ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
        with tempfile.TemporaryDirectory(prefix="medlora-serve-") as tmp:
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(data)
            try:
                volume = read_case(InputCase("upload", path, "nifti"))
            except MedloraError as exc:
                raise ServeError(400, str(exc).replace(str(path), name)) from None
            except Exception as exc:  # a reader's unexpected failure on hostile bytes is still the upload's
                raise ServeError(400, f"{name}: cannot read the NIfTI upload ({type(exc).__name__}: {exc})") from None
        return ServeRequest(volume, adapter or None, name)

    def segment(self, requests: Sequence[ServeRequest | ServeError]) -> list[Segmentation | ServeError]:
        """Answer a batch: one :class:`Segmentation` or :class:`ServeError` per request, in order. Requests that
        need more distinct adapters than the cache holds are answered in several rounds."""
        with self._lock:
            answers: list[Segmentation | ServeError | None] = [r if isinstance(r, ServeError) else None
                                                               for r in requests]
            todo = [i for i, r in enumerate(requests) if isinstance(r, ServeRequest)]
            while todo:
                names: list[str] = []
                round_ids, rest = [], []
                for i in todo:
                    name = requests[i].adapter  # type: ignore[union-attr]
                    if name is not None and name not in names:
                        if len(names) >= self.cache_size and self.mode != "per-request":
                            rest.append(i)
                            continue
                        names.append(name)
                    round_ids.append(i)
                for i, answer in zip(round_ids, self._round([requests[i] for i in round_ids], names), strict=True):
                    answers[i] = answer
                todo = rest
        return answers  # type: ignore[return-value]

    def _round(self, requests: list[ServeRequest], names: list[str]) -> list[Segmentation | ServeError]:
        start = time.perf_counter()
        adapters = self._acquire(names)
        answers: list[Segmentation | ServeError | None] = [None] * len(requests)
        jobs: dict[int, tuple[ServeRequest, Preprocessing, nn.Module | None, str]] = {}
        for k, req in enumerate(requests):
            if req.adapter is None:
                if self.base_preprocessing is None:
                    answers[k] = ServeError(400, f"no adapter named: the base {self.model_path.name} is a plain state "
                                                 "dict with no preprocessing record; name an adapter, or serve a "
                                                 "Lightning checkpoint of the base")
                    continue
                jobs[k] = (req, self.base_preprocessing, None, "base")
                continue
            if self.mode == "per-request":  # every request reads and merges its adapter, even a repeated one
                try:
                    adapter, cache = self._load(req.adapter), "merged-now"
                except ServeError as exc:
                    adapter, cache = exc, ""
            else:
                adapter, cache = adapters[req.adapter]
            if isinstance(adapter, ServeError):
                answers[k] = adapter
            else:
                jobs[k] = (req, adapter.preprocessing, adapter.network, cache)
        if jobs:
            networks = {k: net for k, (_, _, net, _) in jobs.items()}
            names_of = {k: req.adapter for k, (req, _, _, _) in jobs.items()}
            lockstep = Lockstep(list(jobs), lambda pending: self._forward(pending, names_of, networks))
            results: dict[int, Any] = {}
            threads = [threading.Thread(target=self._run_job, args=(k, *jobs[k][:2], lockstep, results),
                                        name=f"medlora-serve-{k}") for k in jobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            batch = {"size": len(requests), "adapters": sorted({n or "(base)" for n in names_of.values()}),
                     "seconds": round(time.perf_counter() - start, 4)}
            for k, (req, _, _, cache) in jobs.items():
                res = results[k]
                answers[k] = res if isinstance(res, ServeError) else self._answer(req, res, cache, batch)
        return answers  # type: ignore[return-value]

    def _run_job(self, k: int, req: ServeRequest, prep: Preprocessing, lockstep: Lockstep,
                 results: dict[int, Any]) -> None:
        try:
            result = self._predictor(prep).predict(req.volume.data, req.volume.affine, networks=[_Windows(lockstep, k)])
            finite = np.isfinite(result.probability)
            if not finite.all():  # as medlora infer: a NaN would look like "nothing found"
                raise ServeError(500, f"{req.filename}: {int(finite.size - finite.sum())} of {finite.size} "
                                      "probabilities are not finite (NaN or Inf): broken model weights or an overflow")
            results[k] = result.label
        except ServeError as exc:
            results[k] = exc
        except MedloraError as exc:
            results[k] = ServeError(400, f"{req.filename}: {exc}")
        except Exception as exc:  # one failing request must not take the others with it
            results[k] = ServeError(500, f"{req.filename}: {type(exc).__name__}: {exc}")
        finally:
            lockstep.done(k)

    def _forward(self, pending: dict[Hashable, torch.Tensor], names: dict[int, str | None],
                 networks: dict[int, nn.Module | None]) -> dict[Hashable, torch.Tensor]:
        """One round of windows: grouped by window shape, then by network (mixed: one group)."""
        groups: dict[tuple, list[Hashable]] = {}
        for k, x in pending.items():
            if self.mode == "mixed":
                net_key: Hashable = "bank"
            elif self.mode == "merged":
                net_key = names[k]  # type: ignore[index]
            else:
                net_key = k
            groups.setdefault((tuple(x.shape[1:]), x.dtype, net_key), []).append(k)
        out: dict[Hashable, torch.Tensor] = {}
        for (_, _, _), keys in groups.items():
            xs = [pending[k] for k in keys]
            x = xs[0] if len(xs) == 1 else torch.cat(xs)
            if self.mode == "mixed":
                assert self.bank is not None
                routes = [names[k] for k in keys for _ in range(pending[k].shape[0])]  # type: ignore[index]
                y = self.bank(x, adapters=routes)
            else:
                net = networks[keys[0]]  # type: ignore[index]
                y = (self.base if net is None else net)(x)
            for k, part in zip(keys, torch.split(y, [pending[k].shape[0] for k in keys]), strict=True):
                out[k] = part
        return out

    @staticmethod
    def _answer(req: ServeRequest, label: np.ndarray, cache: str, batch: dict[str, Any]) -> Segmentation:
        with tempfile.TemporaryDirectory(prefix="medlora-serve-") as tmp:
            path = write_nifti(Path(tmp) / "label.nii.gz", label, req.volume.geometry, np.uint8)
            data = path.read_bytes()
        voxels = int(label.sum(dtype=np.int64))
        return Segmentation(data, f"{req.case_id}.nii.gz", req.adapter, voxels,
                            voxels * voxel_volume_mm3(req.volume.affine) / 1000.0, cache, batch)
