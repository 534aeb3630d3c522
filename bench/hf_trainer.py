"""Contender (d): the Hugging Face Trainer, configured to match the bare loop."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from bench import common


class Windows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """``count`` seeded random windows of ``seq_len`` tokens from a flat uint16 token file."""

    def __init__(self, path: str, seq_len: int, count: int, seed: int) -> None:
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        self.seq_len = seq_len
        windows = (len(self.tokens) - 1) // seq_len
        self.starts = np.random.default_rng(seed).integers(0, windows, count) * seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = self.starts[index]
        ids = torch.from_numpy(self.tokens[start : start + self.seq_len].astype(np.int64))
        return {"input_ids": ids, "labels": ids}


def main() -> None:
    """Train with the Hugging Face Trainer for ``--steps`` steps, printing the BENCH lines."""
    opts = common.args()
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

    class Events(TrainerCallback):
        def on_step_end(
            self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
        ) -> None:
            if state.is_world_process_zero and state.global_step in (1, opts.steps):
                common.event(state.global_step)

    torch.manual_seed(opts.seed)
    config = AutoConfig.for_model(
        **common.MODEL, vocab_size=common.VOCAB, bos_token_id=common.EOS, eos_token_id=common.EOS
    )
    model = AutoModelForCausalLM.from_config(config)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = Windows(opts.tokens, opts.seq_len, opts.steps * opts.micro_batch * world, opts.seed)
    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(
            output_dir=out,
            max_steps=opts.steps,
            per_device_train_batch_size=opts.micro_batch,
            learning_rate=common.LR,
            lr_scheduler_type="cosine",
            warmup_steps=common.WARMUP,
            weight_decay=common.WEIGHT_DECAY,
            adam_beta1=common.BETAS[0],
            adam_beta2=common.BETAS[1],
            max_grad_norm=common.MAX_GRAD_NORM,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
            seed=opts.seed,
            disable_tqdm=True,
        )
        Trainer(model=model, args=arguments, train_dataset=data, callbacks=[Events()]).train()
    common.leave()


if __name__ == "__main__":
    main()
