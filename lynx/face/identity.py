"""A person's face identity: what Lynx's two adapters need from a photo, computed once and reused.

``FaceIdentity`` is the one identity type of the package: the ArcFace embedding for the ID-adapter, the
256x256 reference crop for the Ref-adapter, and which face of which photo they come from. A
``FaceAnalyzer`` makes one from photos; ``FaceIdentity.from_embedding`` wraps an embedding made
elsewhere; ``save`` / ``load`` keep it on disk as a small safetensors file with JSON metadata.
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

from ..errors import CheckpointError, InputError
from .alignment import ARCFACE_SIZE, REFERENCE_SIZE
from .arcface import EMBEDDING_DIM
from .image import load_image

log = logging.getLogger("lynx.face")

FORMAT_VERSION = 1
# Cosine similarity of ArcFace embeddings: the same person is typically above 0.4, different people
# near 0; photos whose similarity to the others falls below this get a warning.
SAME_PERSON_MIN_SIMILARITY = 0.3


class IdentityMismatchWarning(UserWarning):
    """Photos combined into one identity look like different people."""


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm < 1e-8:
        raise InputError("face embedding is zero or not finite")
    return (v / norm).astype(np.float32)


@dataclass
class FaceIdentity:
    """The face inputs of one person, and where they come from.

    embedding: (512,) float32 ArcFace IR-SE50 embedding (unit norm when made from a photo or by
    ``from_embedding``; kept exactly as given otherwise, as the pipeline's ``face_embedding=`` is).
    keypoints: (5, 2) float32 in source pixels. arcface_crop: (112, 112, 3) uint8 RGB. reference_crop:
    (256, 256, 3) uint8 RGB or None (then the Ref-adapter has no input). image_size: (width, height) of
    the source photo. score: detector score. source: file name of the photo the crops come from (""
    for in-memory images). num_faces: faces found in that photo. box: (4,) face box x1, y1, x2, y2.
    face_index: which of those faces, largest first (0 = the largest). detector: backend name.
    num_images: photos combined into this identity (then ``extra["faces"]`` holds each photo's face).
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
    face_index: Optional[int] = None

    def __post_init__(self):
        if hasattr(self.embedding, "detach"):  # a torch tensor, wherever it lives
            self.embedding = self.embedding.detach().float().cpu().numpy()
        emb = np.asarray(self.embedding, dtype=np.float32).reshape(-1)
        if emb.shape != (EMBEDDING_DIM,) or not np.all(np.isfinite(emb)):
            got = f"{emb.size} values" if emb.shape != (EMBEDDING_DIM,) else "NaN or infinite values"
            raise InputError(f"face embedding must be {EMBEDDING_DIM} finite numbers (an ArcFace embedding), "
                             f"got {got}")
        self.embedding = emb
        if self.keypoints is not None:
            self.keypoints = np.asarray(self.keypoints, dtype=np.float32).reshape(5, 2)
        if self.box is not None:
            self.box = np.asarray(self.box, dtype=np.float32).reshape(4)
        self.arcface_crop = _check_crop(self.arcface_crop, ARCFACE_SIZE, "arcface_crop")
        self.reference_crop = _check_crop(self.reference_crop, REFERENCE_SIZE, "reference_crop")
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        if self.face_index is not None:
            self.face_index = int(self.face_index)

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
        return cls(embedding=_unit(embedding), reference_crop=ref, detector="precomputed")

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
            "face_index": self.face_index,
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
            raise InputError(f"face identity file not found: {path} (make one with `lynx face PHOTO` or "
                             f"FaceAnalyzer().analyze(PHOTO).save(PATH))")
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
            face_index=meta.get("face_index"),
        )

    def similarity(self, other: "FaceIdentity | np.ndarray") -> float:
        """Cosine similarity of the two embeddings (1 = same direction)."""
        v = other.embedding if isinstance(other, FaceIdentity) else other
        return float(np.dot(_unit(self.embedding), _unit(v)))

    def faces_used(self) -> list[dict]:
        """Which face of which photo this identity comes from, one JSON-ready record per photo:
        source, image_size, num_faces, face_index (0 = largest), box, size (px, the box's longer side),
        score, detector. Empty for an identity made from an embedding."""
        if "faces" in self.extra:
            return [dict(r) for r in self.extra["faces"]]
        if self.box is None:
            return []
        return [face_record(self.source, self.image_size, self.num_faces, self.face_index, self.box, self.score,
                            self.detector)]


def face_record(source: str, image_size, num_faces: int, face_index: int | None, box, score: float,
                detector: str) -> dict:
    """The record of one chosen face, as sidecars, the web API and ``describe`` report it."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"source": source, "image_size": [int(image_size[0]), int(image_size[1])], "num_faces": int(num_faces),
            "face_index": None if face_index is None else int(face_index),
            "box": [round(v, 1) for v in (x1, y1, x2, y2)], "size": round(max(x2 - x1, y2 - y1), 1),
            "score": round(float(score), 4) if np.isfinite(score) else None, "detector": detector}


def describe_face(record: dict) -> str:
    """One line about a chosen face: which of how many, where and how big."""
    x1, y1, x2, y2 = record["box"]
    n, i = record["num_faces"], record["face_index"]
    which = f"face {i} of {n}" + (" (the largest)" if i == 0 and n > 1 else "") if i is not None else f"{n} faces"
    return f"{which}, box x {x1:.0f}-{x2:.0f}, y {y1:.0f}-{y2:.0f} ({x2 - x1:.0f}x{y2 - y1:.0f} px)"


def _check_crop(crop, size: int, name: str):
    if crop is None:
        return None
    arr = np.asarray(crop)
    if arr.shape != (size, size, 3) or arr.dtype != np.uint8:
        raise InputError(f"{name} must be a ({size}, {size}, 3) uint8 RGB array, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)




def combine(identities: Sequence[FaceIdentity],
            min_similarity: float = SAME_PERSON_MIN_SIMILARITY) -> FaceIdentity:
    """One identity from several photos of a person.

    The embedding is the re-normalised mean of the unit embeddings; keypoints, crops and the other
    fields come from the photo with the best detector score, and ``extra["faces"]`` records the face
    used in each photo. Warns (IdentityMismatchWarning) when a photo's embedding is far from all the others.
    """
    ids = list(identities)
    if not ids:
        raise InputError("no face identities to combine")
    if len(ids) == 1:
        return ids[0]
    embs = np.stack([_unit(i.embedding) for i in ids])
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
        num_images=sum(i.num_images for i in ids), face_index=best.face_index,
        extra={"sources": [i.source for i in ids], "min_pair_similarity": float(pairs.min()),
               "faces": [r for i in ids for r in i.faces_used()]},
    )


def describe(identity: FaceIdentity) -> str:
    """A few human-readable lines about an identity, for ``lynx face``."""
    lines = []
    if identity.detector == "precomputed":
        lines.append("precomputed ArcFace embedding (no photo analysed)")
    else:
        w, h = identity.image_size
        lines.append(f"photo: {identity.source or '(in-memory image)'} ({w}x{h})")
        if identity.num_images > 1:
            lines.append(f"combined from {identity.num_images} photos; crops from the best-scoring one")
            sim = identity.extra.get("min_pair_similarity")
            if sim is not None:
                lines.append(f"lowest similarity between two photos: {sim:.2f}")
            for record in identity.faces_used():
                lines.append(f"  {record['source'] or '(in-memory image)'}: {describe_face(record)}")
        lines += face_lines(identity.num_faces, identity.face_index, identity.box, identity.score, identity.detector)
    lines.append(f"embedding: 512-d ArcFace IR-SE50, norm {np.linalg.norm(identity.embedding):.2f}")
    lines.append("reference crop: " + ("256x256" if identity.reference_crop is not None
                                       else "none (the Ref-adapter will be skipped)"))
    return "\n".join(lines)


def face_lines(num_faces: int, face_index: int | None, box, score: float, detector: str) -> list[str]:
    """How many faces a photo has, which one is used, its box and the detector: lines for ``lynx face``."""
    used = ""
    if num_faces > 1 and face_index is not None:
        used = f"; using face {face_index}" + (" (the largest)" if face_index == 0 else " (0 is the largest)")
    lines = [f"faces found: {num_faces}{used}"]
    if box is not None:
        x1, y1, x2, y2 = (float(v) for v in box)
        lines.append(f"face box: x {x1:.0f}-{x2:.0f}, y {y1:.0f}-{y2:.0f} ({x2 - x1:.0f}x{y2 - y1:.0f} px)")
    lines.append(f"detector: {detector}" + (f", score {score:.2f}" if np.isfinite(score) else ""))
    return lines
