"""The model card (``README.md``) of an export: what the model is and how it was trained, every value read
from the checkpoint (its metadata and recorded config) and the run folder's records (metrics.jsonl,
history.jsonl), never guessed. What a record does not hold is said to be unknown."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from trainer.config import from_tree
from trainer.errors import ConfigError
from trainer.resume import HISTORY, Start

METRICS = "metrics.jsonl"
CONFIG = "ramp_config.yaml"
"""The run's resolved config (secrets masked), as the checkpoint recorded it, beside the card."""


def final_val_loss(run_dir: Path, step: int) -> tuple[int, float] | None:
    """(step, val_loss) of the last evaluation at or before ``step`` in the run's metrics.jsonl (a resumed
    run's rewrites read last); None without one."""
    path = run_dir / METRICS
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
        if "val_loss" in record and record.get("step", step + 1) <= step:
            found = (int(record["step"]), float(record["val_loss"]))
    return found


def _samples_per_epoch(run_dir: Path) -> int | None:
    path = run_dir / HISTORY
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records[-1].get("samples_per_epoch") if records else None


def schedule_line(start: Start) -> str:
    """The schedule's name, peak LR, warmup and length in steps, as the run resolved them (rebuilt from its
    recorded config); the configured keys when it cannot be rebuilt (a config of an older ramp)."""
    tree = start.meta.config
    keys = tree.get("schedule", {})
    peak = tree.get("optim", {}).get("lr")
    try:
        run_dir = start.path.parent.parent
        schedule = from_tree(tree).schedule_for(start.meta.world_size, _samples_per_epoch(run_dir))
    except (ValueError, ConfigError, TypeError, KeyError, json.JSONDecodeError):
        warmup = {k: v for k, v in keys.items() if k.startswith("warmup") and v is not None}
        return f"{keys.get('name', 'unknown')}, peak LR {peak}, warmup {warmup or 'none'} (as configured)"
    return (
        f"{schedule.name}, peak LR {schedule.peak_lr:g}, warmup {schedule.warmup_steps} "
        f"step{'' if schedule.warmup_steps == 1 else 's'}, "
        f"{schedule.max_steps} steps in all"
    )


def _data_line(data: dict[str, Any]) -> str:
    where = {k: data[k] for k in ("files", "path", "name", "split") if data.get(k) is not None}
    place = ", ".join(f"{k}={v}" for k, v in where.items())
    return f"{data.get('source', 'unknown')}" + (f" ({place})" if place else "")


def card_rows(start: Start, hf_config: Any, parameters: int, dtype: str) -> list[tuple[str, str]]:
    """The card's table: (what, value) of the architecture, size, training length, data, schedule and
    final validation loss."""
    meta, tree = start.meta, start.meta.config
    model, data = tree.get("model", {}), tree.get("data", {})
    evaluated = final_val_loss(start.path.parent.parent, meta.step)
    heads = f"{model.get('num_heads', '?')}" + (
        f" ({model['num_kv_heads']} key/value)" if model.get("num_kv_heads") else ""
    )
    return [
        ("Model preset", f"{model.get('name', 'unknown')} (ramp arch {model.get('arch', 'unknown')})"),
        ("transformers model_type", str(hf_config.model_type)),
        ("Layers", str(model.get("num_layers", "unknown"))),
        ("Hidden size", str(model.get("hidden_size", "unknown"))),
        ("Attention heads", heads),
        ("Vocabulary", f"{hf_config.vocab_size} (tokenizer: {meta.tokenizer_vocab} tokens)"),
        ("Positions", str(hf_config.max_position_embeddings)),
        ("Parameters", str(parameters)),
        ("Weights", dtype),
        ("Global step", str(meta.step)),
        ("Tokens trained", str(meta.tokens)),
        ("Data", _data_line(data)),
        ("Tokenizer", f"data.tokenizer={data.get('tokenizer', 'unknown')}, end-of-document id {meta.eos_id}"),
        ("Schedule", schedule_line(start)),
        (
            "Validation loss (the newest at this checkpoint)",
            f"{evaluated[1]!r} at step {evaluated[0]}" if evaluated else "not evaluated",
        ),
    ]


def main_settings(tree: dict[str, Any]) -> str:
    """The run's main settings as ``trainer.main`` overrides (the full config is :data:`CONFIG`)."""
    train, data = tree.get("train", {}), tree.get("data", {})
    files = data.get("files")
    parts = [
        f"model={tree.get('model', {}).get('name')}",
        f"data={data.get('source')}",
        f"data.files={files if isinstance(files, str) or files is None else '[' + ','.join(map(str, files)) + ']'}",
        f"data.path={data.get('path')}",
        f"data.tokenizer={data.get('tokenizer')}",
        f"data.vocab_size={data.get('vocab_size') if data.get('tokenizer') == 'train' else None}",
        f"data.sample_by={data.get('sample_by') if data.get('sample_by') not in (None, 'document') else None}",
        f"schedule={tree.get('schedule', {}).get('name')}",
        f"optim.lr={tree.get('optim', {}).get('lr')}",
        f"train.max_steps={train.get('max_steps')}",
        f"train.seq_len={train.get('seq_len')}",
        f"train.micro_batch_size={train.get('micro_batch_size')}",
    ]
    return " ".join(part for part in parts if not part.endswith("=None"))


def write_model_card(start: Start, hf_config: Any, parameters: int, dtype: str, out_dir: Path) -> None:
    """``out_dir/README.md`` (the card) and ``out_dir/ramp_config.yaml`` (the run's recorded config)."""
    rows = card_rows(start, hf_config, parameters, dtype)
    table = "\n".join(f"| {what} | {value} |" for what, value in rows)
    (out_dir / CONFIG).write_text(yaml.safe_dump(start.meta.config, sort_keys=False))
    text = f"""---
library_name: transformers
tags:
- ramp
- text-generation
---

# {start.meta.config.get("run", {}).get("name", out_dir.name)}

A causal language model trained from scratch with ramp, exported by `python -m trainer.export` from
`{start.path}` (step {start.meta.step}).

| | |
|---|---|
{table}

## How it was trained

`torchrun -m trainer.main {main_settings(start.meta.config)}` on {start.meta.world_size} rank(s), backend
{start.meta.backend}; the full resolved config is in `{CONFIG}`.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{out_dir}")
model = AutoModelForCausalLM.from_pretrained("{out_dir}")
```

or `python -m trainer.sample {out_dir} --prompt "..."` to print a few continuations.
"""
    (out_dir / "README.md").write_text(text)
