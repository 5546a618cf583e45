"""Bad configs in every section of the config, each refused with an error that names the dotted
field (unit tier, part of the ``faults`` suite). tests/test_config.py checks the message styles
(allowed values, every error at once, YAML and override syntax); this sweep checks that no field
of any section escapes: every leaf field given a value of the wrong type is refused by its name,
and one semantic error per section is refused by its name too. Through the CLI too: exit code 2
and the field on stderr.
"""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
from pydantic import BaseModel

from rayfine.config import Config, ConfigError, load_config

pytestmark = pytest.mark.faults

PRESET = "resnet18_digits_tiny"


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every settable field of the config tree, dotted (sections recursed into)."""
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        inner = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        section = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else (inner[0] if inner else None)
        if section is not None:
            out += _leaf_fields(section, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


LEAVES = _leaf_fields(Config)
# A value no field accepts: a mapping where every leaf wants a number, string, list or flag.
# (dict-typed fields take mappings: give those a list instead.)
DICT_FIELDS = {"model.config_overrides", "tune.search_space", "train.class_weights"}


def _errors(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(PRESET, overrides)
    return info.value.errors


def test_the_sweep_sees_every_section():
    sections = {leaf.split(".")[0] for leaf in LEAVES if "." in leaf}
    assert sections == {"data", "model", "train", "scaling", "storage", "tracking", "tune", "serve"}
    assert {"name", "seed", "tracking.mlflow.tracking_uri", "serve.api_key_file"} <= set(LEAVES)
    assert len(LEAVES) > 90


@pytest.mark.parametrize("field", LEAVES)
def test_a_wrong_type_in_any_field_is_refused_by_its_name(field):
    value = "[1, 2]" if field in DICT_FIELDS else "{bad: value}"
    extra = ["tracking.mlflow={}"] if field.startswith("tracking.mlflow.") else []  # the section must exist
    errors = _errors([*extra, f"{field}={value}"])
    assert any(e.startswith((f"{field}:", f"{field}.")) for e in errors), (field, errors)


# One rule (not a type) per section, by its dotted name.
SEMANTIC = [
    (["name=../escape"], "name:"),
    (["seed=1.5"], "seed:"),
    (["data.val_fraction=0.7", "data.test_fraction=0.5"], "data.val_fraction:"),
    (["data.color_mode=CMYK"], "data.color_mode:"),
    (["model.stem=tiny"], "model.stem:"),
    (["train.lr=0"], "train.lr:"),
    (["train.metric=accuracy"], "train.metric:"),
    (["scaling.num_workers=0"], "scaling.num_workers:"),
    (["scaling.cpus_per_worker=-1"], "scaling.cpus_per_worker:"),
    (["storage.runs_dir=[a]"], "storage.runs_dir:"),
    (["tracking.mlflow.experiment=[x]"], "tracking.mlflow.experiment:"),
    (["tracking.mlflow.no_such=1"], "tracking.mlflow.no_such:"),
    (["tune.scheduler=hyperband"], "tune.scheduler:"),
    (["tune.num_samples=0"], "tune.num_samples:"),
    (["tune.search_space.train.nope={uniform: [0, 1]}"], "tune.search_space"),
    (["serve.port=70000"], "serve.port:"),
    (["serve.max_items=64"], "serve.max_items:"),
    (["serve.route_prefix=no-slash"], "serve.route_prefix:"),
]


@pytest.mark.parametrize("overrides,prefix", SEMANTIC, ids=[s[1].rstrip(":") for s in SEMANTIC])
def test_a_broken_rule_in_any_section_is_refused_by_its_name(overrides, prefix):
    try:
        errors = _errors(overrides)
    except pytest.fail.Exception:
        # Search-space keys are checked where a search starts (`rayfine tune`), not at load.
        from rayfine.config import check_search

        errors = check_search(load_config(PRESET, overrides))
    assert any(e.startswith(prefix) for e in errors), (overrides, errors)


def test_the_cli_names_the_field_and_exits_2():
    result = subprocess.run([sys.executable, "-m", "rayfine.cli", "validate", PRESET, "--set", "serve.port=0",
                             "--set", "storage.storage_path={x: 1}", "--set", "tune.grace_period=0"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    for field in ("serve.port:", "storage.storage_path:", "tune.grace_period:"):
        assert field in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# What the commands refuse before Ray starts (train.driver.preflight, tune.search.preflight): the
# run directory is left as it was and no embedded Ray is started for a config that cannot run.

def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "rayfine.cli", *args], capture_output=True, text=True,
                          timeout=120, check=False, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("source,expected", [
    ("no/such/folder", "data.source: no/such/folder does not exist (from "),
    ("file:///no/such/folder", "data.source: /no/such/folder does not exist;"),  # a file URI is its path
    ("builtin:mnist", "data.source: unknown builtin image dataset builtin:mnist; allowed: builtin:digits, builtin:mnist5k"),
])
def test_a_missing_source_is_refused_by_its_name(tmp_path, source, expected):
    from rayfine.data.sources import check_source

    with pytest.raises(ConfigError) as info:
        check_source(load_config(PRESET, [f"data.source={source}"]).data)
    assert info.value.errors[0].startswith(expected), info.value.errors


def test_a_source_in_a_format_of_another_kind_is_refused_by_data_format(tmp_path):
    from rayfine.data.sources import check_source

    (tmp_path / "texts.csv").write_text("text,label\nhello,a\n")
    with pytest.raises(ConfigError) as info:
        check_source(load_config(PRESET, [f"data.source={tmp_path / 'texts.csv'}"]).data)
    assert info.value.errors[0].startswith("data.format: cannot read") and "image_folder, parquet" in info.value.errors[0]


@pytest.mark.parametrize("command", ["train", "tune", "run"])
def test_every_command_refuses_a_missing_source_before_ray_starts(tmp_path, command):
    result = _cli(command, PRESET, "--runs-dir", str(tmp_path / "runs"), "--set", "data.source=missing_folder",
                  cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"  - data.source: missing_folder does not exist (from {tmp_path})" in result.stderr
    assert "[ray]" not in result.stdout and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # no empty run directory left behind


@pytest.mark.parametrize("command", ["train", "tune"])
def test_a_storage_path_that_cannot_be_created_is_refused_before_ray_starts(tmp_path, command):
    """Ray Train's controller first writes the storage after the data are read; a path under a file
    failed there with a bare NotADirectoryError naming no field."""
    (tmp_path / "afile").write_text("x")
    result = _cli(command, PRESET, "--runs-dir", str(tmp_path / "runs"), "--set",
                  f"storage.storage_path={tmp_path / 'afile' / 'ray'}")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"  - storage.storage_path: {tmp_path / 'afile' / 'ray'}/" in result.stderr
    assert f"cannot be created: {tmp_path / 'afile'} is not a directory" in result.stderr
    assert "[ray]" not in result.stdout and not (tmp_path / "runs").exists()


def test_a_search_space_value_no_worker_could_build_is_refused_before_ray_starts(tmp_path):
    """check_model ran on the search's base config only: a model.name or model.weights value of the
    search space failed every worker of its trials, after Ray started, train.max_failures times over."""
    from rayfine.tune.search import preflight

    base = [f"storage.runs_dir={tmp_path}"]
    with pytest.raises(ConfigError) as info:
        preflight(load_config(PRESET, [*base, "tune.search_space.model.name={choice: [resnet18, resnet19]}"]))
    assert info.value.errors[0].startswith("tune.search_space.model.name: the value 'resnet19': model.name: cannot "
                                           "load 'resnet19' (did you mean resnet18?)"), info.value.errors
    with pytest.raises(ConfigError) as info:
        preflight(load_config(PRESET, [*base, "model.name=resnet18",
                                       "tune.search_space.model.weights={choice: [BOGUS]}"]))
    assert info.value.errors[0].startswith("tune.search_space.model.weights: the value 'BOGUS': model.weights: "
                                           "'BOGUS' is not a weights name of resnet18"), info.value.errors
    preflight(load_config(PRESET, [*base, "tune.search_space.model.name={choice: [resnet18, resnet34]}"]))


def test_run_refuses_an_api_key_file_it_cannot_read_before_its_search(tmp_path):
    """The replicas read serve.api_key_file at the deploy; one that cannot be read failed it after the
    whole search and evaluation (the app DEPLOY_FAILED)."""
    result = _cli("run", PRESET, "--runs-dir", str(tmp_path / "runs"), "--set",
                  f"serve.api_key_file={tmp_path / 'no-key'}")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"  - serve.api_key_file {tmp_path / 'no-key'}: No such file or directory; `rayfine run` serves" in result.stderr
    assert "[ray]" not in result.stdout and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["train", "tune"])
def test_another_config_under_a_runs_name_is_refused_before_ray_starts(tmp_path, command):
    """A run directory as `rayfine train` leaves it (config.yaml, train/metrics.jsonl) under the
    preset's name; the same name with another weight decay must not continue it (train.weight_decay:
    a field the preset's search does not draw)."""
    runs = tmp_path / "runs"
    earlier = load_config(PRESET, [f"storage.runs_dir={runs}", "train.weight_decay=0.01"])
    run_dir = earlier.run_dir()
    (run_dir / "train").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(earlier.to_yaml())
    (run_dir / "train" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (run_dir / "train" / "checkpoint").mkdir()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    result = _cli(command, PRESET, "--runs-dir", str(runs), "--set", "train.weight_decay=0.02")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"  - {run_dir} holds a run of a different config (changed: train.weight_decay)" in result.stderr
    # How to go on from its model (more epochs, another learning rate), in a run of another name.
    weights = run_dir / "train" / "checkpoint" / "model.safetensors"
    assert f"to train on from its model in a new run: --set name=... --set model.weights={weights}" in result.stderr
    assert "[ray]" not in result.stdout
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
