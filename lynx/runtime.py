"""The machine a run happens on: model directories from the environment, devices and dtypes.

Environment variables are read here and nowhere else in the library, so a reader finds every
setting that does not come through a function argument in one page.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .constants import DTYPE_NAMES
from .errors import EnvironmentProblem, option

if TYPE_CHECKING:
    import torch

MODELS_ENV = "LYNX_MODELS"
FACE_MODELS_ENV = "LYNX_FACE_MODELS"
SAFETY_MODEL_ENV = "LYNX_SAFETY_MODEL"
BASE_DIR_NAME = "Wan2.1-T2V-14B-Diffusers"
SAFETY_DIR_NAME = "nsfw_image_detection"



def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))


def __getattr__(name: str):
    # `DTYPES` (the one dtype vocabulary of the command line, configs and sidecars: DTYPE_NAMES as torch dtypes) is
    # built on first use, so that `lynx --help` and a mistyped setting answer without importing torch.
    if name == "DTYPES":
        globals()["DTYPES"] = dtypes = _torch_dtypes()
        return dtypes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Optional libraries that announce at import time, through `logging`, what they could not load: torchao's wheel
# built for another torch (its C++ kernels, its enum registrations, its tensor types in diffusers' safe globals).
# None of it concerns a Lynx run, and it would precede every message of the `lynx` command; errors still show.
IMPORT_NOTICES = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao")


def quiet_import_notices() -> None:
    """Raise the import-notice loggers above to ERROR; called by `import lynx`, before diffusers is imported."""
    for name in IMPORT_NOTICES:
        logging.getLogger(name).setLevel(logging.ERROR)


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
    """The device (default: the current CUDA device, else CPU) and torch dtype (default bf16 on CUDA, fp32 on CPU),
    checked against this machine (`EnvironmentProblem` naming the fix)."""
    import torch

    device = check_device(device) if device else (
        f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise EnvironmentProblem(f"{option('dtype', dtype)} is not one of {', '.join(DTYPE_NAMES)}")
    return device, _torch_dtypes()[dtype or ("bf16" if device.startswith("cuda") else "fp32")]


def check_device(device: str) -> str:
    """`device` if this machine has it, else an `EnvironmentProblem` that says what it has instead."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EnvironmentProblem(f"{option('device', device)} is not a device name (try cpu, cuda or cuda:0)") \
            from None
    if dev.type == "cpu":
        return str(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EnvironmentProblem(f"{option('device', device)}: CUDA is not available on this machine (no NVIDIA "
                                     f"GPU, or torch {torch.__version__} built without CUDA); use "
                                     f"{option('device', 'cpu')}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise EnvironmentProblem(f"{option('device', device)}: this machine has {count} CUDA device(s), "
                                     f"cuda:0 to cuda:{count - 1}")
        return str(device)
    if dev.type == "mps" and torch.backends.mps.is_available():
        return str(device)
    raise EnvironmentProblem(f"{option('device', device)} is not available on this machine (use cpu"
                             f"{' or cuda' if torch.cuda.is_available() else ''})")


def check_attention_backend(name: str) -> str:
    """A diffusers attention backend name that exists and whose package is installed, else `EnvironmentProblem`."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    known = [b.value for b in AttentionBackendName]
    if name not in known:
        raise EnvironmentProblem(f"{option('attention_backend', name)} is not a diffusers attention backend "
                                 f"(known: {', '.join(known)})")
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError) as e:
        raise EnvironmentProblem(f"{option('attention_backend', name)} cannot run here: {e} (or leave "
                                 f"{option('attention_backend')} out for PyTorch's own attention)") from None
    return name


def launcher_ranks() -> tuple[int, int, int]:
    """(rank, local rank, world size) as `torchrun` sets them in the environment; (0, 0, 1) without it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")))
