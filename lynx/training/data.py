"""Training data: the manifest format, `prepare` (manifest -> tensor cache), reading the cache, and packing.

Manifest: a JSONL file (one object per line) or a CSV file with a header, fields
  path       image or video file, relative to the manifest's folder (required)
  caption    text (required)
  id         unique sample name (optional; default: a hash of path and caption)
  reference  another photo of the same person for the reference crop (optional; images only)
Cache (`cache_dir`): `samples/<id>.safetensors` per sample (normalised VAE posterior mean/std of the clip and of
the reference crop, trimmed caption embedding, face embedding, the crop itself), `shared.safetensors` (null
caption, reference prompt, negative and validation prompts, the no-reference latents), `index.jsonl` (what
training reads), `skipped.jsonl` (every sample left out, with the reason) and `prepare.json`.
A sample is written atomically and only once: an interrupted prepare resumes where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..constants import MAX_TEXT_TOKENS, REFERENCE_PROMPT
from ..errors import CheckpointError, InputError, LynxError, NoFaceError, option
from ..io.files import atomic_write
from ..io.video import VideoInfo
from ..models.loading import read_safetensors
from ..pipelines.reference import encode_posterior, reference_pixels
from ..runtime import DTYPES, face_models_dir
from .config import INDEX_FILE, DataConfig, TrainingConfig, ValidationConfig, check_files

log = logging.getLogger("lynx.training")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif", ".m4v")
REFERENCE_SIZE = 256
SAMPLES_DIR, SKIPPED_FILE, SHARED_FILE, PREPARE_FILE = "samples", "skipped.jsonl", "shared.safetensors", "prepare.json"
CACHE_FORMAT = 1

# Why a sample was left out; the keys appear in skipped.jsonl and in the prepare summary.
SKIP_REASONS = {
    "bad_entry": "manifest entry lacks a path or a caption, has a value that is not text, or is not valid JSON/CSV",
    "duplicate": "another entry has the same id",
    "unreadable": "the file is missing or cannot be decoded",
    "no_face": "no usable face found",
    "too_short": "the video has fewer frames than the shortest allowed clip",
    "too_small": "the picture is smaller than its resolution bucket allows",
}

IdentityFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# ----- manifest ---------------------------------------------------------------------------------------------------
@dataclass
class ManifestEntry:
    key: str
    path: Path
    caption: str
    reference: Path | None = None
    line: int = 0


def _key(raw_id, path: str, caption: str) -> str:
    if raw_id not in (None, ""):
        key = re.sub(r"[^A-Za-z0-9._-]+", "_", str(raw_id)).strip("._")
        if key:
            return key
    return hashlib.sha1(f"{path}\0{caption}".encode()).hexdigest()[:16]


def _entry_problem(row: dict | None) -> str | None:
    """Why a manifest row cannot be a sample (None: it can); a value of the wrong type is named, not cast."""
    if row is None:
        return "not a JSON object"
    for name in ("path", "caption", "reference", "id"):
        value = row.get(name)
        if name in ("path", "caption") and (value is None or isinstance(value, str) and not value.strip()):
            return f"no {name}"
        if value is not None and not isinstance(value, str) and not (name == "id" and type(value) is int):
            return f"{name} is {json.dumps(value)[:40]}, not text"
    return None


def read_manifest(path) -> tuple[list[ManifestEntry], list[dict]]:
    """Entries of a JSONL/CSV manifest in file order, and a skip record for every unusable line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist (a JSONL or CSV file with path and caption per sample)")
    rows: list[tuple[int, dict | None]] = []
    try:
        # utf-8-sig: spreadsheet programs start their CSV (and some editors their text) with a byte-order mark.
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or "path" not in reader.fieldnames or "caption" not in reader.fieldnames:
                    raise InputError(f"{path}: a CSV manifest needs a header with at least 'path' and 'caption'")
                rows = [(i + 2, dict(r)) for i, r in enumerate(reader)]
        else:
            for i, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    rows.append((i, obj if isinstance(obj, dict) else None))
                except json.JSONDecodeError:
                    rows.append((i, None))
    except UnicodeDecodeError as e:
        raise InputError(f"manifest {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    entries, skipped, seen = [], [], set()
    for line, row in rows:
        problem = _entry_problem(row)
        if problem:
            skipped.append({"key": f"line-{line}", "source": str(path), "reason": "bad_entry",
                            "detail": f"line {line}: {problem}"})
            continue
        key = _key(row.get("id"), row["path"], row["caption"])
        if key in seen:
            skipped.append({"key": key, "source": row["path"], "reason": "duplicate", "detail": f"line {line}"})
            continue
        seen.add(key)
        ref = row.get("reference")
        entries.append(ManifestEntry(key, path.parent / row["path"], str(row["caption"]).strip(),
                                     path.parent / ref if ref else None, line))
    return entries, skipped


# ----- frames and sizes -------------------------------------------------------------------------------------------
class SkipSample(LynxError):
    """A sample cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _check_suffix(path: Path) -> str:
    if not path.is_file():
        raise SkipSample("unreadable", f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
        raise SkipSample("unreadable", f"{path}: unknown file type {suffix!r} (images: {', '.join(IMAGE_SUFFIXES)}; "
                                       f"videos: {', '.join(VIDEO_SUFFIXES)})")
    return suffix


def load_image(path: Path) -> np.ndarray:
    """uint8 [1, H, W, 3] RGB: an image as a one-frame video."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))[None]
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise SkipSample("unreadable", f"{path}: {e}") from None


@dataclass
class VideoPlan:
    """Which source frames a video sample keeps, decided from its headers before any frame is decoded."""

    info: VideoInfo
    stride: int  # source frames per kept frame (to about data.fps)
    available: int  # frames after subsampling

    def source_index(self, i: int) -> int:
        return i * self.stride


def plan_video(path: Path, fps: float) -> VideoPlan:
    from ..io.video import probe_video

    try:
        info = probe_video(path)
    except (InputError, OSError) as e:
        raise SkipSample("unreadable", str(e)) from None
    stride = max(1, round(info.fps / fps)) if info.fps else 1
    return VideoPlan(info, stride, -(-info.frames // stride))


def load_frames(path: Path, fps: float, limit: int | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3] RGB frames: an image as one frame, a video subsampled to about `fps` (its first
    `limit` kept frames; only those are decoded)."""
    if _check_suffix(path) in IMAGE_SUFFIXES:
        return load_image(path)
    from ..io.video import iter_frames

    plan = plan_video(path, fps)
    count = plan.available if limit is None else min(limit, plan.available)
    try:
        frames = [f for _, f in iter_frames(path, [plan.source_index(i) for i in range(count)])]
    except (InputError, OSError) as e:
        raise SkipSample("unreadable", str(e)) from None
    if not frames:
        raise SkipSample("unreadable", f"{path} holds no video frames")
    return np.stack(frames)


def choose_bucket(height: int, width: int, buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the picture's (in log scale, so 2:1 and 1:2 are equally far)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - aspect), -b[0] * b[1]))


def choose_clip_length(available: int, allowed) -> int | None:
    """The longest allowed clip length that fits in `available` frames; None when none does."""
    fitting = [n for n in allowed if n <= available]
    return max(fitting) if fitting else None


def choose_reference_frame(total: int, clip_start: int, clip_length: int) -> tuple[int, bool]:
    """Index of the frame the reference crop comes from, and whether it lies inside the target clip.

    A frame outside the clip is preferred so the model cannot copy the reference's pixels into the target; the
    middle of the longer stretch outside the clip is taken (far enough to differ, near enough to be the same
    scene). Inside the clip (a one-frame image, or a video no longer than the clip) the middle frame is used.
    """
    before, after = clip_start, total - (clip_start + clip_length)
    if after <= 0 and before <= 0:
        return clip_start + clip_length // 2, True
    if after >= before:
        return clip_start + clip_length + after // 2, False
    return before // 2, False


def bucket_scale(height: int, width: int, bucket: tuple[int, int], max_upscale: float) -> float:
    """How much a picture is enlarged (or shrunk) to cover `bucket`; too_small past `max_upscale`."""
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    if scale > max_upscale + 1e-9:
        raise SkipSample("too_small", f"{width}x{height} would need {scale:.2f}x enlargement for the {bw}x{bh} "
                                      f"bucket (data.max_upscale = {max_upscale})")
    return scale


def fit_to_bucket(frames: np.ndarray, bucket: tuple[int, int], max_upscale: float) -> np.ndarray:
    """Resize (covering the bucket, aspect kept) and centre-crop frames to exactly `bucket` = (height, width)."""
    from PIL import Image

    h, w = frames.shape[1:3]
    bh, bw = bucket
    scale = bucket_scale(h, w, bucket, max_upscale)
    nh, nw = max(bh, round(h * scale)), max(bw, round(w * scale))
    top, left = (nh - bh) // 2, (nw - bw) // 2
    out = np.empty((len(frames), bh, bw, 3), np.uint8)
    for i, f in enumerate(frames):
        im = Image.fromarray(f)
        if (nh, nw) != (h, w):
            im = im.resize((nw, nh), Image.Resampling.LANCZOS)
        out[i] = np.asarray(im)[top:top + bh, left:left + bw]
    return out


# ----- identity ---------------------------------------------------------------------------------------------------
def face_identity_fn(detector: str = "auto", models_dir=None, device: str = "cpu",
                     face_analyzer=None) -> IdentityFn:
    """The project's face analysis as prepare's identity step: frame -> (ArcFace embedding, 256x256 crop).

    The largest face of each frame is used, as the authors' insightface call did (face_index=0, no warning).
    """
    from ..face import FaceAnalyzer

    # The models are loaded now, so missing weights are reported before any encoder is loaded.
    analyzer = face_analyzer or FaceAnalyzer(detector, models_dir=face_models_dir() if models_dir is None
                                             else Path(models_dir), device=device)

    def identify(frame: np.ndarray):
        ident = analyzer.analyze(frame, face_index=0)
        return ident.embedding, ident.reference_crop

    return identify


def _check_identity(embedding, crop) -> tuple[torch.Tensor, torch.Tensor]:
    emb = torch.as_tensor(np.asarray(embedding, np.float32)).reshape(-1)
    crop = np.asarray(crop)
    if emb.numel() != 512 or not torch.isfinite(emb).all():
        raise InputError(f"the identity step returned an embedding of {emb.numel()} values; expected 512 finite")
    if crop.shape != (REFERENCE_SIZE, REFERENCE_SIZE, 3) or crop.dtype != np.uint8:
        raise InputError(f"the identity step returned a crop of shape {crop.shape} {crop.dtype}; expected "
                         f"({REFERENCE_SIZE}, {REFERENCE_SIZE}, 3) uint8")
    return emb, torch.from_numpy(crop.copy())


# ----- the encoders -----------------------------------------------------------------------------------------------
class Encoders:
    """Text encoder + VAE of the base, loaded once for prepare (the transformer is not needed).

    Captions go through diffusers' own Wan text encoding (`WanPipeline.encode_prompt`), pixels through the VAE
    and Wan's latent normalisation as the pipeline applies them (`lynx.pipelines.reference`)."""

    def __init__(self, base, device: str | None = None, dtype: str = "bf16"):
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
        from transformers import AutoTokenizer, UMT5EncoderModel

        from ..models.loading import require_base_dir

        base = require_base_dir(base)  # names what is missing and what to download
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = DTYPES[dtype]
        tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer")
        text_encoder = UMT5EncoderModel.from_pretrained(base / "text_encoder", torch_dtype=self.dtype)
        vae = AutoencoderKLWan.from_pretrained(base / "vae", torch_dtype=self.dtype)
        scheduler = UniPCMultistepScheduler.from_pretrained(base / "scheduler")
        self.pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval().requires_grad_(False),
                                vae=vae.eval().requires_grad_(False), scheduler=scheduler, transformer=None)
        self.pipe.to(self.device)
        # Captions and reference photos recur (one 'reference' photo per person, stock captions); encode once.
        self._memo: dict = {}
        self.memo_size = 4096

    def _remember(self, key, make):
        if key not in self._memo:
            if len(self._memo) >= self.memo_size:
                self._memo.pop(next(iter(self._memo)))
            self._memo[key] = make()
        return self._memo[key]

    def text(self, caption: str) -> tuple[torch.Tensor, bool]:
        """[L, text_dim] embedding of the caption's real tokens, and whether it was truncated."""
        return self._remember(("text", caption), lambda: self._text(caption))

    def reference(self, crop: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents of a 256x256 reference crop."""
        key = ("crop", hashlib.sha1(np.ascontiguousarray(crop).tobytes()).hexdigest())
        return self._remember(key, lambda: self.encode_pixels(reference_pixels(crop)))

    @torch.no_grad()
    def _text(self, caption: str) -> tuple[torch.Tensor, bool]:
        tokens = len(self.pipe.tokenizer(caption, add_special_tokens=True).input_ids)
        emb = self.pipe.encode_prompt([caption], do_classifier_free_guidance=False,
                                      max_sequence_length=MAX_TEXT_TOKENS, device=self.device,
                                      dtype=torch.float32)[0][0]
        nonzero = emb.abs().sum(-1).nonzero()
        length = int(nonzero[-1]) + 1 if len(nonzero) else 1
        return emb[:length].cpu(), tokens > MAX_TEXT_TOKENS

    def latents(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [F, H, W, 3] -> normalised posterior mean and std, each [C, F', H/8, W/8]."""
        return self.encode_pixels(torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)

    def zero_reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents of the pipeline's 'no reference' input: an all-zero crop in [-1, 1] space."""
        return self.encode_pixels(reference_pixels(None))

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = encode_posterior(self.pipe.vae, pixels)
        return mean[0].cpu(), std[0].cpu()


# ----- prepare ----------------------------------------------------------------------------------------------------
@dataclass
class PrepareReport:
    prepared: int = 0  # newly written this run
    already: int = 0  # finished in an earlier run
    skipped: dict = field(default_factory=dict)  # reason -> count (this run and earlier ones)
    reference_from_target: int = 0
    truncated_captions: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.prepared + self.already

    def summary(self) -> str:
        lines = [f"prepared {self.total} samples ({self.prepared} new, {self.already} from earlier runs) "
                 f"in {self.seconds:.1f} s"]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"skipped {n}: {reason} ({SKIP_REASONS.get(reason, '')})")
        if self.reference_from_target:
            lines.append(f"{self.reference_from_target} samples have their reference crop from the target frames "
                         "(single images without a 'reference' photo, or videos no longer than the clip)")
        if self.truncated_captions:
            lines.append(f"{self.truncated_captions} captions were longer than {MAX_TEXT_TOKENS} tokens and truncated")
        return "\n".join(lines)


def _read_skipped(path: Path) -> dict[str, dict]:
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                out[rec["key"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by a kill; the sample is simply tried again
    return out


def prepare(config: TrainingConfig, identity_fn: IdentityFn | None = None, encoders: Encoders | None = None,
            limit: int | None = None, shard: tuple[int, int] = (0, 1), retry_skipped: bool = False,
            progress: bool = True) -> PrepareReport:
    """Build (or complete) the cache of `config.data` from its manifest; see the module docstring.

    `identity_fn(frame) -> (embedding [512], crop uint8 [256, 256, 3])` replaces face analysis (tests supply
    synthetic identities); it raises `NoFaceError` when there is no face. `shard=(i, n)` prepares every n-th
    entry starting at i, so n processes can share one manifest and one cache.
    """
    data, started = config.data, time.time()
    if limit is not None and limit < 1:
        raise InputError(f"{option('limit', limit)} must be at least 1 (leave it out to prepare every sample)")
    check_files(config, "prepare")  # before any encoder or face model loads
    entries, bad = read_manifest(data.manifest)  # a refused manifest leaves no cache folder behind
    storage = DTYPES[data.cache_dtype]
    cache = Path(data.cache_dir)
    (cache / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    _check_or_write_prepare_record(cache, config)
    skipped_log = cache / SKIPPED_FILE
    earlier_skips = {} if retry_skipped else _read_skipped(skipped_log)
    report = PrepareReport()
    for rec in bad:
        if rec["key"] not in earlier_skips:
            _log_skip(skipped_log, rec)
            earlier_skips[rec["key"]] = rec
    if encoders is None:
        encoders = Encoders(config.train.base, data.device, data.dtype)
    if identity_fn is None:
        identity_fn = face_identity_fn()
    _prepare_shared(cache, config, encoders, identity_fn, storage)

    mine = [e for i, e in enumerate(entries) if i % shard[1] == shard[0]]
    if limit is not None:
        mine = mine[:limit]
    from tqdm.auto import tqdm

    for entry in tqdm(mine, desc="prepare", unit="sample", disable=not progress):
        target = cache / SAMPLES_DIR / f"{entry.key}.safetensors"
        if target.is_file():
            report.already += 1
            continue
        if entry.key in earlier_skips:
            continue
        try:
            meta = _prepare_one(entry, data, encoders, identity_fn, storage, target)
        except SkipSample as e:
            rec = {"key": entry.key, "source": str(entry.path), "reason": e.reason, "detail": e.detail}
            _log_skip(skipped_log, rec)
            earlier_skips[entry.key] = rec
            log.info("skipped %s: %s", entry.key, e)
            continue
        report.prepared += 1
        report.reference_from_target += meta["reference_from_target"]
        report.truncated_captions += meta["caption_truncated"]
    for rec in earlier_skips.values():
        report.skipped[rec["reason"]] = report.skipped.get(rec["reason"], 0) + 1
    write_index(cache, entries)
    report.seconds = time.time() - started
    return report


def _log_skip(path: Path, record: dict) -> None:
    # One write per line, so a kill leaves at most one partial line, which readers ignore.
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _check_or_write_prepare_record(cache: Path, config: TrainingConfig) -> None:
    record = {"format": CACHE_FORMAT, "base": str(Path(config.train.base).resolve()) if config.train.base else "",
              "data": {k: v for k, v in config.data.model_dump(mode="json").items() if k not in ("device", "dtype")}}
    path = cache / PREPARE_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        sizing = ("buckets", "frames", "fps", "max_upscale", "cache_dtype", "manifest")
        changed = [k for k in sizing if json.dumps(old.get("data", {}).get(k)) != json.dumps(record["data"][k])]
        if old.get("format") != CACHE_FORMAT or changed:
            raise InputError(f"{cache} was prepared with other settings ({', '.join(changed) or 'format'}); "
                             "use a new data.cache_dir, or delete this one to start over")
        return
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))


def _prepare_one(entry: ManifestEntry, data: DataConfig, encoders: Encoders, identity_fn: IdentityFn,
                 storage: torch.dtype, target: Path) -> dict:
    # Sizes come from the headers, so a sample that is too short or too small is skipped before decoding.
    image = _check_suffix(entry.path) in IMAGE_SUFFIXES
    if image:
        frames = load_image(entry.path)
        total, height, width = 1, frames.shape[1], frames.shape[2]
    else:
        plan = plan_video(entry.path, data.fps)
        total, height, width = plan.available, plan.info.height, plan.info.width
    length = choose_clip_length(total, data.frames)
    if length is None:
        raise SkipSample("too_short", f"{total} frames at {data.fps:g} fps; the shortest clip is "
                                      f"{min(data.frames)} frames")
    bucket = choose_bucket(height, width, data.buckets)
    bucket_scale(height, width, bucket, data.max_upscale)
    ref_frame, ref_index, from_target = None, -1, False
    if entry.reference is not None:
        ref_frame = load_frames(entry.reference, data.fps, limit=1)[0]
    else:
        ref_index, from_target = choose_reference_frame(total, 0, length)
    if image:
        clip = fit_to_bucket(frames[:length], bucket, data.max_upscale)
        ref_frame = frames[ref_index] if ref_frame is None else ref_frame
    else:
        clip, decoded_ref = decode_clip(entry.path, plan, length, bucket, data.max_upscale,
                                        ref_index if ref_frame is None else None)
        ref_frame = decoded_ref if ref_frame is None else ref_frame
    try:
        embedding, crop = _check_identity(*identity_fn(ref_frame))
    except NoFaceError as e:
        raise SkipSample("no_face", str(e)) from None
    text, truncated = encoders.text(entry.caption)
    mean, std = encoders.latents(clip)
    ref_mean, ref_std = encoders.reference(crop.numpy())
    meta = {"key": entry.key, "source": str(entry.path), "caption": entry.caption, "height": bucket[0],
            "width": bucket[1], "frames": length, "latent_shape": list(mean.shape), "reference_frame": ref_index,
            "reference_from_target": from_target, "caption_truncated": truncated}
    tensors = {"latent_mean": mean.to(storage), "latent_std": std.to(storage), "text": text.to(storage),
               "embedding": embedding, "reference_crop": crop, "reference_mean": ref_mean.to(storage),
               "reference_std": ref_std.to(storage)}
    atomic_write(target, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                               metadata={"lynx_sample": json.dumps(meta)}))
    return meta


def decode_clip(path: Path, plan: VideoPlan, length: int, bucket: tuple[int, int], max_upscale: float,
                reference: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The first `length` kept frames, each fitted to `bucket` as soon as it is decoded, and kept frame
    `reference` at full size: memory holds the bucket-sized clip and one full-size frame, whatever the video."""
    from ..io.video import iter_frames

    wanted = {plan.source_index(i): i for i in range(length)}
    ref_source = None if reference is None else plan.source_index(reference)
    clip = np.empty((length, *bucket, 3), np.uint8)
    filled, ref_frame = 0, None
    try:
        for source, frame in iter_frames(path, [*wanted, *([] if ref_source is None else [ref_source])]):
            if source in wanted:
                clip[wanted[source]] = fit_to_bucket(frame[None], bucket, max_upscale)[0]
                filled += 1
            if source == ref_source:
                ref_frame = frame
    except (InputError, OSError) as e:
        raise SkipSample("unreadable", str(e)) from None
    if filled < length or (ref_source is not None and ref_frame is None):
        raise SkipSample("unreadable", f"{path}: decoding ended before frame {max(wanted)} of the "
                                       f"{plan.info.frames} its header announces")
    return clip, ref_frame


def _prepare_shared(cache: Path, config: TrainingConfig, encoders: Encoders, identity_fn: IdentityFn,
                    storage: torch.dtype) -> None:
    """Texts and latents every step or sample video needs; existing entries are kept, missing ones added."""
    path = cache / SHARED_FILE
    tensors, meta = (read_safetensors(path), _metadata(path)) if path.is_file() else ({}, {"prompts": {}})
    prompts = meta["prompts"]
    wanted = [config.data.null_prompt, REFERENCE_PROMPT, config.validation.negative_prompt,
              *config.validation.prompts]
    changed = False
    for prompt in wanted:
        if prompt not in prompts:
            key = f"text.{len(prompts)}"
            tensors[key] = encoders.text(prompt)[0].to(storage)
            prompts[prompt] = key
            changed = True
    if "null_reference_mean" not in tensors:
        mean, std = encoders.zero_reference()
        tensors["null_reference_mean"], tensors["null_reference_std"] = mean.to(storage), std.to(storage)
        changed = True
    ident = config.validation.identity
    if ident and meta.get("validation_identity") != ident:
        frames = load_frames(Path(ident), config.data.fps, limit=1)
        try:
            emb, crop = _check_identity(*identity_fn(frames[0]))
        except NoFaceError as e:
            raise InputError(f"validation.identity {ident}: {e}") from None
        tensors["validation_embedding"], tensors["validation_crop"] = emb, crop
        meta["validation_identity"] = ident
        changed = True
    if changed:
        meta["prompts"] = prompts
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                                 metadata={"lynx_shared": json.dumps(meta)}))


def _metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    for key in ("lynx_sample", "lynx_shared"):
        if key in md:
            return json.loads(md[key])
    raise CheckpointError(f"{path} is not a lynx cache file (no lynx metadata); prepare the cache again")


def write_index(cache: Path, entries: list[ManifestEntry]) -> int:
    """index.jsonl: one line per prepared sample, in manifest order; training reads only this."""
    lines = []
    for entry in entries:
        path = cache / SAMPLES_DIR / f"{entry.key}.safetensors"
        if path.is_file():
            meta = _metadata(path)
            lines.append(json.dumps({k: meta[k] for k in ("key", "latent_shape", "frames", "height", "width")}))
    atomic_write(cache / INDEX_FILE, lambda tmp: tmp.write_text("\n".join(lines) + ("\n" if lines else "")))
    return len(lines)


# ----- reading the cache ------------------------------------------------------------------------------------------
@dataclass
class CacheIndex:
    cache_dir: Path
    records: list[dict]

    @property
    def keys(self) -> list[str]:
        return [r["key"] for r in self.records]

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(r["latent_shape"]) for r in self.records]


def read_index(cache_dir) -> CacheIndex:
    cache = Path(cache_dir)
    path = cache / INDEX_FILE
    if not path.is_file():
        raise InputError(f"{cache} has no {INDEX_FILE}: run `lynx prepare --config ...` first (it resumes if it "
                         "was interrupted)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise InputError(f"{path} lists no samples: every manifest entry was skipped; see {cache / SKIPPED_FILE}")
    return CacheIndex(cache, records)


def load_sample(cache_dir, key: str) -> dict:
    path = Path(cache_dir) / SAMPLES_DIR / f"{key}.safetensors"
    if not path.is_file():
        raise InputError(f"{path} is listed in the index but missing; run `lynx prepare` again")
    return read_safetensors(path)


def load_shared(cache_dir, config: TrainingConfig) -> dict:
    """The shared tensors, with the prompts this config needs looked up by text."""
    path = Path(cache_dir) / SHARED_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing: run `lynx prepare --config ...` first")
    tensors, meta = read_safetensors(path), _metadata(path)
    prompts = meta["prompts"]

    def text(prompt: str, what: str) -> torch.Tensor:
        if prompt not in prompts:
            raise InputError(f"the {what} {prompt[:60]!r} is not in the cache; run `lynx prepare` with this config "
                             "again (it only encodes what is missing)")
        return tensors[prompts[prompt]]

    v: ValidationConfig = config.validation
    out = {"null_text": text(config.data.null_prompt, "null prompt"),
           "reference_text": text(REFERENCE_PROMPT, "reference prompt"),
           "null_reference_mean": tensors["null_reference_mean"], "null_reference_std": tensors["null_reference_std"],
           "prompt_lookup": {p: tensors[k] for p, k in prompts.items()}}
    if v.identity:
        if meta.get("validation_identity") != v.identity:
            raise InputError(f"validation.identity {v.identity} is not in the cache; run `lynx prepare` again")
        out["validation_embedding"] = tensors["validation_embedding"]
        out["validation_crop"] = tensors["validation_crop"]
    return out


# ----- packing ----------------------------------------------------------------------------------------------------
def plan_packs(tokens: list[int], budget: int, seed: int, epoch: int, open_packs: int = 8) -> list[list[int]]:
    """Group sample indices into packs of at most `budget` tokens, in a shuffled order that depends on the epoch.

    First fit over a few open packs: a sample goes into the first open pack it fits in; when more than
    `open_packs` are open the fullest is closed. Deterministic in (tokens, budget, seed, epoch), so every rank
    computes every rank's packs and nothing about the data order needs to be stored or communicated.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(tokens))
    done: list[list[int]] = []
    open_: list[tuple[int, list[int]]] = []  # (tokens used, members)
    for i in order.tolist():
        n = tokens[i]
        for j, (used, members) in enumerate(open_):
            if used + n <= budget:
                open_[j] = (used + n, members + [i])
                break
        else:
            open_.append((n, [i]))
            if len(open_) > open_packs:
                fullest = max(range(len(open_)), key=lambda j: open_[j][0])
                done.append(open_.pop(fullest)[1])
    done.extend(members for _, members in open_)
    return done


class PackStream:
    """The endless sequence of packs, epoch after epoch; pack g is the same on every rank and every restart."""

    def __init__(self, tokens: list[int], budget: int, seed: int):
        too_big = [i for i, n in enumerate(tokens) if n > budget]
        if len(too_big) == len(tokens):
            raise InputError(f"every sample has more tokens ({min(tokens)}+) than train.token_budget = {budget}; "
                             "raise the budget or use smaller buckets/clips")
        self.tokens, self.budget, self.seed = tokens, budget, seed
        self.excluded = too_big
        self._usable = [i for i, n in enumerate(tokens) if n <= budget]
        self._epochs: dict[int, list[list[int]]] = {}
        self._starts = [0]

    def _epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:
            sub = [self.tokens[i] for i in self._usable]
            self._epochs[e] = [[self._usable[j] for j in p] for p in plan_packs(sub, self.budget, self.seed, e)]
            if len(self._epochs) > 4:
                self._epochs.pop(min(self._epochs))
        return self._epochs[e]

    def locate(self, g: int) -> tuple[int, int]:
        """(epoch, position in epoch) of global pack g."""
        while len(self._starts) <= 1 or self._starts[-1] <= g:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self._epoch(e)))
        e = int(np.searchsorted(self._starts, g, side="right")) - 1
        return e, g - self._starts[e]

    def __getitem__(self, g: int) -> list[int]:
        e, i = self.locate(g)
        return self._epoch(e)[i]


class PackDataset(torch.utils.data.Dataset):
    """Item g: the cached tensors of every sample of pack g (read in DataLoader workers)."""

    def __init__(self, index: CacheIndex, stream: PackStream):
        self.index, self.stream = index, stream

    def __len__(self):  # the stream is endless; the sampler decides what is read
        return 2 ** 62

    def __getitem__(self, g: int):
        keys = [self.index.records[i]["key"] for i in self.stream[g]]
        return g, [load_sample(self.index.cache_dir, k) for k in keys]

