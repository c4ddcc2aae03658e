"""Tiny random Wan bases and Lynx adapters, saved in the real layouts, for tests and benchmarks.

These are fixtures, never results: random weights produce noise videos. They exercise the exact
loading code paths (diffusers-layout base directory, official adapter file names and keys).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .constants import AdapterConfig, ResamplerConfig, full_adapter_config, lite_adapter_config
from .models.adapters import LynxAttnProcessor, install_adapters, processors
from .models.loading import save_adapters
from .models.resampler import Resampler

# The released scheduler config of Wan2.1-T2V-14B-Diffusers (UniPC, flow prediction, shift 3).
WAN_SCHEDULER_CONFIG = {
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True, "num_train_timesteps": 1000,
    "predict_x0": True, "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0, "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0,
    "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
    "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False,
}

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


_WORDS = ("a person walks on the beach at sunset smiling waves camera image of face man woman "
          "dancing in rain street city night close up portrait looking talking running park").split()


def tiny_tokenizer(vocab_size: int):
    """A word-level fast tokenizer with T5's conventions (pad id 0, </s> appended, unk for the rest)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in _WORDS:
        if len(vocab) < vocab_size:
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def tiny_components(cfg: TinyModelConfig = TinyModelConfig(), seed: int = 0) -> dict:
    """Random tiny tokenizer, UMT5 encoder, Wan VAE, Wan transformer and UniPC scheduler."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.text_dim, d_kv=8, d_ff=32, num_layers=cfg.text_layers,
        num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKLWan(base_dim=cfg.vae_base_dim, z_dim=cfg.vae_z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.vae_z_dim, out_channels=cfg.vae_z_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, rope_max_seq_len=32)
    # diffusers initialises some weights to exact zeros/ones; perturb them so every path carries signal.
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    scheduler = UniPCMultistepScheduler.from_config(WAN_SCHEDULER_CONFIG)
    return dict(tokenizer=tiny_tokenizer(cfg.vocab_size), text_encoder=text_encoder.eval(), vae=vae.eval(),
                transformer=transformer.eval(), scheduler=scheduler)


def save_tiny_base(directory, cfg: TinyModelConfig = TinyModelConfig(), seed: int = 0, two_experts: bool = False,
                   boundary_ratio: float = 0.875, expand_timesteps: bool = False) -> Path:
    """Save a tiny base in the diffusers layout of Wan2.1-T2V-14B-Diffusers, or with `two_experts` of
    Wan2.2-T2V-A14B-Diffusers: a second transformer of the same shape (other weights) in `transformer_2` and
    `boundary_ratio` in model_index.json. `expand_timesteps` writes TI2V-5B's flag (a base Lynx refuses)."""
    directory = Path(directory)
    parts = tiny_components(cfg, seed)
    if two_experts:
        parts["transformer_2"] = tiny_components(cfg, seed + 1000)["transformer"]
    for name, obj in parts.items():
        obj.save_pretrained(directory / name)
    index = {
        "_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"]}
    if two_experts or expand_timesteps:  # the Wan2.2 releases list every field, null where unused
        index.update(transformer_2=["diffusers", "WanTransformer3DModel"] if two_experts else [None, None],
                     boundary_ratio=boundary_ratio if two_experts else None, expand_timesteps=expand_timesteps)
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    return directory


def tiny_adapter_config(variant: str = "full", cfg: TinyModelConfig = TinyModelConfig(),
                        num_registers: int = 0) -> AdapterConfig:
    """The released full/lite layout at the tiny transformer's size."""
    hidden = cfg.hidden_dim
    if variant == "full":
        return full_adapter_config(cfg.num_layers, hidden, num_registers,
                                   ResamplerConfig(**{**vars(cfg.resampler), "output_dim": hidden}))
    if variant == "lite":
        return lite_adapter_config(cfg.num_layers, hidden, cfg.resampler.output_dim, cfg.resampler)
    raise ValueError(f"variant must be 'full' or 'lite', not {variant!r}")


def add_tiny_adapters(transformer, variant: str = "full", cfg: TinyModelConfig = TinyModelConfig(),
                      num_registers: int = 0, seed: int = 1, std: float = 0.2,
                      processor_class: type[LynxAttnProcessor] = LynxAttnProcessor) -> Resampler:
    """Install random non-zero Lynx adapters into the tiny `transformer`; returns a random resampler for them."""
    config = tiny_adapter_config(variant, cfg, num_registers)
    torch.manual_seed(seed)
    resampler = Resampler(config.resampler)
    install_adapters(transformer, config, processor_class)
    with torch.no_grad():
        for proc in processors(transformer):
            for p in proc.parameters():
                p.normal_(0, std)
    return resampler.eval()


def tiny_transformer(cfg: TinyModelConfig = TinyModelConfig(), seed: int = 0):
    """The tiny Wan transformer alone (as `tiny_components` makes it)."""
    return tiny_components(cfg, seed)["transformer"]


def save_tiny_adapters(directory, variant: str = "full", cfg: TinyModelConfig = TinyModelConfig(),
                       num_registers: int = 0, seed: int = 1) -> Path:
    """Random tiny adapters written as the released files (`resampler`, `ip_layers`, `ref_layers`)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):  # only its shape is needed to lay the adapters out
        transformer = WanTransformer3DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                                            in_channels=cfg.vae_z_dim, out_channels=cfg.vae_z_dim,
                                            text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
                                            num_layers=cfg.num_layers)
    resampler = add_tiny_adapters(transformer, variant, cfg, num_registers, seed)
    save_adapters(directory, transformer, resampler)
    return Path(directory)


def load_tiny_adapters(directory, cfg: TinyModelConfig = TinyModelConfig()):
    """A tiny transformer with the adapters of `directory` installed (the real loader), and their resampler."""
    from .models.loading import load_adapters

    transformer = tiny_transformer(cfg)
    return transformer, load_adapters(transformer, directory)


def adapter_files(directory) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter directory's released files, keyed `file.safetensors/key` (no model involved)."""
    from safetensors.torch import load_file

    return {f"{path.name}/{key}": value for path in sorted(Path(directory).glob("*.safetensors"))
            for key, value in load_file(path).items()}


def save_tiny_nsfw_classifier(directory, verdict: str | None = None, seed: int = 0) -> Path:
    """A tiny random ViT in the layout of Falconsai/nsfw_image_detection (config.json with labels normal/nsfw,
    model.safetensors, preprocessor_config.json of a ViTImageProcessor with mean and std 0.5).

    `verdict` "nsfw" or "normal" zeroes the head's weights and gives that label's bias a margin of 10, so it
    wins on every image (probability 1 / (1 + e^-10)); None keeps a random head, scaled up so that the
    scores of different images differ clearly.
    """
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = {0: "normal", 1: "nsfw"}
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, id2label=labels, label2id={v: k for k, v in labels.items()})
    torch.manual_seed(seed)
    model = ViTForImageClassification(config).eval()
    if verdict is None:
        with torch.no_grad():
            model.classifier.weight.normal_(0, 2.0)
    else:
        winner = {v: k for k, v in labels.items()}[verdict]
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.zero_()
            model.classifier.bias[winner] = 10.0
    directory = Path(directory)
    model.save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                      resample=2).save_pretrained(directory)
    return directory


# diffusers' Wan names -> the original Wan names community GGUF files use (the inverse of diffusers'
# `convert_wan_transformer_to_diffusers`, which the loader applies).
_WAN_ORIGINAL_NAMES = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"), ("attn2", "cross_attn"),
    (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("proj_out", "head.head"),
)


def wan_original_name(key: str) -> str:
    """A diffusers WanTransformer3DModel state-dict key under the original Wan (and GGUF) name."""
    if key == "scale_shift_table":
        return "head.modulation"
    for new, old in _WAN_ORIGINAL_NAMES:
        key = key.replace(new, old)
    key = key.replace(".scale_shift_table", ".modulation")
    # diffusers' norm2 is the original cross-attention norm3, and its norm3 the original norm2
    return key.replace(".norm2.", ".norm_.").replace(".norm3.", ".norm2.").replace(".norm_.", ".norm3.")


def gguf_quant_type(key: str) -> str | None:
    """The community files' kind of choice: the blocks' matrices quantized (here Q8_0 for self-attention, Q5_0 for
    cross-attention, Q4_0 for the FFN), everything else (norms, biases, embeddings, head) left in F32."""
    if not key.startswith("blocks.") or not key.endswith(".weight") or ".norm" in key:
        return None
    return "Q8_0" if ".self_attn." in key else "Q5_0" if ".cross_attn." in key else "Q4_0" if ".ffn." in key else None


def save_transformer_gguf(path, transformer, quant_type=gguf_quant_type, prefix: str = "",
                          architecture: str = "wan") -> dict[str, tuple[torch.Tensor, str]]:
    """Write `transformer` (diffusers Wan) as a GGUF file the way the community files are laid out: original Wan
    key names (with `prefix`, e.g. "model.diffusion_model."), the tensors `quant_type(original name)` names
    quantized with gguf-py's reference quantizers (a matrix whose rows do not split into the type's blocks stays
    F32), the rest F32. Returns what the file holds under the diffusers names: each tensor as gguf-py dequantizes
    it, and its GGUF type ("Q8_0", "F32", ...)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    writer = GGUFWriter(str(path), architecture)
    values = {}
    for key, value in transformer.state_dict().items():
        name = wan_original_name(key)
        array = value.detach().float().cpu().numpy()
        kind = quant_type(name)
        qtype = GGMLQuantizationType[kind] if kind else None
        if qtype is not None and array.ndim == 2 and array.shape[1] % quants.GGML_QUANT_SIZES[qtype][0] == 0:
            packed = quants.quantize(array, qtype)
            writer.add_tensor(prefix + name, packed, raw_dtype=qtype)
            array = quants.dequantize(packed, qtype)
        else:
            writer.add_tensor(prefix + name, np.ascontiguousarray(array))
            kind = None
        values[key] = (torch.from_numpy(np.array(array, dtype=np.float32)), kind or "F32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values
