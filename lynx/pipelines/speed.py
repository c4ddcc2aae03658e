"""Lynx's strength controls and the ways to spend less per video: step windows, step caches, compile,
batched guidance branches, LoRAs and the `exact` / `fast` / `turbo` presets.

The authors' recipe (50 UniPC steps, three guidance branches, both adapters on every step and block) is the
default everywhere; every knob here is off until asked for, and `tests/test_reference_sampling.py` holds the
default to the released sampling.

Strength (people pairing Lynx with step-distill LoRAs find it too strong; the controls they use):
  `ip_scale` / `ref_scale` with the fraction of the denoising each acts on (`ip_start`/`ip_end`, ...);
  identity guidance (`guidance_scale_i`) only inside a window of steps, the step outside it running two
  branches (c, u) or, at guidance 1, one; the Ref-adapter on chosen blocks only (`ref_blocks="0-20,35-39"`).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..constants import TWO_WAY
from ..errors import InputError

if TYPE_CHECKING:  # imported where used: `preset_settings` serves the CLI's checks, before diffusers is imported
    from ..models.adapters import Conditioning

# ----- where in the denoising the adapters and identity guidance act ----------------------------------------


def in_window(step: int, num_steps: int, start: float, end: float) -> bool:
    """Step `step` of `num_steps` lies in [start, end) as fractions of the denoising (0 = first step)."""
    return start <= step / num_steps < end


def parse_blocks(spec, num_blocks: int) -> frozenset[int] | None:
    """`"0-20,35-39"` (or an iterable of ints) -> the set of those blocks; None or "all" -> None (every block)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return None
    blocks: set[int] = set()
    parts = spec.split(",") if isinstance(spec, str) else [str(b) for b in spec]
    for part in parts:
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise InputError(f"ref_blocks: {part.strip()!r} is not a block or a range like 0-20 "
                             "(write e.g. \"0-20,35-39\")") from None
        if not 0 <= first <= last < num_blocks:
            raise InputError(f"ref_blocks: {part.strip()!r} is outside the transformer's blocks 0-{num_blocks - 1}")
        blocks.update(range(first, last + 1))
    return frozenset(blocks)


@dataclass(frozen=True)
class Strength:
    """Lynx's strength controls for one generation; the defaults are the authors' sampling."""

    ip_scale: float = 1.0
    ref_scale: float = 1.0
    ip_start: float = 0.0
    ip_end: float = 1.0
    ref_start: float = 0.0
    ref_end: float = 1.0
    guidance_i_start: float = 0.0
    guidance_i_end: float = 1.0
    ref_blocks: frozenset[int] | None = None

    def __post_init__(self):
        for name in ("ip", "ref", "guidance_i"):
            start, end = getattr(self, f"{name}_start"), getattr(self, f"{name}_end")
            if not 0.0 <= start <= end <= 1.0:
                raise InputError(f"{name}_start={start} and {name}_end={end} must satisfy 0 <= start <= end <= 1 "
                                 "(fractions of the denoising steps)")

    def conditioning(self, base: Conditioning, step: int, num_steps: int) -> Conditioning:
        """`base` (same object when nothing changes, so cached keys/values are shared) with the scales that
        step `step` uses: a branch outside its window has scale 0, i.e. is off."""
        ip = self.ip_scale if in_window(step, num_steps, self.ip_start, self.ip_end) else 0.0
        ref = self.ref_scale if in_window(step, num_steps, self.ref_start, self.ref_end) else 0.0
        if (ip, ref) == (base.ip_scale, base.ref_scale):
            return base
        return dataclasses.replace(base, ip_scale=ip, ref_scale=ref)  # shares the K/V caches of `base`

    def branches(self, step: int, num_steps: int, use_cfg: bool, three_way: bool) -> tuple[str, ...]:
        """The guidance branches step `step` runs: c alone (guidance 1), c and u, or c, u and i (identity
        guidance, only inside its window)."""
        if not use_cfg:
            return ("c",)
        if three_way and in_window(step, num_steps, self.guidance_i_start, self.guidance_i_end):
            return ("c", "u", "i")
        return ("c", "u")


# ----- diffusers step caches -------------------------------------------------------------------------------


def cache_context_kwargs(scheduler, step: int, num_steps: int) -> dict:
    """What diffusers' step caches (SeaCache, FirstBlockCache, TaylorSeer, MagCache, ...) read from a
    `cache_context`, passed exactly as `WanPipeline` passes them."""
    return {"step_index": step, "sigma": float(scheduler.sigmas[step]), "num_inference_steps": num_steps}


def step_kwargs(scheduler, generator: torch.Generator | None) -> dict:
    """The generator for schedulers that draw noise at each step (FlowMatchLCM: the step-distill sampler)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


# ----- batched guidance branches ---------------------------------------------------------------------------


def stack_conditionings(conds: list[Conditioning]) -> Conditioning:
    """One conditioning whose sample k is `conds[k]`: the c/u/i branches as one batched transformer call.
    The conditionings share scales, windows and blocks (they differ only in identity and reference)."""
    from ..models.adapters import Conditioning

    first = conds[0]
    tokens = None if first.ip_tokens is None else torch.cat([c.ip_tokens for c in conds])
    features = None
    if first.ref_features is not None:
        features = [torch.cat(per_block) for per_block in zip(*(c.ref_features for c in conds))]
    return Conditioning(tokens, features, first.ip_scale, first.ref_scale, ref_blocks=first.ref_blocks,
                        text_kv=first.text_kv)


# ----- compile ---------------------------------------------------------------------------------------------


# What a compiled block cannot hold. A step cache decides at every step which blocks run and what they
# return: the block's graph is traced again at every step. Layer-by-layer streaming (the 12gb preset) hooks
# every layer, cutting each block into dozens of graphs, each recompiled for the next kind of layer.
COMPILE_WITH_CACHE = ("--compile does not combine with a step cache (--speed fast): the cache decides at every step "
                      "which blocks run, so each would be compiled again at every step; use one of the two")
COMPILE_WITH_LEAF_STREAMING = ("--compile does not combine with --memory 12gb: its layer-by-layer streaming hooks "
                               "every layer and cuts each block into dozens of graphs; with --compile use --memory "
                               "24gb-blocks or 24gb")


def compile_refusal(speed: str, memory: str | None) -> str | None:
    """Why `--compile` cannot go with these presets (one line naming what to change), or None; known before any
    model loads."""
    from .memory import MEMORY_PRESETS

    if speed == "fast":
        return COMPILE_WITH_CACHE
    if memory in MEMORY_PRESETS and MEMORY_PRESETS[memory].transformer == "leaf_offload":
        return COMPILE_WITH_LEAF_STREAMING
    return None


# diffusers' hooks a compiled block may hold, by the first word of their names, as the compile line names them.
_HOOK_KINDS = {"layerwise": "the fp8 casting hooks (24gb)", "group": "the block offloading hooks (24gb-blocks)",
               "cp": "the context-parallel split and gather hooks"}


def _block_hooks(transformer) -> set[str]:
    """Names of the diffusers hooks on the transformer's blocks and inside them (`"layerwise_casting"`, ...),
    with `"...@leaf"` for those on a block's layers rather than the block."""
    names = set()
    for block in transformer.blocks:
        for name, module in block.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            for hook in getattr(registry, "hooks", {}) or {}:
                names.add(hook if name == "" else f"{hook}@leaf")
    return names


def compile_transformer(transformer, backend: str | None = None, **kwargs) -> str:
    """diffusers' regional compilation: every `WanTransformerBlock` with its Lynx processors. Returns a line
    saying how (what the CLI prints).

    Whole-graph where the blocks carry no diffusers hooks (`max`, `48gb`): one graph serves all blocks; a
    generation compiles one, for denoising, whatever the scales, windows and guidance branches (the processors'
    `fixed_graph`: the reference passes, under 1 % of a pass, and the first call of each conditioning and prompt,
    which computes the keys and values kept for the others, run uncompiled; a branch outside its window stays in the
    graph at scale 0, which at the real size costs under 0.5 % of a pass where a new graph costs a compilation),
    and a second video none (`tests/test_speed.py` counts them). Under fp8 storage (`24gb`: a casting hook on
    every layer), block offloading (`24gb-blocks`) or context parallelism (a split hook on the first block) the
    graph breaks at those hooks, which run as they are, and the code between them is compiled, with no more
    graphs after the first compiled step either. A step cache or layer-by-layer streaming is refused
    (`COMPILE_WITH_CACHE`, `COMPILE_WITH_LEAF_STREAMING`).
    """
    if getattr(transformer, "is_cache_enabled", False):
        raise InputError(COMPILE_WITH_CACHE)
    hooks = _block_hooks(transformer)
    if "group_offloading@leaf" in hooks:
        raise InputError(COMPILE_WITH_LEAF_STREAMING)
    options = {"fullgraph": not hooks, **kwargs}
    if backend is not None:
        options["backend"] = backend
    from ..models.adapters import processors

    for p in processors(transformer):
        p.fixed_graph = True
    transformer.compile_repeated_blocks(**options)
    if options["fullgraph"]:
        return "compile: every transformer block compiled (torch.compile, whole graph)"
    kinds = sorted({_HOOK_KINDS.get(h.split("_")[0], h.removesuffix("@leaf")) for h in hooks})
    return f"compile: every transformer block compiled (torch.compile), with graph breaks at {', '.join(kinds)}"


# ----- presets ---------------------------------------------------------------------------------------------

SPEEDS = ("exact", "fast", "turbo")

# fast: identity guidance only in the first 40 % of steps (the c, u, i -> c, u saving: 60 % of the
# steps run 2 passes instead of 3) and SeaCache on every branch, each with its own state.
FAST_GUIDANCE_I_END = 0.4
FAST_CACHE_THRESHOLD = 0.2

# turbo: lightx2v's Wan2.1-T2V StepDistill-CfgDistill LoRAs were trained for 4 steps at timesteps
# 1000/750/500/250 with shift 5, guidance 1 (no negative branch) and an x0 -> re-noise sampler (LCM);
# Lynx at full strength overpowers them (front-facing headshots, prompts ignored), so its scales drop and
# the Ref-adapter acts on the first half of the steps only. Starting values, not measured here.
TURBO = dict(num_inference_steps=4, guidance_scale=1.0, guidance_scale_i=TWO_WAY, ip_scale=0.8, ref_scale=0.6,
             ref_end=0.5)
TURBO_SHIFT = 5.0


def turbo_sigmas(num_steps: int) -> np.ndarray:
    """The distill grid before the shift: 1000/750/500/250 at 4 steps (linspace(1, 0, n + 1)[:-1])."""
    return np.linspace(1.0, 0.0, num_steps + 1)[:-1]


def preset_settings(speed: str) -> dict:
    """The generation knobs (fields of `GenerationSettings`) a preset sets; knobs a person gives override them.
    Known before any model loads, so the CLI checks and plans with them."""
    if speed not in SPEEDS:
        raise InputError(f"speed must be one of {', '.join(SPEEDS)}, not {speed!r}")
    return {"exact": {}, "fast": {"guidance_i_end": FAST_GUIDANCE_I_END}, "turbo": dict(TURBO)}[speed]


def _passes(settings) -> str:
    if settings.guidance_scale <= 1:
        return f"guidance {settings.guidance_scale:g} (one transformer pass per step, no identity guidance)"
    return "2-way guidance (2 transformer passes per step)" if settings.two_way else "3-way guidance"


def _overridden(settings, preset: dict, whose: str = "the preset's") -> str:
    """The knobs of `preset` that `settings` set otherwise (given explicitly: they win), as a line's ending."""
    from .settings import flag

    changed = [f"{flag(k)} {getattr(settings, k)} ({whose} {v})" for k, v in preset.items()
               if getattr(settings, k) != v]
    return f"; given explicitly: {', '.join(changed)}" if changed else ""


def speed_lines(speed: str, settings, variant: str = "full") -> list[str]:
    """What the preset `speed` runs with, from the resolved `settings` a generation of `variant` uses: a line per
    setting, with the knobs given explicitly over the preset's values said so (they win)."""
    from .settings import default

    s = settings
    windows = (s.ip_start, s.ip_end, s.ref_start, s.ref_end) == (0.0, 1.0, 0.0, 1.0) and s.ref_blocks == "all"
    if speed == "exact":
        recipe = {k: default(variant, k) for k in ("num_inference_steps", "guidance_scale", "guidance_scale_i")}
        return [f"speed exact: the authors' recipe ({s.num_inference_steps} UniPC steps, {_passes(s)}, adapters on "
                f"{'every step' if windows else 'the steps and blocks given'})"
                + _overridden(s, recipe, "the recipe's")]
    if speed == "fast":
        cache = f"speed fast: SeaCache (threshold {FAST_CACHE_THRESHOLD}) with one cache state per guidance branch"
        if s.guidance_scale <= 1 or s.two_way:  # no identity branch for the preset to cut short
            return [cache, f"speed fast: {_passes(s)}"]
        return [cache, f"speed fast: identity guidance only in the first {s.guidance_i_end:.0%} of the steps "
                       "(2 transformer passes instead of 3 after that)"
                       + _overridden(s, {"guidance_i_end": FAST_GUIDANCE_I_END})]
    steps = s.num_inference_steps
    return [
        f"speed turbo: {steps} steps of FlowMatchLCM (x0 then re-noise), shift {TURBO_SHIFT}, timesteps "
        f"{'/'.join(str(int(round(x * 1000))) for x in turbo_sigmas(steps))} before the shift"
        + _overridden(s, {"num_inference_steps": TURBO["num_inference_steps"]}),
        f"speed turbo: {_passes(s)}"
        + _overridden(s, {k: TURBO[k] for k in ("guidance_scale", "guidance_scale_i")}),
        f"speed turbo: ip_scale {s.ip_scale}, ref_scale {s.ref_scale}, Ref-adapter on the first {s.ref_end:.0%} of "
        "the steps" + _overridden(s, {k: TURBO[k] for k in ("ip_scale", "ref_scale", "ref_end")})]


def apply_speed(pipe, speed: str, loras: list[tuple[str, float]] = (), settings=None) -> tuple[dict, list[str]]:
    """Set `pipe` up for a speed preset; returns the call keyword arguments the preset sets and a line per
    setting (what the CLI prints). Arguments the caller passes itself override the returned ones; given the
    resolved `settings` of the call, the lines say what applies, those overrides included.

    exact: the authors' recipe (nothing changes). fast: SeaCache per guidance branch + identity guidance in
    the first 40 % of the steps. turbo: a step-distill LoRA (required in `loras`), 4 LCM steps at guidance 1,
    shift 5, timesteps 1000/750/500/250, Lynx strength reduced.
    """
    if speed not in SPEEDS:
        raise InputError(f"speed must be one of {', '.join(SPEEDS)}, not {speed!r}")
    if speed == "turbo" and not loras:
        raise InputError("--speed turbo needs a step-distill LoRA: add --lora FILE (e.g. lightx2v's "
                         "Wan2.1-T2V-14B StepDistill-CfgDistill rank-32/64 LoRA)")
    variant = "lite" if getattr(pipe, "variant", None) == "lite" else "full"
    if settings is None:
        from .settings import GenerationSettings

        settings = GenerationSettings(**preset_settings(speed)).resolve(variant)
    lines = speed_lines(speed, settings, variant)
    if speed == "exact":
        return {}, lines
    if speed == "fast":
        from diffusers import SeaCacheConfig

        pipe.transformer.enable_cache(SeaCacheConfig(threshold=FAST_CACHE_THRESHOLD))
        return {"guidance_i_end": FAST_GUIDANCE_I_END}, lines
    from diffusers import FlowMatchLCMScheduler

    pipe.scheduler = FlowMatchLCMScheduler(shift=TURBO_SHIFT)
    return {**TURBO, "sigmas": turbo_sigmas(TURBO["num_inference_steps"])}, lines


def load_loras(pipe, loras: list[tuple[str, float]]) -> list[str]:
    """Load each (file, scale) into `pipe` and make them all active with their scales; a line per LoRA."""
    from ..models.lora import adapter_name

    names, lines = [], []
    taken = set(pipe.get_list_adapters().get("transformer", [])) if loras else set()
    for path, scale in loras:
        name = adapter_name(path, taken)
        taken.add(name)
        pipe.load_lora_weights(path, adapter_name=name)
        names.append(name)
        lines.append(f"LoRA {path} as {name!r} at scale {scale} (off for the reference pass)")
    if names:
        pipe.set_adapters(names, [scale for _, scale in loras])
    return lines
