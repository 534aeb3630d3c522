"""How a configuration key is declared: a dataclass field with a docstring and one fact beside it.

Every key of every schema (``trainer.config``, ``trainer.schedules``) is declared with
:func:`setting`, which records in the field's metadata whether changing the key between a
checkpoint and the run that resumes from it changes the math (what is computed, as opposed to how
fast, how often it is logged or where it is written). The resume report and the README's key table
read that fact from here; the docstring under the field is the key's documentation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import Field, field
from typing import Any

MISSING = "???"
"""OmegaConf's marker of a value the config must supply (``omegaconf.MISSING``), without importing it."""

CHANGES_MATH = "changes_math"


def setting(default: Any = NO_DEFAULT, *, math: bool, factory: Callable[[], Any] | None = None) -> Any:
    """A schema field: its default (or a ``factory`` for a mutable one) and whether it changes the math.

    Args:
        default: the value when neither a preset nor an override sets the key.
        math: True when changing the key on resume changes what is computed (``optim.lr``),
            False when it does not (``train.log_every``).
        factory: builds a mutable default (a list or dict) afresh for each instance.

    Returns:
        A ``dataclasses.field`` carrying ``{"changes_math": math}`` as metadata.
    """
    metadata = {CHANGES_MATH: math}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def changes_math(declared: Field[Any]) -> bool:
    """Whether a schema field was declared with ``math=True`` (a field without the fact counts as math).

    Args:
        declared: a field of one of ramp's schema dataclasses.
    """
    return bool(declared.metadata.get(CHANGES_MATH, True))
