"""Console output: the logging set-up per rank, and rank 0's progress bar or log lines."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm import tqdm

from trainer.observe.redact import RedactFilter

log = logging.getLogger("ramp")
job_log = logging.getLogger("ramp.job")
"""For events every rank meets alike (a skipped update, a changed setting on resume): rank 0 alone says
them, so a 2-rank job prints each once. ``log`` is for what a rank meets on its own; its warnings are
printed by every rank that meets them, tagged with the rank."""

ONLY_RANK_0 = ("ramp.job", "py.warnings")
"""Loggers whose records every rank produces alike: job-wide events, and Python warnings raised by the
library code that every rank runs identically."""


class _TqdmHandler(logging.Handler):
    """Writes through tqdm, so a log line never tears the progress bar."""

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.stream.flush()
        except Exception:
            self.handleError(record)


def setup_logging(rank: int) -> None:
    """Rank 0 prints INFO and up; every other rank prints only its own warnings and errors, tagged."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setLevel(logging.WARNING)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    warnings.setFormatter(logging.Formatter(prefix + "%(levelname)s %(name)s: %(message)s"))
    warnings.addFilter(RedactFilter())
    root.addHandler(warnings)
    if rank == 0:
        info = _TqdmHandler(sys.stdout)
        info.setFormatter(logging.Formatter("%(message)s"))
        info.addFilter(lambda r: r.levelno < logging.WARNING)
        info.addFilter(RedactFilter())
        root.addHandler(info)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.captureWarnings(True)
    # transformers keeps its own handler; let its records flow through ours instead.
    hf = logging.getLogger("transformers")
    hf.handlers.clear()
    hf.propagate = True
    hf.setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    for name in ONLY_RANK_0:
        logging.getLogger(name).setLevel(logging.NOTSET if rank == 0 else logging.CRITICAL + 1)


def _fmt_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s / 1e3:.1f}k" if tokens_per_s >= 1e3 else f"{tokens_per_s:.0f}"


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


BAR_FORMAT = (
    "{percentage:3.0f}%|{bar}| step {n_fmt}/{total_fmt} [{elapsed}, eta {remaining}, {rate_fmt}{postfix}]"
)
"""tqdm's own layout with the words spelled out: the step, the elapsed time, the ETA."""


class Progress:
    """A bar in an interactive terminal; one compact line per log step when output goes to a file."""

    def __init__(self, mode: str, total: int, initial: int) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self.total = total
        self.started = time.perf_counter()
        self.initial = initial
        self.bar = (
            tqdm(
                total=total,
                initial=initial,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                leave=True,
                bar_format=BAR_FORMAT,
            )
            if mode == "bar"
            else None
        )

    def eta(self, step: int) -> float:
        """Seconds left to the last step, at the mean pace of the steps taken since this display opened."""
        done = step - self.initial
        if done <= 0:
            return 0.0
        return (time.perf_counter() - self.started) / done * (self.total - step)

    def advance(self, step: int) -> None:
        """Move the bar to ``step``; in lines mode, do nothing."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def show(self, step: int, metrics: dict[str, Any]) -> None:
        """Show a log step's metrics: in the bar's postfix, or as one log line."""
        if self.bar is not None:
            mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
            self.bar.set_postfix_str(
                f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} tok/s {_fmt_rate(metrics['tokens_per_s'])}{mfu}",
                refresh=True,
            )
        elif self.mode == "lines":
            log.info(
                "step %d/%d | loss %.4f | lr %.3e | grad_norm %.3f | tok/s %s%s | mem %.2fG | eta %s",
                step,
                self.total,
                metrics["loss"],
                metrics["lr"],
                metrics["grad_norm"],
                _fmt_rate(metrics["tokens_per_s"]),
                f" | mfu {metrics['mfu']:.1%}" if "mfu" in metrics else "",
                metrics["memory_gb"],
                _fmt_eta(self.eta(step)),
            )

    def close(self) -> None:
        """Close the bar, if there is one."""
        if self.bar is not None:
            self.bar.close()
