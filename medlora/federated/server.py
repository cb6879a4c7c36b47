"""Flower wiring: the strategy whose aggregation is ours, the ClientApp around a site, and an in-process grid.

:class:`FederatedStrategy` is a Flower ``FedAvg`` (Message API, ``flwr.serverapp.strategy``) whose
``aggregate_train`` decodes the sites' replies and calls the pure function of
:mod:`medlora.federated.strategies`; it also samples the sites of a round deterministically (from the
federation seed and the round, so a resumed run samples as the uninterrupted one) and keeps every site's
held-out metrics of every round.

Engine: Flower's simulation engine runs ClientApps on Ray, the only backend it registers (``flwr[simulation]``
pins ``ray``), which is heavy for a 2-core machine and adds a process pool per run. :class:`LocalGrid` is a
Flower ``Grid`` that hands each message to the ClientApp in this process, with one persistent ``Context`` per
site (its ``state`` is the site's carried state), so the same ``ServerApp``/``ClientApp`` pair runs unchanged
under Flower's deployment engine, where the grid is Flower's own.

Messages. Train and evaluate instructions carry ``arrays`` (the global tensors; FedSmoothLoRA adds the stacked
global factors of all merged rounds under ``stack::`` and the last round's under ``global::``) and ``config``
(``server-round``, ``local-epochs`` or ``local-steps``). A train reply carries ``arrays`` (the site's tensors),
``metrics`` (``num-examples`` = training cases, ``train_loss``, ``lr``) and ``site`` (name, base fingerprint, A
fingerprint); an evaluate reply carries ``metrics`` (``num-examples`` = held-out cases, ``dice``) and ``site``
(name, per-case rows as JSON).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..errors import MedloraError
from .client import GLOBAL, STACK, SiteTrainer
from .strategies import Aggregate, Pair, SiteUpdate, aggregate, fedsmooth_lr

DP_STEPS = "dp::steps"


class FederationError(MedloraError, RuntimeError):
    """A round that cannot complete (a site failed or replied nothing): one line naming the site."""


def to_record(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


# ------------------------------------------------------------------------------------------- strategy


class FederatedStrategy(FedAvg):
    """Flower ``FedAvg`` with medlora's aggregation (``name``: fedit, ffa, lora_fair, fedsmooth, full_fedavg)."""

    def __init__(self, name: str, pairs: Sequence[Pair], *, base_fingerprint: str, global_tensors: Mapping[str, Any],
                 options: Mapping[str, Any] | None = None, fraction: float = 1.0, seed: int = 0) -> None:
        super().__init__(fraction_train=fraction, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                         min_available_nodes=1)
        self.name, self.pairs, self.seed = name, list(pairs), seed
        self.base_fingerprint = base_fingerprint
        self.options = dict(options or {})
        # FFA's A: the server's own (from the shared seed), never a site's
        self.global_a = {p.a: np.asarray(global_tensors[p.a]) for p in self.pairs if p.a in global_tensors}
        self.stack: dict[str, np.ndarray] = {}  # FedSmoothLoRA: the merged rounds' global factors, side by side
        self.last: Aggregate | None = None
        self.evaluations: dict[int, dict[str, dict[str, Any]]] = {}
        self.train_metrics: dict[int, dict[str, dict[str, float]]] = {}

    def sample(self, server_round: int, node_ids: Iterable[int]) -> list[int]:
        """The sites of a round: ``max(1, floor(fraction * n))`` of them, drawn from (seed, round)."""
        nodes = sorted(node_ids)
        k = max(1, int(len(nodes) * self.fraction_train))
        if k >= len(nodes):
            return nodes
        return sorted(random.Random(self.seed * 100003 + server_round).sample(nodes, k))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        config["server-round"] = server_round
        config["strategy"] = self.name  # a deployed site builds its trainer for it
        record = RecordDict({"arrays": arrays, "config": config})
        return self._construct_messages(record, self.sample(server_round, grid.get_node_ids()), MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        config["server-round"] = server_round
        config["strategy"] = self.name
        record = RecordDict({"arrays": arrays, "config": config})
        return self._construct_messages(record, sorted(grid.get_node_ids()), MessageType.EVALUATE)

    @staticmethod
    def _valid(replies: Iterable[Message], what: str) -> list[Message]:
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                reason = " ".join(str(msg.error.reason).split())[:300]
                raise FederationError(f"{what}: node {msg.metadata.src_node_id} failed: {reason}")
        if not replies:
            raise FederationError(f"{what}: no site replied")
        names = [str(msg.content["site"]["name"]) for msg in replies]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # two nodes serving one site (a deployment's node config) would overwrite each other's reply
            raise FederationError(f"{what}: site {twice[0]} replied from {names.count(twice[0])} nodes; give every "
                                  "SuperNode its own site")
        return replies

    def updates(self, replies: Iterable[Message]) -> list[SiteUpdate]:
        """The replies as :class:`SiteUpdate` (sorted by site name, so the sum's order is fixed)."""
        out = []
        for msg in self._valid(replies, "training"):
            info = msg.content["site"]
            out.append(SiteUpdate(str(info["name"]), from_record(msg.content["arrays"]),
                                  float(msg.content["metrics"]["num-examples"]), str(info["base-fingerprint"]),
                                  str(info.get("a-fingerprint", ""))))
        return sorted(out, key=lambda u: u.site)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        updates = self.updates(replies)
        agg = aggregate(self.name, updates, self.pairs, base_fingerprint=self.base_fingerprint,
                        global_tensors=self.global_a, options=self.options)
        self.last = agg
        self.train_metrics[server_round] = {
            str(m.content["site"]["name"]): {k: float(v) for k, v in m.content["metrics"].items()} for m in replies}
        total = sum(u.weight for u in updates)
        loss = sum(u.weight * self.train_metrics[server_round][u.site]["train_loss"] for u in updates) / total
        metrics = MetricRecord({"train_loss": loss, "sites": len(updates)})
        if self.name != "fedsmooth":
            return to_record(agg.tensors), metrics
        merged = agg.merged or {}
        for p in self.pairs:
            old_b, old_a = self.stack.get(p.b), self.stack.get(p.a)
            self.stack[p.b] = merged[p.b] if old_b is None else np.concatenate([old_b, merged[p.b]], axis=1)
            self.stack[p.a] = merged[p.a] if old_a is None else np.concatenate([old_a, merged[p.a]], axis=0)
        arrays = {**{STACK + k: v for k, v in self.stack.items()}, **{GLOBAL + k: v for k, v in merged.items()}}
        return to_record(arrays), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        per_site = {}
        for msg in self._valid(replies, "evaluation"):
            info = msg.content["site"]
            per_site[str(info["name"])] = {"dice": float(msg.content["metrics"]["dice"]),
                                           "cases": int(msg.content["metrics"]["num-examples"]),
                                           "rows": json.loads(str(info["rows"]))}
        self.evaluations[server_round] = dict(sorted(per_site.items()))
        dice = [r["Dice"] for s in per_site.values() for r in s["rows"] if not math.isnan(r["Dice"])]
        return MetricRecord({"dice": float(np.mean(dice)) if dice else float("nan")})


# ------------------------------------------------------------------------------------------- client


SiteLookup = Callable[[Context, Message], tuple[SiteTrainer, Mapping[str, Any]]]


def make_client_app(sites: Mapping[int, SiteTrainer] | SiteLookup, options: Mapping[str, Any] | None = None
                    ) -> ClientApp:
    """The ClientApp of a federation. ``sites``: the in-process trainers by node id (with the strategy's
    ``options``), or a function of (context, message) giving the node's trainer and options (Flower's deployment
    engine, :mod:`medlora.federated.app`)."""
    app = ClientApp()
    if isinstance(sites, Mapping):
        trainers, fixed = sites, dict(options or {})

        def lookup(context: Context, msg: Message) -> tuple[SiteTrainer, Mapping[str, Any]]:
            return trainers[context.node_id], fixed
    else:
        lookup = sites

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site, options = lookup(context, msg)
        arrays = from_record(msg.content["arrays"])
        rnd = int(msg.content["config"]["server-round"])
        if "carried" in context.state:
            carried = from_record(context.state["carried"])
            site.dp_steps = int(carried.pop(DP_STEPS, np.zeros(1))[0])
            site.fed_state = {k: v.astype(np.float64) for k, v in carried.items()}
        lr = None
        if site.strategy == "fedsmooth":
            site.fedsmooth_round(rnd, arrays, options)
            lr = fedsmooth_lr(rnd - 1, site.config.rounds, float(site.module.hparams.lr),
                              float(options.get("lr_min", 0.0)), str(options.get("lr_schedule", "cosine")))
        else:
            site.set_tensors(arrays)
        config = msg.content["config"]
        budget = {k: int(config[f"local-{k}"]) for k in ("epochs", "steps") if f"local-{k}" in config}
        metrics = site.train(rnd, lr=lr, **budget)
        tensors = site.fedsmooth_upload() if site.strategy == "fedsmooth" else site.get_tensors()
        carried = dict(tensors) if site.strategy == "fedsmooth" else {}
        if site.config.dp is not None:
            carried[DP_STEPS] = np.array([site.dp_steps], dtype=np.int64)
        if carried:
            context.state["carried"] = to_record(carried)
        info = {"name": site.name, "base-fingerprint": site.base_fingerprint}
        if site.strategy == "ffa":
            info["a-fingerprint"] = site.a_fingerprint()
        content = RecordDict({"arrays": to_record(tensors),
                              "metrics": MetricRecord({"num-examples": site.cases, **metrics}),
                              "site": ConfigRecord(info)})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site, _ = lookup(context, msg)
        arrays = from_record(msg.content["arrays"])
        if site.strategy == "fedsmooth":
            site.set_global_fedsmooth(arrays)
        else:
            site.set_tensors(arrays)
        rows = site.evaluate()
        dice = [r["Dice"] for r in rows if not math.isnan(r["Dice"])]
        content = RecordDict({
            "metrics": MetricRecord({"num-examples": len(rows), "dice": float(np.mean(dice)) if dice else math.nan}),
            "site": ConfigRecord({"name": site.name, "rows": json.dumps(rows)})})
        return Message(content, reply_to=msg)

    return app


# ------------------------------------------------------------------------------------------- grid


class LocalGrid(Grid):
    """A Flower ``Grid`` that delivers every message to ``client_app`` in this process, one ``Context`` per node.

    Message contents are deep-copied both ways, so the server and the sites share no arrays, as over a network.
    """

    def __init__(self, client_app: ClientApp, contexts: Mapping[int, Context]) -> None:
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        # what Flower's runtime sets in a ServerApp process: messages are stamped with it
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 0
        self.client_app = client_app
        self.contexts = dict(contexts)
        self._run: Any = None
        self._replies: dict[str, Message] = {}
        self._count = 0

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        import copy

        ids = []
        for msg in messages:
            self._count += 1
            message_id = f"local-{self._count}"
            msg.metadata.__dict__["_message_id"] = message_id  # what a SuperLink assigns
            delivered = Message(copy.deepcopy(msg.content), msg.metadata.dst_node_id, msg.metadata.message_type,
                                group_id=msg.metadata.group_id)
            delivered.metadata.__dict__["_message_id"] = message_id
            reply = self.client_app(delivered, self.contexts[msg.metadata.dst_node_id])
            self._replies[message_id] = Message(copy.deepcopy(reply.content), reply_to=delivered)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def site_contexts(names: Sequence[str], run_config: Mapping[str, Any] | None = None) -> dict[int, Context]:
    """One Flower ``Context`` per site, node ids 1..N in the config's order."""
    return {i + 1: Context(run_id=1, node_id=i + 1, node_config={"site": name}, state=RecordDict(),
                           run_config=dict(run_config or {}))
            for i, name in enumerate(names)}


RoundHook = Callable[[int, ArrayRecord], None]
