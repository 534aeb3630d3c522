"""Exports load everywhere: a ``bytes`` run and a trained-BPE run, trained for real, exported, loaded by
AutoTokenizer and AutoModelForCausalLM with ramp's ids and ramp's logits (bf16 within bf16's rounding), a
model card holding the run's own numbers, and ``python -m trainer.sample`` printing continuations."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ramp_env, read_metrics, run_ramp
from trainer.data.tokenizer import ByteTokenizer
from trainer.export import load_model
from trainer.resume import read_meta

pytestmark = pytest.mark.slow

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "café",
    "naïve",
    "😀",
    "model",
    "data",
    "token",
    "learn",
]
TEXTS = [
    "hello world",
    "  leading spaces\n\nand newlines\n",
    "café naïve façade",
    "emoji 😀🎉 end",
    "tab\there",
    "a literal <|endoftext|> in a document",
]
TINY = [
    "train.max_steps=4",
    "train.seq_len=32",
    "train.micro_batch_size=2",
    "train.eval_every=2",
    "train.eval_steps=1",
    "train.ckpt_every=2",
    "logger.wandb.mode=disabled",
    "data=text",
    "data.files=corpus/*.txt",
    "data.val_fraction=0.1",
]
TOKENIZERS = {"bytes": ["data.tokenizer=bytes"], "bpe": ["data.tokenizer=train", "data.vocab_size=300"]}


def command(module: str, *args: str | Path, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` as a user runs it; its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        env=ramp_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A run folder of 4 real steps of gpt2-tiny on 20 small text files, with the tokenizer ``param``."""
    cwd = tmp_path_factory.mktemp(request.param)
    (cwd / "corpus").mkdir()
    rng = random.Random(0)
    for i in range(20):
        lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(30)]
        (cwd / "corpus" / f"d{i}.txt").write_text("\n".join(lines))
    result = run_ramp([*TINY, *TOKENIZERS[request.param]], cwd=cwd, cache_dir=cache_dir, nproc=0, timeout=240)
    assert result.returncode == 0, result.stderr
    return cwd / "outputs" / "gpt2-tiny"


@pytest.fixture(scope="module")
def exports(run: Path, cache_dir: Path) -> dict[str, Path]:
    """The run exported twice: fp32 (the default) and ``--dtype bf16``."""
    out = {"fp32": run.parent / "hf", "bf16": run.parent / "hf-bf16"}
    for dtype, folder in out.items():
        result = command("trainer.export", run, folder, "--dtype", dtype, cache_dir=cache_dir)
        assert result.returncode == 0, result.stderr
    return out


def ramp_ids(run: Path, text: str) -> list[int]:
    """What ramp's own tokenizer of the run gives ``text``."""
    if (run / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return list(
            Tokenizer.from_file(str(run / "tokenizer.json")).encode(text, add_special_tokens=False).ids
        )
    return ByteTokenizer().encode(text).tolist()


def test_autotokenizer_gives_ramps_ids_and_its_end_of_document_token(
    run: Path, exports: dict[str, Path]
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exports["fp32"])
    meta = read_meta(run / "checkpoints" / "step_4")
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == tokenizer.bos_token_id == meta.eos_id
    assert tokenizer.eos_token == "<|endoftext|>"
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == ramp_ids(run, text), text
        assert tokenizer.decode(ids) == text
    if not (run / "tokenizer.json").is_file():  # bytes: the ids are the UTF-8 bytes
        assert tokenizer("é", add_special_tokens=False)["input_ids"] == [0xC3, 0xA9]
        assert len(tokenizer) == 257


def test_automodel_gives_ramps_logits_in_fp32_and_within_rounding_in_bf16(
    run: Path, exports: dict[str, Path]
) -> None:
    from transformers import AutoModelForCausalLM

    batch = torch.randint(
        0,
        read_meta(run / "checkpoints" / "step_4").tokenizer_vocab,
        (2, 32),
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        ours = load_model(run / "checkpoints" / "step_4")(batch).logits
        fp32 = AutoModelForCausalLM.from_pretrained(exports["fp32"]).eval()
        bf16 = AutoModelForCausalLM.from_pretrained(exports["bf16"]).eval()
        assert next(fp32.parameters()).dtype == torch.float32
        assert next(bf16.parameters()).dtype == torch.bfloat16
        assert torch.equal(fp32(batch).logits, ours)
        low = bf16(batch).logits.float()
    assert not torch.equal(low, ours), "bf16 weights round"
    torch.testing.assert_close(low, ours, atol=0.1, rtol=0.05)  # bf16 keeps 8 bits of mantissa
    assert (low.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9


def test_every_exported_file_is_readable_as_the_umask_says(exports: dict[str, Path]) -> None:
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in exports["fp32"].iterdir() if p.is_file()}
    assert "model.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_the_model_card_holds_the_runs_own_numbers(run: Path, exports: dict[str, Path]) -> None:
    card = (exports["fp32"] / "README.md").read_text()
    meta = read_meta(run / "checkpoints" / "step_4")
    rows = dict(re.findall(r"^\| ([^|]+?) \| (.+?) \|$", card, flags=re.MULTILINE))
    _, evals = read_metrics(run)
    assert rows["Global step"] == "4" == str(meta.step)
    assert rows["Tokens trained"] == str(meta.tokens) == "256"
    assert rows["Validation loss (the newest at this checkpoint)"] == f"{evals[-1]['val_loss']!r} at step 4"
    assert rows["Layers"] == "4"
    assert rows["Hidden size"] == "192"
    assert rows["Attention heads"] == "4"
    assert rows["transformers model_type"] == "gpt2"
    assert rows["Parameters"] == str(
        sum(p.numel() for p in load_model(run / "checkpoints" / "step_4").parameters())
    )
    assert rows["Schedule"] == "cosine, peak LR 0.0006, warmup 1 step, 4 steps in all"
    assert rows["Data"] == "text (files=corpus/*.txt)"
    assert rows["Weights"] == "fp32"
    assert "| Weights | bf16 |" in (exports["bf16"] / "README.md").read_text()
    assert (exports["fp32"] / "ramp_config.yaml").is_file()


def test_sample_prints_continuations_of_a_checkpoint_and_of_an_export(
    run: Path, exports: dict[str, Path], cache_dir: Path
) -> None:
    for path in (run, exports["fp32"]):
        args = ("--prompt", "the quick", "--num-samples", "3", "--max-new-tokens", "8", "--seed", "1")
        result = command("trainer.sample", path, *args, cache_dir=cache_dir)
        assert result.returncode == 0, result.stderr
        samples = result.stdout.split("-" * 40 + "\n")
        assert samples[-1] == "", result.stdout
        assert len(samples) == 4, result.stdout
        assert all(sample.startswith("the quick") for sample in samples[:3])


def test_sample_refuses_a_missing_path_in_one_line(tmp_path: Path, cache_dir: Path) -> None:
    result = command("trainer.sample", tmp_path / "nope", cache_dir=cache_dir)
    assert result.returncode == 2
    assert result.stderr.startswith("ramp: error: CHECKPOINT ")
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_lm_eval_scores_a_byte_level_export(run: Path, exports: dict[str, Path], cache_dir: Path) -> None:
    """The byte-level tokenizer is all lm-eval needs: it scores a bytes run's export (and any run's)."""
    pytest.importorskip("lm_eval")
    if (run / "tokenizer.json").is_file():
        pytest.skip("the BPE run's export is scored in test_lm_eval")
    result = command(
        "trainer.evaluate", exports["fp32"], "--tasks", "ramp_tiny", "--limit", "4", cache_dir=cache_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ramp_tiny" in result.stdout, result.stdout
    assert "acc" in result.stdout, result.stdout
