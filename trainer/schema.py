"""How a configuration key is declared: a dataclass field with a docstring and one fact beside it.

Every key of every schema (``trainer.config``, ``trainer.schedules``) is declared with
:func:`setting`, which records in the field's metadata what changing the key does when a run
resumes from a checkpoint (:class:`OnResume`). :mod:`trainer.resume` enforces it and the README's
key table shows it; the docstring under the field is the key's documentation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import Field, field
from enum import Enum
from typing import Any

MISSING = "???"
"""OmegaConf's marker of a value the config must supply (``omegaconf.MISSING``), without importing it."""

ON_RESUME = "on_resume"


class OnResume(str, Enum):
    """What a key changed between a checkpoint and the run that resumes from it does."""

    applies = "applies"
    """Put into effect; what is computed stays the same (logging cadence, paths, speed settings)."""
    changes_math = "applies, changes the math"
    """Put into effect from the next step, and the training math changes (LR, schedule, AdamW's betas)."""
    refused = "refused"
    """The checkpoint's state cannot honour it (model shape, data, parameter groups): the resume is refused
    before anything is written; keep the checkpoint's value, or start a new run."""


def setting(
    default: Any = NO_DEFAULT, *, on_resume: OnResume, factory: Callable[[], Any] | None = None
) -> Any:
    """A schema field: its default (or a ``factory`` for a mutable one) and what a change on resume does.

    Args:
        default: the value when neither a preset nor an override sets the key.
        on_resume: what changing the key between a checkpoint and the resumed run does.
        factory: builds a mutable default (a list or dict) afresh for each instance.

    Returns:
        A ``dataclasses.field`` carrying ``{"on_resume": on_resume}`` as metadata.
    """
    metadata = {ON_RESUME: on_resume}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def on_resume(declared: Field[Any]) -> OnResume:
    """What a schema field declared about a change on resume (a field without the fact is refused).

    Args:
        declared: a field of one of ramp's schema dataclasses.
    """
    return OnResume(declared.metadata.get(ON_RESUME, OnResume.refused))
