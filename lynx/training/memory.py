"""How much accelerator memory a training run needs per GPU under FSDP2, from first principles.

Parameters, gradients and optimizer state are counted on the real module definitions (built on the meta
device, so the 14B model costs nothing to inspect). Activations are *measured*, not guessed: one block of the
real width runs on meta tensors with autograd's saved-tensor hooks recording every tensor kept for backward;
attention is modelled as FlashAttention keeps it (q, k, v, output and the log-sum-exp, no score matrix). The
estimate excludes the CUDA context and allocator fragmentation (typically 1-3 GB more).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..constants import AdapterConfig, full_adapter_config
from ..models.adapters import Conditioning, adapter_config, adapter_parameters, conditioning, install_adapters
from ..models.resampler import Resampler
from .objective import PackedLynxAttnProcessor

GIB = 1024 ** 3
WAN_14B = dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, text_dim=4096,
               freq_dim=256, in_channels=16, out_channels=16)
TEXT_TOKENS, REFERENCE_TOKENS = 512, 256


def meta_model(transformer_kwargs: dict, adapter_config: AdapterConfig | None = None, dtype=torch.bfloat16):
    """The Wan transformer with the training Lynx processors installed, and the resampler, with shapes only
    (no memory)."""
    from diffusers import WanTransformer3DModel

    previous = torch.get_default_dtype()
    # Built directly in `dtype` (as FSDP will hold it), rather than cast afterwards.
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            transformer = WanTransformer3DModel(**transformer_kwargs)
            heads, head_dim = transformer_kwargs["num_attention_heads"], transformer_kwargs["attention_head_dim"]
            config = adapter_config or full_adapter_config(transformer_kwargs["num_layers"], heads * head_dim)
            install_adapters(transformer, config, PackedLynxAttnProcessor)
            resampler = Resampler(config.resampler)
    finally:
        torch.set_default_dtype(previous)
    return transformer, resampler


@dataclass
class ParameterCounts:
    backbone: int
    adapters: int
    block_backbone: int  # one transformer block
    block_adapters: int  # the ID + Ref layers of one block
    root: int  # what is not in a block: embedders, output head, resampler (unsharded all step)


def _count(params) -> int:
    return sum(p.numel() for p in params)


def parameter_counts(transformer, resampler) -> ParameterCounts:
    layers = _count(adapter_parameters(transformer))
    resampler_params = _count(resampler.parameters())
    block = transformer.blocks[0]
    # Averaged over blocks: lite adapters have ID layers on every second block only.
    block_adapters = layers // len(transformer.blocks)
    backbone = _count(transformer.parameters()) - layers
    block_backbone = _count(block.parameters()) - _count(adapter_parameters(block))
    return ParameterCounts(backbone, layers + resampler_params, block_backbone, block_adapters,
                           backbone - block_backbone * len(transformer.blocks) + resampler_params)


class _FlashLike(torch.autograd.Function):
    """Stands in for FlashAttention: keeps for backward exactly what it keeps (q, k, v, out, log-sum-exp)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out.flatten(2)

    @staticmethod
    def backward(ctx, grad):  # never run: only what is saved matters here
        raise NotImplementedError


def _flash_attention(query, key, value, kind, attend):
    return _FlashLike.apply(query, key, value)


def block_saved_bytes(transformer, tokens: int, samples: int = 1, dtype=torch.bfloat16) -> int:
    """Bytes autograd keeps between forward and backward for one adapted block on a pack of `samples` samples."""
    block, dim = transformer.blocks[0], transformer.config.num_attention_heads * transformer.config.attention_head_dim
    head_dim = transformer.config.attention_head_dim
    config = adapter_config(transformer)
    params = {id(p) for p in block.parameters()}
    for p in adapter_parameters(block):
        p.requires_grad_(True)
    saved = []

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            saved.append(t.numel() * t.element_size())
        return t

    meta = dict(device="meta", dtype=dtype)
    hidden = torch.empty(1, tokens, dim, **meta)
    text = torch.empty(samples, TEXT_TOKENS, dim, **meta)
    temb = torch.empty(1, tokens, 6, dim, **meta)
    rope = (torch.empty(1, tokens, 1, head_dim, device="meta"), torch.empty(1, tokens, 1, head_dim, device="meta"))
    cond = Conditioning(torch.empty(samples, config.resampler.num_queries, config.ip_input_dim, **meta),
                        [torch.empty(samples, REFERENCE_TOKENS, dim, **meta)] * len(transformer.blocks),
                        cache_kv=False, packing=_flash_attention)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), conditioning(block, cond):
        block(hidden, text, temb, rope)
    return sum(saved)


@dataclass
class ActivationModel:
    """Saved bytes of one block = per_token * tokens + per_sample * samples + constant (three measurements)."""

    per_token: float
    per_sample: float
    constant: float = 0.0

    def bytes(self, tokens: int, samples: int) -> float:
        return self.per_token * tokens + self.per_sample * samples + self.constant

    @classmethod
    def measure(cls, transformer, dtype=torch.bfloat16, tokens: int = 1024) -> "ActivationModel":
        one = block_saved_bytes(transformer, tokens, 1, dtype)
        per_token = (block_saved_bytes(transformer, 2 * tokens, 1, dtype) - one) / tokens
        per_sample = block_saved_bytes(transformer, tokens, 2, dtype) - one
        return cls(per_token, per_sample, one - per_token * tokens - per_sample)


def fsdp_memory_per_gpu(counts: ParameterCounts, activations: ActivationModel, *, gpus: int, tokens: int,
                        samples: int, blocks: int, hidden: int, gradient_checkpointing: bool = True,
                        backbone_bytes: int = 2, compute_bytes: int = 2, master_bytes: int = 4,
                        grad_bytes: int = 4, optimizer_bytes: int = 8, prefetch_units: int = 2) -> dict[str, float]:
    """Bytes per GPU, by kind, for one step of `tokens` video tokens in `samples` samples (FSDP over `gpus`).

    Sharded over the GPUs: the frozen bf16 backbone, the fp32 adapter masters, their fp32 gradients and AdamW's
    two fp32 moments. Unsharded: the root unit, and `prefetch_units` gathered blocks (the one running and the
    next, which FSDP prefetches) with their adapter gradients before reduce-scatter. Activations: with
    checkpointing, each block's input plus the shared per-token modulation, reference features of every block,
    and one block's saved tensors while it is recomputed; without, every block's saved tensors.
    """
    n = max(1, gpus)
    unit = counts.block_backbone + counts.block_adapters
    one_block = activations.bytes(tokens, samples)
    out = {
        "backbone (bf16, sharded)": counts.backbone * backbone_bytes / n,
        "adapter masters (fp32, sharded)": counts.adapters * master_bytes / n,
        "adapter gradients (fp32, sharded)": counts.adapters * grad_bytes / n,
        "AdamW moments (fp32, sharded)": counts.adapters * optimizer_bytes / n,
        "gathered units (bf16)": (prefetch_units * unit + counts.root) * compute_bytes if n > 1 else 0.0,
        "unsharded block gradients": prefetch_units * counts.block_adapters * (compute_bytes + grad_bytes)
        if n > 1 else 0.0,
        "reference features": blocks * samples * REFERENCE_TOKENS * hidden * compute_bytes,
    }
    if gradient_checkpointing:
        out["activations: block inputs"] = blocks * tokens * hidden * compute_bytes
        out["activations: per-token modulation"] = tokens * 6 * hidden * compute_bytes
        out["activations: one block recomputed"] = one_block
    else:
        out["activations: all blocks"] = blocks * one_block
    out["total"] = sum(out.values())
    return out


def describe(memory: dict[str, float]) -> str:
    return "\n".join(f"  {k:36s} {v / GIB:8.2f} GiB" for k, v in memory.items())


def fits(memory: dict[str, float], gpu_gib: float) -> bool:
    return memory["total"] / GIB <= gpu_gib and math.isfinite(memory["total"])
