"""The safety gate: an NSFW image classifier looks at a generated video's frames before the video is written.

The classifier is a stock transformers image classifier (by default the one the authors used,
Falconsai/nsfw_image_detection, a ViT), loaded with `AutoModelForImageClassification` and its own image
processor. It lives here, beside the video writer, rather than in the pipeline: whether a file may be
written is output policy that every front end applies at the same point (`lynx generate`, `lynx serve`,
`lynx bench`), while `LynxPipeline` keeps returning frames in memory like any diffusers pipeline.

Every sampled frame gets its own score, the softmax probability of the unsafe label(s) from that frame's
own logits; a video is refused when its highest score reaches the threshold. See docs/safety.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..constants import NSFW_THRESHOLD, SAFETY_MODEL_REPO, SAFETY_SAMPLE_FRAMES, UNSAFE_LABELS
from ..errors import CheckpointError, UnsafeVideoError
from ..runtime import safety_model_dir
from .video import to_uint8

# Frames per classifier call: bounds activation memory whatever the video length.
BATCH = 8


def download_command(path=None) -> str:
    return f"hf download {SAFETY_MODEL_REPO} --local-dir {Path(path or safety_model_dir())}"


def safety_model_missing(path=None) -> str | None:
    """The one-line notice that the gate is off because no classifier is at `path`; None when one is there."""
    path = Path(path or safety_model_dir())
    if path.is_dir() and any(path.iterdir()):
        return None
    return (f"safety check off: no NSFW classifier at {path} (to turn it on: {download_command(path)}; "
            f"or pass --no-safety-check)")


def sample_indices(num_frames: int, max_frames: int = SAFETY_SAMPLE_FRAMES) -> np.ndarray:
    """Indices of the frames to classify: all of them up to `max_frames`, else evenly spaced, first and last kept."""
    if num_frames <= max_frames:
        return np.arange(num_frames)
    return np.unique(np.linspace(0, num_frames - 1, max_frames).round().astype(int))


@dataclass
class SafetyChecker:
    """An image classifier, its processor, which of its labels are unsafe, and the refusal threshold."""

    model: object  # transformers *ForImageClassification, eval mode
    processor: object  # its image processor (resize, rescale, normalise)
    unsafe_ids: tuple[int, ...]
    name: str = SAFETY_MODEL_REPO  # shown in refusals and sidecars: the folder it was loaded from
    threshold: float = NSFW_THRESHOLD
    max_frames: int = SAFETY_SAMPLE_FRAMES

    def scores(self, frames) -> np.ndarray:
        """[F] unsafe probability of each frame, each from that frame's own logits (no state between frames)."""
        import torch

        frames = to_uint8(frames)  # the pixels that would be written
        device = next(self.model.parameters()).device
        out = []
        with torch.inference_mode():
            for start in range(0, len(frames), BATCH):
                pixels = self.processor(images=list(frames[start:start + BATCH]), return_tensors="pt")["pixel_values"]
                logits = self.model(pixel_values=pixels.to(device, self.model.dtype)).logits
                out.append(logits.float().softmax(-1)[:, list(self.unsafe_ids)].sum(-1).cpu())
        return torch.cat(out).numpy()

    def check(self, frames) -> dict:
        """The verdict on a video's sampled frames (for its sidecar); raises UnsafeVideoError at the threshold."""
        frames = to_uint8(frames)
        idx = sample_indices(len(frames), self.max_frames)
        scores = self.scores(frames[idx])
        worst = int(np.argmax(scores))
        verdict = {"checked": True, "classifier": self.name, "threshold": self.threshold,
                   "frames_checked": len(idx), "max_score": round(float(scores[worst]), 4),
                   "max_score_frame": int(idx[worst])}
        if scores[worst] >= self.threshold:
            raise UnsafeVideoError(
                f"video not saved: the safety classifier ({self.name}) rates frame {idx[worst]} as not safe for work "
                f"(score {scores[worst]:.2f}, threshold {self.threshold:.2f}); nothing was written, try another "
                f"prompt, photo or seed", {**verdict, "blocked": True})
        return verdict


def load_safety_checker(path=None, *, device="cpu", threshold: float = NSFW_THRESHOLD,
                        unsafe_labels: tuple[str, ...] = UNSAFE_LABELS,
                        notify: Callable[[str], None] | None = None) -> SafetyChecker | None:
    """The classifier in `path` (default `lynx.runtime.safety_model_dir()`), in float32 on `device`.

    Returns None, after passing the one-line notice to `notify`, when nothing is there (the gate is then off);
    a folder that is there but does not hold a usable classifier is an error, never a silent pass.
    """
    path = Path(path or safety_model_dir())
    notice = safety_model_missing(path)
    if notice:
        if notify:
            notify(notice)
        return None
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    try:
        model = AutoModelForImageClassification.from_pretrained(path).eval().requires_grad_(False)
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not hold a usable image classifier ({str(e).splitlines()[0]}); "
                              f"download it again: {download_command(path)}") from None
    labels = {i: str(name).lower() for i, name in model.config.id2label.items()}
    unsafe = tuple(i for i, name in labels.items() if name in unsafe_labels)
    if not unsafe:
        raise CheckpointError(f"the classifier in {path} has no label among {', '.join(unsafe_labels)} "
                              f"(its labels: {', '.join(labels.values())}); use {SAFETY_MODEL_REPO}")
    return SafetyChecker(model.to(device), processor, unsafe, name=str(path), threshold=threshold)


def unchecked(reason: str) -> dict:
    """The sidecar's safety entry of a video written without the gate."""
    return {"checked": False, "reason": reason}
