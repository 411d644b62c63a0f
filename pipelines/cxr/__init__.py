"""Chest radiograph pipeline: entry point ``cxr = pipelines.cxr:CXRPipeline``."""

from pipelines.cxr.pipeline import CXRPipeline

__all__ = ["CXRPipeline"]
