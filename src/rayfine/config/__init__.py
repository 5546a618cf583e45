"""The experiment config: one typed, frozen tree validated once, everywhere.

    from rayfine.config import load_config
    cfg = load_config("resnet18_digits", ["train.lr=3e-4", "scaling.num_workers=1"])
    print(cfg.to_yaml())

A config comes from a YAML file or a shipped preset (``rayfine/configs/*.yaml``), plus dotted
overrides ``key.sub=value`` whose values are YAML (a text field takes the text as given). Unknown keys are errors, and
every error names the dotted field, the bad value and what is allowed (``ConfigError``).
The resolved config is saved in every run directory and checkpoint, and travels to the Ray
workers as JSON, where it is validated again.

Modules: ``sections`` (the typed tree), ``loading`` (files, presets, overrides, errors),
``search`` (the tune section's search spaces).
"""

from rayfine.config.loading import (
    ConfigError,
    apply_overrides,
    config_reference,
    load_config,
    preset_names,
    validate,
    yaml_value,
)
from rayfine.config.search import (
    SEARCH_DISTRIBUTIONS,
    SEARCHABLE_PREFIXES,
    check_search,
    parse_search_spec,
    shadowed_overrides,
)
from rayfine.config.sections import (
    HF_MODEL_PRESETS,
    SERVE_IMAGE_FORMATS,
    TORCHVISION_MODELS,
    Config,
    DataConfig,
    MLflowConfig,
    ModelConfig,
    ScalingConfig,
    ServeConfig,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
    name_problem,
    storage_location,
)

__all__ = [
    "Config", "ConfigError", "DataConfig", "HF_MODEL_PRESETS", "MLflowConfig", "ModelConfig", "TrackingConfig", "SEARCHABLE_PREFIXES",
    "SEARCH_DISTRIBUTIONS", "SERVE_IMAGE_FORMATS", "ScalingConfig", "ServeConfig", "StorageConfig",
    "TORCHVISION_MODELS", "TrainConfig", "TuneConfig", "apply_overrides", "check_search", "config_reference",
    "load_config", "name_problem", "parse_search_spec", "preset_names", "shadowed_overrides", "storage_location",
    "validate", "yaml_value",
]
