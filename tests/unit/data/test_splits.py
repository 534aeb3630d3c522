"""How documents and the validation slice are cut: .txt split modes, one-document corpora held out by
tokens, and a hub dataset's cache entry keyed by the commit its revision resolves to."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainer.config import HFData, TextData, compose
from trainer.data import prepare
from trainer.data.pack import is_validation, split_tokens
from trainer.data.sources import HFSource, split_text
from trainer.data.store import cache_key
from trainer.errors import ConfigError


@pytest.mark.parametrize(
    ("count", "fraction", "held"), [(1000, 0.01, 10), (1001, 0.01, 11), (5, 0.01, 1), (2, 0.9, 1)]
)
def test_one_document_is_split_as_nanogpt_splits_its_file(count: int, fraction: float, held: int) -> None:
    tokens = np.arange(count)
    train, val = split_tokens(tokens, fraction)
    assert len(val) == held  # ceil(fraction x count), at least one, never all
    assert np.array_equal(np.concatenate([train, val]), tokens)


@pytest.mark.parametrize("hashed_into", ["train", "val"])
def test_a_one_file_corpus_holds_out_its_last_tokens(hashed_into: str, tmp_path: Path) -> None:
    """Wherever the hash puts the one document, its head trains and its tail validates; the split point
    gets no end-of-document token (the document goes on), its end does."""
    text = b"".join(b"line %d of one document\n" % i for i in range(500))
    suffix = 0  # a text the hash sends where this case wants it (deterministic: the first such suffix)
    while is_validation(text + b"%d" % suffix, 0.05) != (hashed_into == "val"):
        suffix += 1
    text += b"%d" % suffix
    (tmp_path / "book.txt").write_bytes(text)
    cfg = TextData(files=str(tmp_path / "book.txt"), cache_dir=str(tmp_path / "cache"), val_fraction=0.05)
    _, build_entry, _ = prepare(cfg)
    files = build_entry()
    held = -(-len(text) * 5 // 100)  # bytes: one token a byte
    assert files.meta["val_split"] == "tokens"
    assert files.meta["documents"] == {"train": 1, "val": 0}
    assert bytes(files.tokens("train").astype(np.uint8)) == text[:-held]
    assert bytes(files.tokens("val")[:-1].astype(np.uint8)) == text[-held:]
    assert files.tokens("val")[-1] == files.meta["eos_id"]


def test_a_corpus_the_hash_sends_wholly_to_validation_keeps_a_document_to_train(tmp_path: Path) -> None:
    texts: list[bytes] = []
    i = 0
    while len(texts) < 3:  # three documents the hash holds out at data.val_fraction=0.05
        candidate = b"document number %d, held out\n" % i * 20
        if is_validation(candidate, 0.05):
            texts.append(candidate)
        i += 1
    for n, text in enumerate(texts):
        (tmp_path / f"{n}.txt").write_bytes(text)
    cfg = TextData(files=str(tmp_path / "*.txt"), cache_dir=str(tmp_path / "cache"), val_fraction=0.05)
    _, build_entry, _ = prepare(cfg)
    files = build_entry()
    assert files.meta["documents"] == {"train": 1, "val": 2}
    assert bytes(files.tokens("train")[:-1].astype(np.uint8)) == texts[-1]


@pytest.mark.parametrize(
    ("sample_by", "documents"),
    [
        ("document", [b"a\r\nb\n\n\nc  \n\n"]),
        ("paragraph", [b"a\nb", b"\nc  "]),
        ("line", [b"a", b"b", b"c  "]),
    ],
)
def test_txt_split_modes_read_as_datasets_text_builder_reads(sample_by: str, documents: list[bytes]) -> None:
    assert split_text(b"a\r\nb\n\n\nc  \n\n", sample_by) == documents


def test_a_split_mode_that_does_not_exist_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"data\.sample_by=sentence must be document, paragraph or line"):
        compose(["data=text", "data.files=x.txt", "data.sample_by=sentence"])


def test_the_hub_cache_entry_follows_the_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, the commit comes from huggingface_hub's cache (refs/<revision>); a new commit there is a
    new cache entry, so it is tokenized anew."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    refs = tmp_path / "datasets--someone--corpus" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    (refs / "v2").write_text("b" * 40)
    source = HFSource(HFData(path="someone/corpus"))
    first = cache_key(source, "bytes", 0.01)
    assert source.fingerprint()["revision"] == "a" * 40
    (refs / "main").write_text("c" * 40)  # the main branch moved
    assert cache_key(source, "bytes", 0.01) != first
    assert HFSource(HFData(path="someone/corpus", revision="v2")).fingerprint()["revision"] == "b" * 40
    assert HFSource(HFData(path="someone/corpus", revision="d" * 40)).fingerprint()["revision"] == "d" * 40
    unknown = HFSource(HFData(path="someone/other")).fingerprint()["revision"]
    assert unknown == "unresolved main"
    assert json.dumps(source.fingerprint())  # the key stays JSON
