"""Which checkpoint an export takes from a folder, and the special tokens its tokenizer gets."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tests.helpers import save_checkpoint
from trainer.backends.ddp import DDPBackend
from trainer.data.tokenizer import train_bpe
from trainer.distributed import DistInfo
from trainer.errors import ConfigError
from trainer.export import find_checkpoint, load_model, special_tokens


@pytest.fixture
def run_dir(tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo) -> Path:
    """A run folder with complete checkpoints at steps 2 and 4 (``latest`` names step_4) and an unfinished
    save of step 6."""
    run = tmp_path / "run"
    for step in (2, 4):
        save_checkpoint(run / "checkpoints", step, ddp_backend, alone)
    (run / "checkpoints" / ".tmp-step_6").mkdir()
    (run / "config.yaml").write_text("{}\n")
    return run


def test_a_run_folder_its_checkpoints_and_latest_give_the_newest_complete_checkpoint(run_dir: Path) -> None:
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_4"
    for given in (run_dir, checkpoints, checkpoints / "latest"):
        assert find_checkpoint(given) == checkpoints / "step_4", given
    assert find_checkpoint(checkpoints / "step_2") == checkpoints / "step_2"


def test_a_damaged_newest_checkpoint_is_passed_over_as_a_resume_does(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    newest = run_dir / "checkpoints" / "step_4"
    model = newest / "dcp" / "__0_0.distcp"
    model.write_bytes(model.read_bytes()[:1000])
    for given in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "latest"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ramp"):
            assert find_checkpoint(given) == run_dir / "checkpoints" / "step_2"
        assert [r.getMessage() for r in caplog.records] == [
            f"checkpoint {newest} is unusable: dcp/__0_0.distcp does not match its checksum (truncated or corrupted); "
            "trying the previous one"
        ]
    # named, a damaged checkpoint is refused, never swapped for another
    assert find_checkpoint(newest) == newest
    with pytest.raises(
        ConfigError, match=r"^CHECKPOINT .*step_4 is unusable: dcp/__0_0.distcp does not match"
    ):
        load_model(newest)


def test_a_folder_without_a_complete_checkpoint_is_refused_naming_what_to_pass(
    run_dir: Path, tmp_path: Path
) -> None:
    fix = "pass a run folder (outputs/<run>), its checkpoints folder or a checkpoints/step_<N> folder"
    for step in (2, 4):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step}")
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (run_dir, run_dir / "checkpoints", empty):
        with pytest.raises(ConfigError) as raised:
            find_checkpoint(folder)
        assert str(raised.value) == f"CHECKPOINT {folder} holds no complete checkpoint; {fix}"
    with pytest.raises(ConfigError) as raised:
        find_checkpoint(tmp_path / "nowhere")
    assert str(raised.value) == f"CHECKPOINT {tmp_path / 'nowhere'} does not exist; {fix}"


def test_a_trained_bpe_ends_opens_and_pads_with_its_end_of_document_token(tmp_path: Path) -> None:
    trained = train_bpe([["def f(x):\n    return x + 1\n", "print('hello world')\n"]], vocab_size=300)
    (tmp_path / "tokenizer.json").write_text(trained.to_json())
    tokens = special_tokens(tmp_path / "tokenizer.json", trained.eos_id)
    assert trained.eos_id == 0
    assert (tokens.eos, tokens.bos, tokens.pad) == ("<|endoftext|>",) * 3
    assert (tokens.eos_id, tokens.bos_id, tokens.pad_id) == (0, 0, 0)


def write_tokenizer(path: Path, special: list[str], padding: str | None = None) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False)
    tokenizer.train_from_iterator(["some text to learn from", "and a little more"], trainer=trainer)
    if padding is not None:
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id(padding), pad_token=padding)
    tokenizer.save(str(path))
    return tokenizer


def test_a_tokenizers_own_bos_and_pad_tokens_are_kept(tmp_path: Path) -> None:
    file = tmp_path / "tokenizer.json"
    write_tokenizer(file, ["<s>", "</s>", "<pad>"])
    tokens = special_tokens(file, eos_id=1)
    assert (tokens.eos, tokens.bos, tokens.pad) == ("</s>", "<s>", "<pad>")
    assert (tokens.eos_id, tokens.bos_id, tokens.pad_id) == (1, 0, 2)

    write_tokenizer(file, ["<|endoftext|>", "<|fill|>"], padding="<|fill|>")  # its padding names its pad
    tokens = special_tokens(file, eos_id=0)
    assert (tokens.eos, tokens.bos, tokens.pad) == ("<|endoftext|>", "<|endoftext|>", "<|fill|>")
    assert (tokens.bos_id, tokens.pad_id) == (0, 1)


def test_a_tokenizer_without_the_checkpoints_eos_id_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "tokenizer.json"
    vocab = write_tokenizer(file, ["</s>"]).get_vocab_size()
    with pytest.raises(
        ConfigError, match=rf"has no token {vocab + 5}, the checkpoint's end-of-document token"
    ):
        special_tokens(file, eos_id=vocab + 5)
