"""Your own files end to end: two real ranks, a tokenizer trained on the corpus, the cache reused;
bad data input as a user meets it: one line, exit 2, nothing written."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from tests.helpers import REPO, own_lines, read_metrics, run_export, run_ramp

pytestmark = pytest.mark.slow


def stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def write_corpus(corpus: Path) -> list[Path]:
    """50 .txt files and one .jsonl of 10 records, from the standard library's sources (returned)."""
    corpus.mkdir()
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    for path in stdlib[:50]:
        (corpus / f"{path.stem}.txt").write_bytes(path.read_bytes())
    rows = [{"text": path.read_text(errors="replace"), "origin": path.name} for path in stdlib[50:]]
    (corpus / "more.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return stdlib


def assert_export_carries_the_tokenizer(run_dir: Path, out: Path, cache: Path, text: str) -> None:
    """The export of the run folder (its newest checkpoint) holds the run's tokenizer, which loads and
    encodes as training did, its end-of-document token also padding, as the model's config says."""
    from transformers import AutoTokenizer

    run_export(run_dir, out, cache)
    saved = run_dir / "tokenizer.json"
    assert (out / "tokenizer.json").read_bytes() == saved.read_bytes()
    expected = Tokenizer.from_file(str(saved)).encode(text).ids
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(text)["input_ids"] == expected
    config = json.loads((out / "config.json").read_text())
    eos_id = json.loads((run_dir / "checkpoints" / "step_6" / "meta.json").read_text())["eos_id"]
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert (
        tokenizer.eos_token_id
        == tokenizer.pad_token_id
        == config["eos_token_id"]
        == config["pad_token_id"]
        == eos_id
    )
    assert tokenizer.model_max_length == config["n_positions"]


def test_text_corpus_with_a_trained_tokenizer_then_a_cached_second_run(tmp_path: Path) -> None:
    stdlib = write_corpus(tmp_path / "corpus")
    cache = tmp_path / "cache"
    common = [
        "data=text",
        "data.files=[corpus/*.txt,corpus/*.jsonl]",
        "data.tokenizer=train",
        "data.vocab_size=512",
        "data.val_fraction=0.1",
        "train.max_steps=6",
        "train.log_every=1",
        "train.eval_every=3",
        "train.eval_steps=2",
        "logger.wandb.mode=disabled",
    ]
    first = run_ramp([*common, "run.name=first"], cwd=tmp_path, cache_dir=cache)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "ramp | data: trained a byte-level BPE of 512 tokens" in first.stdout
    assert "reusing cached tokens" not in first.stdout
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]

    run_dir = tmp_path / "outputs" / "first"
    train, evals = read_metrics(run_dir)
    assert [r["step"] for r in train] == list(range(1, 7))
    assert [r["tokens"] for r in train] == [4096 * k for k in range(1, 7)]
    for record in train:
        assert math.isfinite(record["loss"])
        assert record["loss"] < math.log(512) + 1
        # a part of the step: measured, not asserted to be small (speed is for bench/, not tests)
        assert 0 <= record["data_wait_s"] <= record["step_time"]
    assert [e["step"] for e in evals] == [3, 6]
    for record in evals:
        assert record["val_ppl"] == pytest.approx(math.exp(record["val_loss"]))

    # the run folder holds the tokenizer its checkpoints need: the very one the tokens were made with
    saved = run_dir / "tokenizer.json"
    assert saved.read_bytes() == (entry / "tokenizer.json").read_bytes()
    tokenizer = Tokenizer.from_file(str(saved))
    assert tokenizer.get_vocab_size() == 512
    text = stdlib[0].read_text()
    assert tokenizer.decode(tokenizer.encode(text).ids) == text

    before = stats(entry)
    second = run_ramp([*common, "run.name=second"], cwd=tmp_path, cache_dir=cache)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"ramp | data: reusing cached tokens in {entry}" in second.stdout
    assert "tokenizing" not in second.stdout
    assert "trained a byte-level BPE" not in second.stdout
    assert stats(entry) == before  # not rewritten: same files, same modification times
    assert [p for p in cache.iterdir() if p.is_dir()] == [entry]
    assert (tmp_path / "outputs" / "second" / "tokenizer.json").read_bytes() == saved.read_bytes()
    # the same data and seed: the second run trains on exactly the first run's batches
    assert [r["loss"] for r in read_metrics(tmp_path / "outputs" / "second")[0]] == [r["loss"] for r in train]
    assert_export_carries_the_tokenizer(run_dir, tmp_path / "hf", cache, text)


def test_missing_file_end_to_end_exits_2_with_one_line(tmp_path: Path, cache_dir: Path) -> None:
    result = run_ramp(
        ["data=text", "data.files=corpus/*.txt"], cwd=tmp_path, cache_dir=cache_dir, nproc=0, timeout=120
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "ramp: error: data.files=corpus/*.txt matches no file; check the pattern and the working folder"
    )
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "outputs").exists()


def test_offline_tokenizer_and_dataset_fail_under_torchrun_once(tmp_path: Path, cache_dir: Path) -> None:
    """The hub dataset fails inside the node's builder; the waiting rank must not hang."""
    (tmp_path / "a.txt").write_text("hello")
    tokenizer = run_ramp(
        ["data=text", "data.files=a.txt", "data.tokenizer=ramp-tests/no-such-tokenizer"],
        cwd=tmp_path,
        cache_dir=cache_dir,
        timeout=120,
    )
    dataset = run_ramp(
        ["data=hf", "data.path=ramp-tests/no-such-dataset"], cwd=tmp_path, cache_dir=cache_dir, timeout=120
    )
    for result, key in (
        (tokenizer, "data.tokenizer=ramp-tests/no-such-tokenizer"),
        (dataset, "data.path=ramp-tests/no-such-dataset"),
    ):
        assert result.returncode != 0
        errors = [line for line in own_lines(result.stderr) if line.startswith("ramp: error:")]
        assert len(errors) == 1, result.stderr
        assert key in errors[0], result.stderr
        assert "offline" in errors[0].lower() or "HF_HUB_OFFLINE" in errors[0]
        assert f'File "{REPO / "trainer"}' not in result.stderr, (
            "no traceback from ramp (torchrun prints its own)"
        )
    assert not (tmp_path / "outputs").exists()
