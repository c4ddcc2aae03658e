"""Reading a user's photo into the one form the face code works on: an (H, W, 3) uint8 RGB array.

Handles what real photos bring: EXIF orientation, grayscale, palette and alpha (composited on white),
CMYK, 16-bit and float data, and files that are missing, corrupt or not images at all; each failure
is an InputError that names the file. A large photo is held at most twice at once while it is read
(Pillow's decoded image and the array), and Pillow's decompression-bomb warning becomes a log line.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

log = logging.getLogger("lynx.face")
ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]

# Transparent pixels of cut-out portraits become white, the backdrop photos of people usually have.
_ALPHA_BACKGROUND = 255


def describe_source(obj) -> str:
    """A short name for messages: the file name of a path, "" for in-memory images."""
    if isinstance(obj, (str, os.PathLike)):
        return str(obj)
    name = getattr(obj, "filename", "") if isinstance(obj, Image.Image) else ""
    return str(name or "")


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise InputError(f"image file not found: {path}")
    if path.is_dir():
        raise InputError(f"expected an image file, got a directory: {path}")
    try:
        with warnings.catch_warnings():
            # Large photos are expected (the crop is cut at full resolution); the size is logged below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            # Decoding is lazy; force it here so truncated files fail with a clear message.
            img.load()
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path} is too large to decode safely ({exc}); save a smaller copy, e.g. 4000 px on "
                         f"the longer side") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{path} is not an image file Pillow can read (JPEG, PNG, WebP, ...)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path} is a corrupt or truncated image: {exc}") from exc
    w, h = img.size
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        log.info("%s is a very large photo (%dx%d, %.0f megapixels, %.1f GB decoded); faces are detected on a "
                 "smaller copy and cropped from the full photo", path, w, h, w * h / 1e6, w * h * 3 / 1e9)
    return img


# Pillow's array conversion serialises the whole image first; copying bands bounds the extra memory to one band.
_BAND_BYTES = 16 << 20


def _rgb_array(img: Image.Image) -> np.ndarray:
    w, h = img.size
    if w * h * 3 <= _BAND_BYTES:
        return np.array(img, dtype=np.uint8)
    out = np.empty((h, w, 3), np.uint8)
    band = max(1, _BAND_BYTES // (w * 3))
    for top in range(0, h, band):
        out[top:top + band] = np.asarray(img.crop((0, top, w, min(h, top + band))))
    return out


def _composite_alpha(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    out = rgb * alpha + _ALPHA_BACKGROUND * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _from_pil(img: Image.Image, name: str, owned: bool = False) -> np.ndarray:
    """owned: the image was opened here, so it may be rotated in place (a caller's image is left as it was)."""
    try:
        rotated = ImageOps.exif_transpose(img, in_place=owned)
        img = img if owned else rotated
    except Exception:  # a broken EXIF block should not stop us; orientation is then as stored
        pass
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grayscale: scale the full 16-bit range down; convert("L") would clip instead.
        arr = np.asarray(img).astype(np.float64) / 257.0
        return _gray_to_rgb(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if mode in ("I", "F"):
        return _from_array(np.asarray(img), name)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        return _composite_alpha(np.asarray(img.convert("RGBA")))
    if mode != "RGB":
        # CMYK, YCbCr, LAB, HSV, L, 1, P: Pillow's own conversions are right for these.
        img = img.convert("RGB")
    return _rgb_array(img)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


def _to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return np.clip(np.rint(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        hi = arr.max() if arr.size else 0
        # Pillow's "I" mode holds 16-bit PNG data; anything above 255 means a 16-bit range.
        scale = 257.0 if hi > 255 else 1.0
        return np.clip(np.rint(arr.astype(np.float64) / scale), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise InputError(f"image {name or '(array)'} contains NaN or infinite values")
        hi = float(arr.max()) if arr.size else 0.0
        # Float images in [0, 1] are the common convention (skimage, torch); larger means 0..255.
        scale = 255.0 if hi <= 1.0 else 1.0
        return np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    raise InputError(f"unsupported image array dtype {arr.dtype} for {name or '(array)'}")


def _from_array(arr: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        return _gray_to_rgb(_to_uint8(arr, name))
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"image array must be (H, W), (H, W, 3) RGB or (H, W, 4) RGBA, got shape {arr.shape}"
                         + (f" ({name})" if name else ""))
    arr = _to_uint8(arr, name)
    if arr.shape[2] == 4:
        return _composite_alpha(arr)
    return np.ascontiguousarray(arr)


def load_image(source: ImageLike) -> np.ndarray:
    """Any supported photo (path, PIL image or array) -> (H, W, 3) uint8 RGB.

    Arrays are taken as RGB (not OpenCV's BGR); float arrays as [0, 1] when their maximum is at most 1.
    """
    name = describe_source(source)
    if isinstance(source, (str, os.PathLike)):
        arr = _from_pil(_open(Path(source).expanduser()), name, owned=True)
    elif isinstance(source, Image.Image):
        try:
            source.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"image {name or '(PIL image)'} cannot be decoded: {exc}") from exc
        arr = _from_pil(source, name)
    elif isinstance(source, np.ndarray):
        arr = _from_array(source, name)
    else:
        raise InputError(f"expected an image path, PIL image or numpy array, got {type(source).__name__}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(f"image {name or '(array)'} is empty ({arr.shape[1]}x{arr.shape[0]})")
    return arr
