"""Loading a config: a YAML file or a shipped preset, dotted overrides, validation, and errors
that name the dotted field, the bad value and what is allowed."""

from __future__ import annotations

import difflib
import re
import sys
import types
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

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


class _Int(int):
    """A YAML integer that remembers how it was written (``text``)."""

    text: str


class _Float(float):
    """A YAML float that remembers how it was written (``text``)."""

    text: str


class _Bool:
    """A YAML boolean that remembers how it was written (``text``): ``no`` is a label in a text
    field. bool cannot be subclassed, so ``_plain`` turns it into ``value`` or ``text``."""

    def __init__(self, value: bool, text: str):
        self.value, self.text = value, text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Bool) and (self.value, self.text) == (other.value, other.text)

    def __hash__(self) -> int:
        return hash((self.value, self.text))


class DuplicateKeyError(yaml.MarkedYAMLError):
    pass


class CommentError(yaml.MarkedYAMLError):
    """A ``#`` comment in a ``--set`` value, which YAML would drop silently."""


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s schema, for config files and ``--set`` values alike, with these changes,
    each as YAML 1.2 reads it or safer:
    - 1e-5, 3E4 and 1.0e5 are floats, as YAML 1.2 and Python read them (YAML 1.1 wants a dot and a
      signed exponent, and reads the rest as strings);
    - an integer with leading zeros is decimal (``010`` is 10; YAML 1.1 reads it as octal 8), and
      1.1's base-60 numbers (``1:30``, ``1:30.5``) are text;
    - dates and times (``2024-06-01``) are text, as in YAML 1.2: no field holds a date;
    - a key given twice in one mapping is an error (YAML 1.1 loaders keep the last one, silently),
      and keys are the text written: ``1``, ``01`` and ``1.0`` are three keys;
    - numbers and booleans remember their text (``_Int``, ``_Float``, ``_Bool``), so that a text
      field keeps what was written: ``name: 2024.10`` stays "2024.10", not "2024.1", and
      ``labels: [no, yes]`` stay "no" and "yes" (``_plain`` makes them plain)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden after it
                continue
            key = _key(self.construct_object(key_node, deep=True))  # keys are names: `01` and `1` differ
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if first is not key_node.start_mark:
                raise DuplicateKeyError(None, None, f"key {str(_plain(key))!r} is given twice (first on line "
                                        f"{first.line + 1}); give it once", key_node.start_mark)
        # SafeLoader's mapping, keyed by the text written: its own would make 1, 01 and 1.0 one key.
        self.flatten_mapping(node)  # `<<: *defaults` first, so that the keys after it win
        mapping = {}
        for key_node, value_node in node.value:
            key = _key(self.construct_object(key_node, deep=deep))
            try:
                mapping[key] = self.construct_object(value_node, deep=deep)
            except TypeError:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        "found unhashable key", key_node.start_mark) from None
        return mapping

    def construct_yaml_int(self, node: yaml.ScalarNode) -> _Int | str:
        digits = node.value.lstrip("+-").replace("_", "")
        if ":" in digits:  # YAML 1.1's base 60 (1:30 is 90); text in YAML 1.2
            return node.value
        if len(digits) > 1 and digits.startswith("0") and digits.isdigit():  # decimal, not 1.1's octal
            number = _Int(int(node.value.replace("_", ""), 10))
        else:
            number = _Int(super().construct_yaml_int(node))
        number.text = node.value
        return number

    def construct_yaml_float(self, node: yaml.ScalarNode) -> _Float | str:
        if ":" in node.value:  # YAML 1.1's base 60 (1:30.5 is 90.5); text in YAML 1.2
            return node.value
        number = _Float(super().construct_yaml_float(node))
        number.text = node.value
        return number

    def construct_yaml_bool(self, node: yaml.ScalarNode) -> _Bool:
        return _Bool(super().construct_yaml_bool(node), node.value)


class _ValueLoader(_Loader):
    """``_Loader`` for one ``--set`` value: a comment there is an error, not silently dropped
    (``--set 'train.lr=0.1 #2'``)."""

    def scan_to_next_token(self) -> None:
        start = self.pointer
        super().scan_to_next_token()
        if "#" in self.buffer[start:self.pointer]:  # only spaces, line breaks and comments are skipped
            raise CommentError(None, None, "a YAML comment", self.get_mark())


_Loader.add_constructor("tag:yaml.org,2002:bool", _Loader.construct_yaml_bool)
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config section an annotation holds (``Optional[MLflowConfig]`` holds one), if any."""
    for t in (annotation, *get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _is_text(annotation: Any) -> bool:
    return annotation is str or (get_origin(annotation) in (Union, types.UnionType) and str in get_args(annotation))


def _plain(value: Any, annotation: Any = Any) -> Any:
    """A loaded YAML tree with plain ints, floats and bools, but the text of numbers and booleans
    (and of mapping keys, always names) where ``annotation`` (a field's type, followed down the
    config tree) is text."""
    if isinstance(value, dict):
        model = _model_in(annotation)
        if model is not None:
            fields = model.model_fields
            return {_key(k): _plain(v, fields[_key(k)].annotation if _key(k) in fields else Any) for k, v in value.items()}
        args = _container_args(annotation, dict)
        return {_key(k): _plain(v, args[1] if args else Any) for k, v in value.items()}
    if isinstance(value, list):
        args = _container_args(annotation, tuple, list)
        return [_plain(v, args[0] if args else Any) for v in value]
    if isinstance(value, (_Int, _Float)):
        return value.text if _is_text(annotation) else (int if isinstance(value, int) else float)(value)
    if isinstance(value, _Bool):
        return value.text if _is_text(annotation) else value.value
    return value


def _container_args(annotation: Any, *origins: type) -> tuple:
    """The type arguments of the container an annotation is, or holds (``Optional[tuple[str, ...]]``)."""
    for t in (annotation, *get_args(annotation)):
        if get_origin(t) in origins:
            return get_args(t)
    return ()


def _key(key: Any) -> Any:
    return key.text if isinstance(key, (_Int, _Float, _Bool)) else key


def _is_plain_text(annotation: Any) -> bool:
    """A field that holds one text (``str`` or ``Optional[str]``), not a choice, list or mapping."""
    if annotation is str:
        return True
    return get_origin(annotation) in (Union, types.UnionType) and set(get_args(annotation)) == {str, type(None)}


def _annotation_at(parts: list[str]) -> Any:
    """The type of the field at a dotted path of the config, or Any where it is not a field."""
    annotation: Any = Config
    for part in parts:
        model = _model_in(annotation)
        if model is not None:
            field = model.model_fields.get(part)
            if field is None:
                return Any
            annotation = field.annotation
        elif args := _container_args(annotation, dict):
            annotation = args[1]
        else:
            return Any
    return annotation


STDIN = "-"


def _read_raw(path_or_name: str | Path) -> dict[str, Any]:
    """A config file (any readable path but a directory: a pipe such as ``<(...)`` or /dev/stdin too),
    ``-`` for standard input, or a preset name -> the raw dict."""
    label = "standard input" if str(path_or_name) == STDIN else str(path_or_name)
    path = Path(path_or_name).expanduser()
    if str(path_or_name) == STDIN or (path.exists() and not path.is_dir()):
        try:
            data = sys.stdin.buffer.read() if str(path_or_name) == STDIN else path.read_bytes()
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError([f"{label}: not a UTF-8 text file (byte {e.start} is {e.object[e.start]:#04x})"]) from None
        except OSError as e:
            raise ConfigError([f"{label}: cannot read it: {e.strerror}"]) from None
    else:  # a preset; a folder of the same name (a run directory, `--runs-dir .`) does not hide it
        name = str(path_or_name).removesuffix(".yaml")
        preset = resources.files("rayfine.configs") / f"{name}.yaml"
        if ("/" in name or not preset.is_file()) and path.is_dir():
            raise ConfigError([f"{label}: a directory; give a config file or a preset name"])
        if "/" in name or not preset.is_file():
            close = difflib.get_close_matches(name, preset_names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                [f"no config file or preset named {str(path_or_name)!r}{hint}; presets: {', '.join(preset_names())}"]
            )
        text = preset.read_text()
    try:
        raw = yaml.load(text, Loader=_Loader)
    except DuplicateKeyError as e:
        raise ConfigError([f"{label}: line {e.problem_mark.line + 1}: {e.problem}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{label}: not valid YAML: {e}{_yaml_hint(e)}"]) from None
    if raw is None:
        raise ConfigError([f"{label}: the config is empty (or only comments); give at least name and data.source"])
    if not isinstance(raw, dict):
        raise ConfigError([f"{label}: the top level must be a mapping, got {type(_plain(raw)).__name__}"])
    return _plain(raw, Config)


def _yaml_hint(error: yaml.YAMLError) -> str:
    """What to do about a YAML error a user would not expect: `cors_origins: [*]`, where a bare `*`
    starts an alias."""
    context = str(getattr(error, "context", "") or "")
    if "alias" in context or "anchor" in context:
        return "\n(a '*' or '&' at the start of a value begins a YAML alias or anchor: quote that value, e.g. \"*\")"
    return ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a raw dict: the value of a text field is its text as given
    (``_parse_value``), any other value is YAML (a scalar, or a flow list or mapping)."""
    raw = _deep_copy(raw)
    errors = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            errors.append(f"override {item!r}: expected dotted.key=value, e.g. train.lr=3e-4")
            continue
        parts = key.split(".")
        try:
            value = _parse_value(text, _annotation_at(parts))
        except CommentError:
            errors.append(f"override {item!r}: {key}: '#' starts a YAML comment here, which would drop the rest of "
                          f"the value; leave the comment out, or quote the value if the '#' is part of it "
                          f"(--set '{key}=\"...\"')")
            continue
        except DuplicateKeyError as e:
            errors.append(f"override {item!r}: {e.problem}")
            continue
        except yaml.YAMLError as e:
            errors.append(f"override {item!r}: value is not valid YAML: {e}{_yaml_hint(e)}")
            continue
        except ValueError as e:
            errors.append(f"override {item!r}: {key}: {e}")
            continue
        node = raw
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


_NULLS = ("null", "Null", "NULL")  # not YAML's ~: a text field takes it as given (the home folder of a path)


def _parse_value(text: str, annotation: Any) -> Any:
    """One ``--set`` value for a field of type ``annotation``. A text field (``name``, ``data.source``)
    takes the text as given, less surrounding spaces, so that ``/data/my photos #2``, ``*.csv`` and
    ``a: b`` stay as written; a quoted YAML string is unquoted as YAML does, and ``null`` unsets the
    field. Anything else, a ``[...]`` or ``{...}`` given to a text field too, is YAML, where a
    comment is an error (``CommentError``)."""
    value = text.strip()
    if not value:
        return ""
    if not _is_plain_text(annotation) or value[0] in "[{":  # a flow list or mapping: refused by type
        return _plain(yaml.load(text, Loader=_ValueLoader), annotation)
    if value in _NULLS:
        return None
    if value[0] in "\"'":
        quoted = yaml.load(value, Loader=_ValueLoader)
        if not isinstance(quoted, str):
            raise ValueError("a value that starts with a quote must be one quoted string, e.g. "
                             "'\"my photos #2\"'; or give the text without quotes")
        return quoted
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
        raise ConfigError(describe_all(e.errors())) from None
    return cfg


def describe_all(errors: list[dict[str, Any]]) -> list[str]:
    """One readable line per field: "dotted.field: what is wrong (got value)". A value that fits
    none of a field's alternatives (a union, such as train.class_weights: balanced or
    {label: weight}) fails each of them; they share its line."""
    lines: dict[str, list[str]] = {}
    for err in errors:
        loc, text = _describe(err)
        lines.setdefault(loc, []).append(text)
    # A field whose item failed fails as a whole too (a list left too short, a union's other
    # alternative): the item's line says what is wrong.
    failed_inside = {loc for loc in lines if loc and any(other.startswith(loc + ".") for other in lines)}
    return [f"{loc}: {' or '.join(dict.fromkeys(texts))}" if loc else "; ".join(texts)
            for loc, texts in lines.items() if loc not in failed_inside]


# How pydantic-core names a union's alternative in an error's location: its schema type, then [...].
_UNION_TAG = re.compile(r"(literal|dict|list|tuple|set|frozenset|union|nullable|function-[a-z]+|constrained-[a-z]+|"
                        r"json-or-python|lax-or-strict|is-instance|model|dataclass|tagged-union|chain)\[.*\]", re.DOTALL)


def _describe(err: dict[str, Any]) -> tuple[str, str]:
    """(dotted field, or "" for a check across sections; what is wrong)."""
    # pydantic adds each union alternative it tried to the location (literal['balanced'], dict[str,float]);
    # a key of the user's own with brackets in it (labels[0], a class_weights label "[neg]") stays.
    path = tuple(p for p in err["loc"] if not (isinstance(p, str) and _UNION_TAG.fullmatch(p)))
    loc = ".".join(str(p) for p in path)
    kind = err["type"]
    if kind == "extra_forbidden":
        section = _model_in(_annotation_at([str(p) for p in path[:-1]]))  # the section holding the key
        return loc, f"unknown field; allowed here: {', '.join(section.model_fields) if section else '?'}"
    if kind == "missing":
        return loc, "required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if kind in ("tuple_type", "list_type"):
        msg = "Input should be a list, e.g. [a, b]"
    elif kind in ("dict_type", "model_type"):
        msg = "Input should be a mapping (key: value)"
    if kind == "value_error" and isinstance(err.get("input"), dict):  # a section's cross-field check names the values
        first = re.match(r"[a-z_]+(?:\.[a-z_]+)*", msg)  # "mean needs 1 value(s) ...": the line names data.mean
        field = f"{loc}.{first.group()}" if loc and first else first.group() if first else ""
        if field and _annotation_at(field.split(".")) is not Any:
            loc, msg = field, msg.removeprefix(f"{first.group()}: ")
        return loc, msg
    if kind == "too_short":
        msg = msg.replace("Tuple", "List").replace(" after validation", "")
    if kind == "string_too_short" and err.get("input") == "":  # an unset shell variable in --set x=$VAR
        optional = type(None) in get_args(_annotation_at([str(p) for p in path]))
        return loc, "empty; give a value" + (", or null to unset it" if optional else "")
    given = repr(err.get("input"))
    return loc or "(top level)", f"{msg} (got {given if len(given) <= 80 else given[:77] + '...'})"




def load_config(path_or_name: str | Path, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML file or a preset name, apply dotted overrides, validate once."""
    return validate(apply_overrides(_read_raw(path_or_name), list(overrides or [])))


def config_reference() -> str:
    """The README's config reference table, generated from the field declarations (config/sections.py):
    each field's default as YAML writes it, and what it takes (choices, a range, null)."""
    rows = ["| field | default | allowed | meaning |", "| --- | --- | --- | --- |"]

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def walk(model: type[BaseModel], prefix: str, required_when: str = "") -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            if field.is_required():
                default = f"required when `{required_when}` is set" if required_when else "required"
            else:  # a default_factory's value too
                default = f"`{cell(yaml_value(field.get_default(call_default_factory=True)))}`"
            rows.append(f"| `{prefix}{name}` | {default} | {cell(_allowed(field))} | {cell(field.description or '')} |")
            section = _model_in(annotation)  # an optional section (tracking.mlflow): its fields follow
            if section is not None:
                walk(section, f"{prefix}{name}.", required_when=f"{prefix}{name}")

    walk(Config, "")
    return "\n".join(rows)


def yaml_value(value: Any) -> str:
    """A value as a YAML file writes it (a default in the reference, a setting in a message): null,
    true, [PNG, JPEG], 0.01, /data/x."""
    value = list(value) if isinstance(value, tuple) else value
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...").strip()


_KINDS = {int: "integer", float: "number", bool: "true, false", str: "text"}


def _allowed(field) -> str:
    """What a field takes, from its type and constraints: choices, an interval, a list, null."""
    annotation = field.annotation
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    non_empty = "non-empty " if any(getattr(m, "min_length", None) for m in field.metadata) else ""
    parts = []
    for option in options:
        option = _unannotated(option)
        if option is type(None):
            continue
        if get_origin(option) is Literal:
            parts.append(", ".join(str(v) for v in get_args(option)))
        elif get_origin(option) is tuple:
            item = _unannotated(get_args(option)[0])
            literal = get_origin(item) is Literal
            items = ", ".join(str(v) for v in get_args(item)) if literal else f"{_KINDS.get(item, 'value')}s"
            parts.append(f"a {non_empty}list of {items}")
        elif get_origin(option) is dict or _model_in(option) is not None:
            parts.append("a mapping")
        elif option in (int, float):
            parts.append(f"{_KINDS[option]} {_interval(field.metadata)}".strip())
        else:
            parts.append(non_empty + _KINDS.get(option, "a value"))
    if type(None) in options:
        parts.append("null")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _unannotated(annotation: Any) -> Any:
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def _interval(metadata: list) -> str:
    """Ge/Gt/Le/Lt bounds as an interval: [0, 1), >= 1."""
    low = next(((m.ge, "[") for m in metadata if getattr(m, "ge", None) is not None), None) or next(
        ((m.gt, "(") for m in metadata if getattr(m, "gt", None) is not None), None)
    high = next(((m.le, "]") for m in metadata if getattr(m, "le", None) is not None), None) or next(
        ((m.lt, ")") for m in metadata if getattr(m, "lt", None) is not None), None)
    if low and high:
        return f"in {low[1]}{low[0]}, {high[0]}{high[1]}"
    if low:
        return (">= " if low[1] == "[" else "> ") + str(low[0])
    if high:
        return ("<= " if high[1] == "]" else "< ") + str(high[0])
    return ""
