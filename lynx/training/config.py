"""Training configuration: the `[data]`, `[train]` and `[validation]` tables of a stage's TOML file."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..constants import DEFAULT_NEGATIVE_PROMPT, ResamplerConfig
from ..errors import InputError

# ----- training (`lynx prepare`, `lynx train`; docs/training.md) -------------------------------------------------
# The paper gives lr 1e-5, AdamW weight decay 0.01 and ~33,600 tokens per GPU per step (spec section 6); the
# remaining defaults are this project's choices and are named here so a config file can change any of them.

@dataclass(frozen=True)
class DataConfig:
    """What `lynx prepare` reads and caches, and the sizes samples are brought to."""

    manifest: str = ""  # JSONL or CSV: path, caption [, id, reference]; paths relative to the manifest
    cache_dir: str = ""
    buckets: tuple[tuple[int, int], ...] = ((480, 832), (832, 480), (624, 624))  # (height, width), multiples of 16
    frames: tuple[int, ...] = (1,)  # allowed clip lengths, 4k+1; (1,) = images as one-frame videos (stage 1)
    fps: float = 16.0  # videos are subsampled to about this rate before a clip is taken
    max_upscale: float = 1.0  # a sample needing more enlargement than this for its bucket is skipped
    cache_dtype: str = "bfloat16"  # storage dtype of cached latents and text embeddings
    device: str | None = None  # where prepare runs the VAE and text encoder (default: cuda when present)
    dtype: str = "bf16"  # their compute dtype: bf16 or fp32
    null_prompt: str = ""  # the caption of the 'drop text' branch


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: what trains, from where, how fast, with which dropout, on how many tokens."""

    base: str = ""  # Wan2.1-T2V diffusers directory
    output_dir: str = "outputs/train"
    init: str = "scratch"  # "scratch" or an adapter directory to fine-tune (released lynx_full/lynx_lite or ours)
    variant: str = "full"  # from scratch: "full" (ID + Ref) or "lite" (ID only)
    num_registers: int = 0
    resampler: ResamplerConfig | None = None  # from scratch; None: released sizes
    steps: int = 10_000
    learning_rate: float = 1e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 500
    lr_schedule: str = "constant"  # after warm-up: "constant" or "cosine" (to 0 at `steps`)
    max_grad_norm: float = 1.0  # 0: no clipping
    token_budget: int = 33_600  # video tokens per device per micro-step
    grad_accum: int = 1
    drop_text: float = 0.1
    drop_identity: float = 0.1
    drop_reference: float = 0.1
    timestep_shift: float | None = None  # None: the base scheduler's flow_shift
    precision: str = "bf16"  # "bf16" (backbone bf16, adapters fp32 masters) or "fp32"
    gradient_checkpointing: bool = True
    attention: str = "auto"  # packed attention: "auto", "varlen", "split" (exact, any backend) or "mask"
    attention_backend: str | None = None  # diffusers backend for per-sample attention ("flash", "sage", ...)
    seed: int = 0
    num_workers: int = 2  # data-loading processes per rank
    log_every: int = 1
    save_every: int = 500
    keep_last: int = 3  # checkpoints kept; older ones are deleted after a newer one is complete
    save_dtype: str = "float32"  # dtype of the saved adapter files
    tensorboard: bool = False  # also log to TensorBoard (needs the tensorboard package); CSV is always written


@dataclass(frozen=True)
class ValidationConfig:
    """The fixed identity and prompts of the periodic sample videos (encoded once by `lynx prepare`)."""

    prompts: tuple[str, ...] = ("A person smiles and waves at the camera in a sunny park.",)
    identity: str | None = None  # photo of the validation face; None: the first prepared sample's identity
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    every: int = 1000  # steps between sample videos; 0: none
    height: int = 480
    width: int = 832
    num_frames: int = 1
    num_inference_steps: int = 30
    seed: int = 42
    fps: int = 16
    format: str = ".mp4"


@dataclass(frozen=True)
class TrainingConfig:
    """One training stage: `[data]`, `[train]` and `[validation]` tables of a TOML file."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _section(cls, values: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(where + '.' + k for k in unknown)}; "
                         f"valid in [{where}]: {', '.join(known)}")
    out = {}
    for name, value in values.items():
        if name == "resampler" and isinstance(value, dict):
            value = ResamplerConfig(**value)
        elif name == "buckets":
            value = tuple(tuple(int(v) for v in b) for b in value)
        elif isinstance(value, list):
            value = tuple(value)
        out[name] = value
    return cls(**out)


def training_config_from_dict(values: dict) -> TrainingConfig:
    """Build a `TrainingConfig` from nested dicts (a parsed TOML file); unknown keys are an error, not ignored."""
    sections = {"data": DataConfig, "train": TrainConfig, "validation": ValidationConfig}
    unknown = sorted(set(values) - set(sections))
    if unknown:
        raise InputError(f"unknown table(s) {', '.join('[' + u + ']' for u in unknown)}; "
                         f"a training config has {', '.join('[' + s + ']' for s in sections)}")
    try:
        return TrainingConfig(**{name: _section(cls, values.get(name, {}), name) for name, cls in sections.items()})
    except TypeError as e:
        raise InputError(f"invalid training config: {e}") from None


def load_training_config(path, overrides: tuple[str, ...] | list[str] = ()) -> TrainingConfig:
    """Read a TOML training config; `overrides` like "train.steps=100" (TOML values) win over the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"training config {path} does not exist (see configs/train_stage1.toml)")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path} is not valid TOML: {e}") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise InputError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word is taken as a string
        values.setdefault(section, {})[name] = value
    return training_config_from_dict(values)
