"""Merging several LoRA adapters trained on one base into one adapter: linear, or LoRA-LEGO.

Each source is an adapter file (or the ``(metadata, tensors)`` pair of :func:`read_adapter_file`)
holding plain ``lora`` adapters; every layer a source adapts must have the same base-weight fingerprint
in every source that adapts it. The result is an ordinary ``lora`` adapter file that
:func:`medlora.adapters.load_adapter` loads onto the same base. Per layer, source j contributes
``w_j * s_j * B_j @ A_j`` (``s_j`` its own scale, ``w_j`` its weight, default ``1/N``).

``method="linear"``: the weighted sum, exactly, as one LoRA of rank ``sum r_j`` (``B = [w_j s_j B_j]``,
``A = [A_j]`` concatenated; the construction of PEFT's ``combination_type="cat"``); with ``rank=k`` it is
compressed to its best rank-k approximation (SVD of the factored sum), of rank ``min(k, O, I*prod k)`` on a layer
smaller than k (a 2-class head keeps rank 2; the file records each layer's own rank).

``method="lego"``: LoRA-LEGO (Zhao et al., "Merging LoRAs like Playing LEGO: Pushing the Modularity of
LoRA to Extremes Through Rank-Wise Clustering", ICLR 2025, arXiv 2409.16167). Every rank-1 component
``(s_j B_j[:, i], A_j[i])`` is a minimal semantic unit (MSU); the MSUs of all sources are pooled per layer
and clustered with k-means (k = ``rank``, default the largest source rank), and the merged rank-k LoRA is
built from the cluster centroids. Our resolution of the details, which the paper's text available to us
does not fix: (1) each MSU is first brought to a canonical form that leaves its contribution ``b a^T``
unchanged (``||b|| = ||a||``, the sign making the largest-magnitude entry of ``a`` positive), because
``(c b, a / c)`` is the same unit for any c != 0; (2) "parameter rescale" against the norm decay of
averaging: the centroid's b and a parts are rescaled to the mean norms of their members; (3) a cluster's
unit enters the merge with the summed weight of its members, ``dW = sum_c (sum_{u in c} w_u) b_c a_c^T``,
so identical units merge exactly as the linear merge would; (4) the paper's output rescale against
variance expansion is left to the user as ``output_scale`` (default 1).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ._linalg import factored_svd
from .config import AdapterConfig
from .inject import layer_config
from .io import EXTRA_PREFIX, adapter_metadata, merged_base_record, read_adapter_file, write_adapter_file

Source = str | os.PathLike | tuple[dict[str, Any], dict[str, torch.Tensor]]


def _load(source: Source) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    if isinstance(source, tuple):
        meta, tensors = source
        return "<in-memory adapter>", meta, tensors
    meta, tensors = read_adapter_file(source)
    return str(source), meta, tensors


def _units(label: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Per layer: (info, B scaled by s, A) of one source, after checking it holds plain LoRA adapters."""
    out = {}
    for name, info in meta["layers"].items():
        config = layer_config(AdapterConfig.from_dict(meta["configs"][info["config"]]), name)
        if config.method != "lora" or config.options.get("adapt_outputs") is not None:
            raise ValueError(f"merge_adapters: {label} layer {name!r} holds a {config.method} adapter"
                             f"{' on fused outputs' if config.method == 'lora' else ''}; only plain lora adapters "
                             "merge (squeeze/truncate_rank others to lora first)")
        a, b = tensors[f"{name}.lora_A"].double(), tensors[f"{name}.lora_B"].double()
        out[name] = (info, b * config.scaling(), a, tensors[f"{name}.lora_A"].dtype)
    return out


def kmeans(points: torch.Tensor, k: int, *, n_init: int = 8, max_iter: int = 100,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding, best of ``n_init``: ``(labels, centroids)``."""
    n = points.shape[0]
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for _ in range(n_init):
        centres = [points[int(torch.randint(n, (), generator=generator))]]
        for _ in range(1, k):
            d2 = torch.cdist(points, torch.stack(centres)).min(dim=1).values ** 2
            probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / n)
            centres.append(points[int(torch.multinomial(probs, 1, generator=generator))])
        c = torch.stack(centres)
        for _ in range(max_iter):
            labels = torch.cdist(points, c).argmin(dim=1)
            new = c.clone()
            for j in range(k):
                members = points[labels == j]
                if len(members):
                    new[j] = members.mean(dim=0)
                else:  # an empty cluster takes the point farthest from its centre
                    far = (points - c[labels]).norm(dim=1).argmax()
                    new[j] = points[far]
            if torch.equal(new, c):
                break
            c = new
        labels = torch.cdist(points, c).argmin(dim=1)
        inertia = float(((points - c[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, c)
    assert best is not None
    return best[1], best[2]


def _canonical(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 units (columns of b, rows of a) rescaled to ||b|| = ||a|| and sign-fixed; b a^T unchanged."""
    nb, na = b.norm(dim=0), a.norm(dim=1)
    c = torch.where((nb > 0) & (na > 0), torch.sqrt(na / nb.clamp_min(1e-300)), torch.ones_like(nb))
    sign = torch.sign(a.gather(1, a.abs().argmax(dim=1, keepdim=True)).squeeze(1))
    sign[sign == 0] = 1
    return b * (c * sign), a * (sign / c)[:, None]


def _lego(b: torch.Tensor, a: torch.Tensor, w: torch.Tensor, k: int, rescale: bool, generator: torch.Generator,
          n_init: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, a = _canonical(b, a)
    if k >= b.shape[1]:  # nothing to cluster: every unit keeps its own slot
        return b * w, a
    points = torch.cat([b.t(), a], dim=1)
    labels, centroids = kmeans(points, k, n_init=n_init, generator=generator)
    out_b, out_a = centroids[:, : b.shape[0]].t().clone(), centroids[:, b.shape[0]:].clone()
    for j in range(k):
        members = labels == j
        if rescale and members.any():
            nb, na = out_b[:, j].norm(), out_a[j].norm()
            if nb > 0:
                out_b[:, j] *= b[:, members].norm(dim=0).mean() / nb
            if na > 0:
                out_a[j] *= a[members].norm(dim=1).mean() / na
        out_b[:, j] *= w[members].sum()
    return out_b, out_a


def merge_adapters(
    sources: Sequence[Source],
    method: str = "linear",
    weights: Sequence[float] | None = None,
    *,
    rank: int | None = None,
    out: str | os.PathLike | None = None,
    rescale: bool = True,
    output_scale: float = 1.0,
    seed: int = 0,
    n_init: int = 8,
) -> Path | tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Merge LoRA adapters of one base model into one ``lora`` adapter (see the module docstring).

    ``method``: ``"linear"`` (exact weighted sum; ``rank`` compresses it by SVD) or ``"lego"`` (rank-wise
    k-means of the pooled rank-1 units into ``rank`` units, default the largest source rank;
    ``rescale`` is LEGO's parameter rescale, ``output_scale`` multiplies the merged update).
    ``weights``: one per source, default ``1/N``. Writes ``out`` and returns its path, or returns
    ``(metadata, tensors)`` when ``out`` is None (itself a valid source).
    """
    if method not in ("linear", "lego"):
        raise ValueError(f"merge_adapters: method must be 'linear' or 'lego', got {method!r}")
    if not sources:
        raise ValueError("merge_adapters: no adapters given")
    weights = [1.0 / len(sources)] * len(sources) if weights is None else list(weights)
    if len(weights) != len(sources):
        raise ValueError(f"merge_adapters: {len(weights)} weights for {len(sources)} adapters")
    loaded = [_load(s) for s in sources]
    if any(any(k.startswith(EXTRA_PREFIX) for k in t) for _, _, t in loaded):
        warnings.warn("merge_adapters: extra tensors (e.g. normalisation statistics) are not merged", stacklevel=2)
    per_source = [_units(label, meta, tensors) for label, meta, tensors in loaded]
    generator = torch.Generator().manual_seed(seed)
    layer_names = sorted({n for units in per_source for n in units})
    out_tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    configs: list[dict[str, Any]] = []
    for name in layer_names:
        found = [(w, units[name]) for w, units in zip(weights, per_source, strict=True) if name in units]
        info0 = found[0][1][0]
        for _, (info, *_rest) in found:
            if info["base_sha256"] != info0["base_sha256"] or info["weight_shape"] != info0["weight_shape"]:
                raise ValueError(f"merge_adapters: the adapters were trained on different base weights "
                                 f"(layer {name!r}); merging needs one base model")
        b = torch.cat([u[1] for _, u in found], dim=1)
        a = torch.cat([u[2] for _, u in found], dim=0)
        w = torch.cat([torch.full((u[2].shape[0],), float(wt), dtype=torch.float64) for wt, u in found])
        if method == "linear":
            b = b * w
            if rank is not None and rank < b.shape[1]:
                u_, s_, vh = factored_svd(b, a, rank, method="exact")
                b, a = u_ * s_.sqrt(), s_.sqrt()[:, None] * vh
        else:
            k = rank if rank is not None else max(u[2].shape[0] for _, u in found)
            b, a = _lego(b, a, w, k, rescale, generator, n_init)
        b = b * output_scale
        r = b.shape[1]
        config = AdapterConfig("lora", rank=r, alpha=float(r)).to_dict()  # scale alpha / r = 1
        if config not in configs:
            configs.append(config)
        dtype = found[0][1][3]
        out_tensors[f"{name}.lora_A"] = a.to(dtype).contiguous()
        out_tensors[f"{name}.lora_B"] = b.to(dtype).contiguous()
        layers[name] = {**info0, "config": configs.index(config)}
    for index, config in enumerate(configs):  # each config names the layers it was used on
        config["targets"] = [n for n, info in layers.items() if info["config"] == index]
    meta = adapter_metadata(configs, layers, base=merged_base_record([(label, m) for label, m, _ in loaded]),
                            extra={"merged_from": [label for label, _, _ in loaded], "merge_method": method,
                                   "weights": weights, "rank": rank})
    if out is None:
        return meta, out_tensors
    return write_adapter_file(out, meta, out_tensors)


__all__ = ["kmeans", "merge_adapters"]
