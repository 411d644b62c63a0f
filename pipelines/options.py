"""Each pipeline's options as a model, so a misspelt or unknown option is refused where it is written
(``pipelines.<name>`` or a route's ``options``) instead of being silently ignored.

A pipeline declares ``Options`` (a pydantic model that forbids extra keys); a pipeline that declares none
(a site's own plug-in written before this existed) keeps accepting anything.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model


class PipelineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # set by the node for every job from node.allow_unverified_models; a route may set it too
    allow_unverified_models: bool = False


class ModelOptions(PipelineOptions):
    model: str | None = Field(None, description="manifest name under weights_dir, a model directory or a manifest")
    weights_dir: str | None = None
    providers: list[str] | None = Field(None, description="ONNX Runtime providers in preference order")


class ClassifierOptions(ModelOptions):
    pass


class CXROptions(ModelOptions):
    report_backend: Literal["template", "openai"] = "template"
    openai: dict[str, Any] = {}
    languages: list[Literal["en", "zh"]] | None = None
    min_size: int | None = Field(None, ge=1)
    min_symmetry: float | None = None
    min_lung_contrast: float | None = None
    cam_level: float = Field(0.5, gt=0, le=1)


class EchoOptions(PipelineOptions):
    pass


def ct_quality_options() -> type[PipelineOptions]:
    """Every top-level key of the packaged defaults.yaml, flat or under ``ct_quality``."""
    from pipelines.ct_quality.config import _defaults

    fields: dict[str, Any] = {k: (Any, None) for k in _defaults()}
    fields["ct_quality"] = (dict[str, Any] | None, None)
    return create_model("CTQualityOptions", __base__=PipelineOptions, **fields)  # type: ignore[call-overload]
