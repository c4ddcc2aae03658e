"""Videos longer than the model window: context windows over latent frames, blended at every step.

Wan was trained on 81 frames (21 latent frames). For a longer clip, each denoising step runs the guidance
branches on overlapping windows of the latent video, one window at a time, and blends the windows' noise
predictions into one prediction for the whole clip before the scheduler's step (as ComfyUI's and Wan2GP's
context windows do). The transformer never sees more than one window, so its memory is that of one
window; the identity tokens and reference features, computed once per video, serve every window.

Blending: `linear` weights each window's frames with ramps over its overlaps (a frame near a window's edge
counts less there than in its neighbour), `uniform` averages the windows where they overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..constants import CONTEXT_BLENDS, CONTEXT_OVERLAP_FRAMES, CONTEXT_WINDOW_FRAMES
from ..errors import InputError


def latent_frames(num_frames: int, temporal: int = 4) -> int:
    """Latent frames of a 4k+1-frame video: the first frame alone, then one per `temporal` frames."""
    return (num_frames - 1) // temporal + 1


def video_frames(start: int, end: int, temporal: int = 4) -> tuple[int, int]:
    """The video frames [first, last + 1) that latent frames [start, end) decode to."""
    return (0 if start == 0 else temporal * start - temporal + 1), temporal * (end - 1) + 1


@dataclass(frozen=True)
class ContextWindows:
    """Window length and overlap in video frames (4k+1 and a multiple of 4) and the blending."""

    frames: int = CONTEXT_WINDOW_FRAMES
    overlap: int = CONTEXT_OVERLAP_FRAMES
    blend: str = "linear"
    temporal: int = 4

    def __post_init__(self):
        t = self.temporal
        if self.frames < t + 1 or (self.frames - 1) % t:
            raise InputError(f"context window of {self.frames} frames: it must be {t}k+1 frames, at least {t + 1} "
                             f"(default {CONTEXT_WINDOW_FRAMES})")
        if self.overlap < 0 or self.overlap % t or self.overlap >= self.frames - 1:
            raise InputError(f"context overlap of {self.overlap} frames: it must be a multiple of {t}, at least 0 "
                             f"and under the window's {self.frames - 1} (default {CONTEXT_OVERLAP_FRAMES})")
        if self.blend not in CONTEXT_BLENDS:
            raise InputError(f"context blend must be one of {', '.join(CONTEXT_BLENDS)}, not {self.blend!r}")

    @property
    def length(self) -> int:
        """Window length in latent frames."""
        return latent_frames(self.frames, self.temporal)

    @property
    def latent_overlap(self) -> int:
        return self.overlap // self.temporal

    def windows(self, total: int) -> list[tuple[int, int]]:
        """[start, end) latent-frame ranges covering `total` latent frames; one window when the clip fits.
        The windows advance by length - overlap; the last one ends at the clip's end (it may overlap more)."""
        length = self.length
        if total <= length:
            return [(0, total)]
        stride = length - self.latent_overlap
        starts = list(range(0, total - length, stride)) + [total - length]
        return [(s, s + length) for s in starts]

    def video_windows(self, num_frames: int) -> list[tuple[int, int]]:
        """The windows as video-frame ranges [first, last + 1) (what the sidecar records, `lynx eval` reads)."""
        return [video_frames(s, e, self.temporal) for s, e in self.windows(latent_frames(num_frames, self.temporal))]

    def weights(self, start: int, end: int, total: int) -> torch.Tensor:
        """[end - start] blending weights of one window's frames (all > 0: every frame is covered)."""
        n = end - start
        if self.blend == "uniform" or n == total:
            return torch.ones(n)
        ramp = self.latent_overlap + 1
        j = torch.arange(n, dtype=torch.float32)
        w = torch.ones(n)
        if start > 0:  # fade in over the part shared with the window before
            w = torch.minimum(w, (j + 1) / ramp)
        if end < total:  # fade out over the part shared with the window after
            w = torch.minimum(w, (n - j) / ramp)
        return w


def blend(predictions: list[tuple[tuple[int, int], torch.Tensor]], windows: ContextWindows, like: torch.Tensor
          ) -> torch.Tensor:
    """One prediction shaped like `like` [B, C, F, H, W] from per-window predictions ((start, end), [B, C, n, H, W])."""
    total = like.shape[2]
    out = torch.zeros_like(like, dtype=torch.float32)
    norm = torch.zeros(total, device=like.device)
    for (start, end), pred in predictions:
        w = windows.weights(start, end, total).to(like.device)
        out[:, :, start:end] += pred.float() * w.view(1, 1, -1, 1, 1)
        norm[start:end] += w
    return (out / norm.view(1, 1, -1, 1, 1)).to(predictions[0][1].dtype)
