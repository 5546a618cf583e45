"""Config loading, overrides and error messages (unit tier)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from pydantic import ValidationError

from rayfine.cli import main
from rayfine.config import ConfigError, load_config, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_validates(name):
    cfg = load_config(name)
    assert cfg.name
    # The resolved config round-trips through YAML unchanged.
    assert load_config_from_text(cfg.to_yaml()) == cfg


def load_config_from_text(text: str):
    from rayfine.config import validate

    return validate(yaml.safe_load(text))


def test_presets_include_the_documented_ones():
    assert {"resnet18_digits", "resnet18_digits_tiny", "resnet18_mnist5k"} <= set(preset_names())


def test_dotted_overrides_parse_yaml_scalars(tmp_path):
    cfg = load_config(
        "resnet18_digits",
        ["train.lr=3e-4", "train.batch_size=16", "scaling.num_workers=1", "data.labels=[a, b]", "name=other"],
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.batch_size == 16
    assert cfg.scaling.num_workers == 1
    assert cfg.data.labels == ("a", "b")
    assert cfg.name == "other"


def test_config_file_and_preset_agree(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(load_config("resnet18_digits").to_yaml())
    assert load_config(path) == load_config("resnet18_digits")


def test_config_is_frozen():
    cfg = load_config("resnet18_digits")
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.lr = 1.0  # type: ignore[misc]


def _errors(overrides, name="resnet18_digits"):
    with pytest.raises(ConfigError) as info:
        load_config(name, overrides)
    return info.value.errors


def test_unknown_field_names_the_field_and_the_allowed_ones():
    (err,) = _errors(["train.lrr=0.1"])
    assert err.startswith("train.lrr: unknown field")
    assert "lr" in err and "batch_size" in err and "epochs" in err


def test_unknown_section():
    (err,) = _errors(["trian.lr=0.1"])
    assert err.startswith("trian: unknown field")
    assert "train" in err and "scaling" in err


def test_bad_choice_lists_the_allowed_values():
    (err,) = _errors(["train.optimizer=adam"])
    assert err.startswith("train.optimizer:")
    assert "'adamw'" in err and "'sgd'" in err and "'adam'" in err


def test_bad_model_name_lists_models():
    (err,) = _errors(["model.name=my model!"])
    assert err.startswith("model.name:") and "resnet18" in err and "minilm" in err and "hub id" in err


def test_model_must_fit_the_data_kind():
    (err,) = _errors(["data.kind=text", "data.source=builtin:rotten_tomatoes"])
    assert "resnet18 is an image model" in err
    (err,) = _errors(["model.name=minilm"])
    assert "minilm is a text model" in err
    (err,) = _errors(["model.pretrained=false"])
    assert "Hugging Face models only" in err


def test_every_error_is_reported_at_once():
    errors = _errors(["train.lr=-1", "train.epochs=0", "scaling.num_workers=zero"])
    fields = sorted(e.split(":")[0] for e in errors)
    assert fields == ["scaling.num_workers", "train.epochs", "train.lr"]
    assert any("greater than 0" in e and "-1" in e for e in errors)


def test_missing_required_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == ["data.source: required field is missing"]


def test_cross_field_checks():
    (err,) = _errors(["data.val_fraction=0.6", "data.test_fraction=0.5"])
    assert err.startswith("data:") and "below 1" in err
    (err,) = _errors(["data.mean=[0.5, 0.5]"])
    assert "mean needs 1 value" in err


def test_bad_name_and_bad_override_syntax():
    (err,) = _errors(["name=has space"])
    assert err.startswith("name:")
    (err,) = _errors(["train.lr"])
    assert "expected dotted.key=value" in err
    (err,) = _errors(["train.lr.x=1"])
    assert "'lr' is a value, not a section" in err


def test_unknown_preset_lists_presets():
    (err,) = _errors([], name="no_such_preset")
    assert "no config file or preset named 'no_such_preset'" in err and "resnet18_digits" in err


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid YAML" in info.value.errors[0]


def test_cli_validate_prints_resolved_config(capsys):
    assert main(["validate", "resnet18_digits_tiny", "--set", "train.epochs=5"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["train"]["epochs"] == 5 and out["data"]["source"] == "builtin:digits"


def test_cli_validate_errors_exit_2(capsys):
    assert main(["validate", "resnet18_digits", "--set", "train.optimizer=adam", "--set", "x.y=1"]) == 2
    err = capsys.readouterr().err
    assert "train.optimizer:" in err and "x: unknown field" in err


def test_cli_help_is_instant_and_imports_nothing_heavy():
    code = "import sys; from rayfine.cli import build_parser; build_parser(); " \
           "heavy = [m for m in ('torch', 'ray', 'transformers') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    result = subprocess.run([sys.executable, "-m", "rayfine.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "validate" in result.stdout


def test_readme_config_reference_is_current():
    """The README's table is generated from the field declarations; regenerate it when they change."""
    from pathlib import Path

    from rayfine.config import config_reference

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("<!-- config-reference:start -->\n")[1].split("\n<!-- config-reference:end -->")[0]
    assert section == config_reference()
