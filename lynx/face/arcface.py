"""ArcFace IR-SE50: the face-recognition network whose 512-d embedding feeds Lynx's ID-adapter.

The module tree mirrors the one facexlib builds for ``recognition_arcface_ir_se50.pth`` so that the
released file loads with ``strict=True`` and unchanged parameter names (``input_layer.*``, ``body.N.*``,
``output_layer.*``). Input: aligned 112x112 faces scaled to [-1, 1] with channels in BGR order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, InputError, WeightsNotFoundError
from ..runtime import face_models_dir

ARCFACE_FILE = "recognition_arcface_ir_se50.pth"
ARCFACE_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/recognition_arcface_ir_se50.pth"
EMBEDDING_DIM = 512
INPUT_SIZE = 112

# (input channels, output channels, number of units) per stage of IR-50; the first unit of every
# stage halves the resolution: 112 -> 56 -> 28 -> 14 -> 7.
_IR50_STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))


class SqueezeExcite(nn.Module):
    """Channel gate; 1x1 convolutions without bias, as in the released weights (fc1, fc2)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


class IRSEUnit(nn.Module):
    """Improved-residual unit with squeeze-excitation (pre-BN, PReLU, stride on the second conv)."""

    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        if in_channels == depth:
            # A 1x1 max-pool is a parameter-free subsampling shortcut; it keeps the key layout.
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, (3, 3), (1, 1), 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SqueezeExcite(depth, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class ArcFaceIRSE50(nn.Module):
    """IR-SE50 backbone: (N, 3, 112, 112) BGR in [-1, 1] -> (N, 512) unit-norm embeddings."""

    def __init__(self, dropout: float = 0.6):
        super().__init__()
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, 64, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        units = []
        for in_channels, depth, count in _IR50_STAGES:
            units.append(IRSEUnit(in_channels, depth, 2))
            units.extend(IRSEUnit(depth, depth, 1) for _ in range(count - 1))
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(512 * 7 * 7, EMBEDDING_DIM),
            nn.BatchNorm1d(EMBEDDING_DIM),
        )
        # The embedding is only meaningful with the stored BatchNorm statistics.
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise InputError(f"ArcFace expects (N, 3, 112, 112) input, got {tuple(x.shape)}")
        x = self.output_layer(self.body(self.input_layer(x)))
        return nn.functional.normalize(x, p=2, dim=1)


def preprocess(crops: np.ndarray) -> torch.Tensor:
    """Aligned RGB uint8 crops, (112, 112, 3) or (N, 112, 112, 3) -> (N, 3, 112, 112) float32.

    Values go to [-1, 1] (x / 127.5 - 1, the same as /255 then normalise with mean 0.5, std 0.5) and
    channels are reordered to BGR, the order the released network was trained on.
    """
    arr = np.asarray(crops)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
        raise InputError(f"ArcFace crops must be (112, 112, 3) RGB, got shape {np.asarray(crops).shape}")
    if arr.dtype != np.uint8:
        raise InputError(f"ArcFace crops must be uint8, got {arr.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    x = x / 127.5 - 1.0
    return x[:, [2, 1, 0]].contiguous()


@torch.no_grad()
def embed(model: nn.Module, crops: np.ndarray) -> np.ndarray:
    """Embeddings of aligned RGB crops: (512,) for one crop, (N, 512) for a batch; unit norm, float32."""
    single = np.asarray(crops).ndim == 3
    x = preprocess(crops)
    param = next(model.parameters())
    model.eval()
    out = model(x.to(device=param.device, dtype=param.dtype)).float().cpu().numpy()
    return out[0] if single else out


def _normalise_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Checkpoints re-saved from DataParallel carry a "module." prefix; the weights are the same.
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_state_dict_strict(model: ArcFaceIRSE50, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Load with strict=True, turning key or shape mismatches into a CheckpointError that lists them."""
    state = _normalise_keys(state)
    expected = model.state_dict()
    # Files written by old torch versions have no num_batches_tracked; torch fills those in itself.
    required = {k for k in expected if not k.endswith("num_batches_tracked")}
    missing = sorted(required - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    bad_shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(state.keys() & expected.keys())
                  if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad_shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} shape mismatches (e.g. {'; '.join(bad_shapes[:2])})")
        raise CheckpointError(
            f"{source} is not the ArcFace IR-SE50 checkpoint ({ARCFACE_FILE}): " + "; ".join(parts)
            + f". The expected file is published at {ARCFACE_URL}")
    model.load_state_dict(state, strict=True)
    model.eval()


def arcface_path(models_dir: str | os.PathLike | None = None) -> Path:
    """Where the ArcFace weight file is expected: <models_dir or face_models_dir()>/recognition_arcface_ir_se50.pth."""
    return Path(models_dir or face_models_dir()).expanduser() / ARCFACE_FILE


def arcface_missing(models_dir: str | os.PathLike | None = None) -> str | None:
    """What to download and where when the ArcFace file is absent; None when it is there."""
    path = arcface_path(models_dir)
    return None if path.is_file() else str(missing_weights_error(path))


def missing_weights_error(path: Path) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"ArcFace weights not found: {path}. Download {ARCFACE_FILE} from {ARCFACE_URL} and save it as "
        f"{path} (or set LYNX_FACE_MODELS to another directory that holds it). Nothing is downloaded "
        f"automatically.")


def load_arcface(path: str | os.PathLike, device: str | torch.device = "cpu") -> ArcFaceIRSE50:
    """Build IR-SE50 and load facexlib's released weight file from a local path (strict, eval mode)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise missing_weights_error(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"cannot read {path} as a torch checkpoint ({type(exc).__name__}: {exc}). Re-download "
            f"{ARCFACE_FILE} from {ARCFACE_URL}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors; expected {ARCFACE_FILE} "
                              f"from {ARCFACE_URL}")
    model = ArcFaceIRSE50()
    load_state_dict_strict(model, state, source=str(path))
    return model.to(device)
