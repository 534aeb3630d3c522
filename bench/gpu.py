"""The GPU check, one command: ``python -m bench.gpu [--smoke] [--budget 480] [--out DIR]``.

On the GPU machine run it through ``bench/gpu.sh`` (which installs the wheels ``make gpu-wheels``
fetched). Its parts, in order, each recorded with a status (ok, failed or skipped), its error or
reason, its seconds and its numbers; a part that fails is recorded and the next one runs:

    environment      the device, GPU count, torch / CUDA / transformers / Python versions, commit, date
    cuda_tests       ``pytest -m cuda tests``: passed, failed and skipped counts
    <model> compile=off|on
                     ramp itself (``python -m trainer.main``, bf16, one GPU) against a bare PyTorch loop
                     (``bench.bare_loop``) on the same model, batch and data: tokens/s after the warm-up
                     steps, ramp's own MFU field, peak memory, and ramp / bare
    fsdp <model>     ramp with ``backend=fsdp`` (FSDP2, torchrun, one rank) on a compile=off configuration:
                     the same numbers, against the bare loop and ramp's DDP run of the same configuration
    checkpoint <model>
                     ``bench.checkpoint`` with the state on the device: the blocking time of ramp's
                     synchronous DCP save, of its asynchronous one (``train.ckpt_async``, with the
                     background write's time) and of a plain ``torch.save``, and their ratios

gpt2-124m trains at sequence 1024 and llama-1b at 2048, each with its real vocabulary (50,304 and
128,256) although the data is the built-in corpus in byte tokens. ``--smoke`` runs the same code paths
on the CPU with gpt2-tiny and llama-tiny at sequence 64 (``make test`` runs it); ``--only`` picks parts
by name (shell-style patterns: ``--only 'environment,fsdp *,checkpoint *'``). The whole check keeps to
``--budget`` seconds: a part that the time left cannot hold is recorded as skipped (out of time), and
every command is stopped at the budget's end. Results go to ``DIR/gpu.json`` and ``DIR/gpu.md``
(written after every part, so a killed run keeps what it measured), every command's output to
``DIR/gpu.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import functools
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESERVE_S = 5.0
"""Budget kept back from every command, for writing the results."""
TAIL_LINES = 25
"""Lines of a failed command's output (or a traceback) kept as the part's error."""


class Skipped(Exception):
    """Raised by a part that does not apply here; its message is the reason."""


class PartFailed(Exception):
    """A part failed after measuring something: the message says what failed, ``numbers`` what was measured."""

    def __init__(self, message: str, numbers: dict[str, Any]) -> None:
        super().__init__(message)
        self.numbers = numbers


class CommandFailed(RuntimeError):
    """A command exited non-zero or ran out of time; the message ends with its last lines of output."""


@dataclass(frozen=True)
class Measure:
    """One measured configuration: a model preset, its vocabulary, sequence, micro-batch, compile."""

    model: str
    vocab_size: int | None
    seq_len: int
    micro_batch: int
    compile: bool

    @property
    def name(self) -> str:
        """The part's name, such as ``gpt2-124m compile=off``."""
        return f"{self.model} compile={'on' if self.compile else 'off'}"


@dataclass(frozen=True)
class CheckpointMeasure:
    """The checkpoint part's model (its vocabulary) and timed rounds of ``bench.checkpoint``."""

    model: str
    vocab_size: int | None
    repeats: int
    warmup_rounds: int = 1


@dataclass(frozen=True)
class Plan:
    """What a run of the check does: the GPU sizes, or the CPU smoke sizes."""

    mode: str
    device: str
    precision: str
    steps: int
    warmup_steps: int
    measures: tuple[Measure, ...]
    fsdp: tuple[Measure, ...]
    """Configurations (each also in ``measures``) that ramp trains again with backend=fsdp."""
    checkpoint: CheckpointMeasure
    needs_s: float
    """Budget a measured part must have left to start."""
    command_s: float
    """The longest one command may run (the budget may cut it shorter)."""
    peak_flops: float | None = None
    """``logger.peak_flops`` for ramp; None: ramp's table for the GPU."""
    notes: tuple[str, ...] = ()


GPU = Plan(
    mode="gpu",
    device="cuda",
    precision="bf16",
    steps=30,
    warmup_steps=10,
    # Micro-batches sized for an 80-141 GB GPU (H100, H200) without activation checkpointing.
    measures=(
        Measure("gpt2-124m", 50304, 1024, 16, compile=False),
        Measure("llama-1b", 128256, 2048, 4, compile=False),
        Measure("gpt2-124m", 50304, 1024, 16, compile=True),
        Measure("llama-1b", 128256, 2048, 4, compile=True),
    ),
    fsdp=(
        Measure("gpt2-124m", 50304, 1024, 16, compile=False),
        Measure("llama-1b", 128256, 2048, 4, compile=False),
    ),
    checkpoint=CheckpointMeasure("gpt2-124m", 50304, repeats=5),
    needs_s=45.0,
    command_s=300.0,
)
SMOKE = Plan(
    mode="smoke",
    device="cpu",
    precision="bf16",
    steps=6,
    warmup_steps=2,
    measures=(
        Measure("gpt2-tiny", None, 64, 2, compile=False),
        Measure("llama-tiny", None, 64, 2, compile=False),
        Measure("gpt2-tiny", None, 64, 2, compile=True),
    ),
    fsdp=(Measure("gpt2-tiny", None, 64, 2, compile=False),),
    checkpoint=CheckpointMeasure("gpt2-tiny", None, repeats=1, warmup_rounds=0),
    needs_s=10.0,
    command_s=150.0,
    peak_flops=1e12,
    notes=(
        "smoke mode: the GPU check's code paths on the CPU with tiny models; its numbers measure nothing",
        "compile=on for gpt2-tiny only: on a 2-core CPU with a cold cache torch.compile added about 31 s "
        "(gpt2-tiny) and 48 s (llama-tiny) to each process that compiles, and ramp and the bare loop both "
        "do, so over 60 s per model",
        "MFU against a nominal peak of 1e12 FLOP/s (logger.peak_flops), only to exercise ramp's mfu field",
    ),
)


@dataclass
class Budget:
    """Seconds the whole check may take, counted from its creation."""

    seconds: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        """Seconds left, never below zero."""
        return max(0.0, self.seconds - (time.monotonic() - self.started))

    def timeout(self, cap: float) -> float:
        """A command's timeout: ``cap``, cut to the budget left (less :data:`RESERVE_S`).

        Raises:
            CommandFailed: no time is left for a command.
        """
        left = self.left() - RESERVE_S
        if left <= 1:
            raise CommandFailed("out of time: the budget ended before this command could start")
        return min(cap, left)


@dataclass
class Part:
    """A named step of the check: ``run`` returns its numbers; it starts only with ``needs_s`` left."""

    name: str
    run: Callable[[], dict[str, Any]]
    needs_s: float = 0.0


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_part(part: Part, budget: Budget) -> dict[str, Any]:
    """Run one part: ok with its numbers, failed with its error's last lines, or skipped with a reason."""
    if budget.left() < part.needs_s:
        return {"status": "skipped", "reason": "out of time", "error": None, "seconds": 0.0}
    started = time.monotonic()
    record: dict[str, Any]
    try:
        numbers = part.run()
    except Skipped as why:
        record = {"status": "skipped", "reason": str(why), "error": None}
    except PartFailed as err:
        record = {"status": "failed", "error": tail(str(err)), **err.numbers}
    except Exception as err:  # a part's failure is a result; the next part still runs
        text = str(err) if isinstance(err, CommandFailed) else traceback.format_exc()
        record = {"status": "failed", "error": tail(text)}
    else:
        record = {"status": "ok", "error": None, **numbers}
    record["seconds"] = round(time.monotonic() - started, 1)
    return record


def run_parts(
    parts: list[Part],
    budget: Budget,
    report: Callable[[dict[str, dict[str, Any]]], Any] | None = None,
    results: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every part in order (see :func:`run_part`) into ``results`` (a new dict by default), which
    ``report`` gets after each part; a later part may read an earlier one's numbers there."""
    results = {} if results is None else results
    for part in parts:
        print(f"bench.gpu | {part.name} ...", flush=True)
        record = results[part.name] = run_part(part, budget)
        print(f"bench.gpu | {part.name}: {status_text(record)} ({record['seconds']} s)", flush=True)
        if report is not None:
            report(results)
    return results


def status_text(record: dict[str, Any]) -> str:
    """``ok``, ``failed: <the error's last line>`` or ``skipped: <reason>``."""
    if record["status"] == "skipped":
        return f"skipped: {record.get('reason')}"
    if record["status"] == "failed":
        lines = [
            line
            for line in str(record.get("error") or "").strip().splitlines()
            if line.strip() and "HYDRA_FULL_ERROR" not in line
        ]
        return f"failed: {lines[-1] if lines else 'no error text'}"
    return "ok"


@dataclass
class Runner:
    """Runs commands for the parts: from the repository, within the budget, their output into the log."""

    budget: Budget
    log: Path
    env: dict[str, str]

    def run(self, cmd: list[str], cap: float, stop_at: str | None = None) -> str:
        """Run ``cmd`` (its own process group) and return its output.

        Args:
            cmd: the command.
            cap: its timeout in seconds, cut to the budget left.
            stop_at: a regular expression; the command is stopped (SIGKILL to its group) once a line of
                its output matches, and that counts as success.

        Raises:
            CommandFailed: it exited non-zero or ran past its timeout.
        """
        timeout = self.budget.timeout(cap)
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            kill_group(proc)

        timer = threading.Timer(timeout, expire)
        timer.start()
        lines, stopped = read_until(proc, re.compile(stop_at) if stop_at else None)
        timer.cancel()
        kill_group(proc)
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
        output = "".join(lines)
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n{output}")
        if expired.is_set() and not stopped:
            raise CommandFailed(f"{' '.join(cmd[:4])} ...: timed out after {timeout:.0f} s\n{tail(output)}")
        if not stopped and proc.returncode != 0:
            raise CommandFailed(f"{' '.join(cmd[:4])} ...: exit {proc.returncode}\n{tail(output)}")
        return output


def read_until(proc: subprocess.Popen[str], stop: re.Pattern[str] | None) -> tuple[list[str], bool]:
    """``proc``'s output lines up to its end, or up to the first that ``stop`` matches (then True)."""
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if stop is not None and stop.search(line):
            return lines, True
    return lines, False


def kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL ``proc``'s process group (it was started in its own session): whatever of it still runs,
    compile workers and torchrun's ranks too. Called before ``proc`` is reaped, so its id is not reused."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def command_env() -> dict[str, str]:
    """This environment, offline and unbuffered, with the repository first on PYTHONPATH."""
    env = dict(os.environ)
    path = [str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    env.update(
        PYTHONPATH=os.pathsep.join(path),
        PYTHONUNBUFFERED="1",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


def version(package: str) -> str | None:
    """An installed distribution's version, or None."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it; $RAMP_COMMIT where git is absent."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return {"commit": os.environ.get("RAMP_COMMIT"), "dirty": None}
    return {"commit": sha, "dirty": diff.returncode != 0}


def environment() -> dict[str, Any]:
    """Part a: the device and the software versions."""
    import torch

    from trainer.observe.flops import peak_for_device_name

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    return {
        "device": device,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "peak_bf16_flops": peak_for_device_name(device) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": version("transformers"),
        "hydra_core": version("hydra-core"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        **git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def junit_counts(path: Path) -> dict[str, Any]:
    """Passed, failed, errored and skipped tests of a JUnit XML report, and modules that did not import."""
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    not_collected: list[str] = []
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        error = case.find("error")
        if case.find("failure") is not None:
            counts["failed"] += 1
            failed.append(test)
        elif error is not None and "collection failure" in (error.get("message") or ""):
            not_collected.append(test.strip(":"))
        elif error is not None:
            counts["errors"] += 1
            failed.append(test)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failed_tests": failed, "not_collected": not_collected}


def cuda_tests(runner: Runner, scratch: Path) -> dict[str, Any]:
    """Part b: ``pytest -m cuda tests``; a module that cannot be imported here is listed, not fatal.

    Raises:
        PartFailed: a CUDA test failed (the counts are kept). CommandFailed: pytest wrote no report.
    """
    report = scratch / "cuda-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests", "-q", "-p", "no:cacheprovider"]
    cmd += ["--continue-on-collection-errors", f"--junitxml={report}"]
    try:
        output = runner.run(cmd, cap=240)
    except CommandFailed as err:  # pytest exits 1 on a failure or a collection error: the report says which
        if not report.exists():
            raise
        output = str(err)
    counts = junit_counts(report)
    if counts["failed"] or counts["errors"]:
        raise PartFailed(f"{tail(output)}\n{counts['failed']} failed, {counts['errors']} errors", counts)
    return counts


@functools.cache
def token_file() -> Path:
    """ramp's cached built-in corpus in byte tokens (built on first use), for the bare loop."""
    from bench.train import token_file as build

    return build()


def ramp_rate(run_dir: Path, warmup_steps: int) -> dict[str, Any]:
    """tokens/s, MFU and peak memory from ramp's metrics.jsonl, over the records after the warm-up.

    Each record's interval lasts ``tokens / tokens_per_s``: the rate is the tokens over the summed
    intervals, the MFU each record's weighted by its interval (the same ratio), the memory the
    largest of all records.

    Raises:
        RuntimeError: no training record after the warm-up.
    """
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "tokens_per_s" in r]
    spans: list[tuple[float, float, float | None]] = []  # tokens, seconds, MFU of each record's interval
    for before, record in itertools.pairwise(train):
        if record["step"] > warmup_steps:
            tokens = record["tokens"] - before["tokens"]
            spans.append((tokens, tokens / record["tokens_per_s"], record.get("mfu")))
    if not spans:
        raise RuntimeError(f"no training record after step {warmup_steps} in {run_dir / 'metrics.jsonl'}")
    seconds = sum(s for _, s, _ in spans)
    weighted = [m * s for _, s, m in spans if m is not None]
    return {
        "tokens_per_s": sum(t for t, _, _ in spans) / seconds,
        "mfu": sum(weighted) / seconds if len(weighted) == len(spans) else None,
        "memory_gb": max(r["memory_gb"] for r in train),
        "measured_steps": len(spans),
    }


def ramp_overrides(plan: Plan, measure: Measure, run_dir: Path) -> list[str]:
    """ramp's command-line overrides for one measured run."""
    overrides = [
        "logger.wandb.mode=disabled",
        "logger.progress=lines",
        "train.log_every=1",
        "train.eval_every=0",
        "data=builtin",
        f"run.dir={run_dir}",
        f"train.max_steps={plan.steps}",
        f"model={measure.model}",
        f"train.seq_len={measure.seq_len}",
        f"train.micro_batch_size={measure.micro_batch}",
        f"train.precision={plan.precision}",
        f"train.compile={'true' if measure.compile else 'false'}",
    ]
    if measure.vocab_size is not None:
        overrides.append(f"model.vocab_size={measure.vocab_size}")
    if plan.peak_flops is not None:
        overrides.append(f"logger.peak_flops={plan.peak_flops}")
    return overrides


def run_ramp(
    runner: Runner, plan: Plan, measure: Measure, run_dir: Path, launcher: list[str], extra: list[str]
) -> dict[str, Any]:
    """ramp itself, stopped once its last step is recorded (its final checkpoint is no part of the
    measure: for llama-1b it is about 15 GB of weights and AdamW state); its rate after the warm-up."""
    started = time.monotonic()
    cmd = [*launcher, "-m", "trainer.main", *ramp_overrides(plan, measure, run_dir), *extra]
    runner.run(cmd, cap=plan.command_s, stop_at=rf"\bstep {plan.steps}/{plan.steps}\b")
    return {**ramp_rate(run_dir, plan.warmup_steps), "wall_s": round(time.monotonic() - started, 1)}


def run_bare(runner: Runner, plan: Plan, measure: Measure) -> dict[str, Any]:
    """The bare PyTorch loop on the same model, batch, precision and data; its rate after the warm-up.

    Raises:
        RuntimeError: it printed no ``BENCH measured`` line.
    """
    started = time.monotonic()
    cmd = [sys.executable, "-m", "bench.bare_loop", "--tokens", str(token_file()), "--steps", str(plan.steps)]
    cmd += ["--micro-batch", str(measure.micro_batch), "--seq-len", str(measure.seq_len)]
    cmd += ["--model", measure.model, "--device", plan.device, "--warmup-steps", str(plan.warmup_steps)]
    if measure.vocab_size is not None:
        cmd += ["--vocab-size", str(measure.vocab_size)]
    cmd += ["--bf16"] if plan.precision == "bf16" else []
    cmd += ["--compile"] if measure.compile else []
    output = runner.run(cmd, cap=plan.command_s)
    found = re.search(r"BENCH measured tokens_per_s=(\S+) memory_gb=(\S+)", output)
    if found is None:
        raise RuntimeError(f"the bare loop printed no 'BENCH measured' line\n{tail(output)}")
    return {
        "tokens_per_s": float(found[1]),
        "memory_gb": float(found[2]),
        "wall_s": round(time.monotonic() - started, 1),
    }


def require_device(plan: Plan) -> None:
    """Raises Skipped: the plan is for CUDA and this machine has none."""
    import torch

    if plan.device == "cuda" and not torch.cuda.is_available():
        raise Skipped("no CUDA device here (python -m bench.gpu --smoke runs the CPU smoke test)")


def measure_part(runner: Runner, plan: Plan, measure: Measure, scratch: Path) -> dict[str, Any]:
    """Part c: ramp and the bare loop on one configuration, and ramp / bare.

    Raises:
        PartFailed: the bare loop failed after ramp was measured (ramp's numbers are kept).
    """
    require_device(plan)
    numbers: dict[str, Any] = {
        "model": measure.model,
        "vocab_size": measure.vocab_size,
        "seq_len": measure.seq_len,
        "micro_batch": measure.micro_batch,
        "precision": plan.precision,
        "compile": measure.compile,
        "steps": plan.steps,
        "warmup_steps": plan.warmup_steps,
    }
    run_dir = scratch / measure.name.replace(" ", "-").replace("=", "-")
    numbers.update(run_ramp(runner, plan, measure, run_dir, [sys.executable], []))
    try:
        bare = run_bare(runner, plan, measure)
    except Exception as err:
        raise PartFailed(f"the bare loop failed; ramp was measured\n{err}", numbers) from err
    numbers.update({f"bare_{key}": value for key, value in bare.items()})
    numbers["ratio"] = numbers["tokens_per_s"] / bare["tokens_per_s"]
    return numbers


def fsdp_part(
    runner: Runner, plan: Plan, measure: Measure, scratch: Path, results: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Part d: ramp with ``backend=fsdp`` (torchrun, one rank) on ``measure``; its ratios to the bare loop
    and to ramp's DDP run of the same configuration when this run measured them (part c).

    Raises:
        Skipped: ramp has no fsdp backend (no conf/backend/fsdp.yaml), or no CUDA device.
    """
    if not (REPO / "conf" / "backend" / "fsdp.yaml").exists():
        raise Skipped("no fsdp backend")
    require_device(plan)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    numbers: dict[str, Any] = {
        "model": measure.model,
        "seq_len": measure.seq_len,
        "micro_batch": measure.micro_batch,
        "compile": measure.compile,
    }
    run_dir = scratch / f"fsdp-{measure.name}".replace(" ", "-").replace("=", "-")
    numbers.update(run_ramp(runner, plan, measure, run_dir, launcher, ["backend=fsdp"]))
    same = results.get(measure.name, {})
    if same.get("bare_tokens_per_s"):
        numbers["bare_tokens_per_s"] = same["bare_tokens_per_s"]
        numbers["ratio"] = numbers["tokens_per_s"] / same["bare_tokens_per_s"]
    if same.get("tokens_per_s"):
        numbers["ddp_tokens_per_s"] = same["tokens_per_s"]
        numbers["ratio_to_ddp"] = numbers["tokens_per_s"] / same["tokens_per_s"]
    return numbers


def checkpoint_part(runner: Runner, plan: Plan) -> dict[str, Any]:
    """Part e: ``bench.checkpoint`` with the state on the plan's device: the medians of each save's
    blocking seconds and of their per-round ratios to ``torch.save`` (see :mod:`bench.checkpoint`).

    Raises:
        Skipped: no CUDA device. RuntimeError: it printed no ``BENCH checkpoint`` line.
    """
    require_device(plan)
    measure = plan.checkpoint
    cmd = [sys.executable, "-m", "bench.checkpoint", "--model", measure.model, "--device", plan.device]
    cmd += ["--repeats", str(measure.repeats), "--warmup-rounds", str(measure.warmup_rounds), "--json"]
    if measure.vocab_size is not None:
        cmd += ["--vocab-size", str(measure.vocab_size)]
    output = runner.run(cmd, cap=plan.command_s)
    found = re.search(r"^BENCH checkpoint (\{.*\})$", output, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"bench.checkpoint printed no 'BENCH checkpoint' line\n{tail(output)}")
    numbers: dict[str, Any] = json.loads(found[1])
    return numbers


def build_parts(
    plan: Plan,
    runner: Runner,
    scratch: Path,
    results: dict[str, dict[str, Any]],
    only: list[str] | None = None,
) -> list[Part]:
    """The check's parts in order: environment, CUDA tests, the measured runs, FSDP2, checkpoints; with
    ``only``, those whose name matches one of its shell-style patterns."""
    parts = [
        Part("environment", environment),
        Part("cuda_tests", lambda: cuda_tests(runner, scratch), needs_s=plan.needs_s / 2),
    ]
    for measure in plan.measures:
        parts.append(
            Part(measure.name, functools.partial(measure_part, runner, plan, measure, scratch), plan.needs_s)
        )
    for measure in plan.fsdp:
        run = functools.partial(fsdp_part, runner, plan, measure, scratch, results)
        parts.append(Part(f"fsdp {measure.model}", run, plan.needs_s))
    parts.append(
        Part(f"checkpoint {plan.checkpoint.model}", lambda: checkpoint_part(runner, plan), plan.needs_s)
    )
    if only is None:
        return parts
    return [part for part in parts if any(fnmatch.fnmatchcase(part.name, pattern) for pattern in only)]


def number(value: Any, style: str) -> str:
    """A table cell: ``value`` in ``style`` (``,.0f``, ``.1%``, ``.2f``, ``.3f``), or blank."""
    return "" if value is None else format(value, style)


def part_row(name: str, record: dict[str, Any]) -> str:
    """One part's line of the Markdown table."""
    status = status_text(record)
    if name == "cuda_tests" and "passed" in record:
        status += f": {record['passed']} passed, {record['failed']} failed, {record['skipped']} skipped"
    cells = [
        name,
        status.replace("|", "/"),
        number(record.get("seconds"), ".0f"),
        number(record.get("tokens_per_s"), ",.0f"),
        number(record.get("mfu"), ".1%"),
        number(record.get("memory_gb"), ".2f"),
        number(record.get("bare_tokens_per_s"), ",.0f"),
        number(record.get("ratio"), ".3f"),
        number(record.get("ratio_to_ddp"), ".3f"),
    ]
    return "| " + " | ".join(cells) + " |"


def checkpoint_lines(name: str, record: dict[str, Any]) -> list[str]:
    """A checkpoint part's numbers as a sentence (none when it measured nothing)."""
    if "plain_s" not in record:
        return []
    return [
        "",
        f"{name} ({record['parameters_m']:.1f}M parameters, median of {record['rounds']} round(s)): "
        f"torch.save {record['plain_s']:.3f} s; ramp's sync DCP save {record['sync_s']:.3f} s "
        f"(x{record['sync_ratio']:.2f}); its async DCP save blocks {record['async_blocked_s']:.3f} s "
        f"(x{record['async_blocked_ratio']:.2f}), written {record['async_written_s']:.3f} s after the call "
        f"(x{record['async_written_ratio']:.2f}), completed {record['async_complete_s']:.3f} s after that.",
    ]


def environment_line(env: dict[str, Any]) -> str:
    """The environment part as one sentence."""
    changes = " (with local changes)" if env.get("dirty") else ""
    return (
        f"{env.get('device')} ({env.get('gpu_count')} GPU), torch {env.get('torch')} (CUDA {env.get('cuda')}), "
        f"transformers {env.get('transformers')}, Python {env.get('python')}; "
        f"commit {env.get('commit')}{changes}; {env.get('date')}."
    )


def markdown(report: dict[str, Any]) -> str:
    """The results as Markdown: the environment, a table of every part, then each failure's error."""
    parts: dict[str, dict[str, Any]] = report["parts"]
    env = parts.get("environment", {})
    lines = [f"# ramp GPU check ({report['mode']})", ""]
    if env.get("status") == "ok":
        lines.append(environment_line(env))
    lines.append(f"Budget {report['budget_s']:.0f} s, took {report['elapsed_s']:.0f} s.")
    lines += ["", *(f"- {note}" for note in report["notes"]), ""]
    header = (
        "| part | status | s | tokens/s | MFU | peak memory GB | bare tokens/s | ramp / bare | FSDP2 / DDP |"
    )
    lines += [header, "| --- " * 9 + "|"]
    lines += [part_row(name, record) for name, record in parts.items()]
    for name, record in parts.items():
        lines += checkpoint_lines(name, record)
    for name, record in parts.items():
        if record["status"] == "failed":
            lines += ["", f"## {name}: error", "", "```", str(record["error"]), "```"]
    return "\n".join(lines) + "\n"


def write_results(
    out: Path, header: dict[str, Any], results: dict[str, dict[str, Any]], budget: Budget
) -> str:
    """Write ``gpu.json`` and ``gpu.md`` into ``out``; returns the Markdown."""
    report = {**header, "elapsed_s": round(budget.seconds - budget.left(), 1), "parts": results}
    (out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "gpu.md").write_text(text)
    return text


def options(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the same code paths on the CPU, tiny")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    parser.add_argument("--out", type=Path, default=None, help="default: results/gpu-<UTC date-time>/")
    parser.add_argument(
        "--only",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=None,
        help="comma-separated part names or shell-style patterns, e.g. 'environment,fsdp *'; default: all",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the check; exit 1 if a part failed (every result is in the files either way)."""
    opts = options(argv)
    budget = Budget(opts.budget)
    plan = SMOKE if opts.smoke else GPU
    now = datetime.datetime.now(datetime.timezone.utc)
    out: Path = opts.out or REPO / "results" / f"gpu-{now:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu.log"
    log.write_text(f"bench.gpu {plan.mode}, {now.isoformat(timespec='seconds')}\n")
    header = {
        "mode": plan.mode,
        "budget_s": opts.budget,
        "started": now.isoformat(timespec="seconds"),
        "plan": asdict(plan),
        "notes": [
            *plan.notes,
            "tokens/s, MFU and memory from ramp's metrics.jsonl after the warm-up steps; ramp is stopped "
            "once its last step is recorded, before its final checkpoint",
        ],
    }
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ramp-gpu-") as scratch:
        runner = Runner(budget, log, command_env())
        parts = build_parts(plan, runner, Path(scratch), results, opts.only)
        run_parts(parts, budget, lambda done: write_results(out, header, done, budget), results)
    print(write_results(out, header, results, budget))
    print(f"bench.gpu | results in {out}", flush=True)
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
