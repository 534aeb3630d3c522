"""Blocking cost of a ramp checkpoint against a plain ``torch.save``: ``python -m bench.checkpoint``.

Both save the same state (model and AdamW moments of a trained step) to the same disk, interleaved
over several repeats. ramp's save also writes each rank's RNG and metric state, fsyncs every file,
renames the folder into place, checksums every file and prunes old checkpoints: that is the price of
a save that a kill cannot corrupt, and this measures it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.train import REPO
from trainer import checkpoint
from trainer.backends import build_backend
from trainer.backends.ddp import DDPBackend
from trainer.config import compose
from trainer.distributed import DistInfo
from trainer.models import build_model, causal_lm_loss, count_parameters


def main() -> None:
    """Time ``--repeats`` plain saves and ramp checkpoints, taking turns; print seconds and the ratio."""
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-tiny", help="a preset under conf/model/")
    parser.add_argument("--repeats", type=int, default=10)
    opts = parser.parse_args()
    info = DistInfo(0, 0, 1, 1, torch.device("cpu"))
    cfg = compose([f"model={opts.model}", "train.seq_len=64", "train.micro_batch_size=2"])
    backend = build_backend(cfg, build_model(cfg.model, tokenizer_vocab=257, eos_id=256), info)
    assert isinstance(backend, DDPBackend)  # the default backend; torch.save needs its optimizer
    batch = torch.randint(0, 257, (2, 65))
    with backend.accumulate(last=True):
        backend.backward(causal_lm_loss(backend.model, batch) / batch[:, 1:].numel())
    backend.step()  # so the optimizer holds its moments
    plain, ramp = [], []
    with tempfile.TemporaryDirectory(dir=REPO) as scratch:
        root = Path(scratch)
        for repeat in range(opts.repeats):
            started = time.perf_counter()
            torch.save(
                {"model": backend.module.state_dict(), "optimizer": backend.optimizer.state_dict()},
                root / f"plain_{repeat}.pt",
            )
            plain.append(time.perf_counter() - started)
            started = time.perf_counter()
            checkpoint.save(root / "checkpoints", repeat + 1, info, backend, {"config": {}}, {}, keep=3)
            ramp.append(time.perf_counter() - started)
    ratios = [r / p for r, p in zip(ramp, plain, strict=True)]
    print(
        f"{opts.model}: {count_parameters(backend.module) / 1e6:.1f}M parameters, {opts.repeats} saves each"
    )
    print(f"{'save':48} {'median s':>9} {'min':>8} {'max':>8}")
    print(
        f"{'torch.save(model + optimizer)':48} {statistics.median(plain):9.4f} "
        f"{min(plain):8.4f} {max(plain):8.4f}"
    )
    print(
        f"{'ramp checkpoint (atomic, fsynced, checksummed)':48} {statistics.median(ramp):9.4f} "
        f"{min(ramp):8.4f} {max(ramp):8.4f}"
    )
    print(
        f"ratio ramp / torch.save: median {statistics.median(ratios):.2f} "
        f"[{min(ratios):.2f}, {max(ratios):.2f}]"
    )


if __name__ == "__main__":
    main()
