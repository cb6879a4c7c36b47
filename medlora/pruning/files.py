"""Pruned bases as files, ``medlora prune`` (LoRAPrune) and ``medlora recover`` (LoRAM).

A pruned base is a safetensors state dict whose header (key ``medlora_pruned``) holds its model record: backbone
``pruned`` with arguments ``{"backbone", "backbone_args", "keep", "source"}``, i.e. the full architecture, the kept
units of every pruned channel group (:mod:`medlora.pruning.graph`) and what it was made from. The registry's
``pruned`` backbone builds the full architecture and removes the same units, so ``build_model`` and the training
configs take it like any backbone (:func:`pruned_spec`).

LoRAM (Zhang et al., "Train Small, Infer Large", ICLR 2025, arXiv 2502.13533; official code
``junzhang-zj/LoRAM``, ``loram/3_recovered_low_rank_matrix_generation.py``): an adapter trained on the pruned base
is recovered for the full base by re-inflating only the pruned axes, ``lora_B`` rows at pruned output channels
and ``lora_A`` columns at pruned input channels, filled with zeros (the official default ``zeroA``); the update is
then exactly zero on every pruned row and column, so pruned units compute with ``W0``. The paper's continual
pre-training that aligns the pruned model with the full one has a data-free analogue here: ``medlora prune
--align-steps N`` distils the pruned base towards the full one on synthetic phantoms (:func:`align_pruned`).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..adapters import AdapterConfig, inject, iter_adapters, read_adapter_file, save_adapter
from ..adapters.io import EXTRA_PREFIX, base_record
from ..assembly import ModelSpec, build_model, load_adapter_onto
from ..fileio import atomic_save_safetensors
from ..models import create_model
from .graph import PruningError, channel_graph, layer_indices, prune_structure
from .loraprune import select_keep

__all__ = ["PRUNED_BACKBONE", "RECORD_KEY", "align_pruned", "build_pruned", "pruned_base_record", "pruned_spec",
           "recover_adapter", "run_prune", "run_recover"]

PRUNED_BACKBONE = "pruned"
RECORD_KEY = "medlora_pruned"


def build_pruned(*, backbone: str, backbone_args: dict[str, Any] | None = None, keep: dict[str, list[int]],
                 source: dict[str, Any] | None = None, spatial_dims: int | None = None) -> nn.Module:
    """The full ``backbone`` with the units not in ``keep`` removed (weights are those of a fresh build; load the
    pruned base's file on top). ``source`` is provenance only."""
    args = dict(backbone_args or {})
    args.pop("checkpoint", None)  # the pruned file brings the weights; a full checkpoint would not fit anyway
    if spatial_dims is not None:
        args["spatial_dims"] = spatial_dims
    model = create_model(backbone, **args)
    graph = channel_graph(model)
    unknown = sorted(set(keep) - set(graph.groups))
    if unknown:
        raise PruningError(f"pruned {backbone}: no channel group {unknown[0]!r} in this architecture")
    # index tensors on the CPU even inside a meta-device build (config checks build networks there)
    kept = {k: torch.as_tensor(v, dtype=torch.long, device="cpu") for k, v in keep.items()}
    return prune_structure(model, graph, kept)


def _architecture(meta: dict[str, Any], path: Path) -> tuple[str, dict[str, Any], int]:
    extra = meta.get("extra") or {}
    if not extra.get("backbone"):
        raise PruningError(f"{path}: the adapter records no backbone (backbone, backbone_args, spatial_dims)")
    return str(extra["backbone"]), dict(extra.get("backbone_args") or {}), int(extra.get("spatial_dims", 3))


def pruned_base_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The model record (backbone ``pruned``, its arguments, ``spatial_dims``, the adapter's preprocessing) in the
    header of a pruned base file; None for a file that is not one (another format, no record)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
    except Exception:  # not a safetensors file: the weights loader says so in its own words
        return None
    if RECORD_KEY not in header:
        return None
    try:
        return json.loads(header[RECORD_KEY])
    except json.JSONDecodeError:
        raise PruningError(f"{path}: corrupt {RECORD_KEY} record") from None


def pruned_spec(path: str | os.PathLike[str], **fields: Any) -> ModelSpec:
    """The :class:`~medlora.assembly.ModelSpec` of a pruned base file (its weights as ``pretrained``); ``fields``
    add e.g. ``adapter=AdapterConfig(...)`` to train on it (LoRAM)."""
    path = Path(path)
    if not path.is_file():
        raise PruningError(f"{path}: file not found")
    record = pruned_base_record(path)
    if record is None:
        raise PruningError(f"{path}: not a pruned base (no {RECORD_KEY} record; write one with medlora prune)")
    return ModelSpec(PRUNED_BACKBONE, record["backbone_args"], record["spatial_dims"], pretrained=str(path),
                     **fields)


def _check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    if any(out.resolve() == p.resolve() for p in inputs):
        raise PruningError(f"{out}: --out would overwrite an input file")
    if out.exists() and not overwrite:
        raise PruningError(f"{out}: exists; choose another --out or pass --overwrite")


def _keep_for(record: dict[str, Any], graph: Any, sparsity: float | None, path: Path) -> dict[str, torch.Tensor]:
    keep = {}
    trained = float(record.get("reached", record.get("sparsity", 0.0)))
    for name, info in record["groups"].items():
        group = graph.groups.get(name)
        if group is None or group.size != info["size"]:
            raise PruningError(f"{path}: the LoRAPrune record names channel group {name!r} of {info['size']} units, "
                               "which this base does not have: the adapter belongs to another architecture")
        if sparsity is None or abs(sparsity - trained) < 1e-12:
            keep[name] = torch.as_tensor(info["keep"], dtype=torch.long)  # the masks the adapter was trained with
        else:
            keep[name] = select_keep(torch.as_tensor(info["importance"], dtype=torch.float64), sparsity)
    return keep


def align_pruned(pruned: nn.Module, full: nn.Module, spatial_dims: int, preprocessing: dict[str, Any] | None,
                 path: Path, *, steps: int, synthetic: Any = None, lr: float = 1e-3, seed: int = 0
                 ) -> dict[str, Any]:
    """LoRAM's alignment step, data-free: train every parameter of ``pruned`` to reproduce ``full`` (the network
    it was cut from) on synthetic phantoms, with the Trans-LoRA distillation of :mod:`medlora.training.transfer`:
    its tempered KL with lesion voxels weighted up, both networks in evaluation mode (BatchNorm statistics stay),
    but without its Dice term. That term rewards a student sharper than its teacher; here the pruned base must
    compute what the full base computes, since the adapter trained on it is recovered onto the full base (on a
    test network the Dice term moved the pruned base away from the full one). The samples use the HU window and
    sliding-window size of the adapter's ``preprocessing`` record (``path`` names its file in errors). Returns the
    record stored in the pruned file.

    The paper (arXiv 2502.13533, section 3) aligns by continued pre-training of the pruned LLM on a general corpus
    before the adapter is trained; a segmentation base has no such corpus at hand, and the phantom generator is
    our stand-in for one. Distilling towards the full base's outputs aims at the same thing: the pruned base
    should compute what the full one computes, so that an adapter trained on it still fits the full base.
    """
    from ..training.transfer import SyntheticSpec, distill, synthetic_samples

    prep = preprocessing or {}
    if not prep.get("roi_size") or not prep.get("hu_window"):
        raise PruningError(f"{path}: the adapter records no preprocessing (roi_size, hu_window); alignment needs "
                           "them to make its synthetic samples")
    spec = synthetic if synthetic is not None else SyntheticSpec(volumes=16)
    samples = synthetic_samples(spec, spatial_dims, prep["roi_size"], prep["hu_window"])
    for p in full.parameters():
        p.requires_grad_(False)
    for p in pruned.parameters():
        p.requires_grad_(True)
    torch.manual_seed(seed)
    done = distill(full, pruned, samples, steps=steps, lr=lr, seed=seed, dice_weight=0.0)
    for p in pruned.parameters():
        p.requires_grad_(False)
    return {"steps": steps, "lr": lr, "samples": len(samples), "synthetic": dict(vars(spec)), "loss": "tempered KL",
            "first_loss": done["first_loss"], "last_loss": done["last_loss"]}


def run_prune(model: str | os.PathLike[str], adapter: str | os.PathLike[str], out: str | os.PathLike[str], *,
              sparsity: float | None = None, merge: bool = True, overwrite: bool = False, align_steps: int = 0,
              align_synthetic: Any = None, align_lr: float = 1e-3) -> dict[str, Any]:
    """``medlora prune``: the smaller base (with the adapter merged, or its ``W0`` only with ``merge=False``, the
    base LoRAM trains on), pruned with the LoRAPrune masks or importance stored in the adapter file; with
    ``align_steps`` > 0 then aligned to the unpruned network by distillation on synthetic phantoms
    (:func:`align_pruned`, a :class:`~medlora.training.transfer.SyntheticSpec` ``align_synthetic``); written to
    ``out`` with its record. Returns a summary. Every bad input is one :class:`PruningError` line (or the adapter
    loader's, for an adapter of another base) before anything is written."""
    model, adapter, out = Path(model), Path(adapter), Path(out)
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise PruningError(f"--sparsity {sparsity}: must be in [0, 1) (the share of units removed per group)")
    if align_steps < 0 or not align_lr > 0:
        raise PruningError(f"--align-steps {align_steps} / --align-lr {align_lr}: need steps >= 0 and a learning "
                           "rate > 0")
    _check_out(out, [model, adapter], overwrite)
    meta, _ = read_adapter_file(adapter)
    backbone, args, spatial_dims = _architecture(meta, adapter)
    if backbone == PRUNED_BACKBONE:
        raise PruningError(f"{adapter}: trained on a pruned base already; prune the full base instead")
    record = (meta.get("extra") or {}).get("loraprune")
    if not record:
        raise PruningError(f"{adapter}: no LoRAPrune record (importance, masks): train the adapter with "
                           "medlora.pruning.LoRAPruner (see docs/pruning.md)")
    base = build_model(ModelSpec(backbone, args, spatial_dims, pretrained=str(model)))
    adapted = load_adapter_onto(base, adapter, merge_weights=True)  # refuses an adapter of another base
    net = adapted if merge else base
    graph = channel_graph(net)
    keep = _keep_for(record, graph, sparsity, adapter)
    before = sum(p.numel() for p in net.parameters())
    source = {"base": str(model), "base_sha256": base_record(base)["sha256"], "adapter": str(adapter),
              "merged": merge, "sparsity": sparsity if sparsity is not None else record.get("reached")}
    full = copy.deepcopy(net) if align_steps else None
    prune_structure(net, graph, keep)
    if full is not None:
        source["aligned"] = align_pruned(net, full, spatial_dims, (meta.get("extra") or {}).get("preprocessing"),
                                         adapter, steps=align_steps, synthetic=align_synthetic, lr=align_lr)
    spec = {"backbone": PRUNED_BACKBONE, "spatial_dims": spatial_dims,
            "preprocessing": (meta.get("extra") or {}).get("preprocessing"),
            "backbone_args": {"backbone": backbone, "backbone_args": args,
                              "keep": {k: v.tolist() for k, v in keep.items()}, "source": source}}
    atomic_save_safetensors(dict(net.state_dict()), out, {"format": "pt", RECORD_KEY: json.dumps(spec)})
    return {"out": str(out), "parameters_before": before, "parameters_after": sum(p.numel() for p in net.parameters()),
            "groups": len(keep), "merged": merge, "aligned": source.get("aligned")}


# ----------------------------------------------------------------------------------------------------- LoRAM


def _fused_rows(kept_out: torch.Tensor, out_total: int, fused: int, blocks: list[int]) -> tuple[torch.Tensor, int]:
    """Rows of a fused LoRA's stacked ``lora_B`` (one block per adapted output block) that survive ``kept_out``."""
    block = out_total // fused
    rows = [j * block + (o - b * block) for j, b in enumerate(blocks) for o in kept_out.tolist()
            if b * block <= o < (b + 1) * block]
    return torch.tensor(rows, dtype=torch.long), len(blocks) * block


@torch.no_grad()
def recover_adapter(full: nn.Module, keep: dict[str, Any], meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    path: Path) -> list[str]:
    """Attach to ``full`` (the plain full base) the adapter of a pruned base (``meta``/``tensors`` of its file),
    zero-filled at the pruned positions; norm tensors the file carries are written at the kept channels. Returns
    the names of the state entries written that way (to save as the recovered file's extra tensors)."""
    graph = channel_graph(full)
    keep_t = {k: torch.as_tensor(v, dtype=torch.long) for k, v in keep.items()}
    index = layer_indices(full, graph, keep_t)
    modules = dict(full.named_modules())
    for idx, cfg in enumerate(meta["configs"]):
        names = [n for n, info in meta["layers"].items() if info["config"] == idx]
        if names and cfg.get("method") != "lora":
            raise PruningError(f"{path}: LoRAM recovery supports lora adapters; {names[0]} holds {cfg.get('method')}")
        if names:
            inject(full, AdapterConfig.from_dict({**cfg, "targets": [f"re:{re.escape(n)}" for n in names],
                                                  "target_types": None, "exclude": None}))
    for name, _, reparam in iter_adapters(full):
        a_small, b_small = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        w_shape = reparam.layout.canonical_shape(modules[name].parametrizations["weight"].original.shape)
        out_total, in_total = w_shape[0], w_shape[1]
        kept_out = index.get((name, "out"), torch.arange(out_total))
        kept_in = index.get((name, "in"), torch.arange(in_total))
        a = torch.zeros_like(reparam.lora_A).view(reparam.lora_A.shape[0], in_total, -1)
        a[:, kept_in] = a_small.view(a_small.shape[0], kept_in.numel(), -1).to(a.dtype)
        b = torch.zeros_like(reparam.lora_B)
        if reparam.adapt_outputs is None:
            b[kept_out] = b_small.to(b.dtype)
        else:
            rows, _ = _fused_rows(kept_out, out_total, reparam.fused_outputs, reparam.adapt_outputs)
            b[rows] = b_small.to(b.dtype)
        reparam.lora_A.copy_(a.view_as(reparam.lora_A))
        reparam.lora_B.copy_(b)
    state = full.state_dict()
    norm_channels = {n: g.channels(keep_t[g.name].sort().values) for g in graph if g.name in keep_t for n in g.norms}
    written = []
    for key, value in tensors.items():
        if not key.startswith(EXTRA_PREFIX):
            continue
        name = key[len(EXTRA_PREFIX):]
        owner, _, attr = name.rpartition(".")
        if name not in state:
            raise PruningError(f"{path}: extra tensor {name!r} has no place in the full base")
        if tuple(state[name].shape) == tuple(value.shape) and owner not in norm_channels:
            state[name].copy_(value)
        elif owner in norm_channels and attr in ("weight", "bias", "running_mean", "running_var"):
            state[name][norm_channels[owner]] = value.to(state[name].dtype)
        elif owner in norm_channels and attr == "num_batches_tracked":
            state[name].copy_(value)
        else:
            raise PruningError(f"{path}: extra tensor {name!r} {tuple(value.shape)} cannot be recovered for the full "
                               f"base {tuple(state[name].shape)}")
        written.append(name)
    return written


def run_recover(model: str | os.PathLike[str], adapter: str | os.PathLike[str], out: str | os.PathLike[str], *,
                merged_out: str | os.PathLike[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``medlora recover``: the adapter trained on a pruned base (``adapter``) recovered for the full base
    ``model`` it was pruned from (LoRAM), written as an ordinary adapter file of the full base; with ``merged_out``
    also the full base with it merged (a plain safetensors state dict)."""
    model, adapter, out = Path(model), Path(adapter), Path(out)
    outs = [out] + ([Path(merged_out)] if merged_out else [])
    for o in outs:
        _check_out(o, [model, adapter], overwrite)
    meta, tensors = read_adapter_file(adapter)
    backbone, args, spatial_dims = _architecture(meta, adapter)
    if backbone != PRUNED_BACKBONE:
        raise PruningError(f"{adapter}: trained on a full {backbone} base, not a pruned one: nothing to recover")
    source = args.get("source") or {}
    if source.get("merged"):
        raise PruningError(f"{adapter}: its base was pruned with another adapter merged in (medlora prune without "
                           "--no-merge); LoRAM recovers onto the full base only from a base pruned from W0")
    full_spec = ModelSpec(args["backbone"], args.get("backbone_args") or {}, spatial_dims, pretrained=str(model))
    full = build_model(full_spec)
    if source.get("base_sha256") and base_record(full)["sha256"] != source["base_sha256"]:
        raise PruningError(f"{model}: not the base the adapter's pruned base was made from "
                           f"({source.get('base', '?')})")
    for p in full.parameters():
        p.requires_grad_(False)
    extras = recover_adapter(full, args["keep"], meta, tensors, adapter)
    extra = {k: v for k, v in (meta.get("extra") or {}).items() if k not in ("backbone_args", "pretrained")}
    extra.update(backbone=args["backbone"], backbone_args=args.get("backbone_args") or {}, pretrained=str(model),
                 loram={"paper": "LoRAM, arXiv 2502.13533", "recovered_from": str(adapter), "fill": "zeros"})
    save_adapter(full, out, extra_metadata=extra, extra_tensors=extras)
    if merged_out:
        merged = load_adapter_onto(build_model(full_spec), out, merge_weights=True)
        atomic_save_safetensors(dict(merged.state_dict()), Path(merged_out), {"format": "pt"})
    return {"out": str(out), "layers": len(meta["layers"]), "merged_out": str(merged_out) if merged_out else None}
