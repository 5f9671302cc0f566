"""Typed configuration: YAML sets defaults, ``--set key=value`` overrides them, and the
resolved config is written into the run folder so every run can be repeated from it.

Unknown keys (with the closest known key suggested) and wrong types are refused with a
:class:`~ptxseg.errors.ConfigError` that names the dotted key. Every key carries a
description (``ptxseg config show`` lists them).

``--config NAME_OR_FILE``: a value with a path separator or a ``.yaml``/``.yml`` suffix is a
file; anything else is a built-in name (:func:`resolve_config_path`), so a folder called
``demo`` in the current directory never hides the built-in ``demo`` config.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import ValidationError

from ptxseg.config_schema import (  # the schema; importable from here as before
    AugmentConfig,
    Config,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from ptxseg.errors import ConfigError

__all__ = [
    "AugmentConfig", "Config", "DataConfig", "LossConfig", "ModelConfig", "OptimConfig",
    "TrainConfig", "load_config", "save_config", "describe_keys", "resolve_config_path",
]

BUILTIN_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class KeyInfo:
    """One config key: dotted name, value, description, allowed values (None = any)."""

    key: str
    value: Any
    description: str
    choices: tuple[Any, ...] | None = None


def _choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal`` field (None for any other type)."""
    return get_args(annotation) if get_origin(annotation) is Literal else None


def describe_keys(cfg: Config | None = None) -> list[KeyInfo]:
    """Every dotted key of ``cfg`` (default: the code defaults) with its value and meaning."""
    cfg = cfg or Config()
    out = []
    for section, sfield in Config.model_fields.items():
        model = sfield.annotation
        values = getattr(cfg, section)
        for name, field in model.model_fields.items():
            out.append(
                KeyInfo(
                    f"{section}.{name}",
                    getattr(values, name),
                    field.description or "",
                    _choices(field.annotation),
                )
            )
    return out


def config_keys() -> list[str]:
    """Every dotted key (``data.size``, ``train.epochs`` ...)."""
    return [k.key for k in describe_keys()]


def builtin_configs() -> list[str]:
    """Names of the configs shipped with the package (``paper``, ``demo``...)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def suggest_key(key: str) -> str | None:
    """The known dotted key (or section) closest to a misspelt ``key``, if any is close."""
    known = config_keys() if "." in key else list(Config.model_fields)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return close[0] if close else None


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        msg = f"unknown key '{key}'"
        close = suggest_key(key)
        if close:
            msg += f" (did you mean {close}?)"
    elif first["type"] == "value_error" and len(first["loc"]) <= 1:
        # a rule over several keys of a section (a model validator): its message names them
        msg = str(first["msg"]).removeprefix("Value error, ")
    else:
        msg = f"'{key}': {first['msg']} (got {first.get('input')!r})"
    more = len(err.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return f"{source}: {msg}"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    return data


def is_path_like(value: str) -> bool:
    """Whether a ``--config`` value names a file: it holds a path separator or ends in
    ``.yaml``/``.yml``. Anything else is the name of a built-in config."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(sep in value for sep in seps) or value.lower().endswith((".yaml", ".yml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """The YAML file a ``--config`` value stands for.

    The rule: a value with a path separator, or ending in ``.yaml``/``.yml``, is a file
    (``./demo``, ``configs/my.yaml``, ``run/config.yaml``); any other value is the name of a
    built-in config (``paper``, ``demo``), whatever files or folders of that name exist in
    the current folder. A :class:`~pathlib.Path` object is always a file.

    Raises:
        ConfigError: a file that is missing or a folder; an unknown built-in name (listing the
            built-ins, and saying ``./NAME`` when a file of that name exists).
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or is_path_like(text):
        path = Path(name_or_path)
        if path.is_dir():
            inside = sorted(path.glob("*.yaml"))  # a run folder's config, say
            raise ConfigError(
                f"{path}: is a folder, not a config file"
                + (f" (did you mean {inside[0]}?)" if len(inside) == 1 else "")
            )
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        return path
    builtin = BUILTIN_DIR / f"{text}.yaml"
    if text and builtin.is_file():
        return builtin
    hint = ""
    if text and Path(text).is_file():
        hint = f"; to read the file '{text}' in this folder, use ./{text}"
    raise ConfigError(
        f"{text or repr(text)}: no built-in config of that name (built-in: "
        f"{', '.join(builtin_configs())}; a config file is given by a path such as "
        f"./my.yaml){hint}"
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> (["train", "epochs"], 3); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item}: '{part}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def validate(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides.

    ``path``: a built-in name or a file, as :func:`resolve_config_path` decides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = resolve_config_path(path)
        data = _read_yaml(p)
        source = str(p)
    overrides = list(overrides)
    data = apply_overrides(data, overrides)
    return validate(data, source if not overrides else f"{source} (with --set)")


def save_config(cfg: Config, path: str | Path, *, header: str = "") -> None:
    """Write ``cfg`` as YAML (atomically); ``header``: comment lines written above it."""
    from ptxseg.fileio import write_text

    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    write_text(path, comment + cfg.to_yaml())
