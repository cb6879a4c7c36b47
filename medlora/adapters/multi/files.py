"""Composition files: several adapters of one base, how they are chosen per case and how their outputs are fused.

A composition file is a safetensors file (written atomically, never unpickled) whose tensors are those of the
case-level router, if any (``router.head.weight``, ``router.head.bias``, ``router.mean``, ``router.std`` of a
:class:`~.router.CaseRouter`), and whose header key ``medlora`` holds JSON (``format`` ``medlora.composition/1``):

* ``adapters``: per adapter, in class order, its ``name``, label ``value`` (as in the dataset's ``dataset.json``),
  output ``channel``, the path of its adapter file relative to the composition file's folder, and that file's
  fingerprint (the ``tensors_sha256`` its own metadata records, a checksum of every adapter tensor);
* ``base``: the SHA-256 of the whole frozen base (:func:`medlora.adapters.io.base_record`) the adapters were
  trained on;
* ``select``: ``all`` (output composition, every adapter runs), ``top-k`` with ``k`` (ReMix's rule: the router's
  k highest scores, each chosen adapter with its whole update, i.e. fixed equal weights; Qiu et al., arXiv
  2603.10160) or ``present`` (every adapter the router scores above 0, the top one when none is);
  ``pooled_layer``: the base's sub-module whose averaged output the router reads, ``pooling`` how it is averaged
  (``mean`` or ``foreground``: weighted by the base's own foreground probability);
* ``select`` ``mixer``: a token-level mixer (:mod:`.mixer`, LoRA-Mixer style) instead of a case router; ``mixer``
  records the routed layers (full module names), ``routing``, ``k``, ``temperature`` and ``outputs`` (pairs
  ``[channel, label value]`` of the mixed network's output); the tensors are each layer's gate,
  ``mixer.<layer>.weight`` ``(E, I)`` and ``mixer.<layer>.bias`` ``(E,)``. The experts are the ``adapters`` (their
  ``value`` is the class each expert was trained for; the label values written are those of ``outputs``);
* ``fusion``: ``rule`` (``probability`` or ``priority``), ``priority`` (adapter names) and ``threshold``
  (:func:`~.compose.fuse_class_maps`);
* optional ``architecture`` and ``preprocessing`` records (as adapter files carry them), which ``medlora infer``
  needs to build and feed the base;
* ``tensors_sha256``: checksum of the router (or gate) tensors, checked on every read.

The adapters themselves stay in their own files: :func:`resolve_adapter_files` finds them beside the composition
(or takes the files given) and refuses any whose fingerprint differs; :func:`check_base` refuses a base whose
fingerprint differs. Both in one line naming the file.

A case's router features average ``pooled_layer``'s output over the whole case: the base runs on every axial slice
of the case for a 2D network or on the whole volume for a 3D one (:meth:`CompositionSpec.case_features`). The
``foreground`` pooling is ours: the reference's case router (``reference/federated_and_beyond.md`` 4.6) reads the
pooled bottleneck; averaged over a whole head, those features hardly depend on a small bleed, and on the ich
phantoms a router on them put one of the case's own classes first in 16 of 36 test cases, against 26 of 36
when the average is weighted by where the base sees blood.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import MedloraError
from ...fileio import atomic_save_safetensors, read_safetensors
from ..io import base_record, read_adapter_file, tensors_checksum
from .compose import FUSION_RULES, compose_outputs
from .router import CaseRouter, pooled_features

__all__ = ["COMPOSITION_FORMAT", "SELECTIONS", "CompositionFileError", "CompositionSpec", "MixerSpec", "check_base",
           "read_composition", "resolve_adapter_files", "save_composition", "save_mixer"]

COMPOSITION_FORMAT = "medlora.composition/1"
SELECTIONS = ("all", "top-k", "present", "mixer")
POOLINGS = ("mean", "foreground")


class CompositionFileError(MedloraError, ValueError):
    """A composition file that cannot be read, or whose base or adapters do not match (one line naming it)."""


@dataclass
class MixerSpec:
    """What a composition file keeps of a token-level mixer (:func:`~.mixer.attach_mixer`): the routed layers,
    each layer's gate (``"<layer>.weight"``, ``"<layer>.bias"``), the routing rule, and which output channels of
    the mixed network become which label values. The experts are the composition's adapter files; only plug-and-play
    mixers (frozen experts) can be saved this way, since the files must hold the experts as they are routed."""

    layers: list[str]
    gates: dict[str, torch.Tensor]
    routing: str = "soft"
    k: int = 1
    temperature: float = 1.0
    outputs: list[tuple[int, int]] = field(default_factory=lambda: [(0, 1)])

    @classmethod
    def from_model(cls, model: nn.Module, outputs: Sequence[tuple[int, int]] = ((0, 1),)) -> MixerSpec:
        """The mixer attached to ``model``; refused unless every layer routes alike and routes by its gate."""
        from .mixer import mixer_layers

        layers = mixer_layers(model)
        if not layers:
            raise CompositionFileError("the model holds no mixer layer (attach_mixer) to save")
        first = layers[0][1]
        for name, m in layers:
            if (m.routing, m.k, m.temperature) != (first.routing, first.k, first.temperature):
                raise CompositionFileError(f"mixer layer {name!r} routes as {m.routing}/k={m.k}/T={m.temperature}, "
                                           f"{layers[0][0]!r} as {first.routing}/k={first.k}/T={first.temperature}; "
                                           "a mixer file records one routing")
            if m.routing == "sample_equal":
                raise CompositionFileError(f"mixer layer {name!r} routes by random draws (sample_equal, ReMix's "
                                           "training routing); set_routing('topk_equal', k) before saving")
            if m.fixed is not None:
                raise CompositionFileError(f"mixer layer {name!r} has fixed gates (fix_gates); call "
                                           "fix_gates(model, None) before saving its routers")
        gates = {f"{n}.{k}": v.detach().to("cpu", torch.float32).contiguous()
                 for n, m in layers for k, v in m.router.state_dict().items()}
        return cls([n for n, _ in layers], gates, first.routing, first.k, first.temperature,
                   [(int(c), int(v)) for c, v in outputs])

    def attach(self, base: nn.Module, experts: Sequence[Any], names: Sequence[str]) -> nn.Module:
        """:func:`~.mixer.attach_mixer` on ``base`` (in place) over ``experts`` at exactly :attr:`layers`, then
        the stored gate weights."""
        import re

        from .mixer import attach_mixer, mixer_layers

        model = attach_mixer(base, experts, targets=["re:" + re.escape(n) for n in self.layers],
                             routing=self.routing, k=self.k, temperature=self.temperature, names=names)
        got = [n for n, _ in mixer_layers(model)]
        if sorted(got) != sorted(self.layers):
            missing = sorted(set(self.layers) - set(got))
            raise CompositionFileError(f"the experts do not adapt the mixer's layer(s) {', '.join(missing[:3])}")
        for n, m in mixer_layers(model):
            w, b = self.gates[f"{n}.weight"], self.gates[f"{n}.bias"]
            if w.shape != m.router.weight.shape or b.shape != m.router.bias.shape:
                raise CompositionFileError(f"the gate of mixer layer {n!r} is {tuple(w.shape)}, the layer needs "
                                           f"{tuple(m.router.weight.shape)}")
            m.router.load_state_dict({"weight": w, "bias": b})
        return model


@dataclass
class CompositionSpec:
    """Which adapters run on a case and how their class maps become one label map.

    ``names``/``values``/``channels``: the adapters in class order, the label value each writes and the output
    channel holding its class map. ``select``: see :data:`SELECTIONS`; ``k`` for ``top-k``; ``router`` and
    ``pooled_layer`` for ``top-k`` and ``present``. ``priority``: adapter indices, first wins (``rule="priority"``).
    ``mixer`` for ``select="mixer"``: the adapters are the mixer's experts, all of them run in one network.
    """

    names: list[str]
    values: list[int]
    select: str = "all"
    k: int | None = None
    router: CaseRouter | None = None
    pooled_layer: str | None = None
    rule: str = "probability"
    priority: list[int] | None = None
    threshold: float = 0.5
    channels: list[int] = field(default_factory=list)
    pooling: str = "mean"
    mixer: MixerSpec | None = None

    def __post_init__(self) -> None:
        n = len(self.names)
        if n == 0 or len(self.values) != n or len(set(self.names)) != n:
            raise CompositionFileError(f"a composition needs distinct adapter names, one label value each; got "
                                       f"{self.names} and {self.values}")
        self.channels = list(self.channels) or [0] * n
        if self.select not in SELECTIONS:
            raise CompositionFileError(f"unknown adapter selection {self.select!r}; choose one of "
                                       f"{', '.join(SELECTIONS)}")
        if (self.select == "mixer") != (self.mixer is not None):
            raise CompositionFileError("selection 'mixer' needs a MixerSpec, and a MixerSpec needs selection 'mixer'")
        if self.mixer is not None:
            bad = next((lay for lay in self.mixer.layers if self.mixer.gates[f"{lay}.weight"].shape[0] != n), None)
            if bad is not None:
                raise CompositionFileError(f"the gate of mixer layer {bad!r} scores "
                                           f"{self.mixer.gates[bad + '.weight'].shape[0]} experts, the composition "
                                           f"has {n}")
        if self.select not in ("all", "mixer") and (self.router is None or not self.pooled_layer):
            raise CompositionFileError(f"selection {self.select!r} needs a router and the pooled layer it reads")
        if self.select == "top-k" and not (self.k is not None and 1 <= self.k <= n):
            raise CompositionFileError(f"top-k selection needs 1 <= k <= {n}, got k={self.k}")
        if self.pooling not in POOLINGS:
            raise CompositionFileError(f"unknown router pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if self.rule not in FUSION_RULES:
            raise CompositionFileError(f"unknown fusion rule {self.rule!r}; choose one of {', '.join(FUSION_RULES)}")
        if self.priority is not None and sorted(self.priority) != list(range(n)):
            raise CompositionFileError(f"priority must order the {n} adapters, got {self.priority}")
        if self.router is not None and self.router.head.out_features != n:
            raise CompositionFileError(f"the router scores {self.router.head.out_features} adapters, the "
                                       f"composition has {n}")

    def case_features(self, base: nn.Module, x: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        """``(1, C)`` router features of one case: ``x`` is its stack of axial slices ``(S, 1, X, Y)`` (2D base)
        or the volume ``(1, 1, X, Y, Z)`` (3D base). ``pooling="mean"``: the plain average of the pooled layer's
        output; ``"foreground"``: its average weighted by the base's own foreground probability (output channel 0,
        area-averaged onto the layer's grid), i.e. the features where the base sees the lesion, and the plain
        average where it sees none."""
        assert self.pooled_layer is not None
        if self.pooling == "mean":
            total = None
            for start in range(0, x.shape[0], chunk):  # a long stack of slices need not fit in memory at once
                part = pooled_features(base, self.pooled_layer, x[start:start + chunk]).sum(0, keepdim=True)
                total = part if total is None else total + part
            assert total is not None
            return total / x.shape[0]
        modules = dict(base.named_modules())
        if self.pooled_layer not in modules:
            raise CompositionFileError(f"the base has no sub-module {self.pooled_layer!r} for the router to read")
        got: list[torch.Tensor] = []
        handle = modules[self.pooled_layer].register_forward_hook(lambda _m, _i, out: got.append(out))
        num = den = plain = 0.0
        try:
            with torch.no_grad():
                for start in range(0, x.shape[0], chunk):
                    prob = torch.sigmoid(base(x[start:start + chunk])[:, :1].float())
                    f = got.pop().float()
                    w = nn.functional.interpolate(prob, size=f.shape[2:], mode="area")
                    axes = (0, *range(2, f.dim()))
                    num = num + (f * w).sum(dim=axes)
                    den = den + w.sum()
                    plain = plain + f.mean(dim=tuple(range(2, f.dim()))).sum(0)
        finally:
            handle.remove()
        if float(den) < 1e-6:
            return (plain / x.shape[0])[None]
        return (num / den)[None]

    def choose(self, features: torch.Tensor | None) -> list[list[int]]:
        """Indices of the adapters that run, per case (ascending), from ``(N, C)`` router features."""
        n = len(self.names)
        if self.select in ("all", "mixer"):
            return [list(range(n))] * (1 if features is None else features.shape[0])
        assert self.router is not None and features is not None
        with torch.no_grad():
            scores = self.router(features)
        if self.select == "top-k":
            return [sorted(torch.topk(s, int(self.k)).indices.tolist()) for s in scores]
        return [[i for i in range(n) if s[i] > 0] or [int(s.argmax())] for s in scores]

    def sub_priority(self, chosen: Sequence[int]) -> list[int] | None:
        """The priority order restricted to ``chosen``, as indices into ``chosen``."""
        if self.priority is None:
            return None
        return [list(chosen).index(i) for i in self.priority if i in chosen]

    def segment(self, bank: nn.Module, base: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """One case through an :class:`~.bank.AdapterBank` holding the adapters under :attr:`names`: the chosen
        adapters in one mixed batch, fused. ``x`` as in :meth:`case_features`. Returns (labels, chosen)."""
        if self.mixer is not None:
            raise CompositionFileError("a mixer composition runs as one network (MixerSpec.attach), not through a bank")
        chosen = self.choose(None if self.select == "all" else self.case_features(base, x))[0]
        labels, _ = compose_outputs(bank, x, [self.names[i] for i in chosen],
                                    channels=[self.channels[i] for i in chosen],
                                    values=[self.values[i] for i in chosen], rule=self.rule,
                                    threshold=self.threshold, priority=self.sub_priority(chosen))
        return labels, chosen


def _file_fingerprint(path: Path) -> str:
    meta, tensors = read_adapter_file(path)
    return str(meta.get("tensors_sha256") or tensors_checksum(tensors))


def save_composition(path: str | os.PathLike[str], spec: CompositionSpec, base: nn.Module,
                     adapter_files: Sequence[str | os.PathLike[str]], *, architecture: Mapping[str, Any] | None = None,
                     preprocessing: Mapping[str, Any] | None = None) -> Path:
    """Write ``spec`` with the adapter files it routes (in ``spec.names`` order) to ``path``.

    Every adapter must have been trained on ``base`` (each tensor its file fingerprinted must match); refused in
    one line otherwise, before anything is written.
    """
    path = Path(path)
    files = [Path(f) for f in adapter_files]
    if len(files) != len(spec.names):
        raise CompositionFileError(f"{path}: {len(files)} adapter files for {len(spec.names)} adapters")
    record = base_record(base)
    entries = []
    for name, value, channel, f in zip(spec.names, spec.values, spec.channels, files, strict=True):
        meta, _ = read_adapter_file(f)
        fitted = (meta.get("base") or {}).get("tensors", {})
        differ = next((k for k, v in fitted.items() if record["tensors"].get(k) != v), None)
        if differ is not None:
            raise CompositionFileError(f"{f}: adapter {name!r} was trained on another base (first at tensor "
                                       f"{differ!r}); a composition needs one base")
        entries.append({"name": name, "value": int(value), "channel": int(channel),
                        "file": os.path.relpath(f.resolve(), path.resolve().parent),
                        "tensors_sha256": _file_fingerprint(f)})
    tensors: dict[str, torch.Tensor] = {}
    if spec.router is not None:
        tensors = {f"router.{k}": v.detach().to("cpu", torch.float32).contiguous()
                   for k, v in spec.router.state_dict().items()}
    mix = spec.mixer
    if mix is not None:
        tensors = {f"mixer.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in mix.gates.items()}
    from ... import __version__

    meta = {"format": COMPOSITION_FORMAT, "medlora_version": __version__, "adapters": entries,
            "base": {"sha256": record["sha256"]}, "select": spec.select, "k": spec.k,
            "pooled_layer": spec.pooled_layer, "pooling": spec.pooling,
            "router": None if spec.router is None else {"in_features": spec.router.head.in_features},
            "mixer": None if mix is None else {"layers": list(mix.layers), "routing": mix.routing, "k": int(mix.k),
                                               "temperature": float(mix.temperature),
                                               "outputs": [[int(c), int(v)] for c, v in mix.outputs]},
            "fusion": {"rule": spec.rule, "threshold": float(spec.threshold),
                       "priority": None if spec.priority is None else [spec.names[i] for i in spec.priority]},
            "architecture": None if architecture is None else dict(architecture),
            "preprocessing": None if preprocessing is None else dict(preprocessing),
            "tensors_sha256": tensors_checksum(tensors)}
    return atomic_save_safetensors(tensors, path, {"format": "pt", "medlora": json.dumps(meta)})


def save_mixer(path: str | os.PathLike[str], model: nn.Module, base: nn.Module,
               adapter_files: Sequence[str | os.PathLike[str]], values: Sequence[int], *,
               names: Sequence[str] | None = None, outputs: Sequence[tuple[int, int]] = ((0, 1),),
               threshold: float = 0.5, architecture: Mapping[str, Any] | None = None,
               preprocessing: Mapping[str, Any] | None = None) -> Path:
    """Write the mixer attached to ``model`` (its gates, routing, layers) with its experts' adapter files, in the
    mixer's expert order, as a composition file of selection ``mixer``.

    ``values``: the class each expert was trained for (recorded); ``outputs``: ``(channel, label value)`` of the
    mixed network's output written by ``medlora infer``. Refused in one line, before anything is written, when
    ``model`` is not ``base`` plus the mixer, or when the experts rebuilt from the files differ from the mixer's
    (another file, or experts trained together with the routers: save those as adapter files first).
    """
    from .mixer import detach_mixer, mixer_layers

    mix = MixerSpec.from_model(model, outputs)
    layers = dict(mixer_layers(model))
    names = list(names) if names is not None else list(layers[mix.layers[0]].names)
    spec = CompositionSpec(names, list(values), select="mixer", mixer=mix, threshold=threshold)
    if len(adapter_files) != len(names):
        raise CompositionFileError(f"{path}: {len(adapter_files)} adapter files for {len(names)} experts")
    if base_record(detach_mixer(copy.deepcopy(model)))["sha256"] != base_record(base)["sha256"]:
        raise CompositionFileError(f"{path}: the mixer's model is not the given base plus its mixer layers")
    rebuilt = dict(mixer_layers(mix.attach(copy.deepcopy(base), list(adapter_files), names)))
    for lay in mix.layers:
        mine, got = layers[lay], rebuilt[lay]
        for e, f in enumerate(adapter_files):
            same = all(torch.allclose(x[e].float().cpu(), y[e].float().cpu(), rtol=1e-5, atol=1e-6) for x, y in
                       ((mine.lora_A, got.lora_A), (mine.lora_B, got.lora_B), (mine.scaling, got.scaling)))
            if not same:
                raise CompositionFileError(f"{f}: expert {names[e]!r} differs from the mixer's expert at layer "
                                           f"{lay!r} (another file, or an expert trained with the routers)")
    return save_composition(path, spec, base, adapter_files, architecture=architecture, preprocessing=preprocessing)


def read_composition(path: str | os.PathLike[str]) -> tuple[CompositionSpec, dict[str, Any]]:
    """The :class:`CompositionSpec` (with its router rebuilt) and the metadata of a composition file."""
    path = Path(path)
    tensors, header = read_safetensors(path, error=CompositionFileError)
    try:
        meta = json.loads(header.get("medlora", "null"))
    except json.JSONDecodeError as exc:
        raise CompositionFileError(f"{path}: corrupt medlora metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != COMPOSITION_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CompositionFileError(f"{path}: not a composition file (format {found!r}, expected "
                                   f"{COMPOSITION_FORMAT})")
    if meta.get("tensors_sha256") != tensors_checksum(tensors):
        raise CompositionFileError(f"{path}: router tensors do not match the checksum stored when the file was "
                                   "written; the file is corrupt")
    try:
        adapters = meta["adapters"]
        names = [str(a["name"]) for a in adapters]
        router = None
        if meta.get("router") is not None:
            router = CaseRouter(int(meta["router"]["in_features"]), len(names), names)
            router.load_state_dict({k.removeprefix("router."): v for k, v in tensors.items()})
        mixer = None
        if meta.get("mixer") is not None:
            m = meta["mixer"]
            gates = {k.removeprefix("mixer."): v for k, v in tensors.items()}
            layers = [str(n) for n in m["layers"]]
            absent = [f"{n}.{k}" for n in layers for k in ("weight", "bias") if f"{n}.{k}" not in gates]
            if absent:
                raise CompositionFileError(f"no gate tensor mixer.{absent[0]}")
            mixer = MixerSpec(layers, gates, str(m["routing"]), int(m["k"]), float(m["temperature"]),
                              [(int(c), int(v)) for c, v in m["outputs"]])
        fusion = meta["fusion"]
        prio = fusion.get("priority")
        spec = CompositionSpec(names, [int(a["value"]) for a in adapters], select=meta["select"], k=meta.get("k"),
                               router=router, pooled_layer=meta.get("pooled_layer"), rule=fusion["rule"],
                               priority=None if prio is None else [names.index(p) for p in prio],
                               threshold=float(fusion["threshold"]), channels=[int(a["channel"]) for a in adapters],
                               pooling=meta.get("pooling", "mean"), mixer=mixer)
    except CompositionFileError as exc:
        raise CompositionFileError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CompositionFileError(f"{path}: malformed composition metadata ({' '.join(str(exc).split())})") from None
    return spec, meta


def check_base(path: str | os.PathLike[str], meta: Mapping[str, Any], base: nn.Module) -> None:
    """Refuse ``base`` (one line) unless it is the base the composition at ``path`` was saved with."""
    if base_record(base)["sha256"] != meta["base"]["sha256"]:
        raise CompositionFileError(f"{path}: the base model differs from the one this composition's adapters were "
                                   "trained on; use it with that base")


def resolve_adapter_files(path: str | os.PathLike[str], meta: Mapping[str, Any],
                          given: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    """The adapter files of a composition, in its order: those ``given`` (matched by fingerprint; every recorded
    adapter must be among them, and nothing else), else the recorded paths beside the composition file. Any file
    missing or with another fingerprint is refused in one line."""
    path = Path(path)
    want = {str(a["tensors_sha256"]): str(a["name"]) for a in meta["adapters"]}
    if given:
        found: dict[str, Path] = {}
        for f in map(Path, given):
            fp = _file_fingerprint(f)
            if fp not in want:
                raise CompositionFileError(f"{f}: not one of the adapters of composition {path} "
                                           f"({', '.join(want.values())}): its fingerprint differs")
            found[fp] = f
        missing = [n for fp, n in want.items() if fp not in found]
        if missing:
            raise CompositionFileError(f"{path}: no --adapter file given for adapter(s) {', '.join(missing)}")
        return [found[str(a["tensors_sha256"])] for a in meta["adapters"]]
    out = []
    for a in meta["adapters"]:
        f = path.parent / a["file"]
        if not f.is_file():
            raise CompositionFileError(f"{path}: adapter {a['name']!r} not found at {f}; give the adapter files "
                                       "with --adapter")
        if _file_fingerprint(f) != a["tensors_sha256"]:
            raise CompositionFileError(f"{f}: adapter {a['name']!r} differs from the one composition {path} was "
                                       "saved with (its fingerprint differs)")
        out.append(f)
    return out
