"""The two Lynx adapters as attention processors that own their weights, inside diffusers' Wan transformer.

ID-adapter: in a block's cross-attention (`attn2`), a second attention from the block's query to the
identity tokens (+ optional learned registers); its output times `ip_scale` joins the text-attention
output before `to_out`. Ref-adapter: in a block's self-attention (`attn1`), a second attention from the
query (before RoPE) to that block's reference features; output times `ref_scale` joins before `to_out`.

As with diffusers' IP-Adapter processors, each processor is an `nn.Module` set with `attn.set_processor`,
so its weights are parameters of the transformer (`blocks.{b}.attn2.processor.to_k_ip.weight`, ...):
`.to()`, every diffusers offloading mode, layerwise casting and FSDP see them with no Lynx-specific code.
The released files load and save unchanged through a key map (`{i}.to_k_ip.weight` <-> block `ip_blocks[i]`).

diffusers' blocks call `attn1(x, None, None, rope)` and `attn2(x, text, None, None)` with no room for
extra inputs, so per-call inputs reach the processors as attributes that `conditioning(transformer, cond)`
sets around a transformer call. A processor's forward reads nothing per block (no index, no dict), so one
compiled block serves all blocks and all steps. The adapters' keys and values, which do not change between
denoising steps, are computed inside the first call (where offloading hooks have put the weights on the
device) and kept in the `Conditioning` for the calls after it; so are the text cross-attention's keys and values,
once per prompt, when the conditionings of a generation share a `text_kv` store.

Compiled blocks (`fixed_graph`, set by `lynx.pipelines.speed.compile_transformer`) see one graph per generation:
the reference passes and a call that fills those caches run uncompiled, and scales reach the processors as
tensors, never as numbers torch.compile would specialise on, with a branch outside its window kept in the graph
at scale 0.
"""

from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections
from torch import nn

from ..constants import IP_LAYERS_FILE, REF_LAYERS_FILE, AdapterConfig, transformer_dims
from ..errors import InputError
from .context_parallel import cpu_ring_attention, needs_cpu_ring, whole_sequence


@dataclass
class Conditioning:
    """What one transformer call sees through the adapters. A tensor left as None switches its branch off.

    Args:
        ip_tokens: [B or 1, N, ip_dim] identity tokens (the resampler's output).
        ref_features: one [B or 1, S, hidden] tensor per transformer block (`reference_features`).
        ip_scale, ref_scale: weights of the two branches' outputs; 0 switches a branch off.
        cache_kv: keep the adapters' keys and values after the first call (inference); off in training,
            where they depend on weights that change. Use one Conditioning per distinct input.
        packing: training only: how several samples share one sequence (see `lynx.training.objective`).
        ref_blocks: the blocks whose Ref branch is on (None: every block).
        text_kv: a dict shared by the conditionings of one generation: the cross-attention keys and values of
            each prompt are computed at its first call and reused (None: computed at every call, as diffusers).
    """

    ip_tokens: torch.Tensor | None = None
    ref_features: list[torch.Tensor] | None = None
    ip_scale: float = 1.0
    ref_scale: float = 1.0
    cache_kv: bool = True
    packing: object | None = None
    ref_blocks: frozenset[int] | None = None
    text_kv: dict | None = field(default=None, repr=False)
    _kv: dict = field(default_factory=dict, repr=False)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    # Weightless RMSNorm over the full width, in the input dtype, as the lite weights were trained with.
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps).to(x.dtype)


class LynxRegisters(nn.Module):
    """Learned tokens appended to the identity tokens (`registers` [1, n, ip_dim] in the released files).

    A module of their own, called in the forward, rather than a Parameter on the processor: offloading hooks
    (accelerate's sequential offload, diffusers' leaf-level group offloading) attach to every module that holds
    parameters directly and move that module's call arguments to the device. The processor's first argument is
    the attention module itself, so a hook on the processor would move (or, with weights on the meta device,
    fail to move) the whole attention; here the hooked module receives only the token tensor.
    """

    def __init__(self, num: int, dim: int, std: float):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(1, num, dim) * std)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens.to(source.dtype).expand(source.shape[0], -1, -1)
        return torch.cat([source, tokens], dim=1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same arithmetic, in the same order, as diffusers' Wan processor, so base outputs match bit for bit.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class LynxAttnProcessor(nn.Module):
    """Wan attention plus this attention's Lynx branch, owning the branch's weights.

    In a self-attention (`branch="ref"`): `to_k_ref`, `to_v_ref` (Linear hidden->hidden, bias).
    In a cross-attention (`branch="ip"`): `to_k_ip`, `to_v_ip` (Linear ip_dim->hidden) and, when the
    release has them, `registers` (`LynxRegisters`, [1, n, ip_dim]) appended to the identity tokens; keys normalised
    by the block's `norm_k` (`key_norm="block"`, full) or a weightless RMSNorm over the width (`"rms"`, lite).
    `branch=None`: no weights; exactly diffusers' `WanAttnProcessor` (lite's odd blocks and self-attentions).

    Per-call inputs, set by `conditioning` / `recording` (never by hand): `source` (the branch's tokens or
    this block's features), `kv` (their keys and values once computed), `scale`, `text_kv` (a cross-attention's
    keys and values of the call's prompt once computed) and `keep_text` (compute and keep them), `record` /
    `recorded`.

    `cross`: this processor is a block's cross-attention (`attn2`; set by `install_adapters`). `fixed_graph`: a
    branch is bound whatever its scale (0 included: outside its window or its blocks) and the scale is a 0-d
    tensor, so torch.compile sees the same graph for every scale, window and block choice (set for compiled
    blocks; off, a branch at scale 0 is skipped).
    """

    _attention_backend = None
    _parallel_config = None
    # The attributes one call's inputs live in (saved and restored around nested `conditioning` blocks).
    call_attributes: tuple[str, ...] = ("source", "kv", "scale", "text_kv", "keep_text")
    text_kv, keep_text = None, False
    cross, fixed_graph = False, False

    def __init__(self, block: int, branch: str | None = None, hidden_dim: int = 0, in_dim: int | None = None,
                 bias: bool = True, num_registers: int = 0, key_norm: str = "block", key_norm_eps: float = 1e-5):
        super().__init__()
        if branch not in (None, "ip", "ref"):
            raise ValueError(f"branch must be None, 'ip' or 'ref', not {branch!r}")
        self.block, self.branch = block, branch
        self.key_norm, self.key_norm_eps = key_norm, key_norm_eps
        if branch is not None:
            in_dim = in_dim or hidden_dim
            setattr(self, f"to_k_{branch}", nn.Linear(in_dim, hidden_dim, bias=bias))
            setattr(self, f"to_v_{branch}", nn.Linear(in_dim, hidden_dim, bias=bias))
        self.registers = (LynxRegisters(num_registers, in_dim, hidden_dim ** -0.5)
                          if branch == "ip" and num_registers else None)
        self.unbind()
        self.record, self.recorded = False, None

    # ----- per-call state ------------------------------------------------------------------------------
    def set_call(self, **values) -> None:
        """Set per-call inputs (`call_attributes`). They are tensors, tuples and numbers, never parameters or
        modules, so they go straight into the instance's dict, past nn.Module's checks: `conditioning` sets them
        on every processor around every transformer call, and those checks were most of its cost."""
        self.__dict__.update(values)

    def bind(self, cond: Conditioning) -> None:
        """Take this processor's inputs from `cond` (cached keys/values included)."""
        self.unbind()
        if self.branch == "ip" and cond.ip_tokens is not None:
            source, scale = cond.ip_tokens, float(cond.ip_scale)
        elif self.branch == "ref" and cond.ref_features is not None:
            chosen = cond.ref_blocks is None or self.block in cond.ref_blocks
            source, scale = cond.ref_features[self.block], float(cond.ref_scale) if chosen else 0.0
        else:
            return
        if self.fixed_graph:
            self.set_call(source=source, scale=_scale_tensor(self.branch, scale, source.device))
        elif scale != 0:
            self.set_call(source=source, scale=scale)
        if self.source is not None and cond.cache_kv:
            self.set_call(kv=cond._kv.get((self.block, self.branch)))

    def unbind(self, cond: Conditioning | None = None) -> None:
        """Hand computed keys/values back to `cond` (when it caches them) and forget the call's inputs."""
        if cond is not None and cond.cache_kv and getattr(self, "kv", None) is not None:
            cond._kv[(self.block, self.branch)] = self.kv
        self.set_call(source=None, kv=None, scale=1.0)

    # ----- maths ---------------------------------------------------------------------------------------
    def attend(self, query, key, value, mask=None, kind: str = "self") -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v through diffusers' dispatcher; `kind` is "self", "text", "ip" or "ref".

        Keys of batch 1 serve every query of the batch (the same identity for each guidance branch).
        """
        batch = query.shape[0]
        if key.shape[0] == 1 and batch > 1:
            key, value = key.expand(batch, *key.shape[1:]), value.expand(batch, *value.shape[1:])
        # Only the self-attention runs context parallel: the other kinds attend from the local queries to keys
        # that every rank holds whole (text, identity tokens, reference features).
        parallel = self._parallel_config if kind == "self" else None
        if needs_cpu_ring(query, parallel):
            out = cpu_ring_attention(query, key, value, mask, parallel)
        else:
            out = dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=parallel)
        return out.flatten(2, 3).type_as(query)

    def branch_kv(self, attn, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the branch's tokens, [B, N, heads, head_dim] each."""
        if self.branch == "ref":
            k, v = attn.norm_k(self.to_k_ref(source)), self.to_v_ref(source)
        else:
            if self.registers is not None:
                source = self.registers(source)
            k, v = self.to_k_ip(source), self.to_v_ip(source)
            k = attn.norm_k(k) if self.key_norm == "block" else _rms(k, self.key_norm_eps)
        return k.unflatten(2, (attn.heads, -1)), v.unflatten(2, (attn.heads, -1))

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if self.record:  # the reference pass keeps what enters self-attention
            self.recorded = hidden_states
        if encoder_hidden_states is not None and self.text_kv is not None:  # this prompt's K/V, computed before
            query, (key, value) = attn.to_q(hidden_states), self.text_kv
        else:
            query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))
            if encoder_hidden_states is not None and self.keep_text:
                self.text_kv = (key, value)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        plain_query = query  # the adapter branches attend without RoPE
        if rotary_emb is not None:
            query = _apply_rope(query, *rotary_emb)
            key = _apply_rope(key, *rotary_emb)
        out = self.attend(query, key, value, attention_mask, "self" if encoder_hidden_states is None else "text")
        if self.source is not None:
            if self.kv is None:
                self.kv = self.branch_kv(attn, self.source.to(query.dtype))
            k, v = self.kv
            extra = self.attend(plain_query, k, v, None, self.branch)
            # At scale 1 (the authors' default) the product is exact, so skipping it changes no bit and saves
            # one pass over a [batch, tokens, width] tensor per branch and block (the size of the video); a
            # tensor scale (`fixed_graph`) is always multiplied, inside the same fused kernel when compiled.
            unit = isinstance(self.scale, float) and self.scale == 1.0
            out = out + extra if unit else out + self.scale * extra
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


@lru_cache(maxsize=64)
def _scale_tensor(branch: str, scale: float, device: torch.device) -> torch.Tensor:
    """A `fixed_graph` branch's scale as a 0-d float32 tensor on `device`, made once per branch, value and device.
    Per branch: were the ip and ref scales of a block one tensor when equal, torch.compile would guard on that."""
    return torch.tensor(scale, dtype=torch.float32, device=device)


# ----- installing into a transformer ---------------------------------------------------------------------
def install_adapters(transformer: nn.Module, config: AdapterConfig,
                     processor_class: type[LynxAttnProcessor] = LynxAttnProcessor) -> None:
    """Give every attention of `transformer` a Lynx processor shaped by `config` (weights as the current
    default device makes them: use `torch.device("meta")` before loading files). The attention backend and
    parallel settings of the processors they replace are kept."""
    num_blocks, width = transformer_dims(transformer.config)
    if (num_blocks, width) != (config.num_blocks, config.hidden_dim):
        raise InputError(
            f"these {config.variant} adapters were made for a transformer with {config.num_blocks} blocks "
            f"of width {config.hidden_dim}; this one has {num_blocks} blocks of width {width}")
    if transformer.blocks[0].attn2.add_k_proj is not None:
        raise InputError("Lynx adapters expect the text-to-video Wan2.1 base; this transformer has image "
                         "conditioning (an I2V model). Use Wan2.1-T2V-14B in diffusers layout.")
    for index, block in enumerate(transformer.blocks):
        ref = processor_class(index, "ref", width) if config.use_ref else processor_class(index)
        ip = (processor_class(index, "ip", width, config.ip_input_dim, config.ip_bias, config.num_registers,
                              config.ip_key_norm, config.ip_key_norm_eps)
              if index in config.ip_blocks else processor_class(index))
        ip.cross = True
        _set_processor(block.attn1, ref)
        _set_processor(block.attn2, ip)
    transformer.lynx_config = config


def uninstall_adapters(transformer: nn.Module) -> None:
    """Give every attention back diffusers' own processor; the adapter weights leave the model."""
    for block in transformer.blocks:
        for attn in (block.attn1, block.attn2):
            if isinstance(attn.processor, LynxAttnProcessor):
                _set_processor(attn, WanAttnProcessor())
    transformer.lynx_config = None


def _set_processor(attn, processor) -> None:
    old = attn.processor
    for name in ("_attention_backend", "_parallel_config"):
        if name in vars(old):
            setattr(processor, name, getattr(old, name))
    attn.set_processor(processor)


def adapter_config(transformer: nn.Module) -> AdapterConfig | None:
    """The `AdapterConfig` of the adapters installed in `transformer`, or None."""
    return getattr(transformer, "lynx_config", None)


def processors(module: nn.Module) -> Iterator[LynxAttnProcessor]:
    """Every Lynx processor inside `module` (a transformer or a block), block by block, self-attention first."""
    blocks = getattr(module, "blocks", None)
    if blocks is None and hasattr(module, "attn1"):
        blocks = (module,)
    if blocks is not None and all(hasattr(b, "attn1") and hasattr(b, "attn2") for b in blocks):
        # Wan's processors live only in attn1/attn2 of each block: read them there rather than walk every module
        # (a walk is most of what `conditioning` costs per transformer call).
        return (a.processor for b in blocks for a in (b.attn1, b.attn2) if isinstance(a.processor, LynxAttnProcessor))
    return (m for m in module.modules() if isinstance(m, LynxAttnProcessor))


def zero_init_(transformer: nn.Module) -> None:
    """Zero the ID/Ref value projections so the adapted model starts as the base model (spec, training)."""
    with torch.no_grad():
        for proc in processors(transformer):
            if proc.branch is not None:
                for p in getattr(proc, f"to_v_{proc.branch}").parameters():
                    p.zero_()


@contextlib.contextmanager
def plain_state_dict(transformer: nn.Module):
    """Within the block, `transformer` has diffusers' processors, so its state dict (and `save_pretrained`)
    is exactly the base model's; the Lynx processors come back afterwards."""
    saved = [(attn, attn.processor) for block in transformer.blocks for attn in (block.attn1, block.attn2)
             if isinstance(attn.processor, LynxAttnProcessor)]
    config = adapter_config(transformer)
    for attn, _ in saved:
        _set_processor(attn, WanAttnProcessor())
    try:
        yield transformer
    finally:
        for attn, proc in saved:
            _set_processor(attn, proc)
        transformer.lynx_config = config


# ----- per-call inputs -------------------------------------------------------------------------------------
# Transformer calls with adapter inputs are serialised: two threads may share one pipeline, and each call
# sees only its own conditioning. (A ContextVar would be the lock-free way, but torch.compile cannot trace it.)
_CALL_LOCK = threading.RLock()


@contextlib.contextmanager
def conditioning(module: nn.Module, cond: Conditioning | None, text: torch.Tensor | None = None):
    """Make `cond` what the Lynx processors inside `module` (the transformer, or one block) read during the
    calls inside the `with` block; None switches every branch off.

    `text`: the prompt embedding the calls get; with `cond.text_kv`, its cross-attention keys and values are
    kept there at the first call and reused by every later call with the same tensor.
    """
    procs = list(processors(module))
    text_kv = None
    if cond is not None and cond.text_kv is not None and text is not None:
        # Keyed by the tensor itself (kept alive in the entry, so its id cannot be reused by another).
        entry = cond.text_kv.get(id(text))
        if entry is None or entry[0] is not text:
            entry = cond.text_kv[id(text)] = (text, {})
        text_kv = entry[1]
    with _CALL_LOCK:
        saved = [(p, {a: getattr(p, a) for a in p.call_attributes}) for p in procs]
        # A call that computes keys/values to keep runs once per conditioning and prompt: compiled blocks run it
        # uncompiled, so their one graph is that of the calls after it, which read the kept ones.
        fills = False
        for p in procs:
            if cond is None:
                p.unbind()
            else:
                p.bind(cond)
            p.set_call(keep_text=text_kv is not None, text_kv=text_kv.get(p) if text_kv is not None else None)
            fills = fills or p.fixed_graph and ((p.source is not None and p.kv is None and cond.cache_kv)
                                                or (p.cross and p.keep_text and p.text_kv is None))
        try:
            with torch.compiler.set_stance("force_eager") if fills else contextlib.nullcontext():
                yield cond
        finally:
            for p, previous in saved:
                p.unbind(cond)
                if text_kv is not None and p.text_kv is not None:
                    text_kv[p] = p.text_kv
                p.set_call(**previous)


@contextlib.contextmanager
def recording(transformer: nn.Module):
    """Collect, per block, the tensor entering self-attention; every adapter branch is off meanwhile.

    The list given by the `with` statement is filled when the block ends, in block order."""
    config = adapter_config(transformer)
    if config is None or not config.use_ref:
        raise InputError("reference features need installed full (Ref-adapter) adapters")
    selfs = [block.attn1.processor for block in transformer.blocks]
    recorded: list[torch.Tensor] = []
    # Compiled blocks run the reference passes uncompiled: 256 tokens, under 1 % of a denoising pass at the real
    # size, where a graph of their own would cost a whole compilation.
    eager = any(p.fixed_graph for p in selfs)
    with conditioning(transformer, None), \
            torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
        for p in selfs:
            p.record, p.recorded = True, None
        try:
            yield recorded
            # Under context parallelism each rank saw a shard of the sequence: every rank gets it whole.
            recorded.extend(whole_sequence(p.recorded, p._parallel_config) for p in selfs if p.recorded is not None)
        finally:
            for p in selfs:
                p.record, p.recorded = False, None


# ----- the released key layout -----------------------------------------------------------------------------
_MODEL_KEY = re.compile(r"^blocks\.(\d+)\.attn([12])\.processor\.(.+)$")
# Names that differ between a released file and the processor (file name -> name under the processor).
_RENAMED = {"registers": "registers.tokens"}
_UNRENAMED = {v: k for k, v in _RENAMED.items()}


def official_state_dicts(transformer: nn.Module, state: dict[str, torch.Tensor] | None = None
                         ) -> dict[str, dict[str, torch.Tensor]]:
    """The per-block adapter weights of `transformer` (or of its full `state` dict, e.g. gathered from FSDP
    shards) under the released file names and keys: `ip_layers` `{i}.to_k_ip.weight`, `ref_layers` ..."""
    config = adapter_config(transformer)
    if config is None:
        raise InputError("this transformer has no Lynx adapters installed")
    ip_index = {b: i for i, b in enumerate(config.ip_blocks)}
    files: dict[str, dict[str, torch.Tensor]] = {IP_LAYERS_FILE: {}}
    if config.use_ref:
        files[REF_LAYERS_FILE] = {}
    for key, value in (transformer.state_dict() if state is None else state).items():
        m = _MODEL_KEY.match(key)
        if m is None:
            continue
        block, attn, name = int(m.group(1)), m.group(2), _UNRENAMED.get(m.group(3), m.group(3))
        if attn == "1":
            files[REF_LAYERS_FILE][f"{block}.{name}"] = value
        else:
            files[IP_LAYERS_FILE][f"{ip_index[block]}.{name}"] = value
    return files


def model_keys(config: AdapterConfig, file_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released file's keys (`{i}.to_k_ip.weight`) as the transformer names them
    (`blocks.{ip_blocks[i]}.attn2.processor.to_k_ip.weight`)."""
    out = {}
    for key, value in state.items():
        index, _, name = key.partition(".")
        name = _RENAMED.get(name, name)
        if file_name == IP_LAYERS_FILE:
            out[f"blocks.{config.ip_blocks[int(index)]}.attn2.processor.{name}"] = value
        else:
            out[f"blocks.{int(index)}.attn1.processor.{name}"] = value
    return out


def adapter_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The adapter parameters inside `module` (what training optimises besides the resampler)."""
    for proc in processors(module):
        yield from proc.parameters()
