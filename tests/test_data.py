"""Ray Data readers and the prepare/split pipeline on files written from real digits (ray tier)."""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from net_tools import wait_for
from PIL import Image
from ray.data.dataset import MaterializedDataset

from rayfine.config import load_config
from rayfine.data import (
    NO_CPUS_WARNING,
    SPLITS,
    assign_split,
    build_datasets,
    label_text,
    no_false_cpu_alarm,
    prepare_batch,
    sort_labels,
)
from rayfine.data.images import IMAGE_EXTENSIONS
from rayfine.errors import DataError

pytestmark = pytest.mark.ray
N_PER_CLASS = 12  # 3 classes x 12 real digits each


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def varied_image(digit: np.ndarray, i: int) -> tuple[Image.Image, str]:
    """The digit as RGB, grayscale or RGBA, at one of several sizes, as PNG or JPEG."""
    size = (8, 8) if i % 4 == 0 else (20 + i, 14 + 2 * i)  # mixed sizes and aspect ratios
    img = Image.fromarray(digit).resize(size)
    mode = ("RGB", "L", "RGBA")[i % 3]
    return img.convert(mode), "JPEG" if mode == "RGB" and i % 2 else "PNG"


@pytest.fixture(scope="module")
def samples(digits):
    images, labels = digits
    picked = [(images[j], str(c)) for c in (0, 1, 7) for j in np.flatnonzero(labels == c)[:N_PER_CLASS]]
    return picked


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, samples):
    root = tmp_path_factory.mktemp("folder")
    for i, (digit, label) in enumerate(samples):
        img, fmt = varied_image(digit, i)
        (root / label).mkdir(exist_ok=True)
        (root / label / f"img{i}.{fmt.lower().replace('jpeg', 'jpg')}").write_bytes(encode(img, fmt))
    (root / "README.txt").write_text("not an image; ignored like torchvision's ImageFolder does")
    return root


def folder_cfg(source, *extra):
    return load_config(
        "resnet18_digits_tiny",
        [f"data.source={source}", "data.subsample=1.0", "data.val_fraction=0.2", "data.test_fraction=0.2",
         "data.color_mode=RGB", "data.image_size=16", *extra],
    )


def rows(ds):
    batch = ds.take_batch(1000, batch_format="numpy")
    return batch["image"], batch["y"]


def test_image_folder_reads_every_file_with_labels_from_folders(ray_local, image_folder):
    datasets, info = build_datasets(folder_cfg(image_folder), log=lambda *_: None)
    assert info.labels == ["0", "1", "7"]
    assert sum(info.num_examples.values()) == 3 * N_PER_CLASS
    assert info.bad_rows == 0
    total = 0
    for split in SPLITS:
        # Model inputs exist once (no Ray Data execution per epoch): blocks in the object store.
        assert isinstance(datasets[split], MaterializedDataset)
        x, y = rows(datasets[split])
        assert x.shape[1:] == (16, 16, 3) and x.dtype == np.uint8  # normalized where consumed (model_batch)
        assert len(y) == info.num_examples[split]
        assert np.bincount(y, minlength=3).tolist() == [info.class_counts[split][c] for c in info.labels]
        total += len(y)
    assert total == 3 * N_PER_CLASS


def test_parquet_with_bytes_and_hf_struct_columns(ray_local, tmp_path, samples):
    images = [encode(*varied_image(d, i)[:1]) for i, (d, _) in enumerate(samples)]
    labels = [int(label) for _, label in samples]
    pq.write_table(pa.table({"img": images, "digit": labels}), tmp_path / "plain.parquet")
    hf_images = [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)]
    (tmp_path / "hf").mkdir()
    half = len(images) // 2
    pq.write_table(pa.table({"image": hf_images[:half], "label": labels[:half]}), tmp_path / "hf" / "part-0.parquet")
    pq.write_table(pa.table({"image": hf_images[half:], "label": labels[half:]}), tmp_path / "hf" / "part-1.parquet")

    plain, info = build_datasets(
        folder_cfg(tmp_path / "plain.parquet", "data.image_column=img", "data.label_column=digit"), log=lambda *_: None
    )
    struct, info2 = build_datasets(folder_cfg(tmp_path / "hf"), log=lambda *_: None)
    assert info.labels == info2.labels == ["0", "1", "7"]
    assert info.num_examples == info2.num_examples and sum(info.num_examples.values()) == len(images)
    # Same bytes -> same split and the same tensors, whichever layout carried them.
    x1, y1 = rows(plain["test"])
    x2, y2 = rows(struct["test"])
    order1, order2 = np.lexsort((x1.reshape(len(x1), -1).sum(1), y1)), np.lexsort((x2.reshape(len(x2), -1).sum(1), y2))
    assert np.array_equal(y1[order1], y2[order2]) and np.allclose(x1[order1], x2[order2])


def test_hugging_face_class_label_ids_become_their_names_in_their_order(ray_local, tmp_path, samples):
    """Parquet written by Hugging Face datasets (Dataset.to_parquet, as the Hub's parquet files): a
    ClassLabel column holds ids, and its names are in the schema metadata."""
    import datasets as hf

    from rayfine.data.sources import read_source

    names = ["zero", "one", "seven"]  # ids 0, 1, 2; not in alphabetical order
    ids = {"0": 0, "1": 1, "7": 2}
    images = [{"bytes": encode(Image.fromarray(d)), "path": None} for d, _ in samples]
    labels = [ids[label] for _, label in samples]
    labels[0] = -1  # the datasets' "no label"
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=names)})
    hf.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(tmp_path / "hf.parquet"))
    with pytest.raises(DataError, match="(?s)1 bad row.*no label"):
        build_datasets(folder_cfg(tmp_path / "hf.parquet"), log=lambda *_: None)
    _, info = build_datasets(folder_cfg(tmp_path / "hf.parquet", "data.on_bad_rows=skip"), log=lambda *_: None)
    assert info.labels == names and info.bad_rows == 1
    per_name = {name: sum(info.class_counts[s][name] for s in SPLITS) for name in names}
    assert per_name == {"zero": N_PER_CLASS - 1, "one": N_PER_CLASS, "seven": N_PER_CLASS}
    # An id outside the names (datasets itself refuses to load such a column) is a bad row, not a new
    # class "3". pyarrow keeps the schema's datasets metadata when the column is replaced.
    table = pq.read_table(tmp_path / "hf.parquet")
    table = table.set_column(1, "label", pa.array([3, -2] + labels[2:], pa.int64()))  # replaces the -1
    pq.write_table(table, tmp_path / "out_of_range.parquet")
    _, info = build_datasets(folder_cfg(tmp_path / "out_of_range.parquet", "data.on_bad_rows=skip"), log=lambda *_: None)
    assert info.labels == names and info.bad_rows == 2
    assert sorted(e.split(": ", 1)[1] for e in info.bad_examples) == [
        f"label id {i} in ClassLabel column 'label' is not one of its 3 names (ids 0-2; -1 is no label)" for i in (-2, 3)]

    texts = hf.Dataset.from_dict({"review": ["a fine film", "dull", "moving"], "sentiment": [1, 0, 1]},
                                 features=hf.Features({"review": hf.Value("string"), "sentiment": hf.ClassLabel(names=["neg", "pos"])}))
    texts.to_parquet(str(tmp_path / "texts.parquet"))
    cfg = load_config("minilm_rotten_tomatoes_tiny", [f"data.source={tmp_path / 'texts.parquet'}", "data.text_column=review",
                                                      "data.label_column=sentiment"])
    assert [(r["text"], r["label"], r["error"]) for r in read_source(cfg.data).take_all()] == [
        ("a fine film", "pos", ""), ("dull", "neg", ""), ("moving", "pos", "")]
    table = pq.read_table(tmp_path / "texts.parquet")
    pq.write_table(table.set_column(1, "sentiment", pa.array([1, 2, -1], pa.int64())), tmp_path / "texts.parquet")
    assert [(r["label"], r["error"]) for r in read_source(cfg.data).take_all()] == [
        ("pos", ""), (None, "label id 2 in ClassLabel column 'sentiment' is not one of its 2 names (ids 0-1; -1 is no label)"),
        (None, "")]
    # A plain integer column (no datasets metadata) keeps its numbers as labels.
    pq.write_table(pa.table({"review": ["a", "b"], "sentiment": [1, 0]}), tmp_path / "plain.parquet")
    cfg = load_config("minilm_rotten_tomatoes_tiny", [f"data.source={tmp_path / 'plain.parquet'}", "data.text_column=review",
                                                      "data.label_column=sentiment"])
    assert [r["label"] for r in read_source(cfg.data).take_all()] == [1, 0]


def test_hugging_face_images_stored_by_path_are_read_from_their_files(ray_local, tmp_path, samples, monkeypatch):
    """datasets' Image feature made from files and saved with Dataset.to_parquet keeps only each
    file's path (bytes null); datasets reads a relative path from the working directory."""
    import datasets as hf

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pics").mkdir()
    paths, labels = [], []
    for i, (digit, label) in enumerate(samples):
        (tmp_path / "pics" / f"{i}.png").write_bytes(encode(Image.fromarray(digit)))
        paths.append(f"pics/{i}.png" if i % 2 else str(tmp_path / "pics" / f"{i}.png"))  # relative and absolute
        labels.append(label)
    features = hf.Features({"image": hf.Image(), "label": hf.Value("string")})
    by_path = hf.Dataset.from_dict({"image": paths + [None], "label": labels + ["7"]}, features=features)
    by_path.to_parquet(str(tmp_path / "by_path.parquet"))
    stored = pq.read_table(tmp_path / "by_path.parquet").column("image").to_pylist()
    assert stored[1] == {"bytes": None, "path": "pics/1.png"} and stored[-1] is None  # what this test is about
    embedded = [{"bytes": (tmp_path / "pics" / f"{i}.png").read_bytes(), "path": None} for i in range(len(samples))]
    hf.Dataset.from_dict({"image": embedded, "label": labels}, features=features).to_parquet(str(tmp_path / "embedded.parquet"))

    with pytest.raises(DataError, match="(?s)1 bad row.*no image"):  # the null image
        build_datasets(folder_cfg(tmp_path / "by_path.parquet"), log=lambda *_: None)
    from_paths, info = build_datasets(folder_cfg(tmp_path / "by_path.parquet", "data.on_bad_rows=skip"), log=lambda *_: None)
    from_bytes, info2 = build_datasets(folder_cfg(tmp_path / "embedded.parquet"), log=lambda *_: None)
    assert info.bad_rows == 1 and info.num_examples == info2.num_examples and info.class_counts == info2.class_counts
    for split in SPLITS:
        (x1, y1), (x2, y2) = rows(from_paths[split]), rows(from_bytes[split])
        # The same (image, label) examples, in any order.
        assert sorted(zip(map(bytes, x1.reshape(len(x1), -1)), y1.tolist())) == sorted(zip(map(bytes, x2.reshape(len(x2), -1)), y2.tolist()))

    # A file that is gone is a bad row, reported under its own path.
    (tmp_path / "pics" / "3.png").unlink()
    with pytest.raises(DataError, match=r"(?s)2 bad row.*pics/3.png: no image \(empty, or its file is missing"):
        build_datasets(folder_cfg(tmp_path / "by_path.parquet"), log=lambda *_: None)
    _, info = build_datasets(folder_cfg(tmp_path / "by_path.parquet", "data.on_bad_rows=skip"), log=lambda *_: None)
    assert info.bad_rows == 2 and sum(info.num_examples.values()) == len(samples) - 1


def test_missing_parquet_column_names_the_field(ray_local, tmp_path):
    pq.write_table(pa.table({"pixels": [b"x"], "label": [1]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match="data.image_column: no column 'image'"):
        build_datasets(folder_cfg(tmp_path / "t.parquet"), log=lambda *_: None)


def test_bad_rows_are_reported_with_count_and_examples(ray_local, tmp_path, samples):
    root = tmp_path / "bad"
    for i, (digit, label) in enumerate(samples):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i}.png").write_bytes(encode(Image.fromarray(digit)))
    (root / "7" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "1" / "truncated.png").write_bytes(encode(Image.fromarray(samples[0][0]).resize((64, 64)))[:60])
    (root / "stray.png").write_bytes(encode(Image.fromarray(samples[0][0])))  # no class folder

    with pytest.raises(DataError) as info:
        build_datasets(folder_cfg(root), log=lambda *_: None)
    message = str(info.value)
    assert message.startswith("3 bad row(s)")
    assert "corrupt.png" in message and "truncated.png" in message and "stray.png: no label" in message
    assert "data.on_bad_rows=skip" in message

    logged = []
    datasets, data_info = build_datasets(folder_cfg(root, "data.on_bad_rows=skip"), log=logged.append)
    assert data_info.bad_rows == 3 and len(data_info.bad_examples) == 3
    summary = next(line for line in logged if " examples, " in line)  # the data summary: skipped, still named
    assert "skipped 3 bad rows" in summary and all(example in summary for example in data_info.bad_examples)
    assert f"{data_info.num_labels} labels ({', '.join(data_info.labels[:8])}" in summary  # the labels named
    assert sum(data_info.num_examples.values()) == len(samples)


def test_unknown_labels_are_bad_rows(ray_local, image_folder):
    with pytest.raises(DataError, match=r"unknown label '7'"):
        build_datasets(folder_cfg(image_folder, "data.labels=['0', '1']"), log=lambda *_: None)
    _, info = build_datasets(folder_cfg(image_folder, "data.labels=['1', '0']", "data.on_bad_rows=skip"), log=lambda *_: None)
    assert info.labels == ["1", "0"]  # the configured order is the id order
    assert info.bad_rows == N_PER_CLASS


def test_builtin_split_is_deterministic_and_disjoint(ray_local):
    from rayfine.data import assign_split, hash_unit

    cfg = load_config("resnet18_digits", ["data.image_size=8"])
    first, a = build_datasets(cfg, log=lambda *_: None)
    second, b = build_datasets(cfg, log=lambda *_: None)
    assert a == b

    def members(datasets, split):
        return sorted(row["image"].tobytes() + bytes([row["y"]]) for row in datasets[split].take_all())

    splits = {split: members(first, split) for split in ("train", "val", "test")}
    # The same examples in each split on a second build, and no example in two splits.
    assert all(members(second, split) == rows for split, rows in splits.items())
    assert not set(splits["train"]) & set(splits["val"]) and not set(splits["train"]) & set(splits["test"])
    assert not set(splits["val"]) & set(splits["test"])
    # The split is a function of the content alone, the same in every process and on every machine.
    assert hash_unit(b"rayfine", "split:0") == 0.48601408612252184
    assert [assign_split(bytes([i]), cfg.data) for i in range(8)] == [
        "val", "train", "train", "train", "test", "train", "test", "train"]
    assert sum(a.num_examples.values()) == 1797
    assert a.num_examples["test"] == pytest.approx(0.2 * 1797, abs=60)
    # Every class is in every split in roughly the configured share.
    for label in a.labels:
        assert a.class_counts["test"][label] > 15 and a.class_counts["val"][label] > 5


def shard_rows(iterator) -> list[bytes]:
    return [img.tobytes() + bytes([y]) for batch in iterator.iter_batches(batch_size=None, batch_format="numpy")
            for img, y in zip(batch["image"], batch["y"])]


@pytest.mark.parametrize("workers", [2, 3])
def test_each_worker_reads_its_own_shard_in_the_same_order_every_time(ray_local, image_folder, monkeypatch, workers):
    from ray.train import DataConfig

    from rayfine.train.driver import ShardedIngest, split_for_workers

    # 23 train and 11 val images: rows left over for 2 workers and for 3.
    cfg = folder_cfg(image_folder, f"scaling.num_workers={workers}", "data.val_fraction=0.25", "data.test_fraction=0.1")
    datasets, _ = build_datasets(cfg, log=lambda *_: None)
    ingest = ShardedIngest(cfg, split_for_workers(cfg, datasets))
    shards, remainders = {}, {}
    for split in ("train", "val"):
        whole = shard_rows(datasets[split].iterator())
        # What Ray Train asks of it for each dataset and worker group (DataConfig.configure).
        first = [shard_rows(out[split]) for out in ingest.configure({split: datasets[split]}, workers, None, None)]
        again = [shard_rows(out[split]) for out in ingest.configure({split: datasets[split]}, workers, None, None)]
        assert again == first  # the same rows in the same order for a restarted group
        shards[split], remainders[split] = (whole, first), len(whole) % workers
    # train: rank i the i-th run of n // workers rows, in the dataset's order; the last rows left
    # out (DDP ranks must take as many steps).
    whole, got = shards["train"]
    size = len(whole) // workers
    assert size > 0 and got == [whole[i * size:(i + 1) * size] for i in range(workers)]
    # val: every row, the first shards one row longer where the rows do not divide evenly, so the
    # validation metrics are the whole split's.
    whole, got = shards["val"]
    assert [row for shard in got for row in shard] == whole
    assert [len(s) for s in got] == sorted((len(s) for s in got), reverse=True)
    assert max(map(len, got)) - min(map(len, got)) == (remainders["val"] > 0)
    assert remainders["train"] and remainders["val"], remainders  # rows left over in both: the rules differ
    # A world size it was not split for (none in rayfine, whose workers never change in number
    # during a run) goes to Ray Train's own ingest.
    calls = []
    monkeypatch.setattr(DataConfig, "configure",
                        lambda self, datasets, world_size, *a, **k: calls.append((sorted(datasets), world_size)) or [{} for _ in range(world_size)])
    assert ingest.configure({"train": datasets["train"], "val": datasets["val"]}, workers + 1, None, None) == [{}] * (workers + 1)
    assert calls == [(["train", "val"], workers + 1)]


def test_a_train_split_of_fewer_than_two_rows_per_worker_is_refused(ray_local, image_folder):
    """A worker with no train rows takes no optimizer step (the untrained model was exported as the
    best, evaluated and served), and one with a single row cannot train BatchNorm on it: refused
    before the run, naming the setting, for `train` and every search (both split here)."""
    from rayfine.errors import DataError
    from rayfine.train.driver import split_for_workers

    cfg = folder_cfg(image_folder, "data.val_fraction=0.25", "data.test_fraction=0.1")  # 23 train images
    datasets, info = build_datasets(cfg, log=lambda *_: None)
    rows = info.num_examples["train"]
    assert datasets["train"].count() == rows == 23
    assert len(split_for_workers(cfg.model_copy(update={"scaling": cfg.scaling.model_copy(
        update={"num_workers": rows // 2})}), datasets)["train"]) == rows // 2  # 2 rows each (1 left over)
    for workers in (rows // 2 + 1, rows, rows + 1):  # a worker with 1 row, or with none
        too_many = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": workers})})
        with pytest.raises(DataError, match=rf"the train split has {rows} example\(s\) for {workers} worker\(s\) "
                                            r"\(scaling.num_workers\); each worker needs at least 2"):
            split_for_workers(too_many, datasets)


def test_preserve_order_false_gives_ray_its_unordered_hand_out_and_the_same_rows(ray_local, image_folder, monkeypatch):
    from ray.train import DataConfig

    from rayfine.train.driver import ShardedIngest, split_for_workers

    ordered_cfg = folder_cfg(image_folder)
    unordered_cfg = folder_cfg(image_folder, "data.preserve_order=false", "scaling.num_workers=2")
    ordered, _ = build_datasets(ordered_cfg, log=lambda *_: None)
    unordered, _ = build_datasets(unordered_cfg, log=lambda *_: None)
    # Unordered: no train shards of rayfine's, so Ray Train streams the train blocks to workers as
    # they ask; val is still split whole, one shard per worker.
    shards = split_for_workers(unordered_cfg, unordered)
    assert list(shards) == ["val"] and len(shards["val"]) == 2
    calls = []
    with monkeypatch.context() as m:
        m.setattr(DataConfig, "configure",
                  lambda self, datasets, world_size, *a, **k: calls.append(sorted(datasets)) or [{"train": "ray's"} for _ in range(world_size)])
        out = ShardedIngest(unordered_cfg, shards).configure({s: unordered[s] for s in ("train", "val")}, 2, None, None)
    assert calls == [["train"]] and [o["train"] for o in out] == ["ray's", "ray's"]
    assert [shard_rows(o["val"]) for o in out] == [shard_rows(s.iterator()) for s in shards["val"]]
    for cfg, datasets in ((ordered_cfg, ordered), (unordered_cfg, unordered)):
        assert datasets["train"].context.execution_options.preserve_order is cfg.data.preserve_order
        # What Ray Train applies to the dataset of each worker group (DataConfig.configure): Ray's
        # default ingest options but the order, built without Ray's deprecation warning.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            options = ShardedIngest(cfg, {})._resolve_execution_options("train")
        assert [str(w.message) for w in caught] == []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Ray's own method warns: the reference, not under test
            default = DataConfig.default_ingest_options()
        assert options.preserve_order is cfg.data.preserve_order
        assert (options.resource_limits, options.exclude_resources, options.verbose_progress) == (
            default.resource_limits, default.exclude_resources, default.verbose_progress)
    for split in SPLITS:  # the same examples in each split, whatever order they come in
        (x1, y1), (x2, y2) = rows(ordered[split]), rows(unordered[split])
        key = lambda x, y: sorted(zip(y.tolist(), (img.tobytes() for img in x)))  # noqa: E731
        assert key(x1, y1) == key(x2, y2)


def test_missing_source_is_a_clear_error(ray_local, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(folder_cfg(tmp_path / "nowhere"), log=lambda *_: None)
    with pytest.raises(DataError, match="builtin:digits, builtin:mnist5k"):
        build_datasets(folder_cfg("builtin:cifar"), log=lambda *_: None)


def test_split_assignment_and_label_helpers():
    cfg = load_config("resnet18_digits").data
    counts = {s: 0 for s in SPLITS}
    for i in range(4000):
        counts[assign_split(i.to_bytes(4, "big"), cfg)] += 1
    assert abs(counts["test"] / 4000 - 0.2) < 0.03 and abs(counts["val"] / 4000 - 0.1) < 0.03
    assert assign_split(b"same", cfg) == assign_split(b"same", cfg)
    assert [label_text(v) for v in (3, 3.0, "3", b"3", np.int64(3), None, float("nan"), " ")] == ["3"] * 5 + [None] * 3
    with pytest.raises(DataError, match=r"holds structs \(\{\"name\": \"pos\""):
        label_text({"name": "pos", "score": 3})
    assert sort_labels(["10", "2", "1"]) == ["1", "2", "10"] and sort_labels(["b", "a", "10"]) == ["10", "a", "b"]


def test_split_names_in_folder_and_file_names_are_read_as_hugging_face_datasets_reads_them():
    from rayfine.data.sources import split_of_path

    named = {"train.csv": "train", "data/train-00000-of-00001.parquet": "train", "training/a.jsonl": "train",
             "validation-00000-of-00002.parquet": "val", "dev.tsv": "val", "val_2017/x.csv": "val",
             "imdb_test.jsonl": "test", "eval/x.csv": "test", "testing.csv": "test",
             "values.csv": None, "contest/x.csv": None, "latest.csv": None, "Train.csv": None, "data.csv": None,
             "unsupervised-00000-of-00001.parquet": None}
    assert {path: split_of_path(path) for path in named} == named
    # An image's class folder names its class, never a split; folders above it and file names do.
    assert split_of_path("train/cats/1.jpg", True) == "train" and split_of_path("cats/1.jpg", True) is None
    assert split_of_path("test_tubes/1.jpg", True) is None and split_of_path("val/test/1.jpg", True) == "val"
    assert split_of_path("n01440764/ILSVRC2012_val_00000293.JPEG", True) == "val"
    # Parquet images take their labels from a column: the file's folder may name its split (the Hub's
    # refs/convert/parquet layout, plain_text/train/0000.parquet).
    assert split_of_path("plain_text/train/0000.parquet") == "train"
    # A named split is kept; a train row goes by the hash to the splits the source does not name.
    cfg = load_config("resnet18_digits").data
    keys = [i.to_bytes(4, "big") for i in range(4000)]
    assert {assign_split(k, cfg, "test", ("train", "test")) for k in keys} == {"test"}
    carved = Counter(assign_split(k, cfg, "train", ("train", "test")) for k in keys)
    assert set(carved) == {"train", "val"} and abs(carved["val"] / 4000 - cfg.val_fraction) < 0.03
    assert all(assign_split(k, cfg, "train", ("train", "test")) == "val" for k in keys if assign_split(k, cfg) == "val")
    assert {assign_split(k, cfg, "train", ("train", "val", "test")) for k in keys} == {"train"}
    assert all(assign_split(k, cfg, None, ("train", "test")) == assign_split(k, cfg) for k in keys)  # unnamed: as before


@pytest.mark.parametrize("files", [
    ["plain_text/train-00000-of-00001.parquet", "plain_text/test-00000-of-00001.parquet",
     "plain_text/unsupervised-00000-of-00001.parquet"],  # imdb: HF leaves the unnamed file out, rayfine hashes it
    ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "data/validation-00000-of-00001.parquet",
     "data/test-00000-of-00001.parquet"],
    ["train.csv", "dev.csv", "test.csv"], ["train_0.csv", "train_1.csv", "test_0.csv"],
    ["data/train/shard_0.csv", "data/test/shard_0.csv"], ["plain_text/train/0000.parquet", "plain_text/test/0000.parquet"],
    ["train/cats/1.jpg", "train/dogs/2.jpg", "validation/cats/3.jpg", "test/dogs/4.jpg"],
])
def test_the_splits_a_folders_files_name_are_those_hugging_face_datasets_resolves(tmp_path, files):
    from datasets.data_files import DataFilesDict, get_data_patterns

    from rayfine.data.sources import split_of_path

    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"x")
    resolved = DataFilesDict.from_patterns(get_data_patterns(str(tmp_path)), base_path=str(tmp_path))
    theirs = {os.path.relpath(p, tmp_path): {"validation": "val"}.get(split, split)
              for split, paths in resolved.items() for p in paths}
    assert {f: split_of_path(f, class_folders=f.endswith(".jpg")) for f in files} == {f: theirs.get(f) for f in files}


def test_a_folder_whose_every_file_names_a_split_other_than_train_is_refused_before_it_is_read(tmp_path):
    """ImageNet's validation images in class folders (ILSVRC2012_val_*.JPEG) all name the val split:
    nothing would be trained on, found only after every image was read, with advice that cannot help."""
    from rayfine.data.sources import source_splits

    for label in ("n01440764", "n01443537"):
        (tmp_path / "imagenet_val" / label).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "imagenet_val" / label / f"ILSVRC2012_val_0000{i}{label[-1]}.JPEG").write_bytes(b"")
    cfg = folder_cfg(tmp_path / "imagenet_val").data
    with pytest.raises(DataError, match=r"every file of .* names the val split in its folder or file name \(e.g. "
                                        r"n0144\d+/ILSVRC2012_val_\d+.JPEG\), none the train split.*set "
                                        r"data.source_splits: false"):
        source_splits(cfg)
    assert source_splits(cfg.model_copy(update={"source_splits": False})) is None
    (tmp_path / "imagenet_val" / "n01440764" / "n01440764_10026.JPEG").write_bytes(b"")  # an unnamed file: trained on
    assert source_splits(cfg)["splits"] == ["val"]


def test_a_folders_own_train_and_test_splits_are_kept_and_val_is_carved_from_train(ray_local, tmp_path, samples):
    """A folder of train/ and test/ (as Hugging Face's imagefolder reads it) was pooled and split
    again by the hash: most of the dataset's own test images were trained on."""
    root = tmp_path / "photos"
    for i, (digit, label) in enumerate(samples):
        split = "test" if i % 3 == 0 else "train"
        (root / split / label).mkdir(parents=True, exist_ok=True)
        (root / split / label / f"img{i}.png").write_bytes(encode(Image.fromarray(digit)))
    logged = []
    _, info = build_datasets(folder_cfg(root), log=logged.append)
    assert info.labels == ["0", "1", "7"]  # the class folders, not train/test
    tests = len(list((root / "test").rglob("*.png")))
    assert info.num_examples["test"] == tests and info.num_examples["val"] > 0
    assert info.num_examples["train"] + info.num_examples["val"] == len(samples) - tests
    assert any("splits: the source's own train, test files; carved from its train files: val" in line
               for line in logged), logged
    # data.source_splits false: every image by the hash, as before (the test images spread over the splits).
    _, pooled = build_datasets(folder_cfg(root, "data.source_splits=false"), log=lambda *_: None)
    assert pooled.num_examples["test"] != tests and sum(pooled.num_examples.values()) == len(samples)
    # A Hugging Face snapshot of images stored by their paths (Dataset.to_parquet of images from files):
    # the parquet file names the split, not the image file each row's origin names.
    import datasets as hf

    features = hf.Features({"image": hf.Image(), "label": hf.Value("string")})
    for split in ("train", "test"):
        files = sorted((root / split).rglob("*.png"))
        hf.Dataset.from_dict({"image": [str(f) for f in files], "label": [f.parent.name for f in files]},
                             features=features).to_parquet(str(tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet"))
    assert pq.read_table(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet").column("image")[0].as_py()["bytes"] is None
    _, hub = build_datasets(folder_cfg(tmp_path / "hub"), log=lambda *_: None)
    assert hub.num_examples["test"] == tests and hub.num_examples["val"] > 0


def test_labels_that_tie_as_integers_have_one_order_whatever_order_they_are_found_in():
    """The labels found in the data come from a set, whose order changes with PYTHONHASHSEED: "1"
    and "01" (one integer) must still sort the same way in every process, or label ids differ."""
    import itertools

    for labels in itertools.permutations(["1", "01", "10", "2", "002"]):
        assert sort_labels(list(labels)) == ["01", "1", "002", "2", "10"]


def test_an_image_that_cannot_be_prepared_is_a_bad_row_not_a_failed_task(digits):
    """prepare_batch is Ray Data's map_batches function (called here without Ray): an image that
    cannot be prepared is a bad row that says why; an exception would fail the whole run."""
    images, _ = digits
    malformed_exif = io.BytesIO()
    Image.fromarray(images[1]).save(malformed_exif, "PNG", exif=b"Exif\x00\x00XX\x00*garbage")
    batch = {
        "image": np.array([encode(Image.fromarray(images[0])), malformed_exif.getvalue(),
                           encode(Image.new("L", (1, 1000)))], dtype=object),  # 16x16000 when resized
        "label": np.array(["0", "1", "7"], dtype=object),
        "origin": np.array(["good.png", "exif.png", "long.png"], dtype=object),
    }
    cfg = folder_cfg("builtin:digits", "data.max_image_pixels=100000")
    out = prepare_batch(batch, cfg.model_dump_json())
    errors = dict(zip(out["origin"], out["error"]))
    assert errors["good.png"] == "" and errors["exif.png"] == ""  # its EXIF ignored, its pixels fine
    assert "1x1000 pixels would be resized to 16x16000" in errors["long.png"]
    assert list(out["split"]).count("bad") == 1


def test_a_local_folder_is_listed_as_read_binary_files_lists_it(ray_local, tmp_path, samples):
    """rayfine reads local image folders itself (faster); it must see exactly the files that Ray Data
    lists and the remote reader keeps of them (hidden files and folders at any depth left out)."""
    import ray.data

    from rayfine.data.sources import list_image_files, listed_paths

    png = encode(Image.fromarray(samples[0][0]))
    for name in ("a/1.png", "a/2.PNG", "a/deep/3.jpeg", "a/.hidden.png", "b/4.webp", "b/notes.txt", "b/5.png.bak",
                 "_tmp/6.png", ".cache/7.png", "8.png", "a/._1.png", "a/.ipynb_checkpoints/1.png", "__MACOSX/a/1.png",
                 "b/@eaDir/4.webp/SYNOPHOTO_THUMB_M.jpg", "b/11.jfif"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(png)
    # Links, followed as pyarrow follows them: to a file, to a folder outside, and one to nowhere.
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    (outside / "d").mkdir(parents=True)
    (outside / "d" / "9.png").write_bytes(png)
    (outside / "10.jpg").write_bytes(png)
    (tmp_path / "b" / "linked").symlink_to(outside / "d", target_is_directory=True)
    (tmp_path / "b" / "linked.jpg").symlink_to(outside / "10.jpg")
    (tmp_path / "b" / "broken.png").symlink_to(outside / "gone.png")
    ours = list_image_files(str(tmp_path))
    rays = sorted(ray.data.read_binary_files(str(tmp_path), include_paths=True, file_extensions=list(IMAGE_EXTENSIONS))
                  .select_columns(["path"]).to_pandas()["path"])
    assert [path for path, _ in ours] == [p for p, kept in zip(rays, listed_paths(rays, str(tmp_path))) if kept]
    assert {os.path.relpath(p, tmp_path) for p, _ in ours} == {
        "a/1.png", "a/2.PNG", "a/deep/3.jpeg", "b/4.webp", "b/11.jfif", "8.png", "b/linked/9.png", "b/linked.jpg"}
    assert all(size == len(png) for _, size in ours)
    # A link back up the tree is walked once (pyarrow would walk the cycle until the path is too long).
    (tmp_path / "a" / "deep" / "up").symlink_to(tmp_path, target_is_directory=True)
    assert list_image_files(str(tmp_path)) == ours


def test_text_and_parquet_folders_are_read_without_their_hidden_files(ray_local, tmp_path):
    """Ray Data is given the files rayfine lists (a hive partition's label still read from its
    path); parquet files whose label columns cannot be merged are named."""
    import pandas as pd

    from rayfine.data.sources import read_source

    def text_cfg(source):
        return load_config("minilm_rotten_tomatoes_tiny", [f"data.source={source}", "data.subsample=1.0"])

    (tmp_path / "csv" / "en" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "csv" / "en" / "train.csv").write_text("text,label\nfine,1\ndull,0\n")
    (tmp_path / "csv" / "en" / "._train.csv").write_bytes(b"\x00\x05\x16\x07Mac OS X  \xff\xfe" + b"\x00" * 60)
    (tmp_path / "csv" / "en" / ".ipynb_checkpoints" / "train-checkpoint.csv").write_text("text,label\nstale,1\n")
    # A name with "?" is read too: Ray's extension filter, given the listed files, cut it at the "?" and left it out.
    (tmp_path / "csv" / "en" / "what?.csv").write_text("text,label\nodd,1\n")
    (tmp_path / "csv" / "en" / "up").symlink_to(tmp_path / "csv")  # a link back up: each file once
    assert sorted((r["text"], r["label"]) for r in read_source(text_cfg(tmp_path / "csv").data).take_all()) == [
        ("dull", "0"), ("fine", "1"), ("odd", "1")]
    for label in ("cat", "dog"):
        (tmp_path / "hive" / f"label={label}").mkdir(parents=True)
        pq.write_table(pa.table({"text": [f"a {label}"]}), tmp_path / "hive" / f"label={label}" / "part-0.parquet")
        (tmp_path / "hive" / f"label={label}" / "._part-0.parquet").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)
    assert sorted((r["text"], r["label"]) for r in read_source(text_cfg(tmp_path / "hive").data).take_all()) == [
        ("a cat", "cat"), ("a dog", "dog")]
    (tmp_path / "shards").mkdir()
    pd.DataFrame({"text": ["a", "b"], "label": pd.Categorical(["x", "y"])}).to_parquet(tmp_path / "shards" / "0.parquet")
    pd.DataFrame({"text": ["c", "d"], "label": ["x", "y"]}).to_parquet(tmp_path / "shards" / "1.parquet")
    with pytest.raises(DataError, match=r"as parquet: column 'label' is .* in .*/1.parquet but dictionary<.*> in "
                                        r".*/0.parquet; write it with one type in every file"):
        read_source(text_cfg(tmp_path / "shards").data).take_all()


def test_read_blocks_are_sized_by_file_count_and_by_bytes(ray_local, tmp_path, samples):
    import ray

    from rayfine.data.sources import (
        BYTES_PER_BLOCK,
        FILES_PER_BLOCK,
        MAX_BLOCK_BYTES,
        MAX_READ_BLOCKS,
        list_image_files,
        path_blocks,
        read_block_count,
        read_local_image_folder,
    )

    def block_rows(ds) -> list[list[str]]:
        return [ray.get(ref).column("path").to_pylist() for ref in ds.to_arrow_refs()]

    small, photo = 400, 70_000  # a digit PNG, a 500x375 JPEG photo
    assert read_block_count([small] * 20_000) == -(-20_000 // FILES_PER_BLOCK)  # tiny files: by count
    assert read_block_count([photo] * 2_000) == -(-2_000 * photo // BYTES_PER_BLOCK)  # photos: by bytes
    assert read_block_count([photo] * 10**5) == MAX_READ_BLOCKS  # 7 GB: 200 blocks of 35 MB
    # Past that, blocks of Ray Data's block size limit at most, not ever larger ones (a read task holds
    # its block's bytes at once): 1M photos, 70 GB, were 200 blocks of 350 MB.
    assert read_block_count([photo] * 10**6) == -(-10**6 * photo // MAX_BLOCK_BYTES) == 522
    assert read_block_count([BYTES_PER_BLOCK * 10] * 3) == 3  # never more blocks than files
    assert read_block_count([small]) == 1
    # The folder reader uses the listed sizes: files of 1/3 of BYTES_PER_BLOCK make 2 blocks of 3 and 1.
    png = encode(Image.fromarray(samples[0][0]))
    for i in range(4):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.png").write_bytes(png + b"\0" * (BYTES_PER_BLOCK // 3 - len(png)))
    assert [size for _, size in list_image_files(str(tmp_path))] == [BYTES_PER_BLOCK // 3] * 4
    ds = read_local_image_folder(str(tmp_path))
    assert ds.materialize().num_blocks() == 2 and ds.count() == 4
    # Paths are split into blocks exactly as ray.data.from_items(..., override_num_blocks) splits them.
    paths = [f"/data/{i}.png" for i in range(23)]
    for blocks in (1, 4, 5, 23):
        theirs = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
        assert block_rows(path_blocks(paths, blocks)) == block_rows(theirs)


def test_a_file_that_cannot_be_read_is_a_bad_row_that_names_it(ray_local, tmp_path, samples):
    """Gone since the listing (or no permission): a bad row, which data.on_bad_rows reports or skips."""
    from rayfine.data.sources import read_local_image_folder

    for i in range(3):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / f"{i}.png").write_bytes(encode(Image.fromarray(samples[i][0])))
    ds = read_local_image_folder(str(tmp_path))  # lists now, reads lazily
    (tmp_path / "c" / "1.png").unlink()
    errors = {Path(r["origin"]).name: r["error"] for r in ds.take_all()}
    assert errors["0.png"] == errors["2.png"] == ""
    assert errors["1.png"] == f"cannot read {tmp_path / 'c' / '1.png'}: No such file or directory"


def test_a_folder_without_images_is_refused_before_anything_runs(tmp_path):
    from rayfine.data.sources import read_local_image_folder

    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"data.source: no image files \(png, jpg.*\) under"):
        read_local_image_folder(str(tmp_path))
    with pytest.raises(DataError, match=r"data.source: .*/gone does not exist; images are read from a folder"):
        read_local_image_folder(str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"data.source: .*/notes.txt is a file, not a folder; images"):
        read_local_image_folder(str(tmp_path / "cats" / "notes.txt"))


def test_the_format_of_a_folder_follows_its_files(tmp_path):
    from rayfine.config import DataConfig
    from rayfine.data.sources import detect_format

    def folder(name: str, *files: str) -> str:
        for f in files:
            (tmp_path / name / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / f).write_bytes(b"")
        return str(tmp_path / name)

    def image_format(source: str) -> str:
        return detect_format(DataConfig(source=source, kind="image"))

    assert image_format(folder("shards", "a.parquet", "b/c.parquet", ".DS_Store")) == "parquet"
    assert image_format(folder("mixed", "a.parquet", "cats/1.png")) == "image_folder"
    assert image_format(folder("classes", "cats/1.png", "dogs/2.JPG", "labels.csv")) == "image_folder"
    assert image_format(folder("empty", ".hidden.parquet")) == "image_folder"  # refused later: no image files
    # A Hugging Face dataset's snapshot: its card beside the parquet shards.
    assert image_format(folder("hub", "README.md", ".gitattributes", "data/train-00000-of-00001.parquet")) == "parquet"
    assert detect_format(DataConfig(source=folder("csvs", "a.csv", "b.csv", "notes.txt"), kind="text")) == "csv"
    with pytest.raises(DataError, match=r"data.format: cannot read .* as text data; set data.format to one of: csv"):
        detect_format(DataConfig(source=folder("both", "a.csv", "b.jsonl"), kind="text"))


def test_an_image_is_labelled_by_the_folder_it_sits_in():
    """As Hugging Face's imagefolder labels it (the README says so); torchvision's ImageFolder would
    take the top folder."""
    from rayfine.data.sources import _label_of

    assert _label_of("/data/pets/train/cats/001.jpg", "/data/pets") == "cats"
    assert _label_of("/data/pets/cats/indoor/002.jpg", "/data/pets") == "indoor"
    assert _label_of("/data/pets/003.jpg", "/data/pets") is None  # outside any class folder: a bad row
    assert _label_of("bucket/pets/dogs/004.png", "s3://bucket/pets") == "dogs"  # Ray lists s3 paths without the scheme
    # A class folder whose path ends as the root's does is still a class folder.
    assert _label_of("pets/carpets/005.png", "s3://pets/") == "carpets"
    assert _label_of("/data/x/data/006.png", "/data") == "data"
    assert _label_of("pets/007.png", "s3://pets") is None


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def ray_data_warnings():
    """Ray Data's warnings (logger ray.data.dataset), with its once-per-process "no CPUs" one re-armed."""
    from ray.util import debug

    debug._logged.discard("cpu_warning")  # Ray's log_once key for it (private; it fires once per process)
    handler = _Records()
    logger = logging.getLogger("ray.data.dataset")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)
    debug._logged.discard("cpu_warning")


def test_building_datasets_raises_no_false_alarm_about_cpus(ray_local, ray_data_warnings):
    # Ray 2.60's materialize() warns that "the Dataset job will hang" right after its own tasks ran on
    # every CPU (the resource view still counts them): seen on every `rayfine train` on 2 CPUs.
    wait_for(lambda: ray_local.available_resources().get("CPU") == 2, 30, 0.2, "every CPU free")
    build_datasets(load_config("resnet18_digits_tiny"), log=lambda *_: None)
    assert not [m for m in ray_data_warnings if NO_CPUS_WARNING in m]


def test_the_cpu_warning_is_dropped_only_when_the_cpus_were_free_as_the_block_began(ray_local, ray_data_warnings):
    import ray
    from ray.util import debug

    @ray.remote(num_cpus=2)
    class Holder:
        def ready(self):
            return True

    def take_the_cpus():
        holder = Holder.remote()
        ray.get(holder.ready.remote())
        wait_for(lambda: not ray.available_resources().get("CPU"), 30, 0.2, "the CPUs taken")
        return holder

    def give_them_back(holder):
        ray.kill(holder)
        wait_for(lambda: ray.available_resources().get("CPU") == 2, 30, 0.2, "every CPU free")

    # Data made on the driver: materializing it needs no task, so no CPU, and Ray's check sees none free.
    # Free when the block began (as when a data build's own tasks take them): Ray warned, and it was dropped.
    with no_false_cpu_alarm():
        holder = take_the_cpus()
        try:
            ray.data.from_items([{"x": 1}]).materialize()
        finally:
            give_them_back(holder)
    assert "cpu_warning" in debug._logged and not [m for m in ray_data_warnings if NO_CPUS_WARNING in m]
    # Taken before it began: other work holds them and the data may really wait; the warning goes through.
    debug._logged.discard("cpu_warning")
    holder = take_the_cpus()
    try:
        with no_false_cpu_alarm():
            ray.data.from_items([{"x": 1}]).materialize()
    finally:
        give_them_back(holder)
    assert [m for m in ray_data_warnings if NO_CPUS_WARNING in m]
