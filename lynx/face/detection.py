"""Face detection with five keypoints, through two backends.

``insightface``: the SCRFD detector of insightface's model packs (``buffalo_l/det_10g.onnx``), the
detector the Lynx authors used. The ONNX file is run here directly with onnxruntime (CUDA when
available), with insightface's pre- and post-processing: letterbox to 640x640, (x - 127.5) / 128,
score threshold 0.5, NMS at IoU 0.4.

``dlib`` (and ``dlib-cnn``): dlib's HOG face detector, each candidate confirmed by dlib's MMOD CNN
on a small crop (or the CNN alone over the whole photo), and its 68-point landmark model, all from
the ``face-recognition-models`` package, so detection works offline with nothing to download.
The five ArcFace points are derived from the 68: eye centres are the means of the eye contours,
the nose tip is point 30, the mouth corners points 48 and 54.

Both return faces in source-image pixels, largest first. A detector object holds its loaded models;
build it once (``FaceAnalyzer`` does) and reuse it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from ..errors import CheckpointError, InputError, NoFaceError, WeightsNotFoundError

log = logging.getLogger("lynx.face")

MIN_FACE_SIZE = 40
# insightface model files that hold SCRFD with keypoints, looked up in this order.
SCRFD_CANDIDATES = ("buffalo_l/det_10g.onnx", "det_10g.onnx", "antelopev2/scrfd_10g_bnkps.onnx",
                    "scrfd_10g_bnkps.onnx")
BUFFALO_L_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"
DLIB_LANDMARKS_FILE = "shape_predictor_68_face_landmarks.dat"
DLIB_CNN_FILE = "mmod_human_face_detector.dat"


@dataclass(frozen=True)
class DetectedFace:
    """One face: box (x1, y1, x2, y2) and keypoints (5, 2) in source pixels, detector score."""

    box: np.ndarray
    keypoints: np.ndarray
    score: float

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def size(self) -> float:
        """The longer side of the box, the number the minimum face size is checked against."""
        return max(self.width, self.height)

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


class FaceDetector:
    """Base class: ``detect(rgb_uint8) -> list[DetectedFace]``, largest face first."""

    name = "base"

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def sort_largest_first(faces: list[DetectedFace]) -> list[DetectedFace]:
    return sorted(faces, key=lambda f: (-f.area, -f.score))


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def shrink(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """An area-averaged smaller copy; reads the array in place, so a large photo is never copied whole."""
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


# --------------------------------------------------------------------------------------------- dlib


def _package_dir(module: str) -> Path | None:
    # find_spec locates the package without executing it: face_recognition_models imports
    # pkg_resources, which recent setuptools no longer ships.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def dlib_model_path(file_name: str, models_dir: str | os.PathLike | None = None) -> Path:
    """A dlib model file: from models_dir when it is there, else from the face-recognition-models package."""
    if models_dir is not None:
        local = Path(models_dir).expanduser() / file_name
        if local.is_file():
            return local
    pkg = _package_dir("face_recognition_models")
    if pkg is not None and (pkg / "models" / file_name).is_file():
        return pkg / "models" / file_name
    where = f" or put {file_name} in {Path(models_dir).expanduser()}" if models_dir is not None else ""
    raise WeightsNotFoundError(
        f"dlib model {file_name} not found: install it with `pip install face-recognition-models`{where} "
        f"(published at https://github.com/ageitgey/face_recognition_models)")


def _import_dlib():
    try:
        import dlib
    except ImportError as exc:
        raise WeightsNotFoundError(
            "the dlib face detector needs the dlib module: `pip install dlib-bin` (prebuilt) or "
            "`pip install dlib`") from exc
    return dlib


class DlibDetector(FaceDetector):
    """dlib HOG boxes confirmed by the MMOD CNN (or CNN boxes alone) + 68-point landmarks -> 5 points.

    Detection runs on a copy whose longer side is at most ``max_side`` (large photos are shrunk, never
    enlarged); landmarks are fitted on the full-resolution photo. A first pass runs at the working
    size; only when it finds nothing is the image upsampled 2x, which finds faces down to about 40 px
    of the working image at four times the cost.

    HOG alone gives weak false positives (badges, hands; scores up to ~0.2, where real but turned
    faces also score) that can be larger than the real face and so win the "largest face" rule.
    Each HOG candidate is therefore re-checked by the CNN on a 200x200 crop around it (~0.2 s per
    candidate); on the test photos this keeps every real face and drops every false one.
    """

    def __init__(self, cnn: bool = False, models_dir: str | os.PathLike | None = None, max_side: int = 1280,
                 verify: bool = True):
        self.cnn = cnn
        self.verify = verify and not cnn
        self.name = "dlib-cnn" if cnn else "dlib"
        self.max_side = int(max_side)
        dlib = _import_dlib()
        self._predictor = dlib.shape_predictor(str(dlib_model_path(DLIB_LANDMARKS_FILE, models_dir)))
        self._cnn = None
        if cnn or self.verify:
            self._cnn = dlib.cnn_face_detection_model_v1(str(dlib_model_path(DLIB_CNN_FILE, models_dir)))
        self._hog = None if cnn else dlib.get_frontal_face_detector()
        self._dlib = dlib

    def _boxes(self, work: np.ndarray, upsample: int) -> list[tuple[float, float, float, float, float]]:
        if self.cnn:
            found = self._cnn(work, upsample)
            return [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(), float(d.confidence))
                    for d in found]
        rects, scores, _ = self._hog.run(work, upsample, 0.0)
        boxes = [(r.left(), r.top(), r.right(), r.bottom(), float(s)) for r, s in zip(rects, scores)]
        if self.verify:
            boxes = [b for b in boxes if self._confirmed(work, b)]
        return boxes

    def _confirmed(self, image: np.ndarray, box) -> bool:
        """Whether the CNN also finds a face centred near this HOG box, in a crop twice its size."""
        x1, y1, x2, y2 = box[0], box[1], box[2] + 1, box[3] + 1
        side = max(x2 - x1, y2 - y1)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        left, top = int(round(cx - side)), int(round(cy - side))
        size = 2 * side
        crop = np.zeros((size, size, 3), dtype=np.uint8)
        h, w = image.shape[:2]
        sx0, sy0, sx1, sy1 = max(left, 0), max(top, 0), min(left + size, w), min(top + size, h)
        if sx1 <= sx0 or sy1 <= sy0:
            return False
        crop[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = image[sy0:sy1, sx0:sx1]
        # The face then spans ~100 px, comfortably above the CNN's ~80 px smallest window.
        crop = np.ascontiguousarray(_resize(crop, 200, 200))
        for d in self._cnn(crop, 0):
            dx = (d.rect.left() + d.rect.right()) / 2 - 100
            dy = (d.rect.top() + d.rect.bottom()) / 2 - 100
            if abs(dx) < 50 and abs(dy) < 50 and d.confidence > 0:
                return True
        return False

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        h, w = image.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        work = image if scale == 1.0 else shrink(image, max(1, round(w * scale)), max(1, round(h * scale)))
        work = np.ascontiguousarray(work)
        boxes = self._boxes(work, 0)
        if not boxes:
            boxes = self._boxes(work, 1)
        faces = []
        for x1, y1, x2, y2, score in boxes:
            # dlib boxes are inclusive pixel ranges; +1 makes the far edge exclusive like SCRFD's.
            box = np.array([x1, y1, x2 + 1, y2 + 1], dtype=np.float64) / scale
            rect = self._dlib.rectangle(int(round(box[0])), int(round(box[1])),
                                        int(round(box[2])) - 1, int(round(box[3])) - 1)
            shape = self._predictor(image, rect)
            pts = np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], dtype=np.float64)
            faces.append(DetectedFace(box.astype(np.float32), five_points_from_68(pts), score))
        return sort_largest_first(faces)


def five_points_from_68(landmarks: np.ndarray) -> np.ndarray:
    """iBUG 68-point landmarks -> ArcFace's five points (image-left eye first), float32 (5, 2)."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (68, 2):
        raise InputError(f"expected 68 landmarks, got shape {pts.shape}")
    return np.stack([
        pts[36:42].mean(axis=0),  # contour of the eye on the image's left (the subject's right eye)
        pts[42:48].mean(axis=0),
        pts[30],                  # tip of the nose
        pts[48],                  # mouth corner on the image's left
        pts[54],
    ]).astype(np.float32)


# ---------------------------------------------------------------------------------------- insightface


def insightface_model_roots(models_dir: str | os.PathLike | None) -> list[Path]:
    roots = []
    if models_dir is not None:
        roots.append(Path(models_dir).expanduser())
    # Where insightface itself unpacks its model packs, so existing installs are found too.
    roots.append(Path.home() / ".insightface" / "models")
    return roots


def find_scrfd_model(models_dir: str | os.PathLike | None) -> Path | None:
    """The first SCRFD model file (e.g. buffalo_l/det_10g.onnx) under models_dir or ~/.insightface/models."""
    for root in insightface_model_roots(models_dir):
        for rel in SCRFD_CANDIDATES:
            if (root / rel).is_file():
                return root / rel
    return None


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise WeightsNotFoundError(
            "the insightface detector needs onnxruntime: `pip install onnxruntime` "
            "(or `onnxruntime-gpu` for CUDA)") from exc
    return onnxruntime


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS with insightface's +1 pixel box areas, so borderline overlaps resolve identically."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = iw * ih
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= threshold]
    return keep


class ScrfdDetector(FaceDetector):
    """SCRFD (insightface model packs) on onnxruntime; reproduces insightface's SCRFD.detect."""

    name = "insightface"

    def __init__(self, model_path: str | os.PathLike | None = None, *, session=None,
                 det_size: tuple[int, int] = (640, 640), det_thresh: float = 0.5, nms_thresh: float = 0.4,
                 providers: Sequence[str] | None = None, channels: str = "authors"):
        if channels not in ("authors", "rgb"):
            raise InputError(f"channels must be 'authors' or 'rgb', not {channels!r}")
        # "authors": the network sees BGR, as in the reference code (an RGB array handed to insightface,
        # which swaps it); the released adapters were made with those keypoints. "rgb": what SCRFD was trained on.
        self.channels = channels
        self.det_thresh = float(det_thresh)
        self.nms_thresh = float(nms_thresh)
        self.model_path = Path(model_path) if model_path is not None else None
        if session is None:
            if self.model_path is None or not self.model_path.is_file():
                raise WeightsNotFoundError(
                    f"SCRFD face detector model not found{': ' + str(self.model_path) if self.model_path else ''}. "
                    f"Download buffalo_l.zip from {BUFFALO_L_URL} and unpack it so that "
                    f"<models_dir>/buffalo_l/det_10g.onnx exists, or use detector='dlib'.")
            ort = _import_onnxruntime()
            if providers is None:
                available = ort.get_available_providers()
                providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
            try:
                session = ort.InferenceSession(str(self.model_path), providers=list(providers))
            except Exception as exc:
                raise CheckpointError(f"onnxruntime cannot load {self.model_path}: {exc}") from exc
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        # Models exported with a fixed input size must be fed that size; dynamic ones get det_size.
        if len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int):
            self.input_size = (int(shape[3]), int(shape[2]))
        else:
            self.input_size = (int(det_size[0]), int(det_size[1]))
        n_out = len(session.get_outputs())
        layouts = {9: ((8, 16, 32), 2), 15: ((8, 16, 32, 64, 128), 1)}
        if n_out not in layouts:
            raise CheckpointError(
                f"{self.model_path or 'the ONNX model'} has {n_out} outputs; an SCRFD model with keypoints "
                f"has 9 or 15 (use det_10g.onnx from buffalo_l)")
        self.strides, self.num_anchors = layouts[n_out]

    def _letterbox(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        in_w, in_h = self.input_size
        h, w = image.shape[:2]
        if h / w > in_h / in_w:
            new_h, new_w = in_h, int(in_h / (h / w))
        else:
            new_w, new_h = in_w, int(in_w * (h / w))
        new_w, new_h = max(new_w, 1), max(new_h, 1)
        canvas = np.zeros((in_h, in_w, 3), dtype=np.uint8)
        # insightface's own resize (OpenCV bilinear, no antialiasing), so the keypoints are the authors'.
        canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
        return canvas, new_h / h

    def blob(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Network input (1, 3, H, W) float32 and the scale from source to network pixels.

        insightface hands SCRFD a BGR image with swapRB=True, so the network sees RGB; the authors
        handed it RGB, so their network saw BGR (``channels="authors"``, the default).
        """
        canvas, scale = self._letterbox(image)
        if self.channels == "authors":
            canvas = canvas[..., ::-1]
        x = (canvas.astype(np.float32) - 127.5) / 128.0
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), scale

    def decode(self, outputs: Sequence[np.ndarray], scale: float) -> list[DetectedFace]:
        in_w, in_h = self.input_size
        n = len(self.strides)
        all_scores, all_boxes, all_kps = [], [], []
        for i, stride in enumerate(self.strides):
            # Some exports keep a batch axis: (1, N, C) instead of (N, C).
            scores = np.asarray(outputs[i]).reshape(-1)
            dist = np.asarray(outputs[i + n]).reshape(-1, 4) * stride
            kdist = np.asarray(outputs[i + 2 * n]).reshape(-1, 10) * stride
            gh, gw = in_h // stride, in_w // stride
            ys, xs = np.mgrid[:gh, :gw]
            centers = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
            centers = np.repeat(centers, self.num_anchors, axis=0)
            if not (len(scores) == len(dist) == len(kdist) == len(centers)):
                raise CheckpointError(
                    f"SCRFD output sizes do not match a {in_w}x{in_h} input at stride {stride}")
            pos = np.where(scores >= self.det_thresh)[0]
            c = centers[pos]
            d = dist[pos]
            all_scores.append(scores[pos])
            all_boxes.append(np.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1],
                                       c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]], axis=-1))
            all_kps.append(kdist[pos].reshape(-1, 5, 2) + c[:, None, :])
        scores = np.concatenate(all_scores)
        if scores.size == 0:
            return []
        boxes = np.concatenate(all_boxes) / scale
        kps = np.concatenate(all_kps) / scale
        keep = _nms(boxes, scores, self.nms_thresh)
        faces = [DetectedFace(boxes[k].astype(np.float32), kps[k].astype(np.float32), float(scores[k]))
                 for k in keep]
        return sort_largest_first(faces)

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        blob, scale = self.blob(image)
        outputs = self.session.run(None, {self.input_name: blob})
        return self.decode(outputs, scale)


# ------------------------------------------------------------------------------------------ choosing

DETECTORS = ("auto", "insightface", "dlib", "dlib-cnn")


def create_detector(detector: str | FaceDetector = "auto",
                    models_dir: str | os.PathLike | None = None) -> FaceDetector:
    """A new detector by name (its models loaded now); ``auto`` is insightface when an SCRFD model and
    onnxruntime are present, else dlib. A FaceDetector object is returned as it is."""
    if isinstance(detector, FaceDetector):
        return detector
    if detector not in DETECTORS:
        raise InputError(f"unknown face detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    name = detector
    scrfd = find_scrfd_model(models_dir) if name in ("auto", "insightface") else None
    if name == "auto":
        if scrfd is not None and importlib.util.find_spec("onnxruntime") is not None:
            name = "insightface"
        else:
            if scrfd is not None:
                log.warning("found %s but onnxruntime is not installed; using the dlib detector", scrfd)
            name = "dlib"
    if name != "insightface":
        return DlibDetector(cnn=(name == "dlib-cnn"), models_dir=models_dir)
    if scrfd is None:
        roots = " or ".join(str(r) for r in insightface_model_roots(models_dir))
        raise WeightsNotFoundError(
            f"SCRFD face detector model (buffalo_l/det_10g.onnx) not found in {roots}. Download "
            f"buffalo_l.zip from {BUFFALO_L_URL} and unpack it there (giving buffalo_l/det_10g.onnx), "
            f"and `pip install onnxruntime`; or use detector='dlib', which needs no download.")
    return ScrfdDetector(scrfd)


def select_face(faces: list[DetectedFace], *, face_index: int | None = None,
                min_face_size: float = MIN_FACE_SIZE, source: str = "") -> DetectedFace:
    """faces[face_index] of the faces sorted largest first (the largest when face_index is None),
    checked against the minimum size."""
    where = f" in {source}" if source else " in the image"
    if not faces:
        raise NoFaceError(f"no face found{where}; use a photo where one face is clearly visible "
                          f"(frontal, at least {int(min_face_size)} px wide)")
    faces = sort_largest_first(list(faces))
    index = check_face_index(face_index, len(faces), source)
    face = faces[index]
    if face.size < min_face_size:
        raise NoFaceError(
            f"the face{where} is only {face.size:.0f} px wide; at least {int(min_face_size)} px is needed "
            f"(112 px or more gives a sharp ArcFace crop). Use a larger photo or a closer shot.")
    if len(faces) > 1:
        log.info("%d faces found%s; using face %d%s", len(faces), where, index,
                 " (the largest)" if index == 0 else "")
    return face


def check_face_index(face_index, num_faces: int, source: str = "") -> int:
    """The index to use (0 when None); an out-of-range or negative index is an InputError giving the valid range."""
    if face_index is None:
        return 0
    if isinstance(face_index, bool) or not isinstance(face_index, (int, np.integer)):
        raise InputError(f"the face index must be a whole number (0 = the largest face), not {face_index!r}")
    where = f"{source} has" if source else "the image has"
    valid = "0 (the only face)" if num_faces == 1 else f"0 (the largest) to {num_faces - 1} (the smallest)"
    if not 0 <= face_index < num_faces:
        raise InputError(f"face index {face_index} is out of range: {where} {num_faces} face(s); "
                         f"valid: {valid}")
    return int(face_index)
