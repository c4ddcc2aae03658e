"""`FaceAnalyzer`: the face models (detector, ArcFace network) loaded once on one device, and what they make of photos.

Build one per process (a CLI run, the web server, an evaluation, ``lynx prepare``) and pass it to whatever
analyses photos; it keeps nothing between photos but its models. Calls are serialised by its own lock,
because neither dlib's detectors nor a torch module in eval mode promise anything about concurrent calls.

One photo: read at full resolution -> faces detected on a copy of at most ``detect_max_side`` pixels
(mapped back to the photo's pixels) -> one face chosen (``face_index``, else the largest, with a
``SeveralFacesWarning`` when there was a choice) -> both crops cut from the full-resolution photo ->
ArcFace embedding of the 112x112 crop.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from ..errors import InputError
from ..runtime import face_models_dir
from .alignment import align_arcface, align_reference
from .arcface import arcface_path, embed, load_arcface
from .detection import MIN_FACE_SIZE, DetectedFace, FaceDetector, create_detector, select_face, sort_largest_first
from .identity import FaceIdentity, combine, describe_face, face_record
from .image import ImageLike, describe_source, load_image

# Detection needs no more: SCRFD sees 640 px and dlib's HOG 1280 px. Photos up to this size are detected
# exactly as the authors' insightface call did; larger ones are shrunk first, so detection never copies them.
DETECT_MAX_SIDE = 4096


@dataclass(frozen=True)
class FoundFace:
    """The face chosen in one photo: all faces found (largest first, photo pixels), which one, and its crops."""

    source: str
    image_size: tuple[int, int]
    faces: tuple[DetectedFace, ...]
    index: int
    arcface_crop: np.ndarray
    reference_crop: np.ndarray
    detector: str

    @property
    def face(self) -> DetectedFace:
        return self.faces[self.index]

    @property
    def num_faces(self) -> int:
        return len(self.faces)

    def record(self) -> dict:
        """JSON-ready: source, image_size, num_faces, face_index, box, size, score, detector."""
        return face_record(self.source, self.image_size, self.num_faces, self.index, self.face.box, self.face.score,
                           self.detector)


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside the lynx package, so the warning names the caller's line
    whichever public entry (analyze(), FaceAnalyzer, the pipeline) it came through."""
    package = str(Path(__file__).resolve().parents[1])
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


class SeveralFacesWarning(UserWarning):
    """A photo holds several faces and none was chosen, so the largest is used.

    ``str()`` names Python's ``face_index=``; front ends reword it with ``message_for("--face-index N")``.
    """

    def __init__(self, found: FoundFace):
        self.found = found
        super().__init__(self.message_for("face_index=N"))

    def message_for(self, option: str) -> str:
        f = self.found
        name = f.source or "the photo"
        return (f"{name}: {f.num_faces} faces found; using {describe_face(f.record())}. To use another, "
                f"pass {option} (0 = the largest ... {f.num_faces - 1} = the smallest)")


class FaceAnalyzer:
    """A face detector and the ArcFace IR-SE50 network, loaded once, on one device.

    detector: "auto" (insightface's SCRFD when buffalo_l/det_10g.onnx is found, else dlib), "insightface",
    "dlib", "dlib-cnn" or a FaceDetector. arcface: path of recognition_arcface_ir_se50.pth (default
    <models_dir>/recognition_arcface_ir_se50.pth) or a loaded ArcFaceIRSE50 module. embedding=False
    skips the ArcFace network: such an analyzer finds faces and crops (``find``) but cannot ``analyze``.
    Missing files raise WeightsNotFoundError saying what to download, ArcFace first.
    """

    def __init__(self, detector: str | FaceDetector = "auto",
                 arcface: str | os.PathLike | torch.nn.Module | None = None, *,
                 models_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 embedding: bool = True, detect_max_side: int = DETECT_MAX_SIDE):
        self.models_dir = Path(models_dir).expanduser() if models_dir is not None else face_models_dir()
        self.device = torch.device(device)
        if isinstance(arcface, torch.nn.Module):
            self.arcface = arcface.eval()
        elif embedding:
            self.arcface = load_arcface(Path(arcface) if arcface is not None else arcface_path(self.models_dir),
                                        self.device)
        else:
            self.arcface = None
        self.detector = create_detector(detector, self.models_dir)
        if detect_max_side < 64:
            raise InputError(f"detect_max_side must be at least 64 px, got {detect_max_side}")
        self.detect_max_side = int(detect_max_side)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        arcface = "ArcFace IR-SE50" if self.arcface is not None else "no embedding"
        return f"FaceAnalyzer({self.detector.name}, {arcface}, {self.device})"

    # ----- the steps --------------------------------------------------------------------------------------------
    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """All faces in an RGB uint8 photo, largest first, in the photo's pixels (found on a copy of at most
        ``detect_max_side`` px)."""
        h, w = image.shape[:2]
        scale = self.detect_max_side / max(h, w)
        if scale >= 1.0:
            return self.detector.detect(image)
        small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        sx, sy = w / small.shape[1], h / small.shape[0]
        # Boxes are pixel edges (scale); keypoints are positions in pixel-centre coordinates.
        return [DetectedFace((f.box * np.array([sx, sy, sx, sy])).astype(np.float32),
                             ((f.keypoints + 0.5) * np.array([sx, sy]) - 0.5).astype(np.float32), f.score)
                for f in self.detector.detect(small)]

    def find(self, photo: ImageLike, *, face_index: int | None = None,
             min_face_size: float = MIN_FACE_SIZE) -> FoundFace:
        """The face to use in one photo and its two crops. face_index: which face, largest first (0 = the
        largest); without it the largest is used, with a SeveralFacesWarning when the photo has several."""
        source = describe_source(photo)
        image = load_image(photo)
        with self._lock:
            faces = tuple(sort_largest_first(self.detect(image)))
        chosen = select_face(faces, face_index=face_index, min_face_size=min_face_size, source=source)
        found = FoundFace(source=source, image_size=(image.shape[1], image.shape[0]), faces=faces,
                          index=next(i for i, f in enumerate(faces) if f is chosen),
                          arcface_crop=align_arcface(image, chosen.keypoints),
                          reference_crop=align_reference(image, chosen.keypoints), detector=self.detector.name)
        if face_index is None and found.num_faces > 1:
            warnings.warn(SeveralFacesWarning(found), stacklevel=_caller_stacklevel())
        return found

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """ArcFace embeddings of aligned 112x112 RGB crops: (512,) for one, (N, 512) for a batch."""
        if self.arcface is None:
            raise InputError("this FaceAnalyzer was built with embedding=False; build it with the ArcFace "
                             "weights to compute embeddings")
        with self._lock:
            return embed(self.arcface, crops)

    def analyze(self, photos: ImageLike | Sequence[ImageLike], *, face_index: int | None = None,
                min_face_size: float = MIN_FACE_SIZE) -> FaceIdentity:
        """Photo(s) of one person -> FaceIdentity. Several photos combine into one (see ``combine``);
        face_index applies to each of them."""
        items = list(photos) if isinstance(photos, (list, tuple)) else [photos]
        if not items:
            raise InputError("analyze() got an empty list of images")
        if self.arcface is None:
            self.embed(np.zeros((112, 112, 3), np.uint8))  # raises the message above
        ids = []
        for item in items:
            found = self.find(item, face_index=face_index, min_face_size=min_face_size)
            face = found.face
            ids.append(FaceIdentity(
                embedding=self.embed(found.arcface_crop), keypoints=face.keypoints, arcface_crop=found.arcface_crop,
                reference_crop=found.reference_crop, image_size=found.image_size, score=face.score,
                source=found.source, num_faces=found.num_faces, box=face.box, detector=found.detector,
                face_index=found.index))
        return combine(ids)

    __call__ = analyze


def analyze(images: ImageLike | Sequence[ImageLike], *, detector: str | FaceDetector = "auto",
            arcface_weights: str | os.PathLike | torch.nn.Module | None = None,
            models_dir: str | os.PathLike | None = None, face_index: int | None = None,
            min_face_size: float = MIN_FACE_SIZE, device: str | torch.device = "cpu") -> FaceIdentity:
    """One-off convenience: ``FaceAnalyzer(detector, arcface_weights, ...).analyze(images, ...)``.

    It loads the models on every call; build a FaceAnalyzer once to analyse many photos.
    """
    if isinstance(images, (list, tuple)) and not images:
        raise InputError("analyze() got an empty list of images")
    analyzer = FaceAnalyzer(detector, arcface_weights, models_dir=models_dir, device=device)
    return analyzer.analyze(images, face_index=face_index, min_face_size=min_face_size)
