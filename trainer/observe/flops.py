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

The attention term takes no causal discount: ``12 L H Q T`` counts the full ``T x T`` score and value
products, although a causal mask (and a fused kernel such as FlashAttention) skips about half of them.
This is PaLM's appendix B and nanoGPT's ``estimate_mfu``; a tool that halves the term for causal
attention (``6 L H Q T``) reports a lower MFU for the same run, most visibly at long sequences.

The peak is the device's dense (no 2:4 sparsity) bf16 tensor-core rate from its vendor's data sheet
(:data:`PEAK_BF16_FLOPS`), whatever ``train.precision`` is: an fp32 run's MFU is against the bf16 peak.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PEAK_BF16_FLOPS: dict[str, float] = {
    # Dense (no sparsity) bf16 tensor-core peaks per GPU from the vendors' data sheets (their headline
    # figures are often with 2:4 sparsity, twice these). Matched as substrings of
    # torch.cuda.get_device_name() in this order, so the specific names come first ("H100 NVL" before
    # "H100"). Sources:
    # - H100, H200: nvidia.com/en-us/data-center/h100/ and /h200/ (989.4 TFLOPS SXM, 835 NVL, 756 PCIe).
    # - A100: nvidia.com/en-us/data-center/a100/ (312 TFLOPS).
    # - B200: NVIDIA Blackwell data sheet (nvdam.widen.net/s/wwnsxrhm2w/blackwell-datasheet-3384703),
    #   HGX B200: 4.5 PFLOPS FP16/BF16 with sparsity per GPU, so 2.25 PFLOPS dense. A GB200 matches
    #   "B200" too, though its own sheet says 2.5 PFLOPS dense: set logger.peak_flops there.
    # - MI300X: amd.com/en/products/accelerators/instinct/mi300/mi300x.html, peak BF16 1307.4 TFLOPS
    #   dense (2614.9 with sparsity); ROCm builds of torch report it through torch.cuda as well.
    # - L40S: NVIDIA L40S data sheet, BF16 Tensor Core 362.05 TFLOPS dense (733 with sparsity).
    "H200 NVL": 835e12,
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "B200": 2.25e15,
    "MI300X": 1307.4e12,
    "L40S": 362.05e12,
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
