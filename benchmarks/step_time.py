"""Time one denoising step of LynxPipeline against diffusers' plain WanPipeline on the same model, in one process,
beside the ratio the FLOP count predicts (docs/benchmarks.md).

    python benchmarks/step_time.py                      # small and medium random models on CPU
    python benchmarks/step_time.py --breakdown --profile  # where the FLOPs and (CPU) the time go
    python benchmarks/step_time.py --sizes small --device cuda --dtype bf16
    python benchmarks/step_time.py --sizes real --device cuda --dtype bf16 --steps 2 --repeats 1   # 14B size, random
    python benchmarks/step_time.py --sizes real --device cuda --dtype bf16 --clip --speed fast --peak-tflops 989

The "real" size is Wan2.1-14B's shape (40 blocks, 5120 wide) at 81x480x832 with random weights built on
the device: the time and peak memory of a step need no download. Its pipelines share one transformer
(three copies would not fit) and run one after the other instead of interleaved.

All pipelines run identical weights (VAE and text encoder shared, each its own transformer copy and scheduler);
their generations run at once, taking turns one denoising step at a time, so each step of one is timed beside a
step of every other (`interleaved`); only the per-step work differs:
Wan runs 2 transformer passes per step (cond, uncond); Lynx full runs 3 (c, i, u) plus the adapter
attentions in every block, Lynx lite runs 2 plus the ID attentions in every second block; the control is
lite with its ID branch off (Wan's passes less the text keys/values, no adapter work), so Lynx / control
is the adapters' own cost. The one-off reference pass (full) is timed separately. Random weights: this
measures speed, never quality.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass

import diffusers
import torch
from accelerate import init_empty_weights

from lynx import LynxPipeline
from lynx.constants import MAX_TEXT_TOKENS, ResamplerConfig
from lynx.models.adapters import processors
from lynx.pipelines import speed as speeds
from lynx.pipelines.pipeline_lynx import REFERENCE_SIZE
from lynx.testing import TinyModelConfig, add_tiny_adapters, tiny_adapter_config, tiny_components

# CPU sizes where operators, not Python, take the time (the tiny test models of 24 channels are all per-op
# overhead and predict nothing). Heads are 128 wide as in every Wan2.1/2.2 model: CPU attention kernels run at
# 80-90 % of their 128-wide rate with 48- or 64-wide heads, a slowdown no real run has. At "small" the 256
# reference and 512 text tokens outnumber the 192 video tokens and a tenth of the step is work the FLOP count
# leaves out (norms, modulation, RoPE, GELU, copies); at "medium" matrix products and attention dominate.
SIZES = {
    "small": (TinyModelConfig(num_layers=4, num_heads=3, head_dim=128, ffn_dim=1536, text_dim=64),
              dict(height=128, width=128, num_frames=9)),
    "medium": (TinyModelConfig(num_layers=4, num_heads=4, head_dim=128, ffn_dim=2048, text_dim=64),
               dict(height=256, width=256, num_frames=9)),
    "real": (TinyModelConfig(num_layers=40, num_heads=40, head_dim=128, ffn_dim=13824, text_dim=4096, freq_dim=256,
                             resampler=ResamplerConfig(output_dim=2048)),
             dict(height=480, width=832, num_frames=81)),
}
# Sizes whose pipelines share one transformer (installing and removing the adapters between runs).
SHARED_TRANSFORMER = {"real"}


@dataclass(frozen=True)
class Tokens:
    video: int  # L: latent frames x (height / 16) x (width / 16)
    text: int = MAX_TEXT_TOKENS  # T: prompts are always padded to 512 tokens
    reference: int = (REFERENCE_SIZE // 16) ** 2  # S: the 256x256 crop -> 32x32 latent -> 16x16 patches


def tokens(video: dict) -> Tokens:
    frames = (video["num_frames"] - 1) // 4 + 1  # the VAE keeps the first frame and packs 4 per latent after it
    return Tokens(frames * (video["height"] // 16) * (video["width"] // 16))


def flop_parts(cfg: TinyModelConfig, video: dict, variant: str | None = None) -> dict[str, float]:
    """FLOPs (multiply-adds x 2) of one transformer pass in a denoising step after the first, by where they go:
    the formula of docs/benchmarks.md. `variant` None is diffusers' Wan; "full"/"lite" Lynx, whose text and
    adapter keys/values were computed at the first step and are reused; "off" Lynx with its adapters switched off
    (ip_scale=0): Wan's pass less the text keys/values, the control of `bench`."""
    n, D, F, C = cfg.num_layers, cfg.hidden_dim, cfg.ffn_dim, cfg.vae_z_dim
    t = tokens(video)
    L, T, S = t.video, t.text, t.reference
    parts = {
        # time embedder (freq -> D -> D) and its 6 modulations: once per pass, for the whole batch
        "patchify, head, embedders": 2 * L * (4 * C) * D * 2 + 2 * T * (cfg.text_dim * D + D * D)
        + 2 * (cfg.freq_dim * D + D * D + D * 6 * D),
        "self-attention q/k/v/out": n * 8 * L * D * D,
        "self-attention scores, values": n * 4 * L * L * D,
        "cross-attention q/out": n * 4 * L * D * D,
        "cross-attention scores, values": n * 4 * L * T * D,
        "cross-attention text k/v": n * 4 * T * D * D if variant is None else 0,  # Lynx: once per prompt
        "feed-forward": n * 4 * L * D * F,
    }
    if variant in ("full", "lite"):
        adapters = tiny_adapter_config(variant, cfg)
        q = adapters.resampler.num_queries + adapters.num_registers
        parts["ID-adapter attention"] = len(adapters.ip_blocks) * 4 * L * q * D
        parts["Ref-adapter attention"] = n * 4 * L * S * D if adapters.use_ref else 0
    return parts


def pass_flops(cfg: TinyModelConfig, video: dict, variant: str | None = None) -> float:
    return sum(flop_parts(cfg, video, variant).values())


def predicted_ratio(cfg: TinyModelConfig, video: dict, variant: str) -> float:
    """Lynx step / Wan step by the FLOP count: passes x per-pass FLOPs (full 3 passes, lite, off and Wan 2)."""
    passes = 3 if variant == "full" else 2
    return passes * pass_flops(cfg, video, variant) / (2 * pass_flops(cfg, video))


# CPU: the measuring thread's own CPU time (on one intra-op thread), not wall time: the development machine is
# shared, and a neighbour's load stretches wall time (by 3x and more) but not the CPU time this thread is given.
# CUDA: wall time after a synchronize.
clock = time.perf_counter
cpu_settings = False  # main sets them for CPU runs: one intra-op thread, subnormals flushed


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def step_times(pipe, call_kwargs, steps, device, profiler=None) -> list[float]:
    """Seconds of each denoising step after the first; `profiler` (started after step 0) records those steps."""
    stamps = []

    def stamp(p, i, t, tensors):
        _sync(device)
        if i == 0 and profiler is not None:
            profiler.start()
        stamps.append(clock())
        return {}

    pipe.set_progress_bar_config(disable=True)
    _sync(device)
    stamps.append(clock())
    pipe(**call_kwargs, num_inference_steps=steps, output_type="latent", callback_on_step_end=stamp)
    if profiler is not None:
        profiler.stop()
    # The first interval also holds text encoding and (Lynx) the reference pass: drop it.
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


def bench(size: str, steps: int, device: str, dtype: torch.dtype, repeats: int, profile: bool = False) -> dict:
    """Step times of every pipeline at `size`: name -> samples, aligned across pipelines (the i-th sample of each
    was taken at the same time), plus the one-off reference pass."""
    import copy

    from diffusers import WanPipeline

    cfg, video = SIZES[size]
    parts = build(cfg, device, dtype)
    emb = torch.nn.functional.normalize(torch.randn(512), dim=0)
    ref = (torch.rand(256, 256, 3) * 255).to(torch.uint8).numpy()
    common = dict(prompt="a person walks", negative_prompt="", **video)
    shared = size in SHARED_TRANSFORMER

    def pipeline(cls, transformer=None):
        # Each its own scheduler: a scheduler counts the steps of the generation it serves, and interleaved
        # generations would advance one another's.
        return cls(**{**parts, "scheduler": copy.deepcopy(parts["scheduler"]),
                      "transformer": transformer or parts["transformer"]})

    runs = {"wan (2 passes)": (pipeline(WanPipeline), None, dict(guidance_scale=5.0))}
    for variant, passes in (("full", 3), ("lite", 2)):
        # Identical weights; unless shared, Lynx gets its own transformer copy so Wan keeps diffusers' processors.
        transformer = parts["transformer"] if shared else copy.deepcopy(parts["transformer"])
        runs[f"lynx {variant} ({passes} passes)"] = (
            pipeline(LynxPipeline, transformer), variant,
            dict(face_embedding=emb, reference_image=ref if variant == "full" else None))
    # The control: lite with its identity branch off runs Wan's two passes less only the text keys/values (kept
    # from the first step), no adapter work. Its distance from its own FLOP prediction is what dropping those
    # projections does to the ratio, with no adapter in the picture. Lite's transformer, a pipeline of its own.
    runs[CONTROL] = (pipeline(LynxPipeline, runs["lynx lite (2 passes)"][0].transformer), "lite",
                     dict(face_embedding=emb, ip_scale=0.0))

    def install(pipe, variant):
        # Seeded: the same random adapter weights at every install.
        with torch.device(device):
            resampler = add_tiny_adapters(pipe.transformer, variant, cfg)
        pipe.register_modules(resampler=resampler.to(dtype))
        for proc in processors(pipe.transformer):
            proc.to(dtype)

    def run_profiled(name, n, profiler):
        pipe, variant, kw = runs[name]
        if variant is not None and shared:  # otherwise installed once, before the rounds
            install(pipe, variant)
        try:
            return step_times(pipe, {**common, **kw}, n, device, profiler)
        finally:
            if variant is not None and shared:
                pipe.unload_lynx_adapters()  # the shared transformer gets diffusers' processors back

    for name, (pipe, _, _) in runs.items():
        pipe.to(device=device, dtype=dtype)
        if not shared:
            if name == CONTROL:
                pipe.register_modules(resampler=runs["lynx lite (2 passes)"][0].resampler)
            elif runs[name][1] is not None:
                install(pipe, runs[name][1])
    results = {name: [] for name in runs}
    cpu = not str(device).startswith("cuda")
    if shared:
        # One transformer: whole generations in turn, each installing or removing the adapters; a round's sample
        # is each pipeline's fastest step (a neighbour's load only ever adds time).
        for name in runs:
            run_profiled(name, 2, None)  # warm-up: allocator, thread pool, kernel selection
        for _ in range(repeats):
            for name in runs:
                if not cpu:
                    torch.cuda.reset_peak_memory_stats()
                results[name].append(min(run_profiled(name, steps, None)))
                if not cpu:
                    peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    else:
        jobs = {name: (pipe, {**common, **kw}) for name, (pipe, _, kw) in runs.items()}
        interleaved(jobs, 2, device)  # warm-up
        for _ in range(repeats):
            if cpu:
                for transformer in {id(p.transformer): p.transformer for p, _, _ in runs.values()}.values():
                    relocate(transformer)
            else:
                torch.cuda.reset_peak_memory_stats()
            for name, times in interleaved(jobs, steps, device).items():
                results[name] += times
        if not cpu:  # all pipelines ran at once: one peak for all
            peaks.update(dict.fromkeys(runs, torch.cuda.max_memory_allocated() / 2**30))
    if profile:
        for name in runs:
            where[name] = time_by_kind(lambda prof: run_profiled(name, steps, prof))
    full, _, _ = runs["lynx full (3 passes)"]
    if full.resampler is None:
        install(full, "full")
    t0 = clock()
    full.reference_features(ref, torch.Generator().manual_seed(1))
    _sync(device)
    results["lynx full reference pass (once per video)"] = [clock() - t0]
    return results


def interleaved(jobs: dict, steps: int, device) -> dict[str, list[float]]:
    """Run every job's generation (name -> (pipeline, call kwargs)) at once, each in its own thread, taking turns
    one denoising step at a time: a baton passes at the end of each step. Returns the seconds of each step after
    the first, per job; the i-th steps of all jobs ran within one turn of each other (a few tenths of a second),
    so a slow spell of a shared machine, seconds long, stretches them alike and their ratio stays. Only the thread
    holding the baton runs, and its own time is measured (CPU: the thread's CPU time)."""
    order, active = list(jobs), list(jobs)
    turn = threading.Condition()
    state = {"holder": order[0]}
    times = {name: [] for name in order}
    errors = []
    threads_per_op = torch.get_num_threads()

    def pass_baton(name, leave=False):
        with turn:
            i = active.index(name)
            if leave:
                active.pop(i)
            state["holder"] = active[(i if leave else i + 1) % len(active)] if active else None
            turn.notify_all()

    def wait_baton(name):
        with turn:
            turn.wait_for(lambda: state["holder"] == name)

    def worker(name):
        pipe, kwargs = jobs[name]
        start = None

        def stamp(p, i, t, tensors):
            nonlocal start
            _sync(device)
            if start is not None:  # the first step also holds text encoding and the reference pass: not kept
                times[name].append(clock() - start)
            pass_baton(name)
            wait_baton(name)
            start = clock()
            return {}

        # Per-thread CPU state: intra-op threads and the flush-to-zero mode are set for each thread anew.
        if cpu_settings:
            torch.set_num_threads(threads_per_op)
            torch.set_flush_denormal(True)
        wait_baton(name)
        try:
            pipe.set_progress_bar_config(disable=True)
            pipe(**kwargs, num_inference_steps=steps, output_type="latent", callback_on_step_end=stamp)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
        finally:
            pass_baton(name, leave=True)

    # Daemons: Ctrl+C in the main thread ends the benchmark without waiting for the generations under way.
    threads = [threading.Thread(target=worker, args=(name,), name=f"bench {name}", daemon=True) for name in order]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return times


def relocate(module: torch.nn.Module) -> None:
    """Give every weight of `module` new storage, same values. On a CPU a step's time depends by a few per cent
    on where its weights happen to sit in memory (cache sets, pages), fixed for the life of a process; with
    fresh storage every round, each pipeline is timed over several layouts instead of one lucky or unlucky one."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = tensor.data.clone()


def paired_ratio(samples: dict[str, list[float]], name: str, base: str) -> tuple[float, float, float]:
    """Median of `name`'s step / `base`'s step over samples taken at the same time (`bench`), and the 95 %
    confidence interval of that median (order statistics, distribution-free): a shared machine's steps scatter
    by 10 % and more, and the interval says whether a few per cent are measured or drawn."""
    ratios = sorted(a / b for a, b in zip(samples[name], samples[base]))
    n = len(ratios)
    k = max(0, int((n - 1.96 * math.sqrt(n)) / 2))  # binomial(n, 1/2) bounds on the median's rank
    return statistics.median(ratios), ratios[k], ratios[n - 1 - k]


def against(measured: tuple[float, float, float], predicted: float) -> str:
    """`measured` (ratio, low, high) as per cent from `predicted`, flagged when the ratio is over 5 % away."""
    off, low, high = (m / predicted - 1 for m in measured)
    return f"{off:+5.1%} [{low:+.1%}, {high:+.1%}]{'' if abs(off) <= 0.05 else ' > 5%'}"


peaks: dict[str, float] = {}  # CUDA peak memory of each pipeline's timed run, GiB
where: dict[str, dict[str, float]] = {}  # --profile: seconds per step by kind of operator
MATRIX_OPS = ("addmm", "mm", "bmm", "baddbmm")


def kind_of(op: str) -> str:
    op = op.removeprefix("aten::")
    if "scaled_dot_product" in op or "flash_attention" in op:
        return "attention kernels"
    if op in MATRIX_OPS or "conv" in op:
        return "matrix products"
    return "other operators"


def time_by_kind(run) -> dict[str, float]:
    """Shares of a step's operator time in matrix products, attention kernels and other operators (norms,
    activations, copies, rotary embedding), and of each other operator ("  gelu"), by torch's profiler. Shares,
    because the profiler clocks wall time, which a neighbour's load stretches; the printout scales them to the
    measured CPU time of a step."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    run(prof)
    out = {"matrix products": 0.0, "attention kernels": 0.0, "other operators": 0.0}
    others: dict[str, float] = {}
    for event in prof.key_averages():
        kind = kind_of(event.key)
        out[kind] += event.self_cpu_time_total
        if kind == "other operators":
            op = event.key.removeprefix("aten::")
            others[op] = others.get(op, 0.0) + event.self_cpu_time_total
    total = sum(out.values())
    # The largest other operators by name ("  gelu"), so the printout says which uncounted work takes the time.
    return {k: v / total for k, v in out.items()} | {f"  {op}": v / total for op, v in others.items()}


CONTROL = "control: lite, ID off (2 passes)"
STEP_FLOPS = {"wan (2 passes)": (None, 2), "lynx full (3 passes)": ("full", 3), "lynx lite (2 passes)": ("lite", 2),
              CONTROL: ("off", 2)}


def cpu_name() -> str:
    """The CPU's model and logical core count, for the printout: results are only read with the machine named."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def build(cfg, device, dtype, empty: bool = False) -> dict:
    """The components at `cfg`'s size on `device` in `dtype`. `empty`: parameters left on the meta device for
    `random_fill` (a 14B model's initialisers take a minute on a host's cores)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in place on the device, in the run's dtype: no fp32 copy of 14B
    try:
        with torch.device(device), (init_empty_weights(include_buffers=False) if empty else contextlib.nullcontext()):
            return tiny_components(cfg)
    finally:
        torch.set_default_dtype(default_dtype)


def random_fill(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Give each parameter still on the meta device N(0, 0.02) values in `dtype` on `device`, drawn on the GPU
    when there is one (seconds for 18 B parameters, where the host's cores take minutes). Buffers (RoPE tables)
    were built for real and stay as they are."""
    source = "cuda" if torch.cuda.is_available() else device
    drawn: dict[int, torch.nn.Parameter] = {}  # a parameter shared by two modules stays shared
    with torch.no_grad():
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_meta:
                    if id(p) not in drawn:
                        value = torch.empty(p.shape, dtype=dtype, device=source).normal_(0, 0.02).to(device)
                        drawn[id(p)] = torch.nn.Parameter(value, requires_grad=False)
                    sub._parameters[name] = drawn[id(p)]
    return module


def random_lora(transformer, rank: int) -> dict:
    """A random LoRA in diffusers' layout on every attention and feed-forward projection (the layers
    lightx2v's step-distill LoRAs cover): its cost, not its effect, is what a random model can measure."""
    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and ".processor." not in name and \
                any(f".{part}" in name for part in ("attn1.to_", "attn2.to_", "ffn.net")):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features) * 0.01
            state[f"transformer.{name}.lora_B.weight"] = torch.zeros(module.out_features, rank)
    return state


def clip(size: str, speed: str, memory: str | None, steps: int | None, device: str, dtype, lora_rank: int,
         compile: bool = False) -> dict:
    """One whole video of Lynx full with a speed (and memory) preset: seconds, s/step, peak memory."""
    cfg, video = SIZES[size]
    home = "cpu" if memory not in (None, "max") else device  # where the preset wants the weights to start
    empty = size in SHARED_TRANSFORMER and home == "cpu"  # the 14B size on the host: drawn by random_fill
    parts = build(cfg, home, dtype, empty)
    pipe = LynxPipeline(**parts)
    with torch.device(home), (init_empty_weights(include_buffers=False) if empty else contextlib.nullcontext()):
        resampler = add_tiny_adapters(pipe.transformer, "full", cfg)
    for module in (parts["text_encoder"], parts["vae"], pipe.transformer, resampler):
        random_fill(module, home, dtype)
    pipe.register_modules(resampler=resampler.to(dtype))
    for proc in processors(pipe.transformer):
        proc.to(dtype)
    if memory not in (None, "max"):
        try:
            from lynx.pipelines.memory import enable_memory_preset
        except ImportError:
            raise SystemExit("--memory needs lynx.pipelines.memory (the memory presets)") from None
        enable_memory_preset(pipe, memory, device)
    else:
        pipe.to(device)
    loras = []
    if speed == "turbo":
        pipe.load_lora_weights(random_lora(pipe.transformer, lora_rank), adapter_name="distill")
        loras = [("random step-distill LoRA", 1.0)]
    kwargs, lines = speeds.apply_speed(pipe, speed, loras)
    if compile:  # the first step runs uncompiled (it computes the kept keys/values), the second compiles
        lines.append(speeds.compile_transformer(pipe.transformer))
    if steps is not None:
        kwargs["num_inference_steps"] = steps
        if "sigmas" in kwargs:
            kwargs["sigmas"] = speeds.turbo_sigmas(steps)
    pipe.set_progress_bar_config(disable=True)
    emb = torch.nn.functional.normalize(torch.randn(512), dim=0)
    ref = (torch.rand(256, 256, 3) * 255).to(torch.uint8).numpy()
    stamps, passes = [], [0]  # passes: video-sized transformer samples so far (the reference passes excluded)
    video_tokens = tokens(video).video

    def count(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        if x is not None and x.shape[2] * x.shape[3] * x.shape[4] // 4 == video_tokens:
            passes[0] += x.shape[0]

    def callback(p, i, t, d):
        _sync(device)
        stamps.append((clock(), passes[0]))
        return {}

    hook = pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = clock()
    pipe("a person walks", face_embedding=emb, reference_image=ref, **video, **kwargs, output_type="np",
         callback_on_step_end=callback)
    _sync(device)
    total = clock() - t0
    hook.remove()
    # The steps after the first (which holds text and reference work) and, compiled, after the compilation.
    skip = 2 if compile else 1
    later = list(zip(stamps[skip - 1:], stamps[skip:]))
    per_step = statistics.median([b[0] - a[0] for a, b in later]) if later else float("nan")
    # The work the steps after the first asked of the transformer, by the FLOP count (a cache's skipped
    # blocks still counted: with a cache this is the uncached-equivalent rate, above what the device did).
    work = sum(b[1] - a[1] for a, b in later) * pass_flops(cfg, video, "full")
    tflops = work / sum(b[0] - a[0] for a, b in later) / 1e12 if later else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30 if str(device).startswith("cuda") else float("nan")
    return dict(lines=lines, seconds=total, per_step=per_step, steps=len(stamps), peak=peak, tflops=tflops,
                passes=stamps[-1][1] if stamps else 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"], choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=8, help="per generation; every step after the first is timed")
    parser.add_argument("--repeats", type=int, default=10, help="generations of each pipeline (rounds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU time is measured, so 1 is exact)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak (H100/H200 bf16: 989) for MFU")
    parser.add_argument("--breakdown", action="store_true", help="print where each step's FLOPs go")
    parser.add_argument("--profile", action="store_true",
                        help="CPU: print where each step's time goes (matrix products, attention, other operators)")
    parser.add_argument("--clip", action="store_true",
                        help="time one whole video of Lynx full with --speed (and --memory) instead of steps")
    parser.add_argument("--speed", default="exact", choices=("exact", "fast", "turbo"))
    parser.add_argument("--memory", help="a memory preset of lynx.pipelines.memory (max, 48gb, 24gb, ...)")
    parser.add_argument("--clip-steps", type=int, help="override the preset's step count (e.g. 5 for a quick look)")
    parser.add_argument("--lora-rank", type=int, default=64, help="rank of turbo's random step-distill LoRA")
    parser.add_argument("--compile", action="store_true", help="with --clip: compile the blocks as `lynx generate "
                        "--compile` does (refused, as there, with --speed fast or --memory 12gb)")
    args = parser.parse_args()
    # Checked before anything is built: a bad count would surface as an IndexError after minutes of setup.
    for flag, value, least, why in (("--steps", args.steps, 2, "the first step of a generation is not timed"),
                                    ("--repeats", args.repeats, 1, "generations of each pipeline"),
                                    ("--clip-steps", args.clip_steps, 1, "denoising steps of the clip"),
                                    ("--threads", args.threads, 1, "CPU threads")):
        if value is not None and value < least:
            parser.exit(2, f"{parser.prog}: error: {flag} {value}: must be at least {least} ({why})\n")
    if args.profile and args.device != "cpu":
        parser.error("--profile reads operators' CPU time: use it with --device cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    global clock, cpu_settings
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
        # With more than one intra-op thread the others' time counts too: the process's (only one pipeline runs at
        # a time).
        clock, cpu_settings = (time.thread_time if args.threads == 1 else time.process_time), True
        # Random weights leave some activations subnormal, which x86 CPUs process on a slow path (GELU-tanh on
        # one tensor: 2.0 ms at unit scale, 3.3 ms at scale 100; 1.9 ms at both with flushing). Which pipeline
        # hits them depends on the random adapter draw, not on its work: flushed to zero, the work alone is timed.
        torch.set_flush_denormal(True)
    torch.manual_seed(0)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_name()
    print(f"device {args.device} ({device_name}), dtype {args.dtype}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    for size in args.sizes:
        cfg, video = SIZES[size]
        if args.clip:
            refusal = speeds.compile_refusal(args.speed, args.memory) if args.compile else None
            if refusal:
                parser.error(refusal)
            r = clip(size, args.speed, args.memory, args.clip_steps, args.device, dtype, args.lora_rank, args.compile)
            print(f"\n{size}: {video}, lynx full, speed {args.speed}, memory {args.memory or 'max'}"
                  f"{', compiled' if args.compile else ''}")
            for line in r["lines"]:
                print(f"  {line}")
            mfu = f" (MFU {r['tflops'] / args.peak_tflops:.1%})" if args.peak_tflops else ""
            print(f"  whole clip {r['seconds']:.1f} s, {r['steps']} steps, {r['passes']} transformer passes, "
                  f"median step {r['per_step']:.2f} s, {r['tflops']:.3f} TFLOP/s{mfu}, peak {r['peak']:.1f} GiB")
            continue
        samples = bench(size, args.steps, args.device, dtype, args.repeats, args.profile)
        r = {name: statistics.median(v) for name, v in samples.items()}
        base = r["wan (2 passes)"]
        print(f"\n{size}: {video}, {tokens(video).video} video tokens, {cfg.num_layers} blocks x {cfg.hidden_dim} wide")
        for name, seconds in r.items():
            measured = paired_ratio(samples, name, "wan (2 passes)") if name in STEP_FLOPS else (seconds / base,)
            ratio = measured[0]
            line = f"  {name:45s} {seconds * 1e3:9.2f} ms   x{ratio:5.2f} of Wan's step"
            if name in STEP_FLOPS:
                variant, passes = STEP_FLOPS[name]
                tflops = passes * pass_flops(cfg, video, variant) / seconds / 1e12
                if variant is not None:
                    predicted = predicted_ratio(cfg, video, variant)
                    line += f"   predicted x{predicted:5.2f} ({against(measured, predicted)})"
                line += f"   {tflops:7.3f} TFLOP/s"
                if args.peak_tflops:
                    line += f" (MFU {tflops / args.peak_tflops:.1%})"
            if name in peaks:
                line += f"   peak {peaks[name]:.1f} GiB"
            print(line)
        if CONTROL in r:
            print_adapter_cost(cfg, video, samples)
        if args.breakdown:
            print_breakdown(cfg, video)
        if args.profile:
            print_where(cfg, video, r)


def print_adapter_cost(cfg, video, samples: dict[str, list[float]]) -> None:
    """Lynx against the control (the same passes with no adapter work): what the adapters and the third
    branch cost, measured and by the FLOP count."""
    for name in ("lynx full (3 passes)", "lynx lite (2 passes)"):
        variant, passes = STEP_FLOPS[name]
        predicted = passes * pass_flops(cfg, video, variant) / (2 * pass_flops(cfg, video, "off"))
        measured = paired_ratio(samples, name, CONTROL)
        print(f"  {name.split(' (')[0]} / control: measured x{measured[0]:5.2f}, predicted "
              f"x{predicted:5.2f} ({against(measured, predicted)})")


def print_breakdown(cfg, video) -> None:
    """Where a step's FLOPs go, per pipeline (share of that pipeline's step)."""
    steps = {name: {k: v * passes for k, v in flop_parts(cfg, video, variant).items()}
             for name, (variant, passes) in STEP_FLOPS.items()}
    names = list(dict.fromkeys(k for parts in steps.values() for k in parts))
    print(f"  {'FLOPs per step':32s}" + "".join(f"{n.split(' (')[0]:>18s}" for n in steps))
    for k in names:
        print(f"  {k:32s}" + "".join(f"{parts.get(k, 0) / sum(parts.values()):17.1%} " for parts in steps.values()))
    print(f"  {'total (GFLOP)':32s}" + "".join(f"{sum(p.values()) / 1e9:18.2f}" for p in steps.values()))


ATTENTION_PARTS = ("self-attention scores, values", "cross-attention scores, values", "ID-adapter attention",
                   "Ref-adapter attention")


def print_where(cfg, video, measured: dict[str, float]) -> None:
    """Where a step's time goes (profiled shares x measured step), and the rate each kind of FLOP ran at."""
    print(f"  {'time per step (profiled shares)':32s}" + "".join(f"{n.split(' (')[0]:>24s}" for n in where))
    first = next(iter(where.values()))
    kinds = [k for k in first if not k.startswith(" ")]
    # Under "other operators", its five largest in the first pipeline (Wan), each pipeline's time in them.
    kinds += sorted((k for k in first if k.startswith(" ")), key=first.get, reverse=True)[:5]
    for kind in kinds:
        print(f"  {kind:32s}" + "".join(f"{w.get(kind, 0.0) * measured[n] * 1e3:15.1f} ms ({w.get(kind, 0.0):4.0%})"
                                        for n, w in where.items()))
    for kind, attention in (("matrix products", False), ("attention kernels", True)):
        rates = []
        for name, w in where.items():
            variant, passes = STEP_FLOPS[name]
            flops = sum(v for k, v in flop_parts(cfg, video, variant).items() if (k in ATTENTION_PARTS) == attention)
            rates.append(passes * flops / (w[kind] * measured[name]) / 1e9)
        print(f"  {kind + ' GFLOP/s':32s}" + "".join(f"{r:24.1f}" for r in rates))


if __name__ == "__main__":
    main()
