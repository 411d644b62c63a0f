"""One critical decision, the same everywhere: for four route policies, every output names the same findings.

A node runs ``cxr`` (random-weight DenseNet on the real RG1 radiograph) or ``classifier`` (tiny ONNX
head-CT model), with four routes chosen by AccessionNumber, one per policy:

    manifest  the manifest's critical levels only          critical {A, B}
    raise     the route raises A's threshold (by code)      critical {B}
    lower     the route lowers C's bands and critical level (by display name)  critical {A, B, C}
    disable   the route sets B to null (by manifest label)  critical {A}

D is present and never critical. Each study goes through the node to a DCMTK storescp PACS, a webhook
receiver and an MLLP listener; then the test reads what each output says is critical: TID 1500 SR
("Critical result" groups), TID 2000 narrative (English as delivered, Chinese encoded from the saved
result: the Communication of Critical Results section, and the cxr Impression lines marked critical),
the SC panel lines drawn red and its banner (and the red strip in the delivered SC), the KOS
description, webhook bodies, HL7 ORU OBX findings, ``ainode status`` and ``/metrics``. All must equal
the expected set. Before the policy was decided once, the narrative and SC followed the manifest.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import yaml
from support.dcmtk import StoreSCP
from support.mllp import MLLPListener
from support.node import base_config, free_port, storescu, wait_for
from support.results import COMPREHENSIVE_SR, ENHANCED_SR, KOS, SECONDARY_CAPTURE, walk
from test_notify import _Hook

from node.loader import load_study
from node.results.common import Context
from node.results.narrative import build_narrative
from node.results.render import RED
from node.results.sc import _panel
from node.results.sources import load_sources
from pipelines import models
from pipelines.base import PipelineResult

POLICIES = ("manifest", "raise", "lower", "disable")
EXPECTED = {"manifest": {"A", "B"}, "raise": {"B"}, "lower": {"A", "B", "C"}, "disable": {"A"}}
OUTPUTS = ("TID1500 SR", "narrative en", "narrative zh", "impression en", "impression zh", "SC panel en",
           "SC panel zh", "SC banner", "KOS", "webhook", "HL7 ORU", "status", "metrics")


@dataclass(frozen=True)
class Label:
    label: str  # manifest
    display: str
    zh: str
    code: str


CXR_LABELS = {"A": Label("Pneumothorax", "Pneumothorax", "气胸", "36118008"),
              "B": Label("Consolidation", "Consolidation", "肺实变", "95436008"),
              "C": Label("Lung Opacity", "Airspace opacity", "肺内片状密度增高影", "CXR-LUNGOPAC"),
              "D": Label("Effusion", "Pleural effusion", "胸腔积液", "60046008")}
ICH = {"any": ("Intracranial haemorrhage", "颅内出血", "1386000", "SCT"),
       "epidural": ("Epidural haemorrhage", "硬膜外出血", "ICH-EDH", "99AINODE"),
       "intraparenchymal": ("Intraparenchymal haemorrhage", "脑实质出血", "274100004", "SCT"),
       "intraventricular": ("Intraventricular haemorrhage", "脑室内出血", "ICH-IVH", "99AINODE"),
       "subarachnoid": ("Subarachnoid haemorrhage", "蛛网膜下腔出血", "21454007", "SCT"),
       "subdural": ("Subdural haemorrhage", "硬膜下出血", "ICH-SDH", "99AINODE")}


# --------------------------------------------------------------------------- models and studies
def _bands(labels: list[str], roles: dict[str, Label]) -> tuple[dict, dict]:
    """A, B, D present at any probability; everything else (C included) absent below 1; A and B critical."""
    by = {r.label: k for k, r in roles.items()}
    thresholds = {lab: {"possible": 0.0, "present": 0.0} if by.get(lab) in ("A", "B", "D")
                  else {"possible": 1.0, "present": 1.0} for lab in labels}
    return thresholds, {roles["A"].label: 0.0, roles["B"].label: 0.0}


def _policies(roles: dict[str, Label], p: dict[str, float]) -> dict[str, dict]:
    return {
        "manifest": {},
        "raise": {"critical": {roles["A"].code: (p[roles["A"].label] + 1.0) / 2}},
        "lower": {"critical": {roles["C"].display: 0.0},
                  "thresholds": {roles["C"].label: {"possible": 0.0, "present": 0.0}}},
        "disable": {"critical": {roles["B"].label: None}},
    }


def cxr_setup(tmp_path: Path) -> tuple[dict, dict[str, Label], dict[str, float], callable]:
    from pydicom.data import get_testdata_file
    from support.cxr_models import imported_model, xrv_model

    from pipelines.cxr import CXRPipeline

    labels = yaml.safe_load((imported_model("torchxrayvision") / "manifest.yaml").read_text())["labels"]
    thresholds, critical = _bands(labels, CXR_LABELS)
    model = xrv_model(tmp_path / "weights" / "xrv", thresholds=thresholds, critical=critical)
    options = {"model": str(model), "allow_unverified_models": True}
    r = CXRPipeline({}).run(load_study([get_testdata_file("RG1_UNCR.dcm")], options=options))
    p = {f.note.split("'")[1]: f.probability for f in r.findings}

    def study(directory: Path, accession: str) -> list[Path]:
        ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.AccessionNumber = accession
        directory.mkdir(parents=True)
        ds.save_as(directory / "cr.dcm")
        return [directory / "cr.dcm"]

    return options, CXR_LABELS, p, study


def classifier_setup(tmp_path: Path) -> tuple[dict, dict[str, Label], dict[str, float], callable]:
    from test_classifier import LABELS, SIZE, WINDOWS, build_model, write_head_ct

    from pipelines.classifier import ClassifierPipeline

    weights = tmp_path / "weights"
    onnx_path = build_model(weights / "ich-c" / "model.onnx")
    base = {"name": "ich-c", "version": "0.1-test", "labels": LABELS,
            "input": {"name": "image", "size": SIZE, "channels": 3, "normalisation": {"kind": "unit"}, "crop": "none"},
            "output": {"probabilities": "probabilities", "cam": None}, "sha256": models.sha256_file(onnx_path),
            "verified": False, "licence": "test",
            "classifier": {"mode": "slices", "modalities": ["CT"], "context": [0], "primary_label": "any",
                           "windows": [{"name": n, "center": c, "width": w}
                                       for n, (c, w) in zip(["brain", "subdural", "bone"], WINDOWS)],
                           "labels": {k: {"code": {"value": v[2], "scheme": v[3], "meaning": v[0]}, "en": v[0],
                                          "zh": v[1]} for k, v in ICH.items()}}}
    (weights / "ich-c" / "manifest.yaml").write_text(yaml.safe_dump(base, allow_unicode=True))
    options = {"model": "ich-c", "weights_dir": str(weights), "allow_unverified_models": True}
    files, _ = write_head_ct(tmp_path / "probe")
    r = ClassifierPipeline({}).run(load_study(files, options=options))
    p = {lab: f.probability for lab, f in zip(LABELS, r.findings)}
    usable = [lab for lab in LABELS if p[lab] < 1.0]  # a float32 sigmoid can round to exactly 1: cannot be raised
    assert len(usable) >= 4, p
    roles = {k: Label(lab, ICH[lab][0], ICH[lab][1], ICH[lab][2]) for k, lab in zip("ABCD", usable)}
    base["thresholds"], base["critical"] = _bands(LABELS, roles)
    (weights / "ich-c" / "manifest.yaml").write_text(yaml.safe_dump(base, allow_unicode=True))
    models.clear_cache()

    def study(directory: Path, accession: str) -> list[Path]:
        paths, _ = write_head_ct(directory)
        for f in paths:
            ds = pydicom.dcmread(f)
            ds.AccessionNumber = accession
            ds.save_as(f)
        return paths

    return options, roles, p, study


# --------------------------------------------------------------------------- reading the outputs
class Roles:
    """Maps whatever an output names (display name, Chinese name, code, manifest label) back to A/B/C/D."""

    def __init__(self, roles: dict[str, Label], result: PipelineResult):
        self.by_name: dict[str, str] = {}
        for f in result.findings:  # every finding of the result: an unexpected critical one shows up by name
            for n in (f.label, f.name("zh"), f.code.value):
                self.by_name[n.casefold()] = f"other:{f.label}"
        for k, r in roles.items():
            for n in (r.label, r.display, r.zh, r.code):
                self.by_name[n.casefold()] = k
        self.names_en = sorted({f.label for f in result.findings}, key=len, reverse=True)
        self.names_zh = sorted({f.name("zh") for f in result.findings}, key=len, reverse=True)

    def of(self, names) -> set[str]:
        return {self.by_name.get(str(n).casefold(), f"unknown:{n}") for n in names}

    def in_text(self, text: str, zh: bool = False) -> set[str]:
        text = text.casefold()
        return self.of(n for n in (self.names_zh if zh else self.names_en) if n.casefold() in text)


def _code(item: pydicom.Dataset, seq: str) -> str:
    value = item.get(seq)
    return str(value[0].CodeValue) if value else ""


def sr_critical_codes(sr: pydicom.Dataset) -> set[str]:
    """Finding codes the TID 1500 flags critical: in a measurement group (125007) that carries "Critical result"
    = Yes, its present findings; in Qualitative Evaluations (UMLS C0034375), a present region-less finding followed by
    its "<label>: critical result" comment (the report-level Critical result there is the document's flag)."""
    out = set()
    for group in walk(sr.ContentSequence, []):
        kids = list(group.get("ContentSequence", []))
        if group.get("ValueType") != "CONTAINER":
            continue
        name = _code(group, "ConceptNameCodeSequence")
        if name == "125007" and any(_code(k, "ConceptNameCodeSequence") == "CRITICAL"
                                    and _code(k, "ConceptCodeSequence") == "373066001" for k in kids):
            out |= {_code(k, "ConceptNameCodeSequence") for k in kids if k.get("ValueType") == "CODE"
                    and _code(k, "ConceptCodeSequence") == "52101004"}
        elif name == "C0034375":
            for prev, k in zip(kids, kids[1:]):
                if (k.get("ValueType") == "TEXT" and str(k.get("TextValue", "")).endswith(": critical result")
                        and prev.get("ValueType") == "CODE" and _code(prev, "ConceptCodeSequence") == "52101004"):
                    out.add(_code(prev, "ConceptNameCodeSequence"))
    return out


def section_text(sr: pydicom.Dataset, code: str) -> str:
    texts = []
    for box in sr.ContentSequence:
        if box.get("ValueType") == "CONTAINER" and _code(box, "ConceptNameCodeSequence") == code:
            texts += [str(i.get("TextValue", "")).replace("\n", "")
                      for i in walk(box.get("ContentSequence", []), [])]
    return "\n".join(texts)


def impression_critical(sr: pydicom.Dataset, roles: Roles, zh: bool) -> set[str]:
    marker = "危急" if zh else "critical finding"
    lines = [ln for ln in section_text(sr, "19005-8").splitlines() if marker in ln.casefold()]
    return roles.in_text("\n".join(lines), zh)


def red_rows(sc: pydicom.Dataset) -> int:
    px = np.asarray(sc.pixel_array).astype(int)
    red = (px[..., 0] > 180) & (px[..., 1] < 60) & (px[..., 2] < 60)
    return int((red.mean(axis=1) > 0.6).sum())


def metric_counts(web_port: int) -> dict[str, int]:
    """``ainode_critical_findings`` per finding name (summed over pipelines)."""
    text = requests.get(f"http://127.0.0.1:{web_port}/metrics", timeout=10).text
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "ainode_critical_findings":
            for sample in family.samples:
                name = sample.labels["finding"]
                out[name] = out.get(name, 0) + int(sample.value)
    return out


def _ctx(lang: str) -> Context:
    return Context(language=lang, sr_class="comprehensive", predecessors=[], institution="", manufacturer="ainode",
                   device_uid="1.2.3", series_number_base=900)


# --------------------------------------------------------------------------- the test
@pytest.mark.parametrize("pipeline", ["cxr", "classifier"])
def test_every_output_names_the_same_critical_findings(pipeline: str, node_factory, tmp_path: Path) -> None:
    options, roles, p, make_study = (cxr_setup if pipeline == "cxr" else classifier_setup)(tmp_path)
    assert all(p[r.label] < 1.0 for r in roles.values()), p
    policies = _policies(roles, p)
    hook = _Hook()
    threading.Thread(target=hook.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    matrix: dict[str, dict[str, set[str]]] = {}
    try:
        with StoreSCP(tmp_path / "pacs", aet="PACS") as pacs, MLLPListener() as ris:
            web = free_port()
            cfg = base_config(tmp_path / "var", free_port(), web_port=web)
            cfg["destinations"] = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]
            cfg["routes"] = [{"name": f"policy-{name}", "match": {"AccessionNumber": f"ACC-{name.upper()}"},
                              "pipelines": [pipeline], "destinations": ["pacs"], "language": "en",
                              "options": options, **policies[name]} for name in POLICIES]
            cfg["notify"] = {"channels": [
                {"kind": "webhook", "name": "pager", "url": f"http://127.0.0.1:{hook.server_address[1]}/hook"},
                {"kind": "hl7", "name": "ris", "host": "127.0.0.1", "port": ris.port}]}
            node = node_factory(config=cfg)
            check = node.cli("config", "check")
            assert check.returncode == 0, check.stdout + check.stderr  # the route keys resolve
            for name in POLICIES:
                before = metric_counts(web)
                files = make_study(tmp_path / name, f"ACC-{name.upper()}")
                study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                storescu(node.port, files)
                s = wait_for(lambda uid=study_uid, n=2 * len(EXPECTED[name]): _settled(node, uid, n), 300, 1.0,
                             f"study {name} delivered and notified")
                matrix[name] = outputs(node, s, pacs, hook, ris, roles, files, web, before)
    finally:
        hook.shutdown()
        hook.server_close()
    lines = [f"{'output':<14}" + "".join(f"{n:>18}" for n in POLICIES)]
    for out in OUTPUTS:
        lines.append(f"{out:<14}" + "".join(f"{','.join(sorted(matrix[n].get(out, {'-'}))):>18}" for n in POLICIES))
    print(f"\n{pipeline} critical findings per output (A={roles['A'].label}, B={roles['B'].label}, "
          f"C={roles['C'].label}):\n" + "\n".join(lines))
    for name in POLICIES:
        for out in OUTPUTS:
            assert matrix[name][out] == EXPECTED[name], (pipeline, name, out, matrix[name][out], "\n".join(lines))


def _settled(node, study_uid: str, n_sent: int) -> dict | None:
    s = node.study(study_uid)
    if s and s.get("delivered") and sum(n["state"] == "sent" for n in s.get("notifications", [])) >= n_sent:
        return s
    return None


def outputs(node, s: dict, pacs: StoreSCP, hook: _Hook, ris: MLLPListener, label_roles: dict[str, Label],
            files: list[Path], web: int, before: dict[str, int]) -> dict[str, set[str]]:
    study_uid = s["study_uid"]
    (job,) = s["jobs"]
    result = PipelineResult.load(node.storage / "results" / job["job_id"])
    roles = Roles(label_roles, result)
    objs = [d for d in (pydicom.dcmread(f) for f in pacs.files()) if str(d.StudyInstanceUID) == study_uid]
    by_class: dict[str, list[pydicom.Dataset]] = {}
    for o in objs:
        by_class.setdefault(str(o.SOPClassUID), []).append(o)
    (tid1500,) = by_class[COMPREHENSIVE_SR]
    (narrative_en,) = by_class[ENHANCED_SR]
    (kos,) = by_class[KOS]
    narrative_zh = build_narrative(result, load_sources(files), _ctx("zh"))  # what a zh route would deliver
    out: dict[str, set[str]] = {}
    out["TID1500 SR"] = roles.of(sr_critical_codes(tid1500))
    root_flag = any(_code(i, "ConceptNameCodeSequence") == "CRITICAL" for box in tid1500.ContentSequence
                    for i in box.get("ContentSequence", []))  # the report-level evaluation (TID 1500 row 12)
    assert root_flag == bool(out["TID1500 SR"]), "document-level Critical result disagrees with its groups"
    out["narrative en"] = roles.in_text(section_text(narrative_en, "73568-8"))
    out["narrative zh"] = roles.in_text(section_text(narrative_zh, "73568-8"), zh=True)
    if result.pipeline == "cxr":  # its Impression marks critical lines itself (the text of the original bug)
        out["impression en"] = impression_critical(narrative_en, roles, zh=False)
        out["impression zh"] = impression_critical(narrative_zh, roles, zh=True)
    else:  # the classifier's Impression lists findings without a critical mark: the section above says it
        out["impression en"] = out["narrative en"]
        out["impression zh"] = out["narrative zh"]
    for lang in ("en", "zh"):
        panel = _panel(result, _ctx(lang))
        red = [text for text, colour in panel.lines if colour == RED]
        out[f"SC panel {lang}"] = roles.of(ln.split(":")[0].lstrip("■").strip() for ln in red)  # "■ name: ..."
        assert bool(panel.banner) == bool(red), f"SC banner {panel.banner!r} vs red lines {red}"
    scs = by_class[SECONDARY_CAPTURE]
    banner_drawn = max(red_rows(o) for o in scs) >= 10
    out["SC banner"] = out["SC panel en"] if banner_drawn else set()
    kos_text = " ".join(str(i.get("TextValue", "")) for i in walk(kos.ContentSequence, []))
    named = kos_text.split("CRITICAL: ", 1)[1].split("; ") if "CRITICAL: " in kos_text else []
    out["KOS"] = roles.of(n.strip().rstrip(".") for n in named)
    bodies = [json.loads(b) for _, b in hook.requests]
    mine = [b for b in bodies if b["study_instance_uid"] == study_uid]
    out["webhook"] = roles.of(b["finding"] for b in mine)
    assert roles.of(b["code"]["value"] for b in mine) == out["webhook"], "webhook finding and code disagree"
    oru = []
    for msg in ris.messages:
        obx = [str(seg).split("|") for seg in msg.segments("OBX")]
        if any(f[3].startswith("110180") and f[5] == study_uid for f in obx):
            oru += [f[5].split("^")[0] for f in obx if f[3].startswith("121071")]
    out["HL7 ORU"] = roles.of(oru)
    out["status"] = roles.of(s["critical_findings"])
    assert s["critical"] == bool(s["critical_findings"])
    after = metric_counts(web)
    out["metrics"] = roles.of(k for k, v in after.items() if v > before.get(k, 0))
    return out
