"""Every size and default of Lynx in one place: adapter presets (full, lite, tiny) and sampling defaults.

The numbers come from the spec of the released checkpoints (shared/spec/LYNX_SPEC.md).
Nothing else in the package should hard-code a width, a depth, a guidance scale or a frame rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# ArcFace 112x112 template for (left eye, right eye, nose tip, left mouth corner, right mouth corner).
ARCFACE_TEMPLATE = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)

REFERENCE_PROMPT = "image of a face"

DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, blurred background, static, subtitles, style, works, paintings, "
    "images, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
    "fused fingers, still picture, messy background, three legs, many people in the background, "
    "walking backwards"
)

# Text is always encoded to this many tokens; longer prompts are truncated with a warning.
MAX_TEXT_TOKENS = 512

# File names of an adapter directory (spec section 2).
RESAMPLER_FILE = "resampler.safetensors"
IP_LAYERS_FILE = "ip_layers.safetensors"
REF_LAYERS_FILE = "ref_layers.safetensors"

# Where the released weights are published, for "what to download" messages.
BASE_MODEL_REPO = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
ADAPTER_REPO = "ByteDance/lynx"


@dataclass(frozen=True)
class ResamplerConfig:
    """Perceiver Resampler sizes: 512-d face embedding -> `num_queries` identity tokens."""

    dim: int = 1280
    depth: int = 4
    heads: int = 20
    dim_head: int = 64
    num_queries: int = 16
    embedding_dim: int = 512
    output_dim: int = 5120
    ff_mult: int = 4


def transformer_dims(config) -> tuple[int, int]:
    """(number of blocks, width) from a Wan transformer config (its JSON dict or `transformer.config`):
    the two sizes the adapters must match."""
    return config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of one Lynx adapter set, as read from (or written to) an adapter directory."""

    variant: str  # "full" or "lite"
    resampler: ResamplerConfig
    num_blocks: int  # transformer depth the adapter was made for
    hidden_dim: int  # transformer width
    ip_blocks: tuple[int, ...]  # which transformer blocks carry an ID branch
    ip_bias: bool
    ip_key_norm: str  # "block" (the block's own norm_k) or "rms" (separate weightless RMSNorm)
    ip_key_norm_eps: float = 1e-5
    num_registers: int = 0
    use_ref: bool = True

    @property
    def ip_input_dim(self) -> int:
        return self.resampler.output_dim

    def to_dict(self) -> dict:
        return asdict(self)


def full_adapter_config(num_blocks: int = 40, hidden_dim: int = 5120, num_registers: int = 0,
                        resampler: ResamplerConfig | None = None) -> AdapterConfig:
    """The `lynx_full` layout: ID branch in every block (with bias), Ref branch in every block."""
    resampler = resampler or ResamplerConfig(output_dim=hidden_dim)
    return AdapterConfig(
        variant="full", resampler=resampler, num_blocks=num_blocks, hidden_dim=hidden_dim,
        ip_blocks=tuple(range(num_blocks)), ip_bias=True, ip_key_norm="block",
        num_registers=num_registers, use_ref=True,
    )


def lite_adapter_config(num_blocks: int = 40, hidden_dim: int = 5120, ip_dim: int = 2048,
                        resampler: ResamplerConfig | None = None) -> AdapterConfig:
    """The `lynx_lite` layout: ID branch on every second block, no bias, own RMSNorm on keys, no Ref."""
    resampler = resampler or ResamplerConfig(output_dim=ip_dim)
    return AdapterConfig(
        variant="lite", resampler=resampler, num_blocks=num_blocks, hidden_dim=hidden_dim,
        ip_blocks=tuple(range(0, num_blocks, 2)), ip_bias=False, ip_key_norm="rms",
        num_registers=0, use_ref=False,
    )


@dataclass(frozen=True)
class SamplingConfig:
    """Defaults of one generation call; `full` and `lite` differ only in frames, fps and guidance mode."""

    num_frames: int = 81
    fps: int = 16
    height: int = 480
    width: int = 832
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    guidance_scale_i: float | None = 2.0  # None: two-way guidance (lite)
    ip_scale: float = 1.0
    ref_scale: float = 1.0
    seed: int = 42
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    # The authors' diffusers 0.33.1 UniPC grid, before the flow shift: linspace(start, 0, n + 1)[:-1].
    sigma_start: float = 0.999


SAMPLING_PRESETS: dict[str, SamplingConfig] = {
    "full": SamplingConfig(),
    "lite": SamplingConfig(num_frames=121, fps=24, guidance_scale_i=None),
}


def sampling_defaults(variant: str) -> SamplingConfig:
    return SAMPLING_PRESETS[variant]


@dataclass(frozen=True)
class TinyModelConfig:
    """Sizes of the tiny random models that tests and benchmarks build in the real diffusers layout."""

    num_layers: int = 4
    num_heads: int = 2
    head_dim: int = 12  # divisible by 6 for Wan's 3-axis RoPE split
    ffn_dim: int = 32
    text_dim: int = 16
    freq_dim: int = 16
    vae_base_dim: int = 8
    vae_z_dim: int = 16
    text_layers: int = 1
    vocab_size: int = 64
    resampler: ResamplerConfig = field(default_factory=lambda: ResamplerConfig(
        dim=32, depth=2, heads=2, dim_head=64, num_queries=4, embedding_dim=512, output_dim=16, ff_mult=2))

    @property
    def hidden_dim(self) -> int:
        return self.num_heads * self.head_dim

    def with_(self, **kw) -> "TinyModelConfig":
        return replace(self, **kw)


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
    from dataclasses import fields

    from .errors import InputError

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
    from .errors import InputError

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
    import tomllib
    from pathlib import Path

    from .errors import InputError

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
