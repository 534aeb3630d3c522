"""Bad data input: one ConfigError naming the key and the fix, before any training starts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trainer.config import Config, DataConfig, HFData, TextData, compose
from trainer.data import build_data, prepare
from trainer.distributed import DistInfo
from trainer.errors import ConfigError

ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


def config(*overrides: str) -> Config:
    return compose(overrides)


def build(cfg: DataConfig) -> None:
    _, build_entry, _ = prepare(cfg)
    build_entry()


def raises(cfg: DataConfig, *needles: str) -> str:
    with pytest.raises(ConfigError) as excinfo:
        build(cfg)
    message = str(excinfo.value)
    for needle in needles:
        assert needle in message
    return message


def test_a_missing_file_or_a_glob_that_matches_nothing(tmp_path: Path) -> None:
    raises(
        TextData(files=str(tmp_path / "nope.txt"), cache_dir=str(tmp_path)),
        f"data.files={tmp_path}/nope.txt",
        "does not exist",
    )
    raises(
        TextData(files=[str(tmp_path / "*.jsonl")], cache_dir=str(tmp_path)), "data.files=", "matches no file"
    )
    raises(TextData(cache_dir=str(tmp_path)), "data=text needs data.files")
    (tmp_path / "notes.docx").write_text("x")
    raises(TextData(files=str(tmp_path / "notes.docx"), cache_dir=str(tmp_path)), "data.files", "notes.docx")
    raises(
        HFData(path="json", files=str(tmp_path / "missing/*.jsonl"), cache_dir=str(tmp_path)),
        "data.files=",
        "matches no file",
    )
    raises(
        HFData(path="./no/such/folder", cache_dir=str(tmp_path)),
        "data.path=./no/such/folder",
        "does not exist",
    )
    raises(HFData(cache_dir=str(tmp_path)), "data=hf needs data.path")


def test_an_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": None}) + "\n")
    (tmp_path / "d.jsonl").write_text("")
    files = [str(tmp_path / name) for name in ("a.txt", "b.txt", "c.jsonl", "d.jsonl")]
    raises(TextData(files=files, cache_dir=str(tmp_path / "cache")), "data.files=[", "holds no text")
    assert not any((tmp_path / "cache").iterdir()), "nothing is cached for a failed build"


def test_a_text_field_that_does_not_exist(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"body": "hello", "id": 1}) + "\n")
    raises(TextData(files=str(jsonl), cache_dir=str(tmp_path)), "data.text_field=text", "body, id")
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": ["hello"]}), parquet)
    raises(TextData(files=str(parquet), cache_dir=str(tmp_path)), "data.text_field=text", "content")
    numbers = tmp_path / "b.jsonl"
    numbers.write_text(json.dumps({"text": 5}) + "\n")
    raises(TextData(files=str(numbers), cache_dir=str(tmp_path)), "data.text_field=text")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"content": ["hello"]}).save_to_disk(str(saved))
    raises(HFData(path=str(saved), cache_dir=str(tmp_path)), "data.text_field=text", "content")
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["hello"]})}).save_to_disk(str(splits))
    raises(
        HFData(path=str(splits), split="test", cache_dir=str(tmp_path)), "data.split=test", "it has: train"
    )


def test_a_corpus_shorter_than_one_sample(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 5)  # 60 bytes each
    files = f"data.files={tmp_path}/*.txt"
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    with pytest.raises(ConfigError) as excinfo:
        build_data(config("data=text", files, cache, "train.seq_len=256"), ONE_PROCESS)
    assert f"data.files={tmp_path}/*.txt holds" in str(excinfo.value)
    assert "train.seq_len + 1 = 257" in str(excinfo.value)
    with pytest.raises(ConfigError, match="fewer than one micro-batch for every rank"):
        build_data(
            config("data=text", files, cache, "train.seq_len=16", "train.micro_batch_size=64"), ONE_PROCESS
        )


def test_tokenizers_that_cannot_be_loaded(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    text = str(tmp_path / "a.txt")
    raises(
        TextData(files=text, tokenizer=str(tmp_path / "missing.json")), "data.tokenizer=", "does not exist"
    )
    (tmp_path / "broken.json").write_text('{"version": "1.0", "model": 5}')
    raises(
        TextData(files=text, tokenizer=str(tmp_path / "broken.json")),
        "data.tokenizer=",
        "not a valid tokenizer.json",
    )
    empty_folder = tmp_path / "folder"
    empty_folder.mkdir()
    raises(
        TextData(files=text, tokenizer=str(empty_folder)),
        f"data.tokenizer={empty_folder}",
        "cannot be loaded",
    )


def test_a_tokenizer_without_an_end_of_document_token(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1, "[END]": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "t.json"))
    (tmp_path / "a.txt").write_text("hello hello")
    cfg = TextData(files=str(tmp_path / "a.txt"), tokenizer=str(tmp_path / "t.json"), cache_dir=str(tmp_path))
    raises(cfg, "has no end-of-document token", "data.eos_token")
    cfg.eos_token = "[STOP]"
    raises(cfg, "data.eos_token=[STOP] is not in the vocabulary")
    cfg.eos_token = "[END]"
    _, build_entry, _ = prepare(cfg)
    assert build_entry().meta["eos_id"] == 2


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["data.tokenizer=train", "data.vocab_size=100"], "data.vocab_size=100"),
        (["data.num_proc=0"], "data.num_proc=0"),
        (["data=text", "data.files={a: 1}"], "data.files="),
        (["data.val_fraction=1.0"], "data.val_fraction"),
    ],
)
def test_bad_values_fail_at_start_up(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
        config(*overrides)


def test_a_micro_batch_larger_than_the_validation_slice_names_the_batch_and_the_fixes_that_work(
    tmp_path: Path,
) -> None:
    """100 documents of 200 bytes, 10% held out: about 2,000 validation tokens, 125 windows of 16."""
    for i in range(100):
        (tmp_path / f"{i}.txt").write_text(f"{i:03d} " + "w" * 196)
    base = ["data=text", f"data.files={tmp_path}/*.txt", f"data.cache_dir={tmp_path / 'cache'}"]
    base += ["train.seq_len=16", "data.val_fraction=0.1"]
    with pytest.raises(ConfigError) as excinfo:
        build_data(config(*base, "train.micro_batch_size=200"), ONE_PROCESS)
    message = str(excinfo.value)
    val_tokens = int(message.split(" holds ")[1].split()[0])
    windows = (val_tokens - 1) // 16
    assert message == (
        f"the validation slice of data.files={tmp_path}/*.txt (data.val_fraction=0.1) holds {val_tokens} tokens, "
        f"{windows} windows of train.seq_len=16: fewer than one micro-batch for every rank, "
        f"train.micro_batch_size=200; lower train.micro_batch_size to {windows} or less, lower train.seq_len to "
        f"{(val_tokens - 1) // 200} or less, raise data.val_fraction to 0.2, or set train.eval_every=0 to skip "
        "evaluation"
    )
    # Each fix it offers works.
    for fix in (f"train.micro_batch_size={windows}", "data.val_fraction=0.2", "train.eval_every=0"):
        build_data(config(*base, "train.micro_batch_size=200", fix), ONE_PROCESS)
    build_data(
        config(*base, "train.micro_batch_size=200", f"train.seq_len={(val_tokens - 1) // 200}"), ONE_PROCESS
    )
    # A batch the whole corpus cannot hold twice over: no fraction helps, so none is offered.
    with pytest.raises(ConfigError) as excinfo:
        build_data(config(*base, "train.micro_batch_size=1000"), ONE_PROCESS)
    assert "data.val_fraction to" not in str(excinfo.value)
    assert "train.seq_len to" not in str(excinfo.value)  # 2 tokens a sequence is no fix
    assert str(excinfo.value).endswith(
        f"train.micro_batch_size=1000; lower train.micro_batch_size to {windows} or less, or set "
        "train.eval_every=0 to skip evaluation"
    )


def test_a_micro_batch_larger_than_the_training_slice_names_the_batch(tmp_path: Path) -> None:
    for i in range(10):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 20)  # 240 bytes each
    files = f"data.files={tmp_path}/*.txt"
    cfg = config(
        "data=text",
        files,
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.seq_len=16",
        "train.micro_batch_size=500",
    )
    with pytest.raises(ConfigError) as excinfo:
        build_data(cfg, ONE_PROCESS)
    message = str(excinfo.value)
    windows = int(message.split(" has ")[1].split()[0])
    assert message == (
        f"{files} has {windows} training windows of train.seq_len=16, fewer than one micro-batch for every rank: "
        f"train.micro_batch_size=500; lower train.micro_batch_size to {windows} or less, lower train.seq_len to "
        f"{(windows * 16) // 500} or less, or add text"
    )


FIX = re.compile(r"(?:lower|raise) (\S+) to (\S+?)(?: or less)?(?:,|$)|set (\S+=\S+)")
"""A fix a data error offers: "lower K to V or less", "raise K to V" or "set K=V"."""


def offered_fixes(message: str) -> list[str]:
    """Every override the message's fixes name, as key=value."""
    return [f"{m[0]}={m[1]}" if m[0] else m[2] for m in FIX.findall(message)]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        # One file, too short for a sample of the default sequence.
        ("short", ["train.seq_len"]),
        # One file, too few windows for the micro-batch.
        ("batch", ["train.micro_batch_size", "train.seq_len"]),
        # One file held out by tokens: its validation slice too small for the micro-batch.
        ("val", ["train.micro_batch_size", "train.seq_len", "data.val_fraction", "train.eval_every"]),
    ],
)
def test_every_fix_a_data_error_offers_makes_the_run_start(
    case: str, expected: list[str], tmp_path: Path
) -> None:
    text = {"short": "one short file. " * 10, "batch": "word " * 2_000, "val": "word " * 20_000}[case]
    (tmp_path / "corpus.txt").write_text(text)
    base = ["data=text", f"data.files={tmp_path / 'corpus.txt'}", f"data.cache_dir={tmp_path / 'cache'}"]
    base += {
        "short": ["train.eval_every=0"],
        "batch": ["train.seq_len=64", "train.micro_batch_size=200", "train.eval_every=0"],
        "val": ["train.seq_len=64", "train.micro_batch_size=32"],
    }[case]
    with pytest.raises(ConfigError) as excinfo:
        build_data(config(*base), ONE_PROCESS)
    fixes = offered_fixes(str(excinfo.value))
    assert [fix.split("=")[0] for fix in fixes] == expected, str(excinfo.value)
    for fix in fixes:
        data = build_data(config(*base, fix), ONE_PROCESS)
        assert data.train.num_samples >= 1, fix


def test_a_validation_slice_error_never_offers_a_sequence_length_below_one() -> None:
    """A corpus of a few tokens at train.seq_len=1 (the fix the training error offered): the validation
    error offers what can work, not ``lower train.seq_len to 0``."""
    from trainer.data import _check_val_batch

    with pytest.raises(ConfigError) as raised:
        _check_val_batch(
            "data.files=tiny.txt", 9, 2, config("train.seq_len=1", "train.micro_batch_size=1"), 2
        )
    assert "train.seq_len to" not in str(raised.value)
    assert str(raised.value).endswith("set train.eval_every=0 to skip evaluation")
