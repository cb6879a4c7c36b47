"""A site of the federation: its network, data and local training, and the Flower ClientApp around it.

:class:`SiteTrainer` holds one site's :class:`~medlora.training.module.SegmentationModule`, built by fit's
factory ``segmentation_module`` from the config's ``model:`` section and seeded with the federation's shared
seed (so every site starts from the same adapter and FFA's frozen ``A`` is the same everywhere), which supplies
the network, the loss, the optimiser and the per-case metrics of ``medlora crossval`` (Dice, soft Dice, HD95,
volume error); and its data (:class:`~medlora.data.datamodule.CTSegDataModule` from the ``data:`` section, on
the site's training cases, with its held-out cases as validation).

Local training is a plain loop over the module's loss rather than a Lightning ``Trainer``: a federation runs
``rounds x sites`` short fits, where a Trainer's set-up costs more than the training on small sites, and DP-SGD
(Opacus) needs the optimiser and data loader in hand. Every round reseeds the sampling and augmentation from
``(seed, site, round)``, so a round's result does not depend on what ran before it in the process: that is
what makes a resumed federation equal an uninterrupted one.

FedSmoothLoRA's client side (official ``IC_exp/fedsmoothlora.py``) lives here too: the global rank-r updates
of past rounds are merged into the frozen base, the gradient of the base weights is estimated on a few
batches, and the round starts from the gradient-aligned and round-matching factors
(:func:`medlora.federated.strategies.fedsmooth_start`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adapters import iter_adapters
from ..adapters.base import AdditiveReparam
from ..adapters.io import EXTRA_PREFIX, base_record
from ..adapters.shared import own_parameters
from ..assembly import ModelSpec
from .config import FederatedConfig
from .strategies import Pair, fedsmooth_start, fedsmooth_upload, fingerprint, ga_factors, zeta_schedule

STACK, GLOBAL = "stack::", "global::"


def round_seed(seed: int, site: str, round_index: int) -> int:
    """A seed that depends only on (federation seed, site, round): reproducible rounds whatever ran before."""
    digest = hashlib.sha256(f"{seed}/{site}/{round_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class PairSlot:
    """Where one LoRA pair lives in a network: its state keys, its layer and the layer's frozen weight."""

    pair: Pair
    layer: nn.Module
    reparam: AdditiveReparam
    a_name: str
    b_name: str

    @property
    def original(self) -> nn.Parameter:
        return self.layer.parametrizations["weight"].original

    def canonical(self) -> torch.Tensor:
        return self.reparam.layout.to_canonical(self.original.detach())

    def set_canonical(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.original.copy_(self.reparam.layout.from_canonical(weight.to(self.original.dtype)))


def adapter_pairs(model: nn.Module) -> list[PairSlot]:
    """Every plain LoRA pair (:meth:`~medlora.adapters.Reparam.rule_pairs`) of an additive adapter, with its keys
    in :func:`medlora.adapters.io.adapter_state`."""
    slots = []
    for name, module, reparam in iter_adapters(model):
        if not isinstance(reparam, AdditiveReparam):
            continue  # DoRA-style: its pair is not the layer's update, the tensors go FedIT's way
        names = {id(p): pname for pname, p in own_parameters(reparam)}
        for a, b, s in reparam.rule_pairs():
            if id(a) in names and id(b) in names:
                pair = Pair(f"{name}.{names[id(a)]}", f"{name}.{names[id(b)]}", float(s))
                slots.append(PairSlot(pair, module, reparam, names[id(a)], names[id(b)]))
    return slots


def norm_buffers(model: nn.Module, strategy: str, norm_stats: str) -> list[str]:
    """BatchNorm statistics that travel with the adapter (``norm_stats: update``)."""
    if norm_stats != "update" or strategy == "full_fedavg":
        return []
    return [k for k in model.state_dict() if k.endswith(("running_mean", "running_var"))]


def exchange_tensors(model: nn.Module, strategy: str, norm_stats: str) -> dict[str, np.ndarray]:
    """The tensors a site and the server exchange: ``<layer>.<adapter parameter>`` (and ``extra::<buffer>``), or
    the whole ``state_dict`` for full_fedavg."""
    state = model.state_dict()
    if strategy == "full_fedavg":
        return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}
    out = {}
    for layer, _, reparam in iter_adapters(model):
        for pname, p in own_parameters(reparam):
            out[f"{layer}.{pname}"] = p.detach().cpu().numpy().copy()
    for k in norm_buffers(model, strategy, norm_stats):
        out[f"{EXTRA_PREFIX}{k}"] = state[k].detach().cpu().numpy().copy()
    return out


def load_exchange_tensors(model: nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy exchanged tensors into ``model`` (keys it does not have, such as FedSmoothLoRA's stacks, are skipped)."""
    state = model.state_dict()  # shares storage with the parameters and buffers
    params = {f"{layer}.{pname}": p for layer, _, reparam in iter_adapters(model)
              for pname, p in own_parameters(reparam)}
    with torch.no_grad():
        for k, v in tensors.items():
            target = state.get(k[len(EXTRA_PREFIX):]) if k.startswith(EXTRA_PREFIX) else params.get(k, state.get(k))
            if target is not None:
                target.copy_(torch.from_numpy(np.asarray(v)).reshape(target.shape).to(target.dtype))


def base_fingerprint_of(model: nn.Module, strategy: str) -> str:
    """The fingerprint every reply must carry: the whole frozen base (adapters), or the starting model."""
    if strategy == "full_fedavg":
        return fingerprint({k: v.detach().numpy() for k, v in model.state_dict().items() if v.is_floating_point()})
    return base_record(model)["sha256"]


def build_module(config: FederatedConfig, strategy: str, base: str | None,
                 model: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None) -> Any:
    """The :class:`~medlora.training.module.SegmentationModule` of ``strategy`` from the fit factory
    ``segmentation_module`` and the strategy's ``model:`` section (``model``: another section, e.g.
    pretraining's), built with the federation's shared seed: the server's and every site's start."""
    from ..training.module import segmentation_module

    section = dict(model if model is not None else config.strategy_model(strategy))
    if base is not None:
        section["pretrained"] = base
    if section.get("roi_size") is None:  # fit's default, which a Trainer's data module would supply
        section["roi_size"] = list((data if data is not None else config.data_args())["patch_size"])
    torch.manual_seed(config.seed)
    return segmentation_module(**section)


def build_network(config: FederatedConfig, strategy: str, base: str | None) -> tuple[ModelSpec, nn.Module]:
    """The network of ``strategy`` and its record, as :func:`build_module` builds it."""
    module = build_module(config, strategy, base)
    return module.model_spec, module.model


def check_fedsmooth(slots: list[PairSlot]) -> None:
    """FedSmoothLoRA works on ``B A`` as the layer's matricised weight: refuse a method whose ``unfold`` is
    not a plain reshape (it would merge updates in the wrong places)."""
    from ..errors import MedloraError

    for slot in slots:
        a, b = slot.reparam.get_parameter(slot.a_name), slot.reparam.get_parameter(slot.b_name)
        w0 = slot.canonical()
        probe = torch.randn(b.shape, dtype=b.dtype, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            kept = b.clone()
            b.copy_(probe)
            delta = slot.reparam.delta(w0)
            b.copy_(kept)
        if delta.numel() != (probe @ a).numel() or not torch.allclose(
                delta, slot.pair.scaling * (probe @ a).reshape(w0.shape), atol=1e-5):
            raise MedloraError(f"fedsmooth: method {slot.reparam.config.method!r} does not apply its pair as a "
                               "reshaped B @ A (use lora or conv_lora)")


class SiteTrainer:
    """One site's network, data and training for one strategy (see the module docstring).

    ``model``, ``data`` and ``trainer`` replace the strategy's sections (pretraining uses its own)."""

    def __init__(self, config: FederatedConfig, strategy: str, name: str, data_dir: Path, splits_file: Path, *,
                 base: str | None = None, datasets: list[Any] | None = None, model: Mapping[str, Any] | None = None,
                 data: Mapping[str, Any] | None = None, trainer: Mapping[str, Any] | None = None) -> None:
        from ..data.datamodule import CTSegDataModule

        self.config, self.strategy, self.name = config, strategy, name
        self.module = build_module(config, strategy, base, model, data)
        self.model = self.module.model
        self.norm_stats = self.module.hparams.norm_stats
        self.trainer_args = dict(trainer if trainer is not None else config.trainer)
        self.data_args = dict(data if data is not None else config.data_args())
        self.dm = CTSegDataModule(str(data_dir), fold=0, splits_file=str(splits_file), validate=False,
                                  seed=config.seed, **self.data_args)
        self.dm.setup("fit")
        if datasets is not None:  # the centralised baseline: every site's training cases pooled
            self.dm._train = torch.utils.data.ConcatDataset(datasets)
        self.cases = len(self.dm.train_ids) if datasets is None else sum(len(ds) for ds in datasets)
        self.slots = adapter_pairs(self.model)
        self.pairs = [s.pair for s in self.slots]
        self.base_fingerprint = base_fingerprint_of(self.model, strategy)
        self.originals = {s.pair.b: s.canonical().clone() for s in self.slots}  # W0, for FedSmoothLoRA's merges
        self.fed_state: dict[str, np.ndarray] = {}  # carried between rounds (FedSmoothLoRA's last upload)
        self._shift: dict[str, np.ndarray] = {}
        self.dp_steps = 0  # DP-SGD steps taken in all rounds (carried between rounds, for the accountant)

    # ------------------------------------------------------------------------------------ tensors

    def get_tensors(self) -> dict[str, np.ndarray]:
        """What the site sends: its adapter tensors (plus BatchNorm statistics under ``norm_stats: update``), or
        the whole model (full_fedavg)."""
        return exchange_tensors(self.model, self.strategy, self.norm_stats)

    def set_tensors(self, tensors: Mapping[str, np.ndarray]) -> None:
        load_exchange_tensors(self.model, tensors)

    def a_fingerprint(self) -> str:
        tensors = self.get_tensors()
        return fingerprint({p.a: tensors[p.a] for p in self.pairs})

    # ------------------------------------------------------------------------------------ training

    def _loader(self, seed: int) -> Any:
        self.dm.hparams.seed = seed
        transform = getattr(self.dm._train, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=seed)
        for ds in getattr(self.dm._train, "datasets", []):  # pooled sites
            ds.transform.set_random_state(seed=seed)
        return self.dm.train_dataloader()

    def _train_mode(self) -> None:
        self.module.train()
        if self.module.hparams.norm_stats == "freeze":
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def train(self, round_index: int, epochs: int | None = None, steps: int | None = None,
              lr: float | None = None) -> dict[str, float]:
        """Local training from the current tensors, a fresh optimiser (as FedAvg's clients): ``epochs`` passes
        over the training cases or ``steps`` optimiser steps (the loader restarts as often as needed), at the
        module's learning rate or ``lr`` (FedSmoothLoRA's schedule over rounds)."""
        seed = round_seed(self.config.seed, self.name, round_index)
        torch.manual_seed(seed)
        if self.strategy == "ffa":
            for slot in self.slots:
                slot.reparam.get_parameter(slot.a_name).requires_grad_(False)
        optimizer = self.module.configure_optimizers()
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        loader = self._loader(seed)
        self._train_mode()
        if self.config.dp is not None:
            losses = self._train_dp(optimizer, seed, epochs, steps)
        else:
            losses = self._train_plain(optimizer, loader, epochs, steps)
        if not all(math.isfinite(v) for v in losses):
            from ..errors import MedloraError

            raise MedloraError(f"site {self.name}: the training loss became non-finite in round {round_index}; "
                               "lower model.lr")
        metrics = {"train_loss": float(np.mean(losses)) if losses else float("nan"), "steps": float(len(losses)),
                   "lr": float(optimizer.param_groups[0]["lr"])}
        if self.config.dp is not None:
            metrics["epsilon"] = self.epsilon()
        return metrics

    def _train_plain(self, optimizer: torch.optim.Optimizer, loader: Any, epochs: int | None,
                     steps: int | None) -> list[float]:
        clip = self.trainer_args.get("gradient_clip_val")
        by_value = self.trainer_args.get("gradient_clip_algorithm") == "value"
        params = [p for p in self.model.parameters() if p.requires_grad]
        losses: list[float] = []
        passes = 0
        while (passes < (epochs or 0)) if steps is None else (len(losses) < steps):
            before = len(losses)
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = self.module.batch_loss(batch)
                loss.backward()
                if clip:  # as Lightning's Trainer clips (gradient_clip_val / gradient_clip_algorithm)
                    if by_value:
                        torch.nn.utils.clip_grad_value_(params, clip)
                    else:
                        torch.nn.utils.clip_grad_norm_(params, clip)
                optimizer.step()
                losses.append(float(loss.detach()))
                if steps is not None and len(losses) >= steps:
                    break
            passes += 1
            if len(losses) == before:  # an empty loader: no step would ever come
                break
        return losses

    def _train_dp(self, optimizer: torch.optim.Optimizer, seed: int, epochs: int | None,
                  steps: int | None) -> list[float]:
        """DP-SGD steps (:mod:`medlora.federated.privacy`): Poisson-sampled cases, per-case clipping, noise; an
        epoch is ``1 / q`` steps."""
        from .privacy import case_losses, dp_step, poisson_batch

        dp, dataset = self.config.dp, self.dm._train
        n = len(dataset)
        rate = min(1.0, self.data_args["batch_size"] / n)
        generator = torch.Generator().manual_seed(seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        losses = []
        for _ in range(steps if steps is not None else (epochs or 0) * max(1, round(1 / rate))):
            chosen = poisson_batch(n, rate, generator)
            optimizer.zero_grad(set_to_none=True)
            losses += dp_step(params, case_losses(self.module, dataset, chosen), dp.max_grad_norm,
                              dp.noise_multiplier, rate * n, generator)
            optimizer.step()  # an empty draw still takes a step: the noise alone
            self.dp_steps += 1
        return losses

    def epsilon(self) -> float:
        """The site's epsilon after every DP-SGD step it took so far (all rounds)."""
        from .privacy import epsilon

        dp = self.config.dp
        return epsilon(self.dp_steps, dp.noise_multiplier, min(1.0, self.data_args["batch_size"] / self.cases),
                       dp.delta)

    # ------------------------------------------------------------------------------------ evaluation

    def evaluate(self) -> list[dict[str, Any]]:
        """Per-case metrics on the site's held-out cases (those of ``medlora crossval``)."""
        self.module.eval()
        rows = []
        with torch.no_grad():
            for batch in self.dm.val_dataloader():
                row = self.module._evaluate(batch)
                row.pop("spacing", None)
                row.pop("case_index", None)
                rows.append(row)
        return rows

    # ------------------------------------------------------------------------------------ FedSmoothLoRA

    def check_fedsmooth(self) -> None:
        check_fedsmooth(self.slots)

    def _merged_base(self, arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """``W0 + s B_stack A_stack`` per pair (canonical), the global base after the merged rounds."""
        out = {}
        for slot in self.slots:
            w = self.originals[slot.pair.b].double()
            key_b, key_a = STACK + slot.pair.b, STACK + slot.pair.a
            if key_b in arrays and arrays[key_b].size:
                merged = np.asarray(arrays[key_b], np.float64) @ np.asarray(arrays[key_a], np.float64)
                w = w + slot.pair.scaling * torch.from_numpy(merged).reshape(w.shape)
            out[slot.pair.b] = w
        return out

    def set_global_fedsmooth(self, arrays: Mapping[str, np.ndarray]) -> None:
        """The global model (for evaluation): the merged base, no adapter update on top."""
        for slot, w in zip(self.slots, self._merged_base(arrays).values(), strict=True):
            slot.set_canonical(w)
            with torch.no_grad():
                slot.reparam.get_parameter(slot.b_name).zero_()

    def _gradients(self, seed: int, batches: int) -> dict[str, np.ndarray]:
        """The mean gradient of the loss w.r.t. each adapted layer's frozen weight (pair space), adapters off."""
        kept = {}
        for slot in self.slots:
            b = slot.reparam.get_parameter(slot.b_name)
            kept[slot.pair.b] = b.detach().clone()
            with torch.no_grad():
                b.zero_()
            slot.original.requires_grad_(True)
            slot.original.grad = None
        self._train_mode()
        n = 0
        try:
            for batch in self._loader(seed):
                self.module.batch_loss(batch).backward()
                n += 1
                if n >= batches:
                    break
            grads = {}
            for slot in self.slots:
                g = slot.reparam.layout.to_canonical(slot.original.grad) / max(n, 1)
                b = slot.reparam.get_parameter(slot.b_name)
                grads[slot.pair.b] = g.reshape(b.shape[0], -1).double().numpy()
        finally:
            for slot in self.slots:
                slot.original.requires_grad_(False)
                slot.original.grad = None
                with torch.no_grad():
                    slot.reparam.get_parameter(slot.b_name).copy_(kept[slot.pair.b])
            self.model.zero_grad(set_to_none=True)
        return grads

    def fedsmooth_round(self, round_index: int, arrays: Mapping[str, np.ndarray], options: Mapping[str, Any]) -> None:
        """Set the site's start of round ``round_index`` (1-based): merged base, GA + round-matching factors."""
        base = self._merged_base(arrays)
        zeta = zeta_schedule(round_index - 1, self.config.rounds, str(options["zeta_mode"]),
                             float(options["zeta0"]), float(options["zeta_min"]))
        rm: dict[str, np.ndarray | None] = {}
        for slot in self.slots:
            p = slot.pair
            if GLOBAL + p.b not in arrays:
                rm[p.b] = None  # first round: no round-matching term
                continue
            prev = (self.fed_state[p.b] @ self.fed_state[p.a]) if p.b in self.fed_state else 0.0
            glob = np.asarray(arrays[GLOBAL + p.b], np.float64) @ np.asarray(arrays[GLOBAL + p.a], np.float64)
            rm[p.b] = zeta * (prev - glob)
        for slot in self.slots:  # the gradient is taken where the site actually starts: W^t + s RM
            shifted = base[slot.pair.b]
            if rm[slot.pair.b] is not None:
                shifted = shifted + slot.pair.scaling * torch.from_numpy(rm[slot.pair.b]).reshape(shifted.shape)
            slot.set_canonical(shifted)
        seed = round_seed(self.config.seed, self.name, round_index) + 1
        grads = self._gradients(seed, int(options["ga_batches"]))
        for slot in self.slots:
            p = slot.pair
            a, b = slot.reparam.get_parameter(slot.a_name), slot.reparam.get_parameter(slot.b_name)
            rank = a.shape[0]
            (b0, a0), shift = fedsmooth_start(ga_factors(grads[p.b], rank, float(options["gamma"])), rank, rm[p.b])
            self._shift[p.b] = shift
            slot.set_canonical(base[p.b] - p.scaling * torch.from_numpy(shift).reshape(base[p.b].shape))
            with torch.no_grad():
                a.copy_(torch.from_numpy(a0))
                b.copy_(torch.from_numpy(b0))

    def fedsmooth_upload(self) -> dict[str, np.ndarray]:
        """``SVD_r(B A - B_ga A_ga)`` per pair, kept as the site's carried state for the next round-matching."""
        tensors = self.get_tensors()
        out = {}
        for slot in self.slots:
            p = slot.pair
            up_b, up_a = fedsmooth_upload(tensors[p.b], tensors[p.a], self._shift[p.b], tensors[p.a].shape[0])
            out[p.b], out[p.a] = up_b.astype(np.float32), up_a.astype(np.float32)
        self.fed_state = {k: v.astype(np.float64) for k, v in out.items()}
        return out
