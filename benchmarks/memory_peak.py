"""Measure the peak GPU memory of each phase of one video under each memory preset, next to `lynx plan`.

    python benchmarks/memory_peak.py --memory 24gb 12gb --variant full          # real 14B size, random weights
    python benchmarks/memory_peak.py --memory 24gb --lora-rank 64              # with a step-distill-sized LoRA
    python benchmarks/memory_peak.py --size tiny --device cpu                   # smoke run: phases, no numbers

The real size is Wan2.1-T2V-14B + Lynx, UMT5-XXL and the Wan VAE from their released configs
(`lynx.constants`) with random bf16 weights (drawn on the GPU): memory needs no download. The models are built
on the GPU for `max`, in host memory (about 51 GB) for the others, and placed by the preset, exactly as
`lynx generate --memory NAME` places loaded ones. The peak of a phase is `torch.cuda.max_memory_allocated`
between its start and the next phase's (reset at each start); the steps are cut to 2, which changes no peak.
Each phase's seconds are printed too: with real-size text encoder and VAE, they give a clip's time at any step
count (text + reference + steps x the denoising phase's half + decode). Each preset runs in a fresh process
(presets do not stack).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def build(size: str, variant: str, device: str):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from step_time import random_fill
    from transformers import UMT5Config, UMT5EncoderModel

    from lynx import LynxPipeline
    from lynx.constants import (
        UMT5_XXL_CONFIG,
        WAN_14B_TRANSFORMER_CONFIG,
        WAN_VAE_CONFIG,
        full_adapter_config,
        lite_adapter_config,
    )
    from lynx.models.adapters import install_adapters
    from lynx.models.resampler import Resampler
    from lynx.testing import WAN_SCHEDULER_CONFIG, TinyModelConfig, add_tiny_adapters, tiny_components, tiny_tokenizer

    if size == "tiny":
        cfg = TinyModelConfig()
        parts = tiny_components(cfg)
        resampler = add_tiny_adapters(parts["transformer"], variant, cfg)
        return LynxPipeline(**parts, resampler=resampler)
    config = {"full": full_adapter_config, "lite": lite_adapter_config}[variant]()
    # Parameters as shapes first, then filled with random bf16 numbers (drawn on the GPU): no slow initialisers,
    # no fp32 copy of 20 B parameters in host memory. Buffers (RoPE tables) are built as usual.
    with init_empty_weights(include_buffers=False):
        text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL_CONFIG))
        transformer = WanTransformer3DModel(**WAN_14B_TRANSFORMER_CONFIG)
        install_adapters(transformer, config)
        vae = AutoencoderKLWan(**WAN_VAE_CONFIG)
        resampler = Resampler(config.resampler)
    for module in (text_encoder, transformer, vae, resampler):
        random_fill(module, device, torch.bfloat16).to(device, torch.bfloat16).eval()
    return LynxPipeline(tiny_tokenizer(UMT5_XXL_CONFIG["vocab_size"]), text_encoder, vae,
                        UniPCMultistepScheduler.from_config(WAN_SCHEDULER_CONFIG), transformer, resampler)


def measure(args) -> dict:
    """One preset in this process: {phase: peak GiB}."""
    cuda = args.device.startswith("cuda")
    pipe = build(args.size, args.variant, args.device if args.memory == "max" else "cpu")
    pipe.enable_memory_preset(args.memory, args.device)
    lora = 0
    if args.lora_rank:  # after the preset, as `lynx generate --memory NAME --lora FILE` loads it
        from step_time import random_lora

        from lynx.models.lora import lora_bytes

        state = random_lora(pipe.transformer, args.lora_rank)
        lora = lora_bytes(state)  # as `lynx plan --lora` counts it
        pipe.load_lora_weights(state, adapter_name="lora")
    pipe.set_progress_bar_config(disable=True)
    peaks: dict[str, float] = {}
    seconds: dict[str, float] = {}
    current = [None, 0.0]  # the phase, when it started

    def enter(phase):
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if current[0] is not None:
            seconds[current[0]] = seconds.get(current[0], 0.0) + now - current[1]
            if cuda:
                peaks[current[0]] = max(peaks.get(current[0], 0.0), torch.cuda.max_memory_allocated() / 1024 ** 3)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        current[:] = [phase, time.perf_counter()]

    for method, phase in (("encode_text", "text encoding"), ("reference_features", "reference passes"),
                          ("predict_branches", "denoising"), ("decode", "VAE decode")):
        original = getattr(pipe, method)

        def wrapped(*a, _original=original, _phase=phase, **kw):
            if current[0] != _phase:
                enter(_phase)
            return _original(*a, **kw)

        setattr(pipe, method, wrapped)
    emb = torch.nn.functional.normalize(torch.randn(512), dim=0)
    ref = (torch.rand(256, 256, 3) * 255).to(torch.uint8).numpy()
    video = dict(num_frames=args.frames, height=args.height, width=args.width) if args.size == "real" else \
        dict(num_frames=5, height=32, width=32)
    pipe("a person walks", face_embedding=emb, reference_image=ref if args.variant == "full" else None,
         num_inference_steps=2, output_type="latent" if args.no_decode else "np", **video)
    enter(None)
    return {"preset": args.memory, "variant": args.variant, "peaks_gib": peaks, "seconds": seconds,
            "lora_bytes": lora, "device": torch.cuda.get_device_name() if cuda else args.device}


def main() -> None:
    from lynx.pipelines.memory import MEMORY_PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", nargs="+", default=list(MEMORY_PRESETS), choices=list(MEMORY_PRESETS))
    ap.add_argument("--variant", choices=("full", "lite"), default="full")
    ap.add_argument("--size", choices=("real", "tiny"), default="real")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--no-decode", action="store_true", help="stop after denoising")
    ap.add_argument("--lora-rank", type=int, default=0, help="load a random LoRA of this rank on every attention "
                    "and feed-forward projection (lightx2v's step-distill LoRAs: 32 or 64) after the preset")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process of one preset
    args = ap.parse_args()
    if args.one:
        args.memory = args.memory[0]
        print(json.dumps(measure(args)))
        return
    failed = []
    for name in args.memory:
        cmd = [sys.executable, __file__, "--one", "--memory", name, "--variant", args.variant, "--size", args.size,
               "--device", args.device, "--frames", str(args.frames), "--height", str(args.height),
               "--width", str(args.width), "--lora-rank", str(args.lora_rank)] + \
            (["--no-decode"] if args.no_decode else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            failed.append(name)
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        from lynx.pipelines.plan import GIB, plan_memory

        plan = plan_memory(name, args.variant, args.frames, args.height, args.width,
                           lora=result["lora_bytes"]) if args.size == "real" else None
        predicted = {p.phase: p.total / GIB for p in plan.phases} if plan else {}
        for phase, gib in result["peaks_gib"].items():
            print(f"{name:12s} {args.variant} {phase:18s} measured {gib:6.2f} GiB   predicted "
                  f"{predicted.get(phase, float('nan')):6.2f} GiB   {result['seconds'][phase]:7.1f} s"
                  f"{' (2 steps)' if phase == 'denoising' else ''}   ({result['device']})")
        if not result["peaks_gib"]:
            lora = f" with a rank-{args.lora_rank} LoRA" if args.lora_rank else ""
            print(f"{name:12s} {args.variant} ran on {result['device']}{lora} (no CUDA: nothing measured)")
    if failed:  # the others still ran; a session script must still see that this run is not complete
        sys.exit(f"{Path(__file__).name}: error: {len(failed)} of {len(args.memory)} preset(s) failed: "
                 f"{', '.join(failed)} (their errors are above)")


if __name__ == "__main__":
    main()
