"""Every size and default of Lynx in one place: adapter presets (full, lite, tiny) and sampling defaults.

The numbers come from the spec of the released checkpoints (shared/spec/LYNX_SPEC.md).
Nothing else in the package should hard-code a width, a depth, a guidance scale or a frame rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# The dtype names of the command line, configs and sidecars (`lynx.runtime.DTYPES` maps them to torch dtypes).
DTYPE_NAMES = ("fp32", "bf16", "fp16")

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

# The released configs of Wan2.1-T2V-14B-Diffusers' three models (transformer/, text_encoder/, vae/ config.json;
# the VAE's are AutoencoderKLWan's defaults): what `lynx plan` builds on the meta device to count bytes.
WAN_14B_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
UMT5_XXL_CONFIG = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6, tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
WAN_VAE_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True])

# Where the released weights are published, for "what to download" messages.
BASE_MODEL_REPO = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
ADAPTER_REPO = "ByteDance/lynx"

# The safety gate (docs/safety.md): the NSFW image classifier the authors ran on every video, the label it
# flags, and their threshold for it (a video is not written when a sampled frame scores at or above it).
SAFETY_MODEL_REPO = "Falconsai/nsfw_image_detection"
UNSAFE_LABELS = ("nsfw",)
NSFW_THRESHOLD = 0.85
# Frames classified per video, evenly spaced from first to last: at 16-24 fps consecutive frames barely
# differ, and 32 samples leave gaps of at most 4 frames (a sixth of a second) in an 81- or 121-frame clip.
SAFETY_SAMPLE_FRAMES = 32


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


# `guidance_scale_i=TWO_WAY`: no identity branch, two guided predictions per step, u + g (c - u) (lite's
# default); a number g_i gives three-way guidance, u + g_i (i - u) + g (c - i).
TWO_WAY = "two-way"

# Wan2.1's VAE compresses 4x in time and 8x in space, then the transformer takes 2x2 patches:
# videos have 4k+1 frames and sides that are multiples of 16.
FRAME_STEP = 4
SIDE_STEP = 16
# Limits that catch a typo before it costs hours (and bound what a web request may ask for);
# `allow_large=True` (`--allow-large`) lifts them on purpose.
MAX_STEPS = 200
MAX_FRAMES = 241
MAX_SIDE = 1920
MIN_FPS, MAX_FPS = 1, 240
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a signed 64-bit value


@dataclass(frozen=True)
class SamplingConfig:
    """Defaults of one generation call; `full` and `lite` differ only in frames, fps and guidance mode."""

    num_frames: int = 81
    fps: int = 16
    height: int = 480
    width: int = 832
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    guidance_scale_i: float | str = 2.0  # or TWO_WAY (lite)
    ip_scale: float = 1.0
    ref_scale: float = 1.0
    seed: int = 42
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    # The authors' diffusers 0.33.1 UniPC grid, before the flow shift: linspace(start, 0, n + 1)[:-1].
    sigma_start: float = 0.999


SAMPLING_PRESETS: dict[str, SamplingConfig] = {
    "full": SamplingConfig(),
    "lite": SamplingConfig(num_frames=121, fps=24, guidance_scale_i=TWO_WAY),
}


def sampling_defaults(variant: str) -> SamplingConfig:
    return SAMPLING_PRESETS[variant]


# ----- bases other than Wan2.1-T2V-14B ------------------------------------------------------------------------
# Wan transformers by (blocks, width, latent channels in): what a refusal names. The released adapters fit the
# 14B shape, which Wan2.2-T2V-A14B's two experts (high-noise `transformer`, low-noise `transformer_2`) share.
KNOWN_BASES: dict[tuple[int, int, int], str] = {
    (40, 5120, 16): "Wan2.1-T2V-14B / Wan2.2-T2V-A14B",
    (40, 5120, 36): "Wan2.1-I2V-14B / Wan2.2-I2V-A14B",
    (30, 1536, 16): "Wan2.1-T2V-1.3B",
    (30, 3072, 48): "Wan2.2-TI2V-5B",
}
BASES_THAT_FIT = "Wan-AI/Wan2.1-T2V-14B-Diffusers or Wan-AI/Wan2.2-T2V-A14B-Diffusers"

# Which experts of a two-expert (Wan2.2 A14B) base carry the adapters: the high-noise one only (what the
# Wan2GP / ComfyUI users found matters), or both.
EXPERTS = ("high", "both")

# ----- long videos: context windows over latent frames --------------------------------------------------------
# A window is one model window (81 video frames = 21 latent frames, what Wan was trained on); neighbouring
# windows share 16 video frames (4 latent frames), blended with linear ramps (ComfyUI's / Wan2GP's defaults).
CONTEXT_WINDOW_FRAMES = 81
CONTEXT_OVERLAP_FRAMES = 16
CONTEXT_BLENDS = ("linear", "uniform")
