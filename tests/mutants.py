"""``make mutants``: realistic bookkeeping bugs in ramp's core, each caught by the tests that claim to.

Each mutant is one small edit of ramp's code: the kind of bug that hides in a training framework (the
schedule stepped at the wrong time, accumulation not averaged, state not restored on resume, every
rank writing, a checkpoint's settings winning over the user's). For each, a throwaway copy of the tree
gets the edit and runs the tests named next to it; the mutant is **killed** when they fail and
**survives** when they pass, which means a test does not test what it claims. A mutant whose code
has changed since it was written (its text is not in the file exactly once) is **stale** and counts
as a survivor: fix its text. The table goes to stdout; the exit status is 1 if any survived.

Not part of ``make test`` (it runs about a hundred test sessions); run it after changing trainer/,
and add a mutant with every new claim (README Development section).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".venv", ".git", "outputs", "logs", "wandb", "__pycache__", ".*_cache")


@dataclass(frozen=True)
class Mutant:
    """One bug: where it goes, the text it replaces, and the tests that must catch it."""

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


UNIT, E2E = "tests/unit", "tests/e2e"
TRAIN = f"{E2E}/test_train.py"
TRUTH = f"{E2E}/test_resume_truth.py"

MUTANTS = [
    Mutant(
        "LR written after the optimizer step",
        "trainer/loop.py",
        "            self.set_lr(ledger)  # before the step it belongs to: step k trains at the schedule's f(k)\n"
        "            loss_sum, tokens = self.train_step(self.clock.grad_accum(attempted + 1))\n"
        "            grad_norm, applied = self.backend.step(hold=ledger.held)\n",
        "            loss_sum, tokens = self.train_step(self.clock.grad_accum(attempted + 1))\n"
        "            grad_norm, applied = self.backend.step(hold=ledger.held)\n"
        "            self.set_lr(ledger)\n",
        (f"{TRAIN}::test_two_ranks_write_twenty_records_on_the_transformers_cosine",),
    ),
    Mutant(
        "accumulated gradients not averaged",
        "trainer/loop.py",
        "scale = 1.0 / (accum * t.micro_batch_size * t.seq_len)",
        "scale = 1.0 / (t.micro_batch_size * t.seq_len)",
        (f"{TRAIN}::test_logged_loss_does_not_depend_on_the_world_size",),
    ),
    Mutant(
        "gradients synced on every micro-batch",
        "trainer/loop.py",
        "with backend.accumulate(last=micro == accum - 1):",
        "with backend.accumulate(last=True):",
        (f"{UNIT}/backends/test_ddp.py",),
    ),
    Mutant(
        "DDP's no_sync on the wrong micro-batches",
        "trainer/backends/ddp.py",
        "if last or self.ddp is None:",
        "if not last or self.ddp is None:",
        (f"{UNIT}/backends/test_ddp.py",),
    ),
    Mutant(
        "the log interval's sums never reset",
        "trainer/loop.py",
        "        self.sums.zero_()\n",
        "",
        (f"{TRAIN}::test_a_record_of_several_steps_holds_their_token_weighted_mean",),
    ),
    Mutant(
        "the loss not reduced over ranks",
        "trainer/loop.py",
        "loss_sum, tokens, steps, data_wait, *memory = distributed.all_reduce_sum(packed, info).tolist()",
        "loss_sum, tokens, steps, data_wait, *memory = packed.tolist()",
        (f"{UNIT}/test_distributed.py",),
    ),
    Mutant(
        "tokens counted on one rank only",
        "trainer/loop.py",
        "state.tokens + self.clock.batch_of(step) * t.seq_len",
        "state.tokens + self.clock.grad_accum(step) * t.micro_batch_size * t.seq_len",
        (f"{TRAIN}::test_two_ranks_write_twenty_records_on_the_transformers_cosine",),
    ),
    Mutant(
        "a skipped update advances the global step",
        "trainer/loop.py",
        "        self.step += applied.long()",
        "        self.step += 1",
        (f"{UNIT}/test_loop.py",),
    ),
    Mutant(
        "a non-finite update applied by the fused optimizer (found_inf not set)",
        "trainer/backends/torch_step.py",
        "            self.optimizer.found_inf = (~applied).float()  # type: ignore[attr-defined]\n",
        "",
        (f"{UNIT}/backends/test_ddp.py",),
    ),
    Mutant(
        "the halt latch not set: updates after a non-finite one apply until the host looks",
        "trainer/loop.py",
        "            self.held |= ~torch.isfinite(grad_norm)",
        "            pass",
        (f"{UNIT}/test_loop.py",),
    ),
    Mutant(
        "a checkpoint records the sampler past the prefetched micro-batch",
        "trainer/loop.py",
        "        return dict(self.before_ready) if self.ready is not None else self.sampler.state_dict()",
        "        return self.sampler.state_dict()",
        (f"{UNIT}/test_loop.py",),
    ),
    Mutant(
        "one step past train.max_steps",
        "trainer/loop.py",
        "while state.global_step < self.end_step:",
        "while state.global_step <= self.end_step:",
        (f"{UNIT}/test_loop.py",),
    ),
    Mutant(
        "the schedule read one step late (LR 0 on step 1)",
        "trainer/schedules.py",
        "        step = min(step, self.max_steps)\n",
        "        step = min(step - 1, self.max_steps)\n",
        (f"{UNIT}/test_schedules.py",),
    ),
    Mutant(
        "warmup_ratio rounded down",
        "trainer/schedules.py",
        'given = ("schedule.warmup_ratio", math.ceil(cfg.warmup_ratio * max_steps))',
        'given = ("schedule.warmup_ratio", int(cfg.warmup_ratio * max_steps))',
        (f"{UNIT}/test_schedules.py",),
    ),
    Mutant(
        "an epoch's final partial accumulation window not counted",
        "trainer/durations.py",
        "    return max(math.ceil(per_rank / grad_accum_steps), 1)",
        "    return max(per_rank // grad_accum_steps, 1)",
        (f"{UNIT}/test_durations.py",),
    ),
    Mutant(
        "a length in tokens counted in micro-batches, not optimizer steps",
        "trainer/durations.py",
        "        return self.global_batch * self.seq_len",
        "        return self.micro_batch_size * self.world_size * self.seq_len",
        (f"{UNIT}/test_durations.py",),
    ),
    Mutant(
        "under a batch schedule, the LR schedule run on steps instead of samples",
        "trainer/schedules.py",
        "        value = float(self.multiplier_fn(self.clock.clock(step)))",
        "        value = float(self.multiplier_fn(step))",
        (f"{UNIT}/test_durations.py",),
    ),
    Mutant(
        "a batch stage chosen by the tokens after the step instead of before it",
        "trainer/durations.py",
        "            short = following.start_tokens - samples * self.seq_len",
        "            short = following.start_tokens - (samples + stage.global_batch) * self.seq_len",
        (f"{UNIT}/test_durations.py",),
    ),
    Mutant(
        "a batch change reaching the data one step late",
        "trainer/loop.py",
        "            loss_sum, tokens = self.train_step(self.clock.grad_accum(attempted + 1))",
        "            loss_sum, tokens = self.train_step(self.clock.grad_accum(max(attempted, 1)))",
        (f"{E2E}/test_durations.py::test_a_batch_schedule_trains_each_stage_at_megatrons_sample_based_lr",),
    ),
    Mutant(
        "a branch decays from the peak, not from the LR in effect at its step",
        "trainer/schedules.py",
        "    start = base(at)\n",
        "    start = 1.0\n",
        (f"{UNIT}/test_branches.py",),
    ),
    Mutant(
        "WSD-S: a step at a period's end counted in the next period",
        "trainer/schedules.py",
        "    index = bisect.bisect_left(period_ends, step)",
        "    index = bisect.bisect_right(period_ends, step)",
        (f"{UNIT}/test_branches.py",),
    ),
    Mutant(
        "train.stop_at ends the run without a checkpoint",
        "trainer/loop.py",
        "or attempted == self.end_step):",
        "or attempted == self.schedule.max_steps):",
        (f"{E2E}/test_branches.py::test_stop_at_then_the_same_command_continues_exactly",),
    ),
    Mutant(
        "a parameter group's LR multiplier not applied",
        "trainer/loop.py",
        '            group["lr"] = lr if mult == 1.0 else lr * mult',
        '            group["lr"] = lr',
        (f"{E2E}/test_param_groups.py",),
    ),
    Mutant(
        "a parameter group's own weight decay ignored",
        "trainer/models.py",
        "        weight_decay = cfg.weight_decay if decay is None else decay",
        "        weight_decay = cfg.weight_decay",
        (f"{E2E}/test_param_groups.py",),
    ),
    Mutant(
        "a run from weights alone starts from fresh weights",
        "trainer/export.py",
        "    model.load_state_dict(model_state(folder, meta))\n    job_log.info(",
        "    job_log.info(",
        (
            f"{E2E}/test_branches.py::test_a_run_from_weights_alone_has_the_parents_weights_and_its_own_optimizer_and_schedule",
        ),
    ),
    Mutant(
        "an export of a run folder takes its oldest checkpoint",
        "trainer/export.py",
        "choose(RunPlan(root, ckpt.complete_checkpoints(root)), one_process)",
        "choose(RunPlan(root, ckpt.complete_checkpoints(root)[::-1]), one_process)",
        (f"{UNIT}/test_export.py",),
    ),
    Mutant(
        "the exported tokenizer cannot pad",
        "trainer/export.py",
        "        pad_token=tokens.pad,\n",
        "",
        (f"{E2E}/test_export.py",),
    ),
    Mutant(
        "a DDP export prints DeepSpeed's accelerator warning",
        "trainer/export.py",
        '    os.environ.setdefault("DS_ACCELERATOR", "cpu")\n',
        "",
        (f"{E2E}/test_export.py",),
    ),
    Mutant(
        "a sweep's jobs share one run folder",
        "trainer/sweep.py",
        '        dcfg.run.name = f"{sweep_name}/{folder}"',
        "        dcfg.run.name = sweep_name",
        (
            f"{E2E}/test_sweeps.py::test_a_sweep_in_one_process_gives_each_job_its_folder_and_the_run_started_alone",
        ),
    ),
    Mutant(
        "a sweep under torchrun leaves after its first job",
        "trainer/main.py",
        "    if job is not None and outcome is Outcome.preempted:",
        '    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (job is not None and outcome is Outcome.preempted):',
        (f"{E2E}/test_sweeps.py::test_a_sweep_under_torchrun_runs_every_job_on_both_ranks",),
    ),
    Mutant(
        "the open log interval not restored on resume",
        "trainer/resume.py",
        '            meter.load_state_dict(rank_state["meter"])',
        "            pass",
        (f"{E2E}/test_resume.py::test_an_open_log_interval_and_dropout_noise_resume_exactly",),
    ),
    Mutant(
        "per-rank RNG states not restored on resume",
        "trainer/resume.py",
        '        checkpoint.set_rng_state(rank_state.pop("rng"))',
        '        rank_state.pop("rng")',
        (f"{E2E}/test_resume.py::test_an_open_log_interval_and_dropout_noise_resume_exactly",),
    ),
    Mutant(
        "the data position not restored on resume",
        "trainer/resume.py",
        "    sampler.load_state_dict(meta.sampler)",
        "    pass",
        (f"{UNIT}/test_resume.py",),
    ),
    Mutant(
        "the checkpoint's optimizer settings win over the given ones",
        "trainer/resume.py",
        "    apply_hyperparameters(backend.param_groups, optim)",
        "    pass",
        (f"{UNIT}/test_resume.py",),
    ),
    Mutant(
        "a change the checkpoint cannot honour is accepted",
        "trainer/resume.py",
        "    if refused:",
        "    if False:",
        (f"{UNIT}/test_resume.py",),
    ),
    Mutant(
        "checksums not verified",
        "trainer/resume.py",
        "    reason = checkpoint.verify(folder, meta.files)\n",
        "    reason = None\n",
        (f"{UNIT}/test_resume.py",),
    ),
    Mutant(
        "each rank's RNG and log-interval state left out of a checkpoint",
        "trainer/checkpoint.py",
        '    torch_save_durably({**rank_state, "rng": rng_state()}, saving.staging / f"rank_{info.rank}.pt")\n'
        "    saving.write = backend.save(saving.staging, info, background)\n",
        "    saving.write = backend.save(saving.staging, info, background)\n",
        (f"{UNIT}/test_checkpoint.py",),
    ),
    Mutant(
        "DeepSpeed's bf16 mode dropped",
        "trainer/backends/deepspeed.py",
        '        config["bf16"] = {"enabled": True, "check_grad_overflow": True}',
        "        pass",
        (f"{UNIT}/backends/test_deepspeed.py",),
    ),
    Mutant(
        "every rank writes the records",
        "trainer/main.py",
        "        info.is_main, plan.run_dir, resolved, cfg.logger,",
        "        True, plan.run_dir, resolved, cfg.logger,",
        (
            f"{TRAIN}::test_two_ranks_write_twenty_records_on_the_transformers_cosine",
            f"{TRAIN}::test_run_folder_holds_resolved_config_and_one_wandb_run",
        ),
    ),
    Mutant(
        "job-wide warnings printed by every rank",
        "trainer/observe/console.py",
        "logging.getLogger(name).setLevel(logging.NOTSET if rank == 0 else logging.CRITICAL + 1)",
        "logging.getLogger(name).setLevel(logging.NOTSET)",
        (f"{UNIT}/observe/test_observe.py",),
    ),
    Mutant(
        "secret-named config keys not masked",
        "trainer/observe/redact.py",
        'k: (MASK if SECRET_NAME.search(str(k)) and v not in (None, "") else _mask(v, secrets))',
        "k: _mask(v, secrets)",
        (f"{UNIT}/observe/test_observe.py",),
    ),
    Mutant(
        "ranks outlive a killed torchrun",
        "trainer/main.py",
        "    exit_with_parent()\n",
        "    pass\n",
        (f"{TRUTH}::test_no_rank_outlives_a_killed_torchrun",),
    ),
    Mutant(
        "the launcher loses the trainers' exit code",
        "launch/run.py",
        "        return max(trainer_codes)",
        "        return code",
        (f"{TRUTH}::test_the_launcher_exits_with_the_trainers_code_and_each_event_is_said_once",),
    ),
    Mutant(
        "Ctrl-C not a stop signal (a KeyboardInterrupt loses the run)",
        "trainer/preemption.py",
        "        previous = signal.signal(signal.SIGINT, self._handle)",
        "        previous = signal.getsignal(signal.SIGINT)",
        (
            f"{E2E}/test_launch.py::test_ctrl_c_to_one_process_saves_and_the_same_command_resumes_bit_identically",
        ),
    ),
    Mutant(
        "a different command trains in another experiment's default folder",
        "trainer/main.py",
        "    default_folder = not (plan.explicit or named_folder())",
        "    default_folder = False",
        (f"{E2E}/test_first_hour.py",),
    ),
    Mutant(
        "the resume report compares the new schedule with itself",
        "trainer/resume.py",
        "        before = from_tree(start.meta.config).schedule_for(start.meta.world_size, samples_per_epoch)",
        "        before = schedule",
        (f"{UNIT}/test_resume.py",),
    ),
    Mutant(
        "the plot draws every stretch with the last config",
        "trainer/plot.py",
        "                node[leaf] = old",
        "                pass",
        (f"{UNIT}/observe/test_observe.py",),
    ),
    Mutant(
        "a Ctrl-C waits for the whole evaluation",
        "trainer/loop.py",
        "                if stop is not None and stop.agreed():\n                    return None\n",
        "",
        (
            f"{E2E}/test_launch.py::test_ctrl_c_to_one_process_saves_and_the_same_command_resumes_bit_identically",
        ),
    ),
    Mutant(
        "an evaluation cut short is never run on resume",
        "trainer/loop.py",
        "        if not state.eval_pending:\n            return True\n",
        "        return True\n",
        (
            f"{E2E}/test_launch.py::test_ctrl_c_to_one_process_saves_and_the_same_command_resumes_bit_identically",
        ),
    ),
    Mutant(
        "a mistyped key passes the command-line check (Hydra's raw error instead)",
        "trainer/overrides.py",
        "                self._check_key(override, chosen)",
        "                pass",
        (f"{UNIT}/test_overrides.py",),
    ),
    Mutant(
        "launch.submit queues a job whose time limit leaves no room for the checkpoint",
        "launch/submit.py",
        "    if limit is not None and limit <= grace + 60:",
        "    if limit is not None and limit <= grace:",
        (f"{UNIT}/launch/test_files.py",),
    ),
    Mutant(
        "model.extra overrides what ramp's keys set, behind config.yaml's back",
        "trainer/models.py",
        "        if canonical in kwargs and canonical in RAMP_SET:",
        "        if False:",
        (f"{UNIT}/test_models.py",),
    ),
    Mutant(
        "a Slurm sweep point is requeued before its trainers have saved",
        "trainer/slurm_sweep.py",
        "        signal.signal(signal.SIGUSR1, self._note)\n",
        "",
        (
            f"{E2E}/test_slurm_sweep.py::test_a_point_signalled_before_its_time_limit_saves_requeues_and_resumes_exactly",
        ),
    ),
    Mutant(
        "a one-document corpus not split by tokens (no validation slice from one text file)",
        "trainer/data/pack.py",
        "    if train.documents + val.documents == 1:  # one document: split by tokens\n",
        "    if False:  # one document: split by tokens\n",
        (f"{UNIT}/data/test_splits.py",),
    ),
    Mutant(
        "a branch command resumes whatever run its folder holds (branch.checkpoint may change on resume)",
        "trainer/config.py",
        "    checkpoint: str | None = setting(None, on_resume=OnResume.refused)",
        "    checkpoint: str | None = setting(None, on_resume=OnResume.changes_math)",
        (f"{UNIT}/test_resume.py",),
    ),
    Mutant(
        "a branch's registry tail ignores its preset's keys",
        "trainer/config.py",
        "            decay_keys={**preset_keys(self.branch.decay_type), **self.branch.decay_keys},",
        "            decay_keys=dict(self.branch.decay_keys),",
        (f"{UNIT}/test_branches.py",),
    ),
    Mutant(
        "a Slurm sweep's points submitted unchecked",
        "trainer/slurm_sweep.py",
        "    _check_points(overrides, given, ours)\n",
        "",
        (f"{UNIT}/test_slurm_sweep.py",),
    ),
    Mutant(
        "a background save counted before its write is done",
        "trainer/checkpoint.py",
        "            self.write.result()\n            self.write = None\n",
        "            self.write = None\n",
        (
            f"{UNIT}/test_checkpoint.py::test_a_failed_background_write_raises_at_completion_and_the_previous_checkpoint_stays",
        ),
    ),
    Mutant(
        "a halted run leaves its background save incomplete",
        "trainer/loop.py",
        "                self.complete_save()  # the checkpoint before the halt counts, as a synchronous one would\n",
        "                pass\n",
        (f"{E2E}/test_resume.py::test_on_nan_halt_stops_before_the_update_with_a_clear_message",),
    ),
    Mutant(
        "FSDP2's no-sync inverted: the last micro-batch's gradients not reduced",
        "trainer/backends/fsdp.py",
        "        self.fsdp.set_requires_gradient_sync(last or self.reduce_every_micro_batch)\n",
        "        self.fsdp.set_requires_gradient_sync(not last or self.reduce_every_micro_batch)\n",
        (f"{E2E}/test_fsdp.py::test_fsdp_trains_like_ddp",),
    ),
    Mutant(
        "DCP restores the weights but not the optimizer state",
        "trainer/backends/state.py",
        "        dcp.load(loaded, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=alone)\n",
        '        dcp.load({"model": loaded["model"]}, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=alone)\n',
        (
            f"{UNIT}/test_resume.py::test_restore_gives_weights_optimizer_data_position_and_interval_back_exactly",
        ),
    ),
    Mutant(
        "DCP's pickled metadata loaded without the allow-list",
        "trainer/backends/state.py",
        "            metadata = _MetadataUnpickler(stream).load()\n",
        "            metadata = pickle.load(stream)\n",
        (f"{UNIT}/test_resume.py::test_loading_never_executes_code",),
    ),
]


def apply(mutant: Mutant, tree: Path) -> bool:
    """Edit ``tree``'s copy of the mutant's file; False when its text is not there exactly once."""
    path = tree / mutant.file
    text = path.read_text()
    if text.count(mutant.old) != 1:
        return False
    path.write_text(text.replace(mutant.old, mutant.new))
    return True


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> int:
    """pytest's exit status for ``tests`` run in ``tree`` (its own code on the path), -1 on a timeout."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    try:
        result = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return -1
    return result.returncode


def verdict(mutant: Mutant | None, tests: tuple[str, ...], timeout: float) -> str:
    """killed, survived or stale, after the tests ran on a copy of the tree with the mutant (or none)."""
    with tempfile.TemporaryDirectory(prefix="ramp-mutant-") as scratch:
        tree = Path(scratch) / "ramp"
        shutil.copytree(REPO, tree, ignore=IGNORED)
        if mutant is not None and not apply(mutant, tree):
            return "stale"
        code = run_tests(tree, tests, timeout)
    # pytest: 0 all passed; 1 a test failed; 2 an error (a mutant may break an import); 3 an internal
    # error; 4 a usage error (a test id that does not exist); 5 nothing collected.
    return {0: "survived", 1: "killed", 2: "killed (an error)", -1: "killed (timed out)"}.get(code, "stale")


def main(argv: list[str] | None = None) -> int:
    """Run every mutant (or those whose name contains ``--only``); print the table; 1 if any survived."""
    parser = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the mutants whose name contains this text")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only in m.name]
    # First the tests themselves, on the tree as it is: a mutant is only killed by tests that pass.
    every_test = tuple(dict.fromkeys(test for m in chosen for test in m.tests))
    if verdict(None, every_test, args.timeout) != "survived":
        print("the mutants' tests fail on the unchanged tree; run them (make test) and fix that first")
        return 2
    rows = []
    for mutant in chosen:
        started = time.monotonic()
        outcome = verdict(mutant, mutant.tests, args.timeout)
        rows.append((mutant, outcome, time.monotonic() - started))
        print(f"{outcome:<20} {time.monotonic() - started:6.1f} s  {mutant.name}", flush=True)
    survivors = [(m, o) for m, o, _ in rows if not o.startswith("killed")]
    print("\n| mutant | file | outcome |\n| --- | --- | --- |")
    for mutant, outcome, _ in rows:
        print(f"| {mutant.name} | `{mutant.file}` | {outcome} |")
    print(f"\n{len(rows) - len(survivors)} of {len(rows)} mutants killed")
    for mutant, outcome in survivors:
        print(f"{outcome}: {mutant.name} ({mutant.file}); its tests: {' '.join(mutant.tests)}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
