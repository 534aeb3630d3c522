"""One wandb run per job, continued across restarts with every global step exactly once.

Only global rank 0 creates a run (the Recorder holds sinks on rank 0 alone). The run id is kept in
``run.dir/wandb_run_id``; every later start of the job continues that run (``resume="allow"``).

Each start writes a new segment of the run (offline: ``wandb/offline-run-<time>-<id>/``, uploaded
in order by ``wandb sync``). A resumed job restarts from its checkpoint at step S, but the segment
before may have logged past S (steps after the checkpoint, redone now) or, killed at once, lost its
last rows before they reached the disk. So on start the sink reads how far the run's history
already goes (W: the last step in the segments on disk, or the server's last step for an online
run), then

- re-sends the steps in (W, S] from metrics.jsonl, which holds every step up to the checkpoint;
- drops the live steps up to W, which the run already holds (values bit-identical on CPU in fp32;
  on a GPU, the first attempt's values).

The union of the segments then holds each step once: what the dashboard shows after ``wandb sync``.
"""

from __future__ import annotations

import json
import logging
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.observe.redact import scrubbed_argv

log = logging.getLogger("ramp")

_BLOCK, _HEADER = 32 * 1024, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(data: bytes) -> Iterator[bytes]:
    """Payloads of a ``.wandb`` file: a LevelDB-log-style stream of 32 KiB blocks of chunks.

    A file cut short by a kill ends in a partial chunk or record, which is skipped: wandb's own
    reader stops at the same place when it syncs the segment.
    """
    if data[:4] != b":W&B":
        return
    pending: bytes | None = None
    pos = _HEADER
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if len(chunk) < length:
            return
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE and pending is not None:
            pending += chunk
        elif kind == _LAST and pending is not None:
            yield pending + chunk
            pending = None


def _segment_time(run_file: Path) -> str:
    """``20261122_035509`` from ``offline-run-20261122_035509-<id>`` (or ``run-...`` when online)."""
    return run_file.parent.name.rsplit("-", 2)[-2]


def _history_steps(run_file: Path) -> Iterator[int]:
    from wandb.proto import wandb_internal_pb2

    for payload in _records(run_file.read_bytes()):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        try:
            record.ParseFromString(payload)
        except Exception:  # a damaged record: wandb sync skips it too
            continue
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                if (item.key or "/".join(item.nested_key)) == "_step":
                    yield int(json.loads(item.value_json))


def last_logged_step(wandb_dir: Path, run_id: str) -> int:
    """The highest ``_step`` that the segments of run ``run_id`` on disk hold (0 if none).

    Each segment logs only steps past the ones before it, so the newest segment holding any step
    has the highest: segments are read newest first, and usually only one is read.
    """
    segments = [
        path
        for path in wandb_dir.glob(f"*run-*-{run_id}/run-{run_id}.wandb")
        if not path.parent.is_symlink()  # latest-run points at a segment listed already
    ]
    for run_file in sorted(segments, key=_segment_time, reverse=True):
        last = max(_history_steps(run_file), default=0)
        if last:
            return last
    return 0


def _jsonl_records(path: Path, after: int, through: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if after < r["step"] <= through]


def default_group(config: dict[str, Any]) -> str:
    """The wandb group of a run that sets none: its run name; a branch's (branch.checkpoint), its parent's
    group, so a run and all its branches group together."""
    parent = (config.get("branch") or {}).get("checkpoint")
    if parent:
        try:
            saved = json.loads((Path(parent) / "meta.json").read_text())["config"]
            return str(saved["logger"]["wandb"]["group"] or saved["run"]["name"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return str(config["run"]["name"])


class WandbSink:
    """Writes every record to the job's one wandb run, against the global step."""

    def __init__(
        self, run_dir: Path, settings: Any, run_name: str, config: dict[str, Any], start_step: int
    ) -> None:
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        with scrubbed_argv():  # wandb records the command line, which may carry a secret override
            self.run = wandb.init(
                project=settings.project,
                entity=settings.entity,
                name=settings.name or run_name,
                group=settings.group or default_group(config),
                tags=list(settings.tags),
                mode=settings.mode,
                dir=str(run_dir),
                id=run_id,
                resume="allow",
                config=config,
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
            )
        # Every series is plotted against the global step, whatever the gradient accumulation.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        server_last = max(self.run.starting_step - 1, 0)  # an online run resumed on the server
        self.logged_through = max(last_logged_step(run_dir / "wandb", run_id), server_last)
        replay = _jsonl_records(run_dir / "metrics.jsonl", self.logged_through, start_step)
        for record in replay:
            self.run.log(record, step=record["step"])
        if start_step:
            log.info(
                "ramp | wandb run %s continues: history through step %d, %d steps re-sent from metrics.jsonl",
                run_id,
                self.logged_through,
                len({r["step"] for r in replay}),
            )

    def write(self, record: dict[str, Any]) -> None:
        """Log the record at its step, unless the run's history already holds that step."""
        if record["step"] > self.logged_through:
            self.run.log(record, step=record["step"])

    def close(self) -> None:
        """Finish the wandb run."""
        self.run.finish()
