"""Keep secrets out of everything ramp writes: config dumps, wandb, tensorboard, the console, metrics.

A secret is the value of a config key or an environment variable whose name looks like a key, token
or password (``WANDB_API_KEY``, ``HF_TOKEN``, ``model.extra.hub_token``). Config values under such
names are masked in every copy of the config ramp writes; the values themselves (from the
environment, and from the config once :func:`redact` has seen it) are also scrubbed from any text
that leaves the process through logging, error messages and the command line wandb records.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

SECRET_NAME = re.compile(
    r"(?<![a-z])(?<!eos_)(?<!bos_)(?<!pad_)(?<!unk_)(?<!sep_)(?<!cls_)(?<!mask_)"
    r"(token|secret|password|passwd|passphrase|credentials?|auth|api_?key|access_?key|private_?key)(?![a-z])",
    re.IGNORECASE,
)
"""Whole words only: ``HF_TOKEN``, ``WANDB_API_KEY`` and ``hub_token`` are secret names; ``tokenizer``,
``tokens`` and a tokenizer's special tokens (``eos_token``) are not."""
MASK = "***"
MIN_SECRET_LEN = 8
"""Shorter values are masked under secret-named keys but not scrubbed from free text, where masking
every "1234" would mangle numbers and still protect nothing a short value protects."""

_config_secrets: set[str] = set()
"""Secret values found in configs by :func:`redact`: the console filter scrubs them too. Process-wide
because logging is; it only ever grows, and holds nothing but values to hide."""


def secret_values() -> set[str]:
    """Every value to scrub from text: secret-named environment variables and config secrets seen."""
    from_env = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LEN}
    return from_env | _config_secrets


def scrub(text: str, secrets: set[str] | None = None) -> str:
    """``text`` with every secret value replaced by the mask (longest first, so none is half-masked)."""
    for secret in sorted(secret_values() if secrets is None else secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def _find_secrets(value: Any, under_secret: bool = False) -> None:
    """Remember every value under a secret-named key, so free text can be scrubbed of it as well."""
    if isinstance(value, dict):
        for key, item in value.items():
            _find_secrets(item, under_secret or bool(SECRET_NAME.search(str(key))))
    elif isinstance(value, list):
        for item in value:
            _find_secrets(item, under_secret)
    elif under_secret and value is not None and len(str(value)) >= MIN_SECRET_LEN:
        _config_secrets.add(str(value))


def _mask(value: Any, secrets: set[str]) -> Any:
    if isinstance(value, dict):
        return {
            k: (MASK if SECRET_NAME.search(str(k)) and v not in (None, "") else _mask(v, secrets))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_mask(v, secrets) for v in value]
    if isinstance(value, str):
        return scrub(value, secrets)
    return value


def redact(config: Any) -> Any:
    """A copy of a config tree with secret-named keys masked and every known secret value scrubbed."""
    _find_secrets(config)
    return _mask(config, secret_values())


class RedactFilter(logging.Filter):
    """Scrubs secret values from every log record before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Swap in the scrubbed message when a secret is in it; always True: no record is dropped."""
        secrets = secret_values()
        if secrets:
            message = record.getMessage()
            clean = scrub(message, secrets)
            if clean != message:
                record.msg, record.args = clean, None
        return True


@contextlib.contextmanager
def scrubbed_argv() -> Iterator[None]:
    """``sys.argv`` with secrets masked, for the length of a block: wandb records the command line."""
    original = sys.argv
    secrets = secret_values()
    sys.argv = [scrub(arg, secrets) for arg in original]
    try:
        yield
    finally:
        sys.argv = original
