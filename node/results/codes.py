"""Coded concepts the results writer uses, in one place so a reviewer can check them against PS3.16.

Everything here is either a standard code (DCM, SCT, LOINC, UCUM, RFC5646) or lives in the node's
private scheme ``99AINODE``, which every object that uses it declares in its Coding Scheme
Identification Sequence.
"""

from __future__ import annotations

from collections.abc import Iterable

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from pipelines.base import PRIVATE_SCHEME, Code

# --- DCM
FINDING = CodedConcept("121071", "DCM", "Finding")
COMMENT = CodedConcept("121106", "DCM", "Comment")
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
IMPRESSION = CodedConcept("121073", "DCM", "Impression")
RECOMMENDATION = CodedConcept("121075", "DCM", "Recommendation")
OF_INTEREST = CodedConcept("113000", "DCM", "Of Interest")
SOURCE_IMAGE_PURPOSE = CodedConcept("121322", "DCM", "Source image for image processing operation")
PROCEDURE_REPORTED = CodedConcept("121058", "DCM", "Procedure reported")
DEVICE = CodedConcept("121007", "DCM", "Device")
IMAGING_MEASUREMENT_REPORT = CodedConcept("126000", "DCM", "Imaging Measurement Report")
# TID 1500 row 12 container for free-standing qualitative evaluations (text allowed there).
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")

# --- SCT
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
YES = CodedConcept("373066001", "SCT", "Yes")
NO_ABNORMALITY = CodedConcept("281900007", "SCT", "No abnormality detected")

# --- LOINC (TID 2000)
DIAGNOSTIC_IMAGING_REPORT = CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
FINDINGS_SECTION = CodedConcept("59776-5", "LN", "Findings")
IMPRESSIONS_SECTION = CodedConcept("19005-8", "LN", "Impressions")
RECOMMENDATIONS_SECTION = CodedConcept("18783-1", "LN", "Recommendations")
CRITICAL_SECTION = CodedConcept("73568-8", "LN", "Communication of Critical Results")
PROCEDURE_CT = CodedConcept("25045-6", "LN", "CT unspecified body region")
PROCEDURE_XR = CodedConcept("43468-8", "LN", "XR unspecified body region")
PROCEDURE_MR = CodedConcept("25056-3", "LN", "MRI unspecified body region")
PROCEDURE_GENERIC = CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")

# --- private
CRITICAL_RESULT = CodedConcept("CRITICAL", PRIVATE_SCHEME, "Critical result")
MODEL_STATUS = CodedConcept("MODELSTATUS", PRIVATE_SCHEME, "Model verification status")
#: The operating threshold a finding's probability was compared with (no standard code for it).
THRESHOLD = CodedConcept("THRESHOLD", PRIVATE_SCHEME, "Threshold for present")

LANGUAGES = {
    "en": CodedConcept("en", "RFC5646", "English"),
    "zh": CodedConcept("zh", "RFC5646", "Chinese"),
}

PROCEDURE_IMAGING = CodedConcept("363679005", "SCT", "Imaging procedure")

#: TID 2000 "Procedure reported" (any LOINC imaging procedure).
PROCEDURE_BY_MODALITY = {"CT": PROCEDURE_CT, "CR": PROCEDURE_XR, "DX": PROCEDURE_XR, "MR": PROCEDURE_MR}
#: TID 1500 "Procedure reported" must come from CID 100; PixelMed's copy of it predates the XR code.
PROCEDURE_CID100 = {"CT": PROCEDURE_CT, "MR": PROCEDURE_MR}


def concept(code: Code) -> CodedConcept:
    """pipelines.base.Code -> highdicom concept; pipelines stay free of highdicom."""
    return CodedConcept(code.value, code.scheme, code.meaning)


#: Short wording of NUMs beside an outline (an outlined finding's probability too: ``probability_of``), where
#: OHIF writes "<Code Meaning>: value unit" and nothing else (not the group or its finding site): "Paraspinal
#: muscle 1 mean: 54.12", "SD: 25.81" instead of two lines of "Standard deviation of attenuation coefficient"
#: running off the image. Codes are matched by value and scheme, not meaning (PS3.3 8.3); the wording is only
#: what a reader sees.
SHORT_MEANINGS = {("112181", "DCM"): "mean", ("112183", "DCM"): "SD"}


def probability_of(finding: str) -> CodedConcept:
    """(122157, DCM) "Probability of Pneumothorax": beside an outline, "Probability: 0.62" says not of what."""
    return CodedConcept(PROBABILITY.value, PROBABILITY.scheme_designator, f"Probability of {finding}"[:64])


def outline_concept(code: Code, region_label: str, first: bool) -> CodedConcept:
    """The concept of a NUM in a drawn group, worded to be read beside its outline in a viewer."""
    short = SHORT_MEANINGS.get((code.value, code.scheme))
    if short is None:
        return concept(code)
    meaning = f"{region_label} {short}" if first and region_label else short
    return CodedConcept(code.value, code.scheme, meaning[:64])


def language(tag: str) -> CodedConcept:
    return LANGUAGES.get(tag, CodedConcept(tag, "RFC5646", tag))


def _walk_codes(ds: Dataset) -> Iterable[str]:
    for elem in ds:
        if elem.VR != "SQ":
            continue
        for item in elem.value:
            if "CodingSchemeDesignator" in item:
                yield str(item.CodingSchemeDesignator)
            yield from _walk_codes(item)


def declare_private_scheme(ds: Dataset) -> None:
    """Add 99AINODE to CodingSchemeIdentificationSequence when the object uses it (PS3.3 C.12.1.1.6)."""
    if PRIVATE_SCHEME not in set(_walk_codes(ds)):
        return
    seq = list(ds.get("CodingSchemeIdentificationSequence", []))
    if any(getattr(i, "CodingSchemeDesignator", "") == PRIVATE_SCHEME for i in seq):
        return
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "ainode private codes"
    item.CodingSchemeResponsibleOrganization = "ainode"
    seq.append(item)
    ds.CodingSchemeIdentificationSequence = seq

# --- TID 1500 containers and TID 300 modifiers used for study-level content (see README.md)
IMAGING_MEASUREMENTS = CodedConcept("126010", "DCM", "Imaging Measurements")
DERIVED_IMAGING_MEASUREMENTS = CodedConcept("126011", "DCM", "Derived Imaging Measurements")
EQUIVALENT_MEANING = CodedConcept("121050", "DCM", "Equivalent Meaning of Concept Name")
