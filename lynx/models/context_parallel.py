"""What the Lynx processors need to run under diffusers' context parallelism (one video sequence over many ranks).

diffusers' hooks split Wan's video sequence at block 0 and gather it at `proj_out`; its dispatcher runs the
self-attention as Ulysses (all-to-all of heads) or ring attention (key/value chunks merged by log-sum-exp).
The Lynx branches need nothing from it: each attends from the rank's local queries to keys that are whole
on every rank (identity tokens, reference features), and softmax rows are independent, so a shard of
queries gets exactly its rows of the one-rank result. Two things do need care, and live here:

- the reference pass records, per block, what enters self-attention: under context parallelism each rank
  holds only its shard of the 256 reference tokens, so the shards are gathered (`whole_sequence`);
- diffusers' ring attention merges partial results by their log-sum-exp, which none of its backends gives on
  the CPU; `cpu_ring_attention` runs diffusers' own ring (and Ulysses+ring) with torch's CPU flash kernel,
  which returns it, so the CPU tests and CPU clusters can run ring attention.
"""

from __future__ import annotations

import torch
from diffusers.hooks.context_parallel import EquipartitionSharder
from diffusers.models.attention_dispatch import _templated_context_parallel_attention
from torch.distributed._functional_collectives import AsyncCollectiveTensor


def whole_sequence(x: torch.Tensor, parallel_config) -> torch.Tensor:
    """The whole sequence (dim 1) of `x`, a rank's shard as diffusers' context-parallel hooks cut it
    (`parallel_config` None: `x` is already whole)."""
    if parallel_config is None or parallel_config.context_parallel_config is None:
        return x
    whole = EquipartitionSharder.unshard(x, 1, parallel_config.context_parallel_config._flattened_mesh)
    # A functional collective's result is waited for lazily; these are kept for the whole video, so wait now.
    return whole.wait() if isinstance(whole, AsyncCollectiveTensor) else whole


def _cpu_flash_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    # The op diffusers' templated ring/Ulysses functions call, in their [B, S, H, D] layout. The kernel is the
    # one scaled_dot_product_attention picks on the CPU, so the per-chunk arithmetic is the one-rank arithmetic.
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p, is_causal,
        attn_mask=attn_mask, scale=scale)
    out = out.transpose(1, 2)
    return (out, lse.transpose(1, 2)) if return_lse else out


def _no_backward_op(ctx, grad_out, *args, **kwargs):
    raise NotImplementedError("ring attention on the CPU is for inference; train with FSDP (lynx train)")


def cpu_ring_attention(query, key, value, attn_mask, parallel_config) -> torch.Tensor:
    """diffusers' context-parallel attention (ring, or Ulysses+ring) over CPU tensors [B, S_local, H, D]."""
    return _templated_context_parallel_attention(
        query, key, value, attn_mask, 0.0, False, None, False, False,
        forward_op=_cpu_flash_forward_op, backward_op=_no_backward_op, _parallel_config=parallel_config)


def needs_cpu_ring(query: torch.Tensor, parallel_config) -> bool:
    """Whether this self-attention is a ring over CPU tensors, which diffusers' backends cannot run."""
    return (parallel_config is not None and query.device.type == "cpu"
            and parallel_config.context_parallel_config is not None
            and parallel_config.context_parallel_config.ring_degree > 1)
