"""Face analysis for Lynx: photo -> detection with five keypoints -> aligned crops -> ArcFace embedding.

``FaceAnalyzer`` holds the detector and the ArcFace network (built once, passed to whatever analyses
photos); ``analyzer.analyze(photo)`` returns a ``FaceIdentity`` holding the 512-d embedding for the
ID-adapter, the 256x256 reference crop for the Ref-adapter, and which face of which photo they come
from. ``analyze(photo)`` is a one-off shortcut that builds the models for one call. Nothing is
downloaded: model files are read from ``lynx.runtime.face_models_dir()`` (``$LYNX_FACE_MODELS`` or
``~/.cache/lynx/face``). See docs/face.md.
"""

from .alignment import ARCFACE_TEMPLATE, align_arcface, align_reference, arcface_template, reference_template
from .analyzer import DETECT_MAX_SIDE, FaceAnalyzer, FoundFace, SeveralFacesWarning, analyze
from .arcface import (
                      ARCFACE_FILE,
                      ARCFACE_URL,
                      ArcFaceIRSE50,
                      arcface_missing,
                      arcface_path,
                      embed,
                      load_arcface,
                      preprocess,
)
from .detection import (
                        MIN_FACE_SIZE,
                        DetectedFace,
                        DlibDetector,
                        FaceDetector,
                        ScrfdDetector,
                        create_detector,
                        find_scrfd_model,
)
from .identity import FaceIdentity, IdentityMismatchWarning, combine, describe
from .image import load_image

__all__ = [
    "ARCFACE_FILE", "ARCFACE_TEMPLATE", "ARCFACE_URL", "DETECT_MAX_SIDE", "MIN_FACE_SIZE", "ArcFaceIRSE50",
    "DetectedFace", "DlibDetector", "FaceAnalyzer", "FaceDetector", "FaceIdentity", "FoundFace",
    "IdentityMismatchWarning", "ScrfdDetector", "SeveralFacesWarning", "align_arcface", "align_reference",
    "analyze", "arcface_missing", "arcface_path", "arcface_template", "combine", "create_detector", "describe",
    "embed", "find_scrfd_model", "load_arcface", "load_image", "preprocess", "reference_template",
]
