"""EfficientNet-Lite0 from its offline ImageNet weights, fine-tuned for real (ray tier): 2 DDP
workers on scikit-learn's digits, grayscale at 32 px; the exported checkpoint serves what
evaluation measured. The weights, the grayscale stem and the normalization: tests/test_models.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rayfine.checkpoints import INFERENCE_FILES
from rayfine.config import load_config
from rayfine.data import build_datasets
from rayfine.evaluate import predict_dataset
from rayfine.models import EFFICIENTNET_MEAN, EFFICIENTNET_STD
from rayfine.serve.model import load_served, run_batch
from rayfine.train import fit

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    """3 epochs, batch 16, half the digits (~300 training images per worker): test accuracy 0.95,
    where the same run from random weights (model.pretrained false) reaches 0.74, and one whose
    BatchNorm statistics keep TensorFlow's slow 0.99 decay 0.28."""
    root = tmp_path_factory.mktemp("efficientnet")
    cfg = load_config("resnet18_digits_tiny", [
        "name=eff_digits", f"storage.runs_dir={root}", "model.name=efficientnet_lite0", "data.image_size=32",
        "data.subsample=0.5", "train.epochs=3", "train.batch_size=16", "train.lr=0.003",
    ])
    return cfg, fit(cfg, log=lambda *_: None)


def test_pretrained_efficientnet_fine_tunes_on_digits_and_its_checkpoint_serves_what_evaluation_measured(run):
    cfg, summary = run
    report = json.loads((cfg.run_dir() / "train" / "eval.json").read_text())
    assert report["split"] == "test" and report["accuracy"] > 0.85  # 10 classes: chance is 0.1; pretrained helps
    assert summary["eval"]["accuracy"] == report["accuracy"]

    checkpoint = cfg.run_dir() / "train" / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(INFERENCE_FILES)  # not a Hugging Face directory
    served = load_served(checkpoint, cfg.serve)
    # The workers normalized as the ImageNet weights want; the checkpoint's config carries it to serving.
    assert (served.cfg.data.mean, served.cfg.data.std) == ((EFFICIENTNET_MEAN,), (EFFICIENTNET_STD,))

    datasets, _ = build_datasets(cfg, log=lambda *_: None)
    y, probs = predict_dataset(served.checkpoint, datasets["test"])
    assert (probs.argmax(1) == y).mean() == pytest.approx(report["accuracy"])
    rows = datasets["test"].take_all()  # the same rows, in order: uint8 pixel arrays, as a client sends them
    assert [r["y"] for r in rows] == y.tolist()
    answers = run_batch(served, [[r["image"]] for r in rows[:16]])
    assert all(a.error is None for a in answers)
    np.testing.assert_allclose(np.concatenate([a.probs for a in answers]), probs[:16], atol=1e-5)
