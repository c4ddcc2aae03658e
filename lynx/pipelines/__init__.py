"""Generation: `LynxPipeline` on diffusers' Wan components, and `GenerationSettings`, the knobs of one call."""

__all__ = ["GenerationSettings", "LynxPipeline", "LynxPipelineOutput"]


def __getattr__(name: str):
    # Imported on first use: `lynx.pipelines.settings` (pydantic only) must not pull in diffusers through this file.
    if name in ("LynxPipeline", "LynxPipelineOutput"):
        from . import pipeline_lynx

        return getattr(pipeline_lynx, name)
    if name == "GenerationSettings":
        from .settings import GenerationSettings

        return GenerationSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
