"""LightningDataModule for a dataset in nnU-Net v2 layout: k-fold splits, 3D patches or 2D slices.

3D mode samples ``samples_per_volume`` patches per volume with a positive/negative balance (MONAI
``RandCropByPosNegLabeld``). 2D mode reproduces the seed paper's authors' sampling: axial slices,
every batch one slice with hemorrhage and one without (``PosNegSliceBatchSampler``). Validation and
test see whole volumes (sliding-window inference happens in the LightningModule).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from monai.data import CacheDataset, Dataset, list_data_collate
from torch.utils.data import DataLoader, Sampler

from .dataset import DatasetError, ensure_splits, foreground_values, load_splits, read_dataset, validate_dataset
from .transforms import DEFAULT_HU_WINDOW, compose, preprocessing, training_augmentation


def _records(index, case_ids: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for i, cid in enumerate(case_ids):
        case = index.case(cid)
        if case.label is None:
            raise DatasetError(f"{index.root}: case {cid} has no label file")
        image = str(case.images[0]) if len(case.images) == 1 else [str(p) for p in case.images]
        out.append({"image": image, "label": str(case.label), "case_id": cid, "case_index": i})
    return out


class SliceDataset(torch.utils.data.Dataset):
    """Axial slices (last axis) of preprocessed volumes; knows which slices hold hemorrhage."""

    def __init__(self, volumes: Sequence[dict[str, Any]], flip: bool = True, seed: int = 0) -> None:
        self.volumes = volumes
        self.index: list[tuple[int, int]] = []
        self.positive: list[int] = []
        self.negative: list[int] = []
        for v, vol in enumerate(volumes):
            per_slice = vol["label"].reshape(-1, vol["label"].shape[-1]).sum(0)
            for z in range(vol["label"].shape[-1]):
                (self.positive if per_slice[z] > 0 else self.negative).append(len(self.index))
                self.index.append((v, z))
        self.flip = flip
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        v, z = self.index[i]
        vol = self.volumes[v]
        image, label = vol["image"][..., z].as_tensor(), vol["label"][..., z].as_tensor()
        if self.flip and torch.rand(1, generator=self.generator).item() < 0.5:
            image, label = image.flip(1), label.flip(1)
        return {"image": image, "label": label}


class PosNegSliceBatchSampler(Sampler[list[int]]):
    """Batches of one positive and one negative slice, as the seed authors (``split.py::mix``).

    The number of positive slices sets the epoch length; negatives are drawn without replacement
    and reshuffled when exhausted. ``batch_size`` must be even: half positives, half negatives.
    """

    def __init__(self, positive: list[int], negative: list[int], batch_size: int = 2, seed: int = 0) -> None:
        if batch_size % 2:
            raise ValueError(f"2D slice sampling needs an even batch size, got {batch_size}")
        if not positive or not negative:
            raise ValueError("2D slice sampling needs slices with and without hemorrhage in the training cases")
        self.positive, self.negative, self.half = positive, negative, batch_size // 2
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return max(1, len(self.positive) // self.half)

    def __iter__(self) -> Iterator[list[int]]:
        pos = [self.positive[i] for i in torch.randperm(len(self.positive), generator=self.generator)]
        neg: list[int] = []
        for b in range(len(self)):
            while len(neg) < self.half:
                neg += [self.negative[i] for i in torch.randperm(len(self.negative), generator=self.generator)]
            batch_pos = pos[b * self.half:(b + 1) * self.half] or pos[: self.half]
            yield batch_pos + [neg.pop() for _ in range(self.half)]


class CTSegDataModule(pl.LightningDataModule):
    """Training/validation data for one fold of a dataset in nnU-Net v2 layout.

    Args:
        data_dir: dataset folder (``dataset.json``, ``imagesTr``, ``labelsTr``).
        fold: fold index into the splits, or ``"all"`` to train and validate on every case (nnU-Net's
            ``fold all``, used for pretraining).
        num_folds: k for the default nnU-Net split (``KFold(k, shuffle=True, random_state=12345)`` over
            sorted case ids), written to ``<data_dir>/splits_final.json`` if that file does not exist.
        splits_file: a ``splits_final.json`` to use instead.
        spatial_dims: 3 for 3D patches, 2 for axial slices.
        patch_size: 3D patch (x, y, z) or 2D slice size (x, y); volumes are padded up to it.
        batch_size: 3D: volumes per batch (each gives ``samples_per_volume`` patches); 2D: slices per
            batch (half with hemorrhage).
        samples_per_volume: 3D patches drawn per volume and visit.
        pos_fraction: 3D probability that a patch is centred on hemorrhage.
        hu_window: Hounsfield window mapped to [0, 1].
        target_spacing: resample to this spacing in mm (None: keep the images' own).
        validate: check every case (files, geometry, label values, NaN) before training.
        cache: keep preprocessed volumes in memory (MONAI CacheDataset).
        num_workers: DataLoader workers.
        seed: seed of the sampling order.
        foreground: label names or values trained as foreground (the binary view of a multi-class dataset, e.g.
            ``[subarachnoid]`` for one class); None: every class of a multi-class dataset, a binary dataset as is
            (see :func:`medlora.data.dataset.foreground_values`).
    """

    def __init__(
        self,
        data_dir: str,
        fold: int | str = 0,
        num_folds: int = 5,
        splits_file: str | None = None,
        spatial_dims: int = 3,
        patch_size: Sequence[int] = (64, 64, 16),
        batch_size: int = 2,
        samples_per_volume: int = 2,
        pos_fraction: float = 0.5,
        hu_window: Sequence[float] = DEFAULT_HU_WINDOW,
        target_spacing: Sequence[float] | None = None,
        validate: bool = True,
        cache: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        foreground: Sequence[int | str] | None = None,
    ) -> None:
        super().__init__()
        from ..training.checks import check_data

        check_data("", spatial_dims=spatial_dims, patch_size=patch_size, batch_size=batch_size,
                   samples_per_volume=samples_per_volume, pos_fraction=pos_fraction, hu_window_=hu_window,
                   target_spacing=target_spacing)
        self.save_hyperparameters()
        self.data_dir = Path(os.path.expanduser(data_dir))
        self.train_ids: list[str] = []
        self.val_ids: list[str] = []
        self._train = self._val = None

    def case_split(self) -> tuple[list[str], list[str]]:
        """(train case ids, validation case ids) of the configured fold."""
        hp = self.hparams
        index = read_dataset(self.data_dir)
        if hp.fold == "all":
            return index.case_ids, index.case_ids
        if hp.splits_file:
            splits = load_splits(hp.splits_file)
        else:
            splits = ensure_splits(self.data_dir, k=hp.num_folds, case_ids=index.case_ids)
        fold = int(hp.fold)
        if not 0 <= fold < len(splits):
            raise ValueError(f"fold {fold} does not exist: the splits have {len(splits)} folds")
        return list(splits[fold]["train"]), list(splits[fold]["val"])

    def setup(self, stage: str | None = None) -> None:
        if self._val is not None:
            return
        hp = self.hparams
        index = validate_dataset(self.data_dir) if hp.validate else read_dataset(self.data_dir)
        self.train_ids, self.val_ids = self.case_split()
        pre = preprocessing(hu_window=hp.hu_window, target_spacing=hp.target_spacing,
                            foreground=foreground_values(index, hp.foreground))
        dataset_cls = CacheDataset if hp.cache else Dataset
        extra = {"progress": False, "num_workers": 0} if hp.cache else {}
        self._val = dataset_cls(_records(index, self.val_ids), transform=compose(pre), **extra)
        if stage in (None, "fit"):
            if hp.spatial_dims == 3:
                aug = training_augmentation(hp.patch_size, hp.samples_per_volume, hp.pos_fraction)
                # MONAI's random transforms draw from their own generators: seed them for reproducible runs
                transform = compose(pre, aug).set_random_state(seed=hp.seed)
                self._train = dataset_cls(_records(index, self.train_ids), transform=transform, **extra)
            else:
                volumes = CacheDataset(_records(index, self.train_ids), transform=compose(pre), progress=False)
                self._train = SliceDataset([volumes[i] for i in range(len(volumes))], seed=hp.seed)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        if hp.spatial_dims == 2:
            sampler = PosNegSliceBatchSampler(self._train.positive, self._train.negative, hp.batch_size, hp.seed)
            return DataLoader(self._train, batch_sampler=sampler, num_workers=hp.num_workers)
        generator = torch.Generator().manual_seed(hp.seed)
        return DataLoader(self._train, batch_size=hp.batch_size, shuffle=True, generator=generator,
                          num_workers=hp.num_workers, collate_fn=list_data_collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._val, batch_size=1, shuffle=False, num_workers=self.hparams.num_workers,
                          collate_fn=list_data_collate)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
