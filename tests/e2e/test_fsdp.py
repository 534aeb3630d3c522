"""backend=fsdp end to end: parity with DDP (gpt2-tiny and llama-tiny, accumulation 1 and 3, and HSDP),
checkpoints that resume on another number of ranks (DDP and FSDP2) exactly as the unbroken run trained,
export from FSDP2 shards, and the checkpoints FSDP2 refuses to resume, in one line.

The parity runs share one 2-rank torchrun job (tests/e2e/workers/fsdp_parity.py) that trains every
configuration through ramp's real loop; the resume tests continue its checkpoints through trainer.main.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.e2e.workers.fsdp_parity import COMMON, MAX_STEPS, RUNS
from tests.helpers import (
    checkpoint_weights,
    own_lines,
    read_metrics,
    run_export,
    run_ramp,
    run_worker,
    save_format_1_checkpoint,
    tiny_backend,
)
from trainer import resume
from trainer.config import compose
from trainer.distributed import DistInfo

pytestmark = pytest.mark.slow

SAME = ("step", "lr", "lr/decay", "lr/no_decay", "samples", "tokens", "epoch", "global_batch")
"""Record keys a run must repeat exactly: the step, the LRs it trained at and the data it trained on."""
PARITY = [name for name, _ in RUNS if not name.startswith("ddp-") and not name.endswith("-async")]


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("fsdp-parity")
    run_worker("fsdp_parity.py", [str(root)], cwd=root, cache_dir=cache_dir, timeout=400)
    return root, json.loads((root / "report.json").read_text())


def train_records(run_dir: Path, steps: range = range(1, MAX_STEPS + 1)) -> list[dict[str, Any]]:
    records, _ = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(steps), run_dir
    return records


def assert_trains_like(ours: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    """The same steps at the same LRs on the same samples; losses within 1e-5 relative, norms within 1e-4."""
    by_step = {r["step"]: r for r in reference}
    for mine in ours:
        theirs = by_step[mine["step"]]
        assert {k: mine[k] for k in SAME} == {k: theirs[k] for k in SAME}
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5), mine["step"]
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4), mine["step"]


def assert_same_weights(ours: Path, reference: Path) -> None:
    """Two checkpoints' full weights, to Adam's rounding of tiny gradients (fp32 all along)."""
    mine, theirs = checkpoint_weights(ours), checkpoint_weights(reference)
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        assert mine[key].dtype == value.dtype == torch.float32
        torch.testing.assert_close(mine[key], value, rtol=1e-4, atol=1e-5, msg=key)


def ddp_twin(name: str) -> str:
    return "ddp-" + name.split("-", 1)[1]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", PARITY)
def test_fsdp_trains_like_ddp(name: str, parity: tuple[Path, dict[str, Any]]) -> None:
    """fp32, 2 ranks: identical LRs and data, losses within 1e-5 relative, the same trained weights."""
    root, _ = parity
    ddp = train_records(root / ddp_twin(name))
    ours = train_records(root / name)
    assert [r["lr"] for r in ours] == [r["lr"] for r in ddp]
    assert [r["lr/decay"] for r in ours] == [r["lr/no_decay"] for r in ours] == [r["lr"] for r in ours]
    assert_trains_like(ours, ddp)
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.5  # it trains
    # Evaluation runs through the sharded model too.
    _, our_evals = read_metrics(root / name)
    _, ddp_evals = read_metrics(root / ddp_twin(name))
    assert [e["step"] for e in our_evals] == [e["step"] for e in ddp_evals] == [3, 6]
    for mine, theirs in zip(our_evals, ddp_evals, strict=True):
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-5)
    final = f"checkpoints/step_{MAX_STEPS}"
    assert_same_weights(root / name / final, root / ddp_twin(name) / final)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", PARITY)
def test_fsdp_shards_each_block_then_the_model(name: str, parity: tuple[Path, dict[str, Any]]) -> None:
    root, report = parity
    layout = report[name]
    model, block = (
        ("GPT2LMHeadModel", "GPT2Block") if "gpt2" in name else ("LlamaForCausalLM", "LlamaDecoderLayer")
    )
    # fully_shard on each decoder block, then on the model (each becomes an FSDP<class> in place).
    assert layout["wrapped"] == [f"FSDP{model}", *[f"FSDP{block}"] * 4]
    if name.startswith("hsdp-"):  # 2 replicas of a 1-rank shard group: each rank holds the whole model
        assert (layout["mesh_shape"], layout["mesh_dims"]) == ([2, 1], ["replicate", "shard"])
        assert layout["placements"] == ["R", "S(0)"]
        assert layout["local_numel"] == layout["numel"]
    else:  # each rank holds half of every parameter (rows of dim 0; every size here is even)
        assert (layout["mesh_shape"], layout["mesh_dims"]) == ([2], ["shard"])
        assert layout["placements"] == ["S(0)"]
        assert layout["local_numel"] * 2 == layout["numel"]
    meta = json.loads((root / name / f"checkpoints/step_{MAX_STEPS}/meta.json").read_text())
    assert (meta["backend"], meta["world_size"], meta["format"]) == ("fsdp", 2, 2)
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "rank_0.pt", "rank_1.pt"} <= set(meta["files"])


@pytest.mark.timeout(600)
def test_background_saves_write_the_same_checkpoints(parity: tuple[Path, dict[str, Any]]) -> None:
    """train.ckpt_async: steps 2 and 4 saved in the background, the last one not; each is complete
    (checksummed, in place) and holds exactly what a synchronous save of the same run holds."""
    root, _ = parity
    background, synchronous = root / "fsdp-gpt2-tiny-accum1-async", root / "fsdp-gpt2-tiny-accum1"
    assert [r["loss"] for r in train_records(background)] == [r["loss"] for r in train_records(synchronous)]
    assert (background / "checkpoints" / "latest").read_text() == f"step_{MAX_STEPS}"
    assert not [p for p in (background / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    for step in (2, 4, MAX_STEPS):
        ckpt = background / "checkpoints" / f"step_{step}"
        assert resume.problem(ckpt) is None
        mine, theirs = (
            checkpoint_weights(ckpt),
            checkpoint_weights(synchronous / "checkpoints" / f"step_{step}"),
        )
        assert all(torch.equal(mine[k], v) for k, v in theirs.items()), step
        assert (
            resume.read_meta(ckpt).sampler
            == resume.read_meta(synchronous / "checkpoints" / f"step_{step}").sampler
        )


# ---------------------------------------------------------------------------------------------------
# Resuming on another number of ranks: the parity job's 2-rank gpt2-tiny checkpoint of step 2 goes on
# on 1 rank (twice the accumulation: the same global batch), whose checkpoint of step 4 goes on on 2.


def resume_on(ranks: int, checkpoint: Path, backend: str, run_dir: Path, cache_dir: Path) -> str:
    """Continue ``checkpoint`` on ``ranks`` ranks into ``run_dir`` through trainer.main; its stderr."""
    overrides = [
        *COMMON,
        f"backend={backend}",
        "model=gpt2-tiny",
        f"train.grad_accum_steps={2 // ranks}",
        f"run.dir={run_dir}",
        f"run.resume={checkpoint}",
    ]
    result = run_ramp(overrides, cwd=run_dir.parent, cache_dir=cache_dir, nproc=0 if ranks == 1 else ranks)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming from {checkpoint} at step {int(checkpoint.name[5:])}" in result.stdout
    return result.stderr


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_a_checkpoint_resumes_on_another_number_of_ranks_exactly(
    backend: str, parity: tuple[Path, dict[str, Any]], tmp_path: Path, cache_dir: Path
) -> None:
    root, _ = parity
    reference = root / f"{backend}-gpt2-tiny-accum1"
    one, two = tmp_path / "one", tmp_path / "two"
    saved_on_2 = reference / "checkpoints" / "step_2"
    warnings = resume_on(1, saved_on_2, backend, one, cache_dir)
    # Accepted, with the two changes said once each.
    assert "resuming a 2-rank checkpoint on 1 rank: data order continues" in warnings
    changed = [line for line in own_lines(warnings) if "train.grad_accum_steps" in line]
    assert len(changed) == 1, warnings
    assert "changes the math: train.grad_accum_steps: 1 -> 2" in changed[0]
    saved_on_1 = one / "checkpoints" / "step_4"
    assert json.loads((saved_on_1 / "meta.json").read_text())["world_size"] == 1
    warnings = resume_on(2, saved_on_1, backend, two, cache_dir)
    assert "resuming a 1-rank checkpoint on 2 ranks" in warnings
    unbroken = train_records(reference)
    assert_trains_like(train_records(one, range(3, MAX_STEPS + 1)), unbroken)
    assert_trains_like(train_records(two, range(5, MAX_STEPS + 1)), unbroken)
    # The 2-rank continuation evaluates on the same 2-rank validation batches (1 rank reads fewer).
    assert read_metrics(two)[1][-1]["val_loss"] == pytest.approx(
        read_metrics(reference)[1][-1]["val_loss"], rel=1e-5
    )
    # Both end where the unbroken run ended: the data position, the counters and the weights.
    final = f"checkpoints/step_{MAX_STEPS}"
    end = json.loads((reference / final / "meta.json").read_text())
    for run_dir, ranks in ((one, 1), (two, 2)):
        meta = json.loads((run_dir / final / "meta.json").read_text())
        assert (meta["sampler"], meta["tokens"], meta["skipped_steps"]) == (
            end["sampler"],
            end["tokens"],
            end["skipped_steps"],
        )
        assert (meta["backend"], meta["world_size"]) == (backend, ranks)
        assert_same_weights(run_dir / final, reference / final)


@pytest.mark.timeout(600)
def test_fewer_ranks_with_the_same_accumulation_say_the_batch_changes_and_count_samples_exactly(
    parity: tuple[Path, dict[str, Any]], tmp_path: Path, cache_dir: Path
) -> None:
    """A 2-rank checkpoint of step 2 resumed on 1 rank with the same accumulation: half the global batch,
    said at the start; the records' samples count on from the checkpoint's, equal to tokens / seq_len."""
    root, _ = parity
    saved_on_2 = root / "ddp-gpt2-tiny-accum1" / "checkpoints" / "step_2"
    overrides = [*COMMON, "backend=ddp", "model=gpt2-tiny", f"run.dir={tmp_path / 'half'}"]
    result = run_ramp([*overrides, f"run.resume={saved_on_2}"], cwd=tmp_path, cache_dir=cache_dir, nproc=0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    before = json.loads((saved_on_2 / "meta.json").read_text())
    batch = train_records(root / "ddp-gpt2-tiny-accum1")[0]["global_batch"]
    assert f"the global batch changes from {batch} to {batch // 2} samples a step" in result.stderr
    after = train_records(tmp_path / "half", range(3, MAX_STEPS + 1))
    seq_len = before["tokens"] // (2 * batch)
    assert [r["samples"] for r in after] == [2 * batch + k * batch // 2 for k in range(1, len(after) + 1)]
    assert all(r["samples"] == r["tokens"] // seq_len for r in after)


@pytest.mark.timeout(600)
def test_export_from_fsdp_shards_saved_on_two_ranks(
    parity: tuple[Path, dict[str, Any]], tmp_path: Path, cache_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.export import load_model

    root, _ = parity
    ckpt = root / "fsdp-llama-tiny-accum1" / "checkpoints" / f"step_{MAX_STEPS}"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (meta["backend"], meta["world_size"]) == ("fsdp", 2)
    out = tmp_path / "hf"
    run_export(ckpt, out, cache_dir)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    ours = load_model(ckpt)
    tokens = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(tokens).logits, ours(tokens).logits)
    trained = checkpoint_weights(ckpt)
    weights = exported.state_dict()
    assert set(trained) <= set(weights)
    assert all(torch.equal(weights[k], v) for k, v in trained.items())
    assert_same_weights(ckpt, root / "ddp-llama-tiny-accum1" / "checkpoints" / f"step_{MAX_STEPS}")


# ---------------------------------------------------------------------------------------------------
# Checkpoints backend=fsdp cannot resume: one line, before anything is built or written


def deepspeed_checkpoint(root: Path) -> Path:
    """The metadata of a DeepSpeed checkpoint (its shards are never reached)."""
    folder = root / "step_1"
    folder.mkdir(parents=True)
    meta = {
        "step": 1,
        "world_size": 1,
        "files": {},
        "tokens": 64,
        "skipped_steps": 0,
        "sampler": {"epoch": 0, "position": 1},
        "backend": "deepspeed",
        "tokenizer_vocab": 257,
        "eos_id": 256,
        "config": compose(["backend=deepspeed"]).to_dict(),
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def format_1_checkpoint(root: Path) -> Path:
    """A one-rank DDP checkpoint of ramp's first format (model.pt)."""
    cfg = compose(["train.seq_len=32", "train.micro_batch_size=2"])
    alone = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    return save_format_1_checkpoint(root, 1, tiny_backend(cfg, alone), cfg.to_dict())


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("make", "old"), [(deepspeed_checkpoint, "deepspeed"), (format_1_checkpoint, "ddp")])
def test_fsdp_refuses_another_backends_checkpoint_in_one_line(
    make: Any, old: str, tmp_path: Path, cache_dir: Path
) -> None:
    ckpt = make(tmp_path / "old")
    result = run_ramp(
        ["backend=fsdp", f"run.resume={ckpt}", "run.name=new", "logger.wandb.mode=disabled"],
        cwd=tmp_path,
        cache_dir=cache_dir,
        nproc=0,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"ramp: error: run.resume: backend.name is {old} in {ckpt} but fsdp here")
    assert f"keep backend={old}" in lines[0]
    assert not (tmp_path / "outputs").exists()
