"""The training loop: a `Trainer` owns one run (one process, or many under `torchrun`), `train_step` is one step.

A step, on every rank: `grad_accum` packs of about `token_budget` video tokens each, noised and dropped out by
`objective.make_step_inputs`, through the FSDP2-sharded `LynxTrainModel` (model.py), the loss normalised by
the element count of the whole step so the gradient is the same for any split over ranks and micro-steps.
Then the global gradient norm, which also decides whether the step is finite: a step whose loss or gradient
is not finite is skipped before `optimizer.step()` (weights and optimizer untouched) and logged; more than
`train.max_bad_steps` of them in a row stop the run. AdamW decays weight matrices only.

State lives with its owner and is restored from a checkpoint by it: the adapters (released files), the
optimizer (torch.distributed.checkpoint, sharded), each rank's RNG, and the step, from which the data position
and the learning rate (`lr_factor`, from the config) follow. Losses stay on the device until they are logged.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..constants import REFERENCE_PROMPT
from ..errors import InputError, LynxError
from ..io.files import atomic_write
from ..runtime import DTYPES
from . import checkpoint as ckpt
from .config import TrainingConfig, check_files
from .data import PackDataset, PackStream, load_sample, load_shared, read_index
from .model import Runtime, build_adapters, build_model, load_transformer, setup_runtime, teardown_runtime
from .objective import LynxTrainModel, default_shift, flow_matching_loss, make_step_inputs, pad_text, token_count

__all__ = ["Trainer", "TrainResult", "train", "check_output_dir", "read_metrics", "lr_factor", "build_adapters",
           "load_transformer"]

METRICS_FILE = "metrics.csv"
METRICS_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens", "samples", "tokens_per_s", "seconds", "skipped")
FINAL_DIR = "final"
SAMPLES_DIR = "samples"


# ----- optimisation ------------------------------------------------------------------------------------------
def lr_factor(step: int, warmup: int, steps: int, kind: str) -> float:
    """The learning rate of step `step` (0-based) as a fraction of `train.learning_rate`: linear warm-up, then
    constant, or cosine to zero at the last step. A function of the step alone, so a resumed run needs no
    scheduler state, and a raised `train.steps` reshapes the rest of the schedule."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices (2-D) only. Biases, norm scales, the resampler's latent
    queries and the ID registers are offsets and learned tokens, not maps: shrinking them towards zero has no
    regularising meaning, so they are not decayed."""
    decay, keep = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim == 2 else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def clip_gradients(params, max_norm: float, loss: torch.Tensor) -> float:
    """Clip the gradients to a global norm of `max_norm` (0: no clipping) and return the norm before clipping,
    NaN when the gradient or any rank's `loss` is not finite (one collective, one host read per step).

    The sum of squares is taken in float64, where the square of every fp32 gradient is exact, so the one value
    that crosses elements (the clip coefficient, rounded to fp32) does not depend on how FSDP splits the
    tensors: 1 rank and N ranks clip identically (docs/training.md, "Numerics")."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    total = torch.zeros((), dtype=torch.float64, device=loss.device)
    for g in grads:
        total += g.double().square().sum()
    total += 0.0 * loss.double()  # NaN or inf on any rank makes the norm NaN on every rank
    if dist.is_initialized():
        dist.all_reduce(total)
    norm = float(total.sqrt())
    if max_norm > 0 and math.isfinite(norm):
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return norm if math.isfinite(norm) else math.nan


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
        if tensorboard:  # its presence was checked with the config (`check_files`)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRICS_FIELDS).writerow(row)
        if self.writer is not None:
            for k in ("loss", "lr", "grad_norm", "tokens_per_s", "skipped"):
                self.writer.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self):
        if self.writer is not None:
            self.writer.close()


def read_metrics(output_dir) -> list[dict]:
    """Rows of metrics.csv as dicts of floats (step as int)."""
    with open(Path(output_dir) / METRICS_FILE, newline="") as f:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


# ----- sample videos ----------------------------------------------------------------------------------------------
class SampleMaker:
    """Sample videos of the fixed validation identity: a plain `LynxPipeline` call on the model's own transformer
    and resampler (nothing is copied or cast), with the prompts' embeddings from the prepare cache."""

    def __init__(self, config: TrainingConfig, model: LynxTrainModel, shared: dict, first_key: str,
                 runtime: Runtime):
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

        from ..pipelines.pipeline_lynx import LynxPipeline

        base, v = Path(config.train.base), config.validation
        self.config, self.model, self.runtime = config, model, runtime
        lookup = shared["prompt_lookup"]
        self.texts = [pad_text(lookup[p].float())[None] for p in v.prompts]
        self.negative = pad_text(lookup[v.negative_prompt].float())[None]
        self.reference_text = pad_text(lookup[REFERENCE_PROMPT].float())[None]
        if "validation_embedding" in shared:
            self.embedding, self.crop = shared["validation_embedding"], shared["validation_crop"].numpy()
        else:
            first = load_sample(config.data.cache_dir, first_key)
            self.embedding, self.crop = first["embedding"], first["reference_crop"].numpy()
        vae = AutoencoderKLWan.from_pretrained(base / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)
        self.pipe = LynxPipeline(None, None, vae.to(runtime.device),
                                 UniPCMultistepScheduler.from_pretrained(base / "scheduler"),
                                 model.transformer, model.resampler)
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, step: int, output_dir: Path) -> list[Path]:
        from ..io.provenance import provenance_mark
        from ..io.video import save_video

        v, paths = self.config.validation, []
        self.model.unshard()  # the root's weights; every rank samples, as the blocks' gathers are collectives
        try:
            for i, text in enumerate(self.texts):
                frames = self.pipe(prompt_embeds=text, negative_prompt_embeds=self.negative,
                                   reference_prompt_embeds=self.reference_text, face_embedding=self.embedding,
                                   reference_image=self.crop, height=v.height, width=v.width,
                                   num_frames=v.num_frames, num_inference_steps=v.num_inference_steps, seed=v.seed,
                                   output_type="np").frames[0]
                if self.runtime.main:
                    # Monitoring output of a run, marked but not gated (docs/safety.md).
                    mark = provenance_mark(base=self.config.train.base, adapter=f"training-step-{step}",
                                           variant=self.pipe.variant, seed=v.seed)
                    paths.append(save_video(frames, output_dir / SAMPLES_DIR / f"step-{step:08d}-{i}{v.format}",
                                            v.fps, mark=mark))
        finally:
            self.model.reshard()
        return paths


# ----- the loop ---------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float]  # of the steps run in this call (NaN for a skipped step)
    final_dir: Path | None
    checkpoint: Path | None
    samples: list[Path] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)  # 1-based steps whose update was not applied
    main: bool = True  # this process is rank 0 (it wrote the files)


@dataclass
class StepOutcome:
    step: int  # 1-based: the number of steps done after this one
    loss: torch.Tensor  # this rank's share of the step's loss, float64 on the device (reduced when logged)
    grad_norm: float  # global, before clipping; NaN for a non-finite step
    lr: float
    tokens: int
    samples: int
    seconds: float

    @property
    def skipped(self) -> bool:
        return not math.isfinite(self.grad_norm)


def _identity(item):
    return item


def rank_packs(start_step: int, world: int, rank: int, accum: int):
    """Global pack indices this rank reads, in order: step s, micro-step a -> s*W*A + rank*A + a."""
    for s in itertools.count(start_step):
        for a in range(accum):
            yield (s * world + rank) * accum + a


class Trainer:
    """One training run: the data, the sharded model, AdamW, logging, sample videos and checkpoints.

    Everything the config can get wrong, and every file it names, is checked before the model is built.
    """

    def __init__(self, config: TrainingConfig, runtime: Runtime, resume=None, progress: bool = True):
        check_files(config, "train")
        t = self.t = config.train
        self.config, self.runtime, self.progress = config, runtime, progress
        self.output_dir = Path(t.output_dir)
        self.source = ckpt.find_checkpoint(self.output_dir, resume)
        if resume not in (None, False) and self.source is None and runtime.main:
            print(f"no checkpoint in {self.output_dir / ckpt.CHECKPOINTS_DIR}; starting from step 0")
        if self.source is not None:
            ckpt.check_checkpoint(self.source)
        state = ckpt.load_trainer_state(self.source) if self.source is not None else {}
        self.start_step = int(state.get("step", 0))
        self.bad_in_a_row = int(state.get("bad_steps_in_a_row", 0))
        if self.start_step >= t.steps:
            raise InputError(f"{self.source} is at step {self.start_step}; train.steps = {t.steps} leaves nothing "
                             "to do (raise train.steps to continue training)")

        # Data, and what sampling will need from the cache, before any model is built.
        self.index = read_index(config.data.cache_dir)
        self.shared = load_shared(config.data.cache_dir, config)
        v = config.validation
        self.sampling = v.every > 0 and bool(v.prompts)
        if self.sampling:
            missing = [p for p in (*v.prompts, v.negative_prompt, REFERENCE_PROMPT) if p not in self.shared[
                "prompt_lookup"]]
            if missing:  # found now, not when the first sample video is due hours later
                raise InputError(f"validation prompt {missing[0][:60]!r} is not in the prepare cache; run "
                                 "`lynx prepare` with this config again (it only encodes what is missing)")
        with open(Path(t.base) / "transformer" / "config.json") as f:
            base_config = json.load(f)
        with open(Path(t.base) / "scheduler" / "scheduler_config.json") as f:
            sched_cfg = json.load(f)
        shapes = self.index.shapes()
        if shapes[0][0] != base_config.get("in_channels"):
            raise InputError(f"the cache holds {shapes[0][0]}-channel latents but the transformer takes "
                             f"{base_config.get('in_channels')}: it was prepared with another base model")
        patch = tuple(base_config.get("patch_size", (1, 2, 2)))
        self.tokens = [token_count(s, patch) for s in shapes]
        self.elements = [math.prod(s) for s in shapes]
        self.stream = PackStream(self.tokens, t.token_budget, t.seed)
        if self.stream.excluded and runtime.main:
            print(f"warning: {len(self.stream.excluded)} samples exceed train.token_budget = {t.token_budget} "
                  "tokens and are left out")
        self.shift = t.timestep_shift if t.timestep_shift is not None else default_shift(sched_cfg)
        self.num_train_timesteps = int(sched_cfg.get("num_train_timesteps", 1000))
        self.drop = (t.drop_text, t.drop_identity, t.drop_reference)
        self.per_step = runtime.world * t.grad_accum
        self.dtype = DTYPES[t.precision]

        # Model and optimizer; a checkpoint restores each from its own files.
        init = self.source if self.source is not None else (None if t.init == "scratch" else Path(t.init))
        self.model = build_model(config, runtime, init)
        self.use_ref = self.model.adapter_config.use_ref
        self.params = self.model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, t.weight_decay), lr=t.learning_rate,
                                           betas=tuple(t.betas), eps=t.adam_eps)
        if self.source is not None:
            ckpt.load_optimizer_and_rng(self.source, self.model, self.optimizer)
        self.samples = SampleMaker(config, self.model, self.shared, self.index.keys[0], runtime) \
            if self.sampling else None

    def step_members(self, step: int) -> list[int]:
        """Sample indices of every pack of `step`, over all ranks and micro-steps."""
        return [i for g in range(step * self.per_step, (step + 1) * self.per_step) for i in self.stream[g]]

    def train_step(self, step: int, packs: list[tuple[int, list[dict]]]) -> StepOutcome:
        """One optimisation step (0-based `step`) on this rank's `packs` (pack index, cached samples)."""
        t, device, tic = self.t, self.runtime.device, time.time()
        lr = t.learning_rate * lr_factor(step, t.warmup_steps, t.steps, t.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        members = self.step_members(step)
        normaliser = float(sum(self.elements[i] for i in members))
        loss = torch.zeros((), dtype=torch.float64, device=device)
        for g, samples in packs:
            inputs = make_step_inputs(samples, self.shared, g, t.seed, self.shift, self.drop,
                                      self.num_train_timesteps, device, self.dtype, self.use_ref)
            preds = self.model(inputs.noisy, inputs.timesteps, inputs.text, inputs.embeddings, inputs.reference,
                               inputs.reference_text)
            part = flow_matching_loss(preds, inputs.targets, normaliser)
            part.backward()  # FSDP sums the ranks' gradients: the step's gradient
            loss += part.detach().double()
        grad_norm = clip_gradients(self.params, t.max_grad_norm, loss)
        if math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(step + 1, loss, grad_norm, lr, sum(self.tokens[i] for i in members), len(members),
                           time.time() - tic)

    def fit(self) -> TrainResult:
        """Run from the start (or the checkpoint) to `train.steps`; write the final adapters."""
        from tqdm.auto import tqdm

        t, main = self.t, self.runtime.main
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.output_dir / "config.json",
                         lambda tmp: tmp.write_text(json.dumps(self.config.to_dict(), indent=2)))
        metrics = MetricsLog(self.output_dir, self.start_step, t.tensorboard, main)
        loader = torch.utils.data.DataLoader(
            PackDataset(self.index, self.stream), batch_size=None, collate_fn=_identity,
            sampler=rank_packs(self.start_step, self.runtime.world, self.runtime.rank, t.grad_accum),
            num_workers=t.num_workers, prefetch_factor=2 if t.num_workers else None)
        batches = iter(loader)
        losses, skipped, pending, saved, sample_paths = [], [], [], None, []
        bar = tqdm(total=t.steps, initial=self.start_step, unit="step", disable=not (self.progress and main),
                   dynamic_ncols=True)
        started = time.time()

        def flush():
            """Reduce the pending steps' losses over ranks (one collective) and log them."""
            if not pending:
                return
            values = torch.stack([o.loss for o in pending])
            dist.all_reduce(values)
            for o, value in zip(pending, values.tolist()):
                value = value if not o.skipped else math.nan
                losses.append(value)
                if o.step % t.log_every == 0 or o.step == t.steps or o.skipped:
                    metrics.write({"step": o.step, "loss": value, "lr": o.lr, "grad_norm": o.grad_norm,
                                   "tokens": o.tokens, "samples": o.samples,
                                   "tokens_per_s": o.tokens / max(o.seconds, 1e-9),
                                   "seconds": round(time.time() - started, 3), "skipped": int(o.skipped)})
                    bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{o.tokens / max(o.seconds, 1e-9):.0f}")
            pending.clear()

        try:
            for step in range(self.start_step, t.steps):
                packs = [next(batches) for _ in range(t.grad_accum)]
                outcome = self.train_step(step, packs)
                pending.append(outcome)
                done = outcome.step
                if outcome.skipped:
                    skipped.append(done)
                    self.bad_in_a_row += 1
                    first = step * self.per_step
                    if main:
                        print(f"warning: step {done}: the loss or gradient is not finite; the step is skipped and "
                              f"the weights are unchanged (packs {first}..{first + self.per_step - 1})")
                    if self.bad_in_a_row > t.max_bad_steps:
                        flush()
                        raise LynxError(f"{self.bad_in_a_row} steps in a row up to step {done} had a non-finite "
                                        f"loss or gradient (train.max_bad_steps = {t.max_bad_steps}); the last good "
                                        f"checkpoint is in {self.output_dir / ckpt.CHECKPOINTS_DIR} (try a lower "
                                        "train.learning_rate, or check the data of the packs named above)")
                else:
                    self.bad_in_a_row = 0
                save = done % t.save_every == 0 or done == t.steps
                if done % t.log_every == 0 or save or outcome.skipped or done == t.steps:
                    flush()
                bar.update(1)
                if save:
                    state = {"packs_consumed": done * self.per_step, "loss": losses[-1],
                             "bad_steps_in_a_row": self.bad_in_a_row, "config": self.config.to_dict()}
                    saved = ckpt.save_checkpoint(self.output_dir, done, self.model, self.optimizer, state,
                                                 t.keep_last)
                if self.samples is not None and (done % self.config.validation.every == 0 or done == t.steps):
                    sample_paths += self.samples(done, self.output_dir)
        except torch.OutOfMemoryError:
            raise LynxError(f"out of accelerator memory at train.token_budget = {t.token_budget}; lower it, keep "
                            "train.gradient_checkpointing on, or use more GPUs. Checkpoints so far are intact in "
                            f"{self.output_dir / ckpt.CHECKPOINTS_DIR}") from None
        finally:
            bar.close()
            metrics.close()
            del batches

        final_dir = self.output_dir / FINAL_DIR
        state = ckpt.full_adapter_state(self.model, DTYPES[t.save_dtype])
        if main:
            ckpt.write_adapters(final_dir, self.model, state)
        dist.barrier()
        return TrainResult(self.output_dir, t.steps, losses, final_dir, saved, sample_paths, skipped, main)


def check_output_dir(output_dir: Path, resume) -> None:
    """A fresh run writes checkpoints, metrics and `final/` over whatever `output_dir` holds, so it must start
    in an empty (or new) folder; continuing a run there is what --resume is for."""
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"train.output_dir: {output_dir} is a file, not a folder; set train.output_dir to a folder")
    if resume in (None, False) and output_dir.is_dir() and any(output_dir.iterdir()):
        raise InputError(f"train.output_dir: {output_dir} is not empty (an earlier run's checkpoints would be "
                         "overwritten); pass --resume to continue that run, or set train.output_dir to a new folder")


def train(config: TrainingConfig, resume=None, progress: bool = True) -> TrainResult:
    """Train the adapters as `config` says; `resume` True/"auto" continues the latest checkpoint, or give a path.

    The config's files are checked before a process group is joined or a model is built."""
    check_files(config, "train")
    check_output_dir(Path(config.train.output_dir), resume)
    runtime = setup_runtime()
    try:
        return Trainer(config, runtime, resume, progress).fit()
    finally:
        teardown_runtime(runtime)
