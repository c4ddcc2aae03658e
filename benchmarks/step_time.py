"""Time one denoising step of LynxPipeline against diffusers' plain WanPipeline on the same model, in one process.

    python benchmarks/step_time.py                      # tiny and small random models on CPU
    python benchmarks/step_time.py --sizes small --device cuda --dtype bf16
    python benchmarks/step_time.py --sizes real --device cuda --dtype bf16 --steps 2 --repeats 1   # 14B size, random

The "real" size is Wan2.1-14B's shape (40 blocks, 5120 wide) at 81x480x832 with random weights built on
the device: the time and peak memory of a step need no download. Its pipelines share one transformer
(three copies would not fit) and run one after the other instead of interleaved.

All pipelines run identical weights (VAE and text encoder shared, each its own transformer copy), runs
interleaved; only the per-step work differs:
Wan runs 2 transformer passes per step (cond, uncond); Lynx full runs 3 (c, i, u) plus the adapter
attentions in every block, Lynx lite runs 2 plus the ID attentions in every second block. The one-off
reference pass (full) is timed separately. Random weights: this measures speed, never quality.
"""

from __future__ import annotations

import argparse
import statistics
import time

import diffusers
import torch

from lynx import LynxPipeline
from lynx.constants import ResamplerConfig
from lynx.models.adapters import processors
from lynx.testing import TinyModelConfig, add_tiny_adapters, tiny_components

SIZES = {
    "tiny": (TinyModelConfig(), dict(height=32, width=32, num_frames=5)),
    "small": (TinyModelConfig(num_layers=8, num_heads=8, head_dim=48, ffn_dim=1024, text_dim=64),
              dict(height=128, width=128, num_frames=9)),
    "real": (TinyModelConfig(num_layers=40, num_heads=40, head_dim=128, ffn_dim=13824, text_dim=4096, freq_dim=256,
                             resampler=ResamplerConfig(output_dim=2048)),
             dict(height=480, width=832, num_frames=81)),
}
# Sizes whose pipelines share one transformer (installing and removing the adapters between runs).
SHARED_TRANSFORMER = {"real"}


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def step_times(pipe, call_kwargs, steps, device) -> list[float]:
    stamps = []

    def stamp(p, i, t, tensors):
        _sync(device)
        stamps.append(time.perf_counter())
        return {}

    pipe.set_progress_bar_config(disable=True)
    _sync(device)
    stamps.append(time.perf_counter())
    pipe(**call_kwargs, num_inference_steps=steps, output_type="latent", callback_on_step_end=stamp)
    # The first interval also holds text encoding and (Lynx) the reference pass: drop it.
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


def bench(size: str, steps: int, device: str, dtype: torch.dtype, repeats: int) -> dict:
    import copy

    from diffusers import WanPipeline

    cfg, video = SIZES[size]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in place on the device, in the run's dtype: no fp32 copy of 14B
    try:
        with torch.device(device):
            parts = tiny_components(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    emb = torch.nn.functional.normalize(torch.randn(512), dim=0)
    ref = (torch.rand(256, 256, 3) * 255).to(torch.uint8).numpy()
    common = dict(prompt="a person walks", negative_prompt="", **video)
    shared = size in SHARED_TRANSFORMER
    runs = {"wan (2 passes)": (WanPipeline(**parts), None, dict(guidance_scale=5.0))}
    for variant, passes in (("full", 3), ("lite", 2)):
        # Identical weights; unless shared, Lynx gets its own transformer copy so Wan keeps diffusers' processors.
        transformer = parts["transformer"] if shared else copy.deepcopy(parts["transformer"])
        lynx = LynxPipeline(**{**parts, "transformer": transformer})
        runs[f"lynx {variant} ({passes} passes)"] = (
            lynx, variant, dict(face_embedding=emb, reference_image=ref if variant == "full" else None))

    def install(pipe, variant):
        # Seeded: the same random adapter weights at every install.
        with torch.device(device):
            resampler = add_tiny_adapters(pipe.transformer, variant, cfg)
        pipe.register_modules(resampler=resampler.to(dtype))
        for proc in processors(pipe.transformer):
            proc.to(dtype)

    def run(name, n):
        pipe, variant, kw = runs[name]
        if variant is not None and (shared or pipe.resampler is None):
            install(pipe, variant)
        try:
            return step_times(pipe, {**common, **kw}, n, device)
        finally:
            if variant is not None and shared:
                pipe.unload_lynx_adapters()  # the shared transformer gets diffusers' processors back

    for name, (pipe, ad, _) in runs.items():
        pipe.to(device=device, dtype=dtype)
        run(name, 2)  # warm-up: allocator, thread pool, kernel selection
    results = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so a slow spell of the machine hits every pipeline alike
        for name in runs:
            if str(device).startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            results[name].append(statistics.median(run(name, steps)))
            if str(device).startswith("cuda"):
                peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    full, _, _ = runs["lynx full (3 passes)"]
    if full.resampler is None:
        install(full, "full")
    t0 = time.perf_counter()
    full.reference_features(ref, torch.Generator().manual_seed(1))
    _sync(device)
    results["lynx full reference pass (once per video)"] = [time.perf_counter() - t0]
    return {k: min(v) for k, v in results.items()}


peaks: dict[str, float] = {}  # CUDA peak memory of each pipeline's timed run, GiB


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    print(f"device {args.device}, dtype {args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for size in args.sizes:
        r = bench(size, args.steps, args.device, dtype, args.repeats)
        base = r["wan (2 passes)"]
        print(f"\n{size}: {SIZES[size][1]}")
        for name, seconds in r.items():
            peak = f"   peak {peaks[name]:.1f} GiB" if name in peaks else ""
            print(f"  {name:45s} {seconds * 1e3:9.2f} ms   x{seconds / base:5.2f} of Wan's step{peak}")
        print(f"  per transformer pass: full x{r['lynx full (3 passes)'] / 3 / (base / 2):.2f}, "
              f"lite x{r['lynx lite (2 passes)'] / 2 / (base / 2):.2f} of a plain Wan pass")


if __name__ == "__main__":
    main()
