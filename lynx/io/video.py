"""Writing and reading videos: MP4 (H.264), animated WebP and GIF, plus the JSON sidecar of each video.

One backend per format, for reading and writing alike: PyAV (FFmpeg's libraries) for MP4 and the other
container formats, Pillow for animated WebP and GIF. `probe_video` reads a video's size, rate and length
without decoding it, and `iter_frames` decodes only around the frames asked for (seeking over long gaps),
so a long high-resolution clip never has to fit in memory.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError
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
            _write_mp4(frames, tmp, fps, quality, mark_text(mark) if mark else None)
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
