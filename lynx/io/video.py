"""Writing and reading videos: MP4 (H.264), animated WebP and GIF (the sidecar record is `lynx.pipelines.record`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError
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


def encode_video(frames, path, fps: int, quality: int = 8, mark: dict | None = None) -> Path:
    """Encode `frames` into `path` as it is named (the format from its suffix, or `suffix`); `mark`
    (lynx.io.provenance) goes into the file's metadata: MP4 `comment` tag, GIF comment, WebP XMP. A failed
    encode (or an empty file) is an `OutputError`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise InputError(f"unsupported video format {suffix!r}: use one of {', '.join(VIDEO_FORMATS)}")
    if not (isinstance(fps, (int, float)) and 0 < fps < float("inf")):
        raise OutputError(f"cannot write {path.name} at {fps!r} frames per second")
    frames = to_uint8(frames)
    try:
        if suffix == ".mp4":
            import imageio.v2 as imageio

            # yuv420p needs even sides; macro_block_size=1 keeps the exact size the model produced.
            meta = ["-metadata", f"comment={mark_text(mark)}"] if mark else []
            with imageio.get_writer(str(path), format="FFMPEG", fps=fps, codec="libx264", quality=quality,
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
            images[0].save(str(path), format=suffix[1:].upper(), save_all=True, append_images=images[1:],
                           duration=duration, loop=0, **kw)
    except (OSError, RuntimeError, ValueError) as e:  # ffmpeg's and Pillow's failures
        raise OutputError(f"could not encode {path.name}: {str(e).strip().splitlines()[-1] if str(e) else e!r}") \
            from None
    if not path.is_file() or path.stat().st_size == 0:
        raise OutputError(f"could not encode {path.name}: the encoder wrote nothing")
    return path


def save_video(frames, path, fps: int, quality: int = 8, mark: dict | None = None) -> Path:
    """Write `frames` to `path` (format from its suffix) atomically: the old file stays until the new one is
    complete, and a failed encode leaves nothing behind (`OutputError`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: encode_video(frames, tmp, fps, quality, mark))
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
