"""Training health numbers that need the model or the device: FLOPs per token, MFU and memory.

MFU follows the PaLM paper's convention (Chowdhery et al. 2022, appendix B): a dense decoder spends
``6 N + 12 L H Q T`` FLOPs per trained token (forward and backward), where

- ``N`` is the number of parameters that take part in matrix multiplies: every parameter except
  the lookup-only embedding tables (token embeddings when they are not tied to the output layer,
  learned position embeddings). The output projection counts, tied or not; norm weights and biases
  count too (they are a rounding error). This is nanoGPT's ``estimate_mfu`` count.
- ``L`` layers, ``H`` query heads, ``Q`` head dimension and ``T`` the training sequence length:
  ``12 L H Q T`` is the attention's score and value products, which ``6 N`` leaves out.

Activation recomputation, padding and the optimizer are not counted: MFU measures useful model
work against the hardware's peak, so two runs of the same model compare whatever their settings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PEAK_BF16_FLOPS: dict[str, float] = {
    # Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, per GPU. Matched against
    # torch.cuda.get_device_name() in this order, so the specific names come before "H100".
    "H200 NVL": 835e12,
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
}


def matmul_parameters(model: nn.Module) -> int:
    """``N``: parameters that are multiplied, not looked up (tied embeddings count once, as the head)."""
    tables = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    head_params = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    # model.parameters() yields a tied weight once; DeepSpeed ZeRO-3 keeps a partitioned parameter's
    # full size in ds_numel (its numel() is that of the local shard).
    return sum(
        int(getattr(p, "ds_numel", p.numel()))
        for p in model.parameters()
        if id(p) not in tables or id(p) in head_params
    )


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """``6 N + 12 L H Q T`` for a transformers causal LM (reads its config for L, H and Q)."""
    config: Any = model.config
    layers, heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 6.0 * matmul_parameters(model) + 12.0 * layers * heads * head_dim * seq_len


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """Peak FLOP/s of one device: the configured value, else the table's entry for this GPU, else None."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    return peak_for_device_name(torch.cuda.get_device_name(device))


def peak_for_device_name(name: str) -> float | None:
    """The table's bf16 peak for a GPU name such as "NVIDIA H100 80GB HBM3"; None if not listed."""
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def memory_gb(device: torch.device) -> float:
    """This process's memory in GiB: the GPU's peak allocation since the last call, or the process RSS.

    Both are host-side reads (the CUDA caching allocator's counters, /proc for RSS): no device sync.
    """
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**30


def mfu(flops_per_token: float, tokens_per_s: float, peak_per_device: float, world_size: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of every device of the job."""
    return flops_per_token * tokens_per_s / (peak_per_device * world_size)
