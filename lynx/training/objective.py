"""The training objective: Wan's flow matching on packed, variable-size samples through the adapted transformer.

One step sees a *pack*: several samples (images as one-frame videos, or clips of any bucket) whose video
tokens are concatenated into one sequence, each with its own timestep, caption, identity tokens and
reference features. Every block is diffusers' own `WanTransformerBlock`, fed a per-token modulation
([1, S, 6, D], the path diffusers has for Wan2.2 ti2v) so each token is modulated by its own sample's
timestep; every attention is confined to its sample by `PackedAttention`, which the training processors
(`PackedLynxAttnProcessor`) call through `Conditioning.packing`. Run one by one through the plain diffusers
forward, the same samples
give the same loss and gradients (tests/test_train_objective.py).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.distributed._composable import checkpoint as composable_checkpoint

from ..errors import InputError
from ..models.adapters import Conditioning, LynxAttnProcessor, adapter_config, conditioning, processors
from ..pipelines.reference import reference_features
from .config import ATTENTION_MODES


# ----- flow matching -------------------------------------------------------------------------------------------
def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Map uniform samples in [0, 1) to noise levels with the flow shift the base samples with (SD3/Wan rule)."""
    return shift * u / (1 + (shift - 1) * u)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float):
    """The straight path between data (sigma 0) and noise (sigma 1), and the velocity the model must predict."""
    return (1 - sigma) * x0 + sigma * noise, noise - x0


def pack_seed(seed: int, pack_index: int) -> int:
    """Each pack draws its randomness from its own stream, so results do not depend on ranks or restarts."""
    return int(np.random.SeedSequence([seed, pack_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class StepInputs:
    """Model inputs of one pack, after noising and condition dropout (all on the target device)."""

    noisy: list[torch.Tensor]  # per sample [C, F, H, W]
    targets: list[torch.Tensor]  # per sample [C, F, H, W], float32
    timesteps: torch.Tensor  # [n], in the scheduler's 0..1000 scale
    text: torch.Tensor  # [n, 512, text_dim]
    embeddings: torch.Tensor  # [n, 512]; zeros where identity is dropped
    reference: torch.Tensor | None  # [n, C, 1, h, w] normalised latents of the reference crops
    reference_text: torch.Tensor  # [1, 512, text_dim], "image of a face"
    kept: torch.Tensor  # [n, 3] bool: text, identity, reference kept

    @property
    def num_elements(self) -> int:
        return sum(t.numel() for t in self.targets)


def make_step_inputs(samples: list[dict], shared: dict, pack_index: int, seed: int, shift: float,
                     drop: tuple[float, float, float], num_train_timesteps: int, device, dtype,
                     use_reference: bool = True) -> StepInputs:
    """Draw, from the pack's own generator and in a fixed order, everything random about one pack.

    `samples` are cache entries (`data.load_sample`): normalised VAE posterior mean/std of the target and of
    the reference crop, trimmed caption embedding, face embedding. `drop` = (text, identity, reference).
    """
    g = torch.Generator().manual_seed(pack_seed(seed, pack_index))
    noisy, targets, sigmas, texts, embeddings, refs, kept = [], [], [], [], [], [], []
    for s in samples:
        u = torch.rand((), generator=g)
        keep = torch.rand(3, generator=g) >= torch.tensor(drop)
        x0 = s["latent_mean"].float() + s["latent_std"].float() * torch.randn(s["latent_mean"].shape, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        ref_eps = torch.randn(s["reference_mean"].shape, generator=g)
        sigma = shifted_sigmas(u, shift)
        x_t, target = noisy_latents(x0, noise, sigma)
        noisy.append(x_t.to(device, dtype))
        targets.append(target.to(device))
        sigmas.append(sigma)
        texts.append(s["text"] if keep[0] else shared["null_text"])
        embeddings.append(s["embedding"].float() if keep[1] else torch.zeros_like(s["embedding"], dtype=torch.float32))
        mean, std = (s["reference_mean"], s["reference_std"]) if keep[2] else \
            (shared["null_reference_mean"], shared["null_reference_std"])
        refs.append(mean.float() + std.float() * ref_eps)
        kept.append(keep)
    return StepInputs(
        noisy=noisy, targets=targets,
        timesteps=(torch.stack(sigmas) * num_train_timesteps).to(device),
        text=torch.stack([pad_text(t) for t in texts]).to(device, dtype),
        embeddings=torch.stack(embeddings).to(device),
        reference=torch.stack(refs).to(device, dtype) if use_reference else None,
        reference_text=pad_text(shared["reference_text"])[None].to(device, dtype),
        kept=torch.stack(kept),
    )


def pad_text(text: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Cached captions keep only their real tokens; the encoder's output past them is exactly zero."""
    from ..constants import MAX_TEXT_TOKENS

    length = length or MAX_TEXT_TOKENS
    return torch.cat([text, text.new_zeros(length - text.shape[0], text.shape[1])]) if text.shape[0] < length else text


# ----- attention confined to each sample -------------------------------------------------------------------------
def _varlen_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("torch.nn.attention.varlen") is not None


class PackedAttention:
    """Attention of a packed sequence where each sample's queries see only its own keys.

    Self-attention keys are the packed tokens themselves; cross-attention keys (text, identity tokens,
    reference features) come as [n, Lk, H, D], one row per sample. Modes:
    - "varlen": PyTorch's FlashAttention varlen kernel on cumulative sequence offsets (CUDA, bf16/fp16), no
      padding and no mask;
    - "split": each sample's slice through the processor's own diffusers dispatcher (so any backend: flash,
      sage, native ...); exact, and numerically what the sample gives alone;
    - "mask": one call with a block-diagonal boolean mask (native SDPA); exact but O(S^2) memory, for checks;
    - "auto": varlen where it can run, else split.
    diffusers' own *varlen backends take a key-padding mask over a padded batch, not offsets inside one
    sequence, so they cannot confine attention within a pack; they remain usable per sample via "split".
    """

    def __init__(self, lengths: list[int], mode: str = "auto"):
        if mode not in ATTENTION_MODES:
            raise InputError(f"attention mode must be one of {', '.join(ATTENTION_MODES)}, not {mode!r}")
        self.lengths = [int(n) for n in lengths]
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).tolist()
        self.mode = mode
        self._masks: dict = {}
        self._cu: dict = {}

    def _resolve(self, q: torch.Tensor) -> str:
        if self.mode != "auto":
            return self.mode
        return "varlen" if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _varlen_available() \
            else "split"

    def __call__(self, query, key, value, kind: str, attend):
        mode = self._resolve(query)
        if mode == "split":
            return self._split(query, key, value, kind, attend)
        if mode == "mask":
            return self._mask(query, key, value, kind, attend)
        return self._varlen(query, key, value, kind)

    def _key_rows(self, key, i, kind):
        s, e = self.offsets[i], self.offsets[i + 1]
        if kind == "self":
            return key[:, s:e]
        return key[i:i + 1] if key.shape[0] > 1 else key

    def _split(self, query, key, value, kind, attend):
        outs = []
        for i in range(len(self.lengths)):
            s, e = self.offsets[i], self.offsets[i + 1]
            outs.append(attend(query[:, s:e], self._key_rows(key, i, kind), self._key_rows(value, i, kind)))
        return torch.cat(outs, dim=1)

    def _flat_keys(self, key, kind):
        if kind == "self":
            return key, self.lengths
        if key.shape[0] == 1 and len(self.lengths) > 1:
            key = key.expand(len(self.lengths), *key.shape[1:])
        return key.reshape(1, -1, *key.shape[2:]), [key.shape[1]] * len(self.lengths)

    def _mask(self, query, key, value, kind, attend):
        k, key_lengths = self._flat_keys(key, kind)
        v, _ = self._flat_keys(value, kind)
        cache_key = (kind, tuple(key_lengths), query.device)
        if cache_key not in self._masks:
            q_seg = torch.repeat_interleave(torch.arange(len(self.lengths)), torch.tensor(self.lengths))
            k_seg = torch.repeat_interleave(torch.arange(len(key_lengths)), torch.tensor(key_lengths))
            self._masks[cache_key] = (q_seg[:, None] == k_seg[None, :])[None, None].to(query.device)
        return attend(query, k, v, self._masks[cache_key])

    def _varlen(self, query, key, value, kind):
        from torch.nn.attention.varlen import varlen_attn

        k, key_lengths = self._flat_keys(key, kind)
        v, _ = self._flat_keys(value, kind)
        cache_key = (kind, tuple(key_lengths), query.device)
        if cache_key not in self._cu:
            def cu(lengths):
                return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=query.device)
            self._cu[cache_key] = (cu(self.lengths), cu(key_lengths), max(self.lengths), max(key_lengths))
        cu_q, cu_k, max_q, max_k = self._cu[cache_key]
        out = varlen_attn(query[0], k[0], v[0], cu_q, cu_k, max_q, max_k)
        return out.flatten(1, 2)[None].type_as(query)


# ----- the packed forward -----------------------------------------------------------------------------------------
def token_count(shape, patch_size=(1, 2, 2)) -> int:
    """Video tokens of one latent [C, F, H, W] (or its shape) after the transformer's patching."""
    _, f, h, w = shape
    return (f // patch_size[0]) * (h // patch_size[1]) * (w // patch_size[2])


def _unpatchify(tokens: torch.Tensor, shape, patch_size) -> torch.Tensor:
    # The inverse of Conv3d patching in the layout diffusers' Wan forward un-patches with.
    c, f, h, w = shape
    p_t, p_h, p_w = patch_size
    x = tokens.reshape(f // p_t, h // p_h, w // p_w, p_t, p_h, p_w, c)
    return x.permute(6, 0, 3, 1, 4, 2, 5).reshape(c, f, h, w)


def packed_transformer_forward(transformer, latents: list[torch.Tensor], timesteps: torch.Tensor,
                               text: torch.Tensor, run_block) -> list[torch.Tensor]:
    """diffusers' Wan forward for a list of samples of any size, packed into one sequence.

    Patching, RoPE, condition embedding, blocks and output head are the model's own modules; what differs
    from `WanTransformer3DModel.forward` is only that tokens of several samples are concatenated and each
    carries its own sample's modulation. `run_block(block, hidden, text, temb, rope)` runs one block (so the
    caller can add checkpointing and the packed attention context). Returns per-sample predictions [C, F, H, W].
    """
    patch = tuple(transformer.config.patch_size)
    rope = [transformer.rope(x[None]) for x in latents]
    rotary = (torch.cat([r[0] for r in rope], dim=1), torch.cat([r[1] for r in rope], dim=1))
    hidden = torch.cat([transformer.patch_embedding(x[None]).flatten(2).transpose(1, 2) for x in latents], dim=1)
    lengths = [token_count(x.shape, patch) for x in latents]
    segment = torch.repeat_interleave(torch.arange(len(latents), device=hidden.device),
                                      torch.tensor(lengths, device=hidden.device))
    temb, timestep_proj, text, _ = transformer.condition_embedder(timesteps, text, None)
    per_token = timestep_proj.unflatten(1, (6, -1))[segment][None]  # [1, S, 6, D]
    hidden = hidden.contiguous()
    for block in transformer.blocks:
        hidden = run_block(block, hidden, text, per_token, rotary)
    shift, scale = (transformer.scale_shift_table[None].to(temb.device) + temb[segment][None, :, None]).chunk(2, dim=2)
    hidden = (transformer.norm_out(hidden.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)).type_as(hidden)
    out = transformer.proj_out(hidden)[0]
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    return [_unpatchify(out[bounds[i]:bounds[i + 1]], x.shape, patch) for i, x in enumerate(latents)]


class PackedLynxAttnProcessor(LynxAttnProcessor):
    """The Lynx processor of training: every attention of a packed call (`kind` "self", "text", "ip" or
    "ref") goes through the call's `PackedAttention` (from `Conditioning.packing`), which keeps each sample's
    queries on its own keys. Without packing it is the inference processor."""

    call_attributes = (*LynxAttnProcessor.call_attributes, "packing")
    packing = None

    def bind(self, cond: Conditioning) -> None:
        super().bind(cond)
        self.set_call(packing=cond.packing)

    def unbind(self, cond: Conditioning | None = None) -> None:
        super().unbind(cond)
        self.set_call(packing=None)

    def attend(self, query, key, value, mask=None, kind: str = "self") -> torch.Tensor:
        if self.packing is None:
            return super().attend(query, key, value, mask, kind)
        plain = super().attend
        return self.packing(query, key, value, kind, lambda q, k, v, m=None: plain(q, k, v, m, kind))


def checkpoint_block(block: nn.Module) -> None:
    """Activation checkpointing as a wrapper around one transformer block (torch's composable `checkpoint`:
    module names unchanged, FSDP2 on top). The recomputation in backward sees the Lynx processors' per-call
    inputs as they were in forward: they are attributes set by `conditioning`, long gone by then."""
    procs = list(processors(block))

    def contexts():
        saved = [(p, {a: getattr(p, a) for a in p.call_attributes}) for p in procs]
        return contextlib.nullcontext(), _bound(saved)

    composable_checkpoint(block, context_fn=contexts)


@contextlib.contextmanager
def _bound(saved):
    current = [(p, {a: getattr(p, a) for a in attrs}) for p, attrs in saved]
    for p, attrs in saved:
        p.set_call(**attrs)
    try:
        yield
    finally:
        for p, attrs in current:
            p.set_call(**attrs)


class LynxTrainModel(nn.Module):
    """The frozen Wan transformer, whose blocks own the trainable Lynx layers, plus the resampler: one module
    FSDP shards one block at a time (each block's frozen weights and adapter weights in one unit).

    Its forward computes the reference features (frozen pass at t=0, no grad) and the packed prediction of
    every sample. The transformer's processors must be `PackedLynxAttnProcessor`s (`install_adapters` /
    `load_adapters` with `processor_class=PackedLynxAttnProcessor`).
    """

    def __init__(self, transformer, resampler, attention: str = "auto", gradient_checkpointing: bool = True):
        super().__init__()
        if adapter_config(transformer) is None:
            raise InputError("LynxTrainModel needs a transformer with Lynx adapters installed")
        self.transformer = transformer
        self.resampler = resampler
        self.attention = attention
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            for block in transformer.blocks:
                checkpoint_block(block)

    @property
    def adapter_config(self):
        return adapter_config(self.transformer)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def reference_features(self, reference: torch.Tensor, reference_text: torch.Tensor) -> list[torch.Tensor]:
        """Per-block features of the reference latents [n, C, 1, h, w]: the pipeline's frozen t=0 pass, batched."""
        return reference_features(self.transformer, reference, reference_text)

    def forward(self, noisy: list[torch.Tensor], timesteps: torch.Tensor, text: torch.Tensor,
                embeddings: torch.Tensor, reference: torch.Tensor | None, reference_text: torch.Tensor,
                ip_scale: float = 1.0, ref_scale: float = 1.0) -> list[torch.Tensor]:
        if not all(isinstance(p, PackedLynxAttnProcessor) for p in processors(self.transformer)):
            raise InputError("packed training needs the adapters installed with "
                             "processor_class=PackedLynxAttnProcessor")
        features = None
        if reference is not None and self.adapter_config.use_ref:
            features = reference_features(self.transformer, reference, reference_text)
        tokens = self.resampler(embeddings[:, None].to(next(self.resampler.parameters()).dtype))
        patch = tuple(self.transformer.config.patch_size)
        attention = PackedAttention([token_count(x.shape, patch) for x in noisy], self.attention)
        # The adapter keys depend on trainable weights, so nothing is cached between blocks or passes.
        cond = Conditioning(tokens, features, ip_scale, ref_scale, cache_kv=False, packing=attention)

        def run_block(block, *args):
            with conditioning(block, cond):
                return block(*args)

        return packed_transformer_forward(self.transformer, noisy, timesteps, text, run_block)


def flow_matching_loss(predictions: list[torch.Tensor], targets: list[torch.Tensor], normaliser: float):
    """Sum of squared errors over every latent element of the pack, divided by the step's element count.

    Dividing by the element count of the whole step (all packs, all ranks) makes a step's loss and gradient
    the same however its packs are spread over ranks and accumulation micro-steps.
    """
    total = sum((p.float() - t.float()).pow(2).sum() for p, t in zip(predictions, targets))
    return total / normaliser


def default_shift(scheduler_config: dict) -> float:
    """The flow shift the base model samples with (Wan2.1's scheduler: 3.0)."""
    shift = scheduler_config.get("flow_shift") or scheduler_config.get("shift") or 1.0
    if not math.isfinite(shift) or shift <= 0:
        raise InputError(f"the base scheduler's flow shift {shift} is not a positive number")
    return float(shift)


@torch.no_grad()
def evaluation_loss(model: LynxTrainModel, samples: list[dict], shared: dict, *, seed: int, shift: float,
                    num_train_timesteps: int = 1000, repeats: int = 4, ip_scale: float = 1.0, ref_scale: float = 1.0,
                    embeddings: torch.Tensor | None = None, device="cpu", dtype=torch.float32) -> float:
    """Flow-matching loss of `samples` (one pack) at fixed noise, without condition dropout.

    The same `seed` gives the same noise and timesteps, so losses of one model under different conditions
    (true identity, `ip_scale=0`, someone else's `embeddings`) are directly comparable.
    """
    total = elements = 0.0
    for r in range(repeats):
        inputs = make_step_inputs(samples, shared, r, seed, shift, (0.0, 0.0, 0.0), num_train_timesteps, device,
                                  dtype, model.adapter_config.use_ref)
        emb = inputs.embeddings if embeddings is None else embeddings.to(inputs.embeddings)
        preds = model(inputs.noisy, inputs.timesteps, inputs.text, emb, inputs.reference, inputs.reference_text,
                      ip_scale=ip_scale, ref_scale=ref_scale)
        total += float(flow_matching_loss(preds, inputs.targets, 1.0))
        elements += inputs.num_elements
    return total / elements
