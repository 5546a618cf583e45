"""Loading a config: a YAML file or a shipped preset, dotted overrides, validation, and errors
that name the dotted field, the bad value and what is allowed."""

from __future__ import annotations

import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from rayfine.config.sections import Config
from rayfine.errors import RayfineError


class ConfigError(RayfineError, ValueError):
    """A config that cannot be used; ``errors`` holds one readable line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid config:\n" + "\n".join(f"  - {e}" for e in errors))


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("rayfine.configs").iterdir() if p.name.endswith(".yaml"))


def _read_raw(path_or_name: str | Path) -> dict[str, Any]:
    path = Path(path_or_name).expanduser()
    if path.is_file():
        text = path.read_text()
    else:
        name = str(path_or_name).removesuffix(".yaml")
        preset = resources.files("rayfine.configs") / f"{name}.yaml"
        if "/" in name or not preset.is_file():
            raise ConfigError(
                [f"no config file or preset named {str(path_or_name)!r}; presets: {', '.join(preset_names())}"]
            )
        text = preset.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{path_or_name}: not valid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path_or_name}: the top level must be a mapping, got {type(raw).__name__}"])
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values are YAML scalars or flow lists) to a raw dict."""
    raw = _deep_copy(raw)
    errors = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            errors.append(f"override {item!r}: expected dotted.key=value, e.g. train.lr=3e-4")
            continue
        try:
            value = _parse_scalar(text)
        except yaml.YAMLError as e:
            errors.append(f"override {item!r}: value is not valid YAML: {e}")
            continue
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                errors.append(f"override {item!r}: {part!r} is a value, not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    if errors:
        raise ConfigError(errors)
    return raw


def _parse_scalar(text: str) -> Any:
    value = yaml.safe_load(text) if text.strip() else ""
    # YAML 1.1 reads 3e-4 as a string; users mean a number.
    if isinstance(value, str):
        try:
            number = float(value)
            if math.isfinite(number) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
                return number
        except ValueError:
            pass
    return value


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj


def validate(raw: dict[str, Any]) -> Config:
    """A raw dict -> a Config, or ConfigError with one line per problem."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError([_describe(err) for err in e.errors()]) from None
    return cfg


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        section = _section_at(err["loc"][:-1])
        allowed = ", ".join(section.model_fields) if section else "?"
        return f"{loc}: unknown field; allowed here: {allowed}"
    if kind == "missing":
        return f"{loc}: required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(err.get("input"), dict):  # a cross-field check: the message names the values
        return f"{loc}: {msg}" if err["loc"] else msg
    return f"{loc}: {msg} (got {err.get('input')!r})"


def _section_at(loc: tuple) -> Optional[type[BaseModel]]:
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def load_config(path_or_name: str | Path, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML file or a preset name, apply dotted overrides, validate once."""
    return validate(apply_overrides(_read_raw(path_or_name), list(overrides or [])))


def config_reference() -> str:
    """The README's config reference table, generated from the field declarations above."""
    rows = ["| field | default | meaning |", "| --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            value = field.get_default(call_default_factory=True)  # a default_factory's value too
            default = "required" if field.is_required() else f"`{value!r}`".replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {default} | {(field.description or '').replace('|', chr(92) + '|')} |")

    walk(Config, "")
    return "\n".join(rows)
