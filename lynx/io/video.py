"""Writing and reading videos: MP4 (H.264), animated WebP and GIF, plus the JSON sidecar of each video."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from .files import atomic_write
from .provenance import mark_text, xmp_packet

VIDEO_FORMATS = (".mp4", ".webp", ".gif")


def to_uint8(frames) -> np.ndarray:
    """[F, H, W, 3] floats in [0, 1] (the pipeline's np output) or uint8 -> uint8."""
    frames = np.asarray(frames)
    if frames.ndim == 5:  # [1, F, H, W, 3] batch of one
        frames = frames[0]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"expected frames of shape [F, H, W, 3], got {frames.shape}")
    if frames.dtype != np.uint8:
        frames = np.clip(np.round(frames.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return frames


def save_video(frames, path, fps: int, quality: int = 8, mark: dict | None = None) -> Path:
    """Write `frames` to `path` (format from its suffix), atomically; `mark` (lynx.io.provenance) goes into
    the file's metadata: MP4 `comment` tag, GIF comment, WebP XMP."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise InputError(f"unsupported video format {suffix!r}: use one of {', '.join(VIDEO_FORMATS)}")
    frames = to_uint8(frames)

    def write(tmp: Path):
        if suffix == ".mp4":
            import imageio.v2 as imageio

            # yuv420p needs even sides; macro_block_size=1 keeps the exact size the model produced.
            meta = ["-metadata", f"comment={mark_text(mark)}"] if mark else []
            with imageio.get_writer(str(tmp), format="FFMPEG", fps=fps, codec="libx264", quality=quality,
                                    pixelformat="yuv420p", macro_block_size=1, output_params=meta) as w:
                for f in frames:
                    w.append_data(f)
        else:
            from PIL import Image

            images = [Image.fromarray(f) for f in frames]
            duration = int(round(1000 / fps))
            kw = dict(lossless=False, quality=90) if suffix == ".webp" else dict(disposal=2)
            if mark and suffix == ".webp":
                kw["xmp"] = xmp_packet(mark)
            elif mark:
                kw["comment"] = mark_text(mark)
            images[0].save(str(tmp), format=suffix[1:].upper(), save_all=True, append_images=images[1:],
                           duration=duration, loop=0, **kw)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return path


def read_video(path, every: int = 1) -> tuple[np.ndarray, float]:
    """Decode a video file to uint8 [F, H, W, 3] RGB frames (every k-th) and its frame rate (0 if unknown).

    Animated WebP and GIF are read with Pillow: FFmpeg's WebP decoder does not handle animation.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video file {path} does not exist")
    if path.suffix.lower() in (".webp", ".gif"):
        from PIL import Image, ImageSequence

        try:
            with Image.open(path) as im:
                frames, durations = [], []
                for i, f in enumerate(ImageSequence.Iterator(im)):
                    f.load()  # Pillow fills in a frame's timing when it is decoded
                    durations.append(f.info.get("duration") or 0)
                    if i % every == 0:
                        frames.append(np.asarray(f.convert("RGB")))
        except (OSError, ValueError) as e:
            raise InputError(f"{path} is not a readable video ({e})") from None
        mean_ms = float(np.mean(durations)) if durations else 0.0
        fps = 1000.0 / mean_ms if mean_ms > 0 else 0.0
    else:
        import av

        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                fps = float(stream.average_rate or stream.guessed_rate or 0)
                frames = [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(stream))
                          if i % every == 0]
        except (av.error.FFmpegError, IndexError) as e:
            raise InputError(f"{path} is not a readable video ({e})") from None
    if not frames:
        raise InputError(f"{path} holds no video frames")
    return np.stack(frames), fps


def sidecar_path(video_path) -> Path:
    return Path(video_path).with_suffix(Path(video_path).suffix + ".json")


def write_sidecar(video_path, record: dict) -> Path:
    path = sidecar_path(video_path)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str)))
    return path


def package_versions() -> dict:
    import diffusers
    import torch
    import transformers

    from .. import __version__

    return {"lynx": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def generation_record(video, frames, fps: int, knobs: dict, defaults, *, variant: str, dtype, device, base,
                      adapter, photos=(), seconds: float, command: str, **extra) -> dict:
    """The sidecar of a generated video: what is needed to make it again, whichever front end made it.

    `knobs` holds the call's values by the pipeline's names (None: the variant's default, taken from
    `defaults`); `guidance_scale_i` may also be "default".
    """
    value = lambda name: getattr(defaults, name) if knobs.get(name) is None else knobs[name]  # noqa: E731
    g_i = knobs.get("guidance_scale_i", "default")
    frames = np.asarray(frames)
    return {
        "video": Path(video).name, "prompt": knobs["prompt"], "negative_prompt": value("negative_prompt"),
        "seed": knobs["seed"], "height": frames.shape[1], "width": frames.shape[2], "num_frames": frames.shape[0],
        "fps": fps, "num_inference_steps": value("num_inference_steps"), "guidance_scale": value("guidance_scale"),
        "guidance_scale_i": defaults.guidance_scale_i if g_i == "default" else g_i,
        "ip_scale": value("ip_scale"), "ref_scale": value("ref_scale"),
        "variant": variant, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
        "base": str(Path(base).resolve()), "adapter": str(Path(adapter).resolve()),
        "identity": {"images": [{"path": str(Path(p).resolve()), "sha256": file_sha256(p)} for p in photos],
                     **extra.pop("identity", {})},
        "seconds": round(seconds, 2), "versions": package_versions(), "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra,
    }
