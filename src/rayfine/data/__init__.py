"""Datasets for training: read with Ray Data, prepare once, split, feed the workers.

    datasets, info = build_datasets(cfg)      # {"train", "val", "test"} -> ray.data.Dataset
    info.labels                               # label names in id order

The pipeline (all of it Ray Data, on the cluster's CPU workers):
  read (sources.py) -> prepare: decode/convert/resize images to uint8 or tokenize texts, assign
  a split by a seeded content hash, flag bad rows -> shuffle globally and materialize once ->
  report counts and bad rows -> per split, once: to model inputs (label ids; images stay uint8),
  materialized -> streamed to the DDP workers by Ray Train every epoch, in a fixed order, so that
  a seed reproduces a run. The training loop normalizes images on its device (``model_batch``)
  and augments them with a seeded generator.

A folder source's own splits (train.csv, test/cats/1.jpg: ``sources.split_of_path``) are kept. Every
other example gets its split from the hash, the same on every run and machine, independent of file
order and partitioning: byte-identical files and identical texts always land in the same split (the
same image saved with other metadata, or a text in other case or spacing, is other content).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import ray.data
from ray.data.expressions import col

from rayfine.config import Config, DataConfig
from rayfine.data.images import ImageError, prepare_image, to_pixel_values
from rayfine.data.sources import (
    SPLIT_FILE,
    class_label_names,
    local_listing,
    read_failure,
    read_source,
    source_splits,
    split_of_path,
)
from rayfine.errors import DataError, InputError, RayfineError

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "val", "test")
BAD = "bad"


@dataclass(frozen=True)
class DataInfo:
    """Facts learnt from the data, never written back into the config: the labels go into every
    checkpoint (labels.json), the counts into the run's log and ``fit``'s result."""

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


def label_text(value: Any) -> Optional[str]:
    """Labels as the strings they are named by: 3, 3.0 and "3" are all "3"; missing is None. Unicode
    in its composed form (NFC): macOS writes folder names decomposed (NFD), and "café" typed in
    data.labels would otherwise not be the "café" of a class folder. A list (a multi-label row) is
    refused: a DataError, whose message ``_split_and_label`` completes with the column."""
    if value is None:
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        raise DataError(f"holds lists ({_short(value)}: multi-label data); rayfine trains single-label "
                        "classifiers: give each row one label")
    if isinstance(value, dict):  # a struct column: each distinct struct would become a class of its text
        raise DataError(f"holds structs ({json.dumps(value, default=str)[:60]}), not one label per row; give a "
                        "column of class names or ids")
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return None
        if float(value).is_integer():
            value = int(value)
    if isinstance(value, np.generic):
        value = value.item()
    text = unicodedata.normalize("NFC", str(value).strip())
    return text or None


def _short(value: Any) -> str:
    """``value`` (a list, an array, a number...) as JSON for a message, cut to 60 characters."""
    value = value.tolist() if isinstance(value, np.ndarray) else list(value) if isinstance(value, tuple) else value
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


_INTEGER_AS_FLOAT = re.compile(r"([+-]?\d+)\.0+")


def same_number_labels(labels) -> tuple[str, str] | None:
    """Two labels that are one integer written as an integer and as a float ("1" and "1.0": pandas
    writes an integer column with a missing value as floats, so one CSV shard has 1.0 where another
    has 1), else None. They would be two classes of the same examples. Other spellings ("01" and "1",
    "1.1" and "1.10") may be names of different classes, and are left as they are."""
    found = set(labels)
    for label in sorted(found):
        match = _INTEGER_AS_FLOAT.fullmatch(label)
        if match and str(int(match.group(1))) in found:
            return str(int(match.group(1))), label
    return None


def sort_labels(labels: list[str]) -> list[str]:
    """Numeric order when every label is an integer ("2" before "10"), else lexicographic."""
    try:
        # Ties ("1" and "01") by their text: the labels come from a set, whose order differs
        # between processes (PYTHONHASHSEED), and label ids must not.
        return sorted(labels, key=lambda s: (int(s), s))
    except ValueError:
        return sorted(labels)


def _content_bytes(item: Any) -> bytes:
    if item is None:
        return b""
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


def assign_split(content: bytes, data_cfg: DataConfig, named: str | None = None,
                 source_has: tuple[str, ...] = ()) -> str | None:
    """train/val/test by the seeded content hash, or None when subsampled out. ``named``: the split
    the row's file names (``sources.split_of_path``), kept, except that a train row goes by the hash
    to a split none of the source's files name (``source_has``): a folder of train.csv and test.csv
    has its val carved from train, at val_fraction."""
    if data_cfg.subsample < 1 and hash_unit(content, f"subsample:{data_cfg.split_seed}") >= data_cfg.subsample:
        return None
    if named not in (None, "train"):
        return named
    u = hash_unit(content, f"split:{data_cfg.split_seed}")
    by_hash = "test" if u < data_cfg.test_fraction else "val" if u < data_cfg.test_fraction + data_cfg.val_fraction \
        else "train"
    if named == "train" and by_hash in source_has:  # that split is the source's own
        return "train"
    return by_hash


def _split_and_label(content: bytes, raw_label: Any, source_error: str, data_cfg: DataConfig,
                     known: Optional[set], named: str | None = None,
                     source_has: tuple[str, ...] = ()) -> tuple[Optional[str], str, str]:
    """(split or None when subsampled out, label text, error) for one raw row; ``source_error`` is
    the reader's reason the row is unusable ("" when it is not); ``named``, ``source_has``: as
    ``assign_split``."""
    split = assign_split(content, data_cfg, named, source_has)
    try:
        label = label_text(raw_label)
    except DataError as e:
        raise DataError(f"data.label_column: column {data_cfg.label_column!r} {e}") from None
    if split is None:
        return None, "", ""
    if source_error:
        return BAD, "", source_error
    if label is None:
        where = "images must sit in class subfolders, or" if data_cfg.kind == "image" else ""
        return BAD, "", f"no label ({where} the label is empty)".replace("( ", "(")
    if known is not None and label not in known:
        # The configured names beside it: a spelling apart (data.labels [false, true] as YAML writes
        # them, JSON's true read as "True"; 1.0 typed, the number 1 read as "1") is seen at once.
        shown = list(data_cfg.labels or sorted(known))
        return BAD, label, f"unknown label {label!r}, not in data.labels {shown[:10]}{' ...' if len(shown) > 10 else ''}"
    return split, label, ""


def prepare_batch(batch: dict, cfg_json: str, source_splits: dict | None = None) -> dict:
    """Ray Data map_batches: raw rows -> prepared rows (uint8 images of one size, or token ids),
    each with its label, split and error ("" when usable). ``source_splits``: the splits a folder
    source's files name (``sources.source_splits``), None when it names none."""
    cfg = Config.model_validate_json(cfg_json)
    data_cfg = cfg.data
    known = set(data_cfg.labels) if data_cfg.labels else None
    is_image = data_cfg.kind == "image"
    items = batch["image"] if is_image else batch["text"]
    pairs = batch.get("text_pair") if not is_image else None
    source_errors = batch.get("error", itertools.repeat(""))
    root, source_has = (source_splits["root"] + "/", tuple(source_splits["splits"])) if source_splits else (None, ())
    class_folders = bool(source_splits and source_splits["class_folders"])
    split_files = batch.get(SPLIT_FILE, batch["origin"])
    rows = []  # (index, split, label, error)
    for i, (item, raw_label, source_error) in enumerate(zip(items, batch["label"], source_errors)):
        if is_image:
            content = _content_bytes(item)
        else:
            content = _content_bytes(f"{item}\x00{pairs[i]}" if pairs is not None else str(item))
        file = str(split_files[i])
        named = split_of_path(file[len(root):], class_folders) if root and file.startswith(root) else None
        split, label, error = _split_and_label(content, raw_label, source_error, data_cfg, known, named, source_has)
        if split is not None:
            rows.append([i, split, label, error])
    out = (_prepare_images if is_image else _prepare_texts)(batch, rows, cfg)
    origin = np.asarray(batch["origin"], dtype=object)[[r[0] for r in rows]]
    for j, row in enumerate(rows):
        if row[1] == BAD and not is_image:  # an image's origin is its own file
            origin[j] = _bad_text_row(batch, row[0])
    out.update({
        "label": np.array([r[2] for r in rows], dtype=object),
        "split": np.array([r[1] for r in rows], dtype=object),
        "error": np.array([r[3] for r in rows], dtype=object),
        "origin": origin,
    })
    return out


def _bad_text_row(batch: dict, i: int) -> str:
    """Where a bad text row is, as its examples name it: its file and its text's start (or its
    label), since the text readers give no line numbers."""
    text, label = str(batch["text"][i] or ""), batch["label"][i]
    text = text if len(text) <= 40 else text[:37] + "..."
    if text.strip():
        return f"{batch['origin'][i]} (the row with text {text!r})"
    shown = "" if label is None else str(label)
    if shown.strip():
        return f"{batch['origin'][i]} (the row with label {shown!r})"
    return f"{batch['origin'][i]} (a row with no text and no label)"


def _prepare_images(batch: dict, rows: list, cfg: Config) -> dict:
    size, channels = cfg.data.image_size, cfg.data.channels
    images = np.zeros((len(rows), size, size, channels), np.uint8)
    for j, row in enumerate(rows):
        if row[1] == BAD:
            continue
        try:
            images[j] = prepare_image(batch["image"][row[0]], cfg.data)
        except ImageError as e:
            row[1], row[3] = BAD, str(e)
    return {"image": images}


def _prepare_texts(batch: dict, rows: list, cfg: Config) -> dict:
    from rayfine.data.text import load_tokenizer, tokenize
    from rayfine.models import resolve_model_source

    text_columns = {"text": "text", "pair text": "text_pair"} if "text_pair" in batch else {"text": "text"}
    decoded: dict[str, list] = {name: [] for name in text_columns}
    for row in rows:
        # A pair text is held to the rule of the main text (and of serving, which refuses both
        # empty): an empty or missing one makes the row bad.
        for name, column in text_columns.items():
            text, problem = _text_value(batch[column][row[0]], name)
            decoded[name].append(text)
            if row[1] != BAD and problem:
                row[1], row[3] = BAD, problem
    good = [j for j, row in enumerate(rows) if row[1] != BAD]
    tokenizer = load_tokenizer(resolve_model_source(cfg.model.name))
    texts = [decoded["text"][j] for j in good]
    pairs = [decoded["pair text"][j] for j in good] if "pair text" in decoded else None
    encoded = tokenize(texts, pairs, cfg.data, tokenizer) if good else {}
    columns: dict[str, np.ndarray] = {}
    for column, values in encoded.items():
        full = [np.zeros(0, np.int64)] * len(rows)
        for j, ids in zip(good, values):
            full[j] = ids
        columns[column] = _object_array(full)
    if not encoded:
        columns["input_ids"] = _object_array([np.zeros(0, np.int64)] * len(rows))
    return columns


def _text_value(value: Any, name: str) -> tuple[str | None, str | None]:
    """(the text of one row's cell ``name``, None), or (None, why it is not one). Parquet written by
    Hive, Impala or older Spark holds strings as BINARY without the UTF-8 annotation, which pyarrow
    reads as bytes: they are decoded as UTF-8, as Spark's binaryAsString reads them."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, f"{name} is bytes that are not UTF-8 text"
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None, f"empty or missing {name}"
    if not isinstance(value, str):
        return None, f"{name} is a {type(value).__name__} ({_short(value)}), not a string"
    return (value, None) if value.strip() else (None, f"empty or missing {name}")


def _object_array(arrays: list) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def model_inputs_batch(batch: dict, data_json: str, label_ids: dict) -> dict:
    """Ray Data map_batches, once per split (materialized): prepared rows -> model inputs and "y" (label ids).
    Images: the uint8 NHWC "image" (normalized where the batch is consumed, ``model_batch``);
    texts: the unpadded token columns, padded per batch later by ``TextCollate``."""
    data_cfg = DataConfig.model_validate_json(data_json)
    labels = np.array([label_ids[label] for label in batch["label"]], dtype=np.int64)
    if data_cfg.kind == "text":
        from rayfine.data.text import TOKEN_COLUMNS

        return {**{c: batch[c] for c in TOKEN_COLUMNS if c in batch}, "y": labels}
    return {"image": batch["image"], "y": labels}


def model_batch(batch: dict, data_cfg: DataConfig) -> dict:
    """A batch of a model-input dataset from ``iter_torch_batches`` (on its device) -> the model's
    keyword arguments and "y". Images travel through Ray's object store as uint8 NHWC "image", a
    quarter of the bytes of float32 (bench/NOTES.md, ingest), and become normalized float32 NCHW
    "pixel_values" here, on the batch's device; text batches are model inputs already."""
    if "image" not in batch:
        return batch
    batch = dict(batch)
    batch["pixel_values"] = to_pixel_values(batch.pop("image"), data_cfg)
    return batch


def shown_labels(labels: list[str], most: int = 8, width: int = 40) -> str:
    """The first ``most`` labels for a log line, each cut to ``width`` characters: the names show a
    wrong label column or folder layout (a label per text, "train" and "test") at once."""
    cut = [label if len(label) <= width else label[: width - 3] + "..." for label in labels[:most]]
    return ", ".join(cut) + (f", ... ({len(labels) - most} more)" if len(labels) > most else "")


def build_datasets(cfg: Config, log=print) -> tuple[dict[str, ray.data.Dataset], DataInfo]:
    """Read, prepare and split ``cfg.data``; returns per-split datasets of model inputs."""
    with no_false_cpu_alarm(), read_errors(cfg.data):
        return _build_datasets(cfg, log)


# An exception's line in a traceback: "pyarrow.lib.ArrowInvalid: CSV parse error: ...".
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Invalid)): (.+)$")


@contextlib.contextmanager
def read_errors(data_cfg: DataConfig) -> Iterator[None]:
    """What fails in Ray Data's tasks while they read and prepare ``data.source`` (a file that is
    not the format it claims, a row with too many fields, a column missing from one file of a
    folder), as the one line the command prints, not Ray's task traceback: rayfine's own error
    as it was raised in the task, else a DataError naming the source with the reader's reasons."""
    try:
        yield
    except ray.exceptions.RayError as e:
        # A task's exception reaches the driver pickled, without its chain (__cause__): the
        # traceback Ray carries has every exception of the chain, innermost first.
        text = "\n".join(str(getattr(x, "traceback_str", "") or x) for x in (e, getattr(e, "cause", None)) if x)
        found = [m.groups() for m in map(_ERROR_LINE.match, map(str.strip, text.splitlines())) if m]
        for kind, message in found:
            if kind.startswith("rayfine."):
                raise (DataError if kind.endswith("DataError") else RayfineError)(message) from None
        failure = read_failure(data_cfg)  # "<file>: <reason>", the reader's own, which Ray's error lost
        if failure:
            raise DataError(f"data.source: cannot read {failure}") from None
        reasons = [f"{kind.rsplit('.', 1)[-1]}: {message[:300]}" for kind, message in found
                   if not kind.startswith("ray.") and "RayTaskError" not in kind and "UserCodeException" not in kind]
        raise DataError(f"data.source: cannot read {data_cfg.source}: "
                        + ("; ".join(dict.fromkeys(reasons)) or str(e).splitlines()[0])) from None


NO_CPUS_WARNING = "does not have any available CPUs"  # in Ray Data's "... The Dataset job will hang" warning


@contextlib.contextmanager
def no_false_cpu_alarm() -> Iterator[None]:
    """Ray Data's warning that "the Ray cluster currently does not have any available CPUs. The
    Dataset job will hang ..." is dropped inside, when CPUs are free as it starts.

    Ray 2.60's ``materialize()`` runs the dataset, then reads its own output back through
    ``Dataset._execute``, which warns when ``ray.available_resources()`` shows no free CPU; right
    after an execution that used every CPU the cluster's resource view still counts its tasks. On 2
    CPUs every ``rayfine train`` printed it, and nothing hung. Where the CPUs are already taken when
    the block starts (other work holds them; the data may really wait), Ray's warning goes through.
    """
    if not ray.available_resources().get("CPU"):
        yield
        return
    logger = logging.getLogger("ray.data.dataset")

    def drop(record: logging.LogRecord) -> bool:
        return NO_CPUS_WARNING not in record.getMessage()

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _build_datasets(cfg: Config, log) -> tuple[dict[str, ray.data.Dataset], DataInfo]:
    data_cfg = cfg.data
    data_json = data_cfg.model_dump_json()
    log(f"[data] reading {data_cfg.source}")
    listing = local_listing(data_cfg)  # a local image folder, listed once for its splits and its reader
    named = source_splits(data_cfg, listing)
    if named:
        carved = [f"{split} (data.{split}_fraction of train)" for split in ("val", "test") if split not in named["splits"]]
        log(f"[data] splits: the source's own {', '.join(named['splits'])} files"
            + (f"; carved from its train files: {', '.join(carved)}" if carved and "train" in named["splits"] else "")
            + " (data.source_splits)")
    pipeline = (
        read_source(data_cfg, log, listing)
        .map_batches(prepare_batch, fn_kwargs={"cfg_json": cfg.model_dump_json(), "source_splits": named},
                     batch_format="numpy", batch_size=128)
        # Sources are often sorted by class (class folders, sorted files): shuffle once, globally,
        # so that every block is a fair mix. Each epoch the workers' local shuffle buffers (seeded
        # per epoch) reorder rows; block order is the same every epoch (randomize_block_order(seed)).
        .random_shuffle(seed=data_cfg.split_seed)
    )
    # Blocks in read order, not in the order their tasks happen to finish: the seeded shuffle
    # then gives the same rows in the same order on every run (this dataset and those derived
    # from it share this context). Ray Train's ingest keeps the order too (train.driver).
    pipeline.context.execution_options.preserve_order = data_cfg.preserve_order
    prepared = pipeline.materialize()
    info = _summarize(prepared, data_cfg, class_label_names(data_cfg))
    log(
        f"[data] {sum(info.num_examples.values())} examples, {info.num_labels} labels ({shown_labels(info.labels)}); "
        + ", ".join(f"{s}={info.num_examples[s]}" for s in SPLITS)
        + (f"; skipped {info.bad_rows} bad rows (data.on_bad_rows=skip), e.g.\n    " + "\n    ".join(info.bad_examples)
           if info.bad_rows else "")
    )
    for warning in (untrained_labels_warning(info), missing_marker_labels_warning(info)):
        if warning:
            log(warning)
    label_ids = {label: i for i, label in enumerate(info.labels)}
    # Small tasks, within the CPUs a run leaves Ray Data beside its workers (scaling.data_cpus):
    # they run even where other work (a trial's workers, a deployment) holds most of the CPUs.
    task_cpus = min(0.25, cfg.scaling.data_cpus)
    datasets = {}
    for split in SPLITS:
        ds = prepared.filter(expr=col("split") == split, num_cpus=task_cpus)
        if split == "train":
            ds = ds.randomize_block_order(seed=cfg.seed)
        # Materialized once, as Ray's training-ingest guide advises for preprocessed data that
        # fits the object store: each epoch then streams blocks that exist, not a new Ray
        # Data execution whose tasks start while the workers wait for their first batch and then
        # compete with them for the CPUs. The splits hold no more than the prepared rows, whose
        # blocks are freed when this returns (a materialized dataset keeps no lineage).
        datasets[split] = ds.map_batches(
            model_inputs_batch,
            fn_kwargs={
                "data_json": data_json,
                "label_ids": label_ids,
            },
            batch_format="numpy",
            batch_size=256,
            num_cpus=task_cpus,
        ).materialize()
    return datasets, info


def count_split_labels(prepared: ray.data.Dataset) -> dict[str, dict[str, int]]:
    """Examples per (split, label), counted on the driver as the two columns stream by.

    Not ``groupby(...).count()``: that is a hash shuffle into 200 partitions, ~3.7 s on 700
    digits against ~0.3 s for this (2 CPUs); the driver holds one batch of two short columns.
    """
    pairs: Counter = Counter()
    for batch in prepared.select_columns(["split", "label"]).iter_batches(batch_size=None, batch_format="numpy"):
        pairs.update(zip(batch["split"].tolist(), batch["label"].tolist()))
    by_split: dict[str, dict[str, int]] = {}
    for (split, label), n in sorted(pairs.items()):
        by_split.setdefault(split, {})[label] = n
    return by_split


def _summarize(prepared: ray.data.Dataset, data_cfg: DataConfig, class_names: Optional[list[str]] = None) -> DataInfo:
    """Counts per split and label, the label order (data.labels, else a Hugging Face ClassLabel's
    order, else sort_labels), and the bad rows (refused under data.on_bad_rows=error)."""
    by_split = count_split_labels(prepared)
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
    twins = same_number_labels(found)
    if twins:
        where = (f"data.label_column {data_cfg.label_column!r}" if data_cfg.kind == "text"
                 else f"the class folders' names, or data.label_column {data_cfg.label_column!r} of parquet")
        raise DataError(f"{data_cfg.source}: labels {twins[0]!r} and {twins[1]!r} are the same number written two "
                        f"ways ({where}); write them one way")
    if data_cfg.labels:
        labels = list(data_cfg.labels)
    else:  # a ClassLabel's ids keep their order (its names are found labels; anything else after them)
        named = [n for n in class_names or [] if n in found]
        labels = named + sort_labels(list(found - set(named)))
    num_examples = {s: sum(by_split.get(s, {}).values()) for s in SPLITS}
    if len(labels) < 2:
        raise DataError(f"{data_cfg.source}: need at least 2 labels to classify, found {labels}")
    for split in SPLITS:
        if num_examples[split] == 0:
            raise DataError(
                f"{data_cfg.source}: the {split} split is empty ({sum(num_examples.values())} examples); "
                "use more data or raise data.val_fraction / data.test_fraction"
                + ("" if not data_cfg.source_splits or data_cfg.source.startswith("builtin:") else " (a split named by the source's own folder or file "
                   "names, as train/ or test.csv, is kept as it is: data.source_splits: false splits every "
                   "example by those fractions)")
            )
    class_counts = {s: {label: by_split.get(s, {}).get(label, 0) for label in labels} for s in SPLITS}
    trained = [label for label in labels if class_counts["train"][label]]
    if len(trained) < 2:  # data.labels may name more than the data hold
        raise DataError(f"{data_cfg.source}: need at least 2 labels with train examples to classify, found "
                        f"{trained}" + (f" (data.labels names {labels})" if data_cfg.labels else ""))
    return DataInfo(labels, num_examples, class_counts, bad_rows, bad_examples)


def untrained_labels_warning(info: DataInfo) -> Optional[str]:
    """A warning naming the labels no train example holds (data.labels may name them, or only the
    val/test splits hold them): the model has an output for them that it never learns to give."""
    untrained = [label for label in info.labels if not info.class_counts["train"].get(label)]
    if not untrained:
        return None
    return (f"[data] warning: no train example of label(s) {untrained[:10]}{' ...' if len(untrained) > 10 else ''}"
            f" ({len(untrained)} of {info.num_labels}): the model never learns to predict them")


# What pandas' read_csv reads as a missing value (its default na_values, "" aside: rayfine reads an
# empty label as missing). rayfine reads a CSV's cells as text, so such a label is a class of its own.
MISSING_VALUE_MARKERS = frozenset({"#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                                   "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def missing_marker_labels_warning(info: DataInfo) -> Optional[str]:
    """A warning naming labels that pandas (and so Hugging Face datasets' CSV reader) would read as
    missing values (R's write.csv writes NA): each is a class here, which may be meant ("None")."""
    markers = [label for label in info.labels if label in MISSING_VALUE_MARKERS]
    if not markers:
        return None
    return (f"[data] warning: label(s) {markers} are what pandas reads as a missing value, and each is a class here; "
            "if they mean 'no label', remove those rows or leave their label cells empty")


def tokenizer_source(cfg: Config, checkpoint_dir: Optional[str] = None) -> str:
    """Where the tokenizer lives: the checkpoint (which carries its files) or the model source."""
    if checkpoint_dir is not None:
        return str(checkpoint_dir)
    from rayfine.models import resolve_model_source

    return resolve_model_source(cfg.model.name)


def batch_collate(cfg: Config, checkpoint_dir: Optional[str] = None):
    """The ``collate_fn`` for ``iter_torch_batches``: None for images, padding for texts."""
    if cfg.data.kind != "text":
        return None
    from rayfine.data.text import TextCollate, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_source(cfg, checkpoint_dir))
    return TextCollate(cfg.data, tokenizer)


class Preprocessor:
    """Raw inputs -> model inputs, exactly as training prepared its val/test splits.

        pre = Preprocessor(ckpt.cfg, ckpt.path)
        probs = ckpt.predict_proba(pre([png_bytes, pixel_array]))      # an image model
        probs = ckpt.predict_proba(pre(["a fine film", "dull"]))        # a text model

    Items: encoded image bytes or pixel arrays (images); strings, or [text, pair] for sentence-pair
    models (texts). Serving builds one from a checkpoint; an unusable item raises ``InputError``.
    """

    def __init__(self, cfg: Config, checkpoint_dir: Optional[str] = None, max_text_chars: Optional[int] = None):
        self.cfg = cfg
        self.max_text_chars = max_text_chars
        self.collate = batch_collate(cfg, checkpoint_dir)
        if cfg.data.kind == "text":
            from rayfine.data.text import load_tokenizer

            self.tokenizer = load_tokenizer(tokenizer_source(cfg, checkpoint_dir))

    def __call__(self, items: list) -> dict[str, "torch.Tensor"]:
        import torch

        if not len(items):
            raise InputError("no items: give at least one " + ("text" if self.cfg.data.kind == "text" else "image"))
        if self.cfg.data.kind == "text":
            from rayfine.data.text import check_texts, tokenize

            texts, pairs = check_texts(list(items), self.cfg.data, self.max_text_chars)
            return self.collate(tokenize(texts, pairs, self.cfg.data, self.tokenizer))
        from rayfine.data.images import preprocess_for_model

        return {"pixel_values": torch.from_numpy(preprocess_for_model(list(items), self.cfg.data))}
