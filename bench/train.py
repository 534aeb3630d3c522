"""Training throughput against a bare PyTorch loop: ``python -m bench.train [--rounds 8] [--nproc 2]``.

In one run, each round launches every contender once, as its own process, in a rotating order:

    (a) bare      a bare PyTorch loop (the reference)
    (b) ramp      ramp with DDP (``torchrun -m trainer.main``)
    (c) fsdp      ramp with FSDP2 (``backend=fsdp``: every parameter, gradient and AdamW state sharded)
    (d) zero2     ramp with DeepSpeed ZeRO-2 (when the deepspeed backend is installed)
    (e) hf        the Hugging Face Trainer, configured to match
    (f) control   the bare loop again: how far this machine's noise moves a ratio

All train the same model (gpt2-tiny, byte vocabulary) on the same token file with the same batch,
AdamW, clipping and a cosine schedule for K steps. Throughput is timed between the end of step 1 and
the end of step K as each process reports them, so start-up is excluded from it and reported on
its own as the time from the command to the end of the first step. Ratios are taken within a round
(each contender against that round's bare loop), then summarised over rounds as the median of the
per-round ratios.

Next to tokens/s, each contender's tokens per CPU-second: the same tokens over the CPU time (user +
system) that all its processes (torchrun and its ranks, or the one process) spent over the same
window. On a shared machine another tenant's load slows a contender's wall clock but barely its CPU
time, so this figure is the steadier one; tokens/s is the one a user waits on, and the one to trust
when the control (f) agrees with the bare loop. While the control's per-round ratio spreads wider
than :data:`STEADY` (max / min), more rounds are run, up to ``--max-rounds``.
"""

from __future__ import annotations

import argparse
import contextlib
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
STEADY = 1.10
"""The widest spread (max / min) of the control's per-round ratio that ends the rounds."""


@dataclass
class Sample:
    """One contender's measurements in one round."""

    tokens_per_s: float
    first_step_s: float
    peak_rss_mb: float
    tokens_per_cpu_s: float
    """The timed tokens over the CPU seconds all the contender's processes spent in the same window."""


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


def tree_cpu_seconds(root: psutil.Process) -> float:
    """CPU seconds (user + system) of ``root`` and all its descendants so far, the reaped ones included."""
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a process that ended between the listing and the read
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


@dataclass
class Timing:
    """What :func:`run_once` measures of one launch."""

    first_step_s: float
    """From the launch to the end of step 1."""
    elapsed_s: float
    """From the end of step 1 to the end of step K."""
    cpu_s: float
    """CPU seconds of the process tree from the end of step 1 to the end of step K."""
    peak_rss_mb: float


def run_once(cmd: list[str], cwd: Path, first_marker: str, last_marker: str, threads: int) -> Timing:
    """Launch, watch stdout for the two step markers, track the process tree's peak memory, and read
    the tree's CPU time at each marker."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    env["OMP_NUM_THREADS"] = str(threads)  # every contender gets the same share of the cores
    launched = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    root = psutil.Process(proc.pid)
    peak = 0.0
    done = threading.Event()

    def watch_memory() -> None:
        nonlocal peak
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
    cpu_first = cpu_last = 0.0
    output = []
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter()
        output.append(line)
        if first is None and line.startswith(first_marker):
            first, cpu_first = now, tree_cpu_seconds(root)
        elif line.startswith(last_marker):
            last, cpu_last = now, tree_cpu_seconds(root)
    proc.wait(timeout=600)
    done.set()
    watcher.join()
    if proc.returncode != 0 or first is None or last is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(output[-40:])}")
    return Timing(first - launched, last - first, cpu_last - cpu_first, peak)


def contenders(tokens: Path, steps: int, micro_batch: int, seq_len: int, nproc: int) -> list[Contender]:
    """(a) to (f), on the same data, batch and schedule; (d) only when the deepspeed backend exists."""
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
        Contender("fsdp", "(c) ramp, FSDP2", "trainer.main", [*ramp_args, "backend=fsdp"]),
    ]
    if (REPO / "conf" / "backend" / "deepspeed.yaml").exists():
        zero2 = [*ramp_args, "backend=deepspeed", "backend.zero_stage=2"]
        chosen.append(Contender("zero2", "(d) ramp, DeepSpeed ZeRO-2", "trainer.main", zero2))
    chosen.append(Contender("hf", "(e) Hugging Face Trainer", "bench.hf_trainer", bench_args))
    chosen.append(Contender("control", "(f) bare loop again", "bench.bare_loop", bench_args))
    return chosen


def summary(values: list[float]) -> str:
    """``median [min, max]`` of ``values``."""
    return f"{statistics.median(values):8.3f} [{min(values):.3f}, {max(values):.3f}]"


def spread(values: list[float]) -> float:
    """max / min of ``values`` (1.0 for fewer than two)."""
    return max(values) / min(values) if len(values) > 1 else 1.0


def run_round(
    field_: list[Contender], round_index: int, opts: argparse.Namespace, scratch: Path
) -> dict[str, Sample]:
    """Launch every contender once, in this round's rotation of the order; their samples by name."""
    shift = round_index % len(field_)
    samples: dict[str, Sample] = {}
    timed_tokens = opts.micro_batch * opts.seq_len * opts.nproc * (opts.steps - 1)
    for contender in field_[shift:] + field_[:shift]:
        cwd = scratch / f"{contender.name}-{round_index}"
        cwd.mkdir()
        ramp = contender.module == "trainer.main"
        cmd = [*launcher(opts.nproc), "-m", contender.module, *contender.args]
        if ramp:
            cmd.append(f"run.dir={cwd / 'run'}")
        first, last = (
            ("step 1/", f"step {opts.steps}/") if ramp else ("BENCH step 1", f"BENCH step {opts.steps}")
        )
        threads = max(1, (os.cpu_count() or 1) // opts.nproc)
        timing = run_once(cmd, cwd, first, last, threads)
        sample = Sample(
            timed_tokens / timing.elapsed_s,
            timing.first_step_s,
            timing.peak_rss_mb,
            timed_tokens / max(timing.cpu_s, 1e-9),
        )
        contender.samples.append(sample)
        samples[contender.name] = sample
    return samples


def print_table(
    field_: list[Contender], ratios: dict[str, list[float]], cpu_ratios: dict[str, list[float]]
) -> None:
    """One line per contender: tokens/s and tokens per CPU-second with their ratios, start-up, memory."""
    bare_first = statistics.median(s.first_step_s for s in field_[0].samples)
    header = f"{'contender':30} {'tokens/s median [min, max]':>34} {'ratio to (a) [min, max]':>28}"
    header += f" {'tokens/CPU-s median':>20} {'CPU ratio to (a) [min, max]':>28}"
    print(header + f" {'first step s':>13} {'vs (a)':>7} {'peak RSS MB':>12}")
    for c in field_:
        speeds = [s.tokens_per_s for s in c.samples]
        per_cpu = statistics.median(s.tokens_per_cpu_s for s in c.samples)
        first_s = statistics.median(s.first_step_s for s in c.samples)
        peak = statistics.median(s.peak_rss_mb for s in c.samples)
        speed_text = f"{statistics.median(speeds):12.0f} [{min(speeds):.0f}, {max(speeds):.0f}]"
        print(
            f"{c.label:30} {speed_text:>34} {summary(ratios[c.name]):>28} {per_cpu:20.0f} "
            f"{summary(cpu_ratios[c.name]):>28} {first_s:13.2f} {first_s - bare_first:+7.2f} {peak:12.0f}"
        )


def main() -> None:
    """Run the contenders round by round, in a rotating order (more rounds while the control is unsteady);
    print throughput and throughput per CPU-second with their ratios, start-up and memory."""
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--max-rounds",
        type=int,
        default=16,
        help=f"add rounds up to this while the control spreads > {STEADY}",
    )
    parser.add_argument(
        "--steps", type=int, default=30, help="a multiple of 10: ramp logs steps 1, 10, 20, ..."
    )
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--nproc", type=int, default=2, help="processes per contender (DDP when > 1)")
    opts = parser.parse_args()
    tokens = token_file()
    field_ = contenders(tokens, opts.steps, opts.micro_batch, opts.seq_len, opts.nproc)
    ratios: dict[str, list[float]] = {c.name: [] for c in field_}
    cpu_ratios: dict[str, list[float]] = {c.name: [] for c in field_}
    rounds = 0
    with tempfile.TemporaryDirectory() as scratch:
        while rounds < opts.rounds or (rounds < opts.max_rounds and spread(ratios["control"]) > STEADY):
            if rounds >= opts.rounds:
                print(
                    f"control spread {spread(ratios['control']):.3f} > {STEADY}: one more round", flush=True
                )
            samples = run_round(field_, rounds, opts, Path(scratch))
            rounds += 1
            for name, sample in samples.items():
                ratios[name].append(sample.tokens_per_s / samples["bare"].tokens_per_s)
                cpu_ratios[name].append(sample.tokens_per_cpu_s / samples["bare"].tokens_per_cpu_s)
            line = "  ".join(f"{name} {samples[name].tokens_per_s:.0f}" for name in samples)
            print(f"round {rounds}: tokens/s {line}", flush=True)
    step_tokens = opts.micro_batch * opts.seq_len * opts.nproc
    print()
    print(f"{rounds} rounds x {opts.steps} steps, {opts.nproc} process(es), {step_tokens} tokens/step, ")
    print(f"{psutil.cpu_count()} CPUs; throughput from the end of step 1 to the end of step {opts.steps}")
    print(
        f"control (f) spread (max / min of its per-round ratio): tokens/s {spread(ratios['control']):.3f}, "
        f"tokens/CPU-s {spread(cpu_ratios['control']):.3f}; ratios are medians of per-round ratios"
    )
    print()
    print_table(field_, ratios, cpu_ratios)


if __name__ == "__main__":
    main()
