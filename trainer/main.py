"""ramp's entry point: ``torchrun --nproc_per_node=N -m trainer.main [overrides]``.

Compose the config, plan where the run starts, build the parts, fit, close. ``python -m
trainer.main`` runs one process. Nothing is written into the run folder until the start is
accepted: a refused or no-op start leaves it as it was.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

INTERRUPTED = 130
"""The exit code of a start-up ended by Ctrl-C (128 + SIGINT, as a shell reports it)."""


def _stopped_waiting(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C while a launcher (``hydra/launcher=ramp_slurm``) waits for the sweep's jobs."""
    from trainer.slurm_sweep import SUBMITTED

    jobs = f" ({', '.join(SUBMITTED)}; scancel stops them)" if SUBMITTED else ""
    print(
        f"ramp | stopped waiting for the sweep's jobs, which go on{jobs}; once they have ended, the same command "
        "resumes the sweep",
        file=sys.stderr,
    )
    sys.stderr.flush()
    os._exit(INTERRUPTED)


def _interrupted_during_start_up(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C before the run listens for it (:class:`trainer.preemption.StopSignal`): nothing is written yet
    (a token cache entry being built is renamed into place only when whole), so leave at once, in one line."""
    if os.environ.get("RANK", "0") == "0":
        print("ramp | interrupted (Ctrl-C) during start-up, before anything was written", file=sys.stderr)
    sys.stderr.flush()
    os._exit(INTERRUPTED)


if __name__ == "__main__":  # from here, while the imports below take their seconds, and until the run listens
    signal.signal(signal.SIGINT, _interrupted_during_start_up)

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from trainer import distributed, export, resume, slurm_sweep, sweep
from trainer.backends import build_backend
from trainer.config import Config, check_command, conf_dir, register_configs, to_config
from trainer.data import Data, build_data
from trainer.errors import ConfigError, TrainingHalted
from trainer.loop import Outcome, Trainer, TrainState
from trainer.models import build_model
from trainer.observe import Recorder, redact, scrub, setup_logging
from trainer.preemption import StopSignal, exit_with_parent

log = logging.getLogger("ramp")
register_configs()


def build_initial_model(
    cfg: Config, data: Data, max_steps: int, warm: bool
) -> tuple[nn.Module, tuple[Path, resume.CheckpointMeta] | None]:
    """The model, the same initial weights on every rank; with ``warm`` and init.weights, that checkpoint's
    weights (and the checkpoint, for the record).

    Raises:
        ConfigError: init.step past the run, or weights that do not fit this model, before anything is written.
    """
    warm = warm and cfg.init.weights is not None
    if warm and cfg.init.step >= max_steps:
        raise ConfigError(f"init.step={cfg.init.step} leaves nothing of the run's {max_steps} steps to train")
    torch.manual_seed(cfg.train.seed)
    model = build_model(
        cfg.model,
        tokenizer_vocab=data.vocab_size,
        eos_id=data.eos_id,
        activation_checkpointing=cfg.train.activation_checkpointing,
    )
    if not warm:
        return model, None
    return model, (Path(str(cfg.init.weights)), export.load_weights(cfg, model, data.vocab_size))


def done_line(state: TrainState, last_eval: dict[str, float] | None, seconds: float, run_dir: Path) -> str:
    """The run's last line: where it ended, the tokens, the wall time of this process, the final
    validation loss (when the run evaluated), and the run folder."""
    elapsed = datetime.timedelta(seconds=round(seconds))
    val = f" | val_loss {last_eval['val_loss']:.4f}" if last_eval else ""
    steps = f"{state.global_step} step{'' if state.global_step == 1 else 's'}"
    return f"ramp | done: {steps}, {state.tokens:,} tokens in {elapsed}{val} | {run_dir}"


def named_folder() -> bool:
    """Whether the command names its run folder (run.name or run.dir among its overrides, or a job of a
    sweep given either); outside Hydra's entry point, whether a caller composed the config: yes."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True
    keys = {override.split("=", 1)[0].lstrip("+~") for override in HydraConfig.get().overrides.task}
    return bool(keys & {"run.name", "run.dir"})


def train(dcfg: DictConfig, last: bool = True) -> Outcome:
    """One run from a composed config: plan, accept the start, build, restore, record, fit, close. A
    sweep's jobs before the ``last`` keep the process group for the next.

    Raises:
        ConfigError: a configuration or a start that cannot be, before anything is written.
        TrainingHalted: a non-finite update train.on_nan does not skip.
    """
    started = time.monotonic()
    cfg = to_config(dcfg)
    if cfg.train.lm_eval_every:  # an unknown task: now, not after the first checkpoint's evaluation
        from trainer.evaluate import task_manager

        task_manager(list(cfg.train.lm_eval_tasks), [])
    plan = resume.plan(cfg)
    info = distributed.setup(cfg.train.threads)
    setup_logging(info.rank)
    stop = StopSignal(info)
    resolved = redact(cfg.to_dict())
    start = resume.choose(plan, info)
    default_folder = not (plan.explicit or named_folder())
    changes = (
        resume.accept(start, resolved, default_folder) if start else []
    )  # refused before anything is built
    data = build_data(cfg, info)
    schedule = cfg.schedule_for(info.world_size, data.train.num_samples)  # lengths in every unit, in steps
    stop_step = cfg.stop_step(schedule.clock) if schedule.clock else None
    if start and resume.nothing_to_train(start, schedule.max_steps, stop_step, default_folder):
        distributed.teardown(last)
        return Outcome.finished
    model, weights = build_initial_model(cfg, data, schedule.max_steps, warm=start is None)
    trainer = Trainer(cfg, info, build_backend(cfg, model, info), data, schedule, plan.run_dir, resolved)
    del model  # the backend holds it now
    torch.manual_seed(cfg.train.seed + info.rank)  # distinct dropout noise per rank
    if start:
        state = trainer.restore(start)
        resume.report_changes(start, changes, schedule, data.train.num_samples)
    else:
        state = trainer.warm_start(weights[1]) if weights else TrainState()
    stop_listening = (
        stop.listen_for_ctrl_c()
    )  # a Ctrl-C from here on saves a checkpoint; before, it just ends
    if info.is_main:  # the start is accepted: only now is the run folder written
        clock = (info.world_size, data.train.num_samples)
        resume.record_start(plan.run_dir, resolved, start, changes, weights, clock)
        data.save_tokenizer(plan.run_dir)
    recorder = Recorder(
        info.is_main, plan.run_dir, resolved, cfg.logger, schedule.max_steps, state.global_step
    )
    trainer.announce()
    try:
        outcome = trainer.fit(state, stop, recorder)
    finally:
        recorder.close()
        stop_listening()
    if outcome == Outcome.finished:
        log.info(done_line(state, trainer.last_eval, time.monotonic() - started, plan.run_dir))
    del trainer  # before the process group goes away (see distributed.teardown)
    distributed.teardown(last)
    return outcome


EXIT_DIR = "RAMP_EXIT_DIR"
"""Set by ``launch.run``: each rank that stops with an error writes its exit code there, so the launcher
can exit with it (torchrun itself reports any failed worker as exit 1)."""


def _exit(code: int, message: str | None = None) -> None:
    """Leave at once: the interpreter's teardown races gloo's threads in torch 2.13."""
    if code and os.environ.get(EXIT_DIR):
        (Path(os.environ[EXIT_DIR]) / f"rank_{distributed.env_rank()}").write_text(str(code))
    if message and distributed.env_rank() == 0:
        print(f"ramp: error: {scrub(message)}", file=sys.stderr)
    elif message:
        # Every rank meets the same error; rank 0 reports it. Leaving first would let torchrun stop
        # rank 0 before it prints, so the others give it time (torchrun ends them when it exits).
        time.sleep(10)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def run_job(dcfg: DictConfig) -> None:
    """Hydra's task function, once per run (or per job of a ``-m`` sweep, see :mod:`trainer.sweep`):
    train, and turn ramp's errors into one line, naming the sweep's job, and their exit code."""
    job = sweep.current_job(sys.argv)
    if job is not None and slurm_sweep.in_job():  # a sweep point's Slurm job: ramp's launcher trains it
        slurm_sweep.run_point(dcfg, job)
        return
    try:
        if job is not None:
            sweep.prepare(dcfg, job)
        outcome = train(dcfg, last=job is None or job.number == job.total - 1)
    except (ConfigError, TrainingHalted) as err:
        _exit(err.exit_code, f"{job.describe()}: {err}" if job else str(err))
    if job is not None and outcome is Outcome.preempted:  # the same command later resumes the sweep here
        distributed.teardown()
        _exit(0)


def main() -> None:
    """``python -m trainer.main``: one run, or every job of a sweep in turn on all ranks; then leave.
    ``--help`` lists the presets and the keys."""
    exit_with_parent()
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:  # ramp's presets and keys, not Hydra's listing
        from trainer.keys import help_text

        if distributed.env_rank() == 0:
            print(help_text())
        _exit(0)
    try:
        check_command(sys.argv)  # a mistyped key, preset or value: one line, before Hydra composes
        sweep.check_command(sys.argv)
        slurm_sweep.check_command(sweep.command_overrides(sys.argv))
    except ConfigError as err:
        _exit(err.exit_code, str(err))
    launchers = [
        arg for arg in sys.argv[1:] if arg.startswith("hydra/launcher=") and not arg.endswith("=basic")
    ]
    if launchers:  # the jobs run elsewhere (Slurm); this process submits them and waits
        signal.signal(signal.SIGINT, _stopped_waiting)
    if launchers and launchers[-1] == f"hydra/launcher={slurm_sweep.LAUNCHER}":
        from trainer import slurm_launcher

        slurm_launcher.install()
    hydra_dir = sweep.hydra_sweep_dir_override(distributed.env_rank())
    if hydra_dir:
        sys.argv.append(hydra_dir)
    run_job()
    distributed.teardown()  # a sweep may end with the group still up (nothing if it is gone)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit(0)


if __name__ == "__main__":
    main()
