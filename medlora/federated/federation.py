"""``medlora federate``: one federated fine-tuning per strategy, the baselines, the report; resumable.

Run folder::

    RUN/federation.json                 the config as run (a different config in the same folder is refused)
    RUN/data/<site>/                    generated phantom sites; RUN/splits/<site>.json their held-out cases
    RUN/pretrain/base.safetensors       the base, when the config pretrains one
    RUN/<strategy>/checkpoints/round_NNN.safetensors   global state + every site's carried state, per round
    RUN/<strategy>/history.json         per round: every site's held-out Dice (final round: per case)
    RUN/<strategy>/global_adapter.safetensors          the final global adapter, for medlora infer on the base
    RUN/full_fedavg/model.ckpt                         full_fedavg's final model, for medlora infer alone
    RUN/baselines/{local,centralised}.json
    RUN/report.md, results.csv, dice_per_round.png

Resume: a round's checkpoint is written atomically after the round's aggregation and evaluation; a killed
run restarts from the last one and, since every round reseeds from (seed, site, round) and sites are sampled
from (seed, round), ends with the same global adapter as an uninterrupted run. A strategy whose
``history.json`` exists is done and skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..adapters import save_adapter
from ..errors import MedloraError
from ..evaluation.summary import write_json_atomic
from ..fileio import atomic_save_safetensors, atomic_write_bytes, read_safetensors
from .client import (
    STACK,
    SiteTrainer,
    adapter_pairs,
    base_fingerprint_of,
    build_network,
    check_fedsmooth,
    exchange_tensors,
    load_exchange_tensors,
    norm_buffers,
)
from .config import (
    FederatedConfig,
    FederatedConfigError,
    StrategySpec,
    federation_from_mapping,
    load_federated_config,
    source_site,
)
from .server import FederatedStrategy, LocalGrid, from_record, make_client_app, site_contexts, to_record
from .sites import prepare_site, write_site_splits

ADAPTER_FILE = "global_adapter.safetensors"
FULL_MODEL_FILE = "model.ckpt"


class Federation:
    """A federation run folder: sites, base, one run per strategy, baselines (see the module docstring)."""

    def __init__(self, config: FederatedConfig, out: str | Path, config_path: str | Path | None = None) -> None:
        self.config, self.out = config, Path(out)
        self.config_path = config_path
        self.record = _normal(config)
        self.digest = _digest(self.record)

    # ------------------------------------------------------------------------------------ set-up

    def claim(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "federation.json"
        if path.exists():
            stored = json.loads(path.read_text(encoding="utf-8"))
            try:  # read through today's schema: a key added since, at its default, is the same federation
                same = _normal(federation_from_mapping(stored)) == self.record
            except FederatedConfigError:
                same = False
            if not same:
                raise FederatedConfigError(f"{self.out}: this run folder holds a different federation (see {path}); "
                                           "use another --out")
            self.digest = _digest(stored)  # the checkpoints were stamped with the record as first written
        else:
            write_json_atomic(self.record, path)

    def prepare(self) -> None:
        """Write phantom sites and the per-site splits; pretrain the base if the config asks for it."""
        self.data = {s.name: prepare_site(s, self.out / "data") for s in self.config.sites}
        self.splits = {s.name: write_site_splits(s, self.data[s.name], self.out / "splits" / f"{s.name}.json")
                       for s in self.config.sites}
        self.base = self.config.base_given
        if self.base is None and self.config.source is not None:
            self.base = str(self.pretrain())

    def pretrain(self) -> Path:
        path = self.out / "pretrain" / "base.safetensors"
        if path.exists():
            return path
        c = self.config
        site = source_site(c)
        data = prepare_site(site, self.out / "pretrain" / "data")
        splits = write_site_splits(site, data, self.out / "pretrain" / "splits.json")
        budget = c.pretrain_trainer()
        steps = budget.get("max_steps", -1) not in (-1, None)
        what = f"{budget['max_steps']} steps" if steps else f"{budget['max_epochs']} epochs"
        print(f"pretraining the base on {data.name} ({what}; its last case held out) ...", flush=True)
        trainer = SiteTrainer(c, "full_fedavg", "source", data, splits, model=c.pretrain_model(),
                              data=c.data_args(c.pretrain.data), trainer=budget)
        if steps:
            trainer.train(0, steps=int(budget["max_steps"]))
        else:
            trainer.train(0, epochs=int(budget["max_epochs"]))
        atomic_save_safetensors(trainer.model.state_dict(), path)
        return path

    def trainers(self, strategy: str) -> dict[int, SiteTrainer]:
        return {i + 1: SiteTrainer(self.config, strategy, s.name, self.data[s.name], self.splits[s.name],
                                   base=self.base)
                for i, s in enumerate(self.config.sites)}

    # ------------------------------------------------------------------------------------ one strategy

    def run_strategy(self, spec: StrategySpec, stop_after: int | None = None, grid: Grid | None = None
                     ) -> dict[str, Any]:
        """Rounds of ``spec`` through Flower's ServerApp/ClientApp; resumes from the last checkpoint.

        Without ``grid``: on a :class:`LocalGrid` in this process (``medlora federate``). With ``grid``: Flower's
        own (the deployment engine, :mod:`medlora.federated.app`, from inside its ServerApp), whose sites keep
        their carried state on their SuperNodes. ``stop_after`` ends the run after that round's checkpoint (as a
        kill would, for tests)."""
        folder = self.out / spec.name
        history_path = folder / "history.json"
        if history_path.exists():
            return json.loads(history_path.read_text(encoding="utf-8"))
        c = self.config
        options = spec.resolved_options()
        _, server_model = build_network(c, spec.name, self.base)
        norm_stats = c.strategy_model(spec.name)["norm_stats"]
        initial = exchange_tensors(server_model, spec.name, norm_stats)
        slots = adapter_pairs(server_model)
        if spec.name == "fedsmooth":
            check_fedsmooth(slots)
        strategy = FederatedStrategy(spec.name, [s.pair for s in slots],
                                     base_fingerprint=base_fingerprint_of(server_model, spec.name),
                                     global_tensors=initial, options=options, fraction=c.fraction, seed=c.seed)
        state: dict[str, Any] = {}
        if grid is not None:
            state["arrays"] = self._rounds(spec, grid, strategy, initial, {}, stop_after)
        else:
            trainers = self.trainers(spec.name)
            contexts = site_contexts([s.name for s in c.sites], {"strategy": spec.name})
            app = ServerApp()

            @app.main()
            def main(grid: Grid, context: Context) -> None:
                state["arrays"] = self._rounds(spec, grid, strategy, initial, contexts, stop_after)

            app(LocalGrid(make_client_app(trainers, options), contexts),
                Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
        if state.get("arrays") is None:
            return {}
        self._write_global(folder, spec.name, server_model, from_record(state["arrays"]), strategy)
        history = {"strategy": spec.name, "options": options, "rounds": c.rounds,
                   "exact": strategy.last.exact if strategy.last else True,
                   "notes": strategy.last.notes if strategy.last else [],
                   "evaluations": {str(k): v for k, v in strategy.evaluations.items()},
                   "train_metrics": {str(k): v for k, v in strategy.train_metrics.items()}}
        write_json_atomic(history, history_path)
        return history

    def _rounds(self, spec: StrategySpec, grid: Grid, strategy: FederatedStrategy, initial: dict[str, np.ndarray],
                contexts: dict[int, Context], stop_after: int | None) -> ArrayRecord | None:
        """The ServerApp's round loop, written out (as ``Strategy.start`` does) to checkpoint every round; the
        final global arrays, or None when stopped early. ``contexts``: the in-process sites' contexts, whose
        carried state is checkpointed with the global state."""
        c = self.config
        folder = self.out / spec.name
        done, arrays = self._resume(folder, strategy, contexts)
        if done and not contexts and (spec.name == "fedsmooth" or c.dp is not None):
            raise FederatedConfigError(f"{folder}: {spec.name}{' with DP-SGD' if c.dp else ''} carries site state "
                                       "between rounds, which the deployment engine keeps on the SuperNodes and a "
                                       "restart loses; rerun it with another out (or resume with medlora federate)")
        if done == 0:
            arrays = to_record(initial)
            self._evaluate(strategy, grid, 0, arrays)
        train_config = ConfigRecord({f"local-{k}": v for k, v in c.budget().items()})
        for rnd in range(done + 1, c.rounds + 1):
            replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, train_config, grid))
            arrays, _ = strategy.aggregate_train(rnd, replies)
            self._evaluate(strategy, grid, rnd, arrays)
            self._checkpoint(folder, rnd, arrays, strategy, contexts)
            line = "  ".join(f"{n} {v['dice']:.3f}" for n, v in strategy.evaluations[rnd].items())
            print(f"  {spec.name} round {rnd}/{c.rounds}: held-out Dice {line}", flush=True)
            if stop_after is not None and rnd >= stop_after and rnd < c.rounds:
                return None
        return arrays

    @staticmethod
    def _evaluate(strategy: FederatedStrategy, grid: Grid, rnd: int, arrays: ArrayRecord) -> None:
        replies = grid.send_and_receive(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid))
        strategy.aggregate_evaluate(rnd, replies)

    def _checkpoint(self, folder: Path, rnd: int, arrays: ArrayRecord, strategy: FederatedStrategy,
                    contexts: dict[int, Context]) -> None:
        tensors = {f"global/{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in from_record(arrays).items()}
        tensors.update({f"stack/{k}": torch.from_numpy(v) for k, v in strategy.stack.items()})
        for node, context in contexts.items():
            if "carried" in context.state:
                for k, v in from_record(context.state["carried"]).items():
                    tensors[f"carried/{node}/{k}"] = torch.from_numpy(np.ascontiguousarray(v))
        meta = {"round": rnd, "config_sha256": self.digest,
                "evaluations": {str(k): v for k, v in strategy.evaluations.items()},
                "train_metrics": {str(k): v for k, v in strategy.train_metrics.items()},
                "exact": strategy.last.exact, "notes": strategy.last.notes}
        atomic_save_safetensors(tensors, folder / "checkpoints" / f"round_{rnd:03d}.safetensors",
                                {"medlora.federated": json.dumps(meta)})

    def _resume(self, folder: Path, strategy: FederatedStrategy, contexts: dict[int, Context]
                ) -> tuple[int, ArrayRecord | None]:
        found = sorted((folder / "checkpoints").glob("round_*.safetensors"))
        if not found:
            return 0, None
        path = found[-1]
        tensors, header = read_safetensors(path, error=MedloraError)
        meta = json.loads(header["medlora.federated"])
        if meta["config_sha256"] != self.digest:
            raise FederatedConfigError(f"{path}: written by a different federation config; use another --out")
        arrays = {k[len("global/"):]: v.numpy() for k, v in tensors.items() if k.startswith("global/")}
        strategy.stack = {k[len("stack/"):]: v.numpy() for k, v in tensors.items() if k.startswith("stack/")}
        for node, context in contexts.items():
            prefix = f"carried/{node}/"
            carried = {k[len(prefix):]: v.numpy() for k, v in tensors.items() if k.startswith(prefix)}
            if carried:
                context.state["carried"] = to_record(carried)
        strategy.evaluations = {int(k): v for k, v in meta["evaluations"].items()}
        strategy.train_metrics = {int(k): v for k, v in meta["train_metrics"].items()}
        from .strategies import Aggregate

        strategy.last = Aggregate({}, meta["exact"], meta["notes"])
        print(f"  {strategy.name}: resuming after round {meta['round']} ({path.name})", flush=True)
        return int(meta["round"]), to_record(arrays)

    def _write_global(self, folder: Path, strategy: str, model: torch.nn.Module, arrays: dict[str, np.ndarray],
                      fed: FederatedStrategy) -> Path:
        """The final global model as a file ``medlora infer`` runs, with its provenance (``federated``: strategy,
        rounds, sites, exactness and the config's digest): the adapter strategies' global adapter (an adapter
        file for the base, as training writes one), full_fedavg's model as a checkpoint in the shape
        ``medlora fit`` writes (``state_dict`` with Lightning's ``model.`` prefix, ``hyper_parameters``: the
        model section, ``medlora_preprocessing``)."""
        model_section = self.config.strategy_model(strategy)
        info = {"strategy": strategy, "rounds": self.config.rounds, "sites": [s.name for s in self.config.sites],
                "exact": fed.last.exact if fed.last else True, "notes": fed.last.notes if fed.last else [],
                "config_sha256": self.digest}
        d = self.config.data_args()
        preprocessing = {"hu_window": list(d["hu_window"]), "target_spacing": d["target_spacing"],
                         "roi_size": list(model_section["roi_size"] or d["patch_size"]),
                         "threshold": model_section["threshold"]}
        spec = {**self.config.model_spec(strategy).to_dict(), "pretrained": self.base}
        if strategy == "full_fedavg":
            import io

            load_exchange_tensors(model, arrays)
            hyper = json.loads(json.dumps({**model_section, **spec}))
            checkpoint = {"state_dict": {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()},
                          "hyper_parameters": hyper, "medlora_preprocessing": preprocessing, "medlora_federated": info}
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            return atomic_write_bytes(folder / FULL_MODEL_FILE, buffer.getvalue())
        extra_tensors = norm_buffers(model, strategy, model_section["norm_stats"])  # none for fedsmooth
        if strategy == "fedsmooth":
            model = self._merged_as_lora(model, arrays)
        else:
            load_exchange_tensors(model, arrays)
        # the record `medlora infer` reads (as training's adapter files): model keys, preprocessing
        record = {k: v for k, v in spec.items() if k != "adapter"}
        return save_adapter(model, folder / ADAPTER_FILE, extra_tensors=extra_tensors,
                            extra_metadata={**record, "preprocessing": preprocessing, "federated": info})

    def _merged_as_lora(self, model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> torch.nn.Module:
        """FedSmoothLoRA's final global model as a plain LoRA adapter on the untouched base.

        The merged rounds add up to ``s B_stack A_stack`` per layer (rank up to rounds x r): each layer gets a
        LoRA of that update's numerical rank (singular values above 1e-7 of the largest), so the file is exact
        to float precision and stays as small as the update allows.
        """
        import re
        import warnings

        from ..adapters import AdapterConfig, inject
        from .client import adapter_pairs
        from .strategies import truncated_svd

        factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for slot in adapter_pairs(model):
            layer = slot.pair.b[: -len(slot.b_name) - 1]
            shape = slot.canonical().shape
            if STACK + slot.pair.b not in arrays:
                continue
            delta = slot.pair.scaling * (arrays[STACK + slot.pair.b].astype(np.float64) @ arrays[STACK + slot.pair.a])
            delta = delta.reshape(shape[0], -1)  # LoRA's matricisation (check_fedsmooth: a plain reshape)
            sv = np.linalg.svd(delta, compute_uv=False)
            rank = max(1, int((sv > 1e-7 * max(sv[0], 1e-300)).sum()))
            factors[layer] = truncated_svd(delta, rank)
        _, plain = build_network(self.config, "full_fedavg", self.base)
        pattern = {f"re:{re.escape(layer)}": b.shape[1] for layer, (b, _) in factors.items()}
        config = AdapterConfig("lora", rank=max(pattern.values()), targets=list(pattern), rank_pattern=pattern,
                               alpha_pattern={k: float(v) for k, v in pattern.items()})  # scale 1: s is in B A
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*adapter parameters >= the layer")
            inject(plain, config)
        modules = dict(plain.named_modules())
        with torch.no_grad():
            for layer, (b, a) in factors.items():
                reparam = modules[layer].parametrizations["weight"][0]
                reparam.lora_B.copy_(torch.from_numpy(b))
                reparam.lora_A.copy_(torch.from_numpy(a))
        return plain

    # ------------------------------------------------------------------------------------ baselines

    def run_baselines(self) -> dict[str, Any]:
        """Each site alone (``local``) and all sites pooled (``centralised``), for the federation's budget:
        ``rounds x`` the local budget (epochs or steps), the first strategy's network, evaluated on every site's
        held-out cases."""
        results: dict[str, Any] = {}
        strategy = next((s.name for s in self.config.strategies if s.name != "full_fedavg"), "full_fedavg")
        kind = "fedit" if strategy != "full_fedavg" else strategy
        budget = self.config.budget(self.config.rounds)
        what = f"{budget.get('epochs', budget.get('steps'))} {'epochs' if 'epochs' in budget else 'steps'}"
        for name in self.config.baselines:
            path = self.out / "baselines" / f"{name}.json"
            if path.exists():
                results[name] = json.loads(path.read_text(encoding="utf-8"))
                continue
            print(f"baseline {name}: {what} ...", flush=True)
            trainers = self.trainers(kind)
            per_site: dict[str, Any] = {}
            if name == "local":
                for t in trainers.values():
                    t.train(0, **budget)
                    per_site[t.name] = _site_result(t.evaluate())
            else:
                first = next(iter(trainers.values()))
                pooled = SiteTrainer(self.config, kind, "pooled", self.data[first.name], self.splits[first.name],
                                     base=self.base, datasets=[t.dm._train for t in trainers.values()])
                pooled.train(0, **budget)
                tensors = pooled.get_tensors()
                for t in trainers.values():
                    t.set_tensors(tensors)
                    per_site[t.name] = _site_result(t.evaluate())
            results[name] = {"baseline": name, **budget, "sites": per_site}
            write_json_atomic(results[name], path)
        return results


def _normal(config: FederatedConfig) -> dict[str, Any]:
    return config.to_record()


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _site_result(rows: list[dict[str, Any]]) -> dict[str, Any]:
    dice = [r["Dice"] for r in rows if not math.isnan(r["Dice"])]
    return {"dice": float(np.mean(dice)) if dice else float("nan"), "cases": len(rows), "rows": rows}


def run_federate(config_path: str, out_dir: str, only: str | None = None, stop_after: int | None = None) -> int:
    """The ``medlora federate`` command; returns the exit code."""
    from .report import build_report

    config = load_federated_config(config_path)
    names = [s.name for s in config.strategies]
    if only is not None and only not in names + ["baselines"]:
        raise FederatedConfigError(f"--only {only!r}: not a strategy of the config ({', '.join(names)}) "
                                   "or 'baselines'")
    fed = Federation(config, out_dir, config_path)
    fed.claim()
    fed.prepare()
    print(f"federation {config.name!r}: {len(config.sites)} sites, {config.rounds} rounds, strategies "
          f"{', '.join(names)}; run folder {fed.out}", flush=True)
    finished = True
    for spec in config.strategies:
        if only in (None, spec.name):
            finished &= bool(fed.run_strategy(spec, stop_after=stop_after))
    if only in (None, "baselines") and finished:
        fed.run_baselines()
    if only is None and finished:
        print(f"report: {build_report(fed.out)}")
    return 0


