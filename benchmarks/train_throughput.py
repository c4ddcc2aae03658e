"""Training throughput of `lynx train`'s step, and the memory a 14B run needs per GPU under FSDP2.

    python benchmarks/train_throughput.py                         # tiny and small models on CPU + memory table
    python benchmarks/train_throughput.py --device cuda --dtype bf16 --measure-blocks 2   # on a GPU

Throughput: one training step as the trainer runs it (FSDP2 even in one process, reference pass, packed forward
with per-block checkpointing, backward, global clipping and finiteness check, AdamW on the adapters) on packs
of images and clips filling a token budget, with random weights (speed only, never quality).

Memory: parameters, gradients and optimizer state counted on the real Wan2.1-14B and lynx_full definitions,
activations measured with autograd's saved-tensor hooks on a full-width block (lynx/training/memory.py); for
1, 8 and 128 GPUs, stage 1 (21 images of 480x832) and stage 2 (one 81-frame 480x832 clip). `--measure-blocks k`
on CUDA runs a real step of a k-block, full-width model and prints measured peak memory next to the model's
estimate for the same configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lynx.constants import ResamplerConfig, full_adapter_config
from lynx.models.adapters import adapter_parameters, install_adapters
from lynx.models.resampler import Resampler
from lynx.runtime import DTYPES
from lynx.testing import TinyModelConfig, tiny_components
from lynx.training.memory import (
    GIB,
    WAN_14B,
    ActivationModel,
    describe,
    fsdp_memory_per_gpu,
    meta_model,
    parameter_counts,
)
from lynx.training.model import Runtime, cast_backbone, shard_model, teardown_runtime
from lynx.training.objective import LynxTrainModel, PackedLynxAttnProcessor, flow_matching_loss, token_count
from lynx.training.trainer import clip_gradients, parameter_groups

SIZES = {
    # name: (model, latent shapes [C, F, H, W] of one pack)
    "tiny": (TinyModelConfig(), [(16, 1, 8, 8)] * 4 + [(16, 2, 8, 8)] * 2),
    "small": (TinyModelConfig(num_layers=8, num_heads=8, head_dim=48, ffn_dim=1024, text_dim=64),
              [(16, 1, 30, 52)] * 2 + [(16, 5, 16, 16)]),
}
STAGES = {"stage 1: 21 images 480x832": [(16, 1, 60, 104)] * 21,
          "stage 2: one 81-frame clip 480x832": [(16, 21, 60, 104)]}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(cfg: TinyModelConfig, runtime: Runtime, dtype):
    transformer = tiny_components(cfg)["transformer"].requires_grad_(False)
    cast_backbone(transformer, dtype)  # as training loads the base
    res = ResamplerConfig(dim=64, depth=2, heads=2, dim_head=32, num_queries=16, output_dim=cfg.hidden_dim)
    return _trainable(transformer, full_adapter_config(cfg.num_layers, cfg.hidden_dim, resampler=res), runtime, dtype)


def _trainable(transformer, config, runtime: Runtime, dtype):
    """`transformer` with new fp32 trainable adapters (training's processors) and resampler, sharded by FSDP2 as
    `lynx train` shards it (one process: the same numeric path as many)."""
    with torch.device(runtime.device):
        install_adapters(transformer, config, PackedLynxAttnProcessor)
        resampler = Resampler(config.resampler)
    for q in [*adapter_parameters(transformer), *resampler.parameters()]:
        q.data = q.data.float()
        q.requires_grad_(True)
    model = LynxTrainModel(transformer.to(runtime.device), resampler.train(), "auto", True)
    shard_model(model, runtime, dtype)
    return model


def step_inputs(shapes, text_dim, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(shapes)
    return dict(noisy=[torch.randn(s, generator=g).to(device, dtype) for s in shapes],
                targets=[torch.randn(s, generator=g).to(device) for s in shapes],
                timesteps=torch.rand(n, generator=g).to(device) * 1000,
                text=torch.randn(n, 512, text_dim, generator=g).to(device, dtype),
                embeddings=torch.randn(n, 512, generator=g).to(device),
                reference=torch.randn(n, 16, 1, 32, 32, generator=g).to(device, dtype),
                reference_text=torch.randn(1, 512, text_dim, generator=g).to(device, dtype))


def train_step(model, optimizer, p, normaliser):
    """What `Trainer.train_step` does for one pack: forward, backward, global clip + finiteness, AdamW."""
    preds = model(p["noisy"], p["timesteps"], p["text"], p["embeddings"], p["reference"], p["reference_text"])
    loss = flow_matching_loss(preds, p["targets"], normaliser)
    loss.backward()
    if math.isfinite(clip_gradients(model.trainable_parameters(), 1.0, loss.detach())):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def throughput(name, runtime, dtype, steps, warmup) -> dict:
    cfg, shapes = SIZES[name]
    device = runtime.device
    model = build(cfg, runtime, dtype)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-5)
    p = step_inputs(shapes, cfg.text_dim, device, dtype)
    tokens = sum(token_count(s) for s in shapes)
    normaliser = float(sum(t.numel() for t in p["targets"]))
    for _ in range(warmup):
        train_step(model, optimizer, p, normaliser)
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        train_step(model, optimizer, p, normaliser)
        _sync(device)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    return {"size": name, "blocks": cfg.num_layers, "width": cfg.hidden_dim, "samples_per_pack": len(shapes),
            "tokens_per_step": tokens, "seconds_per_step": median, "tokens_per_s": tokens / median,
            "trainable_params": sum(q.numel() for q in model.trainable_parameters())}


def memory_table(gpus=(1, 8, 128), gpu_gib: float = 80.0) -> list[dict]:
    transformer, resampler = meta_model(WAN_14B)
    counts = parameter_counts(transformer, resampler)
    activations = ActivationModel.measure(transformer)
    hidden = WAN_14B["num_attention_heads"] * WAN_14B["attention_head_dim"]
    rows = []
    for stage, shapes in STAGES.items():
        tokens = sum(token_count(s) for s in shapes)
        for n in gpus:
            m = fsdp_memory_per_gpu(counts, activations, gpus=n, tokens=tokens, samples=len(shapes),
                                    blocks=WAN_14B["num_layers"], hidden=hidden)
            rows.append({"stage": stage, "tokens": tokens, "gpus": n, "gib_per_gpu": m["total"] / GIB,
                         "fits_80gb": m["total"] / GIB <= gpu_gib, "breakdown_gib": {k: v / GIB for k, v in m.items()}})
    return [{"backbone_params": counts.backbone, "adapter_params": counts.adapters,
             "block_activation_bytes_per_token": activations.per_token,
             "block_activation_bytes_per_sample": activations.per_sample}] + rows


def measure_gpu(runtime: Runtime, blocks: int, tokens: int = 32760) -> dict:
    """A real step of a `blocks`-deep, full-width (5120) model on one GPU, against the estimate for it."""
    kwargs = dict(WAN_14B, num_layers=blocks)
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(**kwargs).to(runtime.device).requires_grad_(False)
    cast_backbone(transformer, torch.bfloat16)
    model = _trainable(transformer, full_adapter_config(blocks, 5120), runtime, torch.bfloat16)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-5)
    shapes = [(16, 21, 60, 104)]
    p = step_inputs(shapes, 4096, runtime.device, torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    train_step(model, optimizer, p, float(sum(t.numel() for t in p["targets"])))
    measured = torch.cuda.max_memory_allocated() / GIB
    mt, ma = meta_model(kwargs)
    est = fsdp_memory_per_gpu(parameter_counts(mt, ma), ActivationModel.measure(mt), gpus=1,
                              tokens=token_count(shapes[0]), samples=1, blocks=blocks, hidden=5120)
    return {"blocks": blocks, "measured_peak_gib": measured, "estimated_gib": est["total"] / GIB}


def _check_args(parser, args) -> torch.device:
    """Every argument, before the process group and the models: a mistake is one line, not a traceback after
    minutes of measuring (or a result that cannot be written)."""
    def refuse(message):
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    for flag, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                               ("--measure-blocks", args.measure_blocks, 0)):
        if value < least:
            refuse(f"{flag} {value}: must be at least {least}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        refuse(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        refuse(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.measure_blocks and device.type != "cuda":
        refuse("--measure-blocks needs --device cuda")
    if args.json:
        folder = Path(args.json).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            refuse(f"--json {args.json}: its folder {folder} cannot be made "
                   f"({'a file is in the way' if isinstance(e, FileExistsError) else e.strerror})")
        if Path(args.json).is_dir():
            refuse(f"--json {args.json} is a folder; give a file name")
    return device


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--measure-blocks", type=int, default=0, help="CUDA: real step of a k-block 14B-width model")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device, dtype = _check_args(parser, args), DTYPES[args.dtype]
    # One process as its own FSDP2 group, exactly as `lynx train` runs on one device.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    runtime = Runtime(0, 1, device, owns_group=True)
    results = {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(), "throughput": []}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    print(f"training throughput on {device} ({args.dtype}, {torch.get_num_threads()} threads), median of "
          f"{args.steps} steps:")
    for name in args.sizes:
        r = throughput(name, runtime, dtype, args.steps, args.warmup)
        results["throughput"].append(r)
        print(f"  {name:6s} {r['blocks']} blocks x {r['width']} wide, {r['samples_per_pack']} samples/pack, "
              f"{r['tokens_per_step']} tokens/step: {r['seconds_per_step'] * 1000:.1f} ms/step, "
              f"{r['tokens_per_s']:.0f} tokens/s")
    table = memory_table()
    results["memory"] = table
    head = table[0]
    print(f"\nWan2.1-14B + lynx_full under FSDP2, bf16 backbone, fp32 adapter masters + AdamW, checkpointing "
          f"({head['backbone_params'] / 1e9:.2f} B frozen, {head['adapter_params'] / 1e9:.2f} B trainable; "
          f"a block keeps {head['block_activation_bytes_per_token'] / 1024:.0f} KiB per token):")
    for row in table[1:]:
        print(f"  {row['stage']:36s} {row['gpus']:4d} GPUs: {row['gib_per_gpu']:6.1f} GiB per GPU"
              f"{'' if row['fits_80gb'] else '  (does not fit 80 GB)'}")
    eight = next(r for r in table[1:] if r["gpus"] == 8 and r["stage"].startswith("stage 2"))
    print("\n  breakdown, stage 2 on 8 GPUs:\n" + describe({k: v * GIB for k, v in eight["breakdown_gib"].items()}))
    if args.measure_blocks:
        m = measure_gpu(runtime, args.measure_blocks)
        results["measured"] = m
        print(f"\nmeasured on {results['gpu']}: {m['blocks']} blocks, peak {m['measured_peak_gib']:.1f} GiB; "
              f"estimate {m['estimated_gib']:.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    teardown_runtime(runtime)


if __name__ == "__main__":
    main()
