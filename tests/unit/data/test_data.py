"""Sources, tokenizers and the token cache, on real files the tests write: exact tokens, split by document."""

from __future__ import annotations

import json
import logging
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from trainer.config import DataConfig, HFData, TextData, compose
from trainer.data import build_data, prepare
from trainer.data.pack import is_validation
from trainer.data.store import TokenFiles
from trainer.distributed import DistInfo
from trainer.models import build_model

if TYPE_CHECKING:
    from typing_extensions import Unpack

EOS = 256  # the byte tokenizer's end-of-document token

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "Grüße aus Köln — ünïcödé survives byte-level tokenizing.",
    "# a comment\nprint('hello world')\n" * 3,
    "short",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n",
    "λ x: x ** 2  # squares",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
]


def build(cfg: DataConfig) -> TokenFiles:
    _, build_entry, _ = prepare(cfg)
    return build_entry()


def split_documents(tokens: np.ndarray, eos: int) -> list[list[int]]:
    """Token ids between end-of-document tokens (every document ends with one)."""
    ids = tokens.tolist()
    assert not ids or ids[-1] == eos, "a packed file ends with the end-of-document token"
    docs: list[list[int]] = []
    current: list[int] = []
    for token in ids:
        if token == eos:
            docs.append(current)
            current = []
        else:
            current.append(token)
    return docs


def expected_split(texts: list[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """Positions of training and validation documents under ramp's contract: a hash of the text picks
    validation documents; when it picks none, the last training document moves to validation."""
    val = [i for i, text in enumerate(texts) if is_validation(text, val_fraction)]
    train = [i for i in range(len(texts)) if i not in val]
    if not val and len(train) >= 2:
        val, train = [train[-1]], train[:-1]
    return train, val


def assert_byte_documents(files: TokenFiles, texts: list[str], val_fraction: float) -> None:
    train_pos, val_pos = expected_split(texts, val_fraction)
    assert val_pos, "the test corpus must populate both splits"
    assert train_pos, "the test corpus must populate both splits"
    for split, positions in (("train", train_pos), ("val", val_pos)):
        tokens = files.tokens(split)
        expected = b"".join(texts[i].encode() + b"\x00" for i in positions)
        assert tokens.dtype == np.uint16
        assert len(tokens) == len(expected) == files.meta["tokens"][split]
        assert files.meta["documents"][split] == len(positions)
        decoded = [bytes(doc).decode() for doc in split_documents(np.asarray(tokens), EOS)]
        assert decoded == [texts[i] for i in positions]


def write_txt(folder: Path, texts: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        path = folder / f"doc{i:02d}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def test_text_files_are_one_document_each_and_byte_exact(tmp_path: Path) -> None:
    write_txt(tmp_path / "corpus", DOCS)
    cfg = TextData(
        files=str(tmp_path / "corpus" / "*.txt"), val_fraction=0.25, cache_dir=str(tmp_path / "cache")
    )
    files = build(cfg)
    assert files.meta["vocab_size"] == 257
    assert files.meta["eos_id"] == EOS
    assert files.tokenizer_file is None
    assert_byte_documents(files, DOCS, 0.25)


def test_a_folder_and_a_list_of_globs_name_the_same_files(tmp_path: Path) -> None:
    write_txt(tmp_path / "corpus", DOCS)
    by_folder = build(TextData(files=str(tmp_path / "corpus"), cache_dir=str(tmp_path / "a")))
    by_globs = build(
        TextData(
            files=[str(tmp_path / "corpus" / "doc0*.txt"), str(tmp_path / "corpus" / "*.txt")],
            cache_dir=str(tmp_path / "b"),
        )
    )
    assert by_folder.path.name == by_globs.path.name  # same files, each once: the same cache key
    assert (by_folder.path / "train.bin").read_bytes() == (by_globs.path / "train.bin").read_bytes()


def test_jsonl_and_json_records_read_the_text_field(tmp_path: Path) -> None:
    rows = [{"body": text, "id": i, "meta": {"tags": ["x"] * i}} for i, text in enumerate(DOCS[:5])]
    rows.insert(2, {"body": None, "id": 99})  # no text: skipped
    rows.insert(3, {"body": "", "id": 98})  # empty: skipped
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"body": text} for text in DOCS[5:]], indent=2))
    cfg = TextData(
        files=[str(jsonl), str(array)], text_field="body", val_fraction=0.3, cache_dir=str(tmp_path / "c")
    )
    files = build(cfg)
    assert_byte_documents(files, DOCS, 0.3)


def test_parquet_records_read_the_text_field(tmp_path: Path) -> None:
    path = tmp_path / "docs.parquet"
    table = pa.table({"n": list(range(len(DOCS))), "content": DOCS})
    pq.write_table(table, path, row_group_size=3)  # several row groups
    cfg = TextData(files=str(path), text_field="content", val_fraction=0.3, cache_dir=str(tmp_path / "c"))
    files = build(cfg)
    assert_byte_documents(files, DOCS, 0.3)


def test_hf_save_to_disk_folder_and_its_splits(tmp_path: Path) -> None:
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))}).save_to_disk(str(single))
    files = build(HFData(path=str(single), val_fraction=0.3, cache_dir=str(tmp_path / "c")))
    assert_byte_documents(files, DOCS, 0.3)

    both = tmp_path / "dict"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["unused"]}),
            "test": datasets.Dataset.from_dict({"text": DOCS}),
        }
    ).save_to_disk(str(both))
    files = build(HFData(path=str(both), split="test", val_fraction=0.3, cache_dir=str(tmp_path / "c")))
    assert_byte_documents(files, DOCS, 0.3)


def test_hf_json_builder_with_files_streamed_or_not(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    for part in range(2):
        rows = DOCS[part * 4 : part * 4 + 4]
        (tmp_path / "data" / f"part{part}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in rows))
    files_glob = str(tmp_path / "data" / "*.jsonl")
    loaded = build(HFData(path="json", files=files_glob, val_fraction=0.3, cache_dir=str(tmp_path / "a")))
    assert_byte_documents(loaded, DOCS, 0.3)
    streamed = build(
        HFData(path="json", files=files_glob, streaming=True, val_fraction=0.3, cache_dir=str(tmp_path / "b"))
    )
    assert (streamed.path / "train.bin").read_bytes() == (loaded.path / "train.bin").read_bytes()
    assert (streamed.path / "val.bin").read_bytes() == (loaded.path / "val.bin").read_bytes()


def test_hf_local_data_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in DOCS))
    files = build(HFData(path=str(folder), val_fraction=0.3, cache_dir=str(tmp_path / "c")))
    assert_byte_documents(files, DOCS, 0.3)


# --- tokenizers -------------------------------------------------------------------------------------------


def corpus_texts(count: int = 40) -> list[str]:
    """Varied, realistic text: docstrings and code of the standard library's modules."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [path.read_text(encoding="utf-8", errors="replace") for path in sorted(root.glob("*.py"))[:count]]


def bpe(texts: list[str], vocab_size: int, eos: str) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def assert_tokenized_with(files: TokenFiles, texts: list[str], tokenizer: Tokenizer, eos_id: int) -> None:
    train_pos, val_pos = expected_split(texts, files.meta["val_fraction"])
    for split, positions in (("train", train_pos), ("val", val_pos)):
        expected = [tokenizer.encode(texts[i], add_special_tokens=False).ids for i in positions]
        assert split_documents(np.asarray(files.tokens(split)), eos_id) == expected


def test_tokenizer_json_path(tmp_path: Path) -> None:
    texts = corpus_texts(20)
    tokenizer = bpe(texts, 600, "<|endoftext|>")
    tokenizer_file = tmp_path / "tok" / "tokenizer.json"
    tokenizer_file.parent.mkdir()
    tokenizer.save(str(tokenizer_file))
    write_txt(tmp_path / "corpus", texts)
    cfg = TextData(
        files=str(tmp_path / "corpus"),
        tokenizer=str(tokenizer_file),
        val_fraction=0.2,
        cache_dir=str(tmp_path / "c"),
    )
    files = build(cfg)
    eos_id = tokenizer.token_to_id("<|endoftext|>")
    assert isinstance(eos_id, int)
    assert files.meta["eos_id"] == eos_id
    assert files.meta["vocab_size"] == tokenizer.get_vocab_size() == 600
    assert files.tokenizer_file is not None
    assert files.tokenizer_file.read_text() == tokenizer_file.read_text()  # saved with the tokens, as given
    assert_tokenized_with(files, texts, tokenizer, eos_id)


def test_autotokenizer_folder_with_its_own_eos_token(tmp_path: Path) -> None:
    texts = corpus_texts(20)
    folder = tmp_path / "my-tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=bpe(texts, 500, "</doc>"), eos_token="</doc>").save_pretrained(
        folder
    )
    reference = AutoTokenizer.from_pretrained(folder)
    eos_id = reference.convert_tokens_to_ids("</doc>")
    assert isinstance(eos_id, int)
    write_txt(tmp_path / "corpus", texts)
    cfg = TextData(
        files=str(tmp_path / "corpus"), tokenizer=str(folder), val_fraction=0.2, cache_dir=str(tmp_path / "c")
    )
    files = build(cfg)
    assert files.meta["eos_id"] == eos_id
    assert files.meta["vocab_size"] == len(reference) == 500
    assert files.tokenizer_file is not None
    assert_tokenized_with(files, texts, reference.backend_tokenizer, eos_id)
    # the saved tokenizer.json is a working copy of the folder's tokenizer
    saved = Tokenizer.from_file(str(files.tokenizer_file))
    assert saved.encode(texts[0]).ids == reference(texts[0], add_special_tokens=False)["input_ids"]


def test_train_learns_a_bpe_of_vocab_size_on_the_training_documents(tmp_path: Path) -> None:
    texts = corpus_texts(40)
    write_txt(tmp_path / "corpus", texts)

    def cfg(cache: str) -> TextData:
        return TextData(
            files=str(tmp_path / "corpus"),
            tokenizer="train",
            vocab_size=700,
            val_fraction=0.1,
            cache_dir=str(tmp_path / cache),
        )

    files = build(cfg("a"))
    assert files.meta["vocab_size"] == 700
    assert files.tokenizer_file is not None
    assert files.tokenizer_file.parent == files.path
    trained = Tokenizer.from_file(str(files.tokenizer_file))
    eos_id = trained.token_to_id("<|endoftext|>")
    assert isinstance(eos_id, int)
    assert files.meta["eos_id"] == eos_id
    for text in [*texts[:5], "Grüße, 世界! \t tabs\n\nand ünïcödé"]:
        assert trained.decode(trained.encode(text).ids) == text  # byte-level: everything round-trips
    assert_tokenized_with(files, texts, trained, eos_id)
    assert len(files.tokens("train")) < sum(len(t.encode()) for t in texts) / 2  # it does compress
    # training is deterministic: another node (here, another cache) learns the same tokenizer
    again = build(cfg("b"))
    assert again.tokenizer_file is not None
    assert again.tokenizer_file.read_text() == files.tokenizer_file.read_text()


def test_a_vocabulary_above_65536_is_stored_as_uint32(tmp_path: Path) -> None:
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<|endoftext|>"] = 70_000
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer_file = tmp_path / "big.json"
    tokenizer.save(str(tokenizer_file))
    texts = ["w1 w69999 w65536", "w5 w70 w65535 w12", "w3"]
    write_txt(tmp_path / "corpus", texts)
    files = build(
        TextData(
            files=str(tmp_path / "corpus"),
            tokenizer=str(tokenizer_file),
            val_fraction=0.3,
            cache_dir=str(tmp_path / "c"),
        )
    )
    assert files.meta["dtype"] == "uint32"
    assert files.meta["vocab_size"] == 70_001
    assert_tokenized_with(files, texts, tokenizer, 70_000)


def test_parallel_tokenizing_writes_the_same_tokens(tmp_path: Path) -> None:
    texts = corpus_texts(30)
    write_txt(tmp_path / "corpus", texts)
    tokenizer_file = tmp_path / "tokenizer.json"
    bpe(texts, 500, "<|endoftext|>").save(str(tokenizer_file))

    def cfg(num_proc: int, cache: str) -> TextData:
        return TextData(
            files=str(tmp_path / "corpus"),
            tokenizer=str(tokenizer_file),
            val_fraction=0.2,
            num_proc=num_proc,
            cache_dir=str(tmp_path / cache),
        )

    one = build(cfg(1, "one"))
    two = build(cfg(2, "two"))
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (one.path / name).read_bytes() == (two.path / name).read_bytes()


# --- the cache -------------------------------------------------------------------------------------------


def test_second_build_reuses_the_cache_without_tokenizing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_txt(tmp_path / "corpus", DOCS)
    cfg = TextData(
        files=str(tmp_path / "corpus"), tokenizer="train", vocab_size=300, cache_dir=str(tmp_path / "c")
    )
    with caplog.at_level(logging.INFO, logger="ramp"):
        first = build(cfg)
    assert "ramp | data: tokenizing" in caplog.text
    assert "reusing cached tokens" not in caplog.text
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.path.iterdir()}
    assert set(before) == {"train.bin", "val.bin", "meta.json", "tokenizer.json"}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ramp"):
        second = build(cfg)
    assert "reusing cached tokens" in caplog.text
    assert "tokenizing" not in caplog.text
    assert second.path == first.path
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in second.path.iterdir()} == before
    assert [p.name for p in (tmp_path / "c").iterdir()] == [first.path.name]  # no leftover staging folders


class TextChanges(TypedDict, total=False):
    """The ``TextData`` settings a cache-key test varies."""

    num_proc: int
    val_fraction: float
    tokenizer: str
    vocab_size: int


def test_the_cache_key_follows_source_tokenizer_and_split(tmp_path: Path) -> None:
    paths = write_txt(tmp_path / "corpus", DOCS)

    def entry(**changes: Unpack[TextChanges]) -> str:
        cfg = TextData(files=str(tmp_path / "corpus"), cache_dir=str(tmp_path / "c"), **changes)
        return prepare(cfg)[2].name

    key = entry()
    assert entry(num_proc=2) == key  # how it is built does not change what is built
    assert entry(val_fraction=0.5) != key
    assert entry(tokenizer="train") != key
    assert entry(tokenizer="train", vocab_size=300) != entry(tokenizer="train")
    paths[0].write_text("an edited document")
    assert entry() != key


def test_build_data_sizes_the_model_to_the_tokenizer(tmp_path: Path) -> None:
    write_txt(tmp_path / "corpus", corpus_texts(40))
    overrides = [
        "data=text",
        f"data.files={tmp_path / 'corpus'}",
        "data.tokenizer=train",
        "data.vocab_size=700",
        "data.val_fraction=0.2",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.eval_steps=1",
    ]
    cfg = compose(overrides)
    data = build_data(cfg, DistInfo(0, 0, 1, 1, torch.device("cpu")))
    assert data.vocab_size == 700
    assert data.tokenizer_file is not None
    model = build_model(cfg.model, tokenizer_vocab=data.vocab_size, eos_id=data.eos_id)
    assert isinstance(model, PreTrainedModel)
    assert model.get_input_embeddings().num_embeddings == 704  # padded up to a multiple of 64
    data.save_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == data.tokenizer_file.read_bytes()
    batch = data.train.next_batch()
    assert batch.shape == (8, 257)
    assert int(batch.max()) < 700
