"""Lynx: personalized video generation on Wan2.1 with the released ID- and Ref-adapters.

    from lynx import LynxPipeline
    pipe = LynxPipeline.from_pretrained("models/Wan2.1-T2V-14B-Diffusers", adapter="models/lynx_full",
                                        torch_dtype=torch.bfloat16, device="cuda")
    video = pipe("A person carves a pumpkin ...", image="me.jpg").frames[0]
"""

__version__ = "0.1.0"

from .runtime import quiet_import_notices  # noqa: E402

quiet_import_notices()

from .errors import (  # noqa: E402
    CheckpointError,
    InputError,
    LynxError,
    NoFaceError,
    OutputError,
    ParallelError,
    SettingsError,
    UnsafeVideoError,
    WeightsNotFoundError,
)

# The rest is imported on first use: the `lynx` command answers --help and a mistyped setting without importing
# torch and diffusers (seconds), and `from lynx import LynxPipeline` works as usual.
_LAZY = {"AdapterConfig": "constants", "ResamplerConfig": "constants", "SamplingConfig": "constants",
         "FaceAnalyzer": "face", "FaceIdentity": "face", "Conditioning": "models.adapters",
         "LynxAttnProcessor": "models.adapters", "Resampler": "models.resampler", "parallelize": "pipelines.parallel",
         "LynxPipeline": "pipelines.pipeline_lynx", "GenerationSettings": "pipelines.settings"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["LynxPipeline", "GenerationSettings", "parallelize", "LynxAttnProcessor", "Conditioning", "FaceAnalyzer",
           "FaceIdentity", "Resampler", "AdapterConfig", "ResamplerConfig", "SamplingConfig", "LynxError",
           "InputError", "SettingsError", "OutputError", "CheckpointError", "NoFaceError", "ParallelError",
           "UnsafeVideoError", "WeightsNotFoundError"]
