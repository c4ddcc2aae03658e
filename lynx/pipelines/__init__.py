"""Generation: `LynxPipeline` on diffusers' Wan components."""

from .pipeline_lynx import Identity, LynxPipeline

__all__ = ["Identity", "LynxPipeline"]
