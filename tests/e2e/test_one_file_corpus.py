"""One plain text file as the corpus, as a new user's first run: validation held out by tokens when the
file is one document, or by a hash of each paragraph or line (data.sample_by), on 2 ranks."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import read_metrics, run_ramp

pytestmark = pytest.mark.slow


def corpus(path: Path, size: int) -> Path:
    """A book-sized plain text file (the standard library's sources, in name order, until ``size`` bytes):
    the same on every machine with this Python."""
    out = bytearray()
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        out += source.read_bytes()
        if len(out) >= size:
            break
    path.write_bytes(bytes(out[:size]))
    return path


def cache_meta(cache_dir: Path, text: str) -> dict:
    """The meta.json of the one cache entry whose source is ``text``."""
    metas = [json.loads(m.read_text()) for m in cache_dir.glob("*/meta.json")]
    found = [m for m in metas if m["source"] == text]
    assert len(found) == 1, [m["source"] for m in metas]
    return found[0]


@pytest.mark.timeout(300)
def test_the_one_file_command_from_the_issue_trains_and_logs_val_loss(tmp_path: Path) -> None:
    """The command exactly as a new user types it: the file is one document, so the last 1% of its
    tokens validate; training and evaluation run with the defaults (8 x 256 tokens a rank)."""
    corpus(tmp_path / "corpus.txt", 1_100_000)
    cache = tmp_path / "cache"
    overrides = ["data=text", "data.files=corpus.txt", "data.tokenizer=train", "data.vocab_size=512"]
    overrides += ["train.max_steps=12", "train.eval_every=6", "logger.wandb.mode=disabled"]
    done = run_ramp(overrides, cwd=tmp_path, cache_dir=cache, nproc=2, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    said = done.stdout + done.stderr
    rule = "validation: the last tokens of the corpus, which is one document (split by tokens, as nanoGPT "
    assert rule + "splits its file), data.val_fraction=0.01)" in said
    _, evals = read_metrics(tmp_path / "outputs" / "gpt2-tiny")
    assert [e["step"] for e in evals] == [6, 12]
    meta = cache_meta(cache, "data.files=corpus.txt")
    assert meta["val_split"] == "tokens"
    total = (
        meta["tokens"]["train"] + meta["tokens"]["val"]
    )  # the document's tokens and its end-of-document one
    assert meta["tokens"]["val"] - 1 == -(-(total - 1) * 1 // 100)  # ceil(1% of the document's tokens)
    assert meta["documents"] == {"train": 1, "val": 0}


@pytest.mark.parametrize("sample_by", ["paragraph", "line"])
@pytest.mark.timeout(240)
def test_each_txt_split_mode_trains_on_2_ranks_with_the_documents_datasets_reads(
    sample_by: str, tmp_path: Path
) -> None:
    import datasets

    path = corpus(tmp_path / "corpus.txt", 200_000)
    cache = tmp_path / "cache"
    overrides = ["data=text", "data.files=corpus.txt", f"data.sample_by={sample_by}", "train.seq_len=64"]
    overrides += [
        "train.micro_batch_size=4",
        "train.max_steps=4",
        "train.eval_every=2",
        "logger.wandb.mode=disabled",
    ]
    done = run_ramp(overrides, cwd=tmp_path, cache_dir=cache, nproc=2, timeout=200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (
        "validation: documents held out by a hash of their text, data.val_fraction=0.01"
        in done.stdout + done.stderr
    )
    _, evals = read_metrics(tmp_path / "outputs" / "gpt2-tiny")
    assert [e["step"] for e in evals] == [2, 4]
    # The documents are those datasets' text builder reads with the same sample_by, its empty ones aside.
    reference = datasets.load_dataset(
        "text", data_files=str(path), sample_by=sample_by, split="train", cache_dir=str(tmp_path / "hf")
    )["text"]
    expected = [t for t in reference if t]
    meta = cache_meta(cache, "data.files=corpus.txt")
    assert meta["val_split"] == "documents"
    assert meta["documents"]["train"] + meta["documents"]["val"] == len(expected)
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == sum(len(t.encode()) + 1 for t in expected)
