"""Writing and reading videos: MP4 (H.264), animated WebP and GIF (the sidecar record of each
video is `lynx.pipelines.record`).

One backend per format, for reading and writing alike: PyAV (FFmpeg's libraries) for MP4 and the other
container formats, Pillow for animated WebP and GIF. `probe_video` reads a video's size, rate and length
without decoding it, and `iter_frames` decodes only around the frames asked for (seeking over long gaps),
so a long high-resolution clip never has to fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError, LynxError, OutputError
from .files import atomic_write
from .provenance import mark_text, xmp_packet

VIDEO_FORMATS = (".mp4", ".webp", ".gif")
PILLOW_FORMATS = (".webp", ".gif")  # FFmpeg's WebP decoder does not handle animation
SEEK_GAP = 64  # frames: a longer gap between wanted frames is crossed by seeking rather than decoding


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
            _write_mp4(frames, path, fps, quality, mark_text(mark) if mark else None)
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
    except LynxError:
        raise
    except Exception as e:  # PyAV and Pillow raise many types (FFmpegError, OSError, ValueError)
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


def _write_mp4(frames: np.ndarray, path: Path, fps, quality: int, comment: str | None = None) -> None:
    """H.264 in yuv420p, CRF from `quality` 1..10 as imageio-ffmpeg maps it (8 -> CRF 10); `comment` goes
    into the container's `comment` tag (what ffprobe shows as format tags)."""
    import av

    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise InputError(f"an H.264 MP4 needs even sides, got {w}x{h}; save as .webp or .gif instead")
    crf = int((1 - quality / 10.0) * 51)
    with av.open(str(path), mode="w", format="mp4") as container:
        if comment:
            container.metadata["comment"] = comment
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        container.mux(stream.encode())


@dataclass(frozen=True)
class VideoInfo:
    """What a video's headers say: size, frame rate (0 if unknown) and number of frames."""

    width: int
    height: int
    fps: float
    frames: int


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"video file {path} does not exist")


def probe_video(path) -> VideoInfo:
    """Size, rate and length of a video, from its headers (and, where the container does not record the frame
    count, by counting packets: no frame is decoded)."""
    path = Path(path)
    _check_exists(path)
    try:
        if path.suffix.lower() in PILLOW_FORMATS:
            from PIL import Image

            with Image.open(path) as im:
                duration = im.info.get("duration") or 0
                return VideoInfo(im.width, im.height, 1000.0 / duration if duration else 0.0,
                                 getattr(im, "n_frames", 1))
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            return VideoInfo(stream.codec_context.width, stream.codec_context.height, fps, frames)
    except InputError:
        raise
    except Exception as e:  # PyAV and Pillow raise many types for damaged files
        raise InputError(f"{path} is not a readable video ({e})") from None


def iter_frames(path, indices) -> Iterator[tuple[int, np.ndarray]]:
    """(index, uint8 [H, W, 3] RGB frame) for each wanted frame index, in increasing order, decoding only from
    the keyframe before each run of wanted frames (runs further apart than `SEEK_GAP` are reached by seeking).
    Indices past the end of the video are not yielded."""
    path = Path(path)
    _check_exists(path)
    wanted = sorted({int(i) for i in indices if i >= 0})
    if not wanted:
        return
    try:
        if path.suffix.lower() in PILLOW_FORMATS:
            from PIL import Image

            with Image.open(path) as im:
                for i in wanted:
                    if i >= getattr(im, "n_frames", 1):
                        return
                    im.seek(i)
                    yield i, np.asarray(im.convert("RGB"))
            return
        yield from _iter_av_frames(path, wanted)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path} is not a readable video ({e})") from None


def _iter_av_frames(path: Path, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        start = stream.start_time or 0
        if not fps or stream.time_base is None:  # no usable timing: one pass, frames counted in decoding order
            keep = set(wanted)
            for index, frame in enumerate(container.decode(stream)):
                if index in keep:
                    yield index, frame.to_ndarray(format="rgb24")
                if index >= wanted[-1]:
                    return
            return
        runs, run = [], [wanted[0]]
        for i in wanted[1:]:
            if i - run[-1] > SEEK_GAP:
                runs.append(run)
                run = []
            run.append(i)
        runs.append(run)
        for run in runs:
            # A seek lands on the keyframe before the run; each frame's index comes from its timestamp.
            container.seek(start + int(run[0] / fps / stream.time_base), stream=stream, backward=True)
            keep = set(run)
            for frame in container.decode(stream):
                index = round(float((frame.pts - start) * stream.time_base) * fps)
                if index in keep:
                    keep.discard(index)
                    yield index, frame.to_ndarray(format="rgb24")
                if index >= run[-1] or not keep:
                    break


def read_video(path, every: int = 1) -> tuple[np.ndarray, float]:
    """Decode a video file to uint8 [F, H, W, 3] RGB frames (every k-th) and its frame rate (0 if unknown)."""
    path = Path(path)
    info = probe_video(path)
    frames = [f for _, f in iter_frames(path, range(0, info.frames, every))]
    if not frames:
        raise InputError(f"{path} holds no video frames")
    if path.suffix.lower() in PILLOW_FORMATS:
        info = VideoInfo(info.width, info.height, _pillow_fps(path), info.frames)
    return np.stack(frames), info.fps


def _pillow_fps(path: Path) -> float:
    """Frames per second of an animated WebP/GIF from the mean of its frame durations."""
    from PIL import Image, ImageSequence

    durations = []
    with Image.open(path) as im:
        for f in ImageSequence.Iterator(im):
            f.load()  # Pillow fills in a frame's timing when it is decoded
            durations.append(f.info.get("duration") or 0)
    mean_ms = float(np.mean(durations)) if durations else 0.0
    return 1000.0 / mean_ms if mean_ms > 0 else 0.0


def sidecar_path(video_path) -> Path:
    return Path(video_path).with_suffix(Path(video_path).suffix + ".json")
