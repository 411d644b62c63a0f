"""What each model label means clinically: code, site, report group, and its words in English and Chinese.

Model label spellings differ between projects (``Effusion`` vs ``Pleural Effusion``,
``Pleural_Thickening``); ``concept_for`` folds them to one concept so the report, the SR codes and
the consistency check agree whichever model is installed.

Codes: SNOMED CT where REFERENCE.md lists them, plus pulmonary emphysema 87433001, radiologic
infiltrate of lung 409609008, pulmonary fibrosis 51615001 and fracture of bone 125605004 (checked
against public code tables). Concepts with no single agreed SNOMED code for the radiographic sign
(lung opacity, lung lesion, enlarged cardiomediastinum, pleural thickening, hernia as NIH labels it)
use the node's private scheme rather than a guessed code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pipelines.base import PRIVATE_SCHEME, Code

Group = Literal["lungs", "pleura", "heart", "bones", "other"]

SITE_LUNG = Code("39607008", "SCT", "Lung")


@dataclass(frozen=True)
class Concept:
    key: str
    code: Code
    group: Group
    en: str  # noun phrase as a report uses it
    zh: str
    observation: str  # CheXpert-style observation the labeller reads back
    site: Code | None = None


def _sct(value: str, meaning: str) -> Code:
    return Code(value, "SCT", meaning)


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


CONCEPTS: dict[str, Concept] = {c.key: c for c in [
    Concept("atelectasis", _sct("46621007", "Atelectasis"), "lungs", "atelectasis", "肺不张", "Atelectasis",
            SITE_LUNG),
    Concept("consolidation", _sct("95436008", "Consolidation of lung"), "lungs", "consolidation", "肺实变",
            "Consolidation", SITE_LUNG),
    Concept("infiltration", _sct("409609008", "Radiologic infiltrate of lung"), "lungs", "pulmonary infiltrate",
            "肺部浸润影", "Lung Opacity", SITE_LUNG),
    Concept("pneumothorax", _sct("36118008", "Pneumothorax"), "pleura", "pneumothorax", "气胸", "Pneumothorax"),
    Concept("edema", _sct("19242006", "Pulmonary edema"), "lungs", "pulmonary oedema", "肺水肿", "Edema",
            SITE_LUNG),
    Concept("emphysema", _sct("87433001", "Pulmonary emphysema"), "lungs", "emphysema", "肺气肿", "Emphysema",
            SITE_LUNG),
    Concept("fibrosis", _sct("51615001", "Pulmonary fibrosis"), "lungs", "pulmonary fibrosis", "肺纤维化",
            "Fibrosis", SITE_LUNG),
    Concept("effusion", _sct("60046008", "Pleural effusion"), "pleura", "pleural effusion", "胸腔积液",
            "Pleural Effusion"),
    Concept("pneumonia", _sct("233604007", "Pneumonia"), "lungs", "pneumonia", "肺炎", "Pneumonia", SITE_LUNG),
    Concept("pleural_thickening", _private("CXR-PLTHK", "Pleural thickening"), "pleura", "pleural thickening",
            "胸膜增厚", "Pleural Other"),
    Concept("cardiomegaly", _sct("8186001", "Cardiomegaly"), "heart", "cardiomegaly", "心影增大", "Cardiomegaly"),
    Concept("nodule", _sct("27925004", "Nodule of lung"), "lungs", "pulmonary nodule", "肺结节", "Lung Lesion",
            SITE_LUNG),
    Concept("mass", _sct("4147007", "Mass"), "lungs", "pulmonary mass", "肺部肿块", "Lung Lesion", SITE_LUNG),
    Concept("hernia", _private("CXR-HERNIA", "Hernia (hiatal or diaphragmatic) on chest radiograph"), "other",
            "hiatal or diaphragmatic hernia", "食管裂孔疝或膈疝", "Hernia"),
    Concept("lung_lesion", _private("CXR-LUNGLES", "Lung lesion on chest radiograph"), "lungs", "focal lung lesion",
            "肺内占位性病变", "Lung Lesion", SITE_LUNG),
    Concept("fracture", _sct("125605004", "Fracture of bone"), "bones", "fracture", "骨折", "Fracture"),
    Concept("lung_opacity", _private("CXR-LUNGOPAC", "Lung opacity on chest radiograph"), "lungs",
            "airspace opacity", "肺内片状密度增高影", "Lung Opacity", SITE_LUNG),
    Concept("enlarged_cardiomediastinum", _private("CXR-ENLCM", "Enlarged cardiomediastinal silhouette"), "heart",
            "widening of the cardiomediastinal silhouette", "心影及纵隔影增宽", "Enlarged Cardiomediastinum"),
]}

_ALIASES = {
    "pleuraleffusion": "effusion", "effusion": "effusion", "oedema": "edema", "pulmonaryedema": "edema",
    "infiltrate": "infiltration", "enlargedcardiomediastinum": "enlarged_cardiomediastinum",
    "pleuralthickening": "pleural_thickening", "lunglesion": "lung_lesion", "lungopacity": "lung_opacity",
}


def concept_for(label: str) -> Concept | None:
    """The concept behind a model label, or None for a label this pipeline does not know (it is then skipped)."""
    k = re.sub(r"[^a-z]", "", label.lower())
    key = _ALIASES.get(k, k)
    if key in CONCEPTS:
        return CONCEPTS[key]
    for c in CONCEPTS.values():
        if re.sub(r"[^a-z]", "", c.key) == key:
            return c
    return None


def op_norm(probability: float, threshold: float) -> float:
    """torchxrayvision's ``op_norm``: a raw sigmoid probability rescaled so that ``threshold`` maps to 0.5.

    Piecewise linear: ``p / (2 t)`` below the threshold, ``1 - (1 - p) / (2 (1 - t))`` at or above it.
    ainode reports the raw probability with its threshold beside it ("0.62, threshold 0.51") rather
    than this rescaled number; the function is here so that either can be derived from the other.
    """
    p, t = float(probability), float(threshold)
    return p / (2 * t) if p < t else 1.0 - (1.0 - p) / (2 * (1.0 - t))
