"""The hospitals of a federation: each site's dataset (a folder or generated phantoms) and its held-out cases.

The embedded sites are SAH phantoms (:mod:`medlora.data.phantoms`) that differ the way real sites do: slice
thickness and grid (``spacing``, ``shape``), noise, a scanner's HU calibration (``hu_offset``), head size
(``head_scale``), lesion-volume mix (``volume_bins``) and the number of cases. Every site keeps its last
``heldout`` cases (sorted case ids) for evaluation; the rest are its training cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..data.dataset import read_dataset, validate_dataset, write_splits
from ..errors import MedloraError


@dataclass
class PhantomSite:
    """Phantoms generated for one site (arguments of :func:`medlora.data.phantoms.write_dataset`)."""

    cases: int = field(default=8, metadata={"help": "number of cases (training + held out)"})
    seed: int = field(default=0, metadata={"help": "generator seed (give every site its own)"})
    domain: str = field(default="sah", metadata={"help": "sah (target) or tbi"})
    shape: list[int] | None = field(default=None, metadata={"help": "grid in voxels (default 96 x 96 x 32)"})
    spacing: list[float] | None = field(default=None, metadata={"help": "voxel size in mm (slice thickness last)"})
    noise_sigma: float | None = field(default=None, metadata={"help": "HU noise sd (default: 3-6 HU per case)"})
    hu_offset: float = field(default=0.0, metadata={"help": "scanner calibration offset in HU"})
    head_scale: float = field(default=1.0, metadata={"help": "head size factor (0.85-1.1)"})
    volume_bins: list[int] | None = field(
        default=None, metadata={"help": "hemorrhage-volume bins the cases cycle through (0: 0-25 mL ... 3: 100-225)"})


@dataclass
class SiteSpec:
    """One hospital: a dataset in nnU-Net v2 layout or phantoms, and how many cases it holds out."""

    name: str = field(metadata={"help": "site name (reports, messages)"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (nnU-Net v2 raw layout)"})
    phantoms: PhantomSite | None = field(default=None, metadata={"help": "generate phantoms instead"})
    heldout: int = field(default=2, metadata={"help": "last N cases (sorted ids) held out for evaluation"})


class SiteError(MedloraError, ValueError):
    """A site whose data cannot be used: one line naming the site and the problem."""


def prepare_site(site: SiteSpec, root: Path) -> Path:
    """The site's dataset folder: ``data_dir`` as given, or phantoms written (once) to ``root/<name>``."""
    if site.data_dir is not None:
        path = Path(site.data_dir).expanduser()
        validate_dataset(path)  # DatasetError names the file
        return path
    from ..data.phantoms import write_dataset

    ph = site.phantoms
    assert ph is not None
    grid = {k: v for k, v in (("shape", ph.shape), ("spacing", ph.spacing)) if v is not None}
    try:
        return write_dataset(root / site.name, ph.domain, ph.cases, seed=ph.seed, noise_sigma=ph.noise_sigma,
                             hu_offset=ph.hu_offset, head_scale=ph.head_scale, volume_bins=ph.volume_bins, **grid)
    except ValueError as exc:
        raise SiteError(f"site {site.name}: {exc}") from None


def site_split(site: SiteSpec, data_dir: Path) -> tuple[list[str], list[str]]:
    """(training case ids, held-out case ids): the last ``heldout`` sorted ids are held out."""
    ids = sorted(read_dataset(data_dir).case_ids)
    if not 1 <= site.heldout < len(ids):
        raise SiteError(f"site {site.name}: heldout must be between 1 and {len(ids) - 1} (it has {len(ids)} cases), "
                        f"got {site.heldout}")
    return ids[:-site.heldout], ids[-site.heldout:]


def write_site_splits(site: SiteSpec, data_dir: Path, path: Path) -> Path:
    """A one-fold ``splits_final.json`` (train / held out) for the data module; unchanged files are kept."""
    train, heldout = site_split(site, data_dir)
    splits = [{"train": train, "val": heldout}]
    if path.exists() and json.loads(path.read_text(encoding="utf-8")) == splits:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_splits(path, splits)
    return path
