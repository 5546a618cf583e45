"""Text classification: readers, tokenization shared with serving, Hugging Face fine-tuning on
real Rotten Tomatoes snippets and a Hugging Face image classifier on real digits (ray tier)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from rayfine.checkpoints import PREPROCESSOR_FILE, load_checkpoint, save_checkpoint
from rayfine.config import load_config
from rayfine.data import Preprocessor, build_datasets, prepare_batch
from rayfine.data.sources import read_failure, read_source
from rayfine.data.text import TextCollate, check_texts, load_tokenizer, pad, tokenize
from rayfine.errors import DataError, InputError
from rayfine.evaluate import predict_dataset
from rayfine.models import build_model, logits_of, resolve_model_source
from rayfine.train import fit


def text_cfg(source, *extra):
    return load_config("minilm_rotten_tomatoes_tiny", [f"data.source={source}", "data.subsample=1.0", *extra])


# --- unit ---------------------------------------------------------------------------------------


def test_tokenize_and_pad_longest_or_fixed():
    cfg = load_config("minilm_rotten_tomatoes_tiny").data
    tokenizer = load_tokenizer(resolve_model_source("minilm"))
    encoded = tokenize(["a fine film", "dull"], None, cfg, tokenizer)
    assert [len(x) for x in encoded["input_ids"]] == [5, 3]  # [CLS] a fine film [SEP], [CLS] dull [SEP]
    longest = pad(encoded, tokenizer.pad_token_id, cfg)
    assert longest["input_ids"].shape == (2, 5)
    assert longest["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert longest["input_ids"][1, 3:].tolist() == [tokenizer.pad_token_id] * 2
    fixed = pad(encoded, tokenizer.pad_token_id, cfg.model_copy(update={"padding": "max_length"}))
    assert fixed["input_ids"].shape == (2, cfg.max_length)
    long_text = tokenize(["word " * 500], None, cfg, tokenizer)
    assert len(long_text["input_ids"][0]) == cfg.max_length  # truncated


@pytest.mark.parametrize("padding_side, pad_token_type_id", [("right", 0), ("left", 3)])
def test_batches_are_padded_as_the_tokenizer_pads(tmp_path, padding_side, pad_token_type_id):
    """The collate function pads where and with what the checkpoint's tokenizer does
    (transformers' tokenizer.pad, DataCollatorWithPadding): an XLNet tokenizer pads on the left with
    token type 3, and its model classifies from the last position, which right padding would fill
    with pad tokens for every text but the longest."""
    import shutil

    minilm = resolve_model_source("minilm")
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{minilm}/{name}", tmp_path)
    tokenizer_config = json.loads(Path(f"{minilm}/tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "padding_side": padding_side}))
    tokenizer = load_tokenizer(str(tmp_path))
    tokenizer._pad_token_type_id = pad_token_type_id  # XLNet's tokenizer sets 3 this way
    cfg = load_config("minilm_rotten_tomatoes_tiny", ["data.text_pair_column=b"]).data
    encoded = tokenize(["a fine film", "dull", "an overlong, tedious film"], ["yes", "no no", "so"], cfg, tokenizer)
    ours = TextCollate(cfg, tokenizer)({**encoded, "y": np.array([0, 1, 0])})
    theirs = tokenizer.pad(dict(encoded), padding="longest", return_tensors="pt")
    assert tokenizer.padding_side == padding_side and set(ours) == {*theirs, "y"}
    for column in theirs:
        assert torch.equal(ours[column], theirs[column]), column


def test_request_texts_are_checked():
    cfg = load_config("minilm_rotten_tomatoes_tiny").data
    with pytest.raises(InputError, match="input 1: expected a string"):
        check_texts(["ok", 3], cfg)
    with pytest.raises(InputError, match="exceeds the limit of 10"):
        check_texts(["x" * 11], cfg, max_chars=10)
    pair_cfg = cfg.model_copy(update={"text_pair_column": "hypothesis"})
    assert check_texts([["a", "b"]], pair_cfg) == (["a"], ["b"])
    with pytest.raises(InputError, match="text pairs"):
        check_texts(["a"], pair_cfg)


def test_an_empty_pair_text_is_a_bad_row_as_serving_refuses_it():
    """Serving answers 400 "empty text" for [["q", ""]]; training holds the pair text to the same rule."""
    cfg = load_config("minilm_rotten_tomatoes_tiny", ["data.text_pair_column=hypothesis", "data.subsample=1.0"])
    batch = {"text": np.array(["a question", "a question", ""], dtype=object),
             "text_pair": np.array(["an answer", " ", "an answer"], dtype=object),
             "label": np.array(["positive", "negative", "positive"], dtype=object),
             "origin": np.array(["f#0", "f#1", "f#2"], dtype=object)}
    out = prepare_batch(batch, cfg.model_dump_json())
    assert out["split"][0] != "bad" and len(out["input_ids"][0]) > 0
    assert out["split"][1:].tolist() == ["bad", "bad"]
    assert out["error"][1:].tolist() == ["empty or missing pair text", "empty or missing text"]


def test_texts_held_as_bytes_are_decoded_and_other_types_are_named():
    """Parquet from Hive, Impala or older Spark holds strings as BINARY, which pyarrow reads as bytes:
    they are texts (as Spark's binaryAsString reads them), tokenized as the same str would be. A cell
    that is a number or a list is a bad row that says so, not an "empty or missing text"."""
    cfg = load_config("minilm_rotten_tomatoes_tiny", ["data.subsample=1.0"])
    texts = [b"a fine film", "a fine film", b"\xff\xfe", 42, ["a", "list"], None, b"  "]
    batch = {"text": np.array(texts, dtype=object),
             "label": np.array(["positive"] * len(texts), dtype=object),
             "origin": np.array([f"f#{i}" for i in range(len(texts))], dtype=object)}
    out = prepare_batch(batch, cfg.model_dump_json())
    assert out["split"][0] != "bad" and out["input_ids"][0].tolist() == out["input_ids"][1].tolist()
    assert len(out["input_ids"][0]) > 2
    assert out["error"][2:].tolist() == ["text is bytes that are not UTF-8 text", "text is a int (42), not a string",
                                         'text is a list (["a", "list"]), not a string', "empty or missing text",
                                         "empty or missing text"]


def test_a_tokenizer_directory_replaced_at_the_same_path_loads_anew(tmp_path):
    """A replica that reloads a checkpoint directory saved again at the same path gets its tokenizer."""
    import shutil

    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(resolve_model_source("minilm"))
    ckpt = tmp_path / "checkpoint"
    base.save_pretrained(ckpt)
    assert load_tokenizer(str(ckpt)).model_max_length == base.model_max_length
    shutil.rmtree(ckpt)
    other = AutoTokenizer.from_pretrained(resolve_model_source("minilm"), model_max_length=77)
    other.add_tokens(["rayfinetoken"])
    other.save_pretrained(ckpt)
    reloaded = load_tokenizer(str(ckpt))
    assert reloaded.model_max_length == 77 and "rayfinetoken" in reloaded.get_vocab()
    assert load_tokenizer(str(ckpt)) is reloaded  # unchanged files: the cached one


# --- ray tier -------------------------------------------------------------------------------------


def token_rows(datasets):
    rows = set()
    for ds in datasets.values():
        batch = ds.take_batch(10_000, batch_format="numpy")
        rows |= {tuple(ids.tolist()) for ids in batch["input_ids"]}
    return rows


@pytest.mark.ray
def test_csv_jsonl_parquet_give_the_same_examples_and_serving_tokenizes_identically(ray_local, tmp_path, reviews):
    sample = reviews.iloc[:300].assign(score=np.where(reviews["label"].iloc[:300] == "positive", 1, 0))
    sample.to_csv(tmp_path / "r.csv", index=False)
    sample.to_json(tmp_path / "r.jsonl", orient="records", lines=True)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pandas(sample.iloc[:150]), tmp_path / "pq" / "a.parquet")
    pq.write_table(pa.Table.from_pandas(sample.iloc[150:]), tmp_path / "pq" / "b.parquet")

    results = {}
    for name, source in {"csv": "r.csv", "jsonl": "r.jsonl", "parquet": "pq"}.items():
        results[name] = build_datasets(text_cfg(tmp_path / source), log=lambda *_: None)
    infos = [info for _, info in results.values()]
    assert all(info == infos[0] for info in infos)
    assert infos[0].labels == ["negative", "positive"] and sum(infos[0].num_examples.values()) == 300
    rows = [token_rows(datasets) for datasets, _ in results.values()]
    assert rows[0] == rows[1] == rows[2] and len(rows[0]) == len(set(sample["text"]))

    # Serving's preprocessing of the raw texts gives exactly the ids the training pipeline made.
    cfg = text_cfg(tmp_path / "r.csv")
    served = Preprocessor(cfg)(list(sample["text"]))
    served_rows = {tuple(ids[mask.bool()].tolist()) for ids, mask in zip(served["input_ids"], served["attention_mask"])}
    assert served_rows == rows[0]

    # An integer label column works too, and a missing column is named.
    _, by_score = build_datasets(text_cfg(tmp_path / "r.csv", "data.label_column=score"), log=lambda *_: None)
    assert by_score.labels == ["0", "1"]
    with pytest.raises(DataError, match="data.text_column: no column 'review'"):
        build_datasets(text_cfg(tmp_path / "r.csv", "data.text_column=review"), log=lambda *_: None)

    # TSV, as GLUE ships its tasks: tab-separated, nothing quoted, so a text's " is a character (as
    # CSV, a lone quote would swallow the lines after it). The same rows as JSON Lines give the same examples.
    plain = sample[~sample["text"].str.contains("[\t\n\r]")].copy()
    plain.iloc[0, plain.columns.get_loc("text")] = '"a quote that never closes, then more'
    (tmp_path / "glue").mkdir()
    (tmp_path / "glue" / "train.tsv").write_text("sentence\tlabel\n" + "".join(
        f"{t}\t{y}\n" for t, y in zip(plain["text"], plain["label"])))
    plain.rename(columns={"text": "sentence"}).to_json(tmp_path / "glue.jsonl", orient="records", lines=True)
    tsv, tsv_info = build_datasets(text_cfg(tmp_path / "glue", "data.text_column=sentence"), log=lambda *_: None)
    jsonl, jsonl_info = build_datasets(text_cfg(tmp_path / "glue.jsonl", "data.text_column=sentence"),
                                       log=lambda *_: None)
    assert tsv_info == jsonl_info and sum(tsv_info.num_examples.values()) == len(plain) > 290
    assert token_rows(tsv) == token_rows(jsonl)


@pytest.mark.ray
def test_labels_and_texts_are_read_as_the_strings_the_file_holds(ray_local, tmp_path, reviews):
    """Zero-padded class codes stay codes (pyarrow's CSV reader and pandas' JSON reader would make
    "007" the number 7), quoted CSV texts may span lines in a file larger than pyarrow's 1 MiB
    read block, and a JSONL file may start with a byte-order mark."""
    texts = [t + "\n" + t for t in reviews["text"].iloc[:400]] * 12  # ~1.3 MB of CSV
    codes = ["007" if y == "positive" else "010" for y in reviews["label"].iloc[:400]] * 12
    import pandas as pd

    pd.DataFrame({"text": texts, "label": codes}).to_csv(tmp_path / "codes.csv", index=False)
    assert (tmp_path / "codes.csv").stat().st_size > 1 << 20
    lines = [json.dumps({"text": t, "label": y}) for t, y in zip(texts[:400], codes[:400])]
    (tmp_path / "codes.jsonl").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    for name, count in (("codes.csv", 4800), ("codes.jsonl", 400)):
        _, info = build_datasets(text_cfg(tmp_path / name, "data.labels=['007', '010']"), log=lambda *_: None)
        assert info.labels == ["007", "010"] and sum(info.num_examples.values()) == count, name
        assert info.bad_rows == 0, name


@pytest.mark.ray
def test_files_that_cannot_be_read_are_named_with_the_readers_reason(ray_local, tmp_path, reviews):
    """What fails in Ray Data's read tasks reaches the user as one DataError line naming the file
    and pyarrow's reason (Ray's own error names the file only, behind its task traceback)."""
    good = reviews.iloc[:60]
    (tmp_path / "latin1.csv").write_bytes("text,label\ncafé good,positive\n".encode("latin-1"))
    (tmp_path / "ragged.csv").write_text("text,label\na,positive\nb,negative,extra\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("text,label\n")
    (tmp_path / "mixed.jsonl").write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": "zero"}\n')
    (tmp_path / "two").mkdir()
    good.to_csv(tmp_path / "two" / "a.csv", index=False)
    good.rename(columns={"text": "body"}).to_csv(tmp_path / "two" / "b.csv", index=False)
    (tmp_path / "twoj").mkdir()  # JSON Lines reads the configured fields only: a file without one is named too
    good.to_json(tmp_path / "twoj" / "a.jsonl", orient="records", lines=True)
    good.rename(columns={"text": "body"}).to_json(tmp_path / "twoj" / "b.jsonl", orient="records", lines=True)
    for source, message in [
        ("latin1.csv", "data.source: cannot read {d}/latin1.csv: In CSV column #0: CSV conversion error to string: invalid UTF8 data; save it as UTF-8 (Excel: 'CSV UTF-8')"),
        ("ragged.csv", "data.source: cannot read {d}/ragged.csv: CSV parse error: Expected 2 columns, got 3: b,negative,extra"),
        ("empty.csv", "data.source: cannot read {d}/empty.csv: Empty CSV file"),
        ("header.csv", "data.source: {d}/header.csv holds no rows"),
        ("mixed.jsonl", "data.source: cannot read {d}/mixed.jsonl: JSON parse error: Column(/label) changed from number to string in row 1"),
        ("two", "data.text_column: no column 'text' in {d}/two/b.csv; columns: ['body', 'label']"),
        ("twoj", "data.text_column: no column 'text' in {d}/twoj/b.jsonl; columns: ['body', 'label']"),
    ]:
        with pytest.raises(DataError) as info:
            build_datasets(text_cfg(tmp_path / source), log=lambda *_: None)
        assert str(info.value) == message.format(d=tmp_path), source
    # A file named as the source is read as data.format says, whatever its extension.
    good.to_csv(tmp_path / "reviews.txt", index=False)
    _, info = build_datasets(text_cfg(tmp_path / "reviews.txt", "data.format=csv"), log=lambda *_: None)
    assert sum(info.num_examples.values()) == len(good)


@pytest.mark.ray
@pytest.mark.parametrize("name", ["extra.csv", "extra.jsonl"])
def test_unused_columns_are_not_read_so_their_types_cannot_break_a_file(ray_local, tmp_path, reviews, name):
    """Only the configured columns are read: an unused column whose values change type after
    pyarrow's first 1 MiB (CSV: an "id" of numbers then "a17", "notes" empty then filled; JSON
    Lines: "id": 1 then "id": "a7") does not make the file unreadable. A label column whose type
    changes is still refused (test_files_that_cannot_be_read_are_named_with_the_readers_reason)."""
    import pandas as pd

    texts = list(reviews["text"]) * 8
    labels = list(reviews["label"]) * 8
    n = len(texts)
    late = n - 50  # past the first MiB
    frame = pd.DataFrame({"id": [str(i) if i < late else f"a{i}" for i in range(n)], "text": texts,
                          "notes": ["" if i < late else "checked" for i in range(n)], "label": labels})
    frame.to_csv(tmp_path / "extra.csv", index=False)
    lines = [json.dumps({"id": i if i < late else f"a{i}", "text": t, "label": y, "score": 1 if i < late else "high"})
             for i, (t, y) in enumerate(zip(texts, labels))]
    (tmp_path / "extra.jsonl").write_text("\n".join(lines) + "\n")
    path = tmp_path / name
    assert path.stat().st_size > 1 << 20 and len(path.read_bytes().split(b"\n", late + 1)[-1]) < 1 << 20
    cfg = text_cfg(path)
    assert read_failure(cfg.data) is None  # the driver's re-read reads as the reader does
    _, info = build_datasets(cfg, log=lambda *_: None)
    assert sum(info.num_examples.values()) == n and info.bad_rows == 0


@pytest.mark.ray
def test_a_column_named_path_is_the_users_not_the_readers_file_names(ray_local, tmp_path, reviews):
    """Ray Data's include_paths column is named "path": a configured column of that name keeps its
    own values (the rows' origin is then the source)."""
    sample = reviews.iloc[:30]
    sample.rename(columns={"text": "path"}).to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": t, "path": t[::-1], "label": y}) + "\n"
                                              for t, y in zip(sample["text"], sample["label"])))
    rows = read_source(text_cfg(tmp_path / "p.csv", "data.text_column=path").data).take_all()
    assert sorted(r["text"] for r in rows) == sorted(sample["text"])
    assert {r["origin"] for r in rows} == {str(tmp_path / "p.csv")}
    rows = read_source(text_cfg(tmp_path / "p.jsonl", "data.text_pair_column=path").data).take_all()
    assert sorted((r["text"], r["text_pair"]) for r in rows) == sorted((t, t[::-1]) for t in sample["text"])
    rows = read_source(text_cfg(tmp_path / "p.csv", "data.text_column=path", "data.label_column=path").data).take_all()
    assert sorted(r["label"] for r in rows) == sorted(sample["text"])


@pytest.mark.ray
def test_empty_texts_and_labels_are_bad_rows(ray_local, tmp_path, reviews):
    sample = reviews.iloc[:40].copy()
    sample.loc[3, "text"] = ""
    sample.loc[5, "label"] = None
    sample.to_csv(tmp_path / "bad.csv", index=False)
    # Each example names its row, by its label or its text's start (the readers give no line numbers).
    with pytest.raises(DataError, match=r"(?s)^2 bad row\(s\).*bad\.csv \(the row with label '[^']+'\): empty or "
                                        r"missing text\n.*bad\.csv \(the row with text .+\): no label"):
        build_datasets(text_cfg(tmp_path / "bad.csv"), log=lambda *_: None)


@pytest.mark.ray
def test_user_csv_trains_with_the_preset_and_the_checkpoint_serves_offline(ray_local, reviews_run):
    # conftest's reviews_run: the tiny preset trained on a CSV of 1,300 real reviews.
    cfg = reviews_run.cfg
    report = reviews_run.summary["eval"]
    majority = max(c["support"] for c in report["per_class"].values()) / report["num_samples"]
    assert report["accuracy"] > majority + 0.05, (report["accuracy"], majority)

    # The checkpoint alone (its tokenizer files and config.json) serves, with the hub offline.
    ckpt_dir = reviews_run.checkpoint
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in ckpt_dir.iterdir()}
    ckpt = load_checkpoint(ckpt_dir)
    pre = Preprocessor(ckpt.cfg, str(ckpt_dir))
    texts = ["A moving, beautifully acted and utterly delightful film.", "A dull, lifeless and tedious mess."]
    probs = ckpt.predict_proba(pre(texts))
    positive = ckpt.labels.index("positive")
    assert probs[0, positive] > probs[1, positive]
    # ... and is a Hugging Face model directory: transformers' own loaders and pipeline give the
    # same labels and scores.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    hf_model = AutoModelForSequenceClassification.from_pretrained(str(ckpt_dir))
    assert hf_model.config.id2label == dict(enumerate(ckpt.labels))
    classify = pipeline("text-classification", model=hf_model, tokenizer=AutoTokenizer.from_pretrained(str(ckpt_dir)))
    for row, answer in zip(probs.numpy(), classify(texts)):
        assert answer["label"] == ckpt.labels[row.argmax()] and answer["score"] == pytest.approx(row.max(), abs=1e-4)
    datasets, _ = build_datasets(cfg, log=lambda *_: None)
    y, test_probs = predict_dataset(ckpt, datasets["test"])
    assert (test_probs.argmax(1) == y).mean() == pytest.approx(report["accuracy"])


@pytest.mark.ray
def test_freeze_then_unfreeze_with_class_weights_and_label_smoothing(ray_local, tmp_path):
    cfg = load_config("minilm_rotten_tomatoes_tiny", [
        "name=frozen", f"storage.runs_dir={tmp_path}", "data.subsample=0.02", "train.epochs=2",
        "train.freeze_epochs=1", "train.class_weights=balanced", "train.label_smoothing=0.1",
    ])
    fit(cfg, log=lambda *_: None)
    pretrained = load_file(f"{resolve_model_source('minilm')}/model.safetensors")
    body_key = next(k for k in pretrained if k.endswith("encoder.layer.0.attention.self.query.weight"))
    by_epoch = {}
    for ckpt_dir in (p for p in (tmp_path / "frozen" / "ray" / "train").glob("checkpoint_*") if p.is_dir()):
        epoch = json.loads((ckpt_dir / "metrics.json").read_text())["epoch"]
        by_epoch[epoch] = load_file(str(ckpt_dir / "model.safetensors"))
    assert set(by_epoch) == {1, 2}
    model_key = next(k for k in by_epoch[1] if k.endswith("encoder.layer.0.attention.self.query.weight"))
    # Epoch 1 trained only the head; epoch 2 the whole model.
    assert torch.equal(by_epoch[1][model_key], pretrained[body_key])
    assert not torch.equal(by_epoch[1]["classifier.weight"], by_epoch[2]["classifier.weight"])
    assert not torch.equal(by_epoch[2][model_key], pretrained[body_key])


@pytest.mark.ray
def test_hugging_face_image_classifier_fine_tunes_with_its_processors_normalization_and_pipeline_loads_it(
        ray_local, tmp_path, digits, monkeypatch):
    # The base model, as a user's Hugging Face model directory: weights, config.json and an image
    # processor whose normalization is not ImageNet's (ViT's 0.5), which fine-tuning must follow.
    # Named by a path relative to where rayfine runs, which Ray Train's workers (each in a
    # directory of its own) find only when the driver made it absolute.
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    base = tmp_path / "base_model"
    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1])).save_pretrained(base)
    ViTImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(base)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("resnet18_digits_tiny", [
        f"storage.runs_dir={tmp_path}", "name=hf_image", "train.epochs=2", "data.image_size=16", "data.color_mode=RGB",
        "model.name=base_model",
    ])
    assert cfg.data.mean is None and cfg.model.pretrained
    fit(cfg, log=lambda *_: None)
    # The run directory keeps the path as given (the workers got it absolute), so the same command
    # again continues the run instead of being refused as another config.
    from rayfine.rundir import saved_config
    from rayfine.train.driver import preflight

    assert yaml.safe_load(saved_config(tmp_path / "hf_image", "train").read_text())["model"]["name"] == "base_model"
    assert preflight(cfg) is True
    lines = [json.loads(x) for x in (tmp_path / "hf_image" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["train_loss"] < lines[0]["train_loss"]
    ckpt_dir = tmp_path / "hf_image" / "train" / "checkpoint"
    ckpt = load_checkpoint(ckpt_dir)
    assert (ckpt_dir / PREPROCESSOR_FILE).is_file()
    assert type(ckpt.model).__name__ == "ResNetForImageClassification"
    assert ckpt.model.config.id2label[3] == "3"
    # Trained, evaluated and saved with the base model's normalization.
    assert (ckpt.cfg.data.mean, ckpt.cfg.data.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    processor_file = json.loads((ckpt_dir / PREPROCESSOR_FILE).read_text())
    assert processor_file["image_mean"] == processor_file["image_std"] == [0.5, 0.5, 0.5]

    # The checkpoint is a Hugging Face image model directory: its preprocessor_config.json gives
    # transformers' processor rayfine's preprocessing, so pipeline("image-classification") answers
    # as rayfine does. With the PIL backend the pixel values are rayfine's exactly.
    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    images = [Image.fromarray(digit) for digit in digits[0][:24]]  # 8x8 grayscale, as a user has them
    inputs = Preprocessor(ckpt.cfg, str(ckpt_dir))([np.asarray(img) for img in images])
    ours = ckpt.predict_proba(inputs).numpy()
    pil_processor = AutoImageProcessor.from_pretrained(str(ckpt_dir), backend="pil")
    assert torch.allclose(pil_processor(images, return_tensors="pt")["pixel_values"], inputs["pixel_values"], atol=1e-6)
    # A photo-sized image reduced 9x: rayfine's reducing_gap makes a few levels of difference.
    photo = Image.fromarray(digits[0][5]).convert("RGB").resize((200, 150), Image.Resampling.BICUBIC)
    levels = (pil_processor(photo, return_tensors="pt")["pixel_values"] - Preprocessor(ckpt.cfg)([np.asarray(photo)])["pixel_values"]) \
        * torch.tensor(pil_processor.image_std).view(1, 3, 1, 1) * 255
    assert 0 < levels.abs().max() <= 4, levels.abs().max()
    pipelines = {
        "pil": (pipeline("image-classification", model=str(ckpt_dir), image_processor=pil_processor), 1e-5),
        # As a user would load it; the default (torchvision) backend resizes with its own kernel.
        "default": (pipeline("image-classification", model=str(ckpt_dir)), 1e-3),
    }
    for backend, (classify, tolerance) in pipelines.items():
        answers = classify(images, top_k=10)
        probs = np.array([[next(a["score"] for a in answer if a["label"] == label) for label in ckpt.labels] for answer in answers])
        assert np.abs(probs - ours).max() < tolerance, (backend, np.abs(probs - ours).max())
    # A grayscale model (num_channels 1, from the RGB base) gets none: transformers' processors
    # never convert to one channel.
    gray = cfg.with_overrides(["data.color_mode=L"])
    model = build_model(gray, ckpt.labels)
    assert logits_of(model(pixel_values=torch.zeros(2, 1, 16, 16))).shape == (2, 10)
    save_checkpoint(tmp_path / "gray", model, gray, ckpt.labels, {})
    assert (tmp_path / "gray" / "config.json").is_file() and not (tmp_path / "gray" / PREPROCESSOR_FILE).exists()


def test_whether_a_json_file_has_a_column_is_told_from_its_lines_or_not_at_all(tmp_path):
    """A configured column that came back empty for a whole file: the file's lines say whether it
    has the column. A file that is one JSON array (read by Ray's json.load fallback) has no line to
    tell from, so nothing is concluded (not "no columns")."""
    from rayfine.data.sources import _file_columns

    lines = tmp_path / "a.jsonl"
    lines.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": null}\n{"text": "b", "label": 1, "extra": 2}\n' + b'{"x": 1}\n' * 1000)
    assert _file_columns(str(lines), str(lines), "jsonl", "label") == ["text", "label"]
    assert _file_columns(str(lines), str(lines), "jsonl", "pair") == ["text", "label", "extra", "x"]
    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"text": "a", "label": None}, {"text": "b", "label": None}]))
    assert _file_columns(str(array), str(array), "jsonl", "label") is None


def test_json_lines_class_ids_beyond_a_doubles_precision_keep_every_digit(tmp_path):
    """Numbers are read as doubles (so that 1 in one file and 1.0 in another read alike), but
    integers beyond 2**53 (64-bit class ids) as exact decimals: as doubles, ids lost digits and two
    classes could become one, and an int64 column with a missing label becomes doubles in a numpy
    batch. A number with a fraction among them in the first MiB makes the column doubles."""
    import pyarrow.json as pajson

    from rayfine.data import label_text
    from rayfine.data.sources import _json_parse_options

    big = [9007199254740993, 9007199254740992, 1234567890123456789, 18446744073709551615]
    ids = tmp_path / "ids.jsonl"
    rows = [{"text": f"t{i}", "label": y} for i, y in enumerate(big * 3)] + [{"text": "gap", "label": None}]
    ids.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    options = _json_parse_options(str(ids), [str(ids)], ["text", "label"])
    assert options.explicit_schema.field("label").type == pa.decimal128(38, 0)
    table = pajson.read_json(ids, parse_options=options)
    as_numpy = table.column("label").to_numpy(zero_copy_only=False)  # what a numpy batch holds
    assert [label_text(v) for v in as_numpy] == [str(y) for y in big * 3] + [None]
    for name, labels in (("small.jsonl", (1, 2, 3)), ("halves.jsonl", (1, 2, 2.5, 3)),
                         ("mixed.jsonl", (big[0], 2.5))):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"text": "t", "label": y}) + "\n" for y in labels))
        options = _json_parse_options(str(path), [str(path)], ["text", "label"])
        assert options.explicit_schema.field("label").type == pa.float64(), name
    # Shards of one folder, 1 in one and 1.0 in another (pandas writes an int column with a gap so):
    # both read with the first file's types.
    (tmp_path / "a.jsonl").write_text('{"text": "t", "label": 1}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "t", "label": 1.0}\n{"text": "u", "label": null}\n')
    options = _json_parse_options(str(tmp_path), [str(tmp_path / "a.jsonl")], ["text", "label"])
    assert [label_text(v) for f in ("a", "b") for v in pajson.read_json(tmp_path / f"{f}.jsonl",
            parse_options=options).column("label").to_numpy(zero_copy_only=False)] == ["1", "1", None]
