"""Search spaces of the ``tune`` section: parsing ``{distribution: args}`` and checking that every
trial a search can start is a valid config.

``check_search(cfg)`` runs where a search is about to start (`rayfine tune`, `rayfine run`,
``run_search``), not on every config load: a config trained with `rayfine train --set
train.epochs=1` (or a checkpoint's config) stays loadable whatever its tune section says.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayfine.config.sections import Config

SEARCH_DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
# A trial may vary what it trains; the datasets, the resource plan and the run directory are
# shared by every trial (tune.trial_overrides sets those for all trials at once).
SEARCHABLE_PREFIXES = ("train.", "model.")
# ...but not ASHA's max_t, nor what keeps a trial's checkpoints by tune.metric (rayfine.tune.trial:
# a trial of another train.metric could drop the epoch the search ranks best).
UNSEARCHABLE = ("train.epochs", "train.metric", "train.keep_checkpoints")


def _sci_float(value: Any) -> Any:
    # A quoted "1e-4" (config files and --set read 1e-4 as a number already); users mean a number.
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


def _as_number(value: Any) -> Any:
    value = _sci_float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a number")
    return value


def parse_search_spec(spec: Any) -> tuple[str, list]:
    """``{distribution: args}`` -> (distribution, args), checked; ValueError says what is allowed."""
    if not (isinstance(spec, dict) and len(spec) == 1):
        raise ValueError(f"expected one {{distribution: args}} mapping such as {{loguniform: [1.0e-4, 1.0e-2]}}, got {spec!r}; "
                         f"distributions: {', '.join(SEARCH_DISTRIBUTIONS)}")
    kind, args = next(iter(spec.items()))
    if kind not in SEARCH_DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {kind!r}; allowed: {', '.join(SEARCH_DISTRIBUTIONS)}")
    if kind in ("choice", "grid"):
        if not isinstance(args, (list, tuple)) or not args:
            raise ValueError(f"{kind} needs a non-empty list of values, got {args!r}")
        return kind, [_sci_float(a) for a in args]
    if not (isinstance(args, (list, tuple)) and len(args) == 2):
        raise ValueError(f"{kind} needs [low, high], got {args!r}")
    low, high = (_as_number(a) for a in args)
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise ValueError(f"randint needs integer bounds, got {list(args)}")
    if kind == "randint":
        low, high = int(low), int(high)
    if low >= high:
        raise ValueError(f"{kind} needs low < high, got {list(args)}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"loguniform needs 0 < low, got {list(args)}")
    return kind, [low, high]


def search_points(kind: str, args: list) -> list:
    """Values standing for everything a distribution can sample: its ends and an inner point
    (which catches a float range on an integer field)."""
    if kind in ("choice", "grid"):
        return list(args)
    low, high = args
    if kind == "randint":
        return sorted({low, high - 1})
    inner = low * (high / low) ** 0.37 if kind == "loguniform" else low + 0.37 * (high - low)
    return [low, inner, high]


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    from rayfine.config.loading import _deep_copy

    raw = _deep_copy(raw)
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return raw


# Sections a search and all its trials share: tune.trial_overrides may not set them.
SHARED_PREFIXES = ("storage.", "tune.", "tracking.", "serve.")


def _within(field: str, key: str) -> bool:
    """``field`` is ``key`` or inside the section ``key`` names."""
    return field == key or field.startswith(key + ".")


def shadowed_overrides(cfg: Config, overrides: list[str]) -> list[str]:
    """The ``--set`` keys of a search that every trial overrides again: a trial is the config plus
    tune.trial_overrides plus its sampled values, so ``--set train.epochs=3`` beside a preset's
    ``trial_overrides: [train.epochs=8, ...]`` would change nothing. One line per key, saying where
    to set it instead (empty: none is shadowed)."""
    from rayfine.config.loading import yaml_value

    t, lines = cfg.tune, []
    trial_keys = [item.partition("=")[0].strip() for item in t.trial_overrides]
    stripped = {"=".join(part.strip() for part in item.partition("=")[::2]) for item in t.trial_overrides}
    for override in overrides:
        key = override.partition("=")[0].strip()
        if key == "tune" or key.startswith("tune."):
            continue
        given = override.partition("=")[2].strip()
        shadowing = [k for k in trial_keys if _within(k, key) and f"{k}={given}" not in stripped]
        if shadowing:
            kept = [item for item in t.trial_overrides if item.partition("=")[0].strip() not in shadowing]
            fix = [*kept, f"{key}={given}"] if key in shadowing else kept
            lines.append(f"{key}: tune.trial_overrides sets {', '.join(shadowing)} for every trial, after --set; "
                         f"give it there: --set 'tune.trial_overrides={yaml_value(fix)}'")
        for k in (k for k in t.search_space if _within(k, key)):
            lines.append(f"{key}: tune.search_space draws {k} for every trial; to fix it, drop that dimension "
                         f"too: --set tune.search_space.{k}=null")
    return lines


def check_search(cfg: "Config") -> list[str]:
    """The tune section against the rest of the config: every trial it can start is a valid config.
    Returns the problems, one readable line each (empty: the search can run)."""
    from pydantic import ValidationError

    from rayfine.config.loading import ConfigError, apply_overrides, describe_all
    from rayfine.config.sections import Config

    t, errors = cfg.tune, []
    natural = "min" if t.metric.endswith("loss") else "max"
    if t.mode is not None and t.mode != natural:
        errors.append(f"tune.mode: {t.mode} with tune.metric {t.metric}, which is best at its {natural}; "
                      f"set tune.mode={natural} or leave it unset")
    for item in t.trial_overrides:
        key = item.partition("=")[0].strip()
        # The search's tracking runs and its winner's deployment read these from the config, not a trial's.
        if key in ("name", "storage", "tune", "tracking", "serve") or key.startswith(SHARED_PREFIXES):
            errors.append(f"tune.trial_overrides: {key} is shared by the search and its trials; set it outside tune")
    try:
        raw = apply_overrides(cfg.to_dict(), list(t.trial_overrides))
        trial = Config.model_validate(raw)
    except ConfigError as e:
        return errors + [f"tune.trial_overrides: {x}" for x in e.errors]
    except ValidationError as e:
        return errors + [f"tune.trial_overrides make an invalid trial config: {x}" for x in describe_all(e.errors())]
    if t.scheduler in ("asha", "halving") and t.grace_period >= trial.train.epochs:
        errors.append(f"tune.grace_period: {t.grace_period} leaves {t.scheduler} nothing to stop: it must be below the "
                      f"trials' train.epochs ({trial.train.epochs}), the scheduler's max_t; lower it or use "
                      "tune.scheduler=fifo")
    if t.scheduler == "halving" and t.searcher != "random":
        errors.append(f"tune.searcher: {t.searcher} learns from finished trials, and halving draws every trial before "
                      "any finishes; use tune.searcher=random with tune.scheduler=halving (or asha with optuna)")
    weighed = [k for k in ("train.label_smoothing", "train.class_weights") if k in t.search_space]
    if t.metric == "train_loss" and weighed:
        errors.append(f"tune.metric: train_loss includes {' and '.join(weighed)}, which the search varies, so trials "
                      "would be ranked by how their loss is weighed, not by how well they learn; rank by val_loss "
                      "(plain cross-entropy in every trial) or a val_ metric")
    for key, spec in t.search_space.items():
        where = f"tune.search_space.{key}"
        sub = next(iter(spec)) if isinstance(spec, dict) and len(spec) == 1 else None
        if f"{key}." in SEARCHABLE_PREFIXES and isinstance(sub, str) and sub not in SEARCH_DISTRIBUTIONS:
            # {train: {lr: [0.1, 0.2]}}: a field with values, not a distribution (a list nests no further).
            errors.append(f"{where}: {spec!r} is not a search spec; give {key}.{sub} a distribution, e.g. "
                          f"{key}.{sub}: {{choice: {spec[sub]!r}}} (distributions: {', '.join(SEARCH_DISTRIBUTIONS)})")
            continue
        if key in UNSEARCHABLE or not (key == "seed" or key.startswith(SEARCHABLE_PREFIXES)):
            errors.append(f"{where}: cannot vary between trials; searchable: train.* (except train.epochs, "
                          "ASHA's max_t; train.metric and train.keep_checkpoints, which keep each trial's "
                          "checkpoints by tune.metric), model.*, seed (settings for all trials go in "
                          "tune.trial_overrides)")
            continue
        if key == "model.name" and trial.data.kind == "text":
            errors.append(f"{where}: cannot vary for text data: the search tokenizes the texts once, with the "
                          f"tokenizer of model.name ({trial.model.name}); run one search per model instead")
            continue
        try:
            kind, args = parse_search_spec(spec)
        except ValueError as e:
            errors.append(f"{where}: {e}")
            continue
        if kind == "grid" and t.searcher == "optuna":
            errors.append(f"{where}: grid needs tune.searcher=random (Optuna samples); use choice with optuna")
        for value in search_points(kind, args):
            try:
                Config.model_validate(_set_dotted(raw, key, value))
            except ValueError as e:  # pydantic's ValidationError is a ValueError
                problems = describe_all(e.errors()) if isinstance(e, ValidationError) else [str(e)]
                hint = "; uniform/loguniform sample floats, use randint or choice" if kind.endswith("uniform") else ""
                errors.extend(f"{where}: the value {value!r} makes an invalid trial config: {p}"
                              + (hint if "integer" in p else "") for p in problems)
                break
    return errors
