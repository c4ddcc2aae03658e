"""Memory presets: one name per GPU size, each a fixed combination of diffusers' own offloading and casting tools.

Lynx full is Wan2.1-T2V-14B (14.3 B parameters) plus 4.2 B adapter parameters inside its blocks, UMT5-XXL
(5.7 B, used once per prompt) and a small VAE: 37 GB of bf16 weights for the transformer alone. The presets:

| preset        | text encoder             | transformer (adapters included)                           | VAE decode |
| ------------- | ------------------------ | --------------------------------------------------------- | ---------- |
| `max`         | on the GPU               | on the GPU, bf16                                          | whole      |
| `48gb`        | model CPU offload        | model CPU offload (on the GPU while it runs), bf16        | whole      |
| `24gb`        | model CPU offload        | model CPU offload, stored in fp8, computed in bf16        | tiled      |
| `24gb-blocks` | leaf-level group offload | block-level group offload, CUDA-stream prefetch, bf16     | tiled      |
| `12gb`        | leaf-level group offload | leaf-level group offload, CUDA streams, bf16              | tiled      |

Only `max` keeps the text encoder on the GPU while the transformer denoises. `24gb` moves the transformer to the
GPU once per video (18 GB in fp8) and keeps it there for every step: no per-step PCIe traffic. `24gb-blocks` is
its bf16 alternative for GPUs that cannot hold fp8 tensors, paying a transfer of every block at every step,
hidden behind compute by a CUDA stream. On the CPU (tests) the group-offloading presets run without streams,
with the CPU as the "onload" device, exactly as diffusers allows. `lynx plan` predicts each preset's peak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import InputError


class MemoryPresetError(InputError):
    """A memory preset that cannot work on this machine; the message names one that will."""


@dataclass(frozen=True)
class MemoryPreset:
    name: str
    gpu: str  # the cards it is meant for
    description: str  # one line for a menu
    text_encoder: str  # "gpu", "model_offload" or "leaf_offload"
    transformer: str  # "gpu", "model_offload", "block_offload" or "leaf_offload"
    fp8_weights: bool = False  # transformer weights stored in float8_e4m3fn (layerwise casting)
    vae_tiling: bool = False

    @property
    def streams(self) -> bool:
        return self.transformer in ("block_offload", "leaf_offload")


MEMORY_PRESETS: dict[str, MemoryPreset] = {p.name: p for p in (
    MemoryPreset("max", "80 GB and more (H100, H200, A100 80GB)",
                 "Everything on the GPU in bf16: fastest.", "gpu", "gpu"),
    MemoryPreset("48gb", "48 GB (L40S, RTX 6000 Ada, A6000)",
                 "Each model visits the GPU only while it runs (model CPU offload); same video as max.",
                 "model_offload", "model_offload"),
    MemoryPreset("24gb", "24 GB (RTX 4090, RTX 3090, L4)",
                 "Transformer weights stored in fp8 and computed in bf16, on the GPU for the whole video; "
                 "tiled VAE decode. Slightly different video (fp8 rounding of the weights).",
                 "model_offload", "model_offload", fp8_weights=True, vae_tiling=True),
    MemoryPreset("24gb-blocks", "24 GB without fp8 storage",
                 "bf16 weights streamed to the GPU one block at a time, the next block prefetched on a CUDA "
                 "stream; tiled VAE decode. Same video as max, slower.",
                 "leaf_offload", "block_offload", vae_tiling=True),
    MemoryPreset("12gb", "12-16 GB (RTX 4070, RTX 3060 12GB, T4)",
                 "bf16 weights streamed to the GPU one layer at a time (CUDA streams, pinned on the fly); "
                 "tiled VAE decode. Same video as max, slowest.",
                 "leaf_offload", "leaf_offload", vae_tiling=True),
)}


def memory_presets() -> list[dict]:
    """Every preset as plain data (name, gpu, description, ...), in order from most to least memory: what a
    front end shows in its menu."""
    return [asdict(p) for p in MEMORY_PRESETS.values()]


def get_preset(name: str) -> MemoryPreset:
    try:
        return MEMORY_PRESETS[name]
    except KeyError:
        raise InputError(f"unknown memory preset {name!r}; choose one of {', '.join(MEMORY_PRESETS)}") from None


def _fp8_storage_works(device: torch.device) -> bool:
    # A real round trip on the device, rather than a guess from its name: layerwise casting needs exactly this.
    try:
        x = torch.ones(4, device=device).to(torch.float8_e4m3fn).to(torch.bfloat16)
        return bool((x == 1).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _has_streams(device: torch.device) -> bool:
    module = getattr(torch, device.type, None)
    return hasattr(module, "Stream") and hasattr(module, "current_stream")


def check_preset(name: str, device) -> MemoryPreset:
    """The preset, if it can work on `device`; otherwise a `MemoryPresetError` naming one that will."""
    preset, device = get_preset(name), torch.device(device)
    if preset.fp8_weights and not _fp8_storage_works(device):
        raise MemoryPresetError(
            f"the {name} preset stores the transformer's weights in fp8, which {device} cannot hold "
            f"(torch has no float8 support there); use --memory 24gb-blocks (bf16 blocks streamed to the GPU) "
            f"or --memory 12gb")
    if preset.streams and device.type != "cpu" and not _has_streams(device):
        raise MemoryPresetError(
            f"the {name} preset overlaps weight transfers with compute on CUDA streams, which {device} lacks; "
            f"use --memory 48gb (model CPU offload) or, for less memory, --memory 24gb (fp8 weights)")
    return preset


def enable_memory_preset(pipe, name: str, device=None) -> MemoryPreset:
    """Place `pipe` (a freshly loaded `LynxPipeline`, on the CPU) as preset `name` says, for `device`.

    A preset is applied once: fp8 storage rounds the weights for good and the hooks of different presets do
    not stack, so changing presets means loading the pipeline again.
    """
    from diffusers.hooks import apply_group_offloading

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = check_preset(name, device)
    current = getattr(pipe, "memory_preset", None)
    if current == name:
        return preset
    if current is not None:
        raise InputError(f"this pipeline already runs the {current} memory preset; load it again for {name}")

    if preset.transformer == "gpu":
        pipe.to(device)
    if preset.fp8_weights:
        # Storage in fp8, every layer upcast to the pipeline's dtype just before it runs; diffusers skips the
        # precision-critical layers (norms, patch and condition embeddings) by default.
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                                  compute_dtype=pipe.transformer.dtype)
    if preset.transformer == "model_offload":
        pipe.enable_model_cpu_offload(device=device)
    if preset.streams:
        streams = device.type != "cpu"  # the CPU as onload device (tests) has no streams; diffusers allows it so
        common = dict(onload_device=device, offload_device=torch.device("cpu"), use_stream=streams)
        low_cpu = preset.transformer == "leaf_offload" and streams
        if preset.transformer == "block_offload":
            apply_group_offloading(pipe.transformer, offload_type="block_level", num_blocks_per_group=1, **common)
        else:
            apply_group_offloading(pipe.transformer, offload_type="leaf_level", low_cpu_mem_usage=low_cpu, **common)
        # UMT5 has no top-level block list, so its layers go one by one; it runs once per prompt.
        apply_group_offloading(pipe.text_encoder, offload_type="leaf_level", low_cpu_mem_usage=low_cpu, **common)
        for small in (pipe.vae, pipe.resampler):  # 0.25 GB and 0.1 GB: not worth a transfer per call
            if small is not None:
                small.to(device)
    if preset.vae_tiling:
        pipe.vae.enable_tiling()
    pipe.memory_preset = name
    return preset
