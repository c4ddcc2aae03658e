"""The reference encoder and Wan's latent normalisation, shared by the pipeline, `lynx prepare` and training.

Reference features are what enters each block's self-attention when the frozen transformer sees the 256x256
aligned face crop: crop -> pixels in [-1, 1] -> VAE -> normalised latents -> one transformer pass at t = 0 with
the prompt "image of a face", every adapter branch off. "No reference" is the same pass over an all-zero image
(in [-1, 1] space). The pipeline samples the VAE posterior; `lynx prepare` caches its normalised mean and std,
and training samples from those.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from ..models.adapters import recording

REFERENCE_SIZE = 256


def latent_stats(vae_config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's per-channel latent mean and 1/std (from the VAE config), shaped [1, C, 1, 1, 1] like `like`."""
    shape = (1, vae_config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae_config.latents_mean).view(shape).to(like.device, like.dtype)
    inv_std = 1.0 / torch.tensor(vae_config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, inv_std


def normalize_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE latents -> the transformer's latent space: (z - mean) / std per channel."""
    mean, inv_std = latent_stats(vae_config, latents)
    return (latents - mean) * inv_std


def denormalize_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The inverse of `normalize_latents`, before VAE decoding."""
    mean, inv_std = latent_stats(vae_config, latents)
    return latents / inv_std + mean


def reference_pixels(crop: np.ndarray | None) -> torch.Tensor:
    """A uint8 [256, 256, 3] crop (None: no reference, all zeros) -> float32 [1, 3, 1, 256, 256] in [-1, 1]."""
    if crop is None:
        return torch.zeros(1, 3, 1, REFERENCE_SIZE, REFERENCE_SIZE)
    pixels = torch.tensor(np.asarray(crop)) / 255.0 * 2 - 1
    return pixels.permute(2, 0, 1)[None, :, None].float()


@torch.no_grad()
def encode_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels [B, 3, F, H, W] in [-1, 1] -> the VAE posterior's mean and std, both normalised, float32."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    mean = normalize_latents(dist.mean.float(), vae.config)
    _, inv_std = latent_stats(vae.config, mean)
    return mean, dist.std.float() * inv_std


@torch.no_grad()
def reference_latents(vae, crop: np.ndarray | None, generator: torch.Generator | None = None,
                      device=None) -> torch.Tensor:
    """Normalised latents of a reference crop (None: no reference), sampled from the VAE posterior."""
    pixels = reference_pixels(crop).to(device=device or vae.device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.sample(generator=generator)
    return normalize_latents(latents, vae.config)


@torch.no_grad()
def reference_features(transformer, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                       cache_context: str | None = None) -> list[torch.Tensor]:
    """Per-block tensors entering self-attention in the frozen pass over reference `latents` [B, C, 1, h, w] at
    t = 0 (every adapter branch off); one [B, S, hidden] tensor per block.

    `cache_context` names the pass for diffusers' step caches (FirstBlockCache, ...), so they keep nothing of it.
    """
    n, device, dtype = latents.shape[0], latents.device, transformer.dtype
    context = transformer.cache_context(cache_context) if cache_context else nullcontext()
    with recording(transformer) as recorded, context:
        transformer(hidden_states=latents.to(dtype), timestep=torch.zeros(n, dtype=torch.long, device=device),
                    encoder_hidden_states=prompt_embeds.to(device, dtype).expand(n, -1, -1), return_dict=False)
    if len(recorded) != len(transformer.blocks):
        raise RuntimeError(f"the reference pass recorded {len(recorded)} of {len(transformer.blocks)} "
                           "blocks; a hook on the transformer skipped blocks")
    return list(recorded)
