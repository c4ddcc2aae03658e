"""`LynxPipeline`: Wan2.1 text-to-video with the Lynx ID and Ref adapters, sampled as the authors did.

One call: identity (photo, or a precomputed embedding + aligned reference crop) -> identity tokens and
reference features (once per video) -> three guided predictions per UniPC step (two for lite) -> VAE
decode. Text encoding, latent preparation and video post-processing are diffusers' `WanPipeline`'s own.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

from ..constants import MAX_TEXT_TOKENS, REFERENCE_PROMPT, AdapterConfig, SamplingConfig, sampling_defaults
from ..errors import CheckpointError, InputError
from ..models.adapters import (
    Conditioning,
    adapter_config,
    conditioning,
    plain_state_dict,
    uninstall_adapters,
)
from ..models.loading import load_adapters, read_adapter_config, require_base_dir, save_adapters, transformer_shape
from ..models.resampler import Resampler
from .settings import GenerationSettings

if TYPE_CHECKING:
    from ..face import FaceIdentity
    from ..face.image import ImageLike
from .reference import REFERENCE_SIZE, denormalize_latents, normalize_latents, reference_features, reference_latents

logger = logging.getLogger(__name__)

SAVED_ADAPTER_DIR = "lynx_adapter"


@dataclass
class Identity:
    """What the adapters need about a person: a 512-d face embedding and (full) the aligned 256x256 crop."""

    embedding: torch.Tensor  # [512] float32
    reference_image: np.ndarray | None = None  # [256, 256, 3] uint8 RGB


@dataclass
class LynxPipelineOutput(WanPipelineOutput):
    """`frames` as diffusers' Wan pipelines return them, and the resolved `settings` that made them."""

    settings: GenerationSettings | None = None


def _as_uint8_rgb(image, name: str) -> np.ndarray:
    """Any photo form (path, PIL, array, tensor) -> [H, W, 3] uint8 RGB, via the face module's robust reader."""
    from ..face import load_image

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
    """

    model_cpu_offload_seq = "text_encoder->resampler->transformer->vae"
    _optional_components = ["transformer", "transformer_2", "resampler"]

    def __init__(self, tokenizer, text_encoder, vae: AutoencoderKLWan, scheduler, transformer: WanTransformer3DModel,
                 resampler: Resampler | None = None, transformer_2=None, boundary_ratio=None,
                 expand_timesteps: bool = False):
        # The last three exist only because diffusers checks a pipeline's config against its signature.
        if transformer_2 is not None or boundary_ratio is not None or expand_timesteps:
            raise InputError("Lynx runs on the single-transformer Wan2.1-T2V base, not on Wan2.2 two-stage models")
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                         transformer=transformer)
        if resampler is not None and adapter_config(transformer) is None:
            raise InputError("a resampler was given but the transformer has no Lynx adapters installed; "
                             "use LynxPipeline.load_lynx_adapters(DIR)")
        self.register_modules(resampler=resampler)

    # ----- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, base_dir, adapter=None, torch_dtype: torch.dtype = torch.float32,
                        device: str | torch.device | None = None) -> "LynxPipeline":
        """Load a diffusers-layout Wan2.1-T2V base and a released `lynx_full`/`lynx_lite` adapter directory.

        Full vs lite is read from the files; the adapter files are checked before the base loads, so a wrong
        file fails in seconds, not minutes.
        """
        from transformers import AutoTokenizer, UMT5EncoderModel

        base = require_base_dir(base_dir, adapter)
        if adapter is None and (base / SAVED_ADAPTER_DIR).is_dir():
            adapter = base / SAVED_ADAPTER_DIR  # written by LynxPipeline.save_pretrained
        read = read_adapter_config(adapter, *transformer_shape(base)) if adapter is not None else None

        def load(sub, loader, **kw):
            try:
                return loader.from_pretrained(base / sub, **kw)
            except Exception as e:  # every library raises its own types for damaged files
                raise CheckpointError(f"{base / sub} could not be loaded ({type(e).__name__}: "
                                      f"{' '.join(str(e).split())[:400]}). Download it again.") from None

        tokenizer = load("tokenizer", AutoTokenizer)
        text_encoder = load("text_encoder", UMT5EncoderModel, torch_dtype=torch_dtype)
        vae = load("vae", AutoencoderKLWan, torch_dtype=torch_dtype)
        transformer = load("transformer", WanTransformer3DModel, torch_dtype=torch_dtype)
        scheduler = load("scheduler", UniPCMultistepScheduler)
        if not scheduler.config.get("use_flow_sigmas"):
            raise CheckpointError(f"{base / 'scheduler'} is not Wan's flow-matching UniPC config "
                                  "(use_flow_sigmas is off); use the scheduler folder of Wan2.1-T2V-14B-Diffusers")
        _cast_like_reference(transformer, torch_dtype)
        for m in (text_encoder, vae, transformer):
            m.eval().requires_grad_(False)
        resampler = load_adapters(transformer, adapter, read=read) if adapter is not None else None
        pipe = cls(tokenizer, text_encoder, vae, scheduler, transformer, resampler)
        if device is not None:
            pipe.to(device)
        return pipe

    @classmethod
    def from_wan(cls, pipe: WanPipeline, adapter=None, resampler: Resampler | None = None) -> "LynxPipeline":
        """Wrap the components of a `WanPipeline` already in memory (no copy of any weight).

        `adapter`: a released adapter directory, installed into `pipe.transformer`; or leave it None and pass
        the `resampler` of adapters already installed there (`lynx.models.adapters.install_adapters`).
        """
        lynx = cls(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.scheduler, pipe.transformer, resampler)
        if adapter is not None:
            lynx.load_lynx_adapters(adapter)
        return lynx

    def load_lynx_adapters(self, adapter_dir) -> None:
        """Install a released `lynx_full`/`lynx_lite` directory into the transformer (replacing any Lynx adapters)."""
        if adapter_config(self.transformer) is not None:
            self.unload_lynx_adapters()
        self.register_modules(resampler=load_adapters(self.transformer, adapter_dir))

    def unload_lynx_adapters(self) -> None:
        """Back to plain Wan: diffusers' processors in every block, no resampler."""
        uninstall_adapters(self.transformer)
        self.register_modules(resampler=None)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Save the base exactly as diffusers' `WanPipeline` (loadable by it) plus the adapters, as the released
        files, in `lynx_adapter/`."""
        plain = WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                            scheduler=self.scheduler, transformer=self.transformer)
        with plain_state_dict(self.transformer):
            plain.save_pretrained(save_directory, **kwargs)
        if self.resampler is not None:
            save_adapters(Path(save_directory) / SAVED_ADAPTER_DIR, self.transformer, self.resampler)

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
                         need_reference: bool = True, **face_kwargs) -> Identity:
        """One identity from a photo (face analysis), a `FaceIdentity`, or an embedding (+ reference crop)."""
        given = sum(x is not None for x in (image, face_embedding, identity))
        if given != 1:
            raise InputError("give the person exactly one way: image=PHOTO(S), identity=FaceIdentity, or "
                             "face_embedding=[512] (+ reference_image=256x256 crop for the full model)")
        if image is not None:
            from .. import face

            identity = face.analyze(image, **face_kwargs)
        if identity is not None:
            face_embedding = identity.embedding
            if reference_image is None:
                reference_image = identity.reference_crop
        emb = torch.as_tensor(np.asarray(face_embedding, dtype=np.float32)).reshape(-1)
        if emb.numel() != 512 or not torch.isfinite(emb).all():
            raise InputError(f"face_embedding must be 512 finite numbers (an ArcFace embedding), got "
                             f"{emb.numel()} values")
        ref = None
        if reference_image is not None:
            ref = _as_uint8_rgb(reference_image, "reference_image")
            if ref.shape[:2] != (REFERENCE_SIZE, REFERENCE_SIZE):
                raise InputError(f"reference_image must be the {REFERENCE_SIZE}x{REFERENCE_SIZE} aligned face crop "
                                 f"(`lynx face PHOTO` writes one), got {ref.shape[1]}x{ref.shape[0]}")
        config = self.adapter_config
        if need_reference and config is not None and config.use_ref and ref is None:
            raise InputError("the full Lynx model also needs reference_image (the 256x256 aligned crop; or "
                             "ref_scale=0 to run without the Ref-adapter); "
                             "pass image=PHOTO to compute both, or identity=FaceIdentity")
        return Identity(emb, ref)

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
                           prompt_embeds: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-block tensors entering self-attention when the frozen transformer sees the reference crop.

        `reference_image=None` gives the 'no reference' features (an all-zero image in [-1, 1] space).
        The VAE sample uses `generator` (the authors seed it with `seed + 1`).
        """
        self._require_adapters()
        crop = None if reference_image is None else _as_uint8_rgb(reference_image, "reference_image")
        latents = reference_latents(self.vae, crop, generator, self._execution_device)
        if prompt_embeds is None:
            prompt_embeds = self.encode_text([REFERENCE_PROMPT])
        # A context of its own, used once: a step cache (FirstBlockCache, ...) has nothing to reuse in it,
        # so every block runs and is recorded.
        self._reference_passes = getattr(self, "_reference_passes", 0) + 1
        return reference_features(self.transformer, latents, prompt_embeds, f"reference-{self._reference_passes}")

    def _normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return normalize_latents(latents, self.vae.config)

    def decode(self, latents: torch.Tensor, output_type: str = "np"):
        video = self.vae.decode(denormalize_latents(latents.to(self.vae.dtype), self.vae.config), return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)

    def predict(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                cond: Conditioning | None, branch: str = "c") -> torch.Tensor:
        """One transformer call with `cond` visible to the adapters.

        `branch` names the guidance branch for diffusers' step caches (FirstBlockCache, TaylorSeer, ...),
        which keep one state per named context.
        """
        self._require_adapters()
        with conditioning(self.transformer, cond), self.transformer.cache_context(branch):
            return self.transformer(hidden_states=latents.to(self.transformer.dtype),
                                    timestep=t.expand(latents.shape[0]), encoder_hidden_states=text,
                                    return_dict=False)[0]

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

    # ----- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | None = None,
        image: ImageLike | Sequence[ImageLike] | None = None,
        *,
        face_embedding: np.ndarray | torch.Tensor | Sequence[float] | None = None,
        reference_image: ImageLike | torch.Tensor | None = None,
        identity: FaceIdentity | Identity | None = None,
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
        guidance_parallel: bool | torch.distributed.ProcessGroup | None = None,
    ) -> LynxPipelineOutput | tuple:
        """Generate one video of the person in `image` (or the given identity) doing what `prompt` says.

        The generation knobs (`negative_prompt` to `allow_large`) are the fields of `GenerationSettings`: `None`
        takes the variant's default, every value is checked before anything is computed (`SettingsError`,
        one line), and the output carries the resolved settings.

        Args:
            prompt (`str`): what the person does; one string, one video. Give this or `prompt_embeds`.
            image (path, PIL image, RGB array, or a list of them): photo(s) of the person; the face is found,
                aligned and embedded (`lynx.face.analyze`), several photos averaged into one identity.
            face_embedding (`[512]` array): an ArcFace embedding instead of a photo.
            reference_image (`[256, 256, 3]` uint8 RGB crop): the aligned face for the Ref-adapter, with
                `face_embedding` (full model; the lite model has no Ref-adapter).
            identity (`FaceIdentity` or `Identity`): a prepared identity (`lynx face`, `FaceIdentity.load`).
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
            face_options (`dict`): keyword arguments for the face analysis of `image` (detector, models_dir,
                face_index, ...).
            guidance_parallel (`True` or a process group): run the guidance branches on different ranks of the
                default (or this) process group; every rank returns the same video (see `predict_branches`).

        Returns:
            `LynxPipelineOutput` with `frames` (`[1, F, H, W, 3]` for "np") and the resolved `settings`.
        """
        # Every knob is a field of GenerationSettings, checked and resolved here before anything is computed.
        knobs = {name: value for name, value in locals().items() if name in GenerationSettings.model_fields}
        config = self._require_adapters()
        settings = GenerationSettings(**knobs).resolve(self.variant)
        if output_type not in ("np", "pil", "latent"):
            raise InputError(f"output_type must be 'np', 'pil' or 'latent', not {output_type!r}")
        if (prompt is None) == (prompt_embeds is None):
            raise InputError("give exactly one of prompt (text) or prompt_embeds")
        if prompt is not None and not isinstance(prompt, str):
            raise InputError("prompt must be one string; call the pipeline once per video")
        bad = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise InputError(f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}")
        if generator is None:
            generator = torch.Generator().manual_seed(settings.seed)
        else:  # the record says what seeded this video
            settings = settings.model_copy(update={"seed": generator.initial_seed()})
        ref_seed = generator.initial_seed() + 1
        g, ip_scale, ref_scale = settings.guidance_scale, settings.ip_scale, settings.ref_scale

        use_ref = config.use_ref and ref_scale != 0
        person = self.prepare_identity(image, face_embedding, reference_image, identity, need_reference=use_ref,
                                       **(face_options or {}))
        device, dtype = self._execution_device, self.transformer.dtype
        self._guidance_scale, self._interrupt, self._current_timestep = g, False, None

        # Text.
        if prompt_embeds is None:
            prompt_embeds = self.encode_text([prompt], max_sequence_length)
        use_cfg = g > 1.0
        if use_cfg and negative_prompt_embeds is None:
            negative_prompt_embeds = self.encode_text([settings.negative_prompt], max_sequence_length)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        if use_cfg:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)

        # Identity tokens and reference features: once per video, reused at every step.
        tokens = self.identity_tokens(person.embedding.to(device))
        no_tokens = self.identity_tokens(torch.zeros_like(person.embedding).to(device))
        ref = no_ref = None
        if use_ref:  # with ref_scale 0 the branch adds nothing: skip the reference passes altogether
            ref_text = self.encode_text([REFERENCE_PROMPT]) if reference_prompt_embeds is None \
                else reference_prompt_embeds
            ref = self.reference_features(person.reference_image, torch.Generator().manual_seed(ref_seed), ref_text)
            no_ref = self.reference_features(None, torch.Generator().manual_seed(ref_seed), ref_text)
        cond = Conditioning(tokens, ref, ip_scale, ref_scale)
        uncond = Conditioning(no_tokens, no_ref, ip_scale, ref_scale)

        # Noise and schedule.
        self.scheduler.set_timesteps(sigmas=flow_sigmas(settings.num_inference_steps, self.defaults.sigma_start),
                                     device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(1, self.transformer.config.in_channels, settings.height, settings.width,
                                       settings.num_frames, torch.float32, device, generator, latents)
        self._num_timesteps = len(timesteps)
        three_way = not settings.two_way

        # Guidance branches, in the authors' order: c = (prompt, identity), u = (negative, no identity),
        # i = (negative, identity).
        branches = [("c", prompt_embeds, cond)]
        if use_cfg:
            branches.append(("u", negative_prompt_embeds, uncond))
            if three_way:
                branches.append(("i", negative_prompt_embeds, cond))
        group = _guidance_group(guidance_parallel)

        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                noise = guide(self.predict_branches(latents, t, branches, group), g, settings.guidance_scale_i)
                latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    names = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds}
                    out = callback_on_step_end(self, i, t, {k: names[k] for k in callback_on_step_end_tensor_inputs})
                    latents = (out or {}).get("latents", latents)
                bar.update()
        self._current_timestep = None

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


def _guidance_group(guidance_parallel):
    if guidance_parallel is None or guidance_parallel is False:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise InputError("guidance_parallel needs torch.distributed initialised (run under torchrun, "
                         "or call torch.distributed.init_process_group first)")
    return dist.group.WORLD if guidance_parallel is True else guidance_parallel


def _cast_like_reference(transformer: WanTransformer3DModel, dtype: torch.dtype) -> None:
    """Cast every weight to `dtype` as the authors' pipeline did (diffusers would keep some in fp32), but keep
    the RoPE tables in fp32: the authors' tables were complex float64 and never cast."""
    if dtype == torch.float32:
        return
    rope = transformer.rope
    cos, sin = rope.freqs_cos, rope.freqs_sin
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer.to(dtype)
    rope.freqs_cos, rope.freqs_sin = cos, sin
