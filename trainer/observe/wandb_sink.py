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

Downstream evaluations (``lm_eval/<task>/<metric>``, :mod:`trainer.evaluate`) finish after later training
steps, so they are plotted against a step axis of their own, ``lm_eval/step`` (the checkpoint's global
step), and never move wandb's own step: the sink puts each result into the row of a training step it
logs anyway, one result a row, and only what is left when the run closes into rows after the last. On
start it also sends the results metrics.jsonl holds that no segment on disk does (one that ended after
its training left, or was lost with a killed segment).
"""

from __future__ import annotations

import json
import logging
import secrets
import struct
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from trainer.observe.redact import scrubbed_argv

log = logging.getLogger("ramp")

_BLOCK, _HEADER = 32 * 1024, 7
LM_EVAL = "lm_eval/"
"""The first part of a downstream evaluation's keys (``trainer.evaluate.PREFIX`` and a slash)."""
LM_EVAL_STEP = "lm_eval/step"
"""The x-axis of the downstream evaluations: the global step of the checkpoint each one evaluated."""
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


def _history(run_file: Path, needle: bytes) -> Iterator[Any]:
    """The history records of a ``.wandb`` file whose payload holds ``needle`` (the others are skipped
    unparsed), in order."""
    from wandb.proto import wandb_internal_pb2

    for payload in _records(run_file.read_bytes()):
        if needle not in payload:
            continue
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        try:
            record.ParseFromString(payload)
        except Exception:  # a damaged record: wandb sync skips it too
            continue
        if record.WhichOneof("record_type") == "history":
            yield record.history


def _history_steps(run_file: Path) -> Iterator[int]:
    for history in _history(run_file, b"_step"):
        for item in history.item:
            if (item.key or "/".join(item.nested_key)) == "_step":
                yield int(json.loads(item.value_json))


def _segments(wandb_dir: Path, run_id: str) -> list[Path]:
    """The ``.wandb`` files of run ``run_id``'s segments, newest first."""
    segments = [
        path
        for path in wandb_dir.glob(f"*run-*-{run_id}/run-{run_id}.wandb")
        if not path.parent.is_symlink()  # latest-run points at a segment listed already
    ]
    return sorted(segments, key=_segment_time, reverse=True)


def last_logged_step(wandb_dir: Path, run_id: str) -> int:
    """The highest ``_step`` that the segments of run ``run_id`` on disk hold (0 if none).

    Each segment logs only steps past the ones before it, so the newest segment holding any step
    has the highest: segments are read newest first, and usually only one is read.
    """
    for run_file in _segments(wandb_dir, run_id):
        last = max(_history_steps(run_file), default=0)
        if last:
            return last
    return 0


def _jsonl_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def is_lm_eval(record: dict[str, Any]) -> bool:
    """Whether ``record`` is a downstream evaluation's (``lm_eval/...`` keys), not a training step's."""
    return any(key.startswith(LM_EVAL) for key in record)


def logged_lm_evals(wandb_dir: Path, run_id: str) -> set[tuple[int, str]]:
    """``(lm_eval/step, key)`` of every downstream evaluation result the segments of run ``run_id`` hold."""
    found: set[tuple[int, str]] = set()
    for run_file in _segments(wandb_dir, run_id):
        for history in _history(run_file, LM_EVAL_STEP.encode()):
            row = {(item.key or "/".join(item.nested_key)): item.value_json for item in history.item}
            if LM_EVAL_STEP in row:
                step = int(json.loads(row[LM_EVAL_STEP]))
                found.update((step, key) for key in row if key.startswith(LM_EVAL) and key != LM_EVAL_STEP)
    return found


def log_lm_eval(run: Any, record: dict[str, Any], step: int | None = None, commit: bool = True) -> None:
    """Log a downstream evaluation's ``record`` (``step``: its checkpoint's) into ``run`` on the
    ``lm_eval/step`` axis: in wandb's row ``step`` (default: the row now open), committed or left open.

    Each key is declared against the axis by name: wandb matches a key to one of several globs (``*``
    against the global step, ``lm_eval/*``) in no fixed order, a declared name always wins."""
    row = {LM_EVAL_STEP: record["step"], **{k: v for k, v in record.items() if k.startswith(LM_EVAL)}}
    run.define_metric(LM_EVAL_STEP)
    run.define_metric(f"{LM_EVAL}*", step_metric=LM_EVAL_STEP)
    for key in row:
        if key != LM_EVAL_STEP:
            run.define_metric(key, step_metric=LM_EVAL_STEP)
    run.log(row, step=step, commit=commit)


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


def open_run(run_dir: Path, settings: Any, run_name: str, config: dict[str, Any], run_id: str) -> Any:
    """Start (or continue: ``resume="allow"``) the wandb run ``run_id`` of the run folder ``run_dir``,
    under ``run_dir/wandb``, as ``settings`` (logger.wandb) say."""
    import wandb

    with scrubbed_argv():  # wandb records the command line, which may carry a secret override
        return wandb.init(
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


class WandbSink:
    """Writes every record to the job's one wandb run, against the global step; downstream evaluations
    against ``lm_eval/step`` (:meth:`write_lm_eval`)."""

    def __init__(
        self, run_dir: Path, settings: Any, run_name: str, config: dict[str, Any], start_step: int
    ) -> None:
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = open_run(run_dir, settings, run_name, config, run_id)
        # Every series is plotted against the global step, whatever the gradient accumulation.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # lm_eval/... keys: see log_lm_eval
        server_last = max(self.run.starting_step - 1, 0)  # an online run resumed on the server
        self.logged_through = max(last_logged_step(run_dir / "wandb", run_id), server_last)
        self.row: int | None = None
        """wandb's open row: the training step this segment logged last (None before its first)."""
        self.row_has_lm_eval = False
        self.lm_evals: list[dict[str, Any]] = []
        """Downstream evaluation results waiting for a row of their own."""
        records = _jsonl_records(run_dir / "metrics.jsonl")  # through start_step: the JsonlSink cut it there
        replay = [r for r in records if not is_lm_eval(r) and self.logged_through < r["step"] <= start_step]
        for record in replay:
            self.write(record)
        lm_evals = [r for r in records if is_lm_eval(r)]
        if lm_evals:
            logged = logged_lm_evals(run_dir / "wandb", run_id)
            for record in lm_evals:
                if any((record["step"], key) not in logged for key in record if key.startswith(LM_EVAL)):
                    self.write_lm_eval(record)
        if start_step:
            log.info(
                "ramp | wandb run %s continues: history through step %d, %d steps re-sent from metrics.jsonl",
                run_id,
                self.logged_through,
                len({r["step"] for r in replay}),
            )

    def write(self, record: dict[str, Any]) -> None:
        """Log the record at its step, unless the run's history already holds that step; a waiting
        downstream evaluation result goes into the step's row."""
        step = record["step"]
        if step <= self.logged_through or (self.row is not None and step < self.row):
            return
        self.run.log(record, step=step)
        if step != self.row:
            self.row, self.row_has_lm_eval = step, False
        self._fill_row()

    def write_lm_eval(self, record: dict[str, Any]) -> None:
        """Log a downstream evaluation's record (``step``: its checkpoint's global step, ``lm_eval/...``) on
        the ``lm_eval/step`` axis, into the open training row if no result took it yet, else into the next
        training row this run logs (:meth:`close` gives what still waits rows after the last)."""
        self.lm_evals.append(record)
        self._fill_row()

    def _fill_row(self) -> None:
        if self.lm_evals and self.row is not None and not self.row_has_lm_eval:
            log_lm_eval(self.run, self.lm_evals.pop(0), commit=False)  # wandb's step stays the training's
            self.row_has_lm_eval = True

    def close(self) -> None:
        """Log the results still waiting, one row each after the last row of the run's history, and
        finish the wandb run."""
        after = max(self.logged_through, self.row or 0, self.run.step - 1)
        for offset, record in enumerate(self.lm_evals, start=1):
            log_lm_eval(self.run, record, step=after + offset)
        self.lm_evals = []
        self.run.finish()


def _settings_of(run_dir: Path) -> tuple[Any, dict[str, Any]] | None:
    """The logger.wandb settings and the config of the run folder ``run_dir`` (its config.yaml), None when
    it has none or runs without wandb."""
    import yaml

    from trainer.config import WandbConfig

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        node = dict(config["logger"]["wandb"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None
    names = {f.name for f in fields(WandbConfig)}
    settings = WandbConfig(**{key: value for key, value in node.items() if key in names})
    return (settings, config) if settings.mode != "disabled" else None


def log_to_run(run_dir: Path, record: dict[str, Any]) -> str | None:
    """Log a downstream evaluation's ``record`` into the wandb run of the run folder ``run_dir``
    (continued, as its config.yaml's logger.wandb says), on the ``lm_eval/step`` axis, in a row after every
    row its segments on disk hold (or the server's, online); the run's id, or None when it has no wandb
    run (wandb disabled, or never started)."""
    found = _settings_of(run_dir)
    id_file = run_dir / "wandb_run_id"
    if found is None or not id_file.exists():
        return None
    settings, config = found
    run_id = id_file.read_text().strip()
    run = open_run(run_dir, settings, str(config["run"]["name"]), config, run_id)
    step = max(last_logged_step(run_dir / "wandb", run_id) + 1, run.starting_step, run.step)
    log_lm_eval(run, record, step=step)
    run.finish()
    return run_id
