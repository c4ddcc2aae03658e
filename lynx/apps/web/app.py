"""`lynx serve`: the Gradio page for Lynx, for one person or a small team on one GPU.

`LynxWebApp` holds what lives as long as the server: the pipeline (loaded once, in the background), the face
detector, the identities of photos already checked, and the lock that lets one generation use the GPU at a
time. `build_page` lays it out as Gradio Blocks; Gradio's queue runs one generation at a time and shows the
others their place, its cancel stops a generation between two denoising steps, and `gradio_client` drives the
same events as an API (`/check_faces`, `/generate`, `/gallery`, `/show`, `/save_identity`). See docs/web.md.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np

from ...constants import MAX_STEPS, TWO_WAY
from ...errors import CheckpointError, InputError, LynxError, WeightsNotFoundError
from ...io.files import atomic_write, slug
from ...io.video import VIDEO_FORMATS, sidecar_path
from ...pipelines.record import read_record
from ...pipelines.settings import GenerationSettings, default, flag
from ...runtime import device_and_dtype
from ..options import (
    check_model_options,
    load_pipeline,
    memory_choice,
    speed_flags,
    speed_record,
    speed_setup,
    speed_sigmas,
    transformer_files,
)

# Uploads: a phone photo is a few MB (the default limit; `--max-upload-mb`) and at most ~50 MP; anything larger is
# refused before it is decoded.
MAX_PHOTOS = 8
MAX_PHOTO_MB = 25
MAX_PHOTO_PIXELS = 50_000_000
PHOTO_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp"}
FROM_PHOTOS = ""  # the person dropdown's value for "the photos above" (identity names are slugs, never empty)
IDENTITY_DIR = "faces"  # <out-dir>/faces/<name>.identity, where `lynx face` writes them by default


class Cancelled(Exception):
    """Raised in the step callback when the page (or an API client) cancelled the generation."""


@dataclass
class ServeConfig:
    """What `lynx serve` was started with. `load_options` go to `load_pipeline` (device and dtype as the CLI
    spells them); `model_flags` are the same options as `lynx generate` flags, for the equivalent command.
    `speed`, `loras` ((file, scale) pairs) and `compile` set the pipeline up once it is loaded, for every request;
    the page's settings start from the speed preset's values. `max_upload_mb`: the largest photo accepted (give
    `open_page` the same, so Gradio refuses a larger upload before storing it)."""

    base: Path
    adapter: Path
    out_dir: Path = Path("outputs")
    face_models: Path | None = None
    detector: str = "auto"
    load_options: dict = field(default_factory=dict)
    model_flags: list[str] = field(default_factory=list)
    safety_check: bool = True  # the NSFW gate before a video is written (docs/safety.md)
    safety_model: Path | None = None
    speed: str = "exact"  # lynx.pipelines.speed's presets: exact, fast, turbo (docs/speed.md)
    loras: list[tuple[str, float]] = field(default_factory=list)
    compile: bool = False
    max_upload_mb: int = MAX_PHOTO_MB

    def __post_init__(self):
        self.base, self.adapter, self.out_dir = Path(self.base), Path(self.adapter), Path(self.out_dir)
        if self.max_upload_mb < 1:
            raise InputError(f"max_upload_mb={self.max_upload_mb} accepts no photo; give at least 1")


@dataclass(frozen=True)
class Setting:
    """One generation setting of the page: how it is shown. `key` is the pipeline's argument (and the API's
    parameter), a field of `GenerationSettings`, which holds its check, default and `lynx generate` flag; the
    page's own settings (`format`) are `PAGE_SETTINGS`. `kind` says what an empty form field means: int and
    float need a value, float? is two-way guidance, text is the default. `field` makes the form field from the
    variant's default value."""

    key: str
    kind: str
    field: Callable[[object], gr.components.Component]
    choices: tuple = ()  # kind "choice": the accepted values

    @property
    def flag(self) -> str | None:
        """The `lynx generate` option (None: the page's own)."""
        return flag(self.key) if self.key in GenerationSettings.model_fields else None


def _number(label, info=None, **kw):
    # Made unrendered: the page places the fields in rows.
    return lambda value: gr.Number(value, label=label, info=info, render=False, **kw)


# The page's own settings: how the file is written, not how the video is made.
PAGE_SETTINGS = {"format": ".mp4"}

# The settings the page shows, in its order; their checks, defaults and flags are GenerationSettings' (a knob
# added there is one entry here to appear on the page; the API, checks, pipeline call, sidecar and command follow).
SETTINGS: tuple[Setting, ...] = (
    Setting("negative_prompt", "text",
            lambda value: gr.Textbox(value, label="Negative prompt", lines=2, render=False)),
    # The limits are GenerationSettings' (said in its words, with a value to try); a gr.Number minimum or maximum
    # would answer first, in Gradio's ("Value 0 is less than minimum value 1.").
    Setting("num_frames", "int", _number("Frames", "4k+1", precision=0)),
    Setting("height", "int", _number("Height", "multiple of 16", precision=0)),
    Setting("width", "int", _number("Width", "multiple of 16", precision=0)),
    Setting("num_inference_steps", "int", _number("Steps", f"at most {MAX_STEPS}", precision=0)),
    Setting("seed", "int", _number("Seed", precision=0)),
    Setting("fps", "int", _number("Frames per second", precision=0)),
    Setting("guidance_scale", "float", _number("Text guidance")),
    Setting("guidance_scale_i", "float?", _number("Identity guidance", "empty: two-way guidance")),
    Setting("ip_scale", "float", _number("ID scale")),
    Setting("ref_scale", "float", _number("Ref scale", "full model only")),
    # Strength windows (docs/speed.md): fractions of the denoising steps; the defaults are the authors' sampling.
    Setting("ip_start", "float", _number("ID from", "fraction of the steps")),
    Setting("ip_end", "float", _number("ID until", "0.6: identity in the first 60%")),
    Setting("guidance_i_end", "float", _number("Identity guidance until", "later steps run 2 passes")),
    Setting("ref_start", "float", _number("Ref from", "full model only")),
    Setting("ref_end", "float", _number("Ref until", "full model only")),
    Setting("ref_blocks", "text",
            lambda value: gr.Textbox(value, label="Ref blocks", info='e.g. "0-20,35-39"; empty: all', render=False)),
    Setting("format", "choice", lambda value: gr.Radio(list(VIDEO_FORMATS), value=value, label="Format", render=False),
            choices=VIDEO_FORMATS),
)
assert all(s.key in GenerationSettings.model_fields or s.key in PAGE_SETTINGS for s in SETTINGS), \
    "a page setting that is neither a GenerationSettings field nor the page's own"


def setting_defaults(variant: str, speed: str = "exact") -> dict:
    """The value of every setting when nobody changes it: the speed preset's values over the variant's defaults
    (what `lynx generate --speed` fills in)."""
    from ...pipelines.speed import preset_settings

    shown = {TWO_WAY: None, "all": ""}  # what an empty field means
    preset = preset_settings(speed)
    values = {s.key: PAGE_SETTINGS[s.key] if s.key in PAGE_SETTINGS else preset.get(s.key, default(variant, s.key))
              for s in SETTINGS}
    return {k: shown.get(v, v) if isinstance(v, str) else v for k, v in values.items()}


def settings_form(variant: str, speed: str = "exact") -> dict[str, gr.components.Component]:
    """Every setting of `SETTINGS` as a form field with its default (`setting_defaults`), keyed by its name."""
    return {s.key: s.field(value) for s, value in zip(SETTINGS, setting_defaults(variant, speed).values())}


def draw_faces(image: np.ndarray, faces, chosen) -> np.ndarray:
    """The photo with every detected face boxed: the one the model uses in green, the others in grey."""
    from PIL import Image, ImageDraw

    out = Image.fromarray(image)
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 200))
    for f in faces:
        draw.rectangle([float(v) for v in f.box], outline=(0, 200, 0) if f is chosen else (160, 160, 160),
                       width=width)
    return np.asarray(out)


def format_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min"


@dataclass
class Run:
    """One generation, shared between the page's event (which reports it) and the thread that makes it."""

    prompt: str
    settings: GenerationSettings  # resolved
    format: str
    photos: list[Path]
    identity_file: Path | None
    phase: str = "waiting for the GPU"
    step: int = 0
    started: float = field(default_factory=time.time)
    first_step: float | None = None  # when step 1 ended: steps after it give the time per step
    out: Path | None = None
    record: dict | None = None  # the sidecar as written
    error: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def total(self) -> int:
        return self.settings.num_inference_steps

    def message(self) -> str:
        if self.phase != "denoising":
            return self.phase
        text = f"step {self.step} of {self.total}"
        if self.step >= 2:
            per_step = (time.time() - self.first_step) / (self.step - 1)
            text += f", {per_step:.1f} s per step, about {format_seconds(per_step * (self.total - self.step))} left"
        return text


class LynxWebApp:
    """The server's state: model, face detector, checked identities, the GPU lock. Thread-safe."""

    def __init__(self, config: ServeConfig, pipeline=None, face_analyzer=None):
        """`pipeline`: one already loaded, set up here with the config's speed options as a loaded one would be."""
        self.config, self.out_dir, self.pipe = config, config.out_dir, pipeline
        if pipeline is not None and (config.speed != "exact" or config.loras or config.compile):
            for line in speed_setup(pipeline, config.speed, config.loras, config.compile):
                print(f"lynx serve: {line}", file=sys.stderr, flush=True)
        self.variant = pipeline.variant if pipeline is not None else \
            ("lite" if config.adapter.name.endswith("lite") else "full")
        self.model_state = "ready" if pipeline is not None else "checking"
        self.model_error: str | None = None
        self.loaded = threading.Event()
        if pipeline is not None:
            self.loaded.set()
        self.gpu = threading.Lock()  # held by the generation thread; a cancelled one keeps it until it stops
        self.face_lock = threading.Lock()  # guards building the analyzer and the identity cache
        self.analyzer = face_analyzer  # a lynx.face.FaceAnalyzer, built on first use when not given
        self.identities: dict[str, object] = {}  # photo SHA-256 -> FaceIdentity
        self.gate, self.gate_loaded = None, False  # the safety classifier, loaded with the first video
        self.claimed: set[Path] = set()  # output names claimed (empty files) by runs not finished yet
        self.running: list[Run] = []  # runs whose thread has not ended
        # Called with the Run after every denoising step: a hook for embedding code, and where tests hold a run.
        self.on_step = lambda run: None

    # ----- the model ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Check the weights now; when nothing is missing, load the pipeline in a background thread."""
        if self.pipe is not None:
            return
        from ...models.loading import check_model_dirs

        options = self.config.load_options
        files = transformer_files(options)  # GGUF files in place of the base's transformer weights
        try:
            self.variant = check_model_dirs(self.config.base, self.config.adapter, files).variant
            # a memory preset this machine cannot run: said before loading
            check_model_options(memory_choice(options.get("memory"), options.get("offload", False)),
                                device_and_dtype(options.get("device"), options.get("dtype"))[0],
                                "gguf" if any(files.values()) else None)
        except LynxError as e:
            self.model_state = "missing" if isinstance(e, WeightsNotFoundError) else "error"
            self.model_error = str(e)
            self.loaded.set()
            return
        self.model_state = "loading"
        threading.Thread(target=self._load, name="lynx-load", daemon=True).start()

    def _load(self) -> None:
        options = dict(self.config.load_options)
        device, dtype = device_and_dtype(options.pop("device", None), options.pop("dtype", None))
        print(f"lynx serve: loading {self.config.base} + {self.config.adapter} ({self.variant}, "
              f"{str(dtype).removeprefix('torch.')}, {device})", file=sys.stderr, flush=True)
        try:
            pipe = load_pipeline(self.config.base, self.config.adapter, device=device, dtype=dtype, **options)
            for line in speed_setup(pipe, self.config.speed, self.config.loras, self.config.compile):
                print(f"lynx serve: {line}", file=sys.stderr, flush=True)
            self.pipe, self.model_state = pipe, "ready"
        except Exception as e:  # whatever it is, the page must say it, not only the log
            if not isinstance(e, LynxError):
                traceback.print_exc()
            self.model_state, self.model_error = "error", f"the model could not be loaded: {e}"
        finally:
            self.loaded.set()

    def safety_gate(self):
        """The NSFW gate (called under the GPU lock); None when switched off, or absent after a notice."""
        if not self.gate_loaded and self.config.safety_check:
            from ...io.safety import load_safety_checker

            self.gate = load_safety_checker(self.config.safety_model, device=self.pipe._execution_device,
                                            notify=lambda m: print(f"lynx serve: {m}", file=sys.stderr, flush=True))
        self.gate_loaded = True
        return self.gate

    def missing_arcface(self) -> str | None:
        """What to download for the face embedding, looked for again on every call; None when it is there."""
        from ...face import arcface_missing

        return arcface_missing(self.config.face_models)

    def missing(self) -> str | None:
        """Every missing download at once, as `lynx generate` lists them; None when nothing is missing."""
        parts = [self.model_error if self.model_state == "missing" else None, self.missing_arcface()]
        return "\n\n".join(p for p in parts if p) or None

    def status(self) -> str:
        if self.model_state == "ready":
            state = (f"**Model ready**: Lynx {self.variant}, {str(self.pipe.transformer.dtype).removeprefix('torch.')} "
                     f"on {self.pipe._execution_device}. Videos go to `{self.out_dir}`.")
        elif self.model_state == "error":
            return f"**The model cannot generate**: {self.model_error}"
        else:
            state = {"missing": "**Weights missing**: the face check works; generating needs the downloads below.",
                     "loading": "**Loading the model** in the background; the face check works already."
                     }.get(self.model_state, self.model_state)
        return f"{state}\n\n{self.run_mode()}"

    def run_mode(self) -> str:
        """One line: the speed and memory presets (and LoRAs, compilation) every request of this server runs with."""
        options = self.config.load_options
        memory = memory_choice(options.get("memory"), options.get("offload", False))
        loras = ", ".join(f"{Path(p).name} at {w}" for p, w in self.config.loras)
        return (f"Speed preset **{self.config.speed}**, memory preset **{memory or 'none'}**"
                f"{f', LoRA {loras}' if loras else ''}{', compiled' if self.config.compile else ''} "
                "(set when the server starts: `lynx serve --speed/--memory/--lora`).")

    # ----- photos and faces ----------------------------------------------------------------------------
    def store_photo(self, upload: str) -> tuple[Path, str]:
        """Check an upload (`check_upload`, then `find_face` on it) and keep it as <out-dir>/photos/<sha256>.<ext>;
        also returns the name it was uploaded as, which is only ever shown, never used in a path."""
        data, path, shown = self.check_upload(upload)
        if not path.is_file():  # only accepted photos are kept: one there has been decoded and its face found
            self.find_face(upload, shown)
            self.keep_photo(data, path)
        return path, shown

    def check_upload(self, upload: str) -> tuple[bytes, Path, str]:
        """An upload's bytes after the checks its header allows (format, file size, pixels), the path it is kept
        under once accepted and the name it was uploaded as."""
        from PIL import Image, UnidentifiedImageError

        upload = Path(upload)
        shown = upload.name
        if upload.stat().st_size > self.config.max_upload_mb << 20:
            raise InputError(f"{shown} is larger than {self.config.max_upload_mb} MB; use a smaller photo")
        try:
            with Image.open(upload) as im:  # reads the header only: the size is known before anything is decoded
                kind, (w, h) = im.format, im.size
        except Image.DecompressionBombError:
            raise InputError(f"{shown} claims more pixels than any photo has; it is not decoded") from None
        except (UnidentifiedImageError, OSError, ValueError):
            kind, w, h = None, 0, 0
        if kind not in PHOTO_FORMATS:
            raise InputError(f"{shown} is not a JPEG, PNG, WebP or BMP photo")
        if w * h > MAX_PHOTO_PIXELS:
            raise InputError(f"{shown} is {w}x{h} pixels; at most {MAX_PHOTO_PIXELS // 10**6} million are accepted")
        data = upload.read_bytes()
        return data, self.out_dir / "photos" / f"{hashlib.sha256(data).hexdigest()}{PHOTO_FORMATS[kind]}", shown

    def find_face(self, photo, shown: str, embedding: bool = False):
        """A photo decoded whole and its face found: (image, FoundFace); an error names the photo as `shown`."""
        from ... import face

        with self.face_lock:
            analyzer = self._analyzer(embedding)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", face.SeveralFacesWarning)  # the face check's summary says it
                return face.load_image(photo), analyzer.find(photo)
        except LynxError as e:  # the face code names the file, a temporary or stored one; the person knows their own
            raise type(e)(str(e).replace(str(photo), shown)) from None

    @staticmethod
    def keep_photo(data: bytes, path: Path) -> None:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: tmp.write_bytes(data))

    def _analyzer(self, embedding: bool):
        """The page's FaceAnalyzer, built once; rebuilt with ArcFace once its file has appeared. Under face_lock."""
        from ...face import FaceAnalyzer

        if self.analyzer is None or (embedding and self.analyzer.arcface is None):
            self.analyzer = FaceAnalyzer(self.config.detector, models_dir=self.config.face_models, embedding=embedding)
        return self.analyzer

    def identity_of(self, path: Path, shown: str):
        """The FaceIdentity of a stored photo, analysed once (needs the ArcFace weights)."""
        from ... import face

        key = path.stem
        with self.face_lock:
            if key not in self.identities:
                if len(self.identities) >= 256:  # each holds its crops: keep memory bounded on a long-running server
                    self.identities.clear()
                try:
                    # The page has no way to choose a face yet: the largest is used, and the record says which.
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", face.SeveralFacesWarning)
                        self.identities[key] = self._analyzer(True).analyze(path)
                except LynxError as e:  # the face code names the stored file; the person knows their own name
                    raise type(e)(str(e).replace(str(path), shown)) from None
            return self.identities[key]

    def check_faces(self, uploads):
        """Photos -> (gallery of boxed photos and 256x256 crops, a summary). Needs no model and no download."""
        from ... import face

        uploads = uploads or []
        if len(uploads) > MAX_PHOTOS:
            raise InputError(f"at most {MAX_PHOTOS} photos of one person, got {len(uploads)}")
        gallery, lines, people = [], [], []
        embedding = self.missing_arcface() is None
        for upload in uploads:
            try:
                data, path, shown = self.check_upload(upload)
                image, found = self.find_face(upload, shown, embedding)
                self.keep_photo(data, path)  # a refused photo is never kept
                faces, chosen = found.faces, found.face
                if embedding:
                    people.append(self.identity_of(path, shown))
            except LynxError as e:
                lines.append(f"- **{Path(upload).name}**: {e}")
                continue
            gallery += [(draw_faces(image, faces, chosen), f"{shown}: {len(faces)} face(s)"),
                        (found.reference_crop, f"{shown}: the 256x256 crop the model sees")]
            x1, y1, x2, y2 = (round(float(v)) for v in chosen.box)
            lines.append(f"- **{shown}**: {len(faces)} face(s) found"
                         f"{', using the largest (green)' if len(faces) > 1 else ''}; box x {x1}-{x2}, y {y1}-{y2}, "
                         f"score {chosen.score:.2f}")
        if len(people) > 1:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                combined = face.combine(people)
            lines.append(f"- {len(people)} photos make one identity; lowest similarity between two: "
                         f"{combined.extra['min_pair_similarity']:.2f}")
            lines += [f"- warning: {w.message}" for w in caught]
        if uploads and not embedding:
            lines.append(f"\nThe face check works, but a video also needs the face embedding:\n\n"
                         f"```\n{self.missing_arcface()}\n```")
        return gallery, "\n".join(lines)

    def identity_names(self) -> list[str]:
        folder = self.out_dir / IDENTITY_DIR
        return sorted(p.stem for p in folder.glob("*.identity")) if folder.is_dir() else []

    def save_identity(self, uploads, name: str) -> str:
        """Analyse the photos into one identity and keep it as <out-dir>/faces/<name>.identity; returns the name."""
        from ... import face

        name = slug(name or "", 40, fallback="")
        if not name:
            raise InputError("give the identity a name (letters and digits, in any script)")
        if not uploads:
            raise InputError("no photo: upload photos of the person first")
        if self.missing_arcface():
            raise WeightsNotFoundError(self.missing_arcface())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", face.IdentityMismatchWarning)  # the face check has shown it already
            identity = face.combine([self.identity_of(*self.store_photo(u)) for u in uploads])
        path = self.out_dir / IDENTITY_DIR / f"{name}.identity"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise InputError(f"an identity named {name!r} exists already; choose another name") from None
        try:
            identity.save(path)
        except BaseException:
            path.unlink()  # the claimed, still empty name
            raise
        return name

    # ----- generation ----------------------------------------------------------------------------------
    def prepare(self, uploads, person: str, prompt: str, values: dict) -> Run:
        """Check a request against the model state, the settings (`GenerationSettings`' checks; those not in
        `values` take the variant's defaults) and the photos' faces; the returned Run is ready to start."""
        if self.model_state == "error":
            raise CheckpointError(self.model_error)
        if self.missing():
            raise WeightsNotFoundError(self.missing())
        if not (prompt or "").strip():
            raise InputError("the prompt is empty: describe what the person should do")
        defaults = setting_defaults(self.variant, self.config.speed)
        values = {**defaults, **values}
        knobs, fmt = {}, PAGE_SETTINGS["format"]
        for setting in SETTINGS:
            key, value, kind = setting.key, values[setting.key], setting.kind
            if kind == "choice":
                if value not in setting.choices:
                    raise InputError(f"{key} must be one of {', '.join(map(str, setting.choices))}, not {value!r}")
                fmt = value
                continue
            if kind == "text":
                value = (value or "").strip() or None if isinstance(value, str) or value is None else value
            elif kind == "float?" and value is None:
                value = TWO_WAY  # the empty identity guidance field
            elif kind in ("int", "float") and value is None:
                raise InputError(f"{key} needs a value (default {defaults[key]})")
            knobs[key] = value
        settings = GenerationSettings(**knobs).resolve(self.variant)  # the CLI's checks, limits and messages
        if self.pipe is not None:  # the Ref blocks against this transformer, before the run is queued
            from ...pipelines.speed import parse_blocks

            parse_blocks(settings.ref_blocks, len(self.pipe.transformer.blocks))
        if person:
            identity_file = self.out_dir / IDENTITY_DIR / f"{person}.identity"
            if person not in self.identity_names():
                raise InputError(f"no saved identity named {person!r}; save one from photos first")
            return Run(prompt.strip(), settings, fmt, [], identity_file)
        if not uploads:
            raise InputError("no photo: upload a photo of the person, or pick a saved identity")
        if len(uploads) > MAX_PHOTOS:
            raise InputError(f"at most {MAX_PHOTOS} photos of one person, got {len(uploads)}")
        stored = [self.store_photo(u) for u in uploads]
        for path, shown in stored:  # a photo the face check refused is refused here too, before the queue
            self.identity_of(path, shown)
        return Run(prompt.strip(), settings, fmt, [path for path, _ in stored], None)

    def claim_output(self, run: Run) -> Path:
        """`<person>-<prompt>-s<seed>.<fmt>` in the output directory, made unique (-2, -3, ...) and claimed at
        once with an empty file: an existing video, from here or the CLI, is never replaced. A claimed name is
        given back when the run ends without a video, and by `shutdown` when the server stops."""
        who = slug(run.identity_file.stem, 24) if run.identity_file else "person"
        stem = f"{who}-{slug(run.prompt)}-s{run.settings.seed}"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            path = self.out_dir / f"{stem}{'' if n == 1 else f'-{n}'}{run.format}"
            if sidecar_path(path).exists():
                continue
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                continue
            self.claimed.add(path)
            return path
        raise InputError(f"no free file name for {stem} in {self.out_dir}")

    def release(self, path: Path | None) -> None:
        """Give back a claimed name: the empty file goes (a written video is never touched)."""
        if path is None or path not in self.claimed:
            return
        self.claimed.discard(path)
        try:
            if path.stat().st_size == 0 and not sidecar_path(path).exists():
                path.unlink()
        except FileNotFoundError:
            pass

    def cancel_runs(self) -> None:
        """Ask every run under way to stop after its current denoising step (safe in a signal handler)."""
        for run in list(self.running):
            run.stop.set()

    def shutdown(self, timeout: float = 300.0) -> None:
        """The server is stopping (SIGTERM, Ctrl+C): cancel the runs under way, wait until each has stopped after
        its current denoising step (a thread killed inside a kernel at exit aborts the process), then give back
        every claimed name."""
        self.cancel_runs()
        for run in list(self.running):
            run.done.wait(timeout)
        for path in list(self.claimed):
            self.release(path)

    def run(self, run: Run) -> None:
        """Make the video of a prepared Run (in a thread of its own); ends with run.done set."""
        from ... import face
        from ...io.safety import unchecked
        from ...pipelines.record import make_record, write_video
        from ...pipelines.windows import ContextWindows

        self.running.append(run)
        try:
            with self.gpu:
                run.phase = "waiting for the model to load"
                self.loaded.wait()
                if self.pipe is None:
                    raise CheckpointError(self.model_error or "the model is not loaded")
                run.phase = "analysing the face"
                if run.identity_file:
                    identity = face.FaceIdentity.load(run.identity_file)
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", face.IdentityMismatchWarning)  # shown by the face check
                        identity = face.combine([self.identity_of(p, p.name) for p in run.photos])
                if run.stop.is_set():
                    raise Cancelled
                run.out = self.claim_output(run)
                run.phase = "encoding the prompt and the face"
                result = self.pipe(run.prompt, identity=identity, **run.settings.model_dump(), output_type="np",
                                   sigmas=speed_sigmas(self.config.speed, run.settings.num_inference_steps),
                                   callback_on_step_end=lambda *a: self._step(run))
                frames = result.frames[0]
                run.phase = "safety check"
                gate = self.safety_gate()  # a refusal (UnsafeVideoError) ends the run before anything is written
                safety = gate.check(frames) if gate else \
                    unchecked("no classifier" if self.config.safety_check else "switched off")
                run.phase = "writing the video"
                settings = result.settings
                windows = ContextWindows(frames=settings.context_frames, overlap=settings.context_overlap,
                                         blend=settings.context_blend).video_windows(settings.num_frames)
                record = make_record(
                    run.out, run.prompt, settings, variant=self.variant, base=self.config.base,
                    adapter=self.config.adapter, dtype=self.pipe.transformer.dtype, device=self.pipe._execution_device,
                    source="lynx serve", safety=safety, photos=run.photos, identity_file=run.identity_file,
                    seconds=time.time() - run.started, faces=identity.faces_used(),
                    speed=speed_record(self.config.speed, self.config.loras, self.config.compile),
                    experts=self.pipe.experts if self.pipe.transformer_2 is not None else None,
                    context_windows=windows, command_extra=self.command_flags())
                write_video(frames, run.out, record)  # the video and its sidecar, or neither
                run.record = record.model_dump(mode="json")
                print(f"lynx serve: wrote {run.out}", file=sys.stderr, flush=True)
        except Cancelled:
            run.error = "cancelled"
            if self.pipe is not None:
                self.pipe.maybe_free_model_hooks()  # what the pipeline does after a finished call (offloading)
        except LynxError as e:
            run.error = str(e)
        except Exception as e:  # the traceback stays in the terminal, the page gets a sentence
            traceback.print_exc()
            run.error = f"internal error ({type(e).__name__}: {e}); the server's terminal has the details"
        finally:
            self.release(run.out)  # the claimed name, never filled
            self.running.remove(run)
            run.done.set()

    def _step(self, run: Run) -> dict:
        run.step += 1
        run.first_step = run.first_step or time.time()
        run.phase = "denoising" if run.step < run.total else "decoding the video"
        self.on_step(run)
        if run.stop.is_set():
            raise Cancelled
        return {}

    def command_flags(self) -> list[str]:
        """What the equivalent `lynx generate` line adds to the settings: the model and speed options serve was
        given."""
        flags = list(self.config.model_flags) + speed_flags(self.config.speed, self.config.loras, self.config.compile)
        if self.config.face_models and "--face-models" not in flags:
            flags += ["--face-models", str(Path(self.config.face_models).resolve())]
        if self.config.detector != "auto" and "--detector" not in flags:
            flags += ["--detector", self.config.detector]
        return flags

    # ----- the output directory ------------------------------------------------------------------------
    def videos(self, limit: int = 100) -> list[Path]:
        """Videos in the output directory with a valid generation record (this server's and the CLI's), newest
        first; a sidecar that is not one is skipped with a warning in the terminal (`read_record`)."""
        if not self.out_dir.is_dir():
            return []
        found = [p for p in self.out_dir.iterdir() if p.suffix in VIDEO_FORMATS and p.is_file()
                 and p.stat().st_size > 0 and sidecar_path(p).is_file()]
        found.sort(key=lambda p: -p.stat().st_mtime)
        return [p for p in found if read_record(p) is not None][:limit]

    def show(self, name: str):
        """The result panel for a video of the output directory, by its file name."""
        path = next((p for p in self.videos(10_000) if p.name == name), None)
        record = read_record(path) if path is not None else None
        if record is None:
            raise InputError(f"no video named {name!r} with a sidecar in the output directory")
        is_mp4 = path.suffix == ".mp4"
        about = (f"**{path.name}**: {record.width}x{record.height}, {record.num_frames} frames at {record.fps} fps, "
                 f"seed {record.seed}, {record.num_inference_steps} steps, made in "
                 f"{format_seconds(record.seconds or 0)}\n\n> {record.prompt}")
        return (gr.update(value=str(path) if is_mp4 else None, visible=is_mp4),
                gr.update(value=None if is_mp4 else str(path), visible=not is_mp4),
                about, json.dumps(record.model_dump(mode="json"), indent=2), record.command,
                gr.update(value=str(path), visible=True))


def _errors_as_messages(fn):
    """An event handler whose LynxErrors reach the page's error box (and API clients) with the CLI's message."""
    if inspect.isgeneratorfunction(fn):
        def wrapped(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except LynxError as e:
                raise gr.Error(str(e), print_exception=False) from None
    else:
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except LynxError as e:
                raise gr.Error(str(e), print_exception=False) from None
    # Gradio reads parameter names (the API's) and a gr.Progress default from the signature.
    wrapped.__signature__, wrapped.__name__ = inspect.signature(fn), fn.__name__
    return wrapped


def build_page(app: LynxWebApp) -> gr.Blocks:
    """The page: photos and face check, prompt and settings, generate/cancel with progress, result, gallery."""
    identities = lambda value=None: gr.update(  # noqa: E731
        choices=[("the photos above", FROM_PHOTOS)] + [(n, n) for n in app.identity_names()],
        **({} if value is None else {"value": value}))
    with gr.Blocks(title="Lynx", analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as page:
        gr.Markdown("# Lynx: a video of a person from a photo and a prompt")
        status = gr.Markdown()
        missing = gr.Markdown(visible=False)
        with gr.Row():
            with gr.Column():
                # No file_types: Gradio would refuse a photo by its name's extension (a JPEG saved as "photo", or
                # ".jfif") in words of its own; `check_upload` and `find_face` decide by the content.
                photos = gr.File(label=f"Photos of one person (up to {MAX_PHOTOS})", file_count="multiple",
                                 elem_id="photos")
                faces = gr.Gallery(label="Faces found (green: the one used) and the crops the model sees",
                                   columns=4, height=260, format="png", elem_id="faces")
                face_report = gr.Markdown(elem_id="face-report")
                # Custom values: API clients name identities saved after the page was built (checked here).
                person = gr.Dropdown(label="Person: the photos above, or a saved identity", value=FROM_PHOTOS,
                                     allow_custom_value=True, choices=[("the photos above", FROM_PHOTOS)],
                                     elem_id="person")
                with gr.Accordion("Save the photos as an identity", open=False):
                    with gr.Row():
                        identity_name = gr.Textbox(show_label=False, placeholder="name", scale=3)
                        save = gr.Button("Save identity", scale=1)
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                    placeholder="A person carves a pumpkin on a porch in the evening.")
                with gr.Accordion("Settings", open=False):
                    form = settings_form(app.variant, app.config.speed)
                    fields = list(form.values())
                    for row in [fields[:1]] + [fields[i:i + 3] for i in range(1, len(fields), 3)]:
                        with gr.Row():
                            for f in row:
                                f.render()
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column():
                progress_text = gr.Markdown(elem_id="progress")
                video = gr.Video(label="Video", autoplay=True, loop=True, interactive=False, elem_id="result-video")
                image = gr.Image(label="Video", visible=False, type="filepath", interactive=False)
                about = gr.Markdown(elem_id="result-settings")
                download = gr.DownloadButton("Download", visible=False, elem_id="download")
                command = gr.Code(label="The same video from a terminal", language="shell", interactive=False,
                                  wrap_lines=True)
                with gr.Accordion("Sidecar: settings, models, versions", open=False):
                    # Code, not gr.JSON: that would take the sidecar's {"path": ...} photos for files to serve.
                    sidecar = gr.Code(show_label=False, language="json", interactive=False)
        with gr.Accordion("Videos in the output directory"):
            with gr.Row():
                shown = gr.Dropdown(label="Show", choices=[], value=None, allow_custom_value=True, scale=4)
                refresh = gr.Button("Refresh", size="sm", scale=1)
            gallery = gr.Gallery(show_label=False, columns=6, height=320, allow_preview=False, elem_id="gallery")
            listed = gr.State([])  # the gallery's names, in its order
        result = [video, image, about, sidecar, command, download]

        def page_status():
            text = app.missing()
            return (app.status(), gr.update(value=f"### What to download, and where\n```\n{text}\n```",
                                             visible=bool(text)), identities())

        def check_faces(photos):
            return app.check_faces(photos)

        def save_identity(photos, name):
            name = app.save_identity(photos, name)
            return identities(name), f"Saved as `{IDENTITY_DIR}/{name}.identity`: pick it under Person next time."

        def gallery_items():
            names = [p.name for p in app.videos()]
            return [(str(app.out_dir / n), n) for n in names], names, gr.update(choices=names)

        def pick(names, evt: gr.SelectData):
            return names[evt.index]

        def show(name):
            return app.show(name) if name else [gr.skip()] * len(result)

        keys = list(form)

        def run(photos, person, prompt, *values, progress=gr.Progress()):
            job = app.prepare(photos, person, prompt, dict(zip(keys, values)))
            threading.Thread(target=app.run, args=(job,), name="lynx-generate", daemon=True).start()
            try:
                while not job.done.wait(0.2):
                    progress((job.step, job.total) if job.phase == "denoising" else None, desc=job.message(),
                             unit="steps")
                    yield {progress_text: job.message()}
            finally:
                job.stop.set()  # a cancel closes this generator here; the thread stops after its current step
            if job.error:
                raise InputError(job.error)
            yield dict(zip([progress_text, *result],
                           [f"done in {format_seconds(time.time() - job.started)}", *app.show(job.out.name)]))

        # The API's parameters are named after the settings (num_frames=...), not param_3.
        run.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("photos", "person", "prompt",
                                                                                     *keys)]
            + [inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=gr.Progress())])

        page.load(page_status, None, [status, missing, person], api_name="status")
        page.load(gallery_items, None, [gallery, listed, shown], api_visibility="private")
        photos.change(_errors_as_messages(check_faces), photos, [faces, face_report], api_name="check_faces")
        save.click(_errors_as_messages(save_identity), [photos, identity_name], [person, face_report],
                   api_name="save_identity")
        event = generate.click(_errors_as_messages(run), [photos, person, prompt, *fields], [progress_text, *result],
                               api_name="generate", concurrency_limit=1, concurrency_id="gpu",
                               show_progress_on=[video])
        cancel.click(None, None, None, cancels=[event])
        event.then(gallery_items, None, [gallery, listed, shown], api_visibility="private")
        refresh.click(gallery_items, None, [gallery, listed, shown], api_name="gallery")
        gallery.select(pick, listed, shown, api_visibility="private")
        shown.change(_errors_as_messages(show), shown, result, api_name="show")
    return page
