"""The two Lynx adapters as attention processors on diffusers' own `WanTransformer3DModel`.

ID-adapter: in a block's cross-attention (`attn2`), a second attention from the block's query to the
identity tokens (+ optional learned registers); its output times `ip_scale` joins the text-attention
output before `to_out`. Ref-adapter: in a block's self-attention (`attn1`), a second attention from the
query (before RoPE) to that block's reference features; output times `ref_scale` joins before `to_out`.

diffusers calls `attn1(x, None, None, rope)` and `attn2(x, text, None, None)` with no room for extra
inputs, so per-call inputs travel through a `Conditioning` that the caller makes current with
`adapters.conditioning(...)` around a transformer call. The same processors, with no conditioning
active and a recorder set, capture the tensor that enters each self-attention: the reference features.
The adapter weights live in `LynxAdapters`, outside the transformer, so the base model's state dict
stays exactly diffusers' own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections
from safetensors.torch import save_file
from torch import nn

from ..constants import IP_LAYERS_FILE, REF_LAYERS_FILE, RESAMPLER_FILE, AdapterConfig, transformer_dims
from ..errors import InputError
from .resampler import Resampler


class IPLayer(nn.Module):
    """Key/value projections of the identity tokens for one block (keys `to_k_ip`, `to_v_ip`, `registers`)."""

    def __init__(self, in_dim: int, dim: int, bias: bool, num_registers: int = 0):
        super().__init__()
        self.to_k_ip = nn.Linear(in_dim, dim, bias=bias)
        self.to_v_ip = nn.Linear(in_dim, dim, bias=bias)
        self.registers = nn.Parameter(torch.randn(1, num_registers, in_dim) / dim ** 0.5) if num_registers else None


class RefLayer(nn.Module):
    """Key/value projections of one block's reference features (keys `to_k_ref`, `to_v_ref`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.to_k_ref = nn.Linear(dim, dim, bias=True)
        self.to_v_ref = nn.Linear(dim, dim, bias=True)


@dataclass
class Conditioning:
    """What one transformer call sees through the adapters. A tensor left as None switches its branch off.

    `ip_tokens`: [B or 1, N, ip_dim] identity tokens (resampler output).
    `ref_features`: one [B or 1, S, hidden] tensor per transformer block.
    With `cache_kv` the adapters' keys and values, which do not change between denoising steps, are
    computed once and kept here; use one Conditioning per distinct input and drop it after sampling.
    `attention` (packed training, lynx.training): several samples share one sequence, so every attention
    of the call (`kind` "self", "text", "ip" or "ref") goes through `attention(query, key, value, kind,
    attend)`, which keeps each sample's queries on its own keys; `attend` is the processor's dispatcher call.
    Cross-attention keys then come per sample ([n, ...]) and are not broadcast. None: plain attention.
    """

    ip_tokens: torch.Tensor | None = None
    ref_features: list[torch.Tensor] | None = None
    ip_scale: float = 1.0
    ref_scale: float = 1.0
    cache_kv: bool = True
    attention: Callable | None = None
    _kv: dict = field(default_factory=dict, repr=False)

    def kv(self, key, make):
        if not self.cache_kv:
            return make()
        if key not in self._kv:
            self._kv[key] = make()
        return self._kv[key]


class AdapterState:
    """The per-call channel between the caller and the processors of one transformer."""

    def __init__(self):
        self.active: Conditioning | None = None
        self.recorded: list[torch.Tensor] | None = None


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    # Weightless RMSNorm over the full width, in the input dtype, as the lite weights were trained with.
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps).to(x.dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same arithmetic, in the same order, as diffusers' Wan processor, so base outputs match bit for bit.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _batched(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 and batch > 1 else t


class LynxAttnProcessor:
    """Wan attention plus the Lynx branch of this block (ID branch in attn2, Ref branch in attn1).

    Without an active Conditioning it computes exactly what diffusers' `WanAttnProcessor` computes.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: AdapterState, block: int, ip_layer: IPLayer | None = None,
                 ref_layer: RefLayer | None = None, ip_key_norm: str = "block", ip_key_norm_eps: float = 1e-5):
        self.state, self.block = state, block
        self.ip_layer, self.ref_layer = ip_layer, ref_layer
        self.ip_key_norm, self.ip_key_norm_eps = ip_key_norm, ip_key_norm_eps

    def _attend(self, q, k, v, mask=None, parallel=None):
        out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=parallel)
        return out.flatten(2, 3).type_as(q)

    def _ip_kv(self, attn, tokens: torch.Tensor):
        layer = self.ip_layer
        if layer.registers is not None:
            tokens = torch.cat([tokens, layer.registers.to(tokens.dtype).expand(tokens.shape[0], -1, -1)], dim=1)
        k, v = layer.to_k_ip(tokens), layer.to_v_ip(tokens)
        k = attn.norm_k(k) if self.ip_key_norm == "block" else _rms(k, self.ip_key_norm_eps)
        return k.unflatten(2, (attn.heads, -1)), v.unflatten(2, (attn.heads, -1))

    def _ref_kv(self, attn, features: torch.Tensor):
        layer = self.ref_layer
        k = attn.norm_k(layer.to_k_ref(features))
        return k.unflatten(2, (attn.heads, -1)), layer.to_v_ref(features).unflatten(2, (attn.heads, -1))

    def _branch(self, cond: Conditioning, query, k, v, kind: str) -> torch.Tensor:
        if cond.attention is not None:  # packed samples: each query only sees its own sample's keys
            return cond.attention(query, k, v, kind, self._attend)
        batch = query.shape[0]
        return self._attend(query, _batched(k, batch), _batched(v, batch))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        is_self = encoder_hidden_states is None
        state = self.state
        if is_self and state.recorded is not None:
            state.recorded.append(hidden_states)

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        query_no_rope = query
        if rotary_emb is not None:
            query = _apply_rope(query, *rotary_emb)
            key = _apply_rope(key, *rotary_emb)

        cond = state.active
        if cond is not None and cond.attention is not None:
            out = cond.attention(query, key, value, "self" if is_self else "text", self._attend)
        else:
            out = self._attend(query, key, value, attention_mask, self._parallel_config if is_self else None)

        if cond is not None:
            if is_self and self.ref_layer is not None and cond.ref_features is not None and cond.ref_scale != 0:
                feats = cond.ref_features[self.block]
                k, v = cond.kv(("ref", self.block), lambda: self._ref_kv(attn, feats.to(query.dtype)))
                out = out + cond.ref_scale * self._branch(cond, query_no_rope, k, v, "ref")
            if not is_self and self.ip_layer is not None and cond.ip_tokens is not None and cond.ip_scale != 0:
                k, v = cond.kv(("ip", self.block), lambda: self._ip_kv(attn, cond.ip_tokens.to(query.dtype)))
                out = out + cond.ip_scale * self._branch(cond, query, k, v, "ip")

        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class LynxAdapters(nn.Module):
    """Resampler + ID layers (+ Ref layers for `full`), with the official file names and key layout."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.resampler = Resampler(config.resampler)
        self.ip_layers = nn.ModuleDict({
            str(i): IPLayer(config.ip_input_dim, config.hidden_dim, config.ip_bias, config.num_registers)
            for i in range(len(config.ip_blocks))
        })
        self.ref_layers = nn.ModuleDict(
            {str(i): RefLayer(config.hidden_dim) for i in range(config.num_blocks)} if config.use_ref else {})
        self.state = AdapterState()
        self.installed = False  # a flag, not the module: a module attribute would adopt the transformer

    @property
    def variant(self) -> str:
        return self.config.variant

    # ----- weights ---------------------------------------------------------------------------------
    def zero_init_(self) -> "LynxAdapters":
        """Zero the ID/Ref value projections so the adapted model starts as the base model (spec, training)."""
        with torch.no_grad():
            for layer in self.ip_layers.values():
                for p in layer.to_v_ip.parameters():
                    p.zero_()
            for layer in self.ref_layers.values():
                for p in layer.to_v_ref.parameters():
                    p.zero_()
        return self

    def save_pretrained(self, directory) -> None:
        """Write the three official files (two for lite); loadable by the authors' code and ours."""
        from pathlib import Path

        from ..io.files import atomic_write

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {RESAMPLER_FILE: self.resampler.state_dict(), IP_LAYERS_FILE: self.ip_layers.state_dict()}
        if self.config.use_ref:
            files[REF_LAYERS_FILE] = self.ref_layers.state_dict()
        for name, sd in files.items():
            sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
            atomic_write(directory / name, lambda p, sd=sd: save_file(sd, str(p), metadata={"format": "pt"}))

    # ----- wiring into a transformer -----------------------------------------------------------------
    def install(self, transformer: nn.Module) -> None:
        """Give each block of `transformer` its Lynx processors (kept: any attention backend already set)."""
        blocks = transformer.blocks
        num_blocks, width = transformer_dims(transformer.config)
        if (num_blocks, width) != (self.config.num_blocks, self.config.hidden_dim):
            raise InputError(
                f"these {self.variant} adapters were made for a transformer with {self.config.num_blocks} blocks "
                f"of width {self.config.hidden_dim}; this one has {num_blocks} blocks of width {width}")
        if blocks[0].attn2.add_k_proj is not None:
            raise InputError("Lynx adapters expect the text-to-video Wan2.1 base; this transformer has image "
                             "conditioning (an I2V model). Use Wan2.1-T2V-14B in diffusers layout.")
        ip_of_block = {b: self.ip_layers[str(i)] for i, b in enumerate(self.config.ip_blocks)}
        for index, block in enumerate(blocks):
            ref_layer = self.ref_layers[str(index)] if self.config.use_ref else None
            self._set(block.attn1, LynxAttnProcessor(self.state, index, ref_layer=ref_layer))
            self._set(block.attn2, LynxAttnProcessor(self.state, index, ip_layer=ip_of_block.get(index),
                                                     ip_key_norm=self.config.ip_key_norm,
                                                     ip_key_norm_eps=self.config.ip_key_norm_eps))
        self.installed = True

    @staticmethod
    def _set(attn, processor) -> None:
        old = attn.processor
        for name in ("_attention_backend", "_parallel_config"):
            if name in vars(old):
                setattr(processor, name, getattr(old, name))
        attn.set_processor(processor)

    @staticmethod
    def uninstall(transformer: nn.Module) -> None:
        """Give every attention back diffusers' own processor."""
        for block in transformer.blocks:
            for attn in (block.attn1, block.attn2):
                if isinstance(attn.processor, LynxAttnProcessor):
                    LynxAdapters._set(attn, WanAttnProcessor())

    # ----- per-call inputs -------------------------------------------------------------------------
    @contextlib.contextmanager
    def conditioning(self, cond: Conditioning | None):
        """Make `cond` what the processors read during the transformer calls inside the block."""
        previous, self.state.active = self.state.active, cond
        try:
            yield cond
        finally:
            self.state.active = previous

    @contextlib.contextmanager
    def recording(self):
        """Collect, per block, the tensor entering self-attention; all adapter branches are off meanwhile."""
        if not self.installed or not self.config.use_ref:
            raise InputError("reference features need installed full (Ref-adapter) adapters")
        previous = (self.state.active, self.state.recorded)
        self.state.active, self.state.recorded = None, []
        try:
            yield self.state.recorded
        finally:
            self.state.active, self.state.recorded = previous

    def identity_tokens(self, embedding: torch.Tensor) -> torch.Tensor:
        """[B, 512] or [B, 1, 512] face embedding -> [B, Q, ip_dim] identity tokens."""
        p = next(self.resampler.parameters())
        return self.resampler(embedding.to(device=p.device, dtype=p.dtype))
