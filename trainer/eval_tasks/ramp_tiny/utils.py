"""The loader of ramp_tiny's items: the JSONL next to this file, wherever ramp is installed (a task YAML's
``data_files`` would be read relative to the current directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ITEMS = Path(__file__).with_name("ramp_tiny.jsonl")


def load(**metadata: Any) -> Any:
    """The items as a ``DatasetDict`` with one ``test`` split (lm-eval passes the task's metadata; unused)."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(ITEMS)})
