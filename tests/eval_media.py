"""Real photos that ship in installed packages, and "videos" made from them, for the evaluation tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image


def insightface_images() -> Path:
    # Located without importing insightface (which pulls in OpenCV); it is in the test extra.
    spec = importlib.util.find_spec("insightface")
    assert spec is not None, "insightface (in lynx's test extra) is not installed; its sample photos are needed"
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "images"


def moving_video(photo: np.ndarray, n: int = 8, size: int = 300) -> np.ndarray:
    """The photo scaled from 0.85x to 1.2x and shifted by up to 40 px over n frames, on a grey canvas."""
    frames = []
    h, w = photo.shape[:2]
    for k in range(n):
        s = 0.85 + 0.35 * k / (n - 1)
        img = np.asarray(Image.fromarray(photo).resize((max(1, int(w * s)), max(1, int(h * s))), Image.BILINEAR))
        canvas = np.full((size, size, 3), 120, np.uint8)
        dx, dy = int(40 * k / (n - 1)) - 20, 10 - int(20 * k / (n - 1))
        x0, y0 = (size - img.shape[1]) // 2 + dx, (size - img.shape[0]) // 2 + dy
        sx0, sy0 = max(0, -x0), max(0, -y0)
        tx0, ty0 = max(0, x0), max(0, y0)
        ch, cw = min(img.shape[0] - sy0, size - ty0), min(img.shape[1] - sx0, size - tx0)
        canvas[ty0:ty0 + ch, tx0:tx0 + cw] = img[sy0:sy0 + ch, sx0:sx0 + cw]
        frames.append(canvas)
    return np.stack(frames)
