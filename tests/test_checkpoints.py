"""The checkpoint format: safetensors round trips, refusal of broken or foreign files (unit)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from rayfine import checkpoints
from rayfine.config import load_config
from rayfine.errors import CheckpointError
from rayfine.models import build_model
from rayfine.train import make_optimizer, make_scheduler

LABELS = [str(i) for i in range(10)]


@pytest.fixture
def cfg():
    return load_config("resnet18_digits_tiny")


@pytest.fixture
def saved(tmp_path, cfg):
    torch.manual_seed(0)
    model = build_model(cfg, LABELS)
    directory = checkpoints.save_checkpoint(tmp_path / "ckpt", model, cfg, LABELS, {"epoch": 3, "val_accuracy": 0.5})
    return model.eval(), directory


def test_round_trip_gives_the_same_predictions(saved, cfg):
    model, directory = saved
    loaded = checkpoints.load_checkpoint(directory)
    assert loaded.cfg == cfg and loaded.labels == LABELS and loaded.metrics["epoch"] == 3
    x = torch.randn(4, 1, cfg.data.image_size, cfg.data.image_size)
    with torch.inference_mode():
        expected = torch.softmax(model(pixel_values=x), dim=-1)
    assert torch.allclose(loaded.predict_proba({"pixel_values": x}), expected, atol=1e-6)
    assert sorted(p.name for p in directory.iterdir()) == sorted(checkpoints.INFERENCE_FILES)


def test_the_documented_preprocessor_recipe_works_on_any_device_and_refuses_no_items(saved):
    """``ckpt.predict_proba(Preprocessor(ckpt.cfg, ckpt.path)(items))`` (the Preprocessor's docstring)
    with the model on another device than the CPU tensors a Preprocessor gives ("meta" stands in for
    a GPU here): the inputs follow the model, where the forward pass failed on mixed devices. No
    items is an InputError, where it was numpy's "need at least one array to stack"."""
    from rayfine.data import Preprocessor
    from rayfine.errors import InputError

    _, directory = saved
    ckpt = checkpoints.load_checkpoint(directory, device="meta")
    pre = Preprocessor(ckpt.cfg, str(ckpt.path))
    image = np.zeros((8, 8), dtype=np.uint8)
    assert pre([image])["pixel_values"].device.type == "cpu"
    probs = ckpt.predict_proba(pre([image, image]))
    assert probs.device.type == "meta" and probs.shape == (2, len(LABELS))
    with pytest.raises(InputError, match="no items: give at least one image"):
        pre([])


def test_train_state_round_trip(tmp_path, cfg):
    torch.manual_seed(0)
    model = build_model(cfg, LABELS)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps=20)
    for _ in range(3):
        model(pixel_values=torch.randn(8, 1, 8, 8)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    checkpoints.save_train_state(tmp_path, optimizer, scheduler, epoch=2)

    fresh_opt = make_optimizer(model, cfg)
    fresh_sched = make_scheduler(fresh_opt, cfg, total_steps=20)
    assert checkpoints.load_train_state(tmp_path, fresh_opt, fresh_sched) == 2
    assert fresh_sched.last_epoch == scheduler.last_epoch
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    for p in model.parameters():
        a, b = optimizer.state[p], fresh_opt.state[p]
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert float(a["step"]) == float(b["step"])


def test_truncated_weights_are_refused(saved):
    _, directory = saved
    path = directory / checkpoints.MODEL_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        checkpoints.load_checkpoint(directory)


class _Payload:
    """Unpickling this would create a file: proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_posing_as_checkpoint_is_refused_without_running_it(saved, tmp_path):
    _, directory = saved
    marker = tmp_path / "pwned"
    (directory / checkpoints.MODEL_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError):
        checkpoints.load_checkpoint(directory)
    assert not marker.exists()


def test_weights_of_another_model_are_refused(saved, cfg, tmp_path):
    _, directory = saved
    other = build_model(cfg, ["a", "b", "c"])  # a 3-way head does not fit 10 labels
    checkpoints.save_checkpoint(tmp_path / "other", other, cfg, LABELS, {})
    with pytest.raises(CheckpointError, match="does not fit"):
        checkpoints.load_checkpoint(tmp_path / "other")


def test_a_password_in_the_tracking_uri_is_masked_in_the_checkpoint(tmp_path):
    """A checkpoint travels (MLflow uploads it as an artifact, an export is served elsewhere): a
    database tracking_uri's password stays out of its config.yaml, and the checkpoint still loads."""
    cfg = load_config("resnet18_digits_tiny", ["tracking.mlflow.tracking_uri=postgresql://ml:S3CRET@db:5432/mlflow"])
    directory = checkpoints.save_checkpoint(tmp_path / "ckpt", build_model(cfg, LABELS), cfg, LABELS, {})
    text = (directory / checkpoints.CONFIG_FILE).read_text()
    assert "S3CRET" not in text and "postgresql://ml:***@db:5432/mlflow" in text
    assert checkpoints.load_checkpoint(directory).cfg.model == cfg.model


@pytest.mark.parametrize("missing", [checkpoints.CONFIG_FILE, checkpoints.MODEL_FILE, checkpoints.LABELS_FILE])
def test_missing_files_are_named(saved, missing):
    _, directory = saved
    (directory / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        checkpoints.load_checkpoint(directory)


def test_export_leaves_out_the_optimizer(saved, tmp_path, cfg):
    model, directory = saved
    optimizer = make_optimizer(model, cfg)
    checkpoints.save_train_state(directory, optimizer, make_scheduler(optimizer, cfg, 10), epoch=1)
    exported = checkpoints.export_checkpoint(directory, tmp_path / "export")
    assert sorted(p.name for p in exported.iterdir()) == sorted(checkpoints.INFERENCE_FILES)
    checkpoints.load_checkpoint(exported)


def test_export_gives_the_checkpoint_the_serve_settings_of_the_run_that_exports_it(saved, tmp_path, cfg):
    """A continued run may change serve.* (its best epoch trained before the change): `rayfine serve`
    deploys an exported checkpoint with the serve section of its config.yaml."""
    _, directory = saved
    changed = cfg.with_overrides(["serve.num_replicas=2", "serve.port=9001", "serve.max_batch_size=32"])
    exported = checkpoints.export_checkpoint(directory, tmp_path / "export", serve=changed.serve)
    assert checkpoints.read_config(exported) == changed
    assert checkpoints.read_config(directory) == cfg  # the epoch's own checkpoint is left as it was
    assert checkpoints.read_config(checkpoints.export_checkpoint(directory, tmp_path / "plain")) == cfg


@pytest.mark.parametrize("preset,overrides,labels", [
    ("minilm_rotten_tomatoes_tiny", [], ["negative", "positive"]),
    ("resnet18_digits", ["model.name=resnet", "model.pretrained=false", "data.image_size=16",
                         "model.config_overrides={embedding_size: 16, hidden_sizes: [16, 32], depths: [1, 1]}"], LABELS),
])
def test_a_hugging_face_checkpoints_config_json_is_what_save_pretrained_writes(tmp_path, preset, overrides, labels):
    import json

    cfg = load_config(preset, overrides)
    model = build_model(cfg, labels)
    ours = checkpoints.save_checkpoint(tmp_path / "ours", model, cfg, labels, {"epoch": 1})
    model.save_pretrained(str(tmp_path / "theirs"))
    config = json.loads((ours / "config.json").read_text())
    assert config == json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__] and type(model).__name__.endswith("Classification")


def test_labels_and_metrics_of_the_wrong_kind_are_refused(saved):
    import json

    _, directory = saved
    (directory / checkpoints.LABELS_FILE).write_text(json.dumps(["a"] * 10))
    with pytest.raises(CheckpointError, match="distinct label names"):
        checkpoints.load_checkpoint(directory)
    (directory / checkpoints.LABELS_FILE).write_text(json.dumps(LABELS))
    (directory / checkpoints.METRICS_FILE).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object of metrics"):
        checkpoints.load_checkpoint(directory)


HF_IMAGE = ["model.name=resnet", "model.pretrained=false", "data.image_size=16",
            "model.config_overrides={embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1]}"]


def test_a_hugging_face_checkpoint_whose_labels_disagree_with_its_config_json_is_refused(tmp_path):
    import json

    cfg = load_config("resnet18_digits", HF_IMAGE)
    directory = checkpoints.save_checkpoint(tmp_path / "ckpt", build_model(cfg, ["cat", "dog", "emu"]), cfg,
                                            ["cat", "dog", "emu"], {})
    assert checkpoints.load_checkpoint(directory).labels == ["cat", "dog", "emu"]
    for labels in (["cat", "dog"], ["x", "y", "z"]):  # fewer than the head's classes, or other names
        (directory / checkpoints.LABELS_FILE).write_text(json.dumps(labels))
        with pytest.raises(CheckpointError, match="config.json's id2label .* is not labels.json's"):
            checkpoints.load_checkpoint(directory)


@pytest.mark.parametrize("config_json", ["{not json", '{"model_type": "nosuchmodel"}', "[1, 2]"])
def test_a_hugging_face_checkpoint_with_a_broken_config_json_is_a_checkpoint_error(tmp_path, config_json):
    cfg = load_config("resnet18_digits", HF_IMAGE)
    directory = checkpoints.save_checkpoint(tmp_path / "ckpt", build_model(cfg, LABELS), cfg, LABELS, {})
    (directory / "config.json").write_text(config_json)
    with pytest.raises(CheckpointError, match="config.json: cannot build the model it describes"):
        checkpoints.load_checkpoint(directory)


def test_a_resumed_optimizers_state_is_on_the_device_of_the_model_it_steps(tmp_path, cfg):
    """Optimizer.load_state_dict puts each state tensor on its parameter's device at load time;
    the model must be on its device by then, or a run resumed on a GPU steps with CPU moments.
    The meta device stands in for CUDA here: a tensor left on the CPU stays visibly so."""
    from rayfine.train.worker import model_and_optimizer

    model, optimizer, scheduler, done = model_and_optimizer(cfg, LABELS, torch.device("cpu"), 10)
    assert done == 0
    model(pixel_values=torch.randn(4, 1, 8, 8)).sum().backward()
    optimizer.step()
    checkpoints.save_checkpoint(tmp_path / "ckpt", model, cfg, LABELS, {"epoch": 1})
    checkpoints.save_train_state(tmp_path / "ckpt", optimizer, scheduler, epoch=1)

    model, optimizer, _, done = model_and_optimizer(cfg, LABELS, torch.device("meta"), 10, str(tmp_path / "ckpt"))
    assert done == 1 and all(p.device.type == "meta" for p in model.parameters())
    moments = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    assert moments and all(v.device.type == "meta" for v in moments)


def _export_of(saved, tmp_path, epoch: int) -> tuple:
    model, _ = saved
    cfg = load_config("resnet18_digits_tiny")
    source = checkpoints.save_checkpoint(tmp_path / f"epoch_{epoch}", model, cfg, LABELS, {"epoch": epoch})
    return source, tmp_path / "run" / "checkpoint"


def test_export_replaces_an_earlier_export_whole_and_leaves_nothing_beside_it(saved, tmp_path):
    source, destination = _export_of(saved, tmp_path, 1)
    checkpoints.export_checkpoint(source, destination)
    (destination / "stale.txt").write_text("a file only the old export had")
    newer, _ = _export_of(saved, tmp_path, 2)
    assert checkpoints.export_checkpoint(newer, destination) == destination
    assert checkpoints.load_checkpoint(destination).metrics["epoch"] == 2
    assert sorted(p.name for p in destination.iterdir()) == sorted(checkpoints.INFERENCE_FILES)
    assert sorted(p.name for p in destination.parent.iterdir()) == ["checkpoint"]


def test_an_export_reaches_the_disk_before_its_name_does(saved, tmp_path, monkeypatch):
    """Every file of the new export and its folder are flushed to the disk before the renames that
    put it in place, and the renames before the old export is removed: a power loss cannot leave
    the name on empty files."""
    import shutil
    from pathlib import Path

    source, destination = _export_of(saved, tmp_path, 1)
    checkpoints.export_checkpoint(source, destination)
    newer, _ = _export_of(saved, tmp_path, 2)
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_rmtree = os.fsync, Path.rename, shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(Path, "rename", lambda self, target: (events.append(("rename", str(self))),
                                                               real_rename(self, target))[1])
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: (events.append(("rmtree", str(path))),
                                                                  real_rmtree(path, *a, **k))[1])
    checkpoints.export_checkpoint(newer, destination)
    staging = f"{destination}.tmp"
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert [events[i][1] for i in renames] == [str(destination), staging]
    flushed = {path for kind, path in events[:renames[0]] if kind == "fsync"}
    assert {f"{staging}/{name}" for name in checkpoints.INFERENCE_FILES} | {staging} <= flushed, events
    removed = events.index(("rmtree", f"{destination}.old"), renames[-1])
    assert ("fsync", str(destination.parent)) in events[renames[-1]:removed], events
    assert checkpoints.load_checkpoint(destination).metrics["epoch"] == 2


def test_an_export_that_dies_while_removing_the_old_one_leaves_a_whole_checkpoint(saved, tmp_path, monkeypatch):
    """The old export is removed only once the new one is in its place: a crash while it is removed
    leaves the new checkpoint, not none."""
    import shutil
    from pathlib import Path

    source, destination = _export_of(saved, tmp_path, 1)
    checkpoints.export_checkpoint(source, destination)
    newer, _ = _export_of(saved, tmp_path, 2)
    real_rmtree = shutil.rmtree

    def rmtree_then_crash(path, *args, **kwargs):  # dies once it has removed a checkpoint
        removes = Path(path).is_dir() and Path(path).name != "checkpoint.tmp"
        real_rmtree(path, *args, **kwargs)
        if removes:
            raise KeyboardInterrupt("the process dies here")

    monkeypatch.setattr(checkpoints.shutil, "rmtree", rmtree_then_crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.export_checkpoint(newer, destination)
    assert checkpoints.load_checkpoint(destination).metrics["epoch"] == 2

    # An export that died between its two renames left the old one aside: the next one puts it
    # back first, and then replaces it.
    monkeypatch.setattr(checkpoints.shutil, "rmtree", real_rmtree)
    destination.rename(destination.with_name("checkpoint.old"))
    assert checkpoints.export_checkpoint(source, destination) == destination
    assert checkpoints.load_checkpoint(destination).metrics["epoch"] == 1
    assert sorted(p.name for p in destination.parent.iterdir()) == ["checkpoint"]


def test_serve_if_better_compares_with_a_served_metric_that_is_not_a_number():
    """metrics.json writes a diverged value as null: a served model with a null val_loss is beaten by
    any finite one (before, `x < nan` never held and it was kept for ever); a new checkpoint without a
    finite value is refused, naming the metric."""
    from rayfine.serve.deploy import is_better

    new = {"checkpoint": "/new", "metric": "val_loss", "metric_mode": "min", "metrics": {"val_loss": 0.4}}
    better, reason = is_better(new, {"checkpoint": "/old", "metrics": {"val_loss": None}})
    assert better and "not a number" in reason
    assert is_better(new, {"checkpoint": "/old", "metrics": {"val_loss": 0.3}})[0] is False
    assert is_better(new, {"checkpoint": "/old", "metrics": {"val_loss": 0.5}})[0] is True
    with pytest.raises(CheckpointError, match="has no val_loss"):
        is_better(new, {"checkpoint": "/old", "metrics": {}})
    for value in (None, float("nan")):
        with pytest.raises(CheckpointError, match="no finite val_loss"):
            is_better({**new, "metrics": {"val_loss": value}}, {"checkpoint": "/old", "metrics": {"val_loss": 0.3}})


REMOTE_CODE_PROBE = r"""
import json, shutil, sys
from pathlib import Path

from rayfine import checkpoints
from rayfine.config import load_config
from rayfine.models import build_model, resolve_model_source, token_limits

root, marker = Path(sys.argv[1]), sys.argv[2]
evil = (f"open({marker!r}, 'a').write('ran\\n')\n"
        "from transformers import PretrainedConfig, PreTrainedTokenizerFast\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
auto_map = {"AutoConfig": "evil.EvilConfig", "AutoTokenizer": [None, "evil.EvilTokenizer"]}
results = {}

def attempt(what, load):
    try:
        load()
        results[what] = "loaded"
    except Exception as e:
        results[what] = f"{type(e).__name__}: {e}"

# A rayfine checkpoint whose config.json names code beside it (rayfine serve / evaluate load it).
cfg = load_config("resnet18_digits", json.loads(sys.argv[3]))
labels = [str(i) for i in range(10)]
ckpt = checkpoints.save_checkpoint(root / "ckpt", build_model(cfg, labels), cfg, labels, {})
(ckpt / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}))
(ckpt / "evil.py").write_text(evil)
attempt("checkpoint", lambda: checkpoints.load_checkpoint(ckpt))

# A model directory (model.name) whose config.json and tokenizer_config.json name code beside them.
model = root / "model"
shutil.copytree(resolve_model_source("minilm"), model)
(model / "evil.py").write_text(evil)
config = json.loads((model / "config.json").read_text())
(model / "config.json").write_text(json.dumps({**config, "model_type": "evil", "auto_map": auto_map}))
tokenizer = json.loads((model / "tokenizer_config.json").read_text())
tokenizer = {key: value for key, value in tokenizer.items() if key != "tokenizer_class"}  # the auto_map's alone
(model / "tokenizer_config.json").write_text(json.dumps({**tokenizer, "auto_map": auto_map}))
text_cfg = load_config("minilm_rotten_tomatoes_tiny", [f"model.name={model}"])
attempt("model", lambda: build_model(text_cfg, ["neg", "pos"]))
attempt("tokenizer", lambda: token_limits(str(model), False))
print("\nresults:", json.dumps(results))  # on a line of its own: a prompt ends without one
"""


def test_code_named_by_a_checkpoint_or_model_directory_never_runs(tmp_path):
    """transformers asks on stdin whether to run the code a config.json's auto_map names, when not
    told trust_remote_code=False: a user (or `yes |`) answering y ran it from a checkpoint."""
    import json
    import os
    import subprocess
    import sys

    marker = tmp_path / "ran"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", REMOTE_CODE_PROBE, str(tmp_path), str(marker), json.dumps(HF_IMAGE)],
                          input="y\n" * 10, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.rsplit("results:", 1)[1])
    assert not marker.exists(), results
    assert results["checkpoint"].startswith("CheckpointError") and "custom code" in results["checkpoint"], results
    assert results["model"].startswith("RayfineError") and "never runs code" in results["model"], results
    assert results["tokenizer"].startswith("ConfigError") and "custom code" in results["tokenizer"], results


def test_serving_names_the_weights_file_as_checkpoints_write_it():
    """rayfine.serve.model keeps its own copy of the name (it imports without torch)."""
    from rayfine.serve import model

    assert model.MODEL_FILE == checkpoints.MODEL_FILE
