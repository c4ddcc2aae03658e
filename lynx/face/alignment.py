"""Five-point face alignment: the ArcFace 112x112 crop (ID-adapter) and the 256x256 reference crop (Ref-adapter).

Made as the authors made them, so both crops are pixel-identical to theirs for the same keypoints:
the template is computed in float32, the similarity transform (rotation, uniform scale, translation)
is scikit-image's least-squares fit of the float32 keypoints onto it (insightface's ``estimate_norm``),
and the photo is resampled with OpenCV's ``warpAffine``: bilinear with OpenCV's fixed-point weights,
black outside the photo. OpenCV 4.x does this identically across releases (4.10 to 4.14 checked
against the authors' 4.11); OpenCV 5 rounds differently (up to 4 grey levels on ~5 % of pixels).
Keypoint order: image-left eye, image-right eye, nose tip, image-left and image-right mouth corner.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
from skimage.transform import SimilarityTransform

from ..errors import InputError

log = logging.getLogger("lynx.face")

ARCFACE_SIZE = 112
REFERENCE_SIZE = 256

# The standard ArcFace 112x112 template; points are in pixel coordinates of the aligned crop.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963],
     [73.5318, 51.5014],
     [56.0252, 71.7366],
     [41.5493, 92.3655],
     [70.7299, 92.2041]], dtype=np.float32)

# The reference crop shows more forehead, chin and hair than the recognition crop: the template is
# moved down by 10 px and shrunk by 0.8 about the centre of the 112 square.
REFERENCE_SHIFT_Y = 10.0
REFERENCE_SCALE = 0.8

if int(cv2.__version__.split(".")[0]) >= 5:
    log.warning("OpenCV %s resamples face crops differently from the OpenCV 4 the Lynx authors used (up to 4 grey "
                "levels); install opencv-python-headless<5 (and opencv-python<5 if insightface is installed) "
                "for their exact crops", cv2.__version__)


def reference_template(size: int = REFERENCE_SIZE) -> np.ndarray:
    """The extended template in pixel coordinates of a size x size crop (float32, (5, 2)).

    Every step is float32 arithmetic, as in the authors' code, so the fitted transform is theirs to the bit.
    """
    t = ARCFACE_TEMPLATE.copy()
    t[:, 1] = t[:, 1] + np.float32(REFERENCE_SHIFT_Y)
    t = (t - ARCFACE_SIZE / 2) * REFERENCE_SCALE + ARCFACE_SIZE / 2
    return t * (size / ARCFACE_SIZE)


def arcface_template(size: int = ARCFACE_SIZE) -> np.ndarray:
    """The ArcFace template scaled to a size x size crop (float32, (5, 2))."""
    return ARCFACE_TEMPLATE * (size / ARCFACE_SIZE)


def _check_keypoints(keypoints) -> np.ndarray:
    kps = np.asarray(keypoints)
    if kps.shape != (5, 2):
        raise InputError(f"face keypoints must have shape (5, 2), got {kps.shape}")
    if not np.issubdtype(kps.dtype, np.number) or not np.all(np.isfinite(kps)):
        raise InputError("face keypoints contain NaN or infinite values")
    # Detectors give float32 keypoints (insightface's kps are float32); the fit runs in that precision.
    return kps.astype(np.float32)


def estimate_transform(keypoints, template) -> np.ndarray:
    """3x3 matrix of the similarity transform that maps the keypoints onto the template."""
    src = _check_keypoints(keypoints)
    dst = np.asarray(template, dtype=np.float32)
    if hasattr(SimilarityTransform, "from_estimate"):
        tform = SimilarityTransform.from_estimate(src, dst)
        ok = bool(tform)
    else:  # scikit-image < 0.26
        tform = SimilarityTransform()
        ok = tform.estimate(src, dst)
    if not ok or not np.all(np.isfinite(tform.params)) or abs(np.linalg.det(tform.params[:2, :2])) < 1e-12:
        raise InputError(f"cannot align a face on degenerate keypoints {src.round(1).tolist()}")
    return np.asarray(tform.params, dtype=np.float64)


def warp_face(image: np.ndarray, keypoints, template, size: int) -> np.ndarray:
    """Warp an RGB uint8 image so that the keypoints land on the template; returns (size, size, 3) uint8."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InputError(f"expected an RGB uint8 image (H, W, 3), got {img.dtype} {img.shape}; "
                         f"use lynx.face.load_image first")
    matrix = estimate_transform(keypoints, template)
    # Reads the photo in place (no float copy), so a large photo costs nothing beyond its own pixels.
    return cv2.warpAffine(img, matrix[:2], (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def align_arcface(image: np.ndarray, keypoints) -> np.ndarray:
    """The 112x112 RGB crop the ArcFace network reads."""
    return warp_face(image, keypoints, ARCFACE_TEMPLATE, ARCFACE_SIZE)


def align_reference(image: np.ndarray, keypoints) -> np.ndarray:
    """The 256x256 RGB reference crop for the Ref-adapter (extended template, black border)."""
    return warp_face(image, keypoints, reference_template(REFERENCE_SIZE), REFERENCE_SIZE)


def transform_points(matrix: np.ndarray, points) -> np.ndarray:
    """Apply a 3x3 (or 2x3) affine matrix to (N, 2) points."""
    pts = np.asarray(points, dtype=np.float64)
    m = np.asarray(matrix, dtype=np.float64)
    return pts @ m[:2, :2].T + m[:2, 2]
