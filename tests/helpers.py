"""Shared test helpers: run ramp as a user does (real torchrun, real processes), read its outputs back,
and build its parts in-process (a backend on the tiny model, one optimizer step through the seam)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def missing(component: str) -> None:
    """A real component a test needs (Slurm, shellcheck) is not on this machine: skip here, fail in CI.

    ``.ci/run`` installs every such component and sets ``RAMP_CI=1``: there a missing one is a failure,
    not a silently skipped test.

    Raises:
        pytest.fail.Exception: under CI. pytest.skip.Exception: elsewhere.
    """
    import pytest

    if os.environ.get("RAMP_CI") == "1":
        pytest.fail(f"{component} is missing, and CI must test it (.ci/run installs it)")
    pytest.skip(f"{component} is not installed here (.ci/run installs it)")


def ramp_env(cache_dir: Path) -> dict[str, str]:
    """The environment a test run gets: offline, unbuffered, a shared token cache, no secrets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RAMP_", "TORCHELASTIC_"))}
    env.update(
        RAMP_CACHE_DIR=str(cache_dir),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",  # else torchrun prints its own banner about it
    )
    return env


def run_ramp(
    overrides: list[str],
    *,
    cwd: Path,
    cache_dir: Path,
    nproc: int = 2,
    timeout: float = 240,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=N -m trainer.main ...`` (or plain python for nproc 0)."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        cmd = [sys.executable]
    cmd += ["-m", "trainer.main", *overrides]
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=env or ramp_env(cache_dir),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, evaluation records) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def own_lines(output: str) -> list[str]:
    """Output lines that ramp wrote (torchrun's own launcher banner aside)."""
    return [
        line
        for line in output.splitlines()
        if line.strip() and "torch/distributed/run.py" not in line and "torch/distributed/elastic" not in line
    ]


BLOCK = 32 * 1024
HEADER = 7


def _wandb_payloads(data: bytes) -> list[bytes]:
    """Reassemble the records of a wandb ``.wandb`` file (a LevelDB-log-style stream).

    A deliberately independent oracle: ramp's own reader (``trainer.observe.wandb_sink``) decides what a
    resumed run re-sends, and the tests check that decision against what this decoder, written apart
    from it, finds in the files. Sharing one reader would let a bug in it pass its own test.
    """
    assert data[:4] == b":W&B", "not a wandb data file"
    payloads, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            payloads.append(payload)
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            payloads.append(pending + payload)
    return payloads


def read_wandb_history(run_file: Path) -> list[dict[str, Any]]:
    """The history rows a wandb offline run logged, each a dict of key -> value."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for payload in _wandb_payloads(run_file.read_bytes()):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]  # generated, no stubs
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def read_wandb_group(run_file: Path) -> str:
    """The group of a wandb offline run, from its run record."""
    from wandb.proto import wandb_internal_pb2

    for payload in _wandb_payloads(run_file.read_bytes()):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]  # generated, no stubs
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "run":
            return str(record.run.run_group)
    raise AssertionError(f"{run_file} holds no run record")


def wandb_runs(run_dir: Path) -> list[Path]:
    """The offline run files under a run folder."""
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def launch_ramp(
    overrides: list[str],
    *,
    cwd: Path,
    cache_dir: Path,
    log: Path,
    nproc: int = 2,
    torchrun_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ramp in the background (its own session, so a test can signal or kill the whole job)."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += list(torchrun_args)
    else:
        cmd = [sys.executable]
    with open(log, "ab") as handle:
        return subprocess.Popen(
            [*cmd, "-m", "trainer.main", *overrides],
            cwd=cwd,
            env=env or ramp_env(cache_dir),
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def workers(proc: subprocess.Popen[bytes]) -> list[Any]:
    """The trainer processes of a launched job (torchrun's children, or the process itself)."""
    import psutil

    parent = psutil.Process(proc.pid)
    found = [p for p in parent.children(recursive=True) if "trainer.main" in " ".join(p.cmdline())]
    return found or [parent]


def kill_job(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the launcher and every process under it at once, as a node failure would."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        everyone = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        everyone = []
    for process in everyone:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    proc.wait(timeout=30)
    psutil.wait_procs(everyone, timeout=30)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes, by relative path: equal snapshots, an untouched folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_steps(run_dir: Path) -> int:
    """The last training step recorded in metrics.jsonl (0 if none)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def transformers_lrs(name: str, peak: float, warmup: int, total: int, **kwargs: object) -> list[float]:
    """The LR of optimizer steps 1..total under ramp's convention: transformers' value after k steps."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=kwargs
    )
    lrs = []
    for _ in range(total):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def run_worker(
    script: str,
    args: list[str],
    *,
    cwd: Path,
    cache_dir: Path,
    timeout: float = 180,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``tests/e2e/workers/<script>`` on 2 gloo ranks through real torchrun.

    Fails the test, showing the workers' output, if they fail.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO / "tests" / "e2e" / "workers" / script), *args]
    result = subprocess.run(
        cmd,
        env=ramp_env(cache_dir) | (env or {}),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def export_command(checkpoint: Path, out_dir: Path, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    """``python -m trainer.export CHECKPOINT OUT_DIR`` as a user runs it; its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "trainer.export", str(checkpoint), str(out_dir)],
        env=ramp_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def run_export(checkpoint: Path, out_dir: Path, cache_dir: Path) -> None:
    """``python -m trainer.export CHECKPOINT OUT_DIR``, which must succeed."""
    result = export_command(checkpoint, out_dir, cache_dir)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------
# In-process parts


def tiny_backend(config: Any, info: Any) -> Any:
    """The backend ``config`` names, on its model built for the 257-token byte vocabulary, seeded."""
    import torch

    from trainer.backends import build_backend
    from trainer.models import build_model

    torch.manual_seed(0)
    return build_backend(config, build_model(config.model, tokenizer_vocab=257, eos_id=256), info)


def one_step(backend: Any, batch: Any, lr: float = 1e-3) -> tuple[Any, bool]:
    """One optimizer step of one micro-batch through the backend seam, as the loop drives it."""
    from trainer.models import causal_lm_loss

    for group in backend.param_groups:
        group["lr"] = lr
    with backend.accumulate(last=True):
        with backend.autocast():
            loss = causal_lm_loss(backend.model, batch)
        backend.backward(loss / batch[:, 1:].numel())
    norm, applied = backend.step()
    return norm, bool(applied)


def random_batch(seed: int, rows: int = 2, width: int = 33) -> Any:
    """Token ids in [0, 257) of shape (rows, width), the same for the same seed."""
    import torch

    return torch.randint(0, 257, (rows, width), generator=torch.Generator().manual_seed(seed))


def checkpoint_meta(step: int, backend: str = "ddp") -> dict[str, Any]:
    """Metadata as the loop records it (see trainer.resume.CheckpointMeta), for a save at ``step``."""
    return {
        "tokens": step * 64,
        "skipped_steps": 0,
        "sampler": {"epoch": 0, "position": step},
        "backend": backend,
        "tokenizer_vocab": 257,
        "eos_id": 256,
        "config": {},
    }


def save_checkpoint(
    root: Path, step: int, backend: Any, info: Any, keep: int = 3, protect: tuple[int, ...] = ()
) -> Path:
    """``checkpoint.save`` of ``backend`` as global step ``step`` under ``root``, as the loop calls it."""
    import torch

    from trainer import checkpoint

    meter = {"loss_sum": torch.tensor(3.0 * step, dtype=torch.float64), "tokens": 64 * step, "steps": step}
    return checkpoint.save(
        root, step, info, backend, checkpoint_meta(step), {"meter": meter}, keep, protect
    ).path


def save_format_1_checkpoint(
    root: Path, step: int, backend: Any, config: dict[str, Any] | None = None
) -> Path:
    """A one-rank DDP checkpoint as ramp's first format wrote it (before DCP): ``model.pt`` and ``optimizer.pt``
    (rank 0's full state dicts), ``rank_0.pt``, then ``meta.json`` (format 1, the checksum of each file) and
    ``latest``. ``config``: the resolved config its metadata records (none by default)."""
    import torch

    from trainer import checkpoint

    folder = root / f"{checkpoint.PREFIX}{step}"
    folder.mkdir(parents=True)
    torch.save(backend.module.state_dict(), folder / "model.pt")
    torch.save(backend.optimizer.state_dict(), folder / "optimizer.pt")
    meter = {"loss_sum": torch.tensor(3.0 * step, dtype=torch.float64), "tokens": 64 * step, "steps": step}
    torch.save({"meter": meter, "rng": checkpoint.rng_state()}, folder / "rank_0.pt")
    files = {p.name: checkpoint.checksum(p) for p in sorted(folder.iterdir())}
    meta = {**checkpoint_meta(step), "config": config or {}, "format": 1, "step": step, "world_size": 1}
    (folder / checkpoint.META).write_text(json.dumps({**meta, "files": files}, indent=1))
    (root / checkpoint.LATEST).write_text(folder.name)
    return folder


def tiny_trainer(config: Any, info: Any, run_dir: Path) -> tuple[Any, Any]:
    """A Trainer of ``config`` as ``trainer.main`` builds one (data, seeded model, backend), and a
    Recorder writing into ``run_dir`` on rank 0; no checkpoint restored."""
    import torch

    from trainer.backends import build_backend
    from trainer.data import build_data
    from trainer.loop import Trainer
    from trainer.models import build_model
    from trainer.observe import Recorder

    data = build_data(config, info)
    torch.manual_seed(0)
    model = build_model(config.model, tokenizer_vocab=data.vocab_size, eos_id=data.eos_id)
    backend = build_backend(config, model, info)
    run_dir.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(
        info.is_main, run_dir, {"run": {"name": "t"}}, config.logger, config.train.max_steps, 0
    )
    return Trainer(config, info, backend, data, config.lr_schedule, run_dir, {}), recorder


def simulated_batches(stages: list[tuple[int, int]], seq_len: int, max_steps: int) -> list[int]:
    """Each step's global batch, step by step: the last stage whose start the tokens trained on before the
    step have reached (Megatron-LM's update_num_microbatches(consumed_samples) rule)."""
    batches, tokens = [], 0
    for _ in range(max_steps):
        batch = [b for start, b in stages if start <= tokens][-1]
        batches.append(batch)
        tokens += batch * seq_len
    return batches


def megatron_lrs(batches: list[int], peak: float, **scheduler: Any) -> list[float]:
    """The LR Megatron-LM's OptimizerParamScheduler (megatron-core 0.16) sets after each iteration's
    ``step(increment=global batch)``: its ``get_lr`` at the samples consumed so far, which is where ramp
    evaluates the step that consumed them."""
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    defaults = {"init_lr": 0.0, "min_lr": 0.0, "start_wd": 0.0, "end_wd": 0.0, "wd_incr_style": "constant"}
    megatron = OptimizerParamScheduler(
        optimizer, max_lr=peak, wd_incr_steps=sum(batches), **{**defaults, **scheduler}
    )
    lrs = []
    for batch in batches:
        megatron.step(increment=batch)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def deepspeed_param_groups(step_dir: Path) -> list[dict[str, Any]]:
    """The torch optimizer's parameter groups as DeepSpeed saved them (ZeRO 2, one rank)."""
    import torch

    from trainer.backends.deepspeed import weights_only_loads

    with weights_only_loads():
        state = torch.load(step_dir / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    groups: list[dict[str, Any]] = state["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    return groups


def ddp_param_groups(step_dir: Path) -> list[dict[str, Any]]:
    """The optimizer's parameter groups as a DDP checkpoint saved them."""

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    groups: list[dict[str, Any]] = _load_state_dict_from_keys(
        keys={"optim"}, checkpoint_id=str(step_dir / "dcp")
    )["optim"]["param_groups"]
    return groups


def checkpoint_weights(step_dir: Path) -> dict[str, Any]:
    """The full weights of a DDP or FSDP2 checkpoint (DCP, any rank count), by parameter name, on the CPU."""
    from trainer.backends.state import full_model_state

    return full_model_state(step_dir)


def kill_when(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, timeout: float = 240
) -> None:
    """SIGKILL the launched job (:func:`kill_job`) as soon as ``ready()``; fail with the log's tail if it ends
    first or ``timeout`` seconds pass. The job is killed whatever happens."""
    import time

    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
    finally:
        kill_job(proc)


def free_port(span: int = 1) -> int:
    """A port with the next ``span - 1`` ports free too."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + span > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for offset in range(1, span):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")
