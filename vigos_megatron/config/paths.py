"""Every path option of a training run checked on the file system, before any process group or model.

:func:`check_paths` raises :class:`~vigos_megatron.config.loader.ConfigError` naming the option and
the path (``model.hf_path: /x: no such directory``). The paths that the tiny demo's asset cache
provides (``model.hf_path``, ``data.loader.shards_dir``, ``data.context.processor_path`` with
``tiny.enabled``) are not checked: they are written before the run starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from typing import TYPE_CHECKING

from vigos_megatron.config.loader import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from vigos_megatron.config.train import PretrainConfig


def _directory(option: str, path: str, *, must_hold: tuple[str, ...] = (), what: str = "") -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{option}: {p}: no such directory")
    if not p.is_dir():
        raise ConfigError(f"{option}: {p}: not a directory")
    if not os.access(p, os.R_OK | os.X_OK):
        raise ConfigError(f"{option}: {p}: not readable")
    if must_hold and not any((p / name).exists() for name in must_hold):
        raise ConfigError(f"{option}: {p}: not {what} (none of {', '.join(must_hold)})")
    return p


def _file(option: str, path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{option}: {p}: no such file")
    if not p.is_file():
        raise ConfigError(f"{option}: {p}: not a file")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"{option}: {p}: not readable")
    return p


def _writable_directory(option: str, path: str) -> Path:
    """``path`` is (made) a directory in which a file can be written."""
    import tempfile

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option}: {p}: exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{option}: {p}: not a writable directory ({e.strerror or e})") from None
    return p


def _shards(option: str, path: str) -> Path:
    p = _directory(option, path)
    if not (p / "manifest.json").is_file() and not any(p.glob("*.tar")):
        raise ConfigError(f"{option}: {p}: holds no WebDataset shards (no manifest.json or *.tar; "
                          "tools/make_webdataset.py writes them)")
    return p


def _hf_model(option: str, path: str) -> Path:
    return _directory(option, path, must_hold=("config.json",), what="a Hugging Face model directory")


def _megatron_checkpoint(option: str, path: str) -> None:
    from vigos_megatron.convert.megatron_checkpoint import resolve_checkpoint
    from vigos_megatron.models.hf_checkpoint import CheckpointError

    _directory(option, path)
    try:
        resolve_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"{option}: {e}") from None


def check_paths(cfg: "PretrainConfig") -> None:
    """Check the path options of ``cfg`` (a :class:`~vigos_megatron.config.train.PretrainConfig`)."""
    _writable_directory("run_dir", cfg.run_dir)
    _file("data.context.prompts_path", cfg.data.context.prompts_path)
    for option, path in (("model.init_checkpoint", cfg.model.init_checkpoint),
                         ("model.teacher.init_checkpoint", cfg.model.teacher.init_checkpoint)):
        if path:
            _megatron_checkpoint(option, path)
    if cfg.model.teacher.hf_path:
        _hf_model("model.teacher.hf_path", cfg.model.teacher.hf_path)
    if cfg.tiny.enabled:
        return
    if cfg.model.hf_path and not cfg.model.init_checkpoint:
        _hf_model("model.hf_path", cfg.model.hf_path)
    _shards("data.loader.shards_dir", cfg.data.loader.shards_dir)
    _directory("data.context.processor_path", cfg.data.context.processor_path,
               must_hold=("tokenizer.json", "tokenizer_config.json"), what="a tokenizer / processor directory")
