"""``python -m trainer.evaluate PATH --tasks ramp_tiny[,hellaswag]``: downstream evaluation with lm-eval.

PATH is a checkpoint (a ``checkpoints/step_<N>`` folder, or a run folder, its ``checkpoints`` folder or
``checkpoints/latest``, as :mod:`trainer.export` takes it), exported on the fly into a temporary folder,
or an export (a Hugging Face folder). The tasks run through EleutherAI's lm-evaluation-harness
(``lm_eval.simple_evaluate`` with ``model="hf"``, fp32), so a score equals what ``lm_eval --model hf
--model_args pretrained=<export>,dtype=float32`` reports. ramp's own tasks (:data:`TASKS_DIR`, among them
``ramp_tiny``, which runs offline) are always found; ``--include-path`` adds more.

Each task's metrics are printed, one line each. A checkpoint's results are also appended to its run's
metrics.jsonl as one record at the checkpoint's global step: ``{"step": N, "lm_eval/<task>/<metric>":
value, "lm_eval/<task>/<metric>_stderr": value, ...}`` (see :func:`flatten`), and, when that run logs to
wandb, to its wandb run on the ``lm_eval/step`` axis (:func:`trainer.observe.wandb_sink.log_to_run`). The
in-training option (``train.lm_eval_every``) starts this command in the background on rank 0's checkpoints
(:class:`BackgroundEvals`) with ``--no-wandb``: the training sends those results to its wandb run itself.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError

log = logging.getLogger("ramp")

TASKS_DIR = Path(__file__).with_name("eval_tasks")
"""ramp's own lm-eval tasks (``ramp_tiny``: 36 cloze items that load offline), shipped with the package."""
PREFIX = "lm_eval"
"""The first part of every metric key an evaluation records (``lm_eval/<task>/<metric>``)."""
WAIT_AT_END = 900.0
"""Seconds a finished run waits for its background evaluations before leaving them running."""


@dataclass(frozen=True)
class Target:
    """What to evaluate: a Hugging Face folder, and the run and global step it came from (a checkpoint)."""

    model_dir: Path
    run_dir: Path | None = None
    step: int | None = None


def resolve(path: Path, scratch: Path) -> Target:
    """The export at ``path``, or ``path``'s checkpoint exported into ``scratch`` (with its run and step).

    Raises:
        ConfigError: ``path`` is neither an export nor a usable checkpoint, or its export has no tokenizer.
    """
    if (path / "config.json").is_file():
        target = Target(path)
    else:
        from trainer.export import export

        written = export(path, scratch / "hf")
        target = Target(scratch / "hf", written.path.parent.parent, written.meta.step)
    if not (target.model_dir / "tokenizer.json").is_file():
        raise ConfigError(
            f"{path} has no tokenizer.json, which lm-eval needs; export its checkpoint again with "
            "python -m trainer.export (exports now carry one for every data.tokenizer, bytes too)"
        )
    return target


def task_manager(tasks: list[str], include: list[Path]) -> Any:
    """lm-eval's task index over its own tasks, ramp's (:data:`TASKS_DIR`) and ``include``.

    Raises:
        ConfigError: a task name it does not know, or no task at all.
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(
            "lm-eval is not installed; install ramp's eval extra: pip install -e '.[eval]' (make venv installs it)"
        ) from None
    if not tasks:
        raise ConfigError("--tasks is empty; name one or more tasks, e.g. --tasks ramp_tiny")
    for folder in include:
        if not folder.is_dir():
            raise ConfigError(f"--include-path {folder} is not a folder; give a folder of lm-eval task YAMLs")
    manager = TaskManager(include_path=[str(folder) for folder in [TASKS_DIR, *include]])
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"unknown lm-eval task {', '.join(unknown)}; `lm_eval ls tasks` lists them (ramp's own: "
            f"{', '.join(sorted(p.name for p in TASKS_DIR.iterdir() if p.is_dir()))}); python -m trainer.evaluate "
            "--include-path adds a folder of task YAMLs (train.lm_eval_tasks takes only those two kinds)"
        )
    return manager


def flatten(results: dict[str, dict[str, Any]], step: int | None) -> dict[str, Any]:
    """lm-eval's ``results`` as one record: ``lm_eval/<task>/<metric>`` for each numeric metric (its filter,
    ``none`` for plain tasks, dropped: ``acc,none`` is ``acc``), ``_stderr`` ones included; ``step`` first
    when given."""
    record: dict[str, Any] = {} if step is None else {"step": step}
    for task, metrics in results.items():
        for key, value in metrics.items():
            name, _, filter_name = key.partition(",")
            if not filter_name or isinstance(value, bool) or not isinstance(value, int | float):
                continue  # alias, sample counts and the like
            suffix = "" if filter_name == "none" else f"/{filter_name}"
            record[f"{PREFIX}/{task}/{name}{suffix}"] = value
    return record


def evaluate(
    model_dir: Path, tasks: list[str], manager: Any, limit: int | None, batch_size: int, device: str
) -> dict[str, dict[str, Any]]:
    """lm-eval's results per task for the Hugging Face folder ``model_dir``, in fp32 on ``device``."""
    import lm_eval

    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=tasks,
        batch_size=batch_size,
        device=device,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=1000,
    )
    assert output is not None  # None only on ranks other than lm-eval's first; this runs one process
    results: dict[str, dict[str, Any]] = output["results"]
    return results


def append_to_run(run_dir: Path, record: dict[str, Any]) -> Path:
    """Append ``record`` to ``run_dir``'s metrics.jsonl as one whole line (see
    :func:`trainer.observe.recorder.append_line`), next to the training's records."""
    from trainer.observe.recorder import append_line

    path = run_dir / "metrics.jsonl"
    append_line(path, record)
    return path


def recorded(run_dir: Path, step: int) -> dict[str, Any] | None:
    """The newest downstream evaluation record at global step ``step`` in ``run_dir``'s metrics.jsonl (None
    if there is none), read under the lock its writers append under (see :func:`append_to_run`)."""
    with open(run_dir / "metrics.jsonl", "rb") as file:
        fcntl.flock(file, fcntl.LOCK_SH)
        lines = file.read().splitlines()
    for line in reversed(lines):
        record: dict[str, Any] = json.loads(line) if line.strip() else {}
        if record.get("step") == step and any(key.startswith(f"{PREFIX}/") for key in record):
            return record
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "path",
        type=Path,
        help="a checkpoints/step_<N> folder, a run folder (its newest checkpoint) or an export",
    )
    parser.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated (ramp_tiny,...)")
    parser.add_argument(
        "--limit", type=int, default=None, help="evaluate only the first N items of each task"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument(
        "--include-path", type=Path, action="append", default=[], help="a folder of more task YAMLs"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument(
        "--no-wandb",
        action="store_true",
        help="record a checkpoint's results in metrics.jsonl only, not in its run's wandb run "
        "(train.lm_eval_every passes it: the training logs them to wandb)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, 2 (with one ``ramp: error:`` line) on a bad path or task."""
    args = _parser().parse_args(argv)
    from trainer.observe import setup_logging

    setup_logging(rank=0)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as trainer.export: no DeepSpeed GPU warning on a CPU
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the export's bar of shards written
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    try:
        with tempfile.TemporaryDirectory(prefix="ramp-eval-") as scratch:
            target = resolve(args.path, Path(scratch))  # a bad path first: it fails in a second, not 15
            manager = task_manager(tasks, args.include_path)
            import torch

            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            results = evaluate(target.model_dir, tasks, manager, args.limit, args.batch_size, device)
    except ConfigError as err:
        print(f"ramp: error: {err}", file=sys.stderr)
        return 2
    record = flatten(results, target.step)
    where = f"step {target.step} ({args.path})" if target.step is not None else str(args.path)
    for key, value in record.items():
        if key != "step":
            print(f"ramp | {where} | {key} {value}")  # in full: the value recorded
    if target.run_dir is not None and args.limit is not None:  # a partial score is no record of the run
        print(f"ramp | --limit {args.limit}: a partial evaluation, not recorded in the run's metrics.jsonl")
    elif target.run_dir is not None:
        print(f"ramp | appended to {append_to_run(target.run_dir, record)} at step {target.step}")
        if not args.no_wandb:
            from trainer.observe.wandb_sink import log_to_run

            run_id = log_to_run(target.run_dir, record)
            if run_id is not None:
                print(f"ramp | logged to wandb run {run_id} at lm_eval/step {target.step}")
    return 0


LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")
LAUNCHER_ENV_PREFIXES = ("MASTER_", "ROLE_", "TORCHELASTIC_", "RAMP_EXIT_DIR")


def alone_env() -> dict[str, str]:
    """This process's environment without torchrun's variables: a background evaluation is a job of its own,
    and lm-eval (through accelerate) would otherwise join the training's process group."""
    return {
        key: value
        for key, value in os.environ.items()
        if key not in LAUNCHER_ENV and not key.startswith(LAUNCHER_ENV_PREFIXES)
    }


@dataclass
class Pending:
    """One background evaluation: its process, the checkpoint's step and its log file."""

    process: subprocess.Popen[bytes]
    step: int
    log_file: Path


class BackgroundEvals:
    """``train.lm_eval_every``: this command on a checkpoint, in a process of its own that training never
    waits on; it appends its results to metrics.jsonl when done. Only global rank 0 starts any (on every
    other rank this holds none, as the Recorder holds no sinks). The evaluations leave wandb alone
    (``--no-wandb``): ``send`` takes each result that lands in metrics.jsonl to the training's wandb run."""

    def __init__(self, cfg: Any, run_dir: Path, is_main: bool) -> None:
        self.every, self.tasks, self.device = cfg.lm_eval_every, list(cfg.lm_eval_tasks), cfg.lm_eval_device
        self.run_dir, self.is_main = run_dir, is_main
        self.pending: list[Pending] = []
        self.send: Callable[[dict[str, Any]], None] | None = None
        """Where a finished evaluation's record goes besides metrics.jsonl (the Recorder's wandb sink)."""

    def steps(self) -> set[int]:
        """The global steps of the checkpoints evaluations still running read (rank 0; empty elsewhere)."""
        self.report()
        return {p.step for p in self.pending}

    def due(self, step: int, end_step: int) -> bool:
        """Whether the checkpoint of global step ``step`` is evaluated: every ``lm_eval_every`` and the end."""
        return self.every > 0 and (step % self.every == 0 or step == end_step)

    def start(self, checkpoint: Path, step: int) -> None:
        """Evaluate ``checkpoint`` (global step ``step``) in the background; its output goes to
        ``run.dir/lm_eval/step_<N>.log``."""
        if not self.is_main:
            return
        log_file = self.run_dir / PREFIX / f"step_{step}.log"
        log_file.parent.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "trainer.evaluate", str(checkpoint), "--tasks", ",".join(self.tasks)]
        command.append("--no-wandb")  # one writer to the wandb run: the training (see send)
        with open(log_file, "wb") as out:
            process = subprocess.Popen(
                [*command, "--device", self.device],
                env=alone_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C meant for training does not cut an evaluation short
            )
        self.pending.append(Pending(process, step, log_file))
        self.report()

    def report(self) -> None:
        """Say in one line each which evaluations ended since the last call; send on each result."""
        for done in [p for p in self.pending if p.process.poll() is not None]:
            self.pending.remove(done)
            wanted = done.process.returncode == 0 and self.send is not None
            record = recorded(self.run_dir, done.step) if wanted else None
            if record is not None and self.send is not None:
                self.send(record)
                log.info("ramp | lm-eval of step %d done: in metrics.jsonl and wandb", done.step)
            elif done.process.returncode == 0:
                log.info("ramp | lm-eval of step %d done: in metrics.jsonl", done.step)
            else:
                log.warning(
                    "ramp | lm-eval of step %d failed (exit %d); see %s",
                    done.step,
                    done.process.returncode,
                    done.log_file,
                )

    def finish(self, timeout: float = WAIT_AT_END) -> None:
        """Wait up to ``timeout`` seconds for the evaluations still running; say in one line which go on."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.2)
            self.report()
        self.leave()

    def leave(self) -> None:
        """Leave the running evaluations to finish on their own, saying so in one line."""
        self.report()
        if self.pending:
            steps = ", ".join(str(p.step) for p in self.pending)
            log.info(
                "ramp | lm-eval of step %s still running in the background: it appends to metrics.jsonl when "
                "done (output in %s)",
                steps,
                self.run_dir / PREFIX,
            )


if __name__ == "__main__":
    sys.exit(main())
