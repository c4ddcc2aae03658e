"""`LynxPipeline`: Wan2.1 text-to-video with the Lynx ID and Ref adapters, sampled as the authors did.

One call: identity (photo, or a precomputed embedding + aligned reference crop) -> identity tokens and
reference features (once per video) -> three guided predictions per UniPC step (two for lite) -> VAE
decode. Text encoding, latent preparation and video post-processing are diffusers' `WanPipeline`'s own.

Beyond the authors: Wan2.2-T2V-A14B bases (two experts of the 14B shape, switched at `boundary_ratio` as
diffusers' `WanPipeline` does; the adapters act on the high-noise expert, or on both), and clips longer than
the model window (context windows, `lynx.pipelines.windows`).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

from ..constants import (
    BASES_THAT_FIT,
    EXPERTS,
    MAX_TEXT_TOKENS,
    REFERENCE_PROMPT,
    AdapterConfig,
    SamplingConfig,
    sampling_defaults,
    transformer_dims,
)
from ..errors import CheckpointError, InputError
from ..face import FaceAnalyzer, FaceIdentity, load_image
from ..models.adapters import (
    Conditioning,
    adapter_config,
    conditioning,
    plain_state_dict,
    uninstall_adapters,
)
from ..models.loading import SECOND_EXPERT, check_base_fits, load_adapters, read_adapter_config, save_adapters
from ..models.lora import check_lora, lora_follows_compute_dtype, lora_off, read_lora
from ..models.quantized import cast_plain_weights, component_quantization, is_quantized, load_gguf_transformer
from ..models.resampler import Resampler
from ..runtime import check_device
from . import speed
from .settings import WINDOWS, GenerationSettings

if TYPE_CHECKING:
    from ..face.image import ImageLike
from .reference import REFERENCE_SIZE, denormalize_latents, normalize_latents, reference_features, reference_latents
from .windows import ContextWindows, blend

logger = logging.getLogger(__name__)

SAVED_ADAPTER_DIR = "lynx_adapter"


@dataclass
class LynxPipelineOutput(WanPipelineOutput):
    """`frames` as diffusers' Wan pipelines return them, and the resolved `settings` that made them."""

    settings: GenerationSettings | None = None


def _as_uint8_rgb(image, name: str) -> np.ndarray:
    """Any photo form (path, PIL, array, tensor) -> [H, W, 3] uint8 RGB, via the face module's robust reader."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    try:
        return load_image(image)
    except InputError as e:
        raise InputError(f"{name}: {e}") from None


def flow_sigmas(num_inference_steps: int, start: float) -> np.ndarray:
    """The authors' UniPC grid (diffusers 0.33.1) before the flow shift: linspace(start, 0, n + 1)[:-1]."""
    return np.linspace(start, 0.0, num_inference_steps + 1)[:-1]


class LynxPipeline(WanPipeline):
    """Personalized text-to-video with Lynx adapters on diffusers' Wan components.

    The per-block adapter weights are parameters of `transformer` (its attention processors own them);
    the small `resampler` (face embedding -> identity tokens) is a pipeline component of its own.
    On a Wan2.2-T2V-A14B base, `transformer` is the high-noise expert and `transformer_2` the low-noise one
    (steps with t >= boundary_ratio * 1000 run the first); the adapters are in `transformer`, and also in
    `transformer_2` with `experts="both"`.
    """

    model_cpu_offload_seq = "text_encoder->resampler->transformer->transformer_2->vae"
    _optional_components = ["transformer", "transformer_2", "resampler"]

    def __init__(self, tokenizer, text_encoder, vae: AutoencoderKLWan, scheduler, transformer: WanTransformer3DModel,
                 resampler: Resampler | None = None, transformer_2: WanTransformer3DModel | None = None,
                 boundary_ratio: float | None = None, expand_timesteps: bool = False):
        if expand_timesteps:
            raise InputError(f"Wan2.2-TI2V-5B (per-frame timesteps) is not a base the Lynx adapters fit: use "
                             f"{BASES_THAT_FIT}")
        if transformer_2 is not None:
            if boundary_ratio is None:
                raise InputError("a second transformer (Wan2.2's low-noise expert) needs boundary_ratio: the "
                                 "fraction of the timesteps where the experts switch (0.875 for Wan2.2-T2V-A14B)")
            if transformer_dims(transformer_2.config) != transformer_dims(transformer.config):
                raise InputError(f"the two experts differ in shape: {transformer_dims(transformer.config)} and "
                                 f"{transformer_dims(transformer_2.config)} (blocks, width)")
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                         transformer=transformer, transformer_2=transformer_2,
                         boundary_ratio=boundary_ratio if transformer_2 is not None else None)
        if resampler is not None and adapter_config(transformer) is None:
            raise InputError("a resampler was given but the transformer has no Lynx adapters installed; "
                             "use LynxPipeline.load_lynx_adapters(DIR)")
        self.register_modules(resampler=resampler)

    # ----- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, base_dir, adapter=None, torch_dtype: torch.dtype = torch.float32,
                        device: str | torch.device | None = None, experts: str = "high", transformer_file=None,
                        transformer_2_file=None, quantization_config=None) -> "LynxPipeline":
        """Load a diffusers-layout Wan2.1-T2V-14B or Wan2.2-T2V-A14B base and a released `lynx_full`/`lynx_lite`
        adapter directory.

        Full vs lite is read from the files; the adapter files are checked before the base loads, so a wrong
        file fails in seconds, not minutes; so is a base of another shape (Wan2.2-TI2V-5B, Wan2.1-1.3B).
        `experts` (Wan2.2 A14B): "high" puts the adapters on the high-noise expert only, "both" on both.

        Quantized bases (`lynx.models.quantized`): `transformer_file` is a GGUF file of the transformer (the
        community Q4/Q5/Q8 files), loaded in place of `base_dir/transformer`'s weights (its config.json is
        still read), kept packed and dequantized to `torch_dtype` layer by layer; `transformer_2_file` likewise
        for Wan2.2's low-noise expert. `quantization_config`: a diffusers `PipelineQuantizationConfig` (its
        components quantized as they load: torchao, bitsandbytes, ...) or one diffusers config (TorchAoConfig,
        BitsAndBytesConfig) for the transformer(s). The Lynx adapters and the resampler are never quantized.
        """
        from transformers import AutoTokenizer, UMT5EncoderModel

        if experts not in EXPERTS:
            raise InputError(f"experts must be one of {', '.join(EXPERTS)}, not {experts!r}")
        if device is not None:  # before any weight loads: a missing GPU is known in a second, not after minutes
            check_device(str(device))
        base_dir = Path(base_dir)
        if adapter is None and (base_dir / SAVED_ADAPTER_DIR).is_dir():
            adapter = base_dir / SAVED_ADAPTER_DIR  # written by LynxPipeline.save_pretrained
        files = {"transformer": transformer_file, SECOND_EXPERT: transformer_2_file}
        report = check_base_fits(base_dir, adapter, files)
        base = report.path
        if experts == "both" and not report.two_experts:
            raise InputError(f"experts='both' needs a two-expert base (Wan2.2-T2V-A14B); {base} has one transformer")
        quant = {sub: component_quantization(quantization_config, sub, is_diffusers=sub != "text_encoder")
                 for sub in ("text_encoder", "vae", "transformer", SECOND_EXPERT)}
        for sub, file in files.items():
            if file is not None and quant[sub] is not None:
                raise InputError(f"{file} is quantized already (GGUF); leave {sub} out of quantization_config")
        read = read_adapter_config(adapter, *report.transformer_shape) if adapter is not None else None

        def load(sub, loader, **kw):
            if quant.get(sub) is not None:
                kw["quantization_config"] = quant[sub]
            try:
                return loader.from_pretrained(base / sub, **kw)
            except Exception as e:  # every library raises its own types for damaged files
                detail = f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
                if quant.get(sub) is not None:  # most likely the quantization backend, not the file
                    raise InputError(f"{base / sub} could not be loaded with {type(quant[sub]).__name__} "
                                     f"({detail})") from None
                raise CheckpointError(f"{base / sub} could not be loaded ({detail}). Download it again.") from None

        def load_transformer(sub):
            if files[sub] is not None:
                return load_gguf_transformer(files[sub], base, torch_dtype, sub)
            return load(sub, WanTransformer3DModel, torch_dtype=torch_dtype)

        tokenizer = load("tokenizer", AutoTokenizer)
        text_encoder = load("text_encoder", UMT5EncoderModel, torch_dtype=torch_dtype)
        vae = load("vae", AutoencoderKLWan, torch_dtype=torch_dtype)
        transformer = load_transformer("transformer")
        second = load_transformer(SECOND_EXPERT) if report.two_experts else None
        scheduler = load("scheduler", UniPCMultistepScheduler)
        if not scheduler.config.get("use_flow_sigmas"):
            raise CheckpointError(f"{base / 'scheduler'} is not Wan's flow-matching UniPC config "
                                  "(use_flow_sigmas is off); use the scheduler folder of the Wan diffusers release")
        models = [m for m in (transformer, second) if m is not None]
        for m in models:
            _cast_like_reference(m, torch_dtype)
        for m in (text_encoder, vae, *models):
            m.eval().requires_grad_(False)
        # After any quantized load, in the pipeline's dtype: the adapters are never quantized.
        resampler = load_adapters(transformer, adapter, read=read, dtype=torch_dtype) if adapter is not None else None
        if adapter is not None and experts == "both":
            load_adapters(second, adapter, read=read, dtype=torch_dtype)  # one resampler serves both experts
        pipe = cls(tokenizer, text_encoder, vae, scheduler, transformer, resampler, transformer_2=second,
                   boundary_ratio=report.boundary_ratio)
        if device is not None:
            pipe.to(device)
        return pipe

    @classmethod
    def from_wan(cls, pipe: WanPipeline, adapter=None, resampler: Resampler | None = None,
                 experts: str = "high") -> "LynxPipeline":
        """Wrap the components of a `WanPipeline` already in memory (no copy of any weight).

        `adapter`: a released adapter directory, installed into `pipe.transformer` (and `transformer_2` with
        experts="both"); or leave it None and pass the `resampler` of adapters already installed there
        (`lynx.models.adapters.install_adapters`).
        """
        lynx = cls(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.scheduler, pipe.transformer, resampler,
                   transformer_2=getattr(pipe, "transformer_2", None),
                   boundary_ratio=pipe.config.get("boundary_ratio"),
                   expand_timesteps=pipe.config.get("expand_timesteps", False))
        if adapter is not None:
            lynx.load_lynx_adapters(adapter, experts)
        return lynx

    def load_lynx_adapters(self, adapter_dir, experts: str = "high") -> None:
        """Install a released `lynx_full`/`lynx_lite` directory into the transformer (replacing any Lynx adapters);
        on a two-expert base into the high-noise expert, or with experts="both" into both."""
        if experts not in EXPERTS:
            raise InputError(f"experts must be one of {', '.join(EXPERTS)}, not {experts!r}")
        if experts == "both" and self.transformer_2 is None:
            raise InputError("experts='both' needs a two-expert base (Wan2.2-T2V-A14B); this pipeline has one "
                             "transformer")
        if self.experts is not None:
            self.unload_lynx_adapters()
        resampler = load_adapters(self.transformer, adapter_dir)
        if experts == "both":
            load_adapters(self.transformer_2, adapter_dir)
        self.register_modules(resampler=resampler)

    @property
    def experts(self) -> str | None:
        """Where the adapters act: "high" (the only transformer, or Wan2.2's high-noise expert), "both", or None."""
        if adapter_config(self.transformer) is None:
            return None
        return "both" if self.transformer_2 is not None and adapter_config(self.transformer_2) is not None else "high"

    def expert(self, t) -> WanTransformer3DModel:
        """The transformer that denoises timestep `t`: as diffusers' `WanPipeline`, the high-noise expert for
        t >= boundary_ratio * num_train_timesteps, the low-noise one below."""
        if self.transformer_2 is None or float(t) >= self.config.boundary_ratio * \
                self.scheduler.config.num_train_timesteps:
            return self.transformer
        return self.transformer_2

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, hotswap: bool = False,
                          **kwargs) -> None:
        """diffusers' Wan LoRA loading (peft), for LoRAs in diffusers', the original Wan / lightx2v or the kohya /
        ComfyUI layout, checked first against this transformer's depth and width (the error names the file).
        The Lynx adapters stay active; the reference passes run with every LoRA off."""
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", None)
        state, metadata, name = read_lora(pretrained_model_name_or_path_or_dict, **kwargs)
        check_lora(self.transformer, state, name)
        extra = {} if low_cpu_mem_usage is None else {"low_cpu_mem_usage": low_cpu_mem_usage}
        lora_follows_compute_dtype(self.transformer)  # not the fp8 of the 24gb preset's stored weights
        self.load_lora_into_transformer(state, transformer=self.transformer, adapter_name=adapter_name,
                                        metadata=metadata, _pipeline=self, hotswap=hotswap, **extra)

    def unload_lynx_adapters(self) -> None:
        """Back to plain Wan: diffusers' processors in every block, no resampler."""
        for model in (self.transformer, self.transformer_2):
            if model is not None:
                uninstall_adapters(model)
        self.register_modules(resampler=None)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Save the base exactly as diffusers' `WanPipeline` (loadable by it) plus the adapters, as the released
        files, in `lynx_adapter/`."""
        import contextlib

        plain = WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                            scheduler=self.scheduler, transformer=self.transformer, transformer_2=self.transformer_2,
                            boundary_ratio=self.config.boundary_ratio)
        with contextlib.ExitStack() as stack:
            for model in (self.transformer, self.transformer_2):
                if model is not None:
                    stack.enter_context(plain_state_dict(model))
            plain.save_pretrained(save_directory, **kwargs)
        if self.resampler is not None:
            save_adapters(Path(save_directory) / SAVED_ADAPTER_DIR, self.transformer, self.resampler)

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device=None) -> None:
        """diffusers' model CPU offload. Called again without a device, as diffusers' LoRA loading does after it
        has taken the hooks off, it keeps the device it was enabled for instead of the machine's default
        accelerator (none at all when the CPU is the onload device)."""
        if gpu_id is None and device is None:
            device = getattr(self, "_offload_device", None)
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)

    def enable_memory_preset(self, name: str, device=None):
        """Run within a GPU size: "max", "48gb", "24gb", "24gb-blocks" or "12gb" (`lynx.pipelines.memory`)."""
        from .memory import enable_memory_preset

        return enable_memory_preset(self, name, device)

    @property
    def adapter_config(self) -> AdapterConfig | None:
        return adapter_config(self.transformer)

    @property
    def variant(self) -> str:
        config = self.adapter_config
        return config.variant if config is not None else "none"

    @property
    def defaults(self) -> SamplingConfig:
        return sampling_defaults("lite" if self.variant == "lite" else "full")

    def _require_adapters(self) -> AdapterConfig:
        config = self.adapter_config
        if config is None or self.resampler is None:
            raise InputError("this pipeline has no Lynx adapters: pass adapter=DIR to from_pretrained "
                             "or call load_lynx_adapters(DIR)")
        return config

    # ----- the inspectable steps -----------------------------------------------------------------------
    def prepare_identity(self, image=None, face_embedding=None, reference_image=None, identity=None,
                         need_reference: bool = True, face_analyzer: FaceAnalyzer | None = None,
                         **face_kwargs) -> FaceIdentity:
        """One `FaceIdentity` from a photo, a `FaceIdentity`, or an embedding (+ reference crop).

        A photo is analysed by `face_analyzer` (with `face_kwargs` such as `face_index`), or, without one,
        by a one-off `lynx.face.analyze(image, **face_kwargs)`. An embedding is used exactly as given.
        """
        given = sum(x is not None for x in (image, face_embedding, identity))
        if given != 1:
            raise InputError("give the person exactly one way: image=PHOTO(S), identity=FaceIdentity, or "
                             "face_embedding=[512] (+ reference_image=256x256 crop for the full model)")
        if image is not None:
            if face_analyzer is not None:
                identity = face_analyzer.analyze(image, **face_kwargs)
            else:
                from ..face import analyze

                identity = analyze(image, **face_kwargs)
        if identity is None:
            if isinstance(face_embedding, torch.Tensor):
                face_embedding = face_embedding.detach().float().cpu().numpy()
            emb = np.asarray(face_embedding, dtype=np.float32).reshape(-1)
            if emb.size != 512 or not np.isfinite(emb).all():
                raise InputError(f"face_embedding must be 512 finite numbers (an ArcFace embedding), got "
                                 f"{emb.size} values")
            identity = FaceIdentity(embedding=emb, detector="precomputed")
        elif not isinstance(identity, FaceIdentity):
            raise InputError(f"identity must be a lynx.face.FaceIdentity, not {type(identity).__name__}")
        if reference_image is not None:
            ref = _as_uint8_rgb(reference_image, "reference_image")
            if ref.shape[:2] != (REFERENCE_SIZE, REFERENCE_SIZE):
                raise InputError(f"reference_image must be the {REFERENCE_SIZE}x{REFERENCE_SIZE} aligned face crop "
                                 f"(`lynx face PHOTO` writes one), got {ref.shape[1]}x{ref.shape[0]}")
            identity = dataclasses.replace(identity, reference_crop=ref)
        config = self.adapter_config
        if need_reference and config is not None and config.use_ref and identity.reference_crop is None:
            raise InputError("the full Lynx model also needs reference_image (the 256x256 aligned crop; or "
                             "ref_scale=0 to run without the Ref-adapter); "
                             "pass image=PHOTO to compute both, or identity=FaceIdentity")
        return identity

    @torch.no_grad()
    def identity_tokens(self, face_embedding: torch.Tensor) -> torch.Tensor:
        """[512] or [B, 512] embedding -> [B, Q, ip_dim] identity tokens (zeros give the 'no identity' tokens)."""
        emb = torch.as_tensor(face_embedding)
        self._require_adapters()
        emb = emb.reshape(-1, 1, emb.shape[-1]).to(device=self._execution_device, dtype=self.resampler.dtype)
        return self.resampler(emb)

    def encode_text(self, prompts: list[str], max_sequence_length: int = MAX_TEXT_TOKENS) -> torch.Tensor:
        """UMT5 embeddings padded to 512 tokens (zeros past each prompt's length); warns on truncation."""
        for p in prompts:
            n = len(self.tokenizer(p, add_special_tokens=True).input_ids)
            if n > max_sequence_length:
                msg = f"prompt is {n} tokens long; only the first {max_sequence_length} are used: {p[:60]!r}..."
                warnings.warn(msg, stacklevel=3)
                logger.warning(msg)
        return self._get_t5_prompt_embeds(prompts, max_sequence_length=max_sequence_length,
                                          device=self._execution_device, dtype=self.transformer.dtype)

    @torch.no_grad()
    def reference_features(self, reference_image: np.ndarray | None, generator: torch.Generator | None = None,
                           prompt_embeds: torch.Tensor | None = None,
                           transformer: WanTransformer3DModel | None = None) -> list[torch.Tensor]:
        """Per-block tensors entering self-attention when the frozen transformer sees the reference crop.

        `reference_image=None` gives the 'no reference' features (an all-zero image in [-1, 1] space).
        The VAE sample uses `generator` (the authors seed it with `seed + 1`). `transformer`: the expert whose
        adapters read the features (default `self.transformer`): each expert's Ref-adapter reads its own pass.
        """
        self._require_adapters()
        transformer = self.transformer if transformer is None else transformer
        crop = None if reference_image is None else _as_uint8_rgb(reference_image, "reference_image")
        latents = reference_latents(self.vae, crop, generator, self._execution_device)
        if prompt_embeds is None:
            prompt_embeds = self.encode_text([REFERENCE_PROMPT])
        # A context of its own, used once (a one-step trajectory to the caches that read steps): a step cache
        # (FirstBlockCache, SeaCache, ...) has nothing to reuse in it, so every block runs and is recorded.
        self._reference_passes = getattr(self, "_reference_passes", 0) + 1
        # LoRAs off: the adapters were trained on features of the plain backbone.
        with lora_off(transformer), transformer.cache_context(f"reference-{self._reference_passes}", step_index=0,
                                                              sigma=0.0, num_inference_steps=1):
            return reference_features(transformer, latents, prompt_embeds)

    def _normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return normalize_latents(latents, self.vae.config)

    def decode(self, latents: torch.Tensor, output_type: str = "np"):
        video = self.vae.decode(denormalize_latents(latents.to(self.vae.dtype), self.vae.config), return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                cond: Conditioning | None, branch: str = "c") -> torch.Tensor:
        """One transformer call with `cond` visible to the adapters.

        `branch` names the guidance branch for diffusers' step caches (FirstBlockCache, SeaCache, ...),
        which keep one state per named context (and per context window); inside `__call__` they also get the
        step, sigma and step count. The expert for `t` runs (`expert`); `cond` reaches it only where it has
        adapters.
        """
        self._require_adapters()
        model = self.expert(t)
        dtypes = getattr(self, "_dtypes", None)  # inside __call__: each expert's dtype, read once per video
        if dtypes is None:
            dtype = model.dtype
        elif (dtype := dtypes.get(model)) is None:
            dtype = dtypes[model] = model.dtype  # diffusers finds it by walking every module: 0.2 ms a call
        with conditioning(model, cond, text), \
                model.cache_context(branch + getattr(self, "_window_name", ""), **getattr(self, "_cache_step", {})):
            return model(hidden_states=latents.to(dtype), timestep=t.expand(latents.shape[0]),
                         encoder_hidden_states=text, return_dict=False)[0]

    def predict_branches(self, latents, t, branches, group=None) -> list[torch.Tensor]:
        """One prediction per (name, text, conditioning) branch.

        With a process group, branch k runs on rank k % world_size and is broadcast from there, so every
        rank ends the step with the same predictions (guidance parallelism: up to 3x faster on 3 GPUs).
        """
        if group is None:
            return [self.predict(latents, t, text, cond, name) for name, text, cond in branches]
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        shape = (latents.shape[0], self.transformer.config.out_channels, *latents.shape[2:])
        outs = [self.predict(latents, t, text, cond, name).contiguous() if k % world == rank else
                torch.empty(shape, dtype=self.transformer.dtype, device=latents.device)
                for k, (name, text, cond) in enumerate(branches)]
        for k, out in enumerate(outs):
            dist.broadcast(out, src=dist.get_global_rank(group, k % world), group=group)
        return outs

    def predict_batched(self, latents, t, branches) -> list[torch.Tensor]:
        """The branches' predictions from one transformer call of batch len(branches) (same numbers as
        `predict_branches` within float rounding; faster on a GPU with the memory for it)."""
        names, texts, conds = zip(*branches)
        key = "".join(names) + ("-2" if self.expert(t) is self.transformer_2 else "")  # each expert its own K/V
        stacked = self._stacked.get(key)  # one per branch set and scales, so its cached K/V are reused
        if stacked is None or (stacked.ip_scale, stacked.ref_scale) != (conds[0].ip_scale, conds[0].ref_scale):
            stacked = self._stacked[key] = speed.stack_conditionings(list(conds))
        text = self._stacked.get(f"text-{key}")
        if text is None:  # one tensor per branch set, so its cross-attention K/V are cached too
            text = self._stacked[f"text-{key}"] = torch.cat(texts)
        out = self.predict(latents.expand(len(branches), *latents.shape[1:]), t, text, stacked, key)
        return list(out.chunk(len(branches)))

    # ----- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | None = None,
        image: ImageLike | Sequence[ImageLike] | None = None,
        *,
        face_embedding: np.ndarray | torch.Tensor | Sequence[float] | None = None,
        reference_image: ImageLike | torch.Tensor | None = None,
        identity: FaceIdentity | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_scale_i: float | str | None = None,
        ip_scale: float | None = None,
        ref_scale: float | None = None,
        seed: int | None = None,
        fps: int | None = None,
        allow_large: bool = False,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        reference_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = MAX_TEXT_TOKENS,
        face_options: dict | None = None,
        face_analyzer: FaceAnalyzer | None = None,
        guidance_parallel: bool | torch.distributed.ProcessGroup | None = None,
        ip_start: float | None = None,
        ip_end: float | None = None,
        ref_start: float | None = None,
        ref_end: float | None = None,
        guidance_i_start: float | None = None,
        guidance_i_end: float | None = None,
        ref_blocks: str | Sequence[int] | None = None,
        guidance_scale_2: float | None = None,
        context_frames: int | None = None,
        context_overlap: int | None = None,
        context_blend: str | None = None,
        face_index: int | None = None,
        batch_branches: bool = False,
        context_windows: ContextWindows | dict | None = None,
        sigmas=None,
    ) -> LynxPipelineOutput | tuple:
        """Generate one video of the person in `image` (or the given identity) doing what `prompt` says.

        The generation knobs (`negative_prompt` to `allow_large`, `ip_start` to `batch_branches`) are the fields
        of `GenerationSettings`: `None`
        takes the variant's default, every value is checked before anything is computed (`SettingsError`,
        one line), and the output carries the resolved settings.

        Args:
            prompt (`str`): what the person does; one string, one video. Give this or `prompt_embeds`.
            image (path, PIL image, RGB array, or a list of them): photo(s) of the person; the face is found,
                aligned and embedded (`lynx.face.analyze`), several photos averaged into one identity.
            face_embedding (`[512]` array): an ArcFace embedding instead of a photo.
            reference_image (`[256, 256, 3]` uint8 RGB crop): the aligned face for the Ref-adapter, with
                `face_embedding` (full model; the lite model has no Ref-adapter).
            identity (`FaceIdentity`): a prepared identity (`lynx face`, `FaceIdentity.load`).
            negative_prompt (`str`): what the video should not show (default: the authors' negative prompt).
            height, width (`int`): video size in pixels, multiples of 16 (default 480 x 832).
            num_frames (`int`): 4k+1 frames (default 81 full, 121 lite).
            num_inference_steps (`int`): denoising steps (default 50).
            guidance_scale (`float`): text guidance g (default 5); 1 or less turns text guidance off.
            guidance_scale_i (`float` or `"two-way"`): identity guidance g_i of three-way guidance (default 2.0
                full); `"two-way"` drops the identity branch (lite's default).
            ip_scale, ref_scale (`float`): strengths of the ID- and Ref-adapters (default 1); `ref_scale=0`
                skips the reference passes.
            seed (`int`): seeds the initial noise (CPU generator) and, as `seed + 1`, the VAE sample of the
                reference crop (default 42), in [0, 2**63).
            fps (`int`): frame rate recorded for the video (default 16 full, 24 lite); the frames do not depend
                on it.
            allow_large (`bool`): lift the limits on steps, frames and sides (typo guards), on purpose.
            generator (`torch.Generator`): replaces `seed`; the output's settings record its initial seed.
            latents (`torch.Tensor`): initial noise `[1, 16, (F - 1) / 4 + 1, H / 8, W / 8]` instead of drawing it.
            prompt_embeds, negative_prompt_embeds, reference_prompt_embeds (`torch.Tensor`): T5 embeddings that
                replace the text encoder (which may then be absent; training samples from cached embeddings);
                `reference_prompt_embeds` is that of "image of a face".
            output_type (`str`): `"np"` (float frames in [0, 1]), `"pil"` or `"latent"`.
            return_dict (`bool`): a `LynxPipelineOutput`, or the tuple `(frames,)`.
            callback_on_step_end (callable): `f(pipe, step, timestep, tensors) -> dict` after every step, as in
                diffusers; `callback_on_step_end_tensor_inputs` names the tensors it receives.
            max_sequence_length (`int`): T5 tokens of the prompt (default 512).
            face_options (`dict`): keyword arguments for the face analysis of `image` (`{"face_index": 1}`, ...).
            face_analyzer (`lynx.face.FaceAnalyzer`): analyses `image` (built once, reused); without one a one-off
                `lynx.face.analyze(image, **face_options)` loads the face models for this call.
            guidance_parallel (`True` or a process group): run the guidance branches on different ranks of the
                default (or this) process group; every rank returns the same video (see `predict_branches`).

        Strength (`lynx.pipelines.speed`): `ip_start`/`ip_end`, `ref_start`/`ref_end`: the fraction of the steps
        each adapter acts on; `guidance_i_start`/`guidance_i_end`: the steps with identity guidance (the others
        run c and u only); `ref_blocks`: "0-20,35-39" or block numbers, the Ref-adapter's blocks.
        `batch_branches`: the step's branches as one batched call (off under `guidance_parallel`).
        `sigmas`: the step grid before the scheduler's shift (default: the authors' UniPC grid).

        Wan2.2 A14B: `guidance_scale_2` is the text guidance of the low-noise expert's steps (default
        `guidance_scale`, as diffusers). Where that expert has no adapters (experts="high") its steps run c and u
        only, identity guidance being a no-op there; the strength windows count steps over the whole denoising.

        `face_index`: which face of the photos (0 = the largest; default the largest, warned when several).

        Long videos: `num_frames` beyond the window (`context_frames`, `context_overlap`, `context_blend`, or
        `context_windows`: a `ContextWindows` or its fields as a dict; default window the variant's frame count,
        16 frames of overlap, linear blending) are denoised in
        overlapping windows of latent frames, blended at every step; every window reads the same identity
        tokens and reference features, and the transformer never sees more than one window.

        Returns:
            `LynxPipelineOutput` with `frames` (`[1, F, H, W, 3]` for "np") and the resolved `settings`.
        """
        # Every knob is a field of GenerationSettings, checked and resolved here before anything is computed.
        knobs = {name: value for name, value in locals().items() if name in GenerationSettings.model_fields}
        if context_windows is not None:  # the long-video knobs as one object (or its fields as a dict)
            given = dataclasses.asdict(context_windows) if isinstance(context_windows, ContextWindows) \
                else dict(context_windows)
            for key in ("frames", "overlap", "blend"):
                if key in given and knobs[f"context_{key}"] is not None:
                    raise InputError(f"give context_{key} or context_windows, not both")
                knobs[f"context_{key}"] = given.get(key, knobs[f"context_{key}"])
        config = self._require_adapters()
        settings = GenerationSettings(**knobs).resolve(self.variant)
        g = settings.guidance_scale
        if settings.guidance_scale_2 is not None and self.transformer_2 is None:
            raise InputError("guidance_scale_2 is the low-noise expert's guidance; this base has one transformer")
        g2 = g if settings.guidance_scale_2 is None else settings.guidance_scale_2
        windows = ContextWindows(frames=settings.context_frames, overlap=settings.context_overlap,
                                 blend=settings.context_blend)
        ip_scale, ref_scale = settings.ip_scale, settings.ref_scale
        if settings.face_index is not None:  # with identity=, the index that chose it (recorded)
            if face_embedding is not None:
                raise InputError("face_index chooses a face in image= photos; it does not apply to face_embedding=")
            face_options = {**(face_options or {}), "face_index": settings.face_index}
        if output_type not in ("np", "pil", "latent"):
            raise InputError(f"output_type must be 'np', 'pil' or 'latent', not {output_type!r}")
        if (prompt is None) == (prompt_embeds is None):
            raise InputError("give exactly one of prompt (text) or prompt_embeds")
        if prompt is not None and not isinstance(prompt, str):
            raise InputError("prompt must be one string; call the pipeline once per video")
        bad = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise InputError(f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise InputError(f"generator must be a torch.Generator, not {type(generator).__name__} (for a number, "
                             "pass seed=)")
        if latents is not None:
            space = self.vae_scale_factor_spatial
            expected = [1, self.transformer.config.in_channels,
                        (settings.num_frames - 1) // self.vae_scale_factor_temporal + 1,
                        settings.height // space, settings.width // space]
            got = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            if got != expected:
                raise InputError(f"latents must be a tensor of shape {expected} for these settings, not {got}")
        strength = speed.Strength(ip_scale, ref_scale, *(getattr(settings, k) for pair in WINDOWS for k in pair),
                                  speed.parse_blocks(settings.ref_blocks, len(self.transformer.blocks)))
        if generator is None:
            generator = torch.Generator().manual_seed(settings.seed)
        else:  # the record says what seeded this video
            settings = settings.model_copy(update={"seed": generator.initial_seed()})
        ref_seed = generator.initial_seed() + 1

        use_ref = (config.use_ref and ref_scale != 0 and settings.ref_start < settings.ref_end
                   and strength.ref_blocks != frozenset())
        person = self.prepare_identity(image, face_embedding, reference_image, identity, need_reference=use_ref,
                                       face_analyzer=face_analyzer, **(face_options or {}))
        device, dtype = self._execution_device, self.transformer.dtype
        self._guidance_scale, self._interrupt, self._current_timestep = g, False, None

        # Text.
        if prompt_embeds is None:
            prompt_embeds = self.encode_text([prompt], max_sequence_length)
        use_cfg = g > 1.0 or (self.transformer_2 is not None and g2 > 1.0)
        if use_cfg and negative_prompt_embeds is None:
            negative_prompt_embeds = self.encode_text([settings.negative_prompt], max_sequence_length)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        if use_cfg:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        # Every text first: under model offloading the text encoder then leaves the GPU before the transformer runs.
        ref_text = None
        if use_ref:
            ref_text = self.encode_text([REFERENCE_PROMPT]) if reference_prompt_embeds is None \
                else reference_prompt_embeds

        # Identity tokens and reference features: once per video (per adapted expert), reused at every step
        # and by every context window.
        embedding = torch.tensor(person.embedding, device=device)
        tokens = self.identity_tokens(embedding)
        no_tokens = self.identity_tokens(torch.zeros_like(embedding))
        text_kv = {}  # every prompt's cross-attention keys/values, computed at its first call
        conds = {}  # id(expert) -> (cond, uncond) for each expert with adapters
        for model in (self.transformer, self.transformer_2):
            if model is None or adapter_config(model) is None:
                continue
            ref = no_ref = None
            if use_ref:  # with ref_scale 0 the branch adds nothing: skip the reference passes altogether
                which = {} if model is self.transformer else {"transformer": model}
                ref = self.reference_features(person.reference_crop, torch.Generator().manual_seed(ref_seed),
                                              ref_text, **which)
                no_ref = self.reference_features(None, torch.Generator().manual_seed(ref_seed), ref_text, **which)
            conds[id(model)] = (
                Conditioning(tokens, ref, ip_scale, ref_scale, ref_blocks=strength.ref_blocks, text_kv=text_kv),
                Conditioning(no_tokens, no_ref, ip_scale, ref_scale, ref_blocks=strength.ref_blocks, text_kv=text_kv))

        # Noise and schedule.
        grid = flow_sigmas(settings.num_inference_steps, self.defaults.sigma_start) if sigmas is None \
            else np.asarray(sigmas, dtype=np.float64)
        self.scheduler.set_timesteps(sigmas=grid, device=device)
        self.scheduler.set_begin_index(0)  # no device-to-host sync per step to find the index (compile-friendly)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(1, self.transformer.config.in_channels, settings.height, settings.width,
                                       settings.num_frames, torch.float32, device, generator, latents)
        self._num_timesteps = len(timesteps)
        three_way = not settings.two_way

        # Guidance branches, in the authors' order: c = (prompt, identity), u = (negative, no identity),
        # i = (negative, identity).
        group = _guidance_group(guidance_parallel, self.transformer)
        batch_branches = settings.batch_branches and group is None
        self._stacked, self._dtypes = {}, {}
        n = len(timesteps)

        spans = windows.windows(latents.shape[2])

        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                self._cache_step = speed.cache_context_kwargs(self.scheduler, i, n)
                model = self.expert(t)
                g_step = g if model is self.transformer else g2
                cond, uncond = conds.get(id(model), (None, None))
                if cond is None:  # Wan2.2's low-noise expert without adapters: plain text guidance
                    parts = {"c": (prompt_embeds, None), "u": (negative_prompt_embeds, None)}
                    names = ("c", "u") if g_step > 1.0 else ("c",)
                else:
                    step_cond, step_uncond = strength.conditioning(cond, i, n), strength.conditioning(uncond, i, n)
                    parts = {"c": (prompt_embeds, step_cond), "u": (negative_prompt_embeds, step_uncond),
                             "i": (negative_prompt_embeds, step_cond)}
                    names = strength.branches(i, n, g_step > 1.0, three_way)
                branches = [(name, *parts[name]) for name in names]
                window_noise = []
                for k, (start, end) in enumerate(spans):
                    window = latents if len(spans) == 1 else latents[:, :, start:end]
                    self._window_name = "" if len(spans) == 1 else f"-w{k}"  # a step-cache state per window
                    preds = (self.predict_batched(window, t, branches) if batch_branches and len(branches) > 1
                             else self.predict_branches(window, t, branches, group))
                    window_noise.append(((start, end), guide(preds, g_step, settings.guidance_scale_i)))
                self._window_name = ""
                noise = window_noise[0][1] if len(spans) == 1 else blend(window_noise, windows, latents)
                latents = self.scheduler.step(noise, t, latents, return_dict=False,
                                              **speed.step_kwargs(self.scheduler, generator))[0]
                if callback_on_step_end is not None:
                    names = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds}
                    out = callback_on_step_end(self, i, t, {k: names[k] for k in callback_on_step_end_tensor_inputs})
                    latents = (out or {}).get("latents", latents)
                bar.update()
        self._current_timestep = None
        self._cache_step, self._stacked, self._window_name, self._dtypes = {}, {}, "", None

        video = latents if output_type == "latent" else self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        return LynxPipelineOutput(frames=video, settings=settings) if return_dict else (video,)


def guide(preds: list[torch.Tensor], g: float, g_i: float | None) -> torch.Tensor:
    """Combine the branch predictions: c alone; u + g (c - u); or u + g_i (i - u) + g (c - i)."""
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        c, u = preds
        return u + g * (c - u)
    c, u, i = preds
    return u + g_i * (i - u) + g * (c - i)


def _guidance_group(guidance_parallel, transformer=None):
    if guidance_parallel is None or guidance_parallel is False:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise InputError("guidance_parallel needs torch.distributed initialised (run under torchrun, "
                         "or call torch.distributed.init_process_group first)")
    if guidance_parallel is not True:
        return guidance_parallel
    from .parallel import guidance_group  # under context parallelism: the guidance dimension of its mesh

    return guidance_group(transformer) or dist.group.WORLD


def _cast_like_reference(transformer: WanTransformer3DModel, dtype: torch.dtype) -> None:
    """Cast every weight to `dtype` as the authors' pipeline did (diffusers would keep some in fp32), but keep
    the RoPE tables in fp32: the authors' tables were complex float64 and never cast."""
    if is_quantized(transformer):  # diffusers refuses .to(dtype) there: cast what the quantizer left plain
        cast_plain_weights(transformer, dtype, keep=[transformer.rope])
        return
    if dtype == torch.float32:
        return
    rope = transformer.rope
    cos, sin = rope.freqs_cos, rope.freqs_sin
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer.to(dtype)
    rope.freqs_cos, rope.freqs_sin = cos, sin
