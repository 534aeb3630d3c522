"""Build a causal language model with transformers from the model config. Nothing is downloaded.

Models know nothing of ranks: wrapping for DDP or DeepSpeed happens in ``trainer.backends``.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig, OptimConfig
from trainer.errors import ConfigError

VOCAB_MULTIPLE = 64


def padded_vocab_size(tokenizer_vocab: int) -> int:
    """Round the vocabulary up to a multiple of 64: matrix shapes the hardware tiles well."""
    return math.ceil(tokenizer_vocab / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


RAMP_SET = {
    "vocab_size": "model.vocab_size (or the tokenizer)",
    "hidden_size": "model.hidden_size",
    "num_hidden_layers": "model.num_layers",
    "num_attention_heads": "model.num_heads",
    "max_position_embeddings": "model.max_position_embeddings",
    "tie_word_embeddings": "model.tie_word_embeddings",
    "bos_token_id": "the tokenizer's end-of-document token",
    "eos_token_id": "the tokenizer's end-of-document token",
    "n_inner": "model.intermediate_size",
    "intermediate_size": "model.intermediate_size",
    "num_key_value_heads": "model.num_kv_heads",
    "rope_theta": "model.rope_theta",
    "resid_pdrop": "model.dropout",
    "embd_pdrop": "model.dropout",
    "attn_pdrop": "model.dropout",
    "attention_dropout": "model.dropout",
}
"""The transformers config keys ramp sets from its own keys, and those keys."""
ALIASES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads"}
ALIASES["n_positions"] = "max_position_embeddings"
"""GPT-2's names (its attribute_map) for the keys ramp sets."""


def hf_config_kwargs(cfg: ModelConfig, vocab_size: int, eos_id: int) -> dict[str, Any]:
    """Generic preset keys to the transformers config's own names (gpt2 maps them through attribute_map).

    Raises:
        ConfigError: a ``model.extra`` entry sets a key that ramp sets from one of its own keys (the
            record would say one value while the model has another), naming that key.
    """
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
    }
    if cfg.arch == "gpt2":
        if cfg.intermediate_size is not None:
            kwargs["n_inner"] = cfg.intermediate_size
        kwargs.update(resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)
    else:
        if cfg.intermediate_size is not None:
            kwargs["intermediate_size"] = cfg.intermediate_size
        if cfg.num_kv_heads is not None:
            kwargs["num_key_value_heads"] = cfg.num_kv_heads
        if cfg.rope_theta is not None:
            kwargs["rope_theta"] = cfg.rope_theta
        kwargs["attention_dropout"] = cfg.dropout
    for key in cfg.extra:
        canonical = ALIASES.get(key, key)
        if canonical in kwargs and canonical in RAMP_SET:
            raise ConfigError(
                f"model.extra.{key} is set by ramp from {RAMP_SET[canonical]}; remove model.extra.{key} and set "
                f"{RAMP_SET[canonical]} instead"
            )
    kwargs.update(cfg.extra)
    return kwargs


def build_model(
    cfg: ModelConfig, *, tokenizer_vocab: int, eos_id: int, activation_checkpointing: bool = False
) -> nn.Module:
    """A randomly initialised model; the caller seeds torch first so every rank builds the same one.

    Raises:
        ConfigError: ``model.vocab_size`` below the tokenizer's, a ``model.arch`` transformers lacks, or a
            ``model.extra`` entry that ramp's own keys set.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab_size = cfg.vocab_size or padded_vocab_size(tokenizer_vocab)
    if vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens; "
            "remove model.vocab_size to follow the tokenizer"
        )
    kwargs = hf_config_kwargs(cfg, vocab_size, eos_id)
    try:
        hf_config = AutoConfig.for_model(cfg.arch, **kwargs)
    except ValueError as err:
        raise ConfigError(f"model.arch={cfg.arch}: {str(err).splitlines()[0]}") from None
    hf_config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(hf_config)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters of the whole model, also when ZeRO 3 leaves this rank a shard of each."""
    # ZeRO 3 leaves each rank a shard (numel() 0 on most); DeepSpeed records the full size as ds_numel.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of a packed batch of shape (B, T + 1).

    Returns the sum over the B * T predicted tokens, so micro-batches and ranks combine into a
    token-weighted mean by adding sums and counts.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


def group_hyperparameters(name: str, cfg: OptimConfig) -> dict[str, Any]:
    """AdamW's settings of the parameter group ``name`` (``decay``, ``no_decay`` or one of
    ``optim.groups``), from ``optim.*``."""
    custom = {group.name: group for group in cfg.groups}
    if name in custom:
        decay = custom[name].weight_decay
        weight_decay = cfg.weight_decay if decay is None else decay
    else:
        weight_decay = cfg.weight_decay if name == "decay" else 0.0
    return {"weight_decay": weight_decay, "betas": (cfg.betas[0], cfg.betas[1]), "eps": cfg.eps}


def _owners(name: str, param: nn.Parameter, cfg: OptimConfig, used: set[tuple[str, str]]) -> list[str]:
    """The ``optim.groups`` that take parameter ``name``; records each (group, pattern) that matched."""
    owners = []
    for group in cfg.groups:
        if group.ndim is not None and param.ndim != group.ndim:
            continue
        hits = [pattern for pattern in group.match if fnmatch.fnmatch(name, pattern)]
        if group.match and not hits:
            continue
        used.update((group.name, pattern) for pattern in hits or [""])
        owners.append(group.name)
    return owners


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups: ``optim.groups`` first (by name pattern and dimension), then weight decay on every
    other parameter except those matching ``optim.no_decay``.

    Raises:
        ConfigError: a parameter two groups take, or a group pattern (or a group) that takes no parameter,
            naming it.
    """
    members: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": []}
    members.update({group.name: [] for group in cfg.groups})
    used: set[tuple[str, str]] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owners = _owners(name, param, cfg, used)
        if len(owners) > 1:
            raise ConfigError(
                f"optim.groups: parameter {name} is taken by both {owners[0]} and {owners[1]}; make their match "
                "patterns (or ndim) exclusive"
            )
        excluded = any(fnmatch.fnmatch(name, pattern) for pattern in cfg.no_decay)
        members[owners[0] if owners else "no_decay" if excluded else "decay"].append(param)
    for group in cfg.groups:
        for pattern in group.match or [""]:
            if (group.name, pattern) not in used:
                what = f"pattern {pattern!r}" if pattern else "ndim"
                raise ConfigError(
                    f"optim.groups.{group.name}: {what} takes no parameter of {_model_name(model)}; fix or drop it"
                )
    # The decay group always exists (the LR records name it); the others only when they have members.
    kept = [(name, params) for name, params in members.items() if params or name == "decay"]
    return [{"params": params, "name": name, **group_hyperparameters(name, cfg)} for name, params in kept]


def _model_name(model: nn.Module) -> str:
    """The model's class name, for messages."""
    return type(model).__name__


def apply_hyperparameters(groups: list[dict[str, Any]], cfg: OptimConfig) -> None:
    """Write ``optim.*`` into every parameter group: after a checkpoint's optimizer state is loaded, the
    groups hold the values they were saved with, and the configuration given now must win."""
    for group in groups:
        group.update(group_hyperparameters(str(group["name"]), cfg))


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch's AdamW over :func:`param_groups`; its fused kernel (CPU and CUDA) unless ``optim.fused=false``.

    The fused kernel can drop an update on the device (``found_inf``), which keeps the non-finite guard
    free of a host-device sync.
    """
    fused = cfg.fused if cfg.fused is not None else device.type in ("cpu", "cuda")
    return torch.optim.AdamW(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        fused=fused or None,
    )
