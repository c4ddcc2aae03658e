"""Wan2.1-T2V LoRAs on the Lynx transformer: read the key layouts people share, check they fit, switch them off.

Loading itself is diffusers' (`WanLoraLoaderMixin` + peft). This module adds what Lynx needs around it:

- the layouts in circulation, normalised to diffusers' before diffusers converts them: diffusers' own
  (`transformer.blocks.0.attn1.to_q.lora_A.weight`, also saved without the `transformer.` prefix), the
  original Wan / lightx2v / DiffSynth layout (`diffusion_model.blocks.0.self_attn.q.lora_A.weight`, `.diff_b`
  biases, also without the prefix and with peft's `.default`) and kohya / ComfyUI (`... .lora_down.weight`,
  `.lora_up.weight`, `.alpha`; musubi's `lora_unet_blocks_0_...` too);
- a check against the transformer's depth and width that names the file (peft would fail on a shape
  deep inside, or silently skip blocks the model does not have);
- `lora_off`: the reference passes see the backbone the adapters were trained with, every LoRA off.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from ..constants import transformer_dims
from ..errors import CheckpointError, InputError

# Module names of the original Wan checkpoints, as `_convert_non_diffusers_wan_lora_to_diffusers` expects them.
_ORIGINAL_BLOCK_KEY = re.compile(r"^blocks\.\d+\.(self_attn|cross_attn|ffn|norm\d?|modulation)")
_DIFFUSERS_BLOCK_KEY = re.compile(r"^blocks\.\d+\.(attn1|attn2|ffn|norm\d?|scale_shift_table)\.")
_LORA_KEY = re.compile(r"^transformer\.(.+)\.lora_([AB])\.weight$")


# Suffixes of the files a LoRA comes in; diffusers reads `.safetensors` as safetensors and any other as torch.load.
LORA_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def lora_file_problem(path) -> str | None:
    """What makes the file at `path` unreadable as a LoRA, said after its name ("is not a safetensors file ..."),
    or None. Reads its first bytes and, for safetensors, its header: a LoRA can be hundreds of MB, and front ends
    check it before any model loads."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(b"version "):
                return "is a Git LFS pointer, not the weights (run `git lfs pull`, or download the file itself)"
            if path.suffix != ".safetensors":  # what diffusers then does: torch.load, which needs a zip or a pickle
                if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
                    return None
                return "is neither a safetensors file nor a PyTorch checkpoint (a damaged or partial download?)"
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = json.loads(f.read(length)) if 0 < length <= size - 8 else None
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        return "is not a safetensors file (damaged, or another format under a .safetensors name)"
    ends = [t.get("data_offsets", [0, 0])[1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    if 8 + length + max(ends, default=0) > size:
        return f"is cut short ({size} bytes, its header describes more): download it again"
    return None


def _original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare original-layout keys (DiffSynth-Studio's, peft's `.default`) -> `diffusion_model.` keys."""
    return {"diffusion_model." + k.replace(".default.", "."): v for k, v in state.items()}


def read_lora(source, **kwargs) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """A LoRA file (or state dict) -> (state dict in diffusers' layout, its peft metadata or None, a name for
    messages). `kwargs` go to diffusers' `lora_state_dict` (weight_name, subfolder, ...)."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    name = "the given LoRA state dict" if isinstance(source, dict) else str(source)
    if isinstance(source, Path):
        source = str(source)
    if isinstance(source, str) and source.endswith((".safetensors", ".bin", ".pt", ".pth")) \
            and not Path(source).is_file():
        raise InputError(f"LoRA file {source} does not exist")
    try:
        state, metadata = WanLoraLoaderMixin.lora_state_dict(
            source.copy() if isinstance(source, dict) else source, return_lora_metadata=True, **kwargs)
        keys = list(state)
        if keys and all(_ORIGINAL_BLOCK_KEY.match(k) or not k.startswith("blocks.") for k in keys) \
                and any(_ORIGINAL_BLOCK_KEY.match(k) for k in keys):
            state = WanLoraLoaderMixin.lora_state_dict(_original_layout(state))
        elif keys and all(_DIFFUSERS_BLOCK_KEY.match(k) or not k.startswith("blocks.") for k in keys) \
                and not any(k.startswith("transformer.") for k in keys):
            state = {"transformer." + k: v for k, v in state.items()}
    except OSError as e:  # diffusers' reader on a damaged file, or one in another format
        raise CheckpointError(f"{name} could not be read as a LoRA: {' '.join(str(e).split())[:300]}") from None
    except (ValueError, KeyError) as e:  # diffusers' converters raise these on layouts they do not know
        raise CheckpointError(f"{name} is not a Wan LoRA in a layout diffusers reads (diffusers, original Wan / "
                              f"lightx2v, kohya / ComfyUI, musubi): {' '.join(str(e).split())[:300]}") from None
    if not state or not all(k.startswith("transformer.") for k in state):
        other = sorted({k.split(".")[0] for k in state if not k.startswith("transformer.")})[:5]
        raise CheckpointError(f"{name} holds no Wan transformer LoRA weights"
                              + (f" (its keys start with {', '.join(other)})" if other else ""))
    plain = [k for k in state if "lora" not in k]
    if plain:
        raise CheckpointError(f"{name} is not a LoRA: `{plain[0]}` is a full weight, not a lora_A/lora_B "
                              "(lora_down/lora_up) matrix")
    return state, metadata, name


def lora_bytes(source, transformer: nn.Module | None = None, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes a LoRA's weights take inside the transformer, in `dtype`: peft holds them in the dtype the layers
    compute in (bf16 on a GPU, also under fp8 storage). What `lynx plan --lora` adds to the weights; checked
    against `transformer` (its depth and width) when given."""
    state, _, name = read_lora(source)
    if transformer is not None:
        check_lora(transformer, state, name)
    return sum(t.numel() for t in state.values()) * torch.empty((), dtype=dtype).element_size()


def lora_shape(state: dict[str, torch.Tensor]) -> tuple[int, int | None]:
    """(blocks the LoRA reaches, width it was made for, None if no self-attention query is in it)."""
    blocks = {int(m.group(1)) for k in state for m in [re.match(r"^transformer\.blocks\.(\d+)\.", k)] if m}
    width = next((v.shape[1] for k, v in state.items() if re.search(r"\.attn1\.to_q\.lora_A\.weight$", k)), None)
    return (max(blocks) + 1 if blocks else 0), width


def check_lora(transformer: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Raise a `CheckpointError` naming `name` unless every LoRA matrix fits a layer of `transformer`."""
    num_blocks, width = transformer_dims(transformer.config)
    lora_blocks, lora_width = lora_shape(state)
    if lora_blocks > num_blocks or (lora_width is not None and lora_width != width):
        made = f"{lora_blocks}+ blocks" + (f" of width {lora_width}" if lora_width else "")
        raise CheckpointError(
            f"{name} is a LoRA for a Wan transformer with {made}; this one has {num_blocks} blocks of width "
            f"{width}. Use a LoRA made for this base (Wan2.1-T2V-14B: 40 blocks of width 5120; 1.3B: 30 x 1536).")
    for key, value in state.items():
        m = _LORA_KEY.match(key)
        if m is None:
            continue
        path, which = m.groups()
        try:
            layer = transformer.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"{name} has weights for `{path}`, which this Wan2.1 text-to-video transformer "
                                  "does not have (a LoRA for another model, e.g. image-to-video?)") from None
        layer = getattr(layer, "base_layer", layer)  # already wrapped by an earlier LoRA
        expected = layer.in_features if which == "A" else layer.out_features
        got = value.shape[1] if which == "A" else value.shape[0]
        if got != expected:
            raise CheckpointError(f"{name}: `{path}` expects {expected} features, the LoRA has {got}; it was made "
                                  f"for another model size")


def _tuner_layers(module: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def lora_follows_compute_dtype(transformer: nn.Module) -> None:
    """Make LoRAs loaded into `transformer` from now on hold the dtype its layers compute in, not the fp8 they
    are stored in (diffusers' layerwise casting: the 24gb memory preset).

    peft gives a new LoRA the dtype of the layer it wraps unless that layer names a `compute_dtype` (as bnb's and
    diffusers' GGUF layers do). A LoRA stored in fp8 would be rounded on loading and then fail the first step (no
    matrix product takes float8, and the casting hooks skip LoRA layers); in the compute dtype it is exact, about
    0.6 GB in bf16 at rank 64 on every projection of the 14B model.
    """
    from diffusers.hooks import HookRegistry

    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        casting = registry.get_hook("layerwise_casting") if isinstance(registry, HookRegistry) else None
        if casting is not None and not hasattr(module, "compute_dtype"):
            module.compute_dtype = casting.compute_dtype


@contextlib.contextmanager
def lora_off(transformer: nn.Module):
    """Inside the block every LoRA of `transformer` is off; each layer's own on/off state comes back after."""
    try:
        layers = _tuner_layers(transformer)
    except ImportError:  # no peft, so no LoRA
        layers = []
    if any(getattr(m, "merged", False) for m in layers):
        raise InputError("a LoRA is fused into the transformer, so the reference pass cannot run without it; "
                         "call pipe.unfuse_lora() (Lynx needs LoRAs it can switch off)")
    was_off = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, off in zip(layers, was_off):
            m.enable_adapters(not off)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`FILE[:SCALE]` -> (FILE, SCALE); a colon followed by something that is not a number is part of FILE."""
    path, sep, scale = spec.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


def adapter_name(path: str, taken) -> str:
    """A peft adapter name from a file name, unique among `taken`."""
    base = re.sub(r"[^A-Za-z0-9_]+", "_", Path(path).stem).strip("_") or "lora"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name
