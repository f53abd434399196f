"""Dataset names (the official ones of DeVIS and the synthetic ones) -> kind, folders and class count."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass

from .ytvis_format import DatasetError, load_json

__all__ = ["DatasetSpec", "UnknownDatasetError", "get_dataset_spec", "resolve_dataset", "list_datasets",
           "register_dataset", "build_datasets"]


class UnknownDatasetError(KeyError):
    """A dataset name that is not registered; the message lists the closest registered names."""

    def __str__(self) -> str:
        # KeyError would print the message wrapped in quotes.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives, relative to DATASETS.DATA_PATH.

    kind: "vis" (YouTube-VIS / OVIS JSON) or "coco". num_classes: number of class logits the model needs,
    or None to read it from the annotation file (the largest category id; labels are id - 1).
    """

    name: str
    kind: str
    image_root: str
    ann_file: str
    num_classes: int | None = None

    def __post_init__(self):
        if self.kind not in ("vis", "coco"):
            raise ValueError(f"dataset {self.name!r}: kind must be 'vis' or 'coco', got {self.kind!r}")
        for key in ("image_root", "ann_file"):
            if os.path.isabs(getattr(self, key)):
                raise ValueError(f"dataset {self.name!r}: {key} must be relative to DATA_PATH, "
                                 f"got {getattr(self, key)!r}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise ValueError(f"dataset {self.name!r}: num_classes must be a positive int or None, "
                             f"got {self.num_classes!r}")


def _official() -> list[DatasetSpec]:
    # Paths and class counts as in the official vis.py / coco.py builders (spec §8.2). COCO keeps 91 logits
    # because the Deformable DETR checkpoint has them (ids up to 90, shifted by one).
    yt19, yt21 = "Youtube_VIS-2019", "Youtube_VIS-2021"
    return [
        DatasetSpec("train", "coco", "COCO/train2017", "COCO/annotations/instances_train2017.json", 91),
        DatasetSpec("val", "coco", "COCO/val2017", "COCO/annotations/instances_val2017.json", 91),
        DatasetSpec("yt_vis_train_19", "vis", f"{yt19}/train/JPEGImages", f"{yt19}/train/train.json", 40),
        DatasetSpec("yt_vis_val_19", "vis", f"{yt19}/valid/JPEGImages", f"{yt19}/valid/valid.json", 40),
        DatasetSpec("yt_vis_train_21", "vis", f"{yt21}/train/JPEGImages", f"{yt21}/train/instances.json", 40),
        DatasetSpec("yt_vis_val_21", "vis", f"{yt21}/valid/JPEGImages", f"{yt21}/valid/instances.json", 40),
        DatasetSpec("yt_vis_train_21_wo_2975_2359", "vis", f"{yt21}/train/JPEGImages",
                    f"{yt21}/train/instances_wo_2975_2359.json", 40),
        DatasetSpec("ovis_train", "vis", "OVIS/train", "OVIS/annotations_train.json", 25),
        DatasetSpec("ovis_val", "vis", "OVIS/valid", "OVIS/annotations_valid.json", 25),
        DatasetSpec("yt_vis_val_long", "vis", "Youtube_VIS-long/valid/JPEGImages",
                    "Youtube_VIS-long/valid/instances.json", 40),
        DatasetSpec("mini_train", "vis", "Youtube_VIS/train/JPEGImages", "Youtube_VIS/train/mini_train.json", 40),
        DatasetSpec("mini_val", "vis", "Youtube_VIS/valid/JPEGImages", "Youtube_VIS/valid/mini_valid.json", 40),
        # Written by devis_core.data.synthetic (data_scripts/make_synthetic_vis.py).
        DatasetSpec("synthetic_vis_train", "vis", "synthetic_vis/train/JPEGImages",
                    "synthetic_vis/train/instances.json", None),
        DatasetSpec("synthetic_vis_val", "vis", "synthetic_vis/valid/JPEGImages",
                    "synthetic_vis/valid/instances.json", None),
        DatasetSpec("synthetic_coco_train", "coco", "synthetic_coco/train2017",
                    "synthetic_coco/annotations/instances_train2017.json", None),
        DatasetSpec("synthetic_coco_val", "coco", "synthetic_coco/val2017",
                    "synthetic_coco/annotations/instances_val2017.json", None),
    ]


_REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in _official()}
_BUILTIN = frozenset(_REGISTRY)


def list_datasets() -> list[str]:
    """All registered dataset names, sorted."""
    return sorted(_REGISTRY)


def register_dataset(spec: DatasetSpec, overwrite: bool = False) -> None:
    """Add a user dataset. Built-in names cannot be replaced; a user name only with overwrite=True."""
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register_dataset expects a DatasetSpec, got {type(spec).__name__}")
    if spec.name in _BUILTIN:
        raise ValueError(f"dataset name {spec.name!r} is built in; register yours under another name")
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"dataset {spec.name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[spec.name] = spec


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec registered under `name`; UnknownDatasetError (a KeyError) listing the closest names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else \
            f"known names: {', '.join(list_datasets())}"
        raise UnknownDatasetError(f"unknown dataset {name!r}; {hint}") from None


def _num_classes_from_file(ann_file: str) -> int:
    data = load_json(ann_file)
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats:
        raise DatasetError(f"{ann_file}: field 'categories' must be a non-empty list to infer the class count")
    ids = []
    for i, cat in enumerate(cats):
        cid = cat.get("id") if isinstance(cat, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool) or cid < 1:
            raise DatasetError(f"{ann_file}: categories[{i}]: field 'id' must be a positive int, got {cid!r}")
        ids.append(cid)
    return max(ids)


def resolve_dataset(data_path: str, name: str) -> tuple[str, str, str, int]:
    """Absolute locations of a registered dataset under `data_path`.

    Returns (kind, image_root, ann_file, num_classes). Raises DatasetError when the image folder or the
    annotation file is missing (naming both the dataset and the path).
    """
    spec = get_dataset_spec(name)
    image_root = os.path.abspath(os.path.join(data_path, spec.image_root))
    ann_file = os.path.abspath(os.path.join(data_path, spec.ann_file))
    if not os.path.isdir(image_root):
        raise DatasetError(f"dataset {name!r}: image folder {image_root} does not exist")
    if not os.path.isfile(ann_file):
        raise DatasetError(f"dataset {name!r}: annotation file {ann_file} does not exist")
    num_classes = spec.num_classes if spec.num_classes is not None else _num_classes_from_file(ann_file)
    return spec.kind, image_root, ann_file, num_classes


def build_datasets(cfg) -> dict[str, tuple[str, str, str, int]]:
    """Resolve DATASETS.TRAIN_DATASET and DATASETS.VAL_DATASET under DATASETS.DATA_PATH.

    Returns {"train": (kind, image_root, ann_file, num_classes), "val": (...)}.
    """
    root = cfg.DATASETS.DATA_PATH
    return {"train": resolve_dataset(root, cfg.DATASETS.TRAIN_DATASET),
            "val": resolve_dataset(root, cfg.DATASETS.VAL_DATASET)}
