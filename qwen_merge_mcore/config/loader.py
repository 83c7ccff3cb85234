"""YAML + dotted overrides -> a validated `ExperimentConfig`.

Every value is type-checked against the dataclass annotations, unknown keys are refused with
a suggestion, and the cross-section rules run before anything is built.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError
from .presets import model_preset
from .schema import RETIRED_KEYS, ExperimentConfig


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check_runtime: bool = True, world_size: int | None = None) -> ExperimentConfig:
    """Read a YAML experiment config, apply `a.b.c=value` overrides and validate.

    `check_runtime` also checks what this machine can do (FP8 needs Transformer Engine);
    tools that only inspect configs for another machine pass False. `world_size`: also check
    that the layout and the batch work on that many GPUs.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError("", f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise ConfigError("", f"{path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError("", f"{path} must hold a mapping at the top level")
    for item in overrides or []:
        apply_override(raw, item)
    cfg = config_from_dict(raw, check_runtime=check_runtime)
    if world_size is not None:
        cfg.data_parallel_size(world_size)
    return cfg


def config_from_dict(raw: dict[str, Any], check_runtime: bool = True) -> ExperimentConfig:
    raw = copy.deepcopy(raw)
    model = raw.get("model")
    if isinstance(model, dict) and model.get("preset"):
        raw["model"] = _deep_merge(model_preset(model["preset"]), model)
    cfg = build_dataclass(ExperimentConfig, raw, "")
    cfg.validate()
    if check_runtime:
        check_machine(cfg)
    return cfg


# Packages a config turns on by setting a key: (key, module, pip requirement). The `gpu` extra
# installs those the shipped configs (launch/stage*.yaml) use.
OPTIONAL_PACKAGES = (("logging.tensorboard_dir", "tensorboard", "tensorboard"),
                     ("logging.wandb_project", "wandb", "wandb"))


def missing_packages(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """(key, why) for each optional package the config turns on that this machine lacks."""
    import importlib.util

    missing = []
    for key, module, requirement in OPTIONAL_PACKAGES:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) and importlib.util.find_spec(module) is None:
            missing.append((key, f"needs the {module} package, which is not installed here: "
                                 f"pip install {requirement} (or the `gpu` extra)"))
    return missing


def check_machine(cfg: ExperimentConfig) -> None:
    """Rules that depend on the machine the config runs on."""
    from ..utils.runtime import te_available

    for key, why in missing_packages(cfg):
        raise ConfigError(key, why)
    if cfg.precision.fp8 is not None and not te_available():
        raise ConfigError("precision.fp8", f"FP8 ({cfg.precision.fp8}) needs Transformer Engine, which is "
                          "not importable on this machine (install the `gpu` extra on a CUDA machine)")
    if cfg.precision.fp8 is not None:
        import torch

        from ..fp8_alignment import fp8_unsupported

        reason = fp8_unsupported(cfg.precision.fp8_recipe, torch.cuda.get_device_capability(), torch.version.cuda)
        if reason:
            raise ConfigError("precision.fp8_recipe", reason)
    if cfg.model.backend == "te" and not te_available():
        raise ConfigError("model.backend", "'te' needs Transformer Engine, which is not importable here; "
                          "use 'local' or 'auto'")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`[1,2]`, `true`, `1e-4`)."""
    if "=" not in item:
        raise ConfigError(item, "an override must look like key.path=value")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(key, "empty component in the dotted key")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(key, f"cannot parse value {text!r}: {err}") from None


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from `raw`, checking keys and types recursively."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix, f"expected a mapping for {cls.__name__}, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names and path in RETIRED_KEYS:
            raise ConfigError(path, RETIRED_KEYS[path])
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(path, f"unknown key{hint}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(options[0], value, path)
        raise TypeError(f"unsupported union {tp}")
    if value is None:
        raise ConfigError(path, f"must not be empty (expected {_type_name(tp)})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # No setting means inf or nan; lr=inf trained NaN weights that a run then saved.
            if not math.isfinite(number):
                raise ConfigError(path, f"must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp} at {path}")
    raise ConfigError(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
