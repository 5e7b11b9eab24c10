"""The base of every error that is the user's to fix (a bad option, path, checkpoint or data set).

Entry points and tools catch :class:`UserError` and print one line naming the option, file or row,
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
