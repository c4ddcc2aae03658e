"""The training loop: one process, or many under `torchrun` with PyTorch FSDP2 sharding backbone and adapters.

Per step and rank: `grad_accum` packs of about `token_budget` video tokens each, noised and dropped out by
`objective.make_step_inputs`, through `LynxTrainModel` (gradient checkpointing per block), loss normalised
by the element count of the whole step so the update is the same for any split over ranks and micro-steps;
AdamW on the adapters only; a CSV (and optionally TensorBoard) log, a progress bar with loss, tokens/s and
ETA, sample videos of a fixed validation identity, and atomic checkpoints (`checkpoint.py`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..constants import ResamplerConfig, full_adapter_config, lite_adapter_config, transformer_dims
from ..errors import InputError, LynxError
from ..io.files import atomic_write
from ..models.adapters import adapter_parameters, install_adapters, processors, zero_init_
from ..models.loading import load_adapters, require_base_dir
from ..models.resampler import Resampler
from . import checkpoint as ckpt
from .config import TrainingConfig
from .data import PackDataset, PackStream, load_sample, load_shared, read_index
from .objective import (
    ATTENTION_MODES,
    LynxTrainModel,
    PackedLynxAttnProcessor,
    default_shift,
    flow_matching_loss,
    make_step_inputs,
    token_count,
)

METRICS_FILE = "metrics.csv"
METRICS_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens", "samples", "tokens_per_s", "seconds")
FINAL_DIR = "final"
SAMPLES_DIR = "samples"
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ----- processes and devices -------------------------------------------------------------------------------------
@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we started the process group, so we end it

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup_runtime() -> Runtime:
    """Join the `torchrun` process group when there is one (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world <= 1:
        return Runtime(device=device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Runtime(dist.get_rank(), dist.get_world_size(), device, owns)


# ----- model ------------------------------------------------------------------------------------------------------
def load_transformer(base: Path, dtype: torch.dtype):
    """The frozen base transformer, cast as the inference pipeline casts it (RoPE tables stay fp32)."""
    from diffusers import WanTransformer3DModel

    from ..pipelines.pipeline_lynx import _cast_like_reference

    transformer = WanTransformer3DModel.from_pretrained(base / "transformer", torch_dtype=dtype)
    _cast_like_reference(transformer, dtype)
    return transformer.eval().requires_grad_(False)


def build_adapters(config: TrainingConfig, transformer, source: Path | None) -> Resampler:
    """Install trainable adapters into `transformer` from a directory (released weights to fine-tune, or a
    checkpoint), or new zero-initialised ones; returns the resampler. Adapter weights are fp32 masters."""
    t = config.train
    if source is not None:
        resampler = load_adapters(transformer, source, PackedLynxAttnProcessor, dtype=torch.float32)
    else:
        if t.variant not in ("full", "lite"):
            raise InputError(f"train.variant must be 'full' or 'lite', not {t.variant!r}")
        num_blocks, hidden = transformer_dims(transformer.config)
        res = t.resampler or ResamplerConfig()
        if t.variant == "full":
            cfg = full_adapter_config(num_blocks, hidden, t.num_registers, replace(res, output_dim=hidden))
        else:
            cfg = lite_adapter_config(num_blocks, hidden, res.output_dim if t.resampler else 2048, res)
        torch.manual_seed(t.seed)
        resampler = Resampler(cfg.resampler)
        device = next(transformer.parameters()).device
        with torch.device(device):
            install_adapters(transformer, cfg, PackedLynxAttnProcessor)
        zero_init_(transformer)
    for p in adapter_parameters(transformer):
        p.data = p.data.float()
        p.requires_grad_(True)
    for proc in processors(transformer):
        proc.train()
    return resampler.float().train().requires_grad_(True)


def shard_model(model: LynxTrainModel, runtime: Runtime, compute_dtype: torch.dtype) -> None:
    """FSDP2: one unit per block (frozen block + its ID/Ref layers); embedders, head and resampler at the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world,))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.transformer.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


class LRSchedule:
    """Linear warm-up, then constant or cosine to zero at the last step (a LambdaLR factor)."""

    def __init__(self, warmup: int, steps: int, kind: str):
        if kind not in ("constant", "cosine"):
            raise InputError(f"train.lr_schedule must be 'constant' or 'cosine', not {kind!r}")
        self.warmup, self.steps, self.kind = warmup, steps, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----- logging ----------------------------------------------------------------------------------------------------
class MetricsLog:
    """metrics.csv (rows past the resumed step are dropped, so a resumed run's log reads as one run) + TensorBoard."""

    def __init__(self, output_dir: Path, start_step: int, tensorboard: bool, enabled: bool):
        self.path, self.enabled, self.writer = output_dir / METRICS_FILE, enabled, None
        if not enabled:
            return
        rows = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRICS_FIELDS)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in METRICS_FIELDS} for r in rows)
        atomic_write(self.path, lambda tmp: tmp.write_text(buf.getvalue()))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError("train.tensorboard = true needs the tensorboard package (pip install tensorboard); "
                                 f"metrics are always written to {self.path}") from None
            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRICS_FIELDS).writerow(row)
        if self.writer is not None:
            for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                self.writer.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self):
        if self.writer is not None:
            self.writer.close()


def read_metrics(output_dir) -> list[dict]:
    """Rows of metrics.csv as dicts of floats (step as int)."""
    with open(Path(output_dir) / METRICS_FILE, newline="") as f:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


# ----- sample videos ----------------------------------------------------------------------------------------------
def _cached_text_pipeline_class():
    from ..pipelines.pipeline_lynx import LynxPipeline
    from .objective import pad_text

    class CachedTextPipeline(LynxPipeline):
        """The inference pipeline, with prompts looked up in the prepare cache instead of a 6B text encoder."""

        def encode_text(self, prompts, max_sequence_length=None):
            missing = [p for p in prompts if p not in self.text_cache]
            if missing:
                raise InputError(f"prompt {missing[0][:60]!r} is not in the prepare cache; run `lynx prepare` again")
            return torch.stack([pad_text(self.text_cache[p].float()) for p in prompts]).to(
                self._execution_device, self.compute_dtype)

    return CachedTextPipeline


class SampleMaker:
    """Sample videos of the fixed validation identity, through the real inference pipeline."""

    def __init__(self, config: TrainingConfig, base: Path, model: LynxTrainModel, shared: dict, first_key: str,
                 runtime: Runtime, compute_dtype: torch.dtype, autocast):
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

        from ..pipelines.pipeline_lynx import check_video_size

        v = config.validation
        check_video_size(v.height, v.width, v.num_frames)
        if v.format not in (".mp4", ".webp", ".gif"):
            raise InputError(f"validation.format must be .mp4, .webp or .gif, not {v.format!r}")
        self.config, self.model, self.runtime, self.autocast = config, model, runtime, autocast
        from ..constants import REFERENCE_PROMPT

        missing = [p for p in (*v.prompts, v.negative_prompt, REFERENCE_PROMPT) if p not in shared["prompt_lookup"]]
        if missing:  # found now, not when the first sample video is due hours later
            raise InputError(f"validation prompt {missing[0][:60]!r} is not in the prepare cache; run "
                             "`lynx prepare` with this config again (it only encodes what is missing)")
        if "validation_embedding" in shared:
            self.embedding, self.crop = shared["validation_embedding"], shared["validation_crop"].numpy()
        else:
            first = load_sample(config.data.cache_dir, first_key)
            self.embedding, self.crop = first["embedding"], first["reference_crop"].numpy()
        vae = AutoencoderKLWan.from_pretrained(base / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)
        pipe_cls = _cached_text_pipeline_class()
        # The model's own transformer and resampler, not copies: nothing is cast (the masters stay fp32).
        self.pipe = pipe_cls(None, None, vae.to(runtime.device), UniPCMultistepScheduler.from_pretrained(
            base / "scheduler"), model.transformer, model.resampler)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.text_cache, self.pipe.compute_dtype = shared["prompt_lookup"], compute_dtype

    def __call__(self, step: int, output_dir: Path) -> list[Path]:
        v, paths = self.config.validation, []
        sharded = hasattr(self.model, "unshard")
        if sharded:  # every rank runs the same sampling: the blocks' gathers are collectives
            self.model.unshard()
        try:
            for i, prompt in enumerate(v.prompts):
                with self.autocast():
                    frames = self.pipe(prompt, face_embedding=self.embedding, reference_image=self.crop,
                                       negative_prompt=v.negative_prompt, height=v.height, width=v.width,
                                       num_frames=v.num_frames, num_inference_steps=v.num_inference_steps,
                                       seed=v.seed, output_type="np").frames[0]
                if self.runtime.rank == 0:
                    from ..io.provenance import provenance_mark
                    from ..io.video import save_video

                    # Monitoring output of a run, marked but not gated (docs/safety.md).
                    mark = provenance_mark(base=self.config.train.base, adapter=f"training-step-{step}",
                                           variant=self.pipe.variant, seed=v.seed)
                    paths.append(save_video(frames, output_dir / SAMPLES_DIR / f"step-{step:08d}-{i}{v.format}", v.fps,
                                            mark=mark))
        finally:
            if sharded:
                self.model.reshard()
        return paths


# ----- the loop ---------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float]  # of the steps run in this call
    final_dir: Path | None
    checkpoint: Path | None
    samples: list[Path] = field(default_factory=list)


def _identity(item):
    return item


def rank_packs(start_step: int, world: int, rank: int, accum: int):
    """Global pack indices this rank reads, in order: step s, micro-step a -> s*W*A + rank*A + a."""
    for s in itertools.count(start_step):
        for a in range(accum):
            yield (s * world + rank) * accum + a


def train(config: TrainingConfig, resume=None, progress: bool = True) -> TrainResult:
    """Train the adapters as `config` says; `resume` True/"auto" continues the latest checkpoint, or give a path."""
    runtime = setup_runtime()
    try:
        return _train(config, resume, progress, runtime)
    finally:
        if runtime.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _check(config: TrainingConfig) -> None:
    t = config.train
    if t.precision not in PRECISIONS:
        raise InputError(f"train.precision must be one of {', '.join(PRECISIONS)}, not {t.precision!r}")
    if t.attention not in ATTENTION_MODES:
        raise InputError(f"train.attention must be one of {', '.join(ATTENTION_MODES)}, not {t.attention!r}")
    for name in ("drop_text", "drop_identity", "drop_reference"):
        if not 0 <= getattr(t, name) <= 1:
            raise InputError(f"train.{name} must be a probability in [0, 1], not {getattr(t, name)}")
    for name in ("steps", "token_budget", "grad_accum", "save_every", "log_every"):
        if getattr(t, name) < 1:
            raise InputError(f"train.{name} must be at least 1, not {getattr(t, name)}")
    if not t.base:
        raise InputError("train.base (the Wan2.1-T2V diffusers directory) is not set")


def _train(config: TrainingConfig, resume, progress: bool, runtime: Runtime) -> TrainResult:
    from tqdm.auto import tqdm

    _check(config)
    t = config.train
    base = require_base_dir(t.base)
    output_dir = Path(t.output_dir)
    main = runtime.rank == 0
    source = ckpt.find_checkpoint(output_dir, resume)
    if resume not in (None, False) and source is None and main:
        print(f"no checkpoint in {output_dir / ckpt.CHECKPOINTS_DIR}; starting from step 0")
    state = ckpt.load_trainer_state(source) if source is not None else {}
    start_step = int(state.get("step", 0))
    if start_step >= t.steps:
        raise InputError(f"{source} is at step {start_step}; train.steps = {t.steps} leaves nothing to do "
                         "(raise train.steps to continue training)")

    # Data.
    index = read_index(config.data.cache_dir)
    shared = load_shared(config.data.cache_dir, config)
    compute_dtype = PRECISIONS[t.precision]
    transformer = load_transformer(base, compute_dtype)
    if t.attention_backend:
        transformer.set_attention_backend(t.attention_backend)
    patch = tuple(transformer.config.patch_size)
    shapes = index.shapes()
    if shapes[0][0] != transformer.config.in_channels:
        raise InputError(f"the cache holds {shapes[0][0]}-channel latents but the transformer takes "
                         f"{transformer.config.in_channels}: it was prepared with another base model")
    tokens = [token_count(s, patch) for s in shapes]
    elements = [math.prod(s) for s in shapes]
    stream = PackStream(tokens, t.token_budget, t.seed)
    if stream.excluded and main:
        print(f"warning: {len(stream.excluded)} samples exceed train.token_budget = {t.token_budget} tokens and "
              "are left out")

    # Model.
    init = source if source is not None else (None if t.init == "scratch" else Path(t.init))
    resampler = build_adapters(config, transformer, init)
    model = LynxTrainModel(transformer, resampler, t.attention, t.gradient_checkpointing)
    if runtime.distributed:
        shard_model(model, runtime, compute_dtype)
    else:
        model.to(runtime.device)
    use_ref = model.adapter_config.use_ref
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=tuple(t.betas), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(t.warmup_steps, t.steps, t.lr_schedule))
    if source is not None:
        ckpt.load_optimizer_and_rng(source, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        # The schedule's shape comes from this config (train.steps may have been raised to train on).
        vars(scheduler.lr_lambdas[0]).update(vars(LRSchedule(t.warmup_steps, t.steps, t.lr_schedule)))
    with open(base / "scheduler" / "scheduler_config.json") as f:
        sched_cfg = json.load(f)
    shift = t.timestep_shift if t.timestep_shift is not None else default_shift(sched_cfg)
    num_train_timesteps = int(sched_cfg.get("num_train_timesteps", 1000))

    def autocast():
        # FSDP casts parameters itself (MixedPrecisionPolicy); one process mixes fp32 adapters and a bf16 backbone.
        if runtime.distributed or compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(runtime.device.type, dtype=compute_dtype)

    samples_maker = None
    if config.validation.every > 0 and config.validation.prompts:
        samples_maker = SampleMaker(config, base, model, shared, index.keys[0], runtime, compute_dtype, autocast)

    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(output_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config.to_dict(), indent=2)))
    metrics = MetricsLog(output_dir, start_step, t.tensorboard, main)
    loader = torch.utils.data.DataLoader(
        PackDataset(index, stream), batch_size=None, collate_fn=_identity,
        sampler=rank_packs(start_step, runtime.world, runtime.rank, t.grad_accum),
        num_workers=t.num_workers, prefetch_factor=2 if t.num_workers else None)
    batches = iter(loader)
    per_step = runtime.world * t.grad_accum
    drop = (t.drop_text, t.drop_identity, t.drop_reference)
    losses, saved, sample_paths = [], None, []
    bar = tqdm(total=t.steps, initial=start_step, unit="step", disable=not (progress and main), dynamic_ncols=True)
    started = time.time()
    try:
        for step in range(start_step, t.steps):
            tic = time.time()
            packs = range(step * per_step, (step + 1) * per_step)
            members = [i for g in packs for i in stream[g]]
            normaliser = float(sum(elements[i] for i in members))
            step_loss = torch.zeros((), dtype=torch.float64, device=runtime.device)
            for _ in range(t.grad_accum):
                g, samples = next(batches)
                inputs = make_step_inputs(samples, shared, g, t.seed, shift, drop, num_train_timesteps,
                                          runtime.device, compute_dtype, use_ref)
                with autocast():
                    preds = model(inputs.noisy, inputs.timesteps, inputs.text, inputs.embeddings, inputs.reference,
                                  inputs.reference_text)
                loss = flow_matching_loss(preds, inputs.targets, normaliser)
                # FSDP averages gradients over ranks; the loss is already a share of the whole step's sum.
                (loss * runtime.world).backward()
                step_loss += loss.detach().double()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if runtime.distributed:
                dist.all_reduce(step_loss)
            loss_value = float(step_loss)
            if not math.isfinite(loss_value):
                raise LynxError(f"the loss became {loss_value} at step {step + 1}; the last good checkpoint is in "
                                f"{output_dir / ckpt.CHECKPOINTS_DIR} (try a lower train.learning_rate)")
            losses.append(loss_value)
            done = step + 1
            seconds = time.time() - tic
            step_tokens = sum(tokens[i] for i in members)
            if done % t.log_every == 0 or done == t.steps:
                metrics.write({"step": done, "loss": loss_value, "lr": lr,
                               "grad_norm": float(grad_norm), "tokens": step_tokens, "samples": len(members),
                               "tokens_per_s": step_tokens / max(seconds, 1e-9),
                               "seconds": round(time.time() - started, 3)})
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{step_tokens / max(seconds, 1e-9):.0f}")
            bar.update(1)
            if done % t.save_every == 0 or done == t.steps:
                trainer_state = {"packs_consumed": done * per_step, "scheduler": scheduler.state_dict(),
                                 "loss": loss_value, "config": config.to_dict()}
                saved = ckpt.save_checkpoint(output_dir, done, model, optimizer, trainer_state, t.keep_last)
            if samples_maker is not None and (done % config.validation.every == 0 or done == t.steps):
                sample_paths += samples_maker(done, output_dir)
    except torch.OutOfMemoryError:
        raise LynxError(f"out of accelerator memory at train.token_budget = {t.token_budget}; lower it, keep "
                        "train.gradient_checkpointing on, or use more GPUs. Checkpoints so far are intact in "
                        f"{output_dir / ckpt.CHECKPOINTS_DIR}") from None
    finally:
        bar.close()
        metrics.close()
        del batches

    final_dir = output_dir / FINAL_DIR
    state_dict = ckpt.full_adapter_state(model, getattr(torch, t.save_dtype))
    if main:
        ckpt.write_adapters(final_dir, model, state_dict)
    if runtime.distributed:
        dist.barrier()
    return TrainResult(output_dir, t.steps, losses, final_dir, saved, sample_paths)
