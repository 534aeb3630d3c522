"""Where documents come from.

A source yields batches of non-empty document texts in a fixed order, describes itself for the
cache key (``fingerprint``: cheap, computed on every rank, changes when the data does) and names the
key that selects it (``describe``) for error messages.

Checks that need no reading (a missing file, a glob that matches nothing, a missing field in the
first record) run in the constructor on every rank; the rest fail while the cache is built.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from trainer.config import BuiltinData, DataConfig, HFData, TextData
from trainer.data.tokenizer import Text
from trainer.errors import ConfigError

Batch = list[Text]
"""Documents' texts, none empty."""

BATCH_DOCUMENTS = 1024
BATCH_BYTES = 8 << 20
"""A batch is tokenized in one call: big enough to keep every core busy, small enough to stream."""


class Source(Protocol):
    """Where documents come from, as the token cache reads them."""

    describe: str

    def fingerprint(self) -> dict[str, object]:
        """What the cache key hashes: cheap to compute, and changed whenever the data changes."""

    def batches(self) -> Iterator[Batch]:
        """The documents' texts in batches, always in the same order."""


def batched(documents: Iterable[Text]) -> Iterator[Batch]:
    """The non-empty texts in batches, each closed at BATCH_DOCUMENTS texts or BATCH_BYTES of text."""
    texts: list[Text] = []
    size = 0
    for text in documents:
        if not text:
            continue
        texts.append(text)
        size += len(text)
        if len(texts) >= BATCH_DOCUMENTS or size >= BATCH_BYTES:
            yield texts
            texts, size = [], 0
    if texts:
        yield texts


def file_stats(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """Path, size and modification time: a file that changes changes the cache key."""
    stats = []
    for path in paths:
        info = path.stat()
        stats.append((str(path), info.st_size, info.st_mtime_ns))
    return stats


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

    describe = "data=builtin"

    def __init__(self) -> None:
        self.root = Path(sysconfig.get_paths()["stdlib"])
        self.files = stdlib_files()
        if not self.files:
            raise ConfigError(
                f"data=builtin found no .py files under {self.root}; this Python install has no "
                "standard library sources, so pick another data source (data=text or data=hf)"
            )

    def fingerprint(self) -> dict[str, object]:
        """The standard library's folder, and each file's relative path, size and modification time."""
        stats = [
            (str(p.relative_to(self.root)), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in self.files
        ]
        return {"source": "builtin", "root": str(self.root), "files": stats}

    def batches(self) -> Iterator[Batch]:
        """Each file's bytes as one document, in sorted path order."""
        return batched(path.read_bytes() for path in self.files)


def as_list(files: Any) -> list[str]:
    """A files value (None, one string or a list) as a list of strings."""
    if files is None:
        return []
    return [files] if isinstance(files, str) else [str(f) for f in files]


def override_value(patterns: list[str]) -> str:
    """How the user wrote the value on the command line: a path, or [a,b]."""
    return patterns[0] if len(patterns) == 1 else f"[{','.join(patterns)}]"


def resolve_files(patterns: list[str], key: str, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Expand paths, globs (``**`` included) and folders into sorted files, each named once.

    A folder stands for the files under it with one of ``suffixes``.

    Raises:
        ConfigError: a glob that matches no file, a folder without such files, a path that does not exist.
    """
    found: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if Path(p).is_file()]
            if not matches:
                raise ConfigError(
                    f"{key}={pattern} matches no file; check the pattern and the working folder"
                )
        elif Path(expanded).is_dir():
            matches = sorted(
                p for p in Path(expanded).rglob("*") if p.is_file() and (not suffixes or p.suffix in suffixes)
            )
            if not matches:
                wanted = f" with a suffix of {', '.join(suffixes)}" if suffixes else ""
                raise ConfigError(f"{key}={pattern} is a folder without files{wanted}")
        elif Path(expanded).is_file():
            matches = [Path(expanded)]
        else:
            raise ConfigError(f"{key}={pattern} does not exist; check the path and the working folder")
        found.extend(path.resolve() for path in matches)
    return list(dict.fromkeys(found))


def _first_record(path: Path) -> dict[str, Any] | None:
    """The first record of a JSON-lines file, or None when the file is empty or a JSON array."""
    with open(path, "rb") as handle:
        for line in handle:
            stripped = line.strip()
            if not stripped:
                continue
            if stripped.startswith(b"["):
                return None
            try:
                record = json.loads(stripped)
            except json.JSONDecodeError as err:
                raise ConfigError(f"data.files: {path} is not JSON lines ({err}); fix the file") from None
            if not isinstance(record, dict):
                raise ConfigError(f"data.files: {path} holds {type(record).__name__}s, not JSON objects")
            return record
    return None


def _missing_field(field: str, path: Path, fields: Iterable[str]) -> ConfigError:
    return ConfigError(
        f"data.text_field={field} is not a field of {path} (it has: {', '.join(fields) or 'none'}); "
        "set data.text_field to the field that holds the text"
    )


def split_text(raw: bytes, sample_by: str) -> list[bytes]:
    """A .txt file's documents, as ``datasets``' text builder (4.x) splits it with ``sample_by``: the
    whole file (``document``, as read), or, after universal newlines (\\r\\n and \\r read as \\n), its
    paragraphs (``paragraph``: split at \\n\\n) or lines (``line``: split at \\n, without it). Empty
    pieces are no documents."""
    if sample_by == "document":
        return [raw]
    text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    pieces = text.split(b"\n") if sample_by == "line" else text.split(b"\n\n")
    return [piece for piece in pieces if piece]


class TextSource:
    """data=text: local files. A .txt file is one document; a .jsonl, .json or .parquet record is one."""

    SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")

    def __init__(self, cfg: TextData) -> None:
        patterns = as_list(cfg.files)
        if not patterns:
            raise ConfigError(
                "data=text needs data.files: a path, glob or folder, e.g. data.files=[corpus/*.txt]"
            )
        self.describe = f"data.files={override_value(patterns)}"
        self.field = cfg.text_field
        self.sample_by = cfg.sample_by
        self.files = resolve_files(patterns, "data.files", self.SUFFIXES)
        for path in self.files:
            if path.suffix not in self.SUFFIXES:
                raise ConfigError(
                    f"data.files: {path} is not a {', '.join(self.SUFFIXES)} file; ramp reads those, and "
                    "data=hf reads more formats through datasets"
                )
            self._check_field(path)

    def _check_field(self, path: Path) -> None:
        if path.suffix in (".jsonl", ".json"):
            record = _first_record(path)
            if record is not None and self.field not in record:
                raise _missing_field(self.field, path, record)
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            if self.field not in names:
                raise _missing_field(self.field, path, names)

    def fingerprint(self) -> dict[str, object]:
        """Each file's path, size and modification time, the text field and how .txt files split."""
        stats: dict[str, object] = {
            "source": "text",
            "files": file_stats(self.files),
            "text_field": self.field,
        }
        return stats if self.sample_by == "document" else {**stats, "sample_by": self.sample_by}

    def batches(self) -> Iterator[Batch]:
        """The documents in file order: runs of .txt files batched together (split by ``data.sample_by``),
        records file by file."""
        for is_text, paths in itertools.groupby(self.files, key=lambda p: p.suffix == ".txt"):
            if is_text:  # consecutive .txt files share batches
                yield from batched(
                    piece for path in paths for piece in split_text(path.read_bytes(), self.sample_by)
                )
            else:
                for path in paths:
                    yield from self._records(path)

    def _records(self, path: Path) -> Iterator[Batch]:
        for texts in self._record_texts(path):
            yield [text for text in texts if text]  # a record without text is no document

    def _record_texts(self, path: Path) -> Iterator[list[Any]]:
        import pyarrow as pa

        try:
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                for batch in pq.ParquetFile(path).iter_batches(
                    batch_size=BATCH_DOCUMENTS, columns=[self.field]
                ):
                    yield _strings(batch.column(0).to_pylist(), self.field, str(path))
            elif _is_json_array(path):
                records = json.loads(path.read_bytes())
                for start in range(0, len(records), BATCH_DOCUMENTS):
                    chunk = records[start : start + BATCH_DOCUMENTS]
                    texts = [r.get(self.field) if isinstance(r, dict) else None for r in chunk]
                    yield _strings(texts, self.field, str(path))
            elif _first_record(path) is not None:  # else a blank file: no documents
                yield from self._json_lines(path)
        except (pa.ArrowInvalid, json.JSONDecodeError) as err:
            raise ConfigError(
                f"data.files: {path} cannot be read ({str(err).splitlines()[0]}); check that it is valid "
                f"and that data.text_field={self.field} holds text"
            ) from None

    def _json_lines(self, path: Path) -> Iterator[list[Any]]:
        import pyarrow as pa
        import pyarrow.json as pj

        # Parse only the text field, in C++, a block at a time: other fields may hold anything.
        options = pj.ParseOptions(
            explicit_schema=pa.schema([(self.field, pa.string())]), unexpected_field_behavior="ignore"
        )
        reader = pj.open_json(
            path, read_options=pj.ReadOptions(block_size=BATCH_BYTES), parse_options=options
        )
        for batch in reader:
            yield batch.column(0).to_pylist()


def _strings(values: list[Any], field: str, where: str) -> list[Any]:
    """The values, once each is checked to be text (or missing)."""
    for value in values:
        if value is not None and not isinstance(value, str):
            raise ConfigError(
                f"data.text_field={field} of {where} holds a {type(value).__name__}, not text; "
                "set data.text_field to a field that holds strings"
            )
    return values


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    return head.startswith(b"[")


def hub_commit(path: str, revision: str | None) -> str:
    """The commit a hub dataset's ``revision`` (default ``main``) resolves to: a commit hash as given,
    else asked of the hub (``HfApi.dataset_info``), else, offline or unreachable, read from
    huggingface_hub's local cache (``datasets--<org>--<name>/refs/<revision>``); ``unresolved <revision>``
    when neither knows it (loading it then fails with its own message)."""
    import huggingface_hub
    from huggingface_hub import constants

    wanted = revision or "main"
    if len(wanted) == 40 and all(ch in "0123456789abcdef" for ch in wanted):
        return wanted
    if not constants.HF_HUB_OFFLINE and os.environ.get("HF_DATASETS_OFFLINE") != "1":
        try:
            sha = huggingface_hub.HfApi().dataset_info(path, revision=wanted, timeout=30).sha
            if sha:
                return str(sha)
        except Exception:  # no network, no such dataset: the local cache may still know
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}" / "refs" / wanted
    return ref.read_text().strip() if ref.is_file() else f"unresolved {wanted}"


class HFSource:
    """data=hf: anything datasets.load_dataset reads, plus folders written by save_to_disk."""

    BUILDERS = ("json", "parquet", "text", "csv", "arrow")

    def __init__(self, cfg: HFData) -> None:
        if not cfg.path:
            raise ConfigError(
                "data=hf needs data.path: a hub dataset name, a local data folder, a save_to_disk folder, or "
                "a builder (json, parquet, text, csv) with data.files"
            )
        self.cfg = cfg
        self.path: str = cfg.path
        self.describe = f"data.path={cfg.path}"
        local = Path(cfg.path).expanduser()
        self.files: list[Path] = []
        if cfg.path in self.BUILDERS:
            if not as_list(cfg.files):
                raise ConfigError(
                    f"data.path={cfg.path} reads data.files; set it, e.g. data.files=[data/*.{cfg.path}l]"
                )
            self.kind = "builder"
            self.files = resolve_files(as_list(cfg.files), "data.files")
        elif local.is_dir():
            saved = any(
                (local / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json")
            )
            self.kind = "disk" if saved else "folder"
            self.files = sorted(p for p in local.rglob("*") if p.is_file() and ".cache" not in p.parts)
        elif cfg.path.startswith(("/", "./", "../", "~")) and not local.exists():
            raise ConfigError(f"data.path={cfg.path} does not exist; check the path and the working folder")
        elif local.exists():
            raise ConfigError(
                f"data.path={cfg.path} is a file; use data.path=json (or parquet, text, csv) with "
                f"data.files={cfg.path}, or data=text"
            )
        else:
            self.kind = "hub"

    def fingerprint(self) -> dict[str, object]:
        """The dataset's kind, path, name, split and text field, and its local files' sizes and times."""
        c = self.cfg
        return {
            "source": "hf",
            "kind": self.kind,
            "path": str(Path(self.path).expanduser().resolve())
            if self.kind in ("disk", "folder")
            else self.path,
            "name": c.name,
            "split": c.split,
            "text_field": c.text_field,
            "files": file_stats(self.files),
            **({"revision": hub_commit(self.path, c.revision)} if self.kind == "hub" else {}),
        }

    def load(self) -> Any:
        """The split as a datasets Dataset or IterableDataset; downloads happen here, on the builder.

        Raises:
            ConfigError: data.split is not a split of a save_to_disk folder, or datasets cannot load it.
        """
        import datasets

        c = self.cfg
        try:
            if self.kind == "disk":
                loaded = datasets.load_from_disk(str(Path(self.path).expanduser()))
                if isinstance(loaded, datasets.DatasetDict):
                    if c.split not in loaded:
                        raise ConfigError(
                            f"data.split={c.split} is not a split of data.path={c.path}; it has: "
                            f"{', '.join(loaded)}"
                        )
                    loaded = loaded[c.split]
                return loaded
            data_files = [str(p) for p in self.files] if self.kind == "builder" else as_list(c.files) or None
            path = str(Path(self.path).expanduser()) if self.kind == "folder" else self.path
            return datasets.load_dataset(
                path,
                c.name,
                split=c.split,
                data_files=data_files,
                streaming=c.streaming,
                revision=c.revision if self.kind == "hub" else None,
            )
        except ConfigError:
            raise
        except Exception as err:  # datasets raises many kinds: offline, not found, unknown split, bad file
            raise ConfigError(f"{self.describe} cannot be loaded: {self._hint(err)}") from None

    def _hint(self, err: Exception) -> str:
        text = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        if "split" in text.lower():
            return f"{text}; set data.split to one of the dataset's splits"
        if self.kind == "hub" and (
            os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        ):
            return (
                f"{text}; HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set and it is not in the local cache: run once "
                "with network access, or point data.path at a local folder"
            )
        return f"{text}; check data.path and data.name"

    def batches(self) -> Iterator[Batch]:
        """The text field's non-empty values, BATCH_DOCUMENTS rows at a time.

        Raises:
            ConfigError: the dataset cannot be loaded, or data.text_field is not one of its text columns.
        """
        dataset = self.load()
        field = self.cfg.text_field
        columns = dataset.column_names
        if columns is None:  # a stream without declared features: look at its first row
            first = next(iter(dataset), None)
            columns = list(first) if first is not None else [field]
        if field not in columns:
            raise ConfigError(
                f"data.text_field={field} is not a column of {self.describe} (it has: {', '.join(columns)}); "
                "set data.text_field to the column that holds the text"
            )
        rows = dataset.select_columns([field])
        if self.cfg.streaming or not hasattr(rows, "with_format"):
            chunks: Iterator[list[Any]] = (b[field] for b in rows.iter(batch_size=BATCH_DOCUMENTS))
        else:
            chunks = (
                t.column(field).to_pylist()
                for t in rows.with_format("arrow").iter(batch_size=BATCH_DOCUMENTS)
            )
        for texts in chunks:
            yield [text for text in _strings(texts, field, self.describe) if text]


def build_source(cfg: DataConfig) -> Source:
    """The source the data option selects: data=text, data=hf or data=builtin."""
    if isinstance(cfg, TextData):
        return TextSource(cfg)
    if isinstance(cfg, HFData):
        return HFSource(cfg)
    assert isinstance(cfg, BuiltinData), cfg
    return BuiltinSource()
