"""The base of every error that is the user's to fix (a bad option, path, checkpoint or data set).

:class:`ConfigError` is a bad configuration option; ``require_*`` are the checks every ``validate()``
method repeats, raising it with the option's name. Entry points and tools catch :class:`UserError` and print one line naming the option, file or row,
with a hint (:func:`vigos_megatron.training.console.run_cli`); anything else is a bug and keeps
its traceback. Each subclass lives with the code that raises it and sets :attr:`hint`.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in the user's input; ``str(e)`` names the option, file or row."""

    #: what to do about it, one short clause
    hint = "fix the input named above"


class ConfigError(UserError, ValueError):
    """A configuration file or option is invalid; the message names it."""

    hint = "fix the option in the YAML file or the key=value override"


# --------------------------------------------------------------------------- the checks of validate() methods


def require_at_least(obj, minimum, *names: str) -> None:
    """``ConfigError("<name>: must be >= <minimum>, got <value>")`` for the first field below ``minimum``."""
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            raise ConfigError(f"{name}: must be >= {minimum}, got {value}")


def require_positive(obj, *names: str) -> None:
    """``ConfigError("<name>: must be > 0, got <value>")`` for the first field that is not positive."""
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"{name}: must be > 0, got {value}")


def require_one_of(obj, name: str, choices) -> None:
    """``ConfigError("<name>: must be one of <choices>, got <value>")`` unless the field is one of ``choices``."""
    value = getattr(obj, name)
    if value not in choices:
        raise ConfigError(f"{name}: must be one of {choices}, got {value!r}")
