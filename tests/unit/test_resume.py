"""Where a run starts: choosing and verifying a checkpoint, restoring it exactly, reporting what changed."""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import one_step, random_batch, save_checkpoint, tiny_backend
from trainer import checkpoint, resume
from trainer.backends.ddp import DDPBackend
from trainer.config import Config, compose
from trainer.data.sampler import WindowSampler
from trainer.distributed import DistInfo
from trainer.errors import ConfigError
from trainer.loop import IntervalMeter
from trainer.observe import redact
from trainer.schema import OnResume
from trainer.testing import run_distributed


def params(backend: DDPBackend) -> list[torch.Tensor]:
    return [p.detach().clone() for p in backend.module.parameters()]


def parts(info: DistInfo) -> tuple[WindowSampler, IntervalMeter]:
    """A real sampler and log-interval meter for :func:`resume.restore` to fill."""
    sampler = WindowSampler(np.arange(1000, dtype=np.uint16), 8, 2, info.rank, info.world_size, seed=0)
    return sampler, IntervalMeter(info.device)


def start_of(path: Path) -> resume.Start:
    return resume.Start(path, resume.read_meta(path))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "meta"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_used(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    save_checkpoint(tmp_path, 2, ddp_backend, alone)
    newest = save_checkpoint(tmp_path, 4, ddp_backend, alone)
    target = newest / "dcp" / "__0_0.distcp"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        (newest / "meta.json").write_text("{not json")
    assert resume.problem(newest) is not None
    run = resume.RunPlan(tmp_path, checkpoint.complete_checkpoints(tmp_path))
    with caplog.at_level(logging.WARNING, logger="ramp"):
        chosen = resume.choose(run, alone)
    assert chosen is not None
    assert chosen.path == tmp_path / "step_2"
    assert chosen.meta.step == 2
    assert str(newest) in caplog.text
    assert "unusable" in caplog.text
    with pytest.raises(ConfigError, match="step_4"):
        resume.choose(resume.RunPlan(tmp_path, [newest], explicit=True), alone)


def test_metadata_without_a_ramp_key_is_unusable(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    path = save_checkpoint(tmp_path, 1, ddp_backend, alone)
    meta = json.loads((path / "meta.json").read_text())
    del meta["sampler"]
    (path / "meta.json").write_text(json.dumps(meta))
    assert "meta.json is unreadable" in str(resume.problem(path))


def _choose_on_every_rank(info: DistInfo, root: str, explicit: bool) -> str:
    run = resume.RunPlan(Path(root), checkpoint.complete_checkpoints(Path(root)), explicit=explicit)
    try:
        chosen = resume.choose(run, info)
    except ConfigError as err:
        return f"error: {err}"
    return str(chosen.path if chosen else None)


def test_every_rank_gets_rank_0s_choice_or_its_error(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    save_checkpoint(tmp_path, 2, ddp_backend, alone)
    newest = save_checkpoint(tmp_path, 4, ddp_backend, alone)
    (newest / "dcp" / ".metadata").write_bytes(b"damaged")
    assert run_distributed(_choose_on_every_rank, str(tmp_path), False) == [str(tmp_path / "step_2")] * 2
    errors = run_distributed(_choose_on_every_rank, str(tmp_path), True)
    assert errors[0] == errors[1]
    assert errors[0].startswith(f"error: run.resume={newest}: dcp/.metadata does not match")


def test_restore_gives_weights_optimizer_data_position_and_interval_back_exactly(
    tmp_path: Path, small_config: Callable[..., Config], ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    one_step(ddp_backend, random_batch(1))
    path = save_checkpoint(tmp_path, 1, ddp_backend, alone)
    one_step(ddp_backend, random_batch(2))
    expected = params(ddp_backend)

    restored = tiny_backend(small_config(), alone)  # fresh weights and an empty optimizer
    sampler, meter = parts(alone)
    resume.restore(start_of(path), alone, restored, sampler, meter, small_config().optim)
    assert sampler.state_dict() == {"epoch": 0, "position": 1}
    assert meter.state_dict() == {
        "loss_sum": torch.tensor(3.0, dtype=torch.float64),
        "tokens": 64,
        "steps": 1,
    }
    one_step(restored, random_batch(2))  # the same next step: bit-identical only if Adam's moments came back
    assert all(torch.equal(a, b) for a, b in zip(params(restored), expected, strict=True))


def test_restore_gives_this_ranks_rng_stream_back(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    torch.manual_seed(5)
    path = save_checkpoint(tmp_path, 1, ddp_backend, alone)
    after_save = torch.rand(4)
    torch.manual_seed(77)
    resume.restore(start_of(path), alone, ddp_backend, *parts(alone), compose().optim)
    assert torch.equal(torch.rand(4), after_save)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/ramp-checkpoint-executed-code",))


def test_loading_never_executes_code(tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo) -> None:
    path = save_checkpoint(tmp_path, 1, ddp_backend, alone)
    marker = Path("/tmp/ramp-checkpoint-executed-code")
    marker.unlink(missing_ok=True)
    (path / "dcp" / ".metadata").write_bytes(pickle.dumps({"weights": _Payload()}))  # DCP's pickled index
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["dcp/.metadata"] = checkpoint.checksum(
        path / "dcp" / ".metadata"
    )  # checksums alone do not protect
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(pickle.UnpicklingError):
        resume.restore(start_of(path), alone, ddp_backend, *parts(alone), compose().optim)
    assert not marker.exists()


def test_the_given_optimizer_hyperparameters_win_over_the_checkpoints(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    one_step(ddp_backend, random_batch(1))
    path = save_checkpoint(tmp_path, 1, ddp_backend, alone)
    given = compose(["optim.weight_decay=0.01", "optim.betas=[0.8,0.9]", "optim.eps=1e-6"]).optim
    resume.restore(start_of(path), alone, ddp_backend, *parts(alone), given)
    groups = {group["name"]: group for group in ddp_backend.param_groups}
    assert groups["decay"]["weight_decay"] == 0.01
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert all(group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6 for group in groups.values())
    assert ddp_backend.optimizer.state  # the moments came back with them


def change(key: str, old: object, new: object, effect: OnResume) -> resume.Change:
    return resume.Change(key, old, new, effect)


def test_each_change_carries_what_it_does() -> None:
    saved = compose(["train.seq_len=256", "train.log_every=10"]).to_dict()
    current = compose(["train.seq_len=128", "train.log_every=1", "optim.lr=1e-3", "run.name=b"]).to_dict()
    assert resume.config_changes(saved, current) == [
        change("optim.lr", 6e-4, 1e-3, OnResume.changes_math),
        change("run.dir", "outputs/gpt2-tiny", "outputs/b", OnResume.applies),
        change("run.name", "gpt2-tiny", "b", OnResume.applies),
        change("train.log_every", 10, 1, OnResume.applies),
        change("train.seq_len", 256, 128, OnResume.refused),
    ]


def test_a_key_under_a_free_form_dict_and_a_key_of_another_schedule_are_changes() -> None:
    saved = compose(["schedule=cosine"]).to_dict()
    current = compose(["schedule=warmup_stable_decay", "+model.extra.n_inner=64"]).to_dict()
    changes = {str(c): c.effect for c in resume.config_changes(saved, current)}
    assert changes["model.extra.n_inner: None -> 64"] is OnResume.refused
    assert changes["schedule.name: cosine -> warmup_stable_decay"] is OnResume.changes_math
    assert "schedule.num_cycles: 0.5 -> 0.5" not in changes  # a key both have, unchanged
    assert changes["schedule.decay_ratio: None -> 0.2"] is OnResume.changes_math  # only wsd has it


def with_config(path: Path, *overrides: str) -> resume.Start:
    """The checkpoint at ``path``, its metadata saying it was written by ``overrides``' config."""
    meta = json.loads((path / "meta.json").read_text())
    meta["config"] = compose(list(overrides)).to_dict()
    (path / "meta.json").write_text(json.dumps(meta))
    return start_of(path)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["model.hidden_size=256"], "model.hidden_size is 192 in"),
        (["optim.no_decay=[]"], "optim.no_decay is ['*.bias', '*norm*', '*ln_*'] in"),
        (["backend=deepspeed"], "backend.name is ddp in"),
        (["data.tokenizer=train"], "data.tokenizer is bytes in"),
        (["train.seq_len=128", "model.num_layers=2"], "model.num_layers is 4 in"),
    ],
)
def test_a_change_the_checkpoint_cannot_honour_is_refused_naming_key_values_and_fix(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo, overrides: list[str], named: str
) -> None:
    start = with_config(save_checkpoint(tmp_path, 1, ddp_backend, alone))
    with pytest.raises(ConfigError) as excinfo:
        resume.accept(start, compose(overrides).to_dict())
    message = str(excinfo.value)
    assert message.startswith(f"run.resume: {named} {start.path} but ")
    assert "run.resume=never" in message
    assert "\n" not in message


def test_changes_that_apply_are_accepted(tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo) -> None:
    start = with_config(save_checkpoint(tmp_path, 1, ddp_backend, alone))
    given = [
        "optim.weight_decay=0.01",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=2",
        "schedule=linear",
    ]
    keys = [c.key for c in resume.accept(start, compose(given).to_dict())]
    assert {"optim.weight_decay", "train.micro_batch_size", "train.grad_accum_steps", "schedule.name"} <= set(
        keys
    )


def test_a_longer_run_is_reported_once_with_the_lr_it_continues_at(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo, caplog: pytest.LogCaptureFixture
) -> None:
    start = with_config(
        save_checkpoint(tmp_path, 6, ddp_backend, alone), "train.max_steps=6", "schedule=linear"
    )
    cfg = compose(["train.max_steps=9", "schedule=linear", "train.activation_checkpointing=true"])
    with caplog.at_level(logging.INFO, logger="ramp"):
        resume.report_changes(start, resume.accept(start, cfg.to_dict()), cfg.lr_schedule)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "train.max_steps: 6 -> 9" in w]) == 1, warnings
    assert warnings[1:] == [
        "schedule lengths changed on resume: length 6 -> 9 steps",
        f"the LR on resume: step 6 trained at 0; step 7 trains at {cfg.lr_schedule.lr(7):.4g}, up from 0",
    ]
    assert "train.max_steps is now 9" in warnings[0]
    assert f"step 7 trains at LR {cfg.lr_schedule.lr(7):.4g}" in warnings[0]
    assert "changed on resume: train.activation_checkpointing: False -> True" in caplog.text
    assert f"resuming from {start.path} at step 6" in caplog.text


def test_a_shorter_run_reports_the_lr_before_and_after_and_every_length_that_changed(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo, caplog: pytest.LogCaptureFixture
) -> None:
    start = with_config(save_checkpoint(tmp_path, 43, ddp_backend, alone), "train.max_steps=100")
    cfg = compose(["train.max_steps=50"])  # the default warmup_ratio: the warmup shortens too
    before, after = compose(["train.max_steps=100"]).schedule_for(1), cfg.schedule_for(1)
    assert (before.warmup_steps, after.warmup_steps) == (5, 3)
    with caplog.at_level(logging.INFO, logger="ramp"):
        resume.report_changes(start, resume.accept(start, cfg.to_dict()), after)
    text = caplog.text
    assert (
        "schedule lengths changed on resume: length 100 -> 50 steps, warmup 5 -> 3 steps, decay start 5 -> 3 steps"
        in text
    )
    factor = after.lr(44) / before.lr(44)
    assert factor < 0.25  # the cosine is far further down at step 44 of 50 than of 100
    assert (
        f"the LR on resume: step 43 trained at {before.lr(43):.4g}; step 44 trains at {after.lr(44):.4g}, "
        f"x{factor:.3g} the {before.lr(44):.4g} the checkpoint's schedule gives it"
    ) in text


def test_a_change_that_keeps_the_curve_reports_no_lr_jump(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo, caplog: pytest.LogCaptureFixture
) -> None:
    start = with_config(save_checkpoint(tmp_path, 4, ddp_backend, alone))
    cfg = compose(["optim.weight_decay=0.01"])
    with caplog.at_level(logging.INFO, logger="ramp"):
        resume.report_changes(start, resume.accept(start, cfg.to_dict()), cfg.schedule_for(1))
    assert "optim.weight_decay: 0.1 -> 0.01" in caplog.text
    assert "the LR on resume" not in caplog.text
    assert "schedule lengths changed" not in caplog.text


def test_an_accepted_start_writes_config_and_appends_one_history_record(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    run_dir = tmp_path / "run"
    resume.record_start(run_dir, compose().to_dict(), None, [])
    start = with_config(save_checkpoint(run_dir / "checkpoints", 4, ddp_backend, alone))
    given = compose(["optim.lr=1e-3"]).to_dict()
    resume.record_start(run_dir, given, start, resume.accept(start, given))
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == given
    history = [json.loads(line) for line in (run_dir / resume.HISTORY).read_text().splitlines()]
    assert [(h["start"], h["step"], h["checkpoint"]) for h in history] == [
        ("fresh", 0, None),
        ("changed", 4, str(start.path)),
    ]
    assert history[1]["changed"] == {"optim.lr": [6e-4, 1e-3]}


def _plan(tmp_path: Path, *overrides: str) -> resume.RunPlan:
    return resume.plan(compose([f"run.dir={tmp_path / 'run'}", *overrides]))


def test_a_fresh_folder_starts_fresh_and_an_occupied_one_resumes_or_is_refused(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    assert _plan(tmp_path) == resume.RunPlan(tmp_path / "run")
    # A one-point sweep's run folder is its sweep's folder: Hydra's .hydra in it is no run.
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "multirun.yaml").write_text("hydra: {}\n")
    assert _plan(tmp_path) == resume.RunPlan(tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="another run with no checkpoint to resume from"):
        _plan(tmp_path)
    with pytest.raises(ConfigError, match=r"run\.resume=never"):
        _plan(tmp_path, "run.resume=never")
    saved = save_checkpoint(tmp_path / "run" / "checkpoints", 3, ddp_backend, alone)
    assert _plan(tmp_path).candidates == [saved]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").touch()
    with pytest.raises(ConfigError, match="already holds another run"):
        resume.plan(compose([f"run.dir={other}", f"run.resume={saved}"]))


def test_a_named_checkpoint_starts_a_new_folder(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    saved = save_checkpoint(tmp_path / "a" / "checkpoints", 3, ddp_backend, alone)
    run = resume.plan(compose([f"run.dir={tmp_path / 'b'}", f"run.resume={saved}"]))
    assert run == resume.RunPlan(tmp_path / "b", [saved], explicit=True)
    assert resume.plan(compose([f"run.dir={tmp_path / 'c'}", f"run.resume={tmp_path / 'a'}"])).candidates == [
        saved
    ]


def test_a_folder_killed_before_its_first_checkpoint_is_started_over_by_the_same_run_only(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    resume.record_start(run_dir, redact(compose([f"run.dir={run_dir}"]).to_dict()), None, [])
    (run_dir / "checkpoints" / ".tmp-step_2").mkdir(parents=True)  # killed during its first save
    assert _plan(tmp_path, "train.log_every=1") == resume.RunPlan(run_dir, starting_over=True)
    with pytest.raises(ConfigError, match="another run"):
        _plan(tmp_path, "optim.lr=1e-3")


def test_a_branch_command_never_resumes_a_run_that_is_not_that_branch(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    """A run folder holding another run (no branch, or a branch of another checkpoint) is not continued
    as if it were the branch: branch.checkpoint cannot change on resume."""
    parent = tmp_path / "parent" / "checkpoints" / "step_1"
    other = with_config(save_checkpoint(tmp_path / "other", 1, ddp_backend, alone))
    branch = [f"branch.checkpoint={parent}", "branch.decay_steps=4"]
    parent.mkdir(parents=True)
    (parent / "meta.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(ConfigError, match=r"^run\.resume: branch\.checkpoint is None in "):
        resume.accept(other, compose(branch).to_dict())


def test_a_branch_of_a_branch_is_refused_naming_the_run_it_came_from(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    grandparent = tmp_path / "stable" / "checkpoints" / "step_1"
    grandparent.mkdir(parents=True)
    (grandparent / "meta.json").write_text(json.dumps({"step": 1}))
    was_branch = [f"branch.checkpoint={grandparent}", "branch.decay_steps=4"]
    saved = with_config(save_checkpoint(tmp_path / "cool", 1, ddp_backend, alone), *was_branch)
    start = resume.Start(saved.path, saved.meta, branching=True)
    with pytest.raises(ConfigError, match=f"is a checkpoint of a branch \\(of {grandparent}\\)"):
        resume.accept(start, compose([f"branch.checkpoint={saved.path}", "branch.decay_steps=2"]).to_dict())


def test_a_checkpoint_whose_dcp_metadata_is_refused_is_passed_over_like_a_damaged_one(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo, caplog: pytest.LogCaptureFixture
) -> None:
    """A tampered ``dcp/.metadata`` whose checksum was updated too: never executed, named in the warning,
    and the previous checkpoint used; named by run.resume, refused in one line."""
    save_checkpoint(tmp_path, 2, ddp_backend, alone)
    newest = save_checkpoint(tmp_path, 4, ddp_backend, alone)
    marker = Path("/tmp/ramp-checkpoint-executed-code")
    marker.unlink(missing_ok=True)
    (newest / "dcp" / ".metadata").write_bytes(pickle.dumps({"weights": _Payload()}))
    meta = json.loads((newest / "meta.json").read_text())
    meta["files"]["dcp/.metadata"] = checkpoint.checksum(newest / "dcp" / ".metadata")
    (newest / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="ramp"):
        chosen = resume.choose(resume.RunPlan(tmp_path, checkpoint.complete_checkpoints(tmp_path)), alone)
    assert chosen is not None
    assert chosen.path == tmp_path / "step_2"
    assert (
        "dcp/.metadata is refused, never loaded (DCP metadata may not reference posix.system" in caplog.text
    )
    with pytest.raises(ConfigError, match=r"^run.resume=.*step_4: dcp/.metadata is refused, never loaded"):
        resume.choose(resume.RunPlan(tmp_path, [newest], explicit=True), alone)
    assert not marker.exists()


def test_a_run_whose_every_checkpoint_is_unusable_is_refused_not_started_over(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    for step in (2, 4):
        path = save_checkpoint(tmp_path, step, ddp_backend, alone)
        (path / "rank_0.pt").write_bytes(b"damaged")
    with pytest.raises(ConfigError) as raised:
        resume.choose(resume.RunPlan(tmp_path, checkpoint.complete_checkpoints(tmp_path)), alone)
    assert str(raised.value) == (
        f"run.resume=auto: every checkpoint in {tmp_path} is unusable (see the warnings above); nothing was "
        "changed. Restore one, or start this run over by moving that folder away, or start a new run "
        "(another run.name)"
    )
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_4", "step_2"]


def test_another_number_of_ranks_says_when_the_global_batch_changes(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    import dataclasses

    path = save_checkpoint(tmp_path, 2, ddp_backend, alone)
    two_ranks = dataclasses.replace(resume.read_meta(path), config=compose().to_dict(), world_size=2)
    assert resume._batch_change(two_ranks, 16) == ""  # 8 samples x 1 accumulation x 2 ranks, kept
    assert resume._batch_change(two_ranks, 8) == (
        "; the global batch changes from 16 to 8 samples a step (to keep it, scale train.grad_accum_steps or "
        "train.micro_batch_size inversely to the ranks)"
    )
