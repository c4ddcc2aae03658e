"""Perceiver Resampler: one 512-d ArcFace embedding -> a few identity tokens for the ID-adapter.

Parameter names follow the released `resampler.safetensors` (IP-Adapter layout), so the file
loads with `strict=True`: `latents`, `proj_in`, `layers.{i}.0.*` (attention), `layers.{i}.1.*`
(feed-forward), `proj_out`, `norm_out`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..constants import ResamplerConfig
from ..errors import CheckpointError


class PerceiverAttention(nn.Module):
    """Latent queries attend to [inputs; latents]; no biases, softmax in float32."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2) for t in (q, k, v))
        # Scaling q and k separately by dim_head^-0.25 (not the product) is what the weights saw.
        scale = self.dim_head ** -0.25
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = (weight @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class Resampler(nn.Module):
    """Perceiver Resampler (IP-Adapter layout): a 512-d face embedding -> `num_queries` identity tokens."""

    def __init__(self, config: ResamplerConfig = ResamplerConfig()):
        super().__init__()
        self.config = config
        c = config
        self.latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) / c.dim ** 0.5)
        self.proj_in = nn.Linear(c.embedding_dim, c.dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(c.dim, c.dim_head, c.heads), _feed_forward(c.dim, c.ff_mult)])
            for _ in range(c.depth)
        )
        self.proj_out = nn.Linear(c.dim, c.output_dim)
        self.norm_out = nn.LayerNorm(c.output_dim)

    # diffusers' pipelines read these of every component (`pipe.device`, `pipe.dtype`).
    @property
    def device(self) -> torch.device:
        return self.latents.device

    @property
    def dtype(self) -> torch.dtype:
        return self.latents.dtype

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """[B, 1, 512] (or [B, 512]) face embedding -> [B, num_queries, output_dim] tokens."""
        if embedding.ndim == 2:
            embedding = embedding[:, None]
        x = self.proj_in(embedding)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def resampler_config_from_state_dict(state: dict[str, torch.Tensor], heads: int | None = None,
                                     source: str = "resampler state dict") -> ResamplerConfig:
    """Read every size the shapes reveal; the head split is not visible in shapes, so it is
    taken from `heads` or, failing that, from the released dim_head of 64."""
    try:
        _, num_queries, dim = state["latents"].shape
        embedding_dim = state["proj_in.weight"].shape[1]
        output_dim = state["proj_out.weight"].shape[0]
        depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
        inner = state["layers.0.0.to_q.weight"].shape[0]
        ff_inner = state["layers.0.1.1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"{source} is not a Lynx resampler: missing or misshaped entry {e}. Expected keys "
            "'latents' [1, Q, D], 'proj_in.weight', 'layers.N.0.to_q.weight', 'proj_out.weight', ..."
        ) from None
    default = ResamplerConfig()
    if heads is None:
        dim_head = default.dim_head if inner % default.dim_head == 0 else inner
        heads = inner // dim_head
    else:
        dim_head = inner // heads
    return ResamplerConfig(dim=dim, depth=depth, heads=heads, dim_head=dim_head, num_queries=num_queries,
                           embedding_dim=embedding_dim, output_dim=output_dim, ff_mult=ff_inner // dim)
