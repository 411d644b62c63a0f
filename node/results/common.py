"""Pieces every result object shares: device observer, algorithm identification, series naming, UIDs."""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    DeviceObserverIdentifyingAttributes,
    ObservationContext,
    ObserverContext,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines.base import PipelineResult

from .sources import SOPRef

ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
MEASUREMENT_SR = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34"}
UNVERIFIED_TEXT = "UNVERIFIED MODEL — NOT FOR CLINICAL USE"
DRAFT_TEXT = "AI-generated draft — requires review by a physician"
NOT_FOR_DIAGNOSIS = "AI RESULT — NOT FOR DIAGNOSIS"
CHARSET = "ISO_IR 192"  # our own texts carry em dashes and may be Chinese; UTF-8 covers both


@dataclass
class Context:
    """What the object builders need besides the result: options resolved once per encode() call."""

    language: str
    sr_class: str
    predecessors: list[SOPRef]
    institution: str
    manufacturer: str
    device_uid: str
    series_number_base: int

    def series_number(self, offset: int) -> int:
        return self.series_number_base + offset

    def previous_versions(self, narrative: bool) -> list[Dataset] | None:
        """Predecessors of the same kind (measurement SR <- measurement SR, narrative <- narrative).

        A caller that hands us every SR of the previous run gets each new document pointing at the
        one it replaces; predecessors of unknown kind are listed on both rather than dropped.
        """
        kind = [p for p in self.predecessors if (p.sop_class_uid == ENHANCED_SR) == narrative]
        other = [p for p in self.predecessors if p.sop_class_uid not in MEASUREMENT_SR | {ENHANCED_SR}]
        chosen = kind + [p for p in other if p not in kind] if kind else list(self.predecessors)
        return [p.as_dataset() for p in chosen] or None


def model_name(result: PipelineResult) -> str:
    return result.model.name if result.model else result.pipeline


def model_version(result: PipelineResult) -> str:
    return result.model.version if result.model else result.pipeline_version


def algorithm(result: PipelineResult) -> AlgorithmIdentification:
    """TID 4019; the weights hash goes in as a parameter so a report names the exact file that ran."""
    params = [f"pipeline={result.pipeline} {result.pipeline_version}"]
    if result.model and result.model.sha256:
        params.append(f"weights-sha256={result.model.sha256}")
    if result.unverified:
        params.append("model-verified=false")
    elif result.model and result.model.evaluation:
        params.append(f"model-verified=true; {result.model.evaluation}")
    return AlgorithmIdentification(name=model_name(result)[:64], version=model_version(result)[:64],
                                   parameters=params)


def device_observer(result: PipelineResult, ctx: Context) -> ObserverContext:
    attrs = DeviceObserverIdentifyingAttributes(
        uid=ctx.device_uid, name=f"ainode {result.pipeline}"[:64], manufacturer_name=ctx.manufacturer[:64],
        model_name=model_name(result)[:64])
    return ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=attrs)


def observation_context(result: PipelineResult, ctx: Context) -> ObservationContext:
    return ObservationContext(observer_device_context=device_observer(result, ctx))


def series_description(result: PipelineResult, what: str) -> str:
    """LO is 64 characters; the prefix must survive truncation because PACS rules match on it."""
    flag = " UNVERIFIED" if result.unverified else ""
    return f"AI RESULT{flag} {what} {result.pipeline}"[:64]


def new_uid() -> str:
    return str(hd.UID())
