"""The one entry point from a dataset name to records, splits and the training datasets.

`load_split_records(dataset, data_dir)` gives the records of each split (train, validation[, test]), the same
for training and evaluation; `build_datasets` turns the first two into preprocessed ImageCaptionDatasets.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from .records import (ImageCaptionDataset, Record, load_folder_records, load_iu_xray_records,
                      load_montgomery_records, load_patch_gastric_records, split_records)
from .synthetic import synthetic_records

SPLITS = {  # fractions of (train, validation[, test]) from the paper / released code
    "iu_xray": (0.80, 0.16, 0.04),
    "iu_xray_384": (0.70, 0.10, 0.20),  # the paper's 384 x 384 IU X-Ray runs
    "patch_gastric": (0.70, 0.10, 0.20),
    "montgomery": (0.8, 0.2),
    "folder": (0.9, 0.1),
    "synthetic": (0.75, 0.25),
}
DATASETS = ("synthetic", "folder", "iu_xray", "iu_xray_384", "montgomery", "patch_gastric")
# split by report (IU X-Ray) or slide (PatchGastricADC22): no report's or slide's images in two splits
GROUPED_LOADERS = {"iu_xray": load_iu_xray_records, "iu_xray_384": load_iu_xray_records,
                   "patch_gastric": load_patch_gastric_records}
SPLIT_SEED = 42  # the split is the same whatever the training seed (training and evaluation share it)


def load_records(dataset: str, data_dir=None, caption_column: str = "text", seed: int = 0,
                 synthetic_count: int = 24, synthetic_size: int = 64) -> List[Record]:
    if dataset == "synthetic":
        return synthetic_records(synthetic_count, synthetic_size, seed=seed)
    if data_dir is None:
        raise ValueError(f"--dataset {dataset} needs --data-dir")
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} is not a directory")
    if dataset == "folder":
        return load_folder_records(data_dir, caption_column)
    if dataset in GROUPED_LOADERS:
        return GROUPED_LOADERS[dataset](data_dir)
    if dataset == "montgomery":
        return load_montgomery_records(data_dir)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(SPLITS)}")


def load_split_records(dataset: str, data_dir=None, caption_column: str = "text", split_seed: int = SPLIT_SEED,
                       fractions: Optional[Sequence[float]] = None, **kwargs) -> List[List[Record]]:
    """The dataset's records cut into its splits (train, validation[, test]); unchecked. IU X-Ray is split by
    report uid and PatchGastricADC22 by slide id (seeded), then each split gets the images of its groups."""
    fractions = fractions or SPLITS[dataset]
    if dataset in GROUPED_LOADERS and data_dir is not None and Path(data_dir).is_dir():
        loader = GROUPED_LOADERS[dataset]
        records, groups = (loader(data_dir, return_slides=True) if dataset == "patch_gastric"
                           else loader(data_dir, return_uids=True))
        return split_records(records, fractions, seed=split_seed, groups=groups)
    records = load_records(dataset, data_dir, caption_column, **kwargs)
    return split_records(records, fractions, seed=split_seed)


def build_datasets(dataset: str, tokenizer, resolution: int, data_dir=None, caption_column: str = "text",
                   split_seed: int = SPLIT_SEED, on_error: str = "skip", fractions: Optional[Sequence[float]] = None,
                   progress: bool = True, **kwargs):
    """(train, validation) ImageCaptionDatasets (a test split, if any, is left for evaluation)."""
    splits = load_split_records(dataset, data_dir, caption_column, split_seed, fractions, **kwargs)
    return (ImageCaptionDataset(splits[0], tokenizer, resolution, on_error, name=f"{dataset} train split",
                                progress=progress),
            ImageCaptionDataset(splits[1], tokenizer, resolution, on_error, name=f"{dataset} validation split",
                                progress=progress))
