"""Datasets for training: read with Ray Data, prepare once, split, feed the workers.

    datasets, info = build_datasets(cfg)      # {"train", "val", "test"} -> ray.data.Dataset
    info.labels                               # label names in id order

The pipeline (all of it Ray Data, on the cluster's CPU workers):
  read (sources.py) -> prepare: decode/convert/resize to uint8, assign a split by a seeded content
  hash, flag bad rows -> materialize once -> report counts and bad rows -> per split, every epoch:
  to model inputs (normalize, augment the train split) -> streamed to the DDP workers by Ray Train.

The hash split is the same on every run and machine, independent of file order and partitioning,
and identical images always land in the same split (no train/test leakage through duplicates).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import ray.data
from ray.data.expressions import col

from rayfine.config import Config, DataConfig
from rayfine.data.images import ImageError, prepare_image, to_model_input
from rayfine.data.sources import read_images
from rayfine.errors import DataError

SPLITS = ("train", "val", "test")
BAD = "bad"


@dataclass(frozen=True)
class DataInfo:
    """Facts learnt from the data; saved in every checkpoint, never written back into the config."""

    labels: list[str]
    num_examples: dict[str, int]
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    bad_rows: int = 0
    bad_examples: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataInfo":
        return cls(**d)


def label_text(value: Any) -> Optional[str]:
    """Labels as the strings they are named by: 3, 3.0 and "3" are all "3"; missing is None."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return None
        if float(value).is_integer():
            value = int(value)
    if isinstance(value, np.generic):
        value = value.item()
    text = str(value).strip()
    return text or None


def sort_labels(labels: list[str]) -> list[str]:
    """Numeric order when every label is an integer ("2" before "10"), else lexicographic."""
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def _content_bytes(item: Any) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str):
        return item.encode("utf-8")
    arr = np.ascontiguousarray(np.asarray(item))
    return str(arr.shape).encode() + arr.tobytes()


def hash_unit(content: bytes, salt: str) -> float:
    """A uniform number in [0, 1) from content and a salt; stable across processes and machines."""
    digest = hashlib.blake2b(content, digest_size=8, key=salt.encode()[:64]).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_split(content: bytes, data_cfg: DataConfig) -> Optional[str]:
    """train/val/test by the seeded content hash, or None when subsampled out."""
    if data_cfg.subsample < 1 and hash_unit(content, f"subsample:{data_cfg.split_seed}") >= data_cfg.subsample:
        return None
    u = hash_unit(content, f"split:{data_cfg.split_seed}")
    if u < data_cfg.test_fraction:
        return "test"
    if u < data_cfg.test_fraction + data_cfg.val_fraction:
        return "val"
    return "train"


def prepare_batch(batch: dict, data_json: str) -> dict:
    """Ray Data map_batches: raw rows -> uint8 images of one size, a split, and an error per row."""
    data_cfg = DataConfig.model_validate_json(data_json)
    known = set(data_cfg.labels) if data_cfg.labels else None
    size, channels = data_cfg.image_size, data_cfg.channels
    n = len(batch["image"])
    images = np.zeros((n, size, size, channels), np.uint8)
    labels, splits, errors = [""] * n, [""] * n, [""] * n
    for i, (item, raw_label) in enumerate(zip(batch["image"], batch["label"])):
        split = assign_split(_content_bytes(item), data_cfg)
        if split is None:
            continue
        label = label_text(raw_label)
        try:
            if label is None:
                raise ImageError("no label (images must sit in class subfolders, or the label is empty)")
            if known is not None and label not in known:
                raise ImageError(f"unknown label {label!r}")
            images[i] = prepare_image(item, data_cfg)
        except ImageError as e:
            split, errors[i] = BAD, str(e)
        labels[i], splits[i] = label or "", split
    keep = np.array([s != "" for s in splits], dtype=bool)
    return {
        "image": images[keep],
        "label": np.array(labels, dtype=object)[keep],
        "split": np.array(splits, dtype=object)[keep],
        "error": np.array(errors, dtype=object)[keep],
        "origin": np.asarray(batch["origin"], dtype=object)[keep],
    }


def model_inputs_batch(batch: dict, data_json: str, label_ids: dict, augment: bool) -> dict:
    """Ray Data map_batches, every epoch: prepared rows -> {"x": float32 NCHW, "y": int64}."""
    data_cfg = DataConfig.model_validate_json(data_json)
    labels = np.array([label_ids[label] for label in batch["label"]], dtype=np.int64)
    return {"x": to_model_input(batch["image"], data_cfg, augment=augment), "y": labels}


def build_datasets(cfg: Config, log=print) -> tuple[dict[str, ray.data.Dataset], DataInfo]:
    """Read, prepare and split ``cfg.data``; returns per-split datasets of model inputs."""
    data_cfg = cfg.data
    data_json = data_cfg.model_dump_json()
    log(f"[data] reading {data_cfg.source}")
    prepared = (
        read_images(data_cfg)
        .map_batches(prepare_batch, fn_kwargs={"data_json": data_json}, batch_format="numpy", batch_size=128)
        .materialize()
    )
    info = _summarize(prepared, data_cfg)
    log(
        f"[data] {sum(info.num_examples.values())} examples, {info.num_labels} labels; "
        + ", ".join(f"{s}={info.num_examples[s]}" for s in SPLITS)
        + (f"; skipped {info.bad_rows} bad rows" if info.bad_rows else "")
    )
    label_ids = {label: i for i, label in enumerate(info.labels)}
    # These steps run while the training workers hold their CPUs: keep each task within the
    # CPUs left for Ray Data (scaling.data_cpus), or it would wait forever for a whole CPU.
    task_cpus = min(0.25, cfg.scaling.data_cpus)
    datasets = {}
    for split in SPLITS:
        ds = prepared.filter(expr=col("split") == split, num_cpus=task_cpus)
        if split == "train":
            ds = ds.randomize_block_order(seed=cfg.seed)
        datasets[split] = ds.map_batches(
            model_inputs_batch,
            fn_kwargs={
                "data_json": data_json,
                "label_ids": label_ids,
                "augment": split == "train" and data_cfg.augment,
            },
            batch_format="numpy",
            batch_size=256,
            num_cpus=task_cpus,
        )
    return datasets, info


def _summarize(prepared: ray.data.Dataset, data_cfg: DataConfig) -> DataInfo:
    counts = prepared.groupby(["split", "label"]).count().take_all()
    by_split: dict[str, dict[str, int]] = {}
    for row in counts:
        by_split.setdefault(row["split"], {})[row["label"]] = int(row["count()"])
    bad_rows = sum(by_split.pop(BAD, {}).values())
    bad_examples = []
    if bad_rows:
        bad = prepared.filter(expr=col("split") == BAD).select_columns(["origin", "error"]).take(5)
        bad_examples = [f"{r['origin']}: {r['error']}" for r in bad]
        if data_cfg.on_bad_rows == "error":
            raise DataError(
                f"{bad_rows} bad row(s) in {data_cfg.source}, e.g.\n    "
                + "\n    ".join(bad_examples)
                + "\n  fix or remove them, or set data.on_bad_rows=skip to train without them"
            )
    found = {label for split_counts in by_split.values() for label in split_counts}
    labels = list(data_cfg.labels) if data_cfg.labels else sort_labels(list(found))
    num_examples = {s: sum(by_split.get(s, {}).values()) for s in SPLITS}
    if len(labels) < 2:
        raise DataError(f"{data_cfg.source}: need at least 2 labels to classify, found {labels}")
    for split in SPLITS:
        if num_examples[split] == 0:
            raise DataError(
                f"{data_cfg.source}: the {split} split is empty ({sum(num_examples.values())} examples); "
                "use more data or raise data.val_fraction / data.test_fraction"
            )
    class_counts = {s: {label: by_split.get(s, {}).get(label, 0) for label in labels} for s in SPLITS}
    return DataInfo(labels, num_examples, class_counts, bad_rows, bad_examples)


def info_json(info: DataInfo) -> str:
    return json.dumps(info.to_dict())
