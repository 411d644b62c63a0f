"""What a critical finding becomes: one event per finding, with the notes every channel carries."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from pipelines.base import Code, PipelineResult

REVIEW_NOTE = "AI-generated, requires physician review"
UNVERIFIED_NOTE = ("UNVERIFIED: the model that produced this result has not been verified for clinical use "
                   "at this site")

# DICOM coding scheme designators and their HL7 table 0396 equivalents (most are the same string).



@dataclass
class CriticalEvent:
    """One critical finding of one result, with what receivers need to find the study and act on it."""

    study_uid: str
    series_uids: list[str]
    accession_number: str
    patient_id: str  # HL7 only; never logged at INFO, never in the webhook
    finding: str
    code: Code
    probability: float | None
    model_name: str
    model_version: str
    unverified: bool
    received_at: float
    completed_at: float
    detected_at: float
    patient_name: str = ""  # DICOM PN (Family^Given^...), HL7 only
    patient_birth_date: str = ""
    patient_sex: str = ""
    patient_id_issuer: str = ""
    study_datetime: str = ""  # DICOM DA+TM, for OBR-7
    pipeline: str = ""
    job_id: str = ""

    def key(self, per_job: bool = False) -> str:
        """The event id: one notification per (study, finding, model) by default, so a re-sent series
        that reproduces the same critical finding does not page anyone twice; ``per_job`` gives one per job."""
        parts = [self.study_uid, self.code.scheme, self.code.value, self.model_name]
        if per_job:
            parts += [self.job_id, self.model_version, ",".join(sorted(self.series_uids))]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CriticalEvent:
        d = json.loads(text)
        d["code"] = Code(**d["code"])
        return cls(**d)


def events_from_result(result: PipelineResult, study_tags: dict[str, Any],
                       times: dict[str, Any]) -> list[CriticalEvent]:
    """Critical events of a result: one per present critical finding (and per critical evaluation).

    ``study_tags`` holds DICOM keywords (StudyInstanceUID, AccessionNumber, PatientID, PatientName,
    PatientBirthDate, PatientSex, IssuerOfPatientID, StudyDate, StudyTime) and optionally
    ``SeriesInstanceUIDs``: the series processed, used when a finding names no key image.
    ``times`` holds ``received`` (first instance), ``completed`` (study complete) and ``detected``
    (result available; defaults to now) as UNIX times, and optionally ``job_id``.
    A non-critical, refused or unavailable result gives no events.
    """
    if result.status != "ok" or not result.critical:
        return []
    now = time.time()
    study_uid = str(study_tags.get("StudyInstanceUID") or "")
    fallback_series = [str(s) for s in (study_tags.get("SeriesInstanceUIDs") or [])]
    model_name = result.model.name if result.model else result.pipeline
    model_version = result.model.version if result.model else result.pipeline_version
    detected = float(times.get("detected") or now)
    completed = float(times.get("completed") or detected)
    received = float(times.get("received") or completed)
    study_dt = f"{study_tags.get('StudyDate') or ''}{str(study_tags.get('StudyTime') or '').split('.')[0]}"

    def make(label: str, code: Code, probability: float | None, series: list[str]) -> CriticalEvent:
        return CriticalEvent(
            study_uid=study_uid, series_uids=series or fallback_series,
            accession_number=str(study_tags.get("AccessionNumber") or ""),
            patient_id=str(study_tags.get("PatientID") or ""), finding=label, code=code,
            probability=None if probability is None else float(probability), model_name=model_name,
            model_version=model_version, unverified=result.unverified, received_at=received,
            completed_at=completed, detected_at=detected, patient_name=str(study_tags.get("PatientName") or ""),
            patient_birth_date=str(study_tags.get("PatientBirthDate") or ""),
            patient_sex=str(study_tags.get("PatientSex") or ""),
            patient_id_issuer=str(study_tags.get("IssuerOfPatientID") or ""), study_datetime=study_dt,
            pipeline=result.pipeline, job_id=str(times.get("job_id") or ""))

    events = []
    for f in result.findings:
        if f.critical and f.present:
            series = sorted({r.series_uid for r in f.key_images} | {r.image.series_uid for r in f.regions})
            events.append(make(f.label or f.code.meaning, f.code, f.probability, series))
    for e in result.evaluations:
        if e.critical:
            events.append(make(f"{e.name.meaning}: {e.value.meaning}", e.value, None, []))
    return events


# =========================================================================== formatting
def iso_utc(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
