"""`GenerationRecord`: the sidecar of every video (`clip.mp4.json`), whichever front end made it.

A record is the video's resolved `GenerationSettings` (their fields at the top level of the JSON) plus where it
came from: the prompt, the variant, the photos and identity files with their SHA-256, the model directories,
dtype and device, package versions, the `lynx generate` command that makes it again, and timing. `lynx
generate`, `lynx serve` and `lynx bench` write it (`write_video`: the video and its record, or neither);
`lynx eval`, the bench and the web page read it (`read_record`), skipping with a warning a sidecar that is not
a valid record instead of failing a whole list. The JSON is strict: no NaN or Infinity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..errors import LynxError
from ..io.files import temporary
from ..io.provenance import provenance_mark
from ..io.video import encode_video, sidecar_path
from .settings import RESOLVED_NONE, GenerationSettings, settings_error

logger = logging.getLogger(__name__)

RECORD_VERSION = 1


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    from .. import __version__

    return {"lynx": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class FileRecord(_Strict):
    """An input file: its absolute path and SHA-256, so a record says exactly which photo or file was used."""

    path: str
    sha256: str

    @classmethod
    def of(cls, path) -> FileRecord:
        return cls(path=str(Path(path).resolve()), sha256=file_sha256(path))


class IdentityRecord(_Strict):
    """Where the person came from: photos, or an identity file, or an embedding (+ reference crop)."""

    images: list[FileRecord] = []
    identity_file: FileRecord | None = None
    embedding_file: FileRecord | None = None
    reference: FileRecord | None = None
    faces: list[dict[str, Any]] = []  # the face used in each photo (`FaceIdentity.faces_used`): box, index, count


class LoraRecord(_Strict):
    path: str
    scale: float


class SpeedRecord(_Strict):
    """How the model ran (the strength knobs are settings): preset, LoRAs, compilation."""

    preset: Literal["exact", "fast", "turbo"] = "exact"
    loras: list[LoraRecord] = []
    compile: bool = False


class BenchRecord(_Strict):
    """Which benchmark case a video is (`lynx bench`); `setting_key` hashes the knobs the setting had."""

    setting: str
    subject: str
    prompt_id: str
    setting_key: str
    manifest: str


class GenerationRecord(GenerationSettings):
    """Resolved settings (the inherited fields) + provenance: the only schema of a video's sidecar."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    record_version: Literal[1] = RECORD_VERSION
    video: str  # the video's file name, beside the sidecar
    prompt: str
    variant: Literal["full", "lite"]
    identity: IdentityRecord
    base: str
    adapter: str
    dtype: str  # in the command line's words: fp32, bf16, fp16
    device: str
    versions: dict[str, str]
    command: str  # the `lynx generate` line that makes this video again
    seconds: float | None = None  # generation time, face analysis excluded
    peak_memory_gb: float | None = None
    created: str
    source: Literal["lynx generate", "lynx serve", "lynx bench", "python"]
    provenance: dict[str, Any]  # the mark inside the video file (lynx.io.provenance)
    safety: dict[str, Any]  # the safety gate's verdict, or why it did not run (lynx.io.safety)
    bench: BenchRecord | None = None
    speed: SpeedRecord = SpeedRecord()
    experts: Literal["high", "both"] | None = None  # Wan2.2 A14B bases: which experts carry the adapters
    context_windows: list[tuple[int, int]] | None = None  # a long video's windows, video-frame ranges [first, end)
    base_transformer: dict[str, str] | None = None  # GGUF files used for the base's transformer(s), by subfolder

    @model_validator(mode="after")
    def _resolved(self):
        unset = [name for name in GenerationSettings.model_fields
                 if getattr(self, name) is None and name not in RESOLVED_NONE]
        if unset:
            raise ValueError(f"settings not resolved ({', '.join(unset)} unset)")
        return self

    @property
    def settings(self) -> GenerationSettings:
        return GenerationSettings(**{name: getattr(self, name) for name in GenerationSettings.model_fields})

    @classmethod
    def from_json(cls, text: str | bytes) -> GenerationRecord:
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            raise settings_error(e) from None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, allow_nan=False)


def _dtype_name(dtype) -> str:
    from ..runtime import DTYPES

    return next((k for k, v in DTYPES.items() if v == dtype or k == dtype), str(dtype).removeprefix("torch."))


def generate_command(prompt: str, settings: GenerationSettings, identity: IdentityRecord, *, base, adapter, out,
                     dtype: str | None = None, device: str | None = None, extra: Sequence[str] = ()) -> str:
    """The `lynx generate` line that makes this video again (absolute paths, every resolved knob)."""
    argv = ["lynx", "generate"]
    if identity.images:
        argv += ["--image", *(i.path for i in identity.images)]
    for flag, file in (("--identity", identity.identity_file), ("--embedding", identity.embedding_file),
                       ("--reference", identity.reference)):
        if file is not None:
            argv += [flag, file.path]
    # `--prompt @x` reads the file x: a prompt starting with @ is written @@, which `lynx generate` reads back as @.
    argv += ["--prompt", "@" + prompt if prompt.startswith("@") else prompt,
             "--base", str(Path(base).resolve()), "--adapter", str(Path(adapter).resolve()),
             "--out", str(Path(out).resolve()), *settings.cli_args()]
    argv += (["--dtype", dtype] if dtype else []) + (["--device", device] if device else []) + list(extra)
    return " ".join(shlex.quote(a) for a in argv)


def make_record(video, prompt: str, settings: GenerationSettings, *, variant: str, base, adapter, dtype, device,
                source: str, safety: dict, photos=(), identity_file=None, embedding_file=None, reference=None,
                seconds: float | None = None, peak_memory_gb: float | None = None, bench: BenchRecord | None = None,
                command_extra: Sequence[str] = (), faces: Sequence[dict] = (), speed: dict | None = None,
                experts: str | None = None, context_windows: Sequence | None = None,
                base_transformer: dict[str, str] | None = None) -> GenerationRecord:
    """The record of `video`, made with the resolved `settings` (a pipeline output's `.settings`); `faces` as
    `FaceIdentity.faces_used()`, `speed` a `SpeedRecord`'s fields, `context_windows` the video-frame windows
    (recorded when there are several)."""
    identity = IdentityRecord(faces=list(faces),
        images=[FileRecord.of(p) for p in photos],
        identity_file=FileRecord.of(identity_file) if identity_file else None,
        embedding_file=FileRecord.of(embedding_file) if embedding_file else None,
        reference=FileRecord.of(reference) if reference else None)
    dtype = _dtype_name(dtype)
    return GenerationRecord(
        **settings.model_dump(), video=Path(video).name, prompt=prompt, variant=variant, identity=identity,
        base=str(Path(base).resolve()), adapter=str(Path(adapter).resolve()), dtype=dtype, device=str(device),
        versions=package_versions(),
        command=generate_command(prompt, settings, identity, base=base, adapter=adapter, out=video, dtype=dtype,
                                 device=str(device), extra=command_extra),
        seconds=None if seconds is None else round(seconds, 2), peak_memory_gb=peak_memory_gb,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), source=source, bench=bench, safety=safety,
        speed=SpeedRecord(**(speed or {})), experts=experts, base_transformer=base_transformer,
        context_windows=[tuple(w) for w in context_windows] if context_windows and len(context_windows) > 1 else None,
        provenance=provenance_mark(base=base, adapter=adapter, variant=variant, seed=settings.seed))


def write_record(video_path, record: GenerationRecord) -> Path:
    """Write (atomically) the sidecar of a video that is already there."""
    path = sidecar_path(video_path)
    with temporary(path) as tmp:
        tmp.write_text(record.to_json())
        os.replace(tmp, path)
    return path


def write_video(frames, path, record: GenerationRecord) -> Path:
    """Write the video (format from the suffix, at `record.fps`, carrying `record.provenance`) and its record:
    both, or neither.

    Both are made and checked as temporary files first; a video that fails to encode is an `OutputError` and
    leaves nothing behind, and an earlier video and sidecar at `path` stay as they were until the new ones are
    complete. The old sidecar goes first, so it never vouches for the new video, even for a moment.
    """
    path = Path(path)
    side = sidecar_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary(path) as video_tmp, temporary(side) as side_tmp:
        encode_video(frames, video_tmp, record.fps, mark=record.provenance)
        side_tmp.write_text(record.to_json())
        side.unlink(missing_ok=True)
        os.replace(video_tmp, path)
        os.replace(side_tmp, side)
    return path


def read_record(video_path) -> GenerationRecord | None:
    """The record beside a video: None when there is none, or (with a warning) when it is not a valid record."""
    side = sidecar_path(video_path)
    if not side.is_file():
        return None
    try:
        return GenerationRecord.from_json(side.read_bytes())
    except (OSError, LynxError) as e:
        logger.warning("skipping %s: not a readable lynx generation record (%s)", side, e)
        return None
