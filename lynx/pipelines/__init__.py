"""Generation: `LynxPipeline` on diffusers' Wan components."""

from .pipeline_lynx import LynxPipeline

__all__ = ["LynxPipeline"]
