"""The sampler: each pass hands every sample to exactly one rank, the next pass reshuffles, and a
sampler restored from its state continues with exactly the batches the uninterrupted one draws."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import compose
from trainer.data import build_data
from trainer.data.sampler import WindowSampler, eval_batches
from trainer.distributed import DistInfo
from trainer.testing import run_distributed


def samplers(num_tokens: int, seq_len: int, micro: int, world: int, seed: int = 3) -> list[WindowSampler]:
    tokens = np.arange(num_tokens, dtype=np.uint16)
    return [WindowSampler(tokens, seq_len, micro, rank, world, seed) for rank in range(world)]


def draw(ranks: list[WindowSampler], count: int) -> list[list[np.ndarray]]:
    """``count`` micro-batches of sample indices: per draw, one array per rank."""
    return [[sampler.next_indices() for sampler in ranks] for _ in range(count)]


def test_each_pass_hands_every_sample_to_exactly_one_rank() -> None:
    ranks = samplers(num_tokens=1000, seq_len=9, micro=4, world=3)
    num_samples, global_batch = ranks[0].num_samples, ranks[0].global_batch
    assert (num_samples, global_batch) == (111, 12)
    per_pass = num_samples // global_batch  # 9 micro-batches; the 3-sample tail waits for the next pass
    orders = []
    for epoch in range(3):
        seen = np.concatenate([indices for step in draw(ranks, per_pass) for indices in step])
        assert len(seen) == len(set(seen.tolist())) == per_pass * global_batch  # none twice
        expected = ranks[0].order(epoch)
        assert seen.tolist() == expected[: per_pass * global_batch].tolist()  # none skipped but the tail
        assert sorted(expected.tolist()) == list(range(num_samples))
        assert all(sampler.state.epoch == epoch for sampler in ranks)
        orders.append(expected.tolist())
    assert orders[0] != orders[1] != orders[2]  # each pass reshuffles
    draw(ranks, 1)
    assert ranks[0].state_dict() == {"epoch": 3, "position": global_batch}


def test_batches_are_the_windows_of_their_indices() -> None:
    (sampler,) = samplers(num_tokens=200, seq_len=8, micro=5, world=1)
    state = sampler.state_dict()
    batch = sampler.next_batch()
    sampler.load_state_dict(state)
    indices = sampler.next_indices()
    assert batch.shape == (5, 9)
    assert batch.tolist() == [list(range(i * 8, i * 8 + 9)) for i in indices]  # np.arange tokens


def test_the_order_depends_only_on_the_seed_and_the_pass() -> None:
    a, b, other = (samplers(500, 7, 2, 1, seed)[0] for seed in (11, 11, 12))
    assert a.order(4).tolist() == b.order(4).tolist()
    assert a.order(4).tolist() != other.order(4).tolist()


def test_a_restored_state_continues_with_the_same_batches() -> None:
    uninterrupted = samplers(num_tokens=700, seq_len=10, micro=3, world=2)
    reference = draw(uninterrupted, 40)  # 2 passes and a bit: 69 samples, 11 micro-batches per pass
    first = samplers(num_tokens=700, seq_len=10, micro=3, world=2)
    draw(first, 17)
    saved = json.loads(json.dumps([sampler.state_dict() for sampler in first]))  # plain ints survive JSON
    assert saved[0] == saved[1] == {"epoch": 1, "position": 36}
    restarted = samplers(num_tokens=700, seq_len=10, micro=3, world=2)
    for sampler, state in zip(restarted, saved, strict=True):
        sampler.load_state_dict(state)
    continued = draw(restarted, 23)
    assert [[a.tolist() for a in step] for step in continued] == [
        [a.tolist() for a in step] for step in reference[17:]
    ]


def test_a_step_trains_on_the_same_samples_whatever_the_split() -> None:
    """Two ranks of 4 or one rank accumulating two micro-batches of 4: the same 8 samples per step."""
    two_ranks = draw(samplers(900, 8, 4, 2), 6)
    one_rank = draw(samplers(900, 8, 4, 1), 12)
    for step in range(6):
        split = sorted(np.concatenate(two_ranks[step]).tolist())
        accumulated = sorted(np.concatenate(one_rank[2 * step][0:1] + one_rank[2 * step + 1][0:1]).tolist())
        assert split == accumulated


def test_evaluation_reads_the_same_leading_windows_split_across_ranks() -> None:
    tokens = np.arange(100, dtype=np.uint16)  # 9 windows of 11 tokens
    ranks = [eval_batches(tokens, 11, 2, rank, 2, steps=5) for rank in range(2)]
    assert [a.tolist() for a in ranks[0]] == [[0, 1], [4, 5]]  # capped at the 2 full global batches
    assert [a.tolist() for a in ranks[1]] == [[2, 3], [6, 7]]
    assert [a.tolist() for a in eval_batches(tokens, 11, 2, 0, 2, steps=5)] == [a.tolist() for a in ranks[0]]


# --- two real ranks -------------------------------------------------------------------------------------

SEQ_LEN, MICRO = 16, 3


def draw_on_this_rank(
    info: DistInfo, overrides: list[str], start: dict[str, int] | None, draws: int
) -> dict[str, Any]:
    """Build the data as a run does, then draw micro-batches: per draw, the state before it, the pass,
    the sample indices and the batch's token ids."""
    data = build_data(compose(overrides), info)
    sampler = data.train
    if start is not None:
        sampler.load_state_dict(start)
    records = []
    for _ in range(draws):
        state = sampler.state_dict()
        indices = sampler.next_indices()
        batch = sampler.gather_from(sampler.tokens, indices)
        records.append(
            {
                "state": state,
                "epoch": sampler.state.epoch,
                "indices": indices.tolist(),
                "batch": batch.tolist(),
            }
        )
    entry = str(data.files.path)
    return {
        "num_samples": sampler.num_samples,
        "global_batch": sampler.global_batch,
        "entry": entry,
        "records": records,
    }


def sample_on_two_ranks(tmp_path: Path, start: dict[str, int] | None, draws: int) -> list[dict[str, Any]]:
    overrides = [
        "data=text",
        f"data.files={tmp_path / 'corpus'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.val_fraction=0.2",
        f"train.seq_len={SEQ_LEN}",
        f"train.micro_batch_size={MICRO}",
        "train.eval_every=0",
        "train.seed=7",
    ]
    return run_distributed(draw_on_this_rank, overrides, start, draws)


def test_two_ranks_split_each_pass_and_resume_mid_pass(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(24):
        (corpus / f"{i:02d}.txt").write_text(f"document {i}: " + "abcdefghij"[i % 10] * (40 + 7 * i))
    full = sample_on_two_ranks(tmp_path, None, draws=60)
    num_samples, global_batch = full[0]["num_samples"], full[0]["global_batch"]
    assert global_batch == 2 * MICRO
    assert full[1]["num_samples"] == num_samples
    per_pass, tail = divmod(num_samples, global_batch)
    assert tail > 0, "the corpus must leave a tail"
    assert 2 * per_pass < 60, "the run must cross two passes"

    # every batch holds the token windows its indices name, read back from the cached file
    meta = json.loads((Path(full[0]["entry"]) / "meta.json").read_text())
    tokens = np.fromfile(Path(full[0]["entry"]) / "train.bin", dtype=meta["dtype"]).astype(np.int64)
    for report in full:
        for record in report["records"]:
            windows = [tokens[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1].tolist() for i in record["indices"]]
            assert record["batch"] == windows

    # within a pass every sample goes to exactly one rank; only the tail (< one global batch) waits
    passes: dict[int, list[int]] = {}
    for step in range(60):
        for report in full:
            record = report["records"][step]
            passes.setdefault(record["epoch"], []).extend(record["indices"])
    for epoch in (0, 1):
        seen = passes[epoch]
        assert len(seen) == len(set(seen)) == per_pass * global_batch
        assert len(set(range(num_samples)) - set(seen)) == tail
    assert passes[0] != passes[1][: len(passes[0])]  # the next pass reshuffles

    # a restart from the state saved after 27 micro-batches (mid-pass 2) draws exactly the rest
    saved = full[0]["records"][27]["state"]
    assert saved == full[1]["records"][27]["state"]
    assert 0 < saved["position"] < num_samples
    resumed = sample_on_two_ranks(tmp_path, saved, draws=60 - 27)
    for rank in range(2):
        assert resumed[rank]["records"] == full[rank]["records"][27:]
