"""Model and speed options shared by the front ends (`lynx generate`, `lynx serve`, `lynx bench`): their flags, what
can be checked about them before any weight loads, and loading and setting up a pipeline as they ask. Kept apart
from the `lynx` command so the web page uses them without importing the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..constants import DTYPE_NAMES, EXPERTS
from ..errors import InputError

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
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default bf16 on CUDA, fp32 on CPU")
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


def check_input_file(path, flag: str) -> None:
    """An input file named by `flag` is there and is a file; otherwise one line saying which of the two is wrong
    (a folder passed where a file goes is not "missing")."""
    if Path(path).is_dir():
        raise InputError(f"{flag}: {path} is a folder, not a file")
    if not Path(path).is_file():
        raise InputError(f"{flag}: input file {path} does not exist")


def check_model_folder(path, flag: str) -> None:
    """A model directory option that names a file: said so (the download checks would call it missing, and offer
    to download over it)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise InputError(f"{flag} {path} is a file, not a folder: give the model's directory")


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


# ----- speed: LoRAs, presets, compilation (docs/speed.md) -------------------------------------------------------
SPEED_CHOICES = ("exact", "fast", "turbo")  # lynx.pipelines.speed.SPEEDS, spelled here to keep torch unimported


def add_speed_options(p: argparse.ArgumentParser) -> None:
    """LoRAs, the speed presets and compilation: how the model runs (the strength knobs are generation settings)."""
    s = p.add_argument_group("speed")
    s.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="a Wan2.1-T2V LoRA (diffusers, original Wan/lightx2v or kohya/ComfyUI layout); repeatable; "
                        "off for the reference pass")
    s.add_argument("--speed", choices=SPEED_CHOICES, default="exact",
                   help="exact: the authors' recipe; fast: SeaCache per guidance branch + identity guidance in "
                        "the first 40%% of the steps; turbo: a step-distill --lora, 4 steps, guidance 1, lower "
                        "Lynx strength. Generation settings given explicitly override the preset")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (regional, whole-graph); the first step is slow")


def check_speed_options(speed: str, lora_specs, compile: bool = False, memory: str | None = None
                        ) -> list[tuple[str, float]]:
    """The LoRAs of `--lora` specs as (file, scale), checked before any model loads: turbo needs one, each scale is
    a number and each file a readable LoRA file; `--compile` goes with the speed and memory presets."""
    from ..pipelines.speed import compile_refusal

    refusal = compile_refusal(speed, memory) if compile else None
    if refusal:
        raise InputError(refusal)
    loras = [_checked_lora(spec) for spec in lora_specs or []]
    if speed == "turbo" and not loras:
        raise InputError("--speed turbo needs a step-distill LoRA: add --lora FILE (e.g. lightx2v's Wan2.1-T2V-14B "
                         "StepDistill-CfgDistill rank-32/64 LoRA)")
    return loras


def _checked_lora(spec: str) -> tuple[str, float]:
    """One `--lora FILE[:SCALE]` as (file, scale), its file checked without reading its weights."""
    import math

    from ..models.lora import LORA_SUFFIXES, lora_file_problem, parse_lora_spec

    path, scale = parse_lora_spec(spec)
    head, colon, tail = spec.rpartition(":")
    # `FILE:abc` parses as a file named "FILE:abc"; when FILE is the LoRA, the typo is the scale, not the file.
    if path == spec and colon and not Path(spec).exists() and (Path(head).is_file() or head.endswith(LORA_SUFFIXES)):
        raise InputError(f"--lora {spec}: the scale {tail!r} is not a number (write FILE:SCALE, e.g. {head}:0.8)")
    if not math.isfinite(scale):
        raise InputError(f"--lora {spec}: the scale {scale} is not a finite number (write FILE:SCALE, e.g. "
                         f"{path}:0.8)")
    check_input_file(path, "--lora")
    problem = lora_file_problem(path)
    if problem:
        raise InputError(f"--lora {path} {problem}")
    return path, scale


def speed_setup(pipe, speed: str, loras, compile: bool = False, settings=None) -> list[str]:
    """Load the LoRAs into `pipe`, apply the speed preset and compile if asked; a line per setting (printed by the
    front end), with the values of the resolved `settings` when given (knobs given explicitly win over the preset's,
    and the lines say so). The preset's knob values go in the settings (`preset_settings`), its step grid in the
    call (`speed_sigmas`)."""
    from ..pipelines import speed as speeds

    lines = speeds.load_loras(pipe, loras)
    lines += speeds.apply_speed(pipe, speed, loras, settings)[1]
    if compile:
        lines.append(speeds.compile_transformer(pipe.transformer))
    return lines


def speed_sigmas(speed: str, num_steps: int):
    """The step grid the preset samples on, for `num_steps` steps (None: the scheduler's own)."""
    if speed != "turbo":
        return None
    from ..pipelines.speed import turbo_sigmas

    return turbo_sigmas(num_steps)


def speed_record(speed: str, loras, compile: bool = False) -> dict:
    """The sidecar's "speed": the preset, the LoRAs with their scales, compilation."""
    return {"preset": speed, "loras": [{"path": str(Path(p).resolve()), "scale": w} for p, w in loras],
            "compile": compile}


def speed_flags(speed: str, loras, compile: bool = False) -> list[str]:
    """The same as `lynx generate` flags (absolute LoRA paths: the command runs from any folder)."""
    return ((["--speed", speed] if speed != "exact" else [])
            + [a for p, w in loras for a in ("--lora", f"{Path(p).resolve()}:{w}")]
            + (["--compile"] if compile else []))
