"""Run under torchrun: build the data on every rank as a run does, then draw micro-batches.

Arguments: conf dir, report path prefix, start (``0`` for a fresh sampler, or a JSON state_dict to
resume from), number of micro-batches to draw, then Hydra overrides. Each rank writes
``<prefix>.rank<N>.json`` with, per draw, the sampler state before it, the pass it drew from, the sample indices
and the batch's token ids.
"""

import json
import sys

from hydra import compose, initialize_config_dir

from trainer import distributed
from trainer.config import register_configs, to_config
from trainer.data import build_data


def main() -> None:
    conf_dir, prefix, start, draws, *overrides = sys.argv[1:]
    register_configs()
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = to_config(compose("config", overrides=overrides))
    info = distributed.setup(1)
    data = build_data(cfg, info)
    sampler = data.train
    if start != "0":
        sampler.load_state_dict(json.loads(start))
    records = []
    for _ in range(int(draws)):
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
    report = {
        "rank": info.rank,
        "num_samples": sampler.num_samples,
        "global_batch": sampler.global_batch,
        "entry": str(data.files.path),
        "records": records,
    }
    with open(f"{prefix}.rank{info.rank}.json", "w") as handle:
        json.dump(report, handle)
    distributed.teardown()


if __name__ == "__main__":
    main()
