"""Training configuration: the `[data]`, `[train]` and `[validation]` tables of a stage's TOML file.

Typed with pydantic v2 and checked completely when a file is read, so every mistake (a wrong dtype, an unknown
key, a negative learning rate, a bucket that is not a multiple of 16, ...) is reported before any model loads,
in one line that names the key and what it may be. `check_files` then checks what a command will open.
Dtypes have one vocabulary everywhere: `lynx.runtime.DTYPES` (fp32, bf16, fp16).
"""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from ..constants import (
    ADAPTER_REPO,
    BASE_MODEL_REPO,
    DEFAULT_NEGATIVE_PROMPT,
    IP_LAYERS_FILE,
    RESAMPLER_FILE,
    ResamplerConfig,
)
from ..errors import InputError

INDEX_FILE = "index.jsonl"  # the prepared cache's table of samples (written by lynx.training.data)

# Strict: TOML already gives typed values, so `true` for a count or `"5"` for a number is a mistake to report.
Int = Annotated[int, Strict()]
Count = Annotated[int, Strict(), Field(ge=1)]
NonNegative = Annotated[int, Strict(), Field(ge=0)]
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Probability = Annotated[float, Strict(), Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Text = Annotated[str, Strict()]
Dtype = Literal["fp32", "bf16", "fp16"]  # the names of lynx.runtime.DTYPES
ATTENTION_MODES = ("auto", "varlen", "split", "mask")
VIDEO_FORMATS = (".mp4", ".webp", ".gif")


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _multiple_of_16(name: str, value: int) -> None:
    if value % 16:
        lo = max(16, value // 16 * 16)
        raise ValueError(f"{name} {value} is not a multiple of 16 (try {lo} or {lo + 16})")


def _four_k_plus_one(value: int) -> None:
    if (value - 1) % 4:
        lo = (value - 1) // 4 * 4 + 1
        raise ValueError(f"{value} frames is not 4k+1, as the VAE compresses time 4x (try {lo} or {lo + 4})")


# ----- training (`lynx prepare`, `lynx train`; docs/training.md) -------------------------------------------------
# The paper gives lr 1e-5, AdamW weight decay 0.01 and ~33,600 tokens per GPU per step (spec section 6); the
# remaining defaults are this project's choices and are named here so a config file can change any of them.

class ResamplerSettings(_Table):
    """Sizes of a resampler trained from scratch (`lynx.constants.ResamplerConfig`)."""

    dim: Count = 1280
    depth: Count = 4
    heads: Count = 20
    dim_head: Count = 64
    num_queries: Count = 16
    embedding_dim: Count = 512
    output_dim: Count = 5120
    ff_mult: Count = 4

    def to_config(self) -> ResamplerConfig:
        return ResamplerConfig(**self.model_dump())


class DataConfig(_Table):
    """What `lynx prepare` reads and caches, and the sizes samples are brought to."""

    manifest: Text = ""  # JSONL or CSV: path, caption [, id, reference]; paths relative to the manifest
    cache_dir: Text = ""
    # (height, width), multiples of 16
    buckets: Annotated[tuple[tuple[Count, Count], ...], Field(min_length=1)] = ((480, 832), (832, 480), (624, 624))
    # allowed clip lengths, 4k+1; (1,) = images as one-frame videos (stage 1)
    frames: Annotated[tuple[Count, ...], Field(min_length=1)] = (1,)
    fps: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)] = 16.0  # videos are subsampled to about this
    max_upscale: Annotated[float, Strict(), Field(ge=1.0, allow_inf_nan=False)] = 1.0  # more enlargement: skipped
    cache_dtype: Dtype = "bf16"  # storage dtype of cached latents and text embeddings
    device: Text | None = None  # where prepare runs the VAE and text encoder (default: cuda when present)
    dtype: Dtype = "bf16"  # their compute dtype
    null_prompt: Text = ""  # the caption of the 'drop text' branch

    @field_validator("buckets")
    @classmethod
    def _buckets(cls, buckets):
        for h, w in buckets:
            _multiple_of_16("height", h)
            _multiple_of_16("width", w)
        return buckets

    @field_validator("frames")
    @classmethod
    def _frames(cls, frames):
        for n in frames:
            _four_k_plus_one(n)
        return frames


class TrainConfig(_Table):
    """The optimisation: what trains, from where, how fast, with which dropout, on how many tokens."""

    base: Text = ""  # Wan2.1-T2V diffusers directory
    output_dir: Text = "outputs/train"
    init: Text = "scratch"  # "scratch" or an adapter directory to fine-tune (released lynx_full/lynx_lite or ours)
    variant: Literal["full", "lite"] = "full"  # from scratch: ID + Ref, or ID only
    num_registers: NonNegative = 0
    resampler: ResamplerSettings | None = None  # from scratch; None: released sizes
    steps: Count = 10_000
    learning_rate: Annotated[float, Strict(), Field(ge=0.0, allow_inf_nan=False)] = 1e-5
    # AdamW's decoupled decay, on weight matrices only (not biases, norms, latents or registers; docs/training.md)
    weight_decay: Annotated[float, Strict(), Field(ge=0.0, allow_inf_nan=False)] = 0.01
    betas: tuple[Annotated[float, Strict(), Field(ge=0.0, lt=1.0)], Annotated[float, Strict(), Field(ge=0.0, lt=1.0)]] \
        = (0.9, 0.999)
    adam_eps: Annotated[float, Strict(), Field(gt=0.0, allow_inf_nan=False)] = 1e-8
    warmup_steps: NonNegative = 500
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up; cosine reaches 0 at `steps`
    max_grad_norm: Annotated[float, Strict(), Field(ge=0.0, allow_inf_nan=False)] = 1.0  # 0: no clipping
    max_bad_steps: NonNegative = 10  # steps in a row with a non-finite loss or gradient (skipped) before stopping
    token_budget: Count = 33_600  # video tokens per device per micro-step
    grad_accum: Count = 1
    drop_text: Probability = 0.1
    drop_identity: Probability = 0.1
    drop_reference: Probability = 0.1
    timestep_shift: Annotated[float, Strict(), Field(gt=0.0, allow_inf_nan=False)] | None = None  # None: the base's
    precision: Literal["bf16", "fp32"] = "bf16"  # compute dtype of the frozen backbone; adapters keep fp32 masters
    gradient_checkpointing: Annotated[bool, Strict()] = True
    attention: Literal[ATTENTION_MODES] = "auto"  # packed attention: varlen, split (exact, any backend) or mask
    attention_backend: Text | None = None  # diffusers backend for per-sample attention ("flash", "sage", ...)
    seed: NonNegative = 0
    num_workers: NonNegative = 2  # data-loading processes per rank
    log_every: Count = 1
    save_every: Count = 500
    keep_last: NonNegative = 3  # checkpoints kept (0: all); older ones are deleted after a newer one is complete
    save_dtype: Dtype = "fp32"  # dtype of the saved adapter files
    tensorboard: Annotated[bool, Strict()] = False  # also log to TensorBoard; CSV is always written

    @field_validator("attention_backend")
    @classmethod
    def _backend(cls, name):
        if name is None:
            return name
        from diffusers.models.attention_dispatch import AttentionBackendName

        allowed = [b.value for b in AttentionBackendName]
        if name not in allowed:
            raise ValueError(f"unknown attention backend {name!r}; diffusers has {', '.join(allowed)}")
        return name


class ValidationConfig(_Table):
    """The fixed identity and prompts of the periodic sample videos (encoded once by `lynx prepare`)."""

    prompts: tuple[Text, ...] = ("A person smiles and waves at the camera in a sunny park.",)
    identity: Text | None = None  # photo of the validation face; None: the first prepared sample's identity
    negative_prompt: Text = DEFAULT_NEGATIVE_PROMPT
    every: NonNegative = 1000  # steps between sample videos; 0: none
    height: Count = 480
    width: Count = 832
    num_frames: Count = 1
    num_inference_steps: Count = 30
    seed: NonNegative = 42
    fps: Annotated[int, Strict(), Field(ge=1, le=240)] = 16
    format: Literal[VIDEO_FORMATS] = ".mp4"

    @field_validator("height", "width")
    @classmethod
    def _side(cls, value, info):
        _multiple_of_16(info.field_name, value)
        return value

    @field_validator("num_frames")
    @classmethod
    def _frames(cls, value):
        _four_k_plus_one(value)
        return value


TABLES = {"data": DataConfig, "train": TrainConfig, "validation": ValidationConfig}


class TrainingConfig(_Table):
    """One training stage: `[data]`, `[train]` and `[validation]` tables of a TOML file."""

    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    validation: ValidationConfig = ValidationConfig()

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


# ----- reading ------------------------------------------------------------------------------------------------
def _table_of(loc: tuple) -> tuple[type[BaseModel] | None, str]:
    """The model class and dotted name of the table a validation error's location points into."""
    cls, names = TrainingConfig, []
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        inner = getattr(field, "annotation", None) if field else None
        inner = next((a for a in getattr(inner, "__args__", (inner,)) if isinstance(a, type)
                      and issubclass(a, BaseModel)), inner)
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            break
        cls, names = inner, names + [part]
    return cls, ".".join(names)


def _message(error: ValidationError) -> str:
    """One line naming every bad key and what it may be."""
    unknown: dict[str, list[str]] = {}
    problems = []
    for e in error.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            cls, table = _table_of(loc[:-1])
            unknown.setdefault(table, []).append(key)
            continue
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        problems.append(f"{key}: {msg}{shown}")
    for table, keys in unknown.items():
        if not table:
            problems.insert(0, f"unknown table(s) {', '.join('[' + k + ']' for k in keys)}; a training config has "
                               f"{', '.join('[' + t + ']' for t in TABLES)}")
        else:
            cls, _ = _table_of(tuple(table.split(".")))
            problems.insert(0, f"unknown setting(s) {', '.join(keys)}; valid in [{table}]: "
                               f"{', '.join(cls.model_fields)}")
    return "; ".join(problems)


def training_config_from_dict(values: dict) -> TrainingConfig:
    """Build a `TrainingConfig` from nested dicts (a parsed TOML file); any bad value is an `InputError` naming
    its key and the allowed values."""
    try:
        return TrainingConfig.model_validate(values)
    except ValidationError as e:
        raise InputError(f"invalid training config: {_message(e)}") from None


def apply_override(values: dict, item: str) -> None:
    """`table.key=value` or `table.sub.key=value` (the value in TOML syntax; a bare word is a string) into `values`."""
    key, sep, raw = item.partition("=")
    path = [p.strip() for p in key.split(".")]
    if not sep or len(path) < 2 or not all(path):
        raise InputError(f"override {item!r} must look like section.key=value, e.g. train.steps=100 or "
                         "train.resampler.dim=64")
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word (a path, a name) is taken as a string
    node = values
    for i, name in enumerate(path[:-1]):
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise InputError(f"override {item!r}: {'.'.join(path[:i + 1])} is a value, not a table")
        node = child
    node[path[-1]] = value


def load_training_config(path, overrides: tuple[str, ...] | list[str] = ()) -> TrainingConfig:
    """Read a TOML training config; `overrides` like "train.steps=100" or "train.resampler.dim=64" (TOML values)
    win over the file. Every value is checked here, before anything is loaded."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"training config {path} does not exist (see configs/train_stage1.toml)")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path} is not valid TOML: {e}") from None
    for item in overrides:
        apply_override(values, item)
    return training_config_from_dict(values)


def _adapter_download(directory: Path, variant: str) -> str:
    """The `hf download` line that fills `directory`, wherever it is: the repository keeps each variant in a
    lynx_full/ or lynx_lite/ folder, which lands under --local-dir."""
    if directory.name in ("lynx_full", "lynx_lite"):
        return (f"hf download {ADAPTER_REPO} --include '{directory.name}/*' "
                f"--local-dir {shlex.quote(str(directory.parent))}")
    return (f"hf download {ADAPTER_REPO} --include 'lynx_{variant}/*' --local-dir {shlex.quote(str(directory))}, "
            f"then set train.init = \"{directory / f'lynx_{variant}'}\"")


def check_files(config: TrainingConfig, command: Literal["prepare", "train"]) -> None:
    """What `command` will open exists, checked before any model loads; each problem names its key."""
    from ..models.loading import inspect_base_dir

    t, d = config.train, config.data
    if not t.base:
        raise InputError("train.base (the Wan2.1-T2V diffusers directory) is not set; set it or pass --base")
    report = inspect_base_dir(t.base)
    if not report.ok:
        raise InputError(f"train.base: the Wan2.1-T2V base model was not found at {t.base} "
                         f"({'; '.join(report.problems)}); point train.base (or --base) at it, or download it "
                         f"there: hf download {BASE_MODEL_REPO} --local-dir {shlex.quote(str(t.base))}")
    if command == "prepare":
        if not d.manifest or not d.cache_dir:
            raise InputError("data.manifest and data.cache_dir must be set in the training config")
        if not Path(d.manifest).is_file():
            raise InputError(f"data.manifest: {d.manifest} does not exist (a JSONL or CSV file with path and "
                             "caption per sample)")
        if config.validation.identity and not Path(config.validation.identity).is_file():
            raise InputError(f"validation.identity: {config.validation.identity} does not exist")
        return
    if not d.cache_dir or not (Path(d.cache_dir) / INDEX_FILE).is_file():
        raise InputError(f"data.cache_dir: {d.cache_dir or '(not set)'} has no {INDEX_FILE}: run `lynx prepare "
                         "--config ...` first (it resumes if it was interrupted)")
    if t.init != "scratch" and not Path(t.init).is_dir():
        raise InputError(f"train.init: {t.init} is not a directory; use \"scratch\" or a lynx_full/lynx_lite "
                         "(or checkpoint) directory to fine-tune")
    if t.init != "scratch":
        init = Path(t.init)
        missing = [n for n in (RESAMPLER_FILE, IP_LAYERS_FILE) if not (init / n).is_file()]
        if missing:
            raise InputError(f"train.init: {init} has no {' or '.join(missing)}; point train.init at a "
                             "lynx_full/lynx_lite (or checkpoint) directory, or use \"scratch\". To fine-tune the "
                             f"released weights: {_adapter_download(init, t.variant)}")
    if t.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise InputError("train.tensorboard = true needs the tensorboard package (pip install tensorboard); "
                             "metrics.csv is always written")
