"""Blocking time of ramp's checkpoint saves against a plain ``torch.save``: ``python -m bench.checkpoint``.

All three save the same state (the model and the AdamW moments of a trained step) to the same disk,
interleaved over ``--repeats`` rounds in a rotating order, in one process on the CPU:

    torch.save   ``torch.save({"model": ..., "optimizer": ...})`` into one file (the reference)
    sync         ramp's ``checkpoint.save`` with DDP: DCP writes the state into ``step_<N>/dcp/``, then
                 ramp writes each rank's RNG and metric state, fsyncs, checksums every file, renames the
                 folder into place and prunes (the price of a save that a kill cannot corrupt)
    async        the same with ``train.ckpt_async``: training is blocked until ``checkpoint.save``
                 returns (the copy of the state to host memory); DCP's write goes on in a background
                 thread, and ramp completes the checkpoint (checksums, rename) once it has finished

For the async save the write's time (from the call to the end of the background write) and the
completion's are reported apart from the blocking time; each async save is completed before the next
save starts, so no two ever overlap. Ratios are taken within a round, against that round's torch.save;
``--warmup-rounds`` rounds before them are not counted (first calls pay one-time costs). With
``--device cuda`` the state lives on the GPU (``bench.gpu`` measures that), and every save starts after
the device has finished its work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.train import REPO
from trainer import checkpoint
from trainer.backends import build_backend
from trainer.backends.ddp import DDPBackend
from trainer.config import compose
from trainer.distributed import DistInfo
from trainer.models import build_model, causal_lm_loss, count_parameters

KEEP = 2
"""Complete checkpoints kept, as ``train.keep_checkpoints``: pruning is part of ramp's save."""


@dataclass
class Timings:
    """Seconds per round of each save (and of the async save's later stages)."""

    plain: list[float] = field(default_factory=list)
    sync: list[float] = field(default_factory=list)
    async_blocked: list[float] = field(default_factory=list)
    """From the call until ``checkpoint.save`` returns: what training waits for."""
    async_written: list[float] = field(default_factory=list)
    """From the call until DCP's background write has finished."""
    async_complete: list[float] = field(default_factory=list)
    """Completing after the write: checksums, ``meta.json``, the rename, ``latest`` and pruning."""


def trained_backend(model: str, vocab_size: int | None, info: DistInfo) -> DDPBackend:
    """ramp's default backend (DDP, alone) over the ``model`` preset on ``info.device``, after one AdamW
    step (so the optimizer holds its moments)."""
    overrides = [f"model={model}", "train.seq_len=64", "train.micro_batch_size=2"]
    if vocab_size is not None:
        overrides.append(f"model.vocab_size={vocab_size}")
    cfg = compose(overrides)
    backend = build_backend(cfg, build_model(cfg.model, tokenizer_vocab=257, eos_id=256), info)
    assert isinstance(backend, DDPBackend)  # the default backend; torch.save needs its optimizer
    batch = torch.randint(0, 257, (2, 65), device=info.device)
    with backend.accumulate(last=True):
        backend.backward(causal_lm_loss(backend.model, batch) / batch[:, 1:].numel())
    backend.step()
    return backend


def started_after(device: torch.device) -> float:
    """The time, once ``device`` has finished the work queued on it (none of it is a save's)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def save_plain(backend: DDPBackend, path: Path) -> float:
    """Seconds of a plain ``torch.save`` of the model and optimizer state into ``path``."""
    started = started_after(backend.device)
    torch.save({"model": backend.module.state_dict(), "optimizer": backend.optimizer.state_dict()}, path)
    return time.perf_counter() - started


def save_sync(backend: DDPBackend, root: Path, step: int, info: DistInfo) -> float:
    """Seconds of ramp's synchronous checkpoint of ``step`` (complete when it returns)."""
    started = started_after(info.device)
    checkpoint.save(root, step, info, backend, {"config": {}}, {}, keep=KEEP)
    return time.perf_counter() - started


def save_async(backend: DDPBackend, root: Path, step: int, info: DistInfo) -> tuple[float, float, float]:
    """ramp's background checkpoint of ``step``, completed before returning: the seconds training is
    blocked, from the call to the end of the background write, and of the completion after it."""
    written: list[float] = []
    started = started_after(info.device)
    saving = checkpoint.save(root, step, info, backend, {"config": {}}, {}, keep=KEEP, background=True)
    blocked = time.perf_counter() - started
    assert saving.write is not None, "a background save returned without a background write"
    saving.write.add_done_callback(lambda _: written.append(time.perf_counter()))  # in the writer's thread
    saving.write.result()
    completing = time.perf_counter()
    saving.complete()
    complete = time.perf_counter() - completing
    assert saving.path.is_dir(), "the background save did not complete"
    return blocked, written[0] - started, complete


def run_round(backend: DDPBackend, root: Path, index: int, info: DistInfo, timings: Timings) -> None:
    """One round: the three saves in a rotating order, each finished before the next starts."""
    plain_path = root / "plain.pt"
    steps = iter((2 * index + 1, 2 * index + 2))  # ramp's two saves take steps in the order they run

    def plain() -> None:
        timings.plain.append(save_plain(backend, plain_path))

    def sync() -> None:
        timings.sync.append(save_sync(backend, root / "checkpoints", next(steps), info))

    def background() -> None:
        blocked, written, complete = save_async(backend, root / "checkpoints", next(steps), info)
        timings.async_blocked.append(blocked)
        timings.async_written.append(written)
        timings.async_complete.append(complete)

    saves = [plain, sync, background]
    shift = index % len(saves)
    for save in saves[shift:] + saves[:shift]:
        save()
    plain_path.unlink()  # not timed: one plain file at a time on the disk


def ratios(seconds: list[float], plain: list[float]) -> list[float]:
    """Each round's ``seconds`` over the same round's torch.save."""
    return [s / p for s, p in zip(seconds, plain, strict=True)]


def row(label: str, seconds: list[float], plain: list[float] | None) -> str:
    """One line of the table: median, min and max seconds, and the per-round ratio to torch.save."""
    text = f"{label:44} {statistics.median(seconds):9.4f} {min(seconds):8.4f} {max(seconds):8.4f}"
    if plain is not None:
        each = ratios(seconds, plain)
        text += f" {statistics.median(each):10.2f} [{min(each):.2f}, {max(each):.2f}]"
    return text


def report(timings: Timings) -> None:
    """The table: each save's seconds and its ratio to the same round's torch.save."""
    print(f"{'save (seconds)':44} {'median':>9} {'min':>8} {'max':>8} {'/ torch.save median [min, max]':>30}")
    print(row("torch.save(model + optimizer)", timings.plain, timings.plain))
    print(row("ramp sync DCP save (blocks)", timings.sync, timings.plain))
    print(row("ramp async DCP save: blocks training", timings.async_blocked, timings.plain))
    print(row("  call to end of the background write", timings.async_written, timings.plain))
    print(row("  completing after it (checksums, rename)", timings.async_complete, None))
    ratio = statistics.median(ratios(timings.async_blocked, timings.plain))
    verdict = "met" if ratio <= 0.5 else "not met"
    print(f"async blocking / torch.save: median {ratio:.2f} (issue 18's target: at most 0.50, {verdict})")


def summary(timings: Timings) -> dict[str, float]:
    """Medians of the seconds and of the per-round ratios to torch.save, by name (``--json``)."""
    numbers = {f"{name}_s": statistics.median(values) for name, values in asdict(timings).items()}
    for name in ("sync", "async_blocked", "async_written"):
        numbers[f"{name}_ratio"] = statistics.median(ratios(getattr(timings, name), timings.plain))
    return numbers


def options() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-tiny", help="a preset under conf/model/")
    parser.add_argument(
        "--vocab-size", type=int, default=None, help="default: the byte tokenizer's 257, padded to 320"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds of the three saves")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="rounds before them, not counted")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the state's device)")
    parser.add_argument("--json", action="store_true", help="also print 'BENCH checkpoint <JSON>'")
    return parser.parse_args()


def main() -> None:
    """Time ``--repeats`` rounds of the three saves; print seconds and ratios to torch.save."""
    opts = options()
    device = torch.device(opts.device)
    info = DistInfo(0, 0, 1, 1, torch.device("cuda", 0) if device.type == "cuda" else device)
    # DCP's background thread warns that no process group exists: one process, as meant.
    warnings.filterwarnings("ignore", message="torch.distributed is .*(unavailable|uninitialized)")
    backend = trained_backend(opts.model, opts.vocab_size, info)
    timings = Timings()
    with tempfile.TemporaryDirectory(dir=REPO) as scratch:
        for index in range(opts.warmup_rounds):
            run_round(backend, Path(scratch), index, info, Timings())
        for index in range(opts.warmup_rounds, opts.warmup_rounds + opts.repeats):
            run_round(backend, Path(scratch), index, info, timings)
    parameters = count_parameters(backend.module) / 1e6
    print(f"{opts.model}: {parameters:.1f}M parameters, {opts.repeats} rounds, 1 process, {info.device}")
    report(timings)
    if opts.json:
        numbers = {
            "model": opts.model,
            "parameters_m": parameters,
            "rounds": opts.repeats,
            **summary(timings),
        }
        print(f"BENCH checkpoint {json.dumps(numbers)}", flush=True)


if __name__ == "__main__":
    main()
