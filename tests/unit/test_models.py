"""The model built from a preset, its AdamW groups, and options that change memory or speed, not the math."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from trainer.config import Config, compose
from trainer.errors import ConfigError
from trainer.models import build_model, causal_lm_loss, count_parameters, padded_vocab_size, param_groups


def test_activation_checkpointing_gives_the_same_loss_and_gradients(
    small_config: Callable[..., Config],
) -> None:
    """Recomputing activations in the backward pass changes memory, not the math."""
    cfg = small_config()
    batch = torch.randint(0, 257, (2, 33), generator=torch.Generator().manual_seed(4))
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model, tokenizer_vocab=257, eos_id=256, activation_checkpointing=recompute)
        model.train()
        assert model.is_gradient_checkpointing is recompute
        loss = causal_lm_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert len(grads_a) == len(grads_b)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads_a, grads_b, strict=True))


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def built(request: pytest.FixtureRequest) -> tuple[Config, Any]:
    cfg = compose([f"model={request.param}"])
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, tokenizer_vocab=257, eos_id=256)


def test_param_groups_split_by_shape(built: tuple[Config, nn.Module]) -> None:
    cfg, model = built
    groups = {group["name"]: group for group in param_groups(model, cfg.optim)}
    assert set(groups) == {"decay", "no_decay"}
    assert groups["decay"]["weight_decay"] == cfg.optim.weight_decay == 0.1
    assert groups["no_decay"]["weight_decay"] == 0.0
    placed = [id(p) for group in groups.values() for p in group["params"]]
    assert len(placed) == len(set(placed)), "a parameter is in two groups"
    assert set(placed) == {id(p) for p in model.parameters()}, "a parameter is in no group"
    decay_ids = {id(p) for p in groups["decay"]["params"]}
    no_decay_ids = {id(p) for p in groups["no_decay"]["params"]}
    for name, param in model.named_parameters():
        assert param.ndim in (1, 2), name
        assert id(param) in (no_decay_ids if param.ndim == 1 else decay_ids), name
    assert groups["decay"]["params"]
    assert groups["no_decay"]["params"]


def test_built_model_pads_the_vocabulary(built: tuple[Config, Any]) -> None:
    cfg, model = built
    assert model.config.model_type == cfg.model.arch
    assert model.config.vocab_size == 320
    assert model.get_input_embeddings().weight.shape == (320, cfg.model.hidden_size)
    assert count_parameters(model) == expected_parameters(cfg.model.arch, vocab=320)


def expected_parameters(arch: str, vocab: int) -> int:
    """The presets' parameter counts from the architectures' definitions (tied embeddings counted once)."""
    d, layers = 192, 4
    if arch == "gpt2":  # wte, wpe; per block: 2 LayerNorms, c_attn, c_proj, c_fc, c_proj (with biases); ln_f
        block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
        return vocab * d + 512 * d + layers * block + 2 * d
    # llama: embeddings; per block: q, k, v (2 of 4 heads of 48 for k and v), o, gate, up, down, 2 RMSNorms
    kv, inner = 2 * 48, 512
    block = d * d + 2 * d * kv + d * d + 3 * d * inner + 2 * d
    return vocab * d + layers * block + d


@pytest.mark.parametrize(("tokens", "padded"), [(1, 64), (64, 64), (256, 256), (257, 320), (50_257, 50_304)])
def test_padded_vocab_size(tokens: int, padded: int) -> None:
    assert padded_vocab_size(tokens) == padded


def test_optim_groups_take_parameters_by_pattern_and_dimension(built: tuple[Config, nn.Module]) -> None:
    cfg, model = built
    embed = "*wte*" if cfg.model.name.startswith("gpt2") else "*embed_tokens*"
    groups_key = (
        f"optim.groups=[{{name: embed, match: ['{embed}'], lr_mult: 0.1, weight_decay: 0.0}},"
        " {name: vectors, ndim: 1, lr_mult: 2.0}]"
    )
    optim = compose([f"model={cfg.model.name}", groups_key]).optim
    groups = {group["name"]: group for group in param_groups(model, optim)}
    named = dict(model.named_parameters())
    members = {
        name: {n for n, p in named.items() if any(p is q for q in g["params"])} for name, g in groups.items()
    }
    assert members["embed"] == {n for n in named if embed.strip("*") in n}
    assert members["vectors"] == {n for n, p in named.items() if p.ndim == 1} - members["embed"]
    assert members["decay"] == set(named) - members["embed"] - members["vectors"]
    assert "no_decay" not in groups
    assert [groups[n]["weight_decay"] for n in ("decay", "embed", "vectors")] == [0.1, 0.0, 0.1]
    assert optim.lr_mults() == {"decay": 1.0, "no_decay": 1.0, "embed": 0.1, "vectors": 2.0}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["+model.extra.hidden_size=100"],
            "model.extra.hidden_size is set by ramp from model.hidden_size; remove model.extra.hidden_size and set "
            "model.hidden_size instead",
        ),
        (["+model.extra.n_layer=2"], "model.extra.n_layer is set by ramp from model.num_layers"),
        (
            ["model=llama-tiny", "+model.extra.rope_theta=1e4"],
            "model.extra.rope_theta is set by ramp from model.rope_theta",
        ),
    ],
)
def test_model_extra_cannot_set_what_ramps_keys_set(overrides: list[str], message: str) -> None:
    """The record would say one value and the model have another."""
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        build_model(compose(overrides).model, tokenizer_vocab=257, eos_id=256)
    model: Any = build_model(compose(["+model.extra.n_inner=64"]).model, tokenizer_vocab=257, eos_id=256)
    assert model.config.n_inner == 64  # a key ramp does not set goes through
