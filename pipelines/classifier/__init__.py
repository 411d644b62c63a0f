"""Generic manifest-driven classifier pipeline (entry point ``classifier``)."""

from .pipeline import ClassifierPipeline, aggregate
from .preprocess import apply_window, preprocess
from .spec import ClassifierSpec, load_classifier, split_manifest

__all__ = ["ClassifierPipeline", "ClassifierSpec", "aggregate", "apply_window", "load_classifier", "preprocess",
           "split_manifest"]
