"""Generation: `LynxPipeline` on diffusers' Wan components, and `GenerationSettings`, the knobs of one call."""

from .pipeline_lynx import LynxPipeline, LynxPipelineOutput
from .settings import GenerationSettings

__all__ = ["GenerationSettings", "LynxPipeline", "LynxPipelineOutput"]
