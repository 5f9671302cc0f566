"""Typed configuration: YAML sets defaults, ``--set key=value`` overrides them, and the
resolved config is written into the run folder so every run can be repeated from it.

Unknown keys (with the closest known key suggested) and wrong types are refused with a
:class:`~ptxseg.errors.ConfigError` that names the dotted key. Every key carries a
description (``ptxseg config show`` lists them).

``--config NAME_OR_FILE``: a value with a path separator or a ``.yaml``/``.yml`` suffix is a
file; anything else is a built-in name (:func:`resolve_config_path`), so a folder called
``demo`` in the current directory never hides the built-in ``demo`` config.

YAML is read by one loader (:func:`load_yaml`, a ``SafeLoader``), for config files and
``--set`` values alike. A config never needs more than plain mappings, lists and scalars:
anchors and aliases (``&a``, ``*a``: the "billion laughs" bomb) are refused, not expanded; so
are duplicate keys (naming the key and both lines), nesting deeper than :data:`MAX_DEPTH`,
more than :data:`MAX_NODES` keys and values, and a file over :data:`MAX_BYTES`. Messages quote
nothing of a file that is not valid YAML or not a ptxseg config, and of one that is, at most a
short escaped excerpt (:func:`excerpt`).
"""

from __future__ import annotations

import difflib
import os
import re
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
from ptxseg.errors import ConfigError, DataError, one_line

__all__ = [
    "AugmentConfig", "Config", "DataConfig", "LossConfig", "ModelConfig", "OptimConfig",
    "TrainConfig", "load_config", "save_config", "describe_keys", "resolve_config_path",
]

BUILTIN_DIR = Path(__file__).parent / "configs"
#: the largest config file read (the full paper.yaml: about 2 KB)
MAX_BYTES = 256 << 10
#: the deepest nesting of a config (sections, keys and a list value: 3)
MAX_DEPTH = 16
#: the most keys and values (YAML nodes) of a config (the full paper.yaml: about 120)
MAX_NODES = 10_000
_EXCERPT = 60  # characters of a value quoted in a message
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,39}")  # a key that may be quoted as is


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


def excerpt(value: Any, limit: int = _EXCERPT) -> str:
    """``repr(value)`` for a message: one line, control characters escaped, cut to ``limit``
    characters (``...`` marks the cut)."""
    text = one_line(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key_name(loc: tuple[Any, ...]) -> str | None:
    """The dotted key of a pydantic error location, or ``None`` when a part is not a plain
    name (it is then not quoted: it may be a line of a file that is not a config)."""
    parts = [str(p) for p in loc]
    return ".".join(parts) if all(_NAME.fullmatch(p) for p in parts) else None


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = _key_name(first["loc"])
    if first["type"] == "extra_forbidden":
        if key is None:
            msg = "an unknown key that is not a config key name (not shown)"
        else:
            msg = f"unknown key '{key}'"
            close = suggest_key(key)
            if close:
                msg += f" (did you mean {close}?)"
    elif first["type"] == "value_error" and len(first["loc"]) <= 1:
        # a rule over several keys of a section (a model validator): its message names them
        msg = str(first["msg"]).removeprefix("Value error, ")
    else:
        msg = f"'{key or '?'}': {first['msg']} (got {excerpt(first.get('input'))})"
    more = len(err.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return f"{source}: {msg}"


# ---------------------------------------------------------------------------------------------
# YAML


class _Refused(Exception):
    """YAML that the config loader refuses (see the module doc)."""


def _line(mark: Any) -> str:
    return f"line {mark.line + 1}"


def _both(first: Any, second: Any) -> str:
    """``lines 2 and 3``, or ``line 1, columns 2 and 9`` (an inline mapping)."""
    if first.line != second.line:
        return f"lines {first.line + 1} and {second.line + 1}"
    return f"line {first.line + 1}, columns {first.column + 1} and {second.column + 1}"


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases, duplicate keys, or more than
    :data:`MAX_DEPTH` levels and :data:`MAX_NODES` nodes: each refused where it is met, before
    anything is expanded or recursed into."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(f"YAML anchors and aliases (&name, *name) are not allowed in a "
                           f"config ({_line(event.start_mark)})")  # fmt: skip
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES} keys and values (not a config)")
        if not isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels ({_line(event.start_mark)}; "
                           "not a config)")  # fmt: skip
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: PyYAML refuses it
            key = self.construct_object(key_node)
            first = seen.setdefault(key, key_node.start_mark)
            if first is not key_node.start_mark:
                raise _Refused(f"duplicate key {excerpt(key, 40)} "
                               f"({_both(first, key_node.start_mark)})")  # fmt: skip
        return super().construct_mapping(node, deep)


_TOKEN = re.compile(r"'<[\w ]+>'")  # a token's name in a PyYAML problem: '<block end>'
_QUOTED = re.compile(r"""\s*('[^']*'|"[^"]*")""")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without a word of the text: PyYAML's problem with its quoted
    parts (pieces of the file) left out, and the line and column."""
    if isinstance(exc, yaml.reader.ReaderError):
        return f"not text: a control character at byte {exc.position}"
    problem = str(getattr(exc, "problem", None) or getattr(exc, "context", None) or "")
    problem = _QUOTED.sub(lambda m: m.group() if _TOKEN.fullmatch(m.group(1)) else "", problem)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + one_line(problem.strip()[:120] or type(exc).__name__)


def load_yaml(text: str, source: str) -> Any:
    """Parse config YAML (a file's text or a ``--set`` value) with the one loader.

    Raises:
        ConfigError: refused YAML (see the module doc), naming ``source``.
        yaml.YAMLError: not valid YAML (:func:`_yaml_problem` says why without quoting it).
    """
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except RecursionError:  # not reached within MAX_DEPTH; the last guard
        raise ConfigError(f"{source}: nested too deeply (not a config)") from None
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict[str, Any]:
    from ptxseg.fileio import read_bytes

    try:
        raw = read_bytes(path, "config", missing="config file not found", limit=MAX_BYTES)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a config (not UTF-8 text: byte {exc.start})") from None
    try:
        data = load_yaml(text, str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    named = [k for k in data if isinstance(k, str) and _NAME.fullmatch(k)]
    if data and not any(k in Config.model_fields or suggest_key(k) for k in named):
        raise ConfigError(
            f"{path}: not a ptxseg config (none of its {len(data)} top-level keys is a "
            f"section: {', '.join(Config.model_fields)})"
        )
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


def _shown(item: str) -> str:
    """A ``--set`` item for a message: one line, at most 200 characters."""
    text = one_line(item)
    return text if len(text) <= 200 else text[:197] + "..."


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> (["train", "epochs"], 3); the value is parsed as YAML by the
    config's loader (:func:`load_yaml`: an alias bomb is refused here as in a file) and kept as
    text when it is not valid YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {_shown(item)}: expected key=value, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {_shown(item)}: empty key")
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"--set {_shown(key)}: a value longer than {MAX_BYTES} characters")
    try:
        value = load_yaml(raw, f"--set {_shown(key)}") if raw.strip() else None
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
                raise ConfigError(f"--set {_shown(item)}: '{part}' is not a section")
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
