"""Keep secrets out of everything ramp writes: config dumps, wandb, the console, metrics."""

from __future__ import annotations

import os
import re
from typing import Any

SECRET_NAME = re.compile(r"(token|secret|password|passwd|api_?key|credential|auth)", re.IGNORECASE)
MASK = "***"


def _secret_values() -> set[str]:
    return {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8}


def redact(value: Any, _secrets: set[str] | None = None) -> Any:
    """A copy of a config tree with secret-named keys masked and any secret env value scrubbed."""
    secrets = _secret_values() if _secrets is None else _secrets
    if isinstance(value, dict):
        return {
            k: (MASK if SECRET_NAME.search(str(k)) and v not in (None, "") else redact(v, secrets))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, MASK)
    return value
