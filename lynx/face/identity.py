"""A person's face identity: what Lynx's two adapters need from a photo, computed once and reused.

``analyze`` turns one or several photos into a ``FaceIdentity`` (ArcFace embedding for the
ID-adapter, 256x256 reference crop for the Ref-adapter, plus the keypoints and crops they came from);
``FaceIdentity.save`` / ``load`` keep it on disk as a small safetensors file with JSON metadata.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import CheckpointError, InputError
from ..runtime import face_models_dir
from .alignment import ARCFACE_SIZE, REFERENCE_SIZE, align_arcface, align_reference
from .arcface import ARCFACE_FILE, EMBEDDING_DIM, embed, load_arcface_cached, missing_weights_error
from .detection import MIN_FACE_SIZE, FaceDetector, create_detector, select_face
from .image import ImageLike, describe_source, load_image

log = logging.getLogger("lynx.face")

FORMAT_VERSION = 1
# Cosine similarity of ArcFace embeddings: the same person is typically above 0.4, different people
# near 0; photos whose similarity to the others falls below this get a warning.
SAME_PERSON_MIN_SIMILARITY = 0.3


class IdentityMismatchWarning(UserWarning):
    """Photos combined into one identity look like different people."""


def arcface_path(models_dir: str | os.PathLike | None = None) -> Path:
    """Where the ArcFace weight file is expected: <models_dir or face_models_dir()>/recognition_arcface_ir_se50.pth."""
    return Path(models_dir or face_models_dir()).expanduser() / ARCFACE_FILE


def arcface_missing(models_dir: str | os.PathLike | None = None) -> str | None:
    """What to download and where when the ArcFace file is absent; None when it is there."""
    path = arcface_path(models_dir)
    return None if path.is_file() else str(missing_weights_error(path))


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm < 1e-8:
        raise InputError("face embedding is zero or not finite")
    return (v / norm).astype(np.float32)


@dataclass
class FaceIdentity:
    """The face inputs of one person.

    embedding: (512,) float32, unit norm (ArcFace IR-SE50). keypoints: (5, 2) float32 in source pixels.
    arcface_crop: (112, 112, 3) uint8 RGB. reference_crop: (256, 256, 3) uint8 RGB or None (then the
    Ref-adapter has no input). image_size: (width, height) of the source photo. score: detector score.
    source: file name of the photo the crops come from ("" for in-memory images). num_faces: faces
    found in that photo. box: (4,) face box x1, y1, x2, y2. detector: backend name. num_images: photos
    combined into this identity.
    """

    embedding: np.ndarray
    keypoints: Optional[np.ndarray] = None
    arcface_crop: Optional[np.ndarray] = None
    reference_crop: Optional[np.ndarray] = None
    image_size: tuple[int, int] = (0, 0)
    score: float = float("nan")
    source: str = ""
    num_faces: int = 0
    box: Optional[np.ndarray] = None
    detector: str = ""
    num_images: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        emb = np.asarray(self.embedding, dtype=np.float32).reshape(-1)
        if emb.shape != (EMBEDDING_DIM,):
            raise InputError(f"face embedding must have {EMBEDDING_DIM} values, got {emb.size}")
        self.embedding = _unit(emb)
        if self.keypoints is not None:
            self.keypoints = np.asarray(self.keypoints, dtype=np.float32).reshape(5, 2)
        if self.box is not None:
            self.box = np.asarray(self.box, dtype=np.float32).reshape(4)
        self.arcface_crop = _check_crop(self.arcface_crop, ARCFACE_SIZE, "arcface_crop")
        self.reference_crop = _check_crop(self.reference_crop, REFERENCE_SIZE, "reference_crop")
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    @classmethod
    def from_embedding(cls, embedding, reference_crop=None) -> "FaceIdentity":
        """An identity from a precomputed ArcFace IR-SE50 embedding (re-normalised), optionally with a
        256x256 RGB reference crop (e.g. ``align_reference(image, keypoints)``)."""
        ref = None
        if reference_crop is not None:
            ref = load_image(reference_crop)
            if ref.shape[:2] != (REFERENCE_SIZE, REFERENCE_SIZE):
                raise InputError(f"reference_crop must be {REFERENCE_SIZE}x{REFERENCE_SIZE}, got "
                                 f"{ref.shape[1]}x{ref.shape[0]}; make it with lynx.face.align_reference")
        return cls(embedding=np.asarray(embedding), reference_crop=ref, detector="precomputed")

    # -------------------------------------------------------------------------------- storage

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (arrays) with the scalar fields as JSON metadata, at exactly ``path``."""
        from safetensors.numpy import save_file

        path = Path(path).expanduser()
        tensors = {"embedding": self.embedding}
        for name in ("keypoints", "arcface_crop", "reference_crop", "box"):
            value = getattr(self, name)
            if value is not None:
                tensors[name] = np.ascontiguousarray(value)
        meta = {
            "format": "lynx.face.FaceIdentity",
            "version": FORMAT_VERSION,
            "image_size": list(self.image_size),
            "score": None if not np.isfinite(self.score) else float(self.score),
            "source": self.source,
            "num_faces": int(self.num_faces),
            "detector": self.detector,
            "num_images": int(self.num_images),
            "extra": self.extra,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"lynx_face": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FaceIdentity":
        """Read a file written by ``save``."""
        from safetensors import SafetensorError, safe_open

        path = Path(path).expanduser()
        if not path.is_file() and path.with_name(path.name + ".safetensors").is_file():
            path = path.with_name(path.name + ".safetensors")
        if not path.is_file():
            raise InputError(f"face identity file not found: {path} (make one with lynx.face.analyze(...).save)")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta_text = (f.metadata() or {}).get("lynx_face")
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable face identity file: {exc}") from exc
        if meta_text is None or "embedding" not in arrays:
            raise CheckpointError(f"{path} is a safetensors file but not a lynx face identity")
        meta = json.loads(meta_text)
        if meta.get("version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer lynx (format {meta['version']})")
        score = meta.get("score")
        return cls(
            embedding=arrays["embedding"],
            keypoints=arrays.get("keypoints"),
            arcface_crop=arrays.get("arcface_crop"),
            reference_crop=arrays.get("reference_crop"),
            image_size=tuple(meta.get("image_size", (0, 0))),
            score=float("nan") if score is None else float(score),
            source=meta.get("source", ""),
            num_faces=int(meta.get("num_faces", 0)),
            box=arrays.get("box"),
            detector=meta.get("detector", ""),
            num_images=int(meta.get("num_images", 1)),
            extra=meta.get("extra", {}),
        )

    def similarity(self, other: "FaceIdentity | np.ndarray") -> float:
        """Cosine similarity of the two embeddings (1 = same direction)."""
        v = other.embedding if isinstance(other, FaceIdentity) else _unit(other)
        return float(np.dot(self.embedding, v))


def _check_crop(crop, size: int, name: str):
    if crop is None:
        return None
    arr = np.asarray(crop)
    if arr.shape != (size, size, 3) or arr.dtype != np.uint8:
        raise InputError(f"{name} must be a ({size}, {size}, 3) uint8 RGB array, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


# ---------------------------------------------------------------------------------------- analysis


def _resolve_arcface(arcface_weights, models_dir: Path, device) -> torch.nn.Module:
    if isinstance(arcface_weights, torch.nn.Module):
        return arcface_weights
    path = Path(arcface_weights) if arcface_weights is not None else arcface_path(models_dir)
    return load_arcface_cached(path, device)


def _analyze_one(source: ImageLike, detector: FaceDetector, model: torch.nn.Module,
                 face_index: Optional[int], min_face_size: float) -> FaceIdentity:
    name = describe_source(source)
    image = load_image(source)
    faces = detector.detect(image)
    face = select_face(faces, face_index=face_index, min_face_size=min_face_size, source=name)
    arc = align_arcface(image, face.keypoints)
    ref = align_reference(image, face.keypoints)
    return FaceIdentity(
        embedding=embed(model, arc),
        keypoints=face.keypoints,
        arcface_crop=arc,
        reference_crop=ref,
        image_size=(image.shape[1], image.shape[0]),
        score=face.score,
        source=name,
        num_faces=len(faces),
        box=face.box,
        detector=detector.name,
    )


def combine(identities: Sequence[FaceIdentity],
            min_similarity: float = SAME_PERSON_MIN_SIMILARITY) -> FaceIdentity:
    """One identity from several photos of a person.

    The embedding is the re-normalised mean of the unit embeddings; keypoints, crops and the other
    fields come from the photo with the best detector score. Warns (IdentityMismatchWarning) when a
    photo's embedding is far from all the others.
    """
    ids = list(identities)
    if not ids:
        raise InputError("no face identities to combine")
    if len(ids) == 1:
        return ids[0]
    embs = np.stack([i.embedding for i in ids])
    sims = embs @ embs.T
    n = len(ids)
    odd = []
    for k in range(n):
        others = np.delete(sims[k], k)
        if others.mean() < min_similarity:
            odd.append(f"{ids[k].source or f'image {k}'} (mean similarity {others.mean():.2f})")
    if odd:
        warnings.warn(
            f"these photos look like a different person than the others: {'; '.join(odd)}. "
            f"Same-person photos usually have ArcFace similarity above {min_similarity}; "
            f"the combined identity mixes them.", IdentityMismatchWarning, stacklevel=3)
    mean = _unit(embs.mean(axis=0))
    best = max(ids, key=lambda i: i.score if np.isfinite(i.score) else -np.inf)
    pairs = sims[np.triu_indices(n, 1)]
    return FaceIdentity(
        embedding=mean, keypoints=best.keypoints, arcface_crop=best.arcface_crop,
        reference_crop=best.reference_crop, image_size=best.image_size, score=best.score,
        source=best.source, num_faces=best.num_faces, box=best.box, detector=best.detector,
        num_images=sum(i.num_images for i in ids),
        extra={"sources": [i.source for i in ids], "min_pair_similarity": float(pairs.min())},
    )


def analyze(images: ImageLike | Sequence[ImageLike], *, detector: str | FaceDetector = "auto",
            arcface_weights: str | os.PathLike | torch.nn.Module | None = None,
            models_dir: str | os.PathLike | None = None, face_index: int | None = None,
            min_face_size: float = MIN_FACE_SIZE, device: str | torch.device = "cpu") -> FaceIdentity:
    """Photo(s) of one person -> FaceIdentity.

    images: a path, PIL image or RGB array, or a list of them (combined, see ``combine``).
    detector: "auto" (insightface when buffalo_l/det_10g.onnx is found, else dlib), "insightface",
    "dlib", "dlib-cnn" or a FaceDetector. arcface_weights: path of recognition_arcface_ir_se50.pth
    (default <models_dir>/recognition_arcface_ir_se50.pth) or a loaded ArcFaceIRSE50 module.
    face_index: which face when a photo has several (0 = largest, the default choice).
    """
    models_dir = Path(models_dir).expanduser() if models_dir is not None else face_models_dir()
    if isinstance(images, (list, tuple)):
        items = list(images)
        if not items:
            raise InputError("analyze() got an empty list of images")
    else:
        items = [images]
    # Fail on a missing weight file before spending time on detection.
    model = _resolve_arcface(arcface_weights, models_dir, device)
    det = create_detector(detector, models_dir)
    ids = [_analyze_one(item, det, model, face_index, min_face_size) for item in items]
    return combine(ids)


def describe(identity: FaceIdentity) -> str:
    """A few human-readable lines about an identity, for ``lynx face``."""
    lines = []
    if identity.detector == "precomputed":
        lines.append("precomputed ArcFace embedding (no photo analysed)")
    else:
        src = identity.source or "(in-memory image)"
        w, h = identity.image_size
        lines.append(f"photo: {src} ({w}x{h})")
        if identity.num_images > 1:
            lines.append(f"combined from {identity.num_images} photos; crops from the best-scoring one")
            sim = identity.extra.get("min_pair_similarity")
            if sim is not None:
                lines.append(f"lowest similarity between two photos: {sim:.2f}")
        faces = identity.num_faces
        lines.append(f"faces found: {faces}" + ("; using the largest" if faces > 1 else ""))
        if identity.box is not None:
            x1, y1, x2, y2 = (float(v) for v in identity.box)
            lines.append(f"face box: x {x1:.0f}-{x2:.0f}, y {y1:.0f}-{y2:.0f} ({x2 - x1:.0f}x{y2 - y1:.0f} px)")
        if np.isfinite(identity.score):
            lines.append(f"detector: {identity.detector}, score {identity.score:.2f}")
        else:
            lines.append(f"detector: {identity.detector}")
    lines.append("embedding: 512-d ArcFace IR-SE50, unit norm")
    lines.append("reference crop: " + ("256x256" if identity.reference_crop is not None
                                       else "none (the Ref-adapter will be skipped)"))
    return "\n".join(lines)
