"""ramp's entry point: ``torchrun --nproc_per_node=N -m trainer.main [overrides]``.

Compose the config, plan where the run starts, build the parts, fit, close. ``python -m
trainer.main`` runs one process.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import hydra
import torch
from omegaconf import DictConfig

from trainer import distributed, resume
from trainer.backends import build_backend
from trainer.config import conf_dir, register_configs, to_config
from trainer.data import build_data
from trainer.errors import ConfigError, TrainingHalted
from trainer.loop import Outcome, Trainer, TrainState
from trainer.models import build_model
from trainer.observe import Recorder, redact, scrub, setup_logging
from trainer.preemption import StopSignal

log = logging.getLogger("ramp")
register_configs()


def train(dcfg: DictConfig) -> Outcome:
    """One run from a composed config: plan, build, restore or start, fit, close."""
    cfg = to_config(dcfg)
    plan = resume.plan(cfg)
    info = distributed.setup(cfg.train.threads)
    setup_logging(info.rank)
    stop = StopSignal(info)
    resolved = redact(cfg.to_dict())
    data = build_data(cfg, info)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(
        cfg.model,
        tokenizer_vocab=data.vocab_size,
        eos_id=data.eos_id,
        activation_checkpointing=cfg.train.activation_checkpointing,
    )
    backend = build_backend(cfg, model, info)
    del model  # the backend holds it now
    torch.manual_seed(cfg.train.seed + info.rank)  # distinct dropout noise per rank
    start = resume.choose(plan, info)
    if info.is_main:
        resume.create_run_dir(plan.run_dir, resolved)
        data.save_tokenizer(plan.run_dir)
    recorder = Recorder(
        info.is_main,
        plan.run_dir,
        resolved,
        cfg.logger,
        cfg.train.max_steps,
        start_step=start.meta.step if start else 0,
    )
    trainer = Trainer(cfg, info, backend, data, cfg.lr_schedule, recorder, plan.run_dir, resolved)
    state = trainer.restore(start) if start else TrainState()
    trainer.announce()
    try:
        outcome = trainer.fit(state, stop)
    finally:
        recorder.close()
    if outcome == Outcome.finished:
        log.info("ramp | done: %d steps, %d tokens | %s", state.global_step, state.tokens, plan.run_dir)
    del trainer, backend  # before the process group goes away (see distributed.teardown)
    distributed.teardown()
    return outcome


def _exit(code: int, message: str | None = None) -> None:
    """Leave at once: the interpreter's teardown races gloo's threads in torch 2.13."""
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
def main(dcfg: DictConfig) -> None:
    """Hydra's entry point: train, and turn ramp's errors into one line and their exit code."""
    try:
        train(dcfg)
    except (ConfigError, TrainingHalted) as err:
        _exit(err.exit_code, str(err))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit(0)


if __name__ == "__main__":
    main()
