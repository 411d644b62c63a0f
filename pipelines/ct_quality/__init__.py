"""CT image quality and dose: global noise level, automatic ROIs, SNR / CNR, SSDE, DRL comparison,
per-series verdicts and reconstruction comparison. Entry point: ``CTQualityPipeline``."""

from pipelines.ct_quality.pipeline import CTQualityPipeline

__all__ = ["CTQualityPipeline"]
