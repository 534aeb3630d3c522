"""The two ways a run ends early on purpose, each with its own exit code; anything may import this.

Both carry a message meant for the user: the entry points print it as one ``ramp: error:`` line,
without a traceback, and exit with :attr:`exit_code`.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration, file or checkpoint a run cannot start with (exit 2).

    The message names the key (or file) that is wrong and a fix that works.
    """

    exit_code = 2


class TrainingHalted(RuntimeError):
    """The run cannot go on, e.g. a non-finite update with ``train.on_nan=halt`` (exit 3).

    The message says why and what to do; the run's last checkpoint is intact.
    """

    exit_code = 3
