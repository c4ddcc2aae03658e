"""Peak GPU memory of one video under a memory preset, predicted on the CPU: no GPU, no download.

Weights: the real models (the Wan2.1-T2V-14B transformer with the Lynx adapters installed in its blocks,
UMT5-XXL, the Wan VAE, the resampler) are built on the meta device from their released configs
(`lynx.constants`), so every parameter has its real shape and dtype and no byte is allocated. Each phase counts
the weights the preset keeps on the GPU at that moment (see `resident_weights`).

Activations: the same models run each phase on meta tensors at the requested video size, under a dispatch mode
that adds up the bytes of every live tensor (a storage shared by views counted once, freed with its last view)
and keeps the peak. Tensors that outlive a phase (text embeddings, reference features, the adapters' cached
keys and values, the latents) are counted in every later phase, as on the GPU. Attention is counted as the
fused kernels torch runs on CUDA for bf16 (flash or memory-efficient: the output and a float32 log-sum-exp per
query row); on the meta device torch would take the math kernel, whose 32,760 x 32,760 score matrix no GPU
run ever holds.

Not counted (nor by `torch.cuda.max_memory_allocated`, which the benchmark measures): the CUDA context, about
0.5 GiB; what the caching allocator reserves beyond what is allocated. cuDNN and cuBLAS workspaces are
allocated through torch and do show up in a measurement: the reason to measure.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..constants import (
    MAX_TEXT_TOKENS,
    UMT5_XXL_CONFIG,
    WAN_14B_TRANSFORMER_CONFIG,
    WAN_VAE_CONFIG,
    full_adapter_config,
    lite_adapter_config,
    sampling_defaults,
)
from ..errors import SettingsError, option
from .memory import MEMORY_PRESETS, MemoryPreset, get_preset
from .pipeline_lynx import REFERENCE_SIZE
from .settings import GenerationSettings
from .windows import ContextWindows, latent_frames

GIB = 1024 ** 3  # card sizes are binary: a "24 GB" RTX 4090 has 24 GiB
PHASES = ("text encoding", "reference passes", "denoising", "VAE decode")
COMPONENTS = ("text_encoder", "resampler", "transformer", "vae")


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors alive now, and the peak of each phase, counting only tensors made under the mode.

    The weights of `modules` are not counted, nor are views of them (a linear layer's transposed weight), nor
    fp8 tensors: under layerwise casting those are only the weights going back to their fp8 storage.
    """

    def __init__(self, modules=()):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peaks: dict[str, int] = {}
        self.phase_name: str | None = None
        for module in modules:
            for t in list(module.parameters()) + list(module.buffers()):
                self._track(t.untyped_storage(), counted=False)

    def phase(self, name: str) -> None:
        self.phase_name = name
        self.peaks[name] = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage(), counted=t.dtype != torch.float8_e4m3fn)
        return out

    def _track(self, storage, counted: bool = True) -> None:
        key = storage._cdata  # one per storage while it lives; views share it
        if key in self.live:
            return
        self.live[key] = storage.nbytes() if counted else 0
        self.now += self.live[key]
        if self.phase_name is not None:
            self.peaks[self.phase_name] = max(self.peaks[self.phase_name], self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


class FusedAttention(TorchFunctionMode):
    """`scaled_dot_product_attention` as a fused CUDA kernel allocates it: output plus a float32 log-sum-exp."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            query = args[0] if args else kwargs["query"]
            value = args[2] if len(args) > 2 else kwargs["value"]
            lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
            out = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
            del lse  # freed when the kernel returns; it counted towards the peak
            return out
        return func(*args, **kwargs)


@dataclass(frozen=True)
class Models:
    """The real-sized models on the meta device, and the adapter config installed in the transformer."""

    text_encoder: torch.nn.Module
    resampler: torch.nn.Module
    transformer: torch.nn.Module
    vae: torch.nn.Module
    use_ref: bool


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers' advice on keeping some modules in fp32 is for loading weights, and followed there; the models
    here are shapes on the meta device."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def build_models(variant: str, dtype: torch.dtype = torch.bfloat16, fp8_weights: bool = False) -> Models:
    """Wan2.1-T2V-14B + Lynx `variant`, UMT5-XXL and the Wan VAE on the meta device, in the pipeline's dtypes."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from ..models.adapters import install_adapters, processors
    from ..models.resampler import Resampler
    from .pipeline_lynx import _cast_like_reference

    config = {"full": full_adapter_config, "lite": lite_adapter_config}[variant]()
    with _quiet_diffusers():
        with torch.device("meta"):
            text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL_CONFIG)).to(dtype).eval()
            transformer = WanTransformer3DModel(**WAN_14B_TRANSFORMER_CONFIG)
            _cast_like_reference(transformer, dtype)  # as LynxPipeline.from_pretrained loads it
            install_adapters(transformer, config)
            for proc in processors(transformer):
                proc.to(dtype)
            transformer.eval()
            resampler = Resampler(config.resampler).to(dtype).eval()
            vae = AutoencoderKLWan(**WAN_VAE_CONFIG).to(dtype).eval()
    if fp8_weights:  # exactly what the 24gb preset applies (lynx.pipelines.memory)
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    return Models(text_encoder, resampler, transformer, vae, config.use_ref)


def _own_bytes(module: torch.nn.Module, recurse: bool = True) -> int:
    tensors = list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse))
    return sum(t.numel() * t.element_size() for t in tensors)


def leaf_offload_bytes(module: torch.nn.Module) -> int:
    """On the GPU under leaf-level group offloading with streams: the layer running and the one prefetched
    (the two largest, to be safe), plus the few weights that sit on non-leaf modules (kept there throughout)."""
    leaves, direct, seen = [], 0, set()  # a tied weight (UMT5's token embedding) moves once
    for m in module.modules():
        own = [t for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)) if id(t) not in seen]
        seen.update(map(id, own))
        size = sum(t.numel() * t.element_size() for t in own)
        if next(m.children(), None) is None:
            leaves.append(size)
        else:
            direct += size
    return direct + sum(sorted(leaves)[-2:])


def block_offload_bytes(transformer: torch.nn.Module) -> int:
    """On the GPU under block-level group offloading with streams: everything outside the blocks (onloaded
    for the whole call), the block running and the block prefetched."""
    blocks = [_own_bytes(b) for b in transformer.blocks]
    return _own_bytes(transformer) - sum(blocks) + 2 * max(blocks)


# The component each phase calls, and under model CPU offload which components are on the GPU then: accelerate's
# hook on a component moves it in and moves the component before it in `model_cpu_offload_seq` out, so the VAE
# that encoded the reference crop stays in while the transformer denoises (full), and leaves nothing behind
# when it decodes but itself.
MODEL_OFFLOAD_ON_GPU = {
    "text encoding": ("text_encoder",),
    "reference passes": ("transformer", "vae"),
    "denoising": ("transformer", "vae"),  # the VAE only if the reference passes ran (full)
    "VAE decode": ("vae",),
}


def resident_weights(preset: MemoryPreset, phase: str, models: Models) -> int:
    """Bytes of weights on the GPU while `phase` runs under `preset`."""
    size = {name: _own_bytes(getattr(models, name)) for name in COMPONENTS}
    if preset.transformer == "gpu":
        return sum(size.values())
    if preset.transformer == "model_offload":
        names = MODEL_OFFLOAD_ON_GPU[phase]
        if phase == "denoising" and not models.use_ref:
            names = ("transformer",)
        return sum(size[n] for n in names)
    # Group offloading: the VAE and the resampler are placed on the GPU once and stay.
    total = size["vae"] + size["resampler"]
    if phase == "text encoding":
        total += leaf_offload_bytes(models.text_encoder)
    elif phase in ("reference passes", "denoising"):
        total += (block_offload_bytes(models.transformer) if preset.transformer == "block_offload"
                  else leaf_offload_bytes(models.transformer))
    return total


def lora_resident(preset: MemoryPreset, phase: str, models: Models, lora: int) -> int:
    """Bytes of LoRA weights (`lora` in all) on the GPU while `phase` runs: they sit in the transformer's layers,
    so they are where those layers are; under block streaming, the two blocks' share."""
    if not lora:
        return 0
    if preset.transformer == "gpu":
        return lora
    if phase not in ("reference passes", "denoising"):
        return 0
    if preset.transformer == "model_offload":
        return lora
    if preset.transformer == "block_offload":
        return 2 * lora // len(models.transformer.blocks)
    return 0  # layer by layer: a LoRA matrix is smaller than the layer it wraps, which sets the largest leaf


@lru_cache(maxsize=16)
def activation_peaks(variant: str, frames: int, height: int, width: int, fp8_weights: bool,
                     dtype: torch.dtype = torch.bfloat16, windows: tuple[tuple[int, int], ...] | None = None
                     ) -> tuple[dict[str, int], int]:
    """Peak bytes of live tensors in the text, reference and denoising phases of one video, run on meta tensors
    (weights not counted; the fp8 preset's per-layer bf16 copies are, since they are made during the call),
    and the bytes still alive when the VAE starts decoding (texts, identity tokens, reference features, the
    adapters' cached keys and values). Presets that store the weights alike share one run (it takes seconds).
    `windows`: the context windows a long video is denoised in (latent-frame ranges; None: one)."""
    peaks, carried = _activation_peaks(variant, frames, height, width, fp8_weights, dtype, windows)
    return dict(peaks), carried


@lru_cache(maxsize=16)
def _activation_peaks(variant: str, frames: int, height: int, width: int, fp8_weights: bool,
                      dtype: torch.dtype, windows: tuple[tuple[int, int], ...] | None = None
                      ) -> tuple[dict[str, int], int]:
    from ..models.adapters import Conditioning, conditioning, recording

    models = build_models(variant, dtype, fp8_weights)
    tr, vae = models.transformer, models.vae
    d = sampling_defaults(variant)
    meta = dict(device="meta")
    tracker = LiveBytes([getattr(models, name) for name in COMPONENTS])
    with torch.no_grad(), FusedAttention(), tracker:
        tracker.phase("text encoding")
        ids = torch.zeros(1, MAX_TEXT_TOKENS, dtype=torch.long, **meta)
        # No padding mask: transformers inspects its values, which meta tensors do not have; it is 512 bytes.
        texts = [models.text_encoder(ids).last_hidden_state.to(dtype)
                 for _ in range(3 if models.use_ref else 2)]  # prompt, negative prompt (, reference prompt)

        tracker.phase("reference passes")
        tokens, no_tokens = (models.resampler(torch.zeros(1, 1, 512, dtype=dtype, **meta)) for _ in range(2))
        refs = [None, None]
        if models.use_ref:
            for k in range(2):  # with and without the reference crop
                pixels = torch.zeros(1, 3, 1, REFERENCE_SIZE, REFERENCE_SIZE, dtype=dtype, **meta)
                latents = vae.encode(pixels).latent_dist.mode()
                with recording(tr) as recorded:
                    tr(hidden_states=latents, timestep=torch.zeros(1, dtype=torch.long, **meta),
                       encoder_hidden_states=texts[2], return_dict=False)
                refs[k] = list(recorded)
                del pixels, latents

        tracker.phase("denoising")
        cond = Conditioning(tokens, refs[0], d.ip_scale, d.ref_scale)
        uncond = Conditioning(no_tokens, refs[1], d.ip_scale, d.ref_scale)
        latents = torch.zeros(latent_shape(frames, height, width), dtype=torch.float32, **meta)
        t = torch.full((1,), 999.0, **meta)
        branches = [(texts[0], cond), (texts[1], uncond)] + ([(texts[1], cond)] if d.guidance_scale_i else [])

        def predict(window):
            preds = []
            for text, c in branches:
                with conditioning(tr, c):
                    preds.append(tr(hidden_states=window.to(dtype), timestep=t, encoder_hidden_states=text,
                                    return_dict=False)[0])
            return preds

        spans = windows or ((0, latents.shape[2]),)
        window_noise = []
        for start, end in spans:
            # Rebound as in the pipeline's loop: a window's predictions live until the next window's are made.
            preds = predict(latents if len(spans) == 1 else latents[:, :, start:end])
            window_noise.append(sum(p.float() for p in preds))  # guidance, to size
        if len(spans) > 1:  # the pipeline's blend: weighted sums into one prediction, then normalised
            out = torch.zeros_like(latents)
            for (start, end), noise in zip(spans, window_noise):
                out[:, :, start:end] += noise * torch.ones(end - start, **meta).view(1, 1, -1, 1, 1)
            window_noise = [out / 2]
            del out, noise
        latents = latents + window_noise[0]  # the scheduler step, to size
        del preds, latents, window_noise
        carried = tracker.now
    return dict(tracker.peaks), carried


def latent_shape(frames: int, height: int, width: int) -> tuple[int, ...]:
    # Wan's VAE: 4x in time (the first frame alone), 8x in space, 16 channels.
    return (1, WAN_VAE_CONFIG["z_dim"], (frames - 1) // 4 + 1, height // 8, width // 8)


@lru_cache(maxsize=16)
def decode_peak(frames: int, height: int, width: int, vae_tiling: bool, dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak bytes of live tensors while the VAE decodes the latents (which it counts) into the video."""
    from diffusers import AutoencoderKLWan

    with _quiet_diffusers(), torch.device("meta"):
        vae = AutoencoderKLWan(**WAN_VAE_CONFIG).to(dtype).eval()
    if vae_tiling:
        vae.enable_tiling()
    tracker = LiveBytes([vae])
    with torch.no_grad(), FusedAttention(), tracker:
        tracker.phase("VAE decode")
        latents = torch.zeros(latent_shape(frames, height, width), dtype=dtype, device="meta")
        video = vae.decode(latents, return_dict=False)[0]
        del video, latents
    return tracker.peaks["VAE decode"]


@dataclass
class PhasePlan:
    phase: str
    weights: int  # bytes
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.activations


@dataclass
class MemoryPlan:
    preset: str
    variant: str
    frames: int
    height: int
    width: int
    phases: list[PhasePlan] = field(default_factory=list)
    lora: int = 0  # bytes of LoRA weights counted in the transformer's
    windows: int = 1  # context windows the denoising runs in
    window_frames: int | None = None

    @property
    def peak(self) -> PhasePlan:
        return max(self.phases, key=lambda p: p.total)

    def table(self) -> str:
        long = (f" in {self.windows} context windows of {self.window_frames} frames (as `lynx generate` denoises "
                "them; the VAE decodes all frames)" if self.windows > 1 else "")
        rows = [f"Lynx {self.variant}, memory preset {self.preset}, {self.frames} frames at "
                f"{self.height}x{self.width}{long} (predicted, GiB):",
                f"  {'phase':18s} {'weights':>8s} {'activations':>12s} {'peak':>7s}"]
        for p in self.phases:
            rows.append(f"  {p.phase:18s} {p.weights / GIB:8.2f} {p.activations / GIB:12.2f} {p.total / GIB:7.2f}")
        rows.append(f"  peak: {self.peak.total / GIB:.2f} GiB in {self.peak.phase} "
                    f"(plus the CUDA context, about 0.5 GiB)")
        if self.lora:
            rows.append(f"  the weights include LoRAs of {self.lora / GIB:.2f} GiB in bf16, where the transformer's "
                        "layers are")
        return "\n".join(rows)


def plan_settings(variant: str = "full", frames: int | None = None, height: int | None = None,
                  width: int | None = None, context_frames: int | None = None,
                  allow_large: bool = False) -> GenerationSettings:
    """The video size to plan, checked by the same rules (4k+1 frames, sides in steps of 16, the limits that
    `allow_large` lifts) and in the same words as a generation, resolved for `variant` (its context windows
    too), and within what the transformer can position (its RoPE table)."""
    settings = GenerationSettings(num_frames=frames, height=height, width=width, context_frames=context_frames,
                                  allow_large=allow_large).resolve(variant)
    rope, (_, ph, pw) = WAN_14B_TRANSFORMER_CONFIG["rope_max_seq_len"], WAN_14B_TRANSFORMER_CONFIG["patch_size"]
    window = "context_frames" if settings.num_frames > settings.context_frames else "num_frames"
    # The VAE's 8x, then the patch: positions per axis; a window's latent frames, one position each.
    for name, most in (("height", rope * 8 * ph), ("width", rope * 8 * pw), (window, (rope - 1) * 4 + 1)):
        value = getattr(settings, name)
        if value > most:
            raise SettingsError(f"{option(name, value)} is beyond the {most} that Wan's position embedding covers "
                                f"(try {most} or less)")
    return settings


def plan_memory(preset: str, variant: str = "full", frames: int | None = None, height: int | None = None,
                width: int | None = None, lora: int = 0, context_frames: int | None = None,
                allow_large: bool = False) -> MemoryPlan:
    """The predicted peak GPU memory of each phase of one video (bf16) under `preset`, with LoRAs of `lora`
    bytes (`lynx.models.lora.lora_bytes`) in the transformer. A video longer than the context window
    (`context_frames`, default the variant's clip) is denoised window by window, as the pipeline does."""
    p = get_preset(preset)
    s = plan_settings(variant, frames, height, width, context_frames, allow_large)
    frames, height, width = s.num_frames, s.height, s.width
    spans = ContextWindows(frames=s.context_frames, overlap=s.context_overlap).windows(latent_frames(frames))
    peaks, carried = activation_peaks(variant, frames, height, width, p.fp8_weights,
                                      windows=tuple(spans) if len(spans) > 1 else None)
    peaks["VAE decode"] = carried + decode_peak(frames, height, width, p.vae_tiling)
    models = build_models(variant, fp8_weights=p.fp8_weights)
    plan = MemoryPlan(preset, variant, frames, height, width, lora=lora, windows=len(spans),
                      window_frames=s.context_frames)
    for phase in PHASES:
        if phase == "reference passes" and not models.use_ref:
            continue
        weights = resident_weights(p, phase, models) + lora_resident(p, phase, models, lora)
        plan.phases.append(PhasePlan(phase, weights, peaks[phase]))
    return plan


def smallest_fitting(gib: float, variant: str = "full", **size) -> str | None:
    """The fastest preset whose predicted peak fits in `gib` GiB (presets are ordered fastest first)."""
    for name in MEMORY_PRESETS:
        if plan_memory(name, variant, **size).peak.total + 0.5 * GIB <= gib * GIB:
            return name
    return None
