"""ramp's entry point: ``torchrun --nproc_per_node=N -m trainer.main [overrides]``.

Compose the config, build the parts, fit, close. ``python -m trainer.main`` runs one process.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from trainer import distributed, rundir
from trainer.backends import build_backend
from trainer.config import ConfigError, register_configs, to_config
from trainer.data import build_data
from trainer.loop import TrainState, fit
from trainer.models import build_model, count_parameters
from trainer.observe import Recorder, redact, setup_logging
from trainer.schedules import build_schedule

log = logging.getLogger("ramp")
register_configs()


def train(dcfg: DictConfig) -> None:
    cfg = to_config(dcfg)
    run_dir = rundir.check(cfg)
    info = distributed.setup(cfg.train.threads)
    setup_logging(info.rank)
    resolved = redact(OmegaConf.to_container(dcfg, resolve=True, enum_to_str=True))
    assert isinstance(resolved, dict)
    schedule = build_schedule(cfg.schedule, max_steps=cfg.train.max_steps, peak_lr=cfg.optim.lr)
    data = build_data(cfg, info)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, tokenizer_vocab=data.vocab_size, eos_id=data.eos_id)
    backend = build_backend(cfg, model, info)
    del model
    torch.manual_seed(cfg.train.seed + info.rank)  # distinct dropout noise per rank
    if info.is_main:
        rundir.create(run_dir, resolved)
    recorder = Recorder(info.is_main, run_dir, resolved, cfg.logger, cfg.train.max_steps, start_step=0)
    t = cfg.train
    log.info(
        "ramp | %s: %.2fM parameters | world %d | %d tokens/step (%d x %d x %d ranks x %d accum) | %s -> %s",
        cfg.model.name,
        count_parameters(backend.module) / 1e6,
        info.world_size,
        t.micro_batch_size * t.seq_len * info.world_size * t.grad_accum_steps,
        t.micro_batch_size,
        t.seq_len,
        info.world_size,
        t.grad_accum_steps,
        schedule.name,
        run_dir,
    )
    try:
        state = fit(cfg, info, backend, data, schedule, recorder, TrainState())
    finally:
        recorder.close()
    log.info("ramp | done: %d steps, %d tokens | %s", state.global_step, state.tokens, run_dir)
    del backend  # before the process group goes away (see distributed.teardown)
    distributed.teardown()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    try:
        train(dcfg)
    except ConfigError as err:
        if distributed.env_rank() == 0:
            print(f"ramp: error: {err}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Leave without the interpreter's teardown, which races gloo's threads in torch 2.13.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
