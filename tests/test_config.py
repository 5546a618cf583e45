"""Config loading, overrides and error messages (unit tier)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from rayfine.cli import main
from rayfine.config import ConfigError, ServeConfig, TrainConfig, load_config, loading, preset_names


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
    assert err.startswith("data.val_fraction: ") and "below 1" in err
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
    assert "no config file or preset named 'no_such_preset'; presets:" in err and "resnet18_digits" in err
    (err,) = _errors([], name="resnet18_digit")
    assert "named 'resnet18_digit' (did you mean 'resnet18_digits'?); presets:" in err


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


def test_cli_validate_checks_the_data_source_and_model_as_train_does(capsys, tmp_path, monkeypatch):
    """`rayfine validate` passed a missing data folder, a column the file lacks and an unknown model
    that `rayfine train` refused before Ray started; --schema-only checks the fields alone (a config
    whose data only a cluster has)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.csv").write_text("review,stars\na fine film,5\n")
    bad = ["--set", "data.source=nope", "--set", "model.name=resnet19"]
    assert main(["validate", "resnet18_digits_tiny", *bad]) == 2
    err = capsys.readouterr().err
    assert "data.source: nope does not exist" in err and "model.name: cannot load 'resnet19'" in err, err
    assert main(["validate", "resnet18_digits_tiny", *bad, "--schema-only"]) == 0
    capsys.readouterr()
    text = ["--set", "data.source=r.csv", "--set", "data.text_column=review"]
    assert main(["validate", "minilm_rotten_tomatoes_tiny", *text]) == 2
    assert "data.label_column: no column 'label' in" in capsys.readouterr().err
    assert main(["validate", "minilm_rotten_tomatoes_tiny", *text, "--set", "data.label_column=stars"]) == 0


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


def test_seeds_are_refused_outside_what_numpy_and_tune_take():
    errors = _errors(["seed=-1", "data.split_seed=-5", f"tune.seed={2**32}"])
    assert sorted(e.split(":")[0] for e in errors) == ["data.split_seed", "seed", "tune.seed"]
    assert any("4294967295" in e for e in errors)
    cfg = load_config("resnet18_digits", [f"seed={2**32 - 1}", f"tune.seed={2**32 - 1}", "data.split_seed=0"])
    assert cfg.seed == cfg.tune.seed == 2**32 - 1


def test_a_replica_reserves_at_most_one_gpu_the_one_it_infers_on():
    """A replica infers on one CUDA device; Ray takes more than 1 GPU only as a whole number, and a
    replica of 2 would hold a GPU it never uses. A fraction shares a GPU with other replicas."""
    (err,) = _errors(["serve.gpus_per_replica=1.5"])
    assert err == "serve.gpus_per_replica: Input should be less than or equal to 1 (got 1.5)"
    assert load_config("resnet18_digits", ["serve.gpus_per_replica=0.25"]).serve.gpus_per_replica == 0.25


def test_a_key_given_twice_is_an_error_not_the_last_one_winning(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: x\ndata: {source: builtin:digits}\ntrain:\n  lr: 0.1\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [f"{path}: line 5: key 'train' is given twice (first on line 3); give it once"]
    (err,) = _errors(["train={lr: 0.1, lr: 0.2}"])
    assert "key 'lr' is given twice" in err
    # A merge key's values may still be overridden after it: that is what `<<` is for.
    path.write_text("base: &base {source: builtin:digits, image_size: 8}\n")
    raw = yaml.load(path.read_text() + "data:\n  <<: *base\n  image_size: 12\nname: x\n", Loader=loading._Loader)
    assert raw["data"] == {"source": "builtin:digits", "image_size": 12}


def test_numbers_read_the_same_from_a_file_and_an_override(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: exp\ndata: {kind: text, source: builtin:rotten_tomatoes}\nmodel:\n  name: minilm\n"
                    "  config_overrides: {layer_norm_eps: 1e-5, hidden_dropout_prob: 2E-1}\n"
                    "tune:\n  search_space:\n    train.lr: {loguniform: [1e-5, 1e-3]}\n")
    cfg = load_config(path)
    assert cfg.model.config_overrides == {"layer_norm_eps": 1e-5, "hidden_dropout_prob": 0.2}
    assert cfg.tune.search_space == {"train.lr": {"loguniform": [1e-5, 1e-3]}}
    assert load_config(path, ["model.config_overrides.layer_norm_eps=1e-5"]) == cfg


@pytest.mark.parametrize(("override", "reason"), [
    # A multi-label problem_type made transformers' pipelines answer the single-label model with sigmoid scores;
    # id2label (or label2id, num_labels) made the export fail after the whole run, against labels.json.
    ("problem_type: multi_label_classification", "rayfine sets it to single_label_classification"),
    ("id2label: {0: negative, 1: positive}", "rayfine sets it from the data's labels (data.labels names them"),
    ("label2id: {negative: 0, positive: 1}", "rayfine sets it from the data's labels"),
    ("num_labels: 3", "rayfine sets it from the data's labels"),
    # Copied from Hugging Face examples: it reached from_pretrained beside rayfine's own False (a TypeError
    # in every training worker, after Ray had started).
    ("trust_remote_code: true", "rayfine never runs code that comes with a model's files"),
])
def test_config_overrides_may_not_set_the_labels(override, reason):
    key = override.split(":")[0]
    (err,) = _errors([f"model.config_overrides={{hidden_dropout_prob: 0.2, {override}}}"], "minilm_rotten_tomatoes")
    assert err.startswith(f"model.config_overrides.{key}: {reason}") and err.endswith("; remove it"), err


def test_config_overrides_may_not_size_an_image_model_other_than_its_data():
    image = ["model.name=resnet", "model.pretrained=false", "model.config_overrides.depths=[1, 1]"]
    (err,) = _errors([*image, "model.config_overrides.num_channels=3", "data.color_mode=L"])
    assert err == ("model.config_overrides.num_channels: the model's input channels follow data.color_mode "
                   "(L: 1, RGB: 3); remove it")
    (err,) = _errors([*image, "model.config_overrides.image_size=64"])
    assert err.startswith("model.config_overrides.image_size: the model's image size follows data.image_size")
    # Fields rayfine leaves to the model are still the user's, and a text model has no image size of rayfine's.
    assert load_config("resnet18_digits", image).model.config_overrides == {"depths": [1, 1]}
    assert load_config("minilm_rotten_tomatoes", ["model.config_overrides.image_size=64"]).model.config_overrides


def test_text_fields_keep_numbers_as_written(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: 2024.10\ndata:\n  source: builtin:digits\n  labels: [01, 1.50, 1e5, cat]\n"
                    "train: {class_weights: {01: 2, 1.50: 1}}\n")
    cfg = load_config(path)
    assert cfg.name == "2024.10"
    assert cfg.data.labels == ("01", "1.50", "1e5", "cat")
    assert cfg.train.class_weights == {"01": 2.0, "1.50": 1.0}
    assert load_config("resnet18_digits", ["name=010", "data.labels=[007, 8]"]).name == "010"
    assert load_config("resnet18_digits", ["data.labels=[007, 8]"]).data.labels == ("007", "8")
    # Numbers stay numbers elsewhere, and the resolved config is plain YAML.
    # Leading zeros are decimal, as YAML 1.2 reads them (YAML 1.1, yaml.safe_load, reads 010 as octal 8).
    assert load_config(path, ["train.epochs=010", "seed=0042"]).train.epochs == 10
    assert load_config(path, ["seed=0042"]).seed == 42
    assert yaml.safe_load(cfg.to_yaml())["name"] == "2024.10"


def test_yaml_1_1_dates_base_60_numbers_and_numeric_keys_read_as_written(tmp_path):
    """What YAML 1.1 (yaml.safe_load) turns into other things reads as YAML 1.2 reads it, alike from
    a file and from --set: a date is text, 1:30 is not the number 90, keys 1, 01 and 1.0 are three."""
    path = tmp_path / "exp.yaml"
    path.write_text("name: 2024-06-01\ndata:\n  source: builtin:digits\n  labels: ['1', '01', '1.0', 0000-00-00]\n"
                    "train: {class_weights: {1: 2.0, 01: 3.0, 1.0: 4.0, 0000-00-00: 5}}\n")
    cfg = load_config(path)
    assert cfg.name == "2024-06-01" == load_config("resnet18_digits", ["name=2024-06-01"]).name
    assert cfg.data.labels == ("1", "01", "1.0", "0000-00-00")
    assert cfg.train.class_weights == {"1": 2.0, "01": 3.0, "1.0": 4.0, "0000-00-00": 5.0}
    with pytest.raises(ConfigError, match=r"train.epochs: Input should be a valid integer.*\(got '1:30'\)"):
        load_config(path, ["train.epochs=1:30"])
    path.write_text("name: x\ndata: {source: builtin:digits}\nbase: &b {epochs: 3, lr: 0.01}\n")
    merged = loading._read_raw(path)  # a merge key's entries come first, the keys after it win
    assert loading._plain(yaml.load("t:\n  <<: {epochs: 3, lr: 0.01}\n  epochs: 5\n", Loader=loading._Loader)) == {
        "t": {"epochs": 5, "lr": 0.01}} and merged["base"] == {"epochs": 3, "lr": 0.01}


def test_class_weights_are_positive():
    """A zero or negative weight makes a batch of those classes' loss NaN (or rewards errors)."""
    with pytest.raises(ConfigError) as e:
        load_config("resnet18_digits", ["train.class_weights={'0': -1, '1': 0, '2': 0.5}"])
    assert "train.class_weights.0: Input should be greater than 0 (got -1)" in e.value.errors
    assert "train.class_weights.1: Input should be greater than 0 (got 0)" in e.value.errors
    assert not any(".2:" in err for err in e.value.errors)


def test_runs_dir_flag_is_a_path_not_yaml():
    from rayfine.cli import _load, build_parser

    for path in ("/tmp/my runs #2", "/tmp/runs: old", "*runs", "~/runs 'a' \"b\" é"):
        args = build_parser().parse_args(["train", "resnet18_digits", "--runs-dir", path])
        assert _load(args).storage.runs_dir == path


def test_a_config_file_that_is_not_utf8_text_exits_2(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: café\ndata: {source: builtin:digits}\n".encode("latin-1"))
    assert main(["validate", str(path)]) == 2
    assert f"{path}: not a UTF-8 text file (byte 9 is 0xe9)" in capsys.readouterr().err


def test_booleans_and_infinities_are_not_numbers():
    errors = _errors(["train.epochs=true", "scaling.num_workers=yes", "train.lr=on", "scaling.cpus_per_worker=.inf",
                      "train.weight_decay=.nan", "tune.reduction_factor=.inf"])
    assert sorted(e.split(":")[0] for e in errors) == [
        "scaling.cpus_per_worker", "scaling.num_workers", "train.epochs", "train.lr", "train.weight_decay",
        "tune.reduction_factor"]
    assert "train.epochs: must be a number, not true/false (got True)" in errors


def test_errors_name_the_allowed_fields_under_optional_sections_and_unions():
    (err,) = _errors(["tracking.mlflow.tracking_uri=x", "tracking.mlflow.experimnt=y"])
    assert err == "tracking.mlflow.experimnt: unknown field; allowed here: tracking_uri, experiment, artifact_location"
    (err,) = _errors(["train.class_weights=balance"])
    assert err.startswith("train.class_weights: ") and "'balanced'" in err and "a mapping" in err
    assert "literal" not in err and "dict[" not in err
    (err,) = _errors(["train.lr={a: 1}"])
    assert err == "train.lr: Input should be a valid number (got {'a': 1})"


def test_a_section_left_empty_takes_its_defaults(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: x\ndata:\n  source: builtin:digits\ntrain:\n  # lr: 0.1\nserve:\n")
    cfg = load_config(path)
    assert cfg.train == TrainConfig() and cfg.serve == ServeConfig()
    path.write_text("name: x\ndata:\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == ["data.source: required field is missing"]


def test_experiments_sharing_a_storage_path_keep_their_ray_state_apart(tmp_path):
    """Ray Train resumes from whatever checkpoints it finds under its storage: two experiments
    given one storage.storage_path (a cluster's shared bucket) must not meet there."""
    for storage in (str(tmp_path / "shared"), "s3://bucket/rayfine/"):
        paths = {load_config("resnet18_digits_tiny", [f"storage.storage_path={storage}", f"name={n}"]).resolved_storage_path()
                 for n in ("one", "two")}
        assert paths == {f"{storage.rstrip('/')}/one/ray", f"{storage.rstrip('/')}/two/ray"}
    unset = load_config("resnet18_digits_tiny", [f"storage.runs_dir={tmp_path}", "name=one"])
    assert unset.resolved_storage_path() == str(tmp_path / "one" / "ray")
    # The runs_dir itself as storage path: the default place, not the run directory's own folders.
    same = unset.with_overrides([f"storage.storage_path={tmp_path}"])
    assert same.resolved_storage_path() == unset.resolved_storage_path()


def test_a_text_field_set_on_the_command_line_takes_the_text_as_given():
    """`--set` on a text field is not YAML: a ` #` there is no comment, `*` no alias, `a: b` no
    mapping. A quoted value is unquoted as YAML does, and null still unsets an optional field."""
    for text in ("/data/my photos #2", "*.csv", "/data/a: b", "a, [b]", "  ~/x  ", "no", "2024.10"):
        # (~ is then the home folder, as in every path field)
        assert load_config("resnet18_digits", [f"data.source={text}"]).data.source == os.path.expanduser(text.strip())
    given = {'"/data/my photos #2"': "/data/my photos #2", "'it''s'": "it's", '"tab\\there"': "tab\there"}
    for text, source in given.items():
        assert load_config("resnet18_digits", [f"data.source={text}"]).data.source == source
    cfg = load_config("resnet18_digits", ["storage.storage_path=/tmp/a", "storage.storage_path=null",
                                              "serve.api_key_file=/k/a #1"])
    assert cfg.storage.storage_path is None and cfg.serve.api_key_file == "/k/a #1"
    (err,) = _errors(['data.source="a": b'])
    assert err.startswith("override 'data.source=\"a\": b': data.source: a value that starts with a quote")


def test_a_comment_in_a_yaml_value_on_the_command_line_is_refused_not_dropped():
    errors = _errors(["train.lr=0.1 #x", "data.labels=[a, b] # c", "model.config_overrides.a=b #c", 'data.source="a" #c'])
    assert [e.split(": ")[1] for e in errors] == ["train.lr", "data.labels", "model.config_overrides.a", "data.source"]
    assert all("starts a YAML comment" in e and "quote the value" in e for e in errors)
    # A '#' inside a word or a quoted string is no comment.
    cfg = load_config("minilm_rotten_tomatoes", ["data.labels=[a#1, 'b #2']", 'model.config_overrides.x="y #1"'])
    assert cfg.data.labels == ("a#1", "b #2") and cfg.model.config_overrides == {"x": "y #1"}


def test_yaml_booleans_in_text_fields_keep_their_text(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: x\ndata:\n  source: builtin:digits\n  labels: [no, yes, On]\n  augment: yes\n"
                    "train: {class_weights: {no: 2.0, yes: 1.0, On: 1}}\nscaling: {use_gpu: no}\n")
    cfg = load_config(path)
    assert cfg.data.labels == ("no", "yes", "On") and cfg.train.class_weights == {"no": 2.0, "yes": 1.0, "On": 1.0}
    assert cfg.data.augment is True and cfg.scaling.use_gpu is False  # booleans where the field is one
    cfg = load_config(path, ["data.labels=[yes, no]", "name=no", "train.class_weights={yes: 3, no: 1}",
                             "data.augment=off"])
    assert cfg.data.labels == ("yes", "no") and cfg.name == "no" and cfg.data.augment is False
    assert cfg.train.class_weights == {"yes": 3.0, "no": 1.0}
    assert yaml.safe_load(cfg.to_yaml())["data"]["labels"] == ["yes", "no"]  # saved quoted


def test_a_config_from_standard_input_or_a_pipe(tmp_path, monkeypatch):
    """`rayfine validate -`, `... /dev/stdin` and `... <(cat cfg.yaml)`: any path but a directory.
    A relative path in it is kept as written, as from a file (read from the working directory)."""
    import io
    import os
    import threading

    text = "name: piped\ndata: {kind: text, source: data/reviews.csv}\nmodel: {name: minilm}\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    cfg = load_config("-")
    assert cfg.name == "piped" and cfg.data.source == "data/reviews.csv"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=(text,))
    writer.start()
    assert load_config(fifo) == cfg
    writer.join()
    code = "import sys; from rayfine.cli import main; sys.exit(main(sys.argv[1:]))"
    for name in ("-", "/dev/stdin"):
        result = subprocess.run([sys.executable, "-c", code, "validate", name, "--schema-only"], input=text,
                                capture_output=True, text=True, check=False)  # its data.source is not here
        assert result.returncode == 0, result.stderr
        assert yaml.safe_load(result.stdout)["data"]["source"] == "data/reviews.csv"
    assert _errors([], name=str(tmp_path)) == [f"{tmp_path}: a directory; give a config file or a preset name"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"name: [x\n")))
    assert _errors([], name="-")[0].startswith("standard input: not valid YAML")


def test_an_empty_config_file_says_it_is_empty(tmp_path):
    path = tmp_path / "empty.yaml"
    for text in ("", "# name: x\n"):
        path.write_text(text)
        assert _errors([], name=str(path)) == [
            f"{path}: the config is empty (or only comments); give at least name and data.source"]


def test_label_names_in_a_config_are_composed_as_the_datas_are():
    """A label typed or pasted decomposed (NFD, as macOS writes folder names) is the composed (NFC)
    name rayfine reads from the data, in data.labels and in train.class_weights' keys alike."""
    import unicodedata

    nfd, nfc = unicodedata.normalize("NFD", "café"), unicodedata.normalize("NFC", "café")
    assert nfd != nfc
    cfg = load_config("resnet18_digits_tiny", [f"data.labels=[{nfd}, thé]", f"train.class_weights={{{nfd}: 2.0}}"])
    assert cfg.data.labels[0] == nfc and list(cfg.train.class_weights) == [nfc]


def test_a_preset_is_read_even_where_a_folder_has_its_name(tmp_path, monkeypatch):
    """`rayfine train resnet18_digits_tiny --runs-dir .` makes ./resnet18_digits_tiny/: the same
    command again (to continue the run) still names the preset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18_digits_tiny").mkdir()
    assert load_config("resnet18_digits_tiny").name == "resnet18_digits_tiny"
    (tmp_path / "not_a_preset").mkdir()
    with pytest.raises(ConfigError, match="not_a_preset: a directory; give a config file or a preset name"):
        load_config("not_a_preset")


def test_url_passwords_are_masked_and_a_file_store_uri_still_validates():
    """One masking for what rayfine shows of tracking.mlflow.tracking_uri (warnings, MLflow params,
    tracking.json, report.html); a file store URI is refused where the driver opens MLflow, not
    here: the workers validate the config again, in environments of their own."""
    from rayfine.config.sections import redact_url_passwords

    assert redact_url_passwords("postgresql://mlflow:S3cret@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert redact_url_passwords("failed at http://u:p%40ss@host:5000/api x") == "failed at http://u:***@host:5000/api x"
    assert redact_url_passwords("postgresql://:S3cret@db/mlflow") == "postgresql://:***@db/mlflow"  # no user name
    for kept in ("http://mlflow.internal:5000/x@y", "sqlite:////abs/mlflow.db", "s3://bucket/a:b"):
        assert redact_url_passwords(kept) == kept
    assert load_config("resnet18_digits_tiny", ["tracking.mlflow.tracking_uri=./mlruns"]).tracking.mlflow


def test_a_std_of_zero_is_refused():
    """Pixels are divided by data.std: a 0 made a channel inf/NaN and every epoch a NaN loss."""
    (error,) = _errors(["data.color_mode=RGB", "data.std=[0.229, 0.224, 0.0]"])
    assert "std values must be above 0, got [0.229, 0.224, 0.0]" in error, error
    load_config("resnet18_digits", ["data.color_mode=RGB", "data.std=[0.229, 0.224, 0.225]"])


def test_weights_for_a_torchvision_model_rayfine_does_not_build_say_which_it_builds():
    """resnet101 with torchvision's weights was refused as if it were not a torchvision model."""
    with pytest.raises(ConfigError) as refused:
        load_config("resnet18_digits", ["model.name=resnet101", "model.weights=IMAGENET1K_V1"])
    assert refused.value.errors == [(
        "model.name: rayfine builds the torchvision models resnet18, resnet34, resnet50 (and efficientnet_lite0), not "
        "resnet101; choose one of them, or a Hugging Face image classifier (a hub id or local directory: model.weights "
        "and model.stem do not apply to those)")]
    with pytest.raises(ConfigError, match=r"model.weights and model.stem apply to torchvision models only"):
        load_config("resnet18_digits", ["model.name=google/vit-base-patch16-224", "model.stem=small"])


def _reference_rows() -> dict[str, list[str]]:
    from rayfine.config import config_reference

    rows = [line.strip("|").split(" | ") for line in config_reference().splitlines()[2:]]
    return {cells[0].strip().strip("`"): [c.strip() for c in cells[1:]] for cells in rows}


def test_the_reference_writes_each_default_as_yaml_that_reads_back_to_it():
    """A default copied from the table into a config is the default (`None` was read as the text
    "None"), and an optional section's fields are listed (tracking.mlflow's were missing)."""
    from rayfine.config import Config

    rows = _reference_rows()
    checked = 0
    for dotted, (default, _allowed, _meaning) in rows.items():
        if not default.startswith("`"):
            continue
        *sections, name = dotted.split(".")
        model = Config
        for section in sections:
            model = loading._model_in(model.model_fields[section].annotation)
        value = model.model_fields[name].get_default(call_default_factory=True)
        expected = list(value) if isinstance(value, tuple) else value
        assert yaml.safe_load(default.strip("`").replace("\\|", "|")) == expected, dotted
        checked += 1
    assert checked > 80
    assert rows["data.text_pair_column"][0] == "`null`" and rows["data.augment"][0] == "`false`"
    assert rows["tracking.mlflow.tracking_uri"][0] == "required when `tracking.mlflow` is set"
    assert {"tracking.mlflow.experiment", "tracking.mlflow.artifact_location"} <= set(rows)


def test_the_reference_says_what_each_field_takes():
    rows = _reference_rows()
    assert rows["seed"][1] == "integer in [0, 4294967295]"
    assert rows["data.val_fraction"][1] == "number in (0, 1)" and rows["data.subsample"][1] == "number in (0, 1]"
    assert rows["train.epochs"][1] == "integer >= 1" and rows["tune.reduction_factor"][1] == "number > 1"
    assert rows["train.grad_clip"][1] == "number > 0 or null" and rows["tune.mode"][1] == "max, min or null"
    assert rows["data.format"][1] == "auto, image_folder, parquet, csv, tsv, jsonl"
    assert rows["serve.image_formats"][1] == "a non-empty list of PNG, JPEG, MPO, BMP, GIF, TIFF, WEBP"
    assert rows["data.labels"][1] == "a list of texts or null" and rows["serve.host"][1] == "non-empty text"
    assert rows["train.class_weights"][1] == "balanced, a mapping or null"
    for dotted in ("seed", "data.max_length", "serve.port", "serve.batch_wait_timeout_s"):  # the ends hold
        low, high = rows[dotted][1].split("[")[1].rstrip("]").split(", ")
        for value in (low, high):
            load_config("resnet18_digits", [f"{dotted}={value}"])
        with pytest.raises(ConfigError, match=dotted.replace(".", r"\.")):
            load_config("resnet18_digits", [f"{dotted}={high}1"])


def test_an_error_inside_a_field_is_told_once_and_cross_field_rules_name_the_field():
    assert _errors(["serve.image_formats=[png]"]) == [
        "serve.image_formats.0: Input should be 'PNG', 'JPEG', 'MPO', 'BMP', 'GIF', 'TIFF' or 'WEBP' (got 'png')"]
    assert _errors(["train.class_weights={a: 0}"]) == ["train.class_weights.a: Input should be greater than 0 (got 0)"]
    assert _errors(["data.labels=a"]) == ["data.labels: Input should be a list, e.g. [a, b] (got 'a')"]
    (mean,) = _errors(["data.mean=[0.5, 0.5, 0.5]"])
    assert mean.startswith("data.mean: mean needs 1 value(s) for color_mode L"), mean
    (pretrained,) = _errors(["model.pretrained=false"])
    assert pretrained.startswith("model.pretrained: model.pretrained and model.config_overrides apply"), pretrained


def test_an_empty_path_or_name_is_refused_not_read_as_unset():
    """`--set serve.api_key_file=$KEY_FILE` with the variable unset gave an empty path, which
    serving read as "no key file" (an open API) and model.weights as "no weights" (random ones)."""
    errors = _errors(["serve.api_key_file=", "model.weights=", "storage.runs_dir=", "data.text_pair_column="])
    assert sorted(errors) == ["data.text_pair_column: empty; give a value, or null to unset it",
                              "model.weights: empty; give a value, or null to unset it",
                              "serve.api_key_file: empty; give a value, or null to unset it",
                              "storage.runs_dir: empty; give a value"]
    assert load_config("resnet18_digits", ["serve.api_key_file=null"]).serve.api_key_file is None


def test_a_tilde_on_the_command_line_is_the_home_folder_not_null():
    """In a text field `~` is text, as README says (YAML's null is `null` there)."""
    cfg = load_config("resnet18_digits", ["storage.runs_dir=~", "storage.storage_path=~"])
    assert cfg.storage.runs_dir == "~" and cfg.run_dir() == Path.home().resolve() / "resnet18_digits"
    assert cfg.storage.storage_path == "~" and cfg.resolved_storage_path().startswith(str(Path.home().resolve()))


def test_queue_length_zero_is_refused_before_a_search_not_by_serve_after_it():
    (err,) = _errors(["serve.max_queued_requests=0"])
    assert err == "serve.max_queued_requests: 0 is not a queue length Ray Serve takes: give -1 (no limit) or at least 1 (got 0)"
    assert load_config("resnet18_digits", ["serve.max_queued_requests=-1"]).serve.max_queued_requests == -1


def test_a_key_with_brackets_is_named_as_given_in_its_own_section():
    """pydantic's union tags (literal[...], dict[...]) are left out of a field's name; a key of the
    user's with brackets named the section above it as the unknown field, with the wrong list."""
    (err,) = _errors(["data.labels[0]=cat"])
    assert err.startswith("data.labels[0]: unknown field; allowed here: kind, source, format"), err


def test_stats_is_no_name():
    (err,) = _errors(["name=stats"])
    assert err.startswith("name: stats is taken: /v2/models/stats"), err


def test_a_bare_star_says_to_quote_it(tmp_path):
    """`serve.cors_origins: [*]` (README: "*" for any origin) is a YAML alias without its quotes."""
    (err,) = _errors(["serve.cors_origins=[*]"])
    assert "quote that value, e.g. \"*\"" in err, err
    assert load_config("resnet18_digits", ['serve.cors_origins=["*"]']).serve.cors_origins == ("*",)
    path = tmp_path / "exp.yaml"
    path.write_text("name: x\ndata: {source: builtin:digits}\nserve: {cors_origins: [*]}\n")
    with pytest.raises(ConfigError, match=r"quote that value"):
        load_config(path)
