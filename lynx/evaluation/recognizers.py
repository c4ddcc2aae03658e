"""Face recognisers that score identity fidelity: one embedding per detected face, compared by cosine.

Three columns, as in the paper's table, each an independent network with its own alignment:

``facexlib``    ArcFace IR-SE50 with facexlib's released weights (``recognition_arcface_ir_se50.pth``),
                the same network whose embedding conditions Lynx; run through ``lynx.face``.
``insightface`` insightface's recognition model from a local model pack (``buffalo_l/w600k_r50.onnx``),
                run with onnxruntime on the standard 112x112 ArcFace crop.
``dlib``        dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1.dat``), shipped in
                the ``face-recognition-models`` package, so one recogniser always works offline. It stands
                in for the paper's unreleased in-house model.

Nothing is downloaded. A recogniser whose files are missing raises ``WeightsNotFoundError`` saying what
to put where; ``load_recognizers`` turns that into a skip with the message for the default set.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import CheckpointError, InputError, LynxError, WeightsNotFoundError

log = logging.getLogger("lynx.evaluation")

# Column order of the paper's table (facexlib, insightface, in-house), dlib standing in for in-house.
RECOGNIZERS = ("facexlib", "insightface", "dlib")

INSIGHTFACE_CANDIDATES = ("buffalo_l/w600k_r50.onnx", "w600k_r50.onnx", "antelopev2/glintr100.onnx",
                          "glintr100.onnx")
INSIGHTFACE_PACK_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"
DLIB_RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_SHAPE5_FILE = "shape_predictor_5_face_landmarks.dat"


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms < 1e-12):
        raise LynxError("a recogniser returned a zero or non-finite embedding")
    return x / norms


class Recognizer:
    """``embed(image, faces) -> (N, D)`` unit-norm embeddings for faces detected in an RGB uint8 image."""

    name = "base"
    description = ""

    def embed(self, image: np.ndarray, faces: Sequence) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _aligned_crops(image: np.ndarray, faces: Sequence) -> np.ndarray:
    from ..face import align_arcface

    return np.stack([align_arcface(image, f.keypoints) for f in faces])


class FacexlibRecognizer(Recognizer):
    """ArcFace IR-SE50 (facexlib's weights) on the 112x112 five-point crop, via lynx.face."""

    name = "facexlib"
    description = "ArcFace IR-SE50, facexlib weights"

    def __init__(self, weights: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None,
                 device: str = "cpu", model=None):
        from ..face import arcface_path, load_arcface

        if model is None:
            path = Path(weights) if weights is not None else arcface_path(models_dir)
            model = load_arcface(path, device)
            self.source = str(path)
        else:
            self.source = "(in-memory model)"
        self.model = model.eval()

    def embed(self, image, faces):
        from ..face import embed

        if not faces:
            return np.zeros((0, 512), np.float32)
        return _unit_rows(np.atleast_2d(embed(self.model, _aligned_crops(image, faces))))


def find_insightface_model(models_dir: str | os.PathLike | None = None) -> Path | None:
    """The first recognition ONNX file of an insightface pack under models_dir or ~/.insightface/models."""
    roots = [Path(models_dir).expanduser()] if models_dir is not None else []
    roots.append(Path.home() / ".insightface" / "models")
    for root in roots:
        for rel in INSIGHTFACE_CANDIDATES:
            if (root / rel).is_file():
                return root / rel
    return None


def _onnx_input_normalisation(path: Path) -> tuple[float, float]:
    # insightface's own rule (model_zoo/arcface_onnx.py): MXNet exports subtract and scale inside the graph,
    # so they take raw pixels; every other pack model takes (x - 127.5) / 127.5.
    try:
        import onnx
    except ImportError:
        return 127.5, 127.5
    try:
        nodes = onnx.load(str(path), load_external_data=False).graph.node[:8]
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable ONNX model: {exc}") from exc
    names = [n.name for n in nodes]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


class InsightfaceRecognizer(Recognizer):
    """insightface's recognition ONNX model (e.g. buffalo_l/w600k_r50.onnx) on the ArcFace crop."""

    name = "insightface"
    description = "insightface recognition model (ONNX)"

    def __init__(self, model_path: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None,
                 providers: Sequence[str] | None = None):
        from ..runtime import face_models_dir

        path = Path(model_path).expanduser() if model_path is not None else \
            find_insightface_model(models_dir if models_dir is not None else face_models_dir())
        if path is None or not path.is_file():
            where = str(path) if path is not None else \
                f"{Path(models_dir or face_models_dir()).expanduser()} or ~/.insightface/models"
            raise WeightsNotFoundError(
                f"insightface recognition model not found in {where}. Download {INSIGHTFACE_PACK_URL} and unpack "
                f"it there (giving buffalo_l/w600k_r50.onnx), or pass --insightface-model FILE.onnx.")
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise WeightsNotFoundError("the insightface recogniser needs onnxruntime: `pip install onnxruntime`") \
                from exc
        self.source = str(path)
        self.mean, self.std = _onnx_input_normalisation(path)
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path), providers=list(providers))
        except Exception as exc:
            raise CheckpointError(f"onnxruntime cannot load {path}: {exc}") from exc
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4 or shape[1] != 3 or shape[2:] != [112, 112]:
            raise CheckpointError(f"{path} takes input {shape}; a face recognition model takes [N, 3, 112, 112]")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None

    def embed(self, image, faces):
        if not faces:
            return np.zeros((0, 512), np.float32)
        # insightface feeds cv2.dnn.blobFromImages(BGR, swapRB=True), i.e. RGB: our crops go in as they are.
        x = (_aligned_crops(image, faces).astype(np.float32) - self.mean) / self.std
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        if self.fixed_batch:
            out = np.concatenate([self.session.run(None, {self.input_name: x[i:i + 1]})[0]
                                  for i in range(len(x))])
        else:
            out = self.session.run(None, {self.input_name: x})[0]
        return _unit_rows(out.reshape(len(x), -1))


class DlibRecognizer(Recognizer):
    """dlib's ResNet descriptor: 5-point landmarks fitted in the detected box, then dlib's own 150x150 chip."""

    name = "dlib"
    description = "dlib ResNet face descriptor (face-recognition-models)"

    def __init__(self, models_dir: str | os.PathLike | None = None):
        from ..face.detection import dlib_model_path

        try:
            import dlib
        except ImportError as exc:
            raise WeightsNotFoundError("the dlib recogniser needs the dlib module: `pip install dlib-bin`") from exc
        rec = dlib_model_path(DLIB_RECOGNITION_FILE, models_dir)
        shape5 = dlib_model_path(DLIB_SHAPE5_FILE, models_dir)
        self.source = str(rec)
        self._dlib = dlib
        self.model = dlib.face_recognition_model_v1(str(rec))
        self.shape = dlib.shape_predictor(str(shape5))

    def embed(self, image, faces):
        if not faces:
            return np.zeros((0, 128), np.float32)
        img = np.ascontiguousarray(image)
        shapes = self._dlib.full_object_detections()
        for f in faces:
            x1, y1, x2, y2 = (int(round(float(v))) for v in f.box)
            # Landmarks are refitted inside the box, so the descriptor does not depend on which
            # detector found the face beyond its box.
            shapes.append(self.shape(img, self._dlib.rectangle(x1, y1, x2 - 1, y2 - 1)))
        out = self.model.compute_face_descriptor(img, shapes)
        return _unit_rows(np.array([np.array(d) for d in out]))


def load_recognizer(name: str, models_dir=None, arcface_weights=None, insightface_model=None,
                    device: str = "cpu") -> Recognizer:
    """One recogniser by column name; raises WeightsNotFoundError (with what to download) when files are missing."""
    if name == "facexlib":
        if arcface_weights is not None and not isinstance(arcface_weights, (str, os.PathLike)):
            return FacexlibRecognizer(model=arcface_weights)  # a loaded network (e.g. a FaceAnalyzer's)
        return FacexlibRecognizer(arcface_weights, models_dir, device)
    if name == "insightface":
        return InsightfaceRecognizer(insightface_model, models_dir)
    if name == "dlib":
        return DlibRecognizer(models_dir)
    raise InputError(f"unknown recogniser {name!r}; choose from {', '.join(RECOGNIZERS)}")


def load_recognizers(names: Iterable[str] | None = None, *, models_dir=None, arcface_weights=None,
                     insightface_model=None, device: str = "cpu",
                     on_skip: Callable[[str, str], None] | None = None) -> tuple[list[Recognizer], dict[str, str]]:
    """The recognisers to score with, and {name: reason} for those skipped.

    names=None means all three, and any whose files are missing is skipped with its message (passed to
    `on_skip`, else logged as a warning). Names asked for explicitly are required: a missing one raises.
    """
    explicit = names is not None
    names = list(dict.fromkeys(names)) if explicit else list(RECOGNIZERS)
    unknown = [n for n in names if n not in RECOGNIZERS]
    if unknown:
        raise InputError(f"unknown recogniser(s) {', '.join(unknown)}; choose from {', '.join(RECOGNIZERS)}")
    loaded, skipped = [], {}
    for name in names:
        try:
            loaded.append(load_recognizer(name, models_dir, arcface_weights, insightface_model, device))
        except WeightsNotFoundError as exc:
            if explicit:
                raise
            skipped[name] = str(exc)
            (on_skip or (lambda n, m: log.warning("skipping the %s recogniser: %s", n, m)))(name, str(exc))
    if not loaded:
        raise WeightsNotFoundError("no face recogniser could be loaded:\n" +
                                   "\n".join(f"  {k}: {v}" for k, v in skipped.items()))
    return loaded, skipped
