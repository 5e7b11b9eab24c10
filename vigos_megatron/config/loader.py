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

from vigos_megatron.errors import ConfigError  # noqa: F401  (raised here and by every validate())

T = TypeVar("T")


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
        cfg = _merge_file(cfg, Path(path))
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


#: top-level YAML key mapping a dotted config key to a YAML file merged there first
COMPOSE_KEY = "compose"


def _load_yaml(p: Path):
    from omegaconf import OmegaConf

    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return OmegaConf.load(p)
    except Exception as e:  # YAML syntax errors
        raise ConfigError(f"{p}: {e}") from None


def _resolve(ref: str, base: Path) -> Path:
    """A composed file: relative to the including file's directory, else to the working directory."""
    p = Path(ref)
    if p.is_absolute() or p.is_file():
        return p
    return base / p


def _merge_file(cfg, p: Path, depth: int = 0):
    """Merge YAML file ``p`` into ``cfg``. ``compose: {model: conf/model/tiny.yaml, ...}`` merges each
    named file at its key first, so the file's own values override the composed pieces."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if depth > 8:
        raise ConfigError(f"{p}: compose nesting deeper than 8 (a cycle?)")
    raw = _load_yaml(p)
    composed = raw.pop(COMPOSE_KEY, None) if OmegaConf.is_dict(raw) else None
    if composed is not None:
        if not OmegaConf.is_dict(composed):
            raise ConfigError(f"{p}: '{COMPOSE_KEY}' must map config keys to YAML files")
        for key, ref in composed.items():
            piece = _load_yaml(_resolve(str(ref), p.parent))
            try:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([]) if piece is None else _at_key(str(key), piece))
            except OmegaConfBaseException as e:
                raise ConfigError(f"{p}: {COMPOSE_KEY}.{key} ({ref}): {_describe(e)}") from None
    try:
        return OmegaConf.merge(cfg, raw)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{p}: {_describe(e)}") from None


def _at_key(key: str, piece):
    from omegaconf import OmegaConf

    node = piece
    for part in reversed(key.split(".")):
        node = {part: node}
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.create(node)))


def _describe(e) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    return f"option {key!r}: {msg}" if key else msg


def to_yaml(obj) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(obj))
