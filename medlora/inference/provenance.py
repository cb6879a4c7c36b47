"""``provenance.json``: what produced the files in a ``medlora infer`` output folder.

nnU-Net writes ``predict_from_raw_data_args.json`` beside its predictions; ours records, for every run
that wrote into the folder, enough to tell later which model made which label map and to repeat it:

* ``models``: every file the networks were loaded from (``checkpoint``, ``base``, ``adapter``, ``model``),
  its absolute path, size and SHA-256 (of the bytes on disk when they were loaded);
* ``members``: the ensemble members, and the model source as given (``--model``, ``--adapter``, ``--method``);
* ``architecture`` and ``preprocessing`` (HU window, resampling, sliding-window size) as recorded with the
  model, the ``threshold`` and sliding-window settings actually used, the device;
* the medlora, torch and MONAI versions, the command line (``sys.argv``) and the call's arguments, the
  start time (UTC) and the time of the last update;
* ``cases``: the case ids this run wrote.

Runs are appended (a folder may be filled by several runs; the last run that lists a case made its
current files). A run that writes no case is not recorded. The file is rewritten atomically after every
case, so an interrupted run leaves a record of what it wrote.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MedloraError
from ..fileio import atomic_write_bytes

__all__ = ["PROVENANCE_FILE", "ModelFile", "ProvenanceLog", "sha256_of_file"]

PROVENANCE_FILE = "provenance.json"
FORMAT = "medlora-infer-provenance/1"


def sha256_of_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ModelFile:
    """One file an inference model was loaded from, with its role and (once computed) its fingerprint."""

    role: str  # checkpoint | base | adapter | model
    path: Path
    _record: dict[str, Any] | None = field(default=None, repr=False)

    def fingerprint(self) -> dict[str, Any]:
        """``{"role", "path", "bytes", "sha256"}``; computed on the first call and kept."""
        if self._record is None:
            path = Path(os.path.abspath(self.path))
            self._record = {"role": self.role, "path": str(path), "bytes": path.stat().st_size,
                            "sha256": sha256_of_file(path)}
        return dict(self._record)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    import monai
    import torch

    from .. import __version__

    return {"medlora": __version__, "torch": str(torch.__version__), "monai": str(monai.__version__),
            "python": sys.version.split()[0]}


class ProvenanceLog:
    """The provenance file of one output folder: earlier runs (read at start) plus this run."""

    def __init__(self, out_dir: Path, run: dict[str, Any], replace_unreadable: bool = False) -> None:
        self.path = Path(out_dir) / PROVENANCE_FILE
        self.runs = self._read(replace_unreadable)
        self.run = {"started": _now(), "updated": None, "versions": _versions(), **run, "cases": []}

    def _read(self, replace_unreadable: bool) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("runs"),
                                                                                                 list):
                raise ValueError(f"expected an object with format {FORMAT!r} and a list of runs")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            if replace_unreadable:
                return []
            raise MedloraError(f"{self.path}: cannot update it ({' '.join(str(exc).split())}); move it away, "
                               "choose another --out, or use --overwrite") from None
        return list(record["runs"])

    def add_case(self, case_id: str) -> None:
        """Record that this run wrote ``case_id`` and rewrite the file (atomically)."""
        if case_id not in self.run["cases"]:
            self.run["cases"].append(case_id)
        self.run["updated"] = _now()
        text = json.dumps({"format": FORMAT, "runs": [*self.runs, self.run]}, indent=2, default=str)
        atomic_write_bytes(self.path, text + "\n")
