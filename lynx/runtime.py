"""The machine a run happens on: model directories from the environment, devices and dtypes.

Environment variables are read here and nowhere else in the library, so a reader finds every
setting that does not come through a function argument in one page.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

MODELS_ENV = "LYNX_MODELS"
FACE_MODELS_ENV = "LYNX_FACE_MODELS"
SAFETY_MODEL_ENV = "LYNX_SAFETY_MODEL"
BASE_DIR_NAME = "Wan2.1-T2V-14B-Diffusers"
SAFETY_DIR_NAME = "nsfw_image_detection"

# The one dtype vocabulary of the command line, configs and sidecars.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def models_root() -> Path:
    """Where weights are looked for by default: $LYNX_MODELS, else ./models (the authors' layout)."""
    return Path(os.environ.get(MODELS_ENV, "models"))


def default_base_dir() -> Path:
    return models_root() / BASE_DIR_NAME


def default_adapter_dir(variant: str = "full") -> Path:
    return models_root() / f"lynx_{variant}"


def face_models_dir() -> Path:
    """Where face models are looked for: $LYNX_FACE_MODELS, else ~/.cache/lynx/face."""
    env = os.environ.get(FACE_MODELS_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lynx" / "face"


def safety_model_dir() -> Path:
    """Where the safety gate's NSFW classifier is looked for: $LYNX_SAFETY_MODEL, else <models>/nsfw_image_detection."""
    env = os.environ.get(SAFETY_MODEL_ENV)
    return Path(env).expanduser() if env else models_root() / SAFETY_DIR_NAME


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[str, torch.dtype]:
    """The device (default: the current CUDA device, else CPU) and torch dtype (default bf16 on CUDA, fp32 on CPU)."""
    device = device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    return device, DTYPES[dtype or ("bf16" if device.startswith("cuda") else "fp32")]


def launcher_ranks() -> tuple[int, int, int]:
    """(rank, local rank, world size) as `torchrun` sets them in the environment; (0, 0, 1) without it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")))
