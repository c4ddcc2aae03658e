"""A small synthetic training set whose only signal is identity, for tests and benchmarks (never for results).

Each identity k has a colour and a random unit 'ArcFace' embedding; its images and videos are that colour with
a moving pattern, so a model can only tell what to draw from the identity. `identity_fn` stands in for face
analysis: it recognises the colour of a frame and returns that identity's embedding and a 256x256 crop, and
finds 'no face' in dark frames. `make_dataset` also writes one bad sample of every kind prepare must skip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import NoFaceError

CAPTION = "a person looking at the camera"
DARK = 40  # frames darker than this on average have 'no face'


@dataclass
class SyntheticSet:
    manifest: Path
    colors: np.ndarray  # [K, 3] uint8
    embeddings: np.ndarray  # [K, 512] float32, unit norm
    bad: dict  # skip reason -> sample id

    def identity_of(self, frame: np.ndarray) -> int:
        mean = frame.reshape(-1, 3).mean(0)
        return int(np.argmin(((self.colors.astype(np.float32) - mean) ** 2).sum(1)))

    def identity_fn(self, frame: np.ndarray):
        if frame.mean() < DARK:
            raise NoFaceError("no face found (synthetic dark frame)")
        k = self.identity_of(frame)
        crop = np.zeros((256, 256, 3), np.uint8)
        crop[48:208, 64:192] = self.colors[k]
        return self.embeddings[k], crop


def _palette(k: int, rng) -> np.ndarray:
    # Well-separated bright colours, so recognising them from a frame is unambiguous.
    hues = (np.arange(k) / k + rng.uniform(0, 1 / k)) % 1.0
    out = []
    for h in hues:
        i, f = int(h * 6) % 6, h * 6 % 1
        q, t = 1 - f, f
        rgb = [(1, t, 0), (q, 1, 0), (0, 1, t), (0, q, 1), (t, 0, 1), (1, 0, q)][i]
        out.append([int(60 + 180 * c) for c in rgb])
    return np.array(out, np.uint8)


def _frames(color, n: int, height: int, width: int, rng) -> np.ndarray:
    base = np.broadcast_to(color.astype(np.float32), (n, height, width, 3)).copy()
    yy, xx = np.mgrid[:height, :width]
    phase = rng.uniform(0, 2 * np.pi)
    for i in range(n):
        stripes = 25 * np.sin(xx / 3.0 + yy / 5.0 + phase + i * 0.7)
        base[i] += stripes[..., None] + rng.normal(0, 4, (height, width, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def make_dataset(root, identities: int = 4, images_per_identity: int = 4, videos_per_identity: int = 0,
                 size: tuple[int, int] = (64, 64), video_frames: int = 9, seed: int = 0,
                 bad_samples: bool = True) -> SyntheticSet:
    """Write images (and mp4 videos) plus a JSONL manifest under `root`."""
    from PIL import Image

    from ..io.video import save_video

    root = Path(root)
    (root / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = _palette(identities, rng)
    emb = rng.normal(size=(identities, 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    h, w = size
    lines = []
    for k in range(identities):
        for j in range(images_per_identity):
            name = f"media/id{k}-img{j}.png"
            Image.fromarray(_frames(colors[k], 1, h, w, rng)[0]).save(root / name)
            lines.append({"id": f"id{k}-img{j}", "path": name, "caption": CAPTION})
        for j in range(videos_per_identity):
            name = f"media/id{k}-vid{j}.mp4"
            save_video(_frames(colors[k], video_frames, h, w, rng), root / name, fps=16)
            lines.append({"id": f"id{k}-vid{j}", "path": name, "caption": CAPTION})
    bad = {}
    if bad_samples:
        (root / "media/broken.png").write_bytes(b"this is not a png")
        lines.append({"id": "broken", "path": "media/broken.png", "caption": CAPTION})
        bad["unreadable"] = "broken"
        Image.fromarray(np.full((h, w, 3), 5, np.uint8)).save(root / "media/dark.png")
        lines.append({"id": "dark", "path": "media/dark.png", "caption": CAPTION})
        bad["no_face"] = "dark"
        Image.fromarray(_frames(colors[0], 1, h // 4, w // 4, rng)[0]).save(root / "media/tiny.png")
        lines.append({"id": "tiny", "path": "media/tiny.png", "caption": CAPTION})
        bad["too_small"] = "tiny"
        lines.append({"id": "nocaption", "path": "media/dark.png", "caption": ""})
        bad["bad_entry"] = "line-" + str(len(lines))
        if videos_per_identity:
            save_video(_frames(colors[0], 2, h, w, rng), root / "media/short.mp4", fps=16)
            lines.append({"id": "short", "path": "media/short.mp4", "caption": CAPTION})
            bad["too_short"] = "short"
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return SyntheticSet(manifest, colors, emb, bad)


def pixel_encoders(base, device: str = "cpu", latent_channels: int = 16, seed: int = 0):
    """Prepare's encoders with the random tiny VAE replaced by a fixed pooling projection.

    A random VAE maps every colour to almost the same latent (between-identity variance ~1e-3 of a posterior
    std ~0.5), which leaves nothing identity-specific to learn. This stand-in keeps what a trained VAE keeps:
    8x spatial and 4x temporal compression, with colour preserved; text still goes through the base's encoder.
    """
    import torch
    import torch.nn.functional as F

    from .data import Encoders

    class PixelEncoders(Encoders):
        def encode_pixels(self, pixels):
            g = torch.Generator().manual_seed(seed)
            proj = torch.randn(latent_channels, 3, generator=g)
            frames = pixels.float()[:, :, ::4]  # frames 0, 4, 8, ...: (F - 1) / 4 + 1 latent frames
            pooled = F.avg_pool3d(frames, (1, 8, 8))
            latents = torch.einsum("oc,bcfhw->bofhw", proj, pooled)
            return latents[0], torch.zeros_like(latents[0])

    return PixelEncoders(base, device, "fp32")
