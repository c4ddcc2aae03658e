"""Quantized Wan transformers: community GGUF files and diffusers' quantization configs (torchao, bitsandbytes).

A GGUF file (city96's Wan2.1-T2V-14B Q4/Q5/Q8 files, ComfyUI's loaders) holds the transformer under the original
Wan key names; diffusers' `from_single_file` renames them and keeps the quantized matrices packed
(`GGUFQuantizationConfig`), dequantizing each one to the compute dtype as its layer runs. The file's header is
checked against the base's transformer config first: a GGUF of another model is refused in a second, naming the
file, instead of failing after gigabytes were read. The Lynx adapters are installed after any quantized load, so
no quantizer ever sees them: they stay in the pipeline's dtype.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..constants import KNOWN_BASES
from ..errors import CheckpointError, InputError, WeightsNotFoundError

# Some conversions keep the ComfyUI/LDM prefix; diffusers' converter strips it, and so does the check.
GGUF_PREFIX = "model.diffusion_model."
GGUF_SUFFIXES = (".gguf",)
# A Wan transformer always has these (original key names): the first attention and the patch embedding.
_PROBE = "blocks.0.self_attn.q.weight"
_PATCH = "patch_embedding.weight"


@dataclass(frozen=True)
class GGUFTransformer:
    """What a GGUF file's header says about the Wan transformer inside (no tensor data read)."""

    path: Path
    blocks: int
    width: int
    in_channels: int
    ffn_dim: int
    text_dim: int
    image_to_video: bool
    quant_types: Counter = field(default_factory=Counter)  # "Q8_0" -> number of tensors

    def describe(self) -> str:
        name = KNOWN_BASES.get((self.blocks, self.width, self.in_channels))
        return (f"{name + '-shaped ' if name else ''}({self.blocks} blocks of width {self.width}, "
                f"{self.in_channels} input channels)")

    @property
    def quantization(self) -> str:
        """'Q4_K 240, F32 400, ...': the tensor types, most frequent first."""
        return ", ".join(f"{k} {n}" for k, n in self.quant_types.most_common())


def is_gguf(path) -> bool:
    return Path(path).suffix.lower() in GGUF_SUFFIXES


def inspect_gguf(path) -> GGUFTransformer:
    """Read a GGUF file's header and tensor table (the data is memory-mapped, never read) and describe the Wan
    transformer it holds; a file that is no GGUF, or no Wan transformer, is a CheckpointError naming it."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"transformer file {path} does not exist")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, struct and numpy errors for foreign or truncated files
        raise CheckpointError(f"{path} could not be read as GGUF ({type(e).__name__}: {e}); the file is damaged "
                              f"or not a GGUF file") from None
    # GGUF lists dimensions innermost first; torch's order is the reverse.
    shapes = {t.name.removeprefix(GGUF_PREFIX): tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    if _PROBE not in shapes or _PATCH not in shapes:
        arch = reader.get_field("general.architecture")
        arch = f" (its general.architecture is {arch.contents()!r})" if arch is not None else ""
        raise CheckpointError(f"{path} is not a Wan transformer GGUF{arch}: it has no {_PROBE}; use a GGUF of "
                              f"Wan2.1-T2V-14B (e.g. city96/Wan2.1-T2V-14B-gguf)")
    blocks = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks.") and k.split(".")[1].isdigit())
    return GGUFTransformer(
        path=path, blocks=blocks, width=shapes[_PROBE][0], in_channels=shapes[_PATCH][1],
        ffn_dim=shapes.get("blocks.0.ffn.0.weight", (0,))[0], text_dim=shapes.get("text_embedding.0.weight", (0, 0))[1],
        image_to_video=any(".k_img." in k or k.startswith("img_emb.") for k in shapes),
        quant_types=Counter(t.tensor_type.name for t in reader.tensors))


def check_gguf_fits(path, config: dict, config_source) -> GGUFTransformer:
    """The GGUF transformer at `path` if it has the shape of the base transformer `config` (read from
    `config_source`); anything else is refused with one line naming both."""
    found = inspect_gguf(path)
    if found.image_to_video:
        raise CheckpointError(f"{path} is an image-to-video Wan transformer {found.describe()}; the Lynx adapters "
                              f"act on text-to-video Wan: use a GGUF of Wan2.1-T2V-14B")
    want = (config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"],
            config.get("in_channels", 16), config["ffn_dim"], config["text_dim"])
    have = (found.blocks, found.width, found.in_channels, found.ffn_dim, found.text_dim)
    if have != want:
        name = KNOWN_BASES.get(want[:3])
        expected = (f"{name + '-shaped ' if name else ''}({want[0]} blocks of width {want[1]}, {want[2]} input "
                    f"channels, FFN {want[3]}, text {want[4]})")
        raise CheckpointError(f"{path} holds a Wan transformer {found.describe()[:-1]}, FFN {found.ffn_dim}, text "
                              f"{found.text_dim}) but the base's transformer ({config_source}) is {expected}: use a "
                              f"GGUF of {name or 'the same model as the base'}")
    return found


def load_gguf_transformer(path, base_dir, compute_dtype: torch.dtype, subfolder: str = "transformer"):
    """diffusers' `from_single_file` on a checked GGUF file, with the base's transformer config; quantized
    matrices stay packed and are dequantized to `compute_dtype` as their layers run."""
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

    try:
        return WanTransformer3DModel.from_single_file(
            str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype),
            config=str(base_dir), subfolder=subfolder, torch_dtype=compute_dtype)
    except Exception as e:  # the header fitted, so this is damage past the header, or an unsupported type
        raise CheckpointError(f"{path} could not be loaded ({type(e).__name__}: {' '.join(str(e).split())[:400]})"
                              ) from None


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_quantized", False))


def quantization_name(model) -> str | None:
    """'gguf', 'torchao', 'bitsandbytes', ... for a model loaded through a diffusers quantizer, else None."""
    if not is_quantized(model):
        return None
    method = getattr(model, "quantization_method", None)
    return str(getattr(method, "value", method) or "quantized")


def component_quantization(quantization_config, name: str, is_diffusers: bool):
    """The quantization config of pipeline component `name`: a diffusers `PipelineQuantizationConfig` resolves
    it per component; a single diffusers config applies to the transformers only."""
    if quantization_config is None:
        return None
    if hasattr(quantization_config, "_resolve_quant_config"):
        return quantization_config._resolve_quant_config(is_diffusers=is_diffusers, module_name=name)
    if not hasattr(quantization_config, "quant_method"):
        raise InputError(f"quantization_config must be a diffusers quantization config (TorchAoConfig, "
                         f"BitsAndBytesConfig, ...) or a PipelineQuantizationConfig, not "
                         f"{type(quantization_config).__name__}")
    return quantization_config if name in ("transformer", "transformer_2") else None


def cast_plain_weights(model, dtype: torch.dtype, keep=()) -> None:
    """Cast every floating parameter and buffer that a quantizer left as a plain tensor to `dtype` (packed and
    quantized tensors untouched, and the buffers of the modules in `keep`): what `.to(dtype)` does for an
    unquantized model, which diffusers refuses on a quantized one."""
    kept = {id(b) for m in keep for b in m.buffers()}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or type(t.data) is not torch.Tensor or not t.is_floating_point() or t.dtype == dtype:
                    continue
                if id(t) in kept:
                    continue
                cast = t.data.to(dtype)
                store[name] = torch.nn.Parameter(cast, requires_grad=t.requires_grad) \
                    if isinstance(t, torch.nn.Parameter) else cast
