"""Model options that change memory or speed but never the math."""

from __future__ import annotations

import torch

from tests.test_checkpoint import config
from trainer.models import build_model, causal_lm_loss


def test_activation_checkpointing_gives_the_same_loss_and_gradients() -> None:
    """Recomputing activations in the backward pass changes memory, not the math."""
    cfg = config()
    batch = torch.randint(0, 257, (2, 33), generator=torch.Generator().manual_seed(4))
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model, tokenizer_vocab=257, eos_id=256, activation_checkpointing=recompute)
        model.train()
        assert model.is_gradient_checkpointing is recompute  # type: ignore[attr-defined]
        loss = causal_lm_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert len(grads_a) == len(grads_b) and all(
        torch.allclose(a, b, atol=1e-7) for a, b in zip(grads_a, grads_b, strict=True)
    )
