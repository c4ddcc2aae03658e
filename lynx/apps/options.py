"""Model options shared by the front ends (`lynx generate`, `lynx serve`, `lynx bench`): their flags, what can be
checked about them before any weight loads, and loading a pipeline as they ask. Kept apart from the `lynx`
command so the web page uses them without importing the command line."""

from __future__ import annotations

import argparse
import sys

from ..constants import EXPERTS
from ..errors import InputError
from ..runtime import DTYPES

# The preset names, spelled here so that building the parser imports no torch (lynx.pipelines.memory checks
# them against its table).
MEMORY_CHOICES = ("max", "48gb", "24gb", "24gb-blocks", "12gb")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Where the weights are and how to run them: the same flags for `generate` and `serve`."""
    p.add_argument("--base", help="Wan2.1-T2V-14B-Diffusers or Wan2.2-T2V-A14B-Diffusers directory "
                                  "(default $LYNX_MODELS/Wan2.1-T2V-14B-Diffusers)")
    p.add_argument("--base-transformer", metavar="FILE.gguf",
                   help="the transformer's weights from a GGUF file (community Wan2.1-T2V-14B Q4/Q5/Q8 files), kept "
                        "quantized; --base then needs only transformer/config.json besides its other folders")
    p.add_argument("--base-transformer-2", metavar="FILE.gguf",
                   help="Wan2.2 A14B bases: the low-noise expert's weights from a GGUF file")
    p.add_argument("--experts", choices=EXPERTS, default="high",
                   help="Wan2.2 A14B bases: the adapters act on the high-noise expert (default) or on both")
    p.add_argument("--adapter", help="lynx_full or lynx_lite directory (default $LYNX_MODELS/lynx_<variant>)")
    p.add_argument("--variant", choices=("full", "lite"), default="full", help="which default adapter dir to use")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when present)")
    p.add_argument("--attention-backend", help="diffusers attention backend: native, flash, _flash_3, sage, ...")
    p.add_argument("--memory", choices=MEMORY_CHOICES, default=None,
                   help="GPU memory preset: max (80 GB), 48gb, 24gb (fp8 weights), 24gb-blocks (bf16 blocks "
                        "streamed), 12gb (layers streamed); `lynx plan --memory NAME` predicts its peak")
    p.add_argument("--offload", action="store_true",
                   help="the same as --memory 48gb: each model visits the GPU only while it runs")
    p.add_argument("--vae-tiling", action="store_true", help="less memory when decoding: decode the video in tiles")
    p.add_argument("--detector", default="auto", help="face detector: auto, insightface, dlib, dlib-cnn")
    p.add_argument("--face-models", help="directory of face models (default $LYNX_FACE_MODELS or ~/.cache/lynx/face)")
    add_safety_options(p)


def add_safety_options(p: argparse.ArgumentParser) -> None:
    """The NSFW gate before videos are written (docs/safety.md): `generate`, `serve` and `bench`."""
    p.add_argument("--safety-model", help="NSFW image classifier directory "
                                          "(default $LYNX_SAFETY_MODEL or $LYNX_MODELS/nsfw_image_detection)")
    p.add_argument("--no-safety-check", action="store_true",
                   help="write videos without running the NSFW classifier on their frames")


def load_safety_gate(args, device):
    """The gate for the videos this command writes; None when switched off, or absent (after a one-line notice)."""
    if args.no_safety_check:
        return None
    from ..io.safety import load_safety_checker

    return load_safety_checker(args.safety_model, device=device,
                               notify=lambda notice: print(f"lynx {args.command}: {notice}", file=sys.stderr))


def memory_choice(memory: str | None, offload: bool) -> str | None:
    """The preset the options ask for (`--offload` is `48gb`), or None for the plain placement."""
    if offload and memory not in (None, "48gb"):
        raise InputError(f"--offload is the 48gb preset; give either --offload or --memory {memory}, not both")
    return "48gb" if offload else memory


def transformer_files(options) -> dict:
    """The GGUF files that replace the base's transformer weights, from the model options (argparse's namespace
    or `load_pipeline`'s keywords), by the pipeline's component names."""
    get = options.get if isinstance(options, dict) else lambda name: getattr(options, name, None)
    return {"transformer": get("base_transformer"), "transformer_2": get("base_transformer_2")}


def check_model_options(memory, device, quantized: str | None = None) -> None:
    """What about the model options can fail before loading: the memory preset on this device (with a transformer
    quantized by `quantized`, e.g. "gguf")."""
    if memory is not None:
        from ..pipelines.memory import check_preset

        check_preset(memory, device, quantized)


def load_pipeline(base, adapter, *, device, dtype, attention_backend=None, offload=False, vae_tiling=False,
                  memory=None, experts="high", base_transformer=None, base_transformer_2=None):
    """A LynxPipeline placed and tuned as the model options ask."""
    from ..pipelines.pipeline_lynx import LynxPipeline

    memory = memory_choice(memory, offload)
    pipe = LynxPipeline.from_pretrained(base, adapter=adapter, torch_dtype=dtype, device=None if memory else device,
                                        experts=experts, transformer_file=base_transformer,
                                        transformer_2_file=base_transformer_2)
    if memory:
        pipe.enable_memory_preset(memory, device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    if attention_backend:
        pipe.transformer.set_attention_backend(attention_backend)
    return pipe
