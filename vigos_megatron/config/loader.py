"""Typed configuration: dataclasses, loaded from YAML and overridden from the command line.

``load_config(Schema, "conf/x.yaml", ["loss.clip=0.1"])`` merges, in order, the
dataclass defaults, the YAML file and ``key=value`` overrides (OmegaConf dotlist
syntax), converts the result back to the dataclass, and calls ``validate()`` on
every nested dataclass that defines it. Any problem (unknown key, wrong type,
invalid value) raises :class:`ConfigError` naming the file or the option, before
any process group is started.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or option is invalid; the message names it."""


def _validate_tree(obj, prefix: str = "") -> None:
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        _validate_tree(getattr(obj, f.name), f"{prefix}{f.name}.")
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as e:
            raise ConfigError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.structured(schema)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(p))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{p}: {_describe(e)}") from None
        except Exception as e:  # YAML syntax errors
            raise ConfigError(f"{p}: {e}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {_describe(e)}") from None
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    _validate_tree(obj)
    return obj


def _describe(e) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    return f"option {key!r}: {msg}" if key else msg


def to_yaml(obj) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(obj))
