"""Training throughput against a bare PyTorch loop: ``python -m bench.train [--rounds 8] [--nproc 2]``.

In one run, each round launches every contender once, as its own process, in a rotating order:

    (a) bare      a bare PyTorch loop (the reference)
    (b) ramp      ramp with DDP (``torchrun -m trainer.main``)
    (c) zero2     ramp with DeepSpeed ZeRO-2 (when the deepspeed backend is installed)
    (d) hf        the Hugging Face Trainer, configured to match
    (e) control   the bare loop again: how far this machine's noise moves a ratio

All train the same model (gpt2-tiny, byte vocabulary) on the same token file with the same batch,
AdamW, clipping and a cosine schedule for K steps. Throughput is timed between the end of step 1 and
the end of step K as each process reports them, so start-up is excluded from it and reported on
its own as the time from the command to the end of the first step. Ratios are taken within a round
(each contender against that round's bare loop), then summarised over rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Sample:
    """One contender's measurements in one round."""

    tokens_per_s: float
    first_step_s: float
    peak_rss_mb: float


@dataclass
class Contender:
    """A program under test: its names, the module it runs with its arguments, and its samples."""

    name: str
    label: str
    module: str
    args: list[str]
    samples: list[Sample] = field(default_factory=list)


def token_file() -> Path:
    """ramp's cached built-in corpus (built on first use)."""
    import torch

    from trainer.config import compose
    from trainer.data import build_data
    from trainer.distributed import DistInfo

    data = build_data(compose(["train.eval_every=0"]), DistInfo(0, 0, 1, 1, torch.device("cpu")))
    return data.files.path / "train.bin"


def launcher(nproc: int) -> list[str]:
    """The start of a command that runs ``nproc`` processes: torchrun when more than one, else python."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [sys.executable]


def run_once(
    cmd: list[str], cwd: Path, first_marker: str, last_marker: str, threads: int
) -> tuple[float, float, float]:
    """Launch, watch stdout for the two step markers, track the process tree's peak memory.

    Returns (seconds from launch to the end of step 1, seconds from step 1 to step K, peak RSS in MB).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    env["OMP_NUM_THREADS"] = str(threads)  # every contender gets the same share of the cores
    launched = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = 0.0
    done = threading.Event()

    def watch_memory() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_memory, daemon=True)
    watcher.start()
    first = last = None
    output = []
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter()
        output.append(line)
        if first is None and line.startswith(first_marker):
            first = now
        elif line.startswith(last_marker):
            last = now
    proc.wait(timeout=600)
    done.set()
    watcher.join()
    if proc.returncode != 0 or first is None or last is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(output[-40:])}")
    return first - launched, last - first, peak


def contenders(tokens: Path, steps: int, micro_batch: int, seq_len: int, nproc: int) -> list[Contender]:
    """(a) to (e), on the same data, batch and schedule; (c) only when the deepspeed backend exists."""
    bench_args = ["--tokens", str(tokens), "--steps", str(steps), "--micro-batch", str(micro_batch)]
    bench_args += ["--seq-len", str(seq_len)]
    ramp_args = [
        f"train.max_steps={steps}",
        f"train.micro_batch_size={micro_batch}",
        f"train.seq_len={seq_len}",
        "train.eval_every=0",
        "schedule=cosine",
        "schedule.warmup_steps=5",
        "logger.wandb.mode=disabled",
        "logger.progress=lines",
    ]
    chosen = [
        Contender("bare", "(a) bare PyTorch loop", "bench.bare_loop", bench_args),
        Contender("ramp", "(b) ramp, DDP", "trainer.main", ramp_args),
    ]
    if (REPO / "conf" / "backend" / "deepspeed.yaml").exists():
        zero2 = [*ramp_args, "backend=deepspeed", "backend.zero_stage=2"]
        chosen.append(Contender("zero2", "(c) ramp, DeepSpeed ZeRO-2", "trainer.main", zero2))
    chosen.append(Contender("hf", "(d) Hugging Face Trainer", "bench.hf_trainer", bench_args))
    chosen.append(Contender("control", "(e) bare loop again", "bench.bare_loop", bench_args))
    return chosen


def summary(values: list[float]) -> str:
    """``median [min, max]`` of ``values``."""
    return f"{statistics.median(values):8.3f} [{min(values):.3f}, {max(values):.3f}]"


def main() -> None:
    """Run the contenders round by round, in a rotating order; print throughput, ratios, start-up, memory."""
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--steps", type=int, default=30, help="a multiple of 10: ramp logs steps 1, 10, 20, ..."
    )
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--nproc", type=int, default=2, help="processes per contender (DDP when > 1)")
    opts = parser.parse_args()
    tokens = token_file()
    field_ = contenders(tokens, opts.steps, opts.micro_batch, opts.seq_len, opts.nproc)
    step_tokens = opts.micro_batch * opts.seq_len * opts.nproc
    ratios: dict[str, list[float]] = {c.name: [] for c in field_}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(opts.rounds):
            shift = round_index % len(field_)
            order = field_[shift:] + field_[:shift]
            speeds: dict[str, float] = {}
            for contender in order:
                cwd = Path(scratch) / f"{contender.name}-{round_index}"
                cwd.mkdir()
                ramp = contender.module == "trainer.main"
                cmd = [*launcher(opts.nproc), "-m", contender.module, *contender.args]
                if ramp:
                    cmd.append(f"run.dir={cwd / 'run'}")
                first, last = (
                    ("step 1/", f"step {opts.steps}/")
                    if ramp
                    else ("BENCH step 1", f"BENCH step {opts.steps}")
                )
                threads = max(1, (os.cpu_count() or 1) // opts.nproc)
                first_step, elapsed, peak = run_once(cmd, cwd, first, last, threads)
                sample = Sample(step_tokens * (opts.steps - 1) / elapsed, first_step, peak)
                contender.samples.append(sample)
                speeds[contender.name] = sample.tokens_per_s
            for name, speed in speeds.items():
                ratios[name].append(speed / speeds["bare"])
            line = "  ".join(f"{name} {speeds[name]:.0f}" for name in speeds)
            print(f"round {round_index + 1}/{opts.rounds}: tokens/s {line}", flush=True)
    bare_first = statistics.median(s.first_step_s for s in field_[0].samples)
    print()
    print(f"{opts.rounds} rounds x {opts.steps} steps, {opts.nproc} process(es), {step_tokens} tokens/step, ")
    print(f"{psutil.cpu_count()} CPUs; throughput from the end of step 1 to the end of step {opts.steps}")
    print()
    header = f"{'contender':30} {'tokens/s median [min, max]':>34} {'ratio to (a) [min, max]':>28}"
    print(header + f" {'first step s':>13} {'vs (a)':>7} {'peak RSS MB':>12}")
    for c in field_:
        speeds_ = [s.tokens_per_s for s in c.samples]
        first_s = statistics.median(s.first_step_s for s in c.samples)
        peak = statistics.median(s.peak_rss_mb for s in c.samples)
        speed_text = f"{statistics.median(speeds_):12.0f} [{min(speeds_):.0f}, {max(speeds_):.0f}]"
        print(
            f"{c.label:30} {speed_text:>34} {summary(ratios[c.name]):>28} {first_s:13.2f} "
            f"{first_s - bare_first:+7.2f} {peak:12.0f}"
        )


if __name__ == "__main__":
    main()
