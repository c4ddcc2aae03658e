"""Identity fidelity of a video against reference photos: per-frame face similarity and its summary.

For each sampled frame the largest detected face is embedded by every recogniser and compared (cosine)
with the reference embedding of the same recogniser. Per video and recogniser this gives the mean and
minimum over frames where a face was found, and the identity drift: the slope of a straight line fitted
to similarity against normalised time (end minus start of the fit; negative = the face drifts away from
the reference). The share of sampled frames with a face is reported once per video, as detection is
shared by all recognisers. Frames without a face carry no similarity: they are never counted as 0.

Long clips (several context windows): the mean similarity per segment (each window, or fixed-length
segments) shows the drift over time window by window, and `seam_report` compares the frame-to-frame change
at the windows' edges with the change inside them.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import InputError, NoFaceError
from .recognizers import Recognizer, load_recognizers

log = logging.getLogger("lynx.evaluation")


def sample_indices(total: int, every: int = 1, max_frames: int | None = None) -> list[int]:
    """Frame indices to score: every k-th frame, then thinned evenly to at most max_frames."""
    if every < 1:
        raise InputError(f"every must be at least 1, got {every}")
    idx = list(range(0, total, every))
    if max_frames is not None and max_frames > 0 and len(idx) > max_frames:
        keep = np.unique(np.round(np.linspace(0, len(idx) - 1, max_frames)).astype(int))
        idx = [idx[i] for i in keep]
    return idx


def segments_of(num_frames: int, windows: Sequence[Sequence[int]] | None = None, length: int | None = None
                ) -> list[tuple[int, int]]:
    """Time segments [first, last + 1) of a clip: its context windows when known, else consecutive pieces of
    `length` frames (the last one shorter); none for a clip that is one segment."""
    if windows:
        return [(int(a), int(b)) for a, b in windows]
    if not length or num_frames <= length:
        return []
    return [(a, min(a + length, num_frames)) for a in range(0, num_frames, length)]


def seam_report(frames, windows: Sequence[Sequence[int]], group: int = 4) -> dict:
    """Frame-to-frame change at the context windows' edges against the change elsewhere.

    Compared are the transitions between frame groups (`group` = 4: one latent frame of Wan's VAE, whose
    frames within a group change less than across groups): `seam` is the mean absolute change (pixels in
    [0, 1]) across a group boundary where a window starts or ends, `inside` across every other group
    boundary; `ratio` = seam / inside (about 1: no visible seam).
    """
    x = np.asarray(frames)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    diffs = np.abs(np.diff(x, axis=0)).mean(axis=tuple(range(1, x.ndim)))  # diffs[i]: frame i -> i + 1
    edges = {int(a) - 1 for a, _ in windows if int(a) > 0} | {int(b) - 1 for _, b in windows if int(b) < len(x)}
    boundaries = [i for i in range(len(diffs)) if i % group == 0]
    seam = [diffs[i] for i in boundaries if i in edges]
    inside = [diffs[i] for i in boundaries if i not in edges]
    out = {"seam": float(np.mean(seam)) if seam else None, "inside": float(np.mean(inside)) if inside else None,
           "seams": sorted(edges), "ratio": None}
    if seam and inside and out["inside"] > 0:
        out["ratio"] = out["seam"] / out["inside"]
    return out


def summarize(similarities: Sequence[float | None], frame_indices: Sequence[int], num_frames: int,
              segments: Sequence[tuple[int, int]] = ()) -> dict:
    """mean, min, max, drift and frames_scored of one recogniser's per-frame similarities (None = no face);
    with `segments`, the mean of each (None where no face was scored in it)."""
    pairs = [(i, s) for i, s in zip(frame_indices, similarities) if s is not None]
    out = {"frames_scored": len(pairs), "mean": None, "min": None, "max": None, "drift": None}
    if segments:
        means = [[s for i, s in pairs if a <= i < b] for a, b in segments]
        out["segments"] = [float(np.mean(m)) if m else None for m in means]
    if not pairs:
        return out
    t = np.array([i for i, _ in pairs], dtype=np.float64) / max(num_frames - 1, 1)
    s = np.array([v for _, v in pairs], dtype=np.float64)
    out.update(mean=float(s.mean()), min=float(s.min()), max=float(s.max()))
    if len(pairs) >= 2 and np.ptp(t) > 0:
        # Slope over normalised time [0, 1] = fitted change from first to last frame.
        out["drift"] = float(np.polyfit(t, s, 1)[0])
    return out


@dataclass
class Reference:
    """A person's reference embeddings, one per recogniser, from one or more photos."""

    sources: list[str]
    embeddings: dict[str, np.ndarray]
    image: np.ndarray | None = None  # the (first) photo, for reports


@dataclass
class VideoEvaluation:
    """Scores of one video; `recognizers[name]` holds per-frame similarities and their summary."""

    video: str
    reference: list[str]
    num_frames: int
    fps: float
    every: int
    frame_indices: list[int]
    detector: str
    face_found: list[bool]
    recognizers: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None
    segments: list = field(default_factory=list)  # [first, last + 1) frame ranges, e.g. the context windows
    seams: dict | None = None  # `seam_report` of a clip made in several context windows

    @property
    def face_found_share(self) -> float:
        return float(np.mean(self.face_found)) if self.face_found else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["face_found_share"] = self.face_found_share
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VideoEvaluation":
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**fields)


def _as_frames(video) -> tuple[np.ndarray, float, str]:
    from ..io.video import read_video, to_uint8

    if isinstance(video, (str, os.PathLike)):
        frames, fps = read_video(video)
        return frames, fps, str(video)
    return to_uint8(video), 0.0, "(frames)"


class FaceEvaluator:
    """Detector and recognisers loaded once, to score many videos against reference photos.

    recognizers: None (all three; missing ones skipped with a message), names (required), or Recognizer
    objects. detector: a lynx.face detector name ("auto", "insightface", "dlib", "dlib-cnn") or object.
    face_analyzer: a lynx.face.FaceAnalyzer whose detector and ArcFace network are reused (nothing reloaded).
    """

    def __init__(self, recognizers: Iterable[str | Recognizer] | None = None, *, detector="auto",
                 models_dir=None, arcface_weights=None, insightface_model=None, device: str = "cpu",
                 on_skip: Callable[[str, str], None] | None = None, face_analyzer=None):
        from ..face import create_detector

        if face_analyzer is not None:
            detector = face_analyzer.detector
            if arcface_weights is None and face_analyzer.arcface is not None:
                arcface_weights = face_analyzer.arcface

        self.skipped: dict[str, str] = {}
        given = list(recognizers) if recognizers is not None else None
        if given is not None and all(isinstance(r, Recognizer) for r in given):
            self.recognizers = given
        else:
            if given is not None and any(isinstance(r, Recognizer) for r in given):
                raise InputError("give recognisers either all as names or all as Recognizer objects")
            self.recognizers, self.skipped = load_recognizers(
                given, models_dir=models_dir, arcface_weights=arcface_weights,
                insightface_model=insightface_model, device=device, on_skip=on_skip)
        if not self.recognizers:
            raise InputError("no recognisers to evaluate with")
        self.detector = create_detector(detector, models_dir)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.recognizers]

    def _largest_face(self, image: np.ndarray):
        faces = self.detector.detect(image)
        return faces[0] if faces else None, len(faces)

    def reference(self, photos) -> Reference:
        """Reference embeddings from photo(s) of one person: the largest face of each, averaged per recogniser."""
        from ..face import load_image
        from ..face.image import describe_source

        items = list(photos) if isinstance(photos, (list, tuple)) else [photos]
        if not items:
            raise InputError("no reference photo given")
        per_name: dict[str, list[np.ndarray]] = {r.name: [] for r in self.recognizers}
        first = None
        sources = []
        for item in items:
            name = describe_source(item) or "(in-memory image)"
            image = load_image(item)
            face, count = self._largest_face(image)
            if face is None:
                raise NoFaceError(f"no face found in the reference photo {name}; use a photo where the face is "
                                  f"clearly visible")
            if count > 1:
                x1, y1, x2, y2 = (float(v) for v in face.box)
                log.warning("%s: %d faces found; scoring against the largest (box x %.0f-%.0f, y %.0f-%.0f); use a "
                            "photo of the person alone", name, count, x1, x2, y1, y2)
            for r in self.recognizers:
                per_name[r.name].append(r.embed(image, [face])[0])
            first = image if first is None else first
            sources.append(name)
        embeddings = {}
        for k, vs in per_name.items():
            m = np.mean(vs, axis=0)
            embeddings[k] = (m / np.linalg.norm(m)).astype(np.float32)
        return Reference(sources, embeddings, first)

    def embed_frames(self, video, *, every: int = 1, max_frames: int | None = None) -> "FrameEmbeddings":
        """Detect and embed the largest face of each sampled frame once, to score against any reference."""
        import time

        started = time.time()
        frames, fps, name = _as_frames(video)
        idx = sample_indices(len(frames), every, max_frames)
        embs: dict[str, list[np.ndarray | None]] = {r.name: [] for r in self.recognizers}
        found = []
        for i in idx:
            face, _ = self._largest_face(frames[i])
            found.append(face is not None)
            for r in self.recognizers:
                embs[r.name].append(None if face is None else r.embed(frames[i], [face])[0])
        return FrameEmbeddings(name, len(frames), fps, every, idx, found, embs, self.detector.name,
                               time.time() - started)

    def score(self, frames: "FrameEmbeddings", reference: Reference,
              segments: Sequence[tuple[int, int]] = ()) -> VideoEvaluation:
        """Cosine similarity of every embedded frame to the reference, and its summary per recogniser
        (with the mean of each of `segments`)."""
        result = VideoEvaluation(video=frames.video, reference=list(reference.sources), num_frames=frames.num_frames,
                                 fps=frames.fps, every=frames.every, frame_indices=list(frames.frame_indices),
                                 detector=frames.detector, face_found=list(frames.face_found),
                                 skipped=dict(self.skipped), seconds=round(frames.seconds, 3),
                                 segments=[list(s) for s in segments])
        for name, embs in frames.embeddings.items():
            sims = [None if e is None else float(np.dot(e, reference.embeddings[name])) for e in embs]
            result.recognizers[name] = {"similarities": sims,
                                        **summarize(sims, frames.frame_indices, frames.num_frames, segments)}
        return result

    def evaluate(self, video, reference: Reference | Sequence | str | os.PathLike, *, every: int = 1,
                 max_frames: int | None = None, windows: Sequence[Sequence[int]] | None = None,
                 segment_frames: int | None = None) -> VideoEvaluation:
        """Score one video (a file, or frames [F, H, W, 3]) against a Reference (or reference photo paths).

        Long clips: `windows` (the context windows it was made in, video-frame ranges) give the similarity
        per window and the seam report; without them, `segment_frames` cuts the clip into segments of that
        many frames."""
        if not isinstance(reference, Reference):
            reference = self.reference(reference)
        frames, fps, name = _as_frames(video)
        embedded = self.embed_frames(frames, every=every, max_frames=max_frames)
        embedded.video, embedded.fps = name, fps
        result = self.score(embedded, reference, segments_of(len(frames), windows, segment_frames))
        if windows and len(windows) > 1:
            result.seams = seam_report(frames, windows)
        return result


@dataclass
class FrameEmbeddings:
    """Per sampled frame: whether a face was found and its embedding under each recogniser (None: no face)."""

    video: str
    num_frames: int
    fps: float
    every: int
    frame_indices: list[int]
    face_found: list[bool]
    embeddings: dict[str, list[np.ndarray | None]]
    detector: str
    seconds: float


def evaluate_video(video, reference, *, every: int = 1, max_frames: int | None = None, recognizers=None,
                   detector="auto", models_dir=None, **kwargs) -> VideoEvaluation:
    """One-off: load the recognisers, score `video` against reference photo(s). See FaceEvaluator for many."""
    ev = FaceEvaluator(recognizers, detector=detector, models_dir=models_dir, **kwargs)
    return ev.evaluate(video, reference, every=every, max_frames=max_frames)


def format_evaluation(ev: VideoEvaluation) -> str:
    """Human-readable lines for one video, for `lynx eval`."""
    lines = [f"{ev.video}: {len(ev.frame_indices)} of {ev.num_frames} frames scored (every {ev.every}), "
             f"face found in {ev.face_found_share:.0%} ({sum(ev.face_found)}/{len(ev.face_found)}), "
             f"detector {ev.detector}"]
    lines.append(f"  {'recogniser':12s} {'mean':>7s} {'min':>7s} {'drift':>7s}")
    for name, s in ev.recognizers.items():
        def f(v):
            return f"{v:7.3f}" if v is not None and not (isinstance(v, float) and math.isnan(v)) else "      -"
        lines.append(f"  {name:12s} {f(s['mean'])} {f(s['min'])} {f(s['drift'])}")
    if not any(ev.face_found):
        lines.append("  no face in any scored frame: no similarity was measured")
    if ev.segments:
        def g(v):
            return "-" if v is None else f"{v:.3f}"
        lines.append(f"  over time, mean per segment (frames {', '.join(f'{a}-{b - 1}' for a, b in ev.segments)}):")
        for name, s in ev.recognizers.items():
            seg = s.get("segments") or []
            known = [v for v in seg if v is not None]
            change = f"  (last - first {known[-1] - known[0]:+.3f})" if len(known) >= 2 else ""
            lines.append(f"  {name:12s} " + " ".join(g(v) for v in seg) + change)
    if ev.seams and ev.seams.get("ratio") is not None:
        lines.append(f"  window seams: change {ev.seams['seam']:.4f} at the window edges vs {ev.seams['inside']:.4f} "
                     f"inside (ratio {ev.seams['ratio']:.2f}; about 1: no visible seam)")
    return "\n".join(lines)
