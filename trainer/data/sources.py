"""Where documents come from. Each source yields (document id, text bytes) in a fixed order and
describes itself for the cache key."""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from trainer.config import ConfigError


def stdlib_files() -> list[Path]:
    """The Python standard library's .py sources, sorted: a real, varied corpus on every install."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        path
        for path in root.rglob("*.py")
        if "site-packages" not in path.parts and "dist-packages" not in path.parts
    ]
    return sorted(files)


class BuiltinSource:
    """data=builtin: about 30 MB of Python source, one document per file."""

    def __init__(self) -> None:
        self.root = Path(sysconfig.get_paths()["stdlib"])
        self.files = stdlib_files()
        if not self.files:
            raise ConfigError(
                f"data=builtin found no .py files under {self.root}; this Python install has no "
                "standard library sources, so pick another data source"
            )

    def fingerprint(self) -> dict[str, object]:
        stats = [
            (str(p.relative_to(self.root)), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in self.files
        ]
        return {"source": "builtin", "root": str(self.root), "files": stats}

    def documents(self) -> Iterator[tuple[str, bytes]]:
        for path in self.files:
            yield str(path.relative_to(self.root)), path.read_bytes()
