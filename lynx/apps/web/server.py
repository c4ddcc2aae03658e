"""The `lynx serve` web app: one pipeline loaded once, a face check, one generation at a time, a JSON API.

Endpoints (JSON unless said otherwise):

    GET  /                 the page (static/index.html)
    GET  /api/status       model state, what is missing and where to put it, defaults, the running job
    POST /api/face         multipart photo(s) -> faces found, 256x256 reference crops, photo ids
    POST /api/generate     {"photos": [ids], "prompt": ..., knobs} -> 202 {"job": ...}; 409 while busy
    GET  /api/jobs/ID      progress (step i of n), then the video and its sidecar, or the error
    GET  /api/videos       videos in --out-dir that have a sidecar, newest first
    GET  /files/NAME       a video or sidecar from --out-dir (byte ranges, so <video> can seek)

Every error a user can cause or fix is a `LynxError` whose message is sent as {"error": ...}, the same
text `lynx generate` prints; anything else is logged with its traceback here and reported as an
internal error without one.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import sys
import threading
import time
import traceback
import uuid
import warnings
from argparse import Namespace
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ...errors import CheckpointError, InputError, LynxError, SettingsError, WeightsNotFoundError
from ...io.video import VIDEO_FORMATS, sidecar_path
from ...pipelines.record import read_record
from ...pipelines.settings import GenerationSettings, parse_text
from ...pipelines.settings import flag as settings_flag
from ...runtime import DTYPES, device_and_dtype
from ..cli import load_pipeline, output_path, slug

# Photos are a few MB; the cap keeps a runaway upload from filling memory.
MAX_REQUEST_BYTES = 64 << 20
MAX_PHOTOS = 8
PHOTO_ID = re.compile(r"^[0-9a-f]{16}$")
CONTENT_TYPES = {".mp4": "video/mp4", ".webp": "image/webp", ".gif": "image/gif", ".json": "application/json",
                 ".html": "text/html; charset=utf-8"}
# The knobs a generate request may carry, named as the CLI's flags (`steps`, `guidance_i`): the fields of
# GenerationSettings except `allow_large` (a request stays within the limits). Anything else is refused.
KNOBS = {settings_flag(name)[2:].replace("-", "_"): name for name in GenerationSettings.model_fields
         if name != "allow_large"}
TEXT_KNOBS = ("prompt", "format")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def web_name(name: str) -> str:
    """How an error message names a setting in a request: its request key (`steps`, `guidance_i`)."""
    return next((key for key, field in KNOBS.items() if field == name), name)


class BusyError(LynxError):
    """Another video is being generated; the server makes one at a time."""


@dataclass
class ServeConfig:
    """What `lynx serve` was started with (the same meaning as `lynx generate`'s options)."""

    base: Path
    adapter: Path
    out_dir: Path = Path("outputs")
    dtype: str | None = None  # fp32 | bf16 | fp16; default bf16 on CUDA, fp32 on CPU
    device: str | None = None
    face_models: Path | None = None
    detector: str = "auto"
    attention_backend: str | None = None
    offload: bool = False
    vae_tiling: bool = False
    safety_check: bool = True  # the NSFW gate before a video is written (docs/safety.md)
    safety_model: Path | None = None

    def __post_init__(self):
        self.base, self.adapter, self.out_dir = Path(self.base), Path(self.adapter), Path(self.out_dir)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")


@dataclass
class Job:
    """One generation: its settings, where it is, and what came out."""

    id: str
    settings: dict
    photos: list[Path]
    total: int
    state: str = "running"  # running | done | error
    phase: str = "waiting for the model"
    step: int = 0
    error: str | None = None
    video: dict | None = None
    warnings: list[str] = field(default_factory=list)
    output: Path | None = None  # claimed (empty) until the video is written
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def to_json(self) -> dict:
        end = self.finished or time.time()
        return {"id": self.id, "state": self.state, "phase": self.phase, "step": self.step, "total": self.total,
                "message": self.message, "prompt": self.settings["prompt"], "error": self.error,
                "video": self.video, "warnings": self.warnings, "seconds": round(end - self.started, 1)}

    @property
    def message(self) -> str:
        if self.state == "done":
            return f"done in {(self.finished or time.time()) - self.started:.1f} s"
        if self.state == "error":
            return "failed"
        if self.phase == "denoising":
            return f"step {self.step} of {self.total}"
        return self.phase


def _png_data_url(rgb) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _safe_name(name: str) -> bool:
    return bool(name) and name == Path(name).name and not name.startswith(".") and "\\" not in name


class LynxWebApp:
    """The state behind the page. Thread-safe: the HTTP server calls it from one thread per request.

    `start()` checks the weights (as `lynx generate` does) and, when they are all there, loads the pipeline
    in the background so the page is usable at once. A `pipeline` passed in is used as is (tests, or a
    pipeline already in memory).
    """

    def __init__(self, config: ServeConfig, pipeline=None):
        self.config = config
        self.out_dir = config.out_dir
        self.photo_dir = config.out_dir / "photos"
        self.pipe = pipeline
        self.model_state = "ready" if pipeline is not None else "checking"
        self.model_error: str | None = None  # the message shown while the model cannot generate
        self.variant = pipeline.variant if pipeline is not None else \
            ("lite" if config.adapter.name.endswith("lite") else "full")
        self.device, self.dtype = device_and_dtype(config.device, config.dtype)
        if pipeline is not None:
            self.device, self.dtype = str(pipeline._execution_device), pipeline.transformer.dtype
        # Called with the job after every denoising step (the terminal already has the pipeline's progress bar);
        # a hook for embedding code, and where tests hold a job mid-run.
        self.on_step = lambda job: None
        self._lock = threading.Lock()  # guards the job table and the busy slot
        # dlib's detectors are shared objects not made for concurrent calls; one face analysis at a time.
        self._face_lock = threading.Lock()
        self._loaded = threading.Event()
        if pipeline is not None:
            self._loaded.set()
        self._jobs: dict[str, Job] = {}
        self._busy: Job | None = None
        self._identities: dict[str, object] = {}  # photo id -> FaceIdentity (with embedding)
        self._gate, self._gate_loaded = None, False

    # ----- model ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Check the weights now; load the pipeline in a background thread when nothing is missing."""
        if self.pipe is not None:
            return
        from ...models.loading import check_model_dirs

        try:
            adapter_cfg = check_model_dirs(self.config.base, self.config.adapter)
        except WeightsNotFoundError as e:
            self.model_state, self.model_error = "missing", str(e)
            self._loaded.set()
            return
        except LynxError as e:
            self.model_state, self.model_error = "error", str(e)
            self._loaded.set()
            return
        self.variant = adapter_cfg.variant
        self.model_state = "loading"
        threading.Thread(target=self._load, name="lynx-load", daemon=True).start()

    def _load(self) -> None:
        started = time.time()
        print(f"lynx serve: loading {self.config.base} + {self.config.adapter} ({self.variant}, "
              f"{str(self.dtype).removeprefix('torch.')}, {self.device})", file=sys.stderr, flush=True)
        try:
            c = self.config
            pipe = load_pipeline(c.base, c.adapter, device=self.device, dtype=self.dtype,
                                 attention_backend=c.attention_backend, offload=c.offload, vae_tiling=c.vae_tiling)
            self.pipe, self.model_state = pipe, "ready"
            print(f"lynx serve: model ready in {time.time() - started:.1f} s", file=sys.stderr, flush=True)
        except LynxError as e:
            self.model_state, self.model_error = "error", str(e)
        except Exception as e:  # an unexpected failure must still reach the page, not only the log
            traceback.print_exc()
            self.model_state = "error"
            self.model_error = f"the model could not be loaded ({type(e).__name__}: {e}); the server log has details"
        finally:
            self._loaded.set()

    def wait_until_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def _arcface_missing(self) -> str | None:
        from ...face import arcface_missing

        return arcface_missing(self.config.face_models)

    def missing(self) -> str | None:
        """Every missing download at once, as `lynx generate` lists them; None when nothing is missing."""
        parts = [m for m in ((self.model_error if self.model_state == "missing" else None),
                             self._arcface_missing()) if m]
        return "\n\n".join(parts) or None

    def status(self) -> dict:
        d = GenerationSettings().resolve(self.variant)
        with self._lock:
            job = self._busy.to_json() if self._busy else None
        return {
            "model": {"state": self.model_state, "error": self.model_error, "variant": self.variant,
                      "base": str(self.config.base), "adapter": str(self.config.adapter),
                      "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")},
            "missing": self.missing(),
            "face": {"detector": self.config.detector, "embedding": self._arcface_missing() is None},
            "defaults": {**{key: getattr(d, name) for key, name in KNOBS.items()}, "format": ".mp4"},
            "formats": list(VIDEO_FORMATS),
            "out_dir": str(self.out_dir),
            "job": job,
        }

    # ----- photos and the face check ------------------------------------------------------------------
    def store_photo(self, filename: str, data: bytes) -> tuple[str, Path]:
        """Keep an uploaded photo in <out-dir>/photos, named by its contents (so sidecars can point at it)."""
        from PIL import Image, UnidentifiedImageError

        from ...io.files import atomic_write

        shown = Path(filename or "photo").name
        if not data:
            raise InputError(f"{shown} is empty")
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = (im.format or "img").lower()
        except Image.DecompressionBombError as e:
            raise InputError(f"{shown} is too large to decode safely ({e})") from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise InputError(f"{shown} is not an image file Pillow can read (JPEG, PNG, WebP, ...)") from None
        photo_id = hashlib.sha256(data).hexdigest()[:16]
        existing = self.photo_path(photo_id, missing_ok=True)
        if existing is not None:
            return photo_id, existing
        ext = {"jpeg": ".jpg", "mpo": ".jpg"}.get(fmt, "." + fmt)
        path = self.photo_dir / f"{slug(Path(shown).stem, 24)}-{photo_id}{ext}"
        self.photo_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
        return photo_id, path

    def photo_path(self, photo_id: str, missing_ok: bool = False) -> Path | None:
        if not isinstance(photo_id, str) or not PHOTO_ID.match(photo_id):
            raise InputError(f"{photo_id!r} is not a photo id from /api/face")
        found = sorted(self.photo_dir.glob(f"*-{photo_id}.*")) if self.photo_dir.is_dir() else []
        if not found:
            if missing_ok:
                return None
            raise InputError(f"photo {photo_id} is not on the server (was --out-dir cleaned?); upload it again")
        return found[0]

    @staticmethod
    def _shown_name(path: Path) -> str:
        """The upload's own name back from the stored one (`<name>-<id><ext>`), for messages and file names."""
        return path.stem.rsplit("-", 1)[0] + path.suffix

    def check_faces(self, uploads: list[tuple[str, bytes]]) -> tuple[int, dict]:
        """Store and analyse photos. Returns (HTTP status, body): 200 when every photo has a usable face."""
        if not uploads:
            raise InputError("no photo in the request: send the photos as multipart/form-data field 'photo'")
        if len(uploads) > MAX_PHOTOS:
            raise InputError(f"at most {MAX_PHOTOS} photos of one person, got {len(uploads)}")
        stored = [self.store_photo(name, data) for name, data in uploads]
        arcface_missing = self._arcface_missing()
        results, identities = [], []
        for (name, _), (photo_id, path) in zip(uploads, stored):
            shown = Path(name or path.name).name
            try:
                with self._face_lock:
                    item, identity = self._analyze(photo_id, path, arcface_missing is None)
            except LynxError as e:
                # The face code names the stored file; the person knows the photo by its own name.
                results.append({"id": photo_id, "name": shown, "error": str(e).replace(str(path), shown)})
                continue
            item.update(id=photo_id, name=shown, error=None)
            results.append(item)
            if identity is not None:
                identities.append(identity)
        body = {"photos": results, "embedding": arcface_missing is None, "note": None, "similarity": None,
                "warnings": []}
        if arcface_missing:
            body["note"] = ("The face check works, but a video also needs the face embedding:\n" + arcface_missing)
        if len(identities) > 1:
            from ... import face

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                combined = face.combine(identities)
            body["similarity"] = combined.extra.get("min_pair_similarity")
            body["warnings"] = [str(w.message) for w in caught]
        failed = [r["error"] for r in results if r["error"]]
        if failed:
            body["error"] = "\n".join(failed)
            return 422, body
        return 200, body

    def _analyze(self, photo_id: str, path: Path, with_embedding: bool):
        from ... import face
        from ...face.detection import select_face

        cfg = self.config
        if with_embedding:
            identity = self._identities.get(photo_id) or face.analyze(path, detector=cfg.detector,
                                                                      models_dir=cfg.face_models)
            self._identities[photo_id] = identity
            w, h = identity.image_size
            return {"width": w, "height": h, "faces": identity.num_faces, "detector": identity.detector,
                    "score": float(identity.score), "box": [float(v) for v in identity.box],
                    "reference": _png_data_url(identity.reference_crop)}, identity
        # Detection and crops need no download: show them even before the ArcFace weights are there.
        det = face.create_detector(cfg.detector, cfg.face_models)
        image = face.load_image(path)
        faces = det.detect(image)
        chosen = select_face(faces, source=str(path))
        return {"width": image.shape[1], "height": image.shape[0], "faces": len(faces), "detector": det.name,
                "score": float(chosen.score), "box": [float(v) for v in chosen.box],
                "reference": _png_data_url(face.align_reference(image, chosen.keypoints))}, None

    # ----- generation -----------------------------------------------------------------------------------
    def parse_settings(self, body: dict) -> dict:
        """A generate request -> checked settings with the variant's defaults filled in (InputError if bad)."""
        if not isinstance(body, dict):
            raise InputError("the request body must be a JSON object")
        known = {"photos", *KNOBS, *TEXT_KNOBS}
        unknown = sorted(set(body) - known)
        if unknown:
            raise InputError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        knobs: dict = {}
        for key, name in KNOBS.items():
            value = body.get(key)
            if isinstance(value, str):  # a form sends text: "30" is the number 30
                value = parse_text(name, value.strip()) if value.strip() else None
            if value is None:
                continue  # the variant's default
            try:
                GenerationSettings(**{name: value})
            except SettingsError:
                if isinstance(value, str):  # text this knob cannot take at all; ranges are checked below, together
                    raise InputError(f"{key} must be a number, got {body[key]!r}") from None
            knobs[name] = value
        s: dict = {}
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty: describe what the person should do")
        s["prompt"] = prompt.strip()
        fmt = str(body.get("format") or ".mp4").lower()
        fmt = fmt if fmt.startswith(".") else "." + fmt
        if fmt not in VIDEO_FORMATS:
            raise InputError(f"format must be one of {', '.join(VIDEO_FORMATS)}, not {body.get('format')!r}")
        s["format"] = fmt
        photos = body.get("photos")
        if not photos or not isinstance(photos, list):
            raise InputError("no photo: upload a photo of the person first (POST /api/face), then pass its id "
                             "in \"photos\"")
        if len(photos) > MAX_PHOTOS:
            raise InputError(f"at most {MAX_PHOTOS} photos of one person, got {len(photos)}")
        s["photos"] = [str(p) for p in photos]
        # Filled-in values, exactly as `lynx generate` and the pipeline resolve them.
        s["generation"] = GenerationSettings(**knobs).resolve(self.variant)
        return s

    def generate(self, body: dict) -> Job:
        """Check a request and start it in the background; BusyError while another one runs."""
        if self.model_state == "error":
            raise CheckpointError(self.model_error)
        missing = self.missing()  # the model's and ArcFace's downloads together, as `lynx generate` lists them
        if missing:
            raise WeightsNotFoundError(missing)
        settings = self.parse_settings(body)
        photos = [self.photo_path(p) for p in settings["photos"]]
        with self._lock:
            if self._busy is not None:
                raise BusyError(f"busy: another video is being made ({self._busy.message}, prompt "
                                f"{self._busy.settings['prompt'][:60]!r}); one video at a time, try again when "
                                "it is done")
            job = Job(uuid.uuid4().hex[:12], settings, photos, total=settings["generation"].num_inference_steps)
            self._jobs[job.id] = job
            self._busy = job
        threading.Thread(target=self._run, args=(job,), name=f"lynx-job-{job.id}", daemon=True).start()
        return job

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def _identity(self, job: Job):
        from ... import face

        ids = job.settings["photos"]
        with self._face_lock:
            people = []
            for photo_id, path in zip(ids, job.photos):
                if photo_id not in self._identities:
                    self._identities[photo_id] = face.analyze(path, detector=self.config.detector,
                                                              models_dir=self.config.face_models)
                people.append(self._identities[photo_id])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            identity = face.combine(people)
        job.warnings += [str(w.message) for w in caught]
        return identity

    def _reserve_output(self, job: Job) -> Path:
        """The CLI's name for the video inside --out-dir, made unique (-2, -3, ...) and claimed at once."""
        s = job.settings
        # overwrite=True: uniqueness is handled here, an existing file gets a new name.
        args = Namespace(out=None, out_dir=str(self.out_dir), image=[self._shown_name(job.photos[0])],
                         identity=None, embedding=None, prompt=s["prompt"], seed=s["generation"].seed,
                         format=s["format"], overwrite=True)
        first = output_path(args)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            path = first if n == 1 else first.with_name(f"{first.stem}-{n}{first.suffix}")
            if sidecar_path(path).exists():
                continue
            try:
                # O_EXCL: a file another process (a CLI run) wrote meanwhile is never replaced.
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return path
            except FileExistsError:
                continue
        raise InputError(f"no free file name for {first} in {self.out_dir}")

    def _run(self, job: Job) -> None:
        out = None
        try:
            self._loaded.wait()
            if self.pipe is None:
                raise CheckpointError(self.model_error or "the model is not loaded")
            job.phase = "face analysis"
            identity = self._identity(job)
            out = job.output = self._reserve_output(job)
            record = self._make_video(job, identity, out)
            job.video = {"name": out.name, "url": "/files/" + out.name, "sidecar": record,
                         "kind": "video" if out.suffix == ".mp4" else "image"}
            job.state, job.phase = "done", "done"
            print(f"lynx serve: wrote {out}", file=sys.stderr, flush=True)
        except LynxError as e:
            job.state, job.error = "error", str(e)
        except Exception as e:  # keep the traceback in the terminal, give the page a sentence
            traceback.print_exc()
            job.state, job.error = "error", f"internal error ({type(e).__name__}: {e}); the server log has details"
        finally:
            if job.state != "done" and out is not None and out.exists() and out.stat().st_size == 0:
                out.unlink()  # the claimed, still empty name
            job.finished = time.time()
            with self._lock:
                self._busy = None

    def _safety_gate(self):
        """The NSFW gate, loaded with the first video (jobs run one at a time); None when off or absent."""
        if not self._gate_loaded and self.config.safety_check:
            from ...io.safety import load_safety_checker

            self._gate = load_safety_checker(self.config.safety_model, device=self.device,
                                             notify=lambda m: print(f"lynx serve: {m}", file=sys.stderr, flush=True))
        self._gate_loaded = True
        return self._gate

    def _make_video(self, job: Job, identity, out: Path) -> dict:
        from ...io.safety import unchecked
        from ...pipelines.record import make_record, write_video

        s, pipe, cfg = job.settings, self.pipe, self.config

        def on_step(_pipe, i, _t, _tensors):
            job.step = i + 1
            job.phase = "denoising" if job.step < job.total else "decoding"
            self.on_step(job)
            return {}

        job.phase = "preparing (text, identity, reference)"
        started = time.time()
        result = pipe(s["prompt"], identity=identity, **s["generation"].model_dump(), output_type="np",
                      callback_on_step_end=on_step)
        frames = result.frames[0]
        seconds = time.time() - started
        job.phase = "safety check"
        gate = self._safety_gate()  # a refusal (UnsafeVideoError) ends the job before anything is written
        safety = gate.check(frames) if gate else \
            unchecked("no classifier" if self.config.safety_check else "switched off")
        job.phase = "writing the video"
        # The same record as `lynx generate` writes, so eval/bench tools read web videos too.
        extra = (["--face-models", str(cfg.face_models)] if cfg.face_models else []) + \
            (["--detector", cfg.detector] if cfg.detector != "auto" else []) + \
            (["--no-safety-check"] if not cfg.safety_check else
             ["--safety-model", str(cfg.safety_model)] if cfg.safety_model else [])
        record = make_record(
            out, s["prompt"], result.settings, variant=self.variant, base=cfg.base, adapter=cfg.adapter,
            dtype=self.dtype, device=self.device, source="lynx serve", safety=safety, photos=job.photos,
            seconds=seconds, command_extra=extra)
        write_video(frames, out, record)
        return record.model_dump(mode="json")

    def close(self) -> None:
        """On shutdown: give back the name a running job claimed but never filled (its thread dies with us)."""
        with self._lock:
            job = self._busy
        out = job.output if job is not None else None
        if out is not None and out.is_file() and out.stat().st_size == 0:
            out.unlink()

    def videos(self, limit: int = 100) -> list[dict]:
        """Videos in --out-dir with a readable sidecar (this session's and earlier ones), newest first."""
        if not self.out_dir.is_dir():
            return []
        found = []
        for path in self.out_dir.iterdir():
            if path.suffix.lower() not in VIDEO_FORMATS or path.name.startswith(".") or not path.is_file():
                continue
            record = read_record(path)  # a missing or broken sidecar hides its video only (with a warning)
            if record is None or path.stat().st_size == 0:
                continue
            found.append((path.stat().st_mtime, {"name": path.name, "url": "/files/" + path.name,
                                                  "kind": "video" if path.suffix.lower() == ".mp4" else "image",
                                                  "sidecar": record.model_dump(mode="json")}))
        found.sort(key=lambda x: -x[0])
        return [item for _, item in found[:limit]]

    def file_path(self, name: str) -> Path | None:
        """A servable file directly inside --out-dir (videos and their sidecars only), else None."""
        if not _safe_name(name):
            return None
        suffix = name[:-5] if name.endswith(".json") else name
        if Path(suffix).suffix.lower() not in VIDEO_FORMATS:
            return None
        path = self.out_dir / name
        return path if path.is_file() and path.stat().st_size > 0 else None


# ----- HTTP ---------------------------------------------------------------------------------------------
def _status_for(error: LynxError) -> int:
    if isinstance(error, BusyError):
        return HTTPStatus.CONFLICT
    if isinstance(error, (WeightsNotFoundError, CheckpointError)):
        return HTTPStatus.SERVICE_UNAVAILABLE
    return HTTPStatus.BAD_REQUEST


class _Handler(BaseHTTPRequestHandler):
    server_version = "lynx-serve"
    protocol_version = "HTTP/1.1"  # keep-alive: the page polls, the video is fetched in ranges

    @property
    def app(self) -> LynxWebApp:
        return self.server.app

    # -- plumbing
    def log_message(self, format, *args):
        # Polling would flood the terminal; only changes and failures are worth a line.
        if self.command == "GET" and getattr(self, "_status_code", 200) < 400:
            return
        sys.stderr.write(f"lynx serve: {self.address_string()} {format % args}\n")

    def send_response(self, code, message=None):
        self._status_code = int(code)
        super().send_response(code, message)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.command == "POST":
            # A refused POST may leave its body unread; a fresh connection keeps the next request clean.
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, default=str).encode(), "application/json")

    def _error(self, status: int, message: str, **extra) -> None:
        self._json(status, {"error": message, **extra})

    def _host_ok(self) -> bool:
        """On a loopback address, only loopback Host names: another site cannot reach the server by DNS tricks."""
        if self.server.server_address[0] not in ("127.0.0.1", "::1"):
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        return host in LOOPBACK

    def _same_origin(self) -> bool:
        """Browsers send Origin on cross-site POSTs; a page elsewhere must not start generations here."""
        origin = self.headers.get("Origin")
        if origin is None:
            return True
        return urlsplit(origin).netloc == (self.headers.get("Host") or "")

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST_BYTES:
            raise InputError(f"request too large ({length >> 20} MB; at most {MAX_REQUEST_BYTES >> 20} MB)")
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self, method: str) -> None:
        try:
            if not self._host_ok():
                return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
            path = unquote(urlsplit(self.path).path)
            if method == "POST":
                if not self._same_origin():
                    return self._error(HTTPStatus.FORBIDDEN, "cross-origin request refused")
                return self._post(path)
            return self._get(path)
        except LynxError as e:
            self._error(_status_for(e), e.render(web_name, sep="="))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away (a seek in a video, a closed tab)
        except Exception as e:
            traceback.print_exc()
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR,
                        f"internal error ({type(e).__name__}: {e}); the server log has details")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    # -- routes
    def _get(self, path: str) -> None:
        app = self.app
        if path in ("/", "/index.html"):
            page = resources.files("lynx.apps.web").joinpath("static/index.html").read_bytes()
            return self._send(HTTPStatus.OK, page, CONTENT_TYPES[".html"])
        if path == "/api/status":
            return self._json(HTTPStatus.OK, app.status())
        if path == "/api/videos":
            return self._json(HTTPStatus.OK, {"videos": app.videos()})
        if path.startswith("/api/jobs/"):
            job = app.job(path.rsplit("/", 1)[1])
            if job is None:
                return self._error(HTTPStatus.NOT_FOUND, "no such job (jobs are forgotten when the server restarts)")
            return self._json(HTTPStatus.OK, job.to_json())
        if path.startswith("/files/"):
            file = app.file_path(path[len("/files/"):])
            if file is None:
                return self._error(HTTPStatus.NOT_FOUND, f"no video {path[len('/files/'):]!r} in the output directory")
            return self._file(file)
        return self._error(HTTPStatus.NOT_FOUND, f"no page {path}")

    def _file(self, file: Path) -> None:
        kind = CONTENT_TYPES[".json" if file.name.endswith(".json") else file.suffix.lower()]
        headers = {"Accept-Ranges": "bytes"}
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", (self.headers.get("Range") or "").strip())
            if not (m and (m.group(1) or m.group(2))):
                return self._send(HTTPStatus.OK, f.read(), kind, headers)
            if m.group(1):
                start, end = int(m.group(1)), int(m.group(2)) if m.group(2) else size - 1
            else:  # "bytes=-N": the last N bytes
                start, end = max(0, size - int(m.group(2))), size - 1
            if start >= size or start > end:
                return self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", kind,
                                  {"Content-Range": f"bytes */{size}"})
            end = min(end, size - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            f.seek(start)
            return self._send(HTTPStatus.PARTIAL_CONTENT, f.read(end + 1 - start), kind, headers)

    def _post(self, path: str) -> None:
        app = self.app
        if path == "/api/face":
            status, body = app.check_faces(self._uploads())
            return self._json(status, body)
        if path == "/api/generate":
            try:
                body = json.loads(self._body() or b"null")
            except ValueError as e:
                raise InputError(f"the request body is not JSON ({e})") from None
            try:
                job = app.generate(body)
            except BusyError as e:
                running = app.status()["job"]
                return self._error(HTTPStatus.CONFLICT, str(e), job=running)
            return self._json(HTTPStatus.ACCEPTED, {"job": job.to_json()})
        return self._error(HTTPStatus.NOT_FOUND, f"no endpoint {path}")

    def _uploads(self) -> list[tuple[str, bytes]]:
        ctype = self.headers.get("Content-Type") or ""
        if not ctype.lower().startswith("multipart/form-data"):
            raise InputError("send the photos as multipart/form-data, field 'photo' (curl -F photo=@me.jpg)")
        body = self._body()
        msg = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + ctype.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n" + body)
        if not msg.is_multipart():
            raise InputError("the multipart request could not be read (no parts found)")
        uploads = []
        for part in msg.iter_parts():
            if part.get_param("name", header="content-disposition") in ("photo", "photos", "image"):
                uploads.append((part.get_filename() or "photo", part.get_payload(decode=True) or b""))
        return uploads


class LynxHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the app; handler threads never block shutdown."""

    daemon_threads = True

    def __init__(self, address, app: LynxWebApp):
        self.app = app
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def make_server(app: LynxWebApp, host: str = "127.0.0.1", port: int = 0) -> LynxHTTPServer:
    """Bind (port 0: a free one); the caller runs `serve_forever()` and later `shutdown()`/`server_close()`."""
    import socket

    cls = LynxHTTPServer
    if ":" in host:
        cls = type("LynxHTTPServer6", (LynxHTTPServer,), {"address_family": socket.AF_INET6})
    try:
        return cls((host, port), app)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port "
                         "(0 picks a free one)") from None
