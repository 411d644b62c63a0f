"""A rule-based, negation-aware reader of chest radiograph reports (CheXpert-style observations).

Why: generated text (template or language model) must say what the classifier found and nothing
else. Reading the text back with an independent, transparent labeller and comparing catches a
language model that drops a pneumothorax or invents an effusion, without trusting the generator.

Method (in the spirit of NegEx / the CheXpert labeller, with our own phrase lists): split into
sentences; find observation mentions by phrase patterns; a mention is *negative* when a negation
trigger precedes it within the same clause (up to ``SCOPE`` words, stopped by "but", "however",
...) or a post-negation follows ("... is not seen", "has resolved"); *uncertain* when an
uncertainty trigger does ("possible", "may represent", "cannot be excluded"); else *positive*.
Per observation, positive beats uncertain beats negative. "No Finding" is positive when no
observation other than Support Devices is positive or uncertain. English only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Status = Literal["positive", "uncertain", "negative"]

OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices", "Emphysema", "Fibrosis", "Hernia",
)

_ENLARGED = (r"(?:mildly |moderately |markedly |severely |slightly |borderline |top normal |upper normal )?"
             r"(?:enlarged|enlargement|large|increased|prominent)")

MENTIONS: dict[str, list[str]] = {
    "Enlarged Cardiomediastinum": [
        r"widen\w* (?:of )?(?:the )?(?:superior )?(?:cardio)?mediastin\w*",
        r"(?:cardio)?mediastin\w* (?:silhouette |contour |shadow )?(?:is |are )?(?:\w+ )?"
        r"(?:widen\w*|enlarged|prominent)",
        r"enlarged (?:cardio)?mediastin\w*", r"mediastinal (?:widening|enlargement|mass)",
    ],
    "Cardiomegaly": [
        r"cardiomegaly", r"cardiac enlargement", r"enlarge\w* (?:of )?(?:the )?(?:heart|cardiac)",
        r"(?:heart|cardiac silhouette|cardiac contour|cardiac shadow|heart size|cardiac size)(?: is| are| appears)? "
        + _ENLARGED,
        r"(?:enlarged|large) (?:heart|cardiac silhouette)",
    ],
    "Lung Lesion": [r"nodul\w*", r"\bmass(?:es)?\b", r"lesions?\b", r"tumou?r", r"neoplasm", r"carcinoma",
                    r"malignan\w*", r"metasta\w*"],
    "Lung Opacity": [r"opaci\w*", r"infiltrat\w*", r"air ?space (?:disease|process)", r"densit(?:y|ies)",
                     r"haziness", r"hazy"],
    "Edema": [r"o?edema", r"(?:vascular|pulmonary|venous|interstitial) congestion", r"\bchf\b",
              r"congestive heart failure", r"kerley", r"vascular engorgement", r"cephalization"],
    "Consolidation": [r"consolidat\w*"],
    "Pneumonia": [r"pneumoni\w*", r"infectious process", r"bronchopneumonia"],
    "Atelectasis": [r"atelecta\w*", r"(?:lobar|segmental|lung|lobe) collapse", r"collapse of the \w+ (?:lobe|lung)",
                    r"volume loss"],
    "Pneumothorax": [r"pneumothora\w*", r"pneumothoraces"],
    "Pleural Effusion": [r"(?<!pericardial )effusions?", r"pleural fluid", r"hydrothorax", r"blunt\w* (?:of )?(?:the )?"
                         r"(?:\w+ )?costophrenic", r"costophrenic (?:angle )?blunting"],
    "Pleural Other": [r"pleural (?:thickening|plaques?|scar\w*|calcification)", r"thicken\w* (?:of )?(?:the )?pleura",
                      r"fibrothorax"],
    "Fracture": [r"fractur\w*"],
    "Support Devices": [r"pacemaker", r"defibrillator", r"\baicd\b", r"catheter", r"picc", r"central (?:venous )?line",
                        r"(?:endotracheal|et|ng|nasogastric|chest|enteric|feeding|tracheostomy) tube",
                        r"port-?a-?cath", r"\bstents?\b", r"\bleads?\b", r"swan", r"\bport\b"],
    "Emphysema": [r"emphysema\w*", r"\bcopd\b", r"chronic obstructive"],
    "Fibrosis": [r"fibros\w*", r"fibrotic"],
    "Hernia": [r"hernia\w*"],
}

#: Phrases that state an observation is normal without a negation word ("heart size is normal").
NORMALS: dict[str, list[str]] = {
    "Cardiomegaly": [
        r"(?:heart|cardiac) (?:size|silhouette|contour|shadow)s? (?:is |are |appears? |remains? )?"
        r"(?:normal|within normal limits|unremarkable|stable|upper limits of normal)",
        r"normal(?:-sized)? (?:heart|cardiac)", r"heart is (?:normal|not enlarged)",
        r"cardiomediastinal (?:silhouette|contour|shadow)s? (?:is |are |appears? )?"
        r"(?:normal|within normal limits|unremarkable|stable)",
        r"normal cardiomediastinal",
    ],
    "Enlarged Cardiomediastinum": [
        r"(?:cardio)?mediastin\w* (?:silhouette|contour|shadow)?s? ?(?:is |are |appears? )?"
        r"(?:normal|within normal limits|unremarkable|stable)",
        r"normal (?:cardio)?mediastin\w*", r"mediastinum is (?:normal|unremarkable|not widened)",
    ],
}

NEG_PRE = re.compile(r"\b(?:no|not|without|negative for|free of|absence of|rule out|ruled out|resolution of|"
                     r"clear of|nor|neither|removal of|removed)\b")
NEG_POST = re.compile(r"^(?:\W*\w+){0,3}?\W*(?:(?:is|are|was|were|has been|have been)\s+)?"
                      r"(?:(?:does |do |may )?not (?:be )?(?:well[- ])?(?:seen|identified|present|evident|appreciated|"
                      r"visuali[sz]ed|demonstrated|noted|appear)|"
                      r"(?:has |have )?resolved|no longer|absent|removed|negative)\b")
UNC_PRE = re.compile(r"\b(?:possible|possibly|probable|probably|likely|may|might|could|questionable|question of|"
                     r"questioned|suspicious|suspected|suspect|concern|concerning|cannot exclude|can't exclude|"
                     r"not exclude|differential|versus|vs|suggest\w*|equivocal|borderline|consider|presumed|"
                     r"compatible with|consistent with|represent\w*|indeterminate|evaluat\w* for|assess\w* for)\b")
UNC_POST = re.compile(r"^(?:\W*\w+){0,4}?\W*(?:cannot be (?:excluded|ruled out)|can't be (?:excluded|ruled out)|"
                      r"not (?:be )?(?:excluded|ruled out)|is (?:suspected|possible|questioned|likely|not excluded)|"
                      r"are (?:suspected|possible|likely)|\?)")
TERMINATORS = re.compile(r"\b(?:but|however|although|though|except|which|otherwise|there is|there are|"
                         r"there has been|aside from|apart from|with interval|new)\b")
SCOPE = 10

_SENT = re.compile(r"(?<=[.!?])\s+|\n+|;")
_COMPILED = {k: [re.compile(r"\b" + p) for p in v] for k, v in MENTIONS.items()}
_NORMALS = {k: [re.compile(r"\b" + p) for p in v] for k, v in NORMALS.items()}


@dataclass
class Mention:
    observation: str
    status: Status
    sentence: str
    span: tuple[int, int]


@dataclass
class Labels:
    status: dict[str, Status] = field(default_factory=dict)
    mentions: list[Mention] = field(default_factory=list)

    def get(self, observation: str) -> Status | None:
        return self.status.get(observation)


def _clause_before(text: str) -> str:
    """Words before a mention back to the last scope terminator, at most SCOPE words."""
    last = None
    for m in TERMINATORS.finditer(text):
        last = m
    if last is not None:
        text = text[last.end():]
    words = text.split()
    return " ".join(words[-SCOPE:])


def _clause_after(text: str) -> str:
    m = TERMINATORS.search(text)
    return text[: m.start()] if m else text


def _classify(sentence: str, start: int, end: int) -> Status:
    before = _clause_before(sentence[:start])
    after = _clause_after(sentence[end:])
    if UNC_POST.search(after):
        return "uncertain"
    if NEG_PRE.search(before) or NEG_POST.search(after):
        # "not excluded" / "cannot exclude" are uncertainty, not negation.
        if UNC_PRE.search(before) and re.search(r"(?:cannot|can't|not) exclude", before):
            return "uncertain"
        return "negative"
    if UNC_PRE.search(before):
        return "uncertain"
    return "positive"


_RANK = {"negative": 0, "uncertain": 1, "positive": 2}


def label_report(text: str) -> Labels:
    out = Labels()
    for raw in _SENT.split(text.lower()):
        sentence = " ".join(raw.split())
        if not sentence:
            continue
        taken: list[tuple[int, int]] = []
        for obs, patterns in _NORMALS.items():
            for pat in patterns:
                for m in pat.finditer(sentence):
                    out.mentions.append(Mention(obs, "negative", sentence, m.span()))
                    taken.append(m.span())
        for obs, patterns in _COMPILED.items():
            for pat in patterns:
                for m in pat.finditer(sentence):
                    if any(a <= m.start() < b for a, b in taken) and obs in _NORMALS:
                        continue  # "cardiac silhouette is normal" already read as a normal statement
                    out.mentions.append(Mention(obs, _classify(sentence, m.start(), m.end()), sentence, m.span()))
    for mention in out.mentions:
        cur = out.status.get(mention.observation)
        if cur is None or _RANK[mention.status] > _RANK[cur]:
            out.status[mention.observation] = mention.status
    abnormal = [o for o, s in out.status.items() if o != "Support Devices" and s in ("positive", "uncertain")]
    if not abnormal:
        out.status["No Finding"] = "positive"
    return out


# --------------------------------------------------------------------------- consistency with the classifier
@dataclass
class Discrepancy:
    observation: str
    classifier: str  # present / possible / absent
    text: str  # positive / uncertain / negative / not mentioned
    message: str


def check_consistency(calls: list[tuple[str, str]], text: str) -> list[Discrepancy]:
    """``calls`` are (observation, band) from the classifier; flags text that contradicts or omits them.

    Several model labels can share one observation (nodule, mass -> Lung Lesion); the strongest band
    counts. Omitting an absent finding is fine; omitting a present or possible one is not.
    """
    order = {"absent": 0, "possible": 1, "present": 2}
    best: dict[str, str] = {}
    for obs, b in calls:
        if obs not in best or order[b] > order[best[obs]]:
            best[obs] = b
    labels = label_report(text)
    out = []
    for obs, b in best.items():
        said = labels.get(obs)
        shown = said or "not mentioned"
        if b in ("present", "possible") and said in (None, "negative"):
            verb = "negates" if said == "negative" else "omits"
            out.append(Discrepancy(obs, b, shown, f"classifier calls {obs} {b} but the report text {verb} it"))
        elif b == "absent" and said == "positive":
            out.append(Discrepancy(obs, b, shown, f"report text asserts {obs} but the classifier calls it absent"))
    return out
