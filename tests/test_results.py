"""The results writer against real validators (dciodvfy, dsrdump, PixelMed) and real source images.

Results are built by hand so each test knows exactly what must come out. Encoding and validation are
done once per scenario (module fixtures) because PixelMed dominates the run time.
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from support.validators import (
    assert_all_valid,
    bright_pixels,
    code_value,
    concept,
    dsrdump,
    find_items,
    items,
    num_units,
    red_pixels,
    texts,
)

from node.results import EncodeOptions, SOPRef, ValidationFailed, encode, validate, write_validated
from node.results.common import UNVERIFIED_TEXT
from node.results.render import TextFont, display_values, font_path, upscale_factor
from pipelines.base import (
    PRIVATE_SCHEME,
    UCUM_HU,
    UCUM_MGY,
    UCUM_MGYCM,
    Code,
    Evaluation,
    Finding,
    ImageRef,
    Measurement,
    ModelIdentity,
    Narrative,
    Overlay,
    PipelineResult,
    Region,
)

SHA = "3f" * 32
PNEUMOTHORAX = Code("36118008", "SCT", "Pneumothorax")
EFFUSION = Code("60046008", "SCT", "Pleural effusion")
CARDIOMEGALY = Code("8186001", "SCT", "Cardiomegaly")
LUNG = Code("39607008", "SCT", "Lung")
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22"}
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


# --------------------------------------------------------------------------- sources
@pytest.fixture(scope="module")
def cr() -> Dataset:
    return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))


def ref_of(ds: Dataset) -> ImageRef:
    return ImageRef(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID))


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five CT slices made from CT_small with new UIDs, written in shuffled order like a spool."""
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    d = tmp_path_factory.mktemp("ct")
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in (3, 0, 4, 1, 2):
        ds = copy.deepcopy(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-158.1, -179.0, -75.7 + 5 * i]
        ds.SliceLocation = -75.7 + 5 * i
        del ds.PatientBirthDate  # a type-2 attribute missing at source must not crash the writer
        p = d / f"ct{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def ct_headers(files: list[Path]) -> list[Dataset]:
    return sorted((pydicom.dcmread(p) for p in files), key=lambda d: int(d.InstanceNumber))


# --------------------------------------------------------------------------- results
def cxr_result(cr: Dataset, verified: bool = True) -> PipelineResult:
    ref = ref_of(cr)
    heat = np.zeros((64, 64), np.float32)
    heat[10:30, 8:24] = 0.9
    return PipelineResult(
        pipeline="cxr", pipeline_version="1.0.0",
        model=ModelIdentity("densenet121-res224-all", "2.1", sha256=SHA, verified=verified),
        findings=[
            Finding(PNEUMOTHORAX, "Pneumothorax", True, 0.93, critical=True, site=LUNG,
                    regions=[Region(ref, "POLYLINE", [(300, 300), (750, 280), (800, 900), (320, 950)], "PTX")]),
            Finding(EFFUSION, "Pleural effusion", True, 0.71,
                    regions=[Region(ref, "CIRCLE", [(1400, 1500), (1500, 1500)])]),
            Finding(CARDIOMEGALY, "Cardiomegaly", False, 0.08),
        ],
        overlays=[Overlay("cam", "heatmap", heat, source=ref)],
        narrative={"en": Narrative(findings="Right pneumothorax. Left pleural effusion.",
                                   impression="Pneumothorax.", critical="Pneumothorax suspected.")},
        key_images=[ref],
    )


def ct_result(files: list[Path]) -> PipelineResult:
    hs = ct_headers(files)
    s2, s4 = ref_of(hs[1]), ref_of(hs[3])
    roi_liver = Region(s2, "CIRCLE", [(64, 64), (74, 64)], "liver")
    roi_fat = Region(s4, "CIRCLE", [(30, 90), (36, 90)], "fat")
    series = str(hs[0].SeriesInstanceUID)
    chart = np.full((300, 480, 3), 240, np.uint8)
    chart[100:250, 50:90] = (30, 90, 200)
    return PipelineResult(
        pipeline="ct_quality", pipeline_version="0.3.0",
        model=ModelIdentity("ct-noise", "1.0", sha256=SHA, verified=True),
        measurements=[
            Measurement(Code("112181", "DCM", "Mean attenuation"), 58.2, UCUM_HU, "Liver ROI", region=roi_liver,
                        site=Code("10200004", "SCT", "Liver"), derivation=Code("373098007", "SCT", "Mean")),
            Measurement(Code("112183", "DCM", "SD of attenuation"), 11.4, UCUM_HU, "Liver ROI", region=roi_liver),
            Measurement(Code("112181", "DCM", "Mean attenuation"), -98.0, UCUM_HU, "Fat ROI", region=roi_fat),
            Measurement(Code("CNR", PRIVATE_SCHEME, "Contrast-to-noise ratio"), 13.7,
                        Code("1", "UCUM", "no units"), "Fat ROI", region=roi_fat),
            Measurement(Code("113830", "DCM", "Mean CTDIvol"), 11.8, UCUM_MGY, "Dose", series_uid=series),
            Measurement(Code("113838", "DCM", "DLP"), 412.0, UCUM_MGYCM, "Dose", series_uid=series),
        ],
        evaluations=[Evaluation(Code("111101", "DCM", "Image quality"), Code("PASS", PRIVATE_SCHEME, "Acceptable"),
                                group="Dose")],
        overlays=[Overlay("noise chart", "image", chart, caption="Noise per slice")],
    )


def empty_result() -> PipelineResult:
    return PipelineResult(pipeline="cxr", pipeline_version="1.0.0",
                          model=ModelIdentity("densenet121-res224-all", "2.1", sha256=SHA, verified=True))


def zh_unverified_result(cr: Dataset) -> PipelineResult:
    r = cxr_result(cr, verified=False)
    r.narrative["zh"] = Narrative(findings="右侧气胸。左侧胸腔积液。", impression="气胸，需紧急处理。",
                                  critical="怀疑气胸，已通知。")
    r.findings[0].regions = []  # a critical finding without a region: TID 1501 group, SC without outline
    return r


@pytest.fixture(scope="module")
def head() -> Dataset:
    """A real de-identified head CT slice: PatientIdentityRemoved YES without a method, empty type-2s."""
    return pydicom.dcmread(get_testdata_file("693_UNCR.dcm"))


def head_result(head: Dataset) -> PipelineResult:
    ref = ref_of(head)
    return PipelineResult(
        pipeline="ich", pipeline_version="0.1.0", model=ModelIdentity("ich-net", "0.1", verified=True),
        findings=[Finding(Code("1386000", "SCT", "Intracranial hemorrhage"), "Intracranial haemorrhage", True, 0.88,
                          critical=True, regions=[Region(ref, "POINT", [(250.0, 180.0)])])])


# --------------------------------------------------------------------------- encode + validate once
class Scenario:
    def __init__(self, objs: list[Dataset], seconds: float):
        self.objs, self.seconds = objs, seconds
        self.problems: list[list[str]] | None = None

    def by_class(self, uid: str) -> list[Dataset]:
        return [o for o in self.objs if o.SOPClassUID == uid]

    @property
    def tid1500(self) -> Dataset:
        return next(o for o in self.objs if o.SOPClassUID in SR_CLASSES - {"1.2.840.10008.5.1.4.1.1.88.22"})

    @property
    def narrative(self) -> Dataset:
        return self.by_class("1.2.840.10008.5.1.4.1.1.88.22")[0]


def run(result: PipelineResult, sources: list, options: EncodeOptions | None = None) -> Scenario:
    t0 = time.perf_counter()
    objs = encode(result, sources, options or EncodeOptions())
    return Scenario(objs, time.perf_counter() - t0)


@pytest.fixture(scope="module")
def predecessor() -> SOPRef:
    return SOPRef(generate_uid(), generate_uid(), generate_uid(), "1.2.840.10008.5.1.4.1.1.88.33")


@pytest.fixture(scope="module")
def scenarios(cr: Dataset, ct_files: list[Path], predecessor: SOPRef, head: Dataset) -> dict[str, Scenario]:
    out = {
        "cxr": run(cxr_result(cr), [cr]),
        "ct": run(ct_result(ct_files), ct_files, EncodeOptions(sr_class="comprehensive3d",
                                                               predecessors=[predecessor], institution="General")),
        "empty_ct": run(empty_result(), ct_files),
        "zh": run(zh_unverified_result(cr), [cr], EncodeOptions(language="zh")),
        "head": run(head_result(head), [head]),
    }
    return out


@pytest.fixture(scope="module")
def validated(scenarios: dict[str, Scenario]) -> dict[str, Scenario]:
    from node.results import validate_many

    allobjs = [o for s in scenarios.values() for o in s.objs]
    t0 = time.perf_counter()
    reports = validate_many(allobjs)
    elapsed = time.perf_counter() - t0
    print(f"\nvalidated {len(allobjs)} objects in {elapsed:.1f} s ({elapsed / len(allobjs):.2f} s/object)")
    i = 0
    for s in scenarios.values():
        s.problems = reports[i:i + len(s.objs)]
        i += len(s.objs)
    return scenarios


# --------------------------------------------------------------------------- validity and identity
@pytest.mark.parametrize("name", ["cxr", "ct", "empty_ct", "zh", "head"])
def test_every_object_passes_all_validators(validated: dict[str, Scenario], name: str) -> None:
    s = validated[name]
    assert s.objs, "encode produced nothing"
    bad = {f"{o.Modality} {o.SeriesDescription}": p for o, p in zip(s.objs, s.problems or []) if p}
    assert not bad


def test_object_set_per_scenario(scenarios: dict[str, Scenario]) -> None:
    cxr = scenarios["cxr"]
    assert [o.SOPClassUID for o in cxr.objs] == ["1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22",
                                                 SC_CLASS, KOS_CLASS]
    ct = scenarios["ct"]
    assert ct.tid1500.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # comprehensive3d option
    assert len(ct.by_class(SC_CLASS)) == 2  # key image summary and the chart; ROI slices stay in the SR
    assert not ct.by_class(KOS_CLASS)  # measurements only, nothing critical: no "Of Interest"
    assert not scenarios["empty_ct"].by_class(KOS_CLASS)


def test_study_patient_kept_series_and_instances_new(scenarios: dict[str, Scenario], cr: Dataset,
                                                     ct_files: list[Path]) -> None:
    ct0 = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
    for name, src in (("cxr", cr), ("ct", ct0), ("zh", cr)):
        objs = scenarios[name].objs
        source_series = {str(src.SeriesInstanceUID)}
        for o in objs:
            assert o.StudyInstanceUID == src.StudyInstanceUID
            for kw in ("PatientName", "PatientID", "PatientSex", "AccessionNumber", "StudyID", "StudyDate"):
                assert str(o.get(kw, "")) == str(src.get(kw, "")), (name, kw)
            assert "PatientBirthDate" in o  # type 2, empty when the source lacked it
            assert o.SeriesInstanceUID not in source_series and o.SOPInstanceUID != src.SOPInstanceUID
            assert 900 <= int(o.SeriesNumber) <= 999
            assert str(o.SeriesDescription).startswith("AI RESULT")
        kinds = {}
        for o in objs:
            kinds.setdefault(o.SOPClassUID, set()).add(o.SeriesInstanceUID)
        assert all(len(v) == 1 for v in kinds.values())  # one series per kind (SCs share theirs)
        assert len({o.SeriesInstanceUID for o in objs}) == len(kinds)  # and kinds never share
        assert len({o.SOPInstanceUID for o in objs}) == len(objs)


def test_deidentified_source_stays_conformant(scenarios: dict[str, Scenario], head: Dataset) -> None:
    for o in scenarios["head"].objs:
        assert o.PatientIdentityRemoved == "YES" and o.DeidentificationMethod
        assert o.PatientName == head.PatientName and o.StudyID == ""
    kos = scenarios["head"].by_class(KOS_CLASS)[0]  # critical finding: KOS even though only a POINT marks it
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"


def test_patient_name_never_in_warnings(head: Dataset) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        objs = encode(head_result(head), [head], EncodeOptions())
    assert objs and not [w for w in caught if str(head.PatientName) in str(w.message)]


def test_caller_datasets_untouched(cr: Dataset) -> None:
    before = {e.tag: (e.VR, str(e.value)[:200]) for e in cr if e.tag != 0x7FE00010}
    objs = encode(cxr_result(cr), [cr], EncodeOptions())
    assert {e.tag: (e.VR, str(e.value)[:200]) for e in cr if e.tag != 0x7FE00010} == before
    assert "PixelData" in cr and cr.Modality == "CR"
    proc = find_items(objs[1], ("121058", "DCM"), "CODE")  # narrative procedure from the source's modality
    assert code_value(proc[0]) == ("43468-8", "LN")


def test_refused_result_encodes_nothing(cr: Dataset) -> None:
    for status in ("refused", "model_unavailable"):
        r = PipelineResult("cxr", "1.0.0", status=status, reason="not a chest")
        assert encode(r, [cr], EncodeOptions()) == []


# --------------------------------------------------------------------------- TID 1500 content
IMAGING_MEASUREMENTS = ("126010", "DCM")
DERIVED = ("126011", "DCM")
QUALITATIVE = ("C0034375", "UMLS")


def section(sr: Dataset, name: tuple[str, str]) -> Dataset | None:
    return next((i for i in sr.ContentSequence if concept(i) == name), None)


def test_tid1500_findings_probabilities_regions_algorithm(scenarios: dict[str, Scenario]) -> None:
    sr = scenarios["cxr"].tid1500
    groups = find_items(sr, ("125007", "DCM"), "CONTAINER")
    assert len(groups) == 2  # one per outlined finding; the finding without a region is study-level
    uids = [i.UID for i in find_items(sr, ("112040", "DCM"), "UIDREF")]
    assert len(uids) == 2 and len(set(uids)) == 2
    evaluations = {concept(i): code_value(i) for i in items(sr) if i.ValueType == "CODE"}
    assert evaluations[("36118008", "SCT")] == ("52101004", "SCT")  # Pneumothorax: Present
    assert evaluations[("8186001", "SCT")] == ("272519000", "SCT")  # Cardiomegaly: Absent
    assert evaluations[("CRITICAL", PRIVATE_SCHEME)] == ("373066001", "SCT")
    probs = [float(i.MeasuredValueSequence[0].NumericValue) for i in find_items(sr, ("122157", "DCM"), "NUM")]
    assert sorted(probs) == [0.08, 0.71, 0.93]
    for g in groups:  # OHIF labels an outline by its NUMs' meanings only: they name the finding
        finding = next(i for i in g.ContentSequence if concept(i) == ("121071", "DCM")).ConceptCodeSequence[0]
        meanings = [str(i.ConceptNameCodeSequence[0].CodeMeaning) for i in find_items(g, ("122157", "DCM"), "NUM")]
        assert meanings == [f"Probability of {finding.CodeMeaning}"]
    absent = [code_value(i) for i in items(section(sr, QUALITATIVE)) if concept(i) == ("8186001", "SCT")]
    assert absent == [("272519000", "SCT")]
    cardio = find_items(section(sr, DERIVED), ("122157", "DCM"), "NUM")
    assert [float(i.MeasuredValueSequence[0].NumericValue) for i in cardio] == [0.08]
    assert "Probability of Cardiomegaly (Cardiomegaly)" in texts(cardio[0])
    scoords = {str(i.GraphicType) for i in items(sr) if i.ValueType == "SCOORD"}
    assert scoords == {"POLYLINE", "CIRCLE"}
    poly = next(i for i in items(sr) if i.ValueType == "SCOORD" and i.GraphicType == "POLYLINE")
    assert list(poly.GraphicData[:2]) == list(poly.GraphicData[-2:])  # closed outline
    t = texts(sr)
    assert "densenet121-res224-all" in t and "2.1" in t and f"weights-sha256={SHA}" in t
    schemes = [str(i.CodingSchemeDesignator) for i in sr.CodingSchemeIdentificationSequence]
    assert PRIVATE_SCHEME in schemes
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
    observer = find_items(sr, ("121005", "DCM"), "CODE")
    assert observer and code_value(observer[0]) == ("121007", "DCM")  # device observer
    library = find_items(sr, ("111028", "DCM"), "CONTAINER")
    assert library and find_items(library[0], None, "IMAGE")


def _drawable(group: Dataset) -> bool:
    """What OHIF 3.x needs of a measurement group: a SCOORD, on the group or under one of its NUMs."""
    return any(c.ValueType in ("SCOORD", "SCOORD3D") for c in group.ContentSequence) or any(
        c.ValueType == "NUM" and any(x.ValueType == "SCOORD" for x in c.get("ContentSequence", []))
        for c in group.ContentSequence)


@pytest.mark.parametrize("name", ["cxr", "ct", "empty_ct", "zh", "head"])
def test_every_measurement_group_has_an_image_region(scenarios: dict[str, Scenario], name: str) -> None:
    """OHIF dereferences the first SCOORD of every group under Imaging Measurements (issue 13): a group
    without one left its SR viewport black. Study-level content lives in Derived / Qualitative instead."""
    sr = scenarios[name].tid1500
    container = section(sr, IMAGING_MEASUREMENTS)
    groups = [g for g in (container.ContentSequence if container else []) if concept(g) == ("125007", "DCM")]
    assert all(_drawable(g) for g in groups), name
    assert section(sr, QUALITATIVE) is not None
    order = [concept(i) for i in sr.ContentSequence if i.ValueType == "CONTAINER"]
    assert order == sorted(order, key=[("111028", "DCM"), IMAGING_MEASUREMENTS, DERIVED, QUALITATIVE].index)


def test_single_region_goes_with_its_probability(scenarios: dict[str, Scenario]) -> None:
    """One outlined finding among unoutlined ones: the outline is the only group, a TID 1410 group."""
    sr = scenarios["zh"].tid1500
    groups = find_items(section(sr, IMAGING_MEASUREMENTS), ("125007", "DCM"), "CONTAINER")
    assert len(groups) == 1
    circles = [c for c in groups[0].ContentSequence if c.ValueType == "SCOORD"]
    assert len(circles) == 1 and circles[0].GraphicType == "CIRCLE"
    assert [float(i.MeasuredValueSequence[0].NumericValue) for i in find_items(groups[0], ("122157", "DCM"))] == [0.71]


def test_tid1500_measurements_units_and_rois(scenarios: dict[str, Scenario], ct_files: list[Path]) -> None:
    sr = scenarios["ct"].tid1500
    assert {"[hnsf'U]", "mGy", "mGy.cm", "1"} <= num_units(sr)
    groups = find_items(sr, ("125007", "DCM"), "CONTAINER")
    assert len(groups) == 2  # Liver ROI, Fat ROI; the dose numbers have no region
    circles = [i for i in items(sr) if i.ValueType == "SCOORD" and i.GraphicType == "CIRCLE"]
    assert len(circles) == 2
    # worded for OHIF, which writes only "<meaning>: value" beside an outline: which ROI, then short names
    shown = [[(concept(n), str(n.ConceptNameCodeSequence[0].CodeMeaning)) for n in find_items(g, None, "NUM")]
             for g in groups]
    assert shown[0][:2] == [(("112181", "DCM"), "liver mean"), (("112183", "DCM"), "SD")]
    assert shown[1][0] == (("112181", "DCM"), "fat mean")
    derivations = [code_value(i) for i in find_items(sr, ("121401", "DCM"), "CODE")]
    assert derivations == [("373098007", "SCT")]
    sites = [code_value(i) for i in find_items(sr, ("363698007", "SCT"), "CODE")]
    assert ("10200004", "SCT") in sites
    derived = section(sr, DERIVED)
    dose = [i for i in derived.ContentSequence if i.ValueType == "NUM"]
    assert [concept(i) for i in dose] == [("113830", "DCM"), ("113838", "DCM")]
    assert all("Dose" in texts(i)[0] for i in dose)  # the group it belongs to, in words
    refs = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for d in dose for i in items(d) if i.ValueType == "IMAGE"}
    series = {str(h.SOPInstanceUID) for h in ct_headers(ct_files)}
    assert len(refs) == 1 and refs <= series  # the series it was measured on, by one of its images
    quality = [code_value(i) for i in items(section(sr, QUALITATIVE)) if concept(i) == ("111101", "DCM")]
    assert quality == [("PASS", PRIVATE_SCHEME)]
    assert "Dose: Image quality Acceptable" in texts(section(sr, QUALITATIVE))


def test_no_findings_still_makes_a_report_that_opens_on_its_image(scenarios: dict[str, Scenario],
                                                                  ct_files: list[Path]) -> None:
    """Nothing found, nothing measured: one TID 1410 group outlines the whole key image, so OHIF opens the
    report on the image analysed instead of a black viewport; the finding is said in both places."""
    sr = scenarios["empty_ct"].tid1500
    groups = find_items(section(sr, IMAGING_MEASUREMENTS), ("125007", "DCM"), "CONTAINER")
    assert len(groups) == 1 and not find_items(groups[0], None, "NUM")
    scoord = [c for c in groups[0].ContentSequence if c.ValueType == "SCOORD"]
    assert len(scoord) == 1 and scoord[0].GraphicType == "POLYLINE"
    ref = scoord[0].ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    key = next(d for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in ct_files)
               if str(d.SOPInstanceUID) == ref)
    xy = np.asarray(scoord[0].GraphicData, dtype=float).reshape(-1, 2)
    assert (xy.min(0).tolist(), xy.max(0).tolist()) == ([0, 0], [key.Columns, key.Rows])
    assert "Image analysed" in [i.TextValue for i in find_items(groups[0], ("112039", "DCM"), "TEXT")]
    for where in (groups[0], section(sr, QUALITATIVE)):
        said = [code_value(i) for i in items(where) if concept(i) == ("121071", "DCM")]
        assert said == [("281900007", "SCT")]


def test_containers_separate_and_image_library_compact(scenarios: dict[str, Scenario]) -> None:
    for name in ("ct", "cxr", "zh"):
        for sr in (scenarios[name].tid1500, scenarios[name].narrative):
            conts = [sr] + [i for i in items(sr) if i.ValueType == "CONTAINER"]
            assert {str(c.ContinuityOfContent) for c in conts} == {"SEPARATE"}, name
    library = section(scenarios["ct"].tid1500, ("111028", "DCM"))
    group = library.ContentSequence[0]
    shared = [concept(i) for i in group.ContentSequence if i.ValueType != "IMAGE"]
    assert ("112227", "DCM") in shared  # the frame of reference once, for all its images
    for entry in (i for i in group.ContentSequence if i.ValueType == "IMAGE"):
        assert len(entry.get("ContentSequence", [])) <= 2  # only what differs (here: position)


def test_dsr2html_names_every_number(scenarios: dict[str, Scenario], tmp_path: Path) -> None:
    """What many PACS show an SR with: every NUM's concept name right before its value (issue 13)."""
    import html
    import re
    import subprocess

    for name in ("ct", "cxr"):
        sr = scenarios[name].tid1500
        p = tmp_path / f"{name}.dcm"
        sr.save_as(p, enforce_file_format=True)
        page = html.unescape(subprocess.run(["/usr/bin/dsr2html", str(p)], capture_output=True, text=True,
                                            check=True).stdout)
        shown = re.findall(r"<b>([^<]*):</b><br>\s*<span class=\"under\">([-0-9.e]+) ", page)
        nums = [i for i in items(sr) if i.ValueType == "NUM" and "MeasuredValueSequence" in i
                and i.RelationshipType == "CONTAINS"]
        assert nums
        for n in nums:
            meaning = str(n.ConceptNameCodeSequence[0].CodeMeaning)
            value = str(n.MeasuredValueSequence[0].NumericValue)
            assert (meaning, value) in shown, (name, meaning, value)


def test_predecessors_listed(scenarios: dict[str, Scenario], predecessor: SOPRef) -> None:
    for sr in (scenarios["ct"].tid1500, scenarios["ct"].narrative):
        seq = sr.PredecessorDocumentsSequence
        assert seq[0].StudyInstanceUID == predecessor.study_uid
        ref = seq[0].ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == predecessor.series_uid
        assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == predecessor.sop_instance_uid
    assert "PredecessorDocumentsSequence" not in scenarios["cxr"].tid1500


def test_each_sr_supersedes_its_own_kind(cr: Dataset) -> None:
    study = str(cr.StudyInstanceUID)
    old_tid1500 = SOPRef(study, generate_uid(), generate_uid(), "1.2.840.10008.5.1.4.1.1.88.33")
    old_narrative = SOPRef(study, generate_uid(), generate_uid(), "1.2.840.10008.5.1.4.1.1.88.22")
    objs = encode(empty_result(), [cr], EncodeOptions(predecessors=[old_tid1500, old_narrative]))

    def listed(sr: Dataset) -> list[str]:
        return [r.ReferencedSOPInstanceUID for s in sr.PredecessorDocumentsSequence
                for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence]

    assert listed(objs[0]) == [old_tid1500.sop_instance_uid]
    assert listed(objs[1]) == [old_narrative.sop_instance_uid]


# --------------------------------------------------------------------------- TID 2000 narrative
def test_narrative_sections(scenarios: dict[str, Scenario]) -> None:
    sr = scenarios["cxr"].narrative
    root = sr.ConceptNameCodeSequence[0]
    assert (root.CodeValue, root.CodingSchemeDesignator) == ("18748-4", "LN")
    sections = {concept(i) for i in sr.ContentSequence if i.ValueType == "CONTAINER"}
    assert {("59776-5", "LN"), ("19005-8", "LN"), ("73568-8", "LN")} <= sections
    lang = find_items(sr, ("121049", "DCM"), "CODE")
    assert code_value(lang[0]) == ("en", "RFC5646")
    assert any("AI-generated draft — requires review by a physician" in t for t in texts(sr))
    assert "Pneumothorax suspected." in texts(sr)
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "PARTIAL"
    quiet = scenarios["empty_ct"].narrative
    assert ("73568-8", "LN") not in {concept(i) for i in quiet.ContentSequence if i.ValueType == "CONTAINER"}


def test_narrative_states_the_marking_once_per_section(cr: Dataset) -> None:
    """Issue 11/13: each section opens with the UNVERIFIED (or PRELIMINARY) line once, even when the
    pipeline already put its own banner on the text; paragraphs are separate items, sections in order."""
    from pipelines.cxr.report import mark_unverified

    for verified, lang in ((False, "en"), (False, "zh"), (True, "en")):
        r = cxr_result(cr, verified=verified)
        r.narrative["en"].recommendations = "Clinical correlation.\nFollow-up radiograph."
        r.narrative["zh"] = Narrative(findings="右侧气胸。", impression="气胸。", critical="怀疑气胸。")
        if not verified:
            r.narrative = {k: mark_unverified(n, k) for k, n in r.narrative.items()}
        sr = encode(r, [cr], EncodeOptions(language=lang))[1]
        sections = [i for i in sr.ContentSequence if i.ValueType == "CONTAINER"]
        order = [concept(i) for i in sections]
        expected = [("59776-5", "LN"), ("19005-8", "LN")] + ([("18783-1", "LN")] if lang == "en" else []) + [
            ("73568-8", "LN")]
        assert order == expected, (verified, lang)
        for sec in sections:
            t = texts(sec)
            if verified:
                assert t[0].startswith("PRELIMINARY") and not any("UNVERIFIED" in x for x in t)
            else:
                assert sum(UNVERIFIED_TEXT in x for x in t) == 1, (lang, t)
                assert UNVERIFIED_TEXT in t[0]
            assert sum("AI-generated draft" in x or "AI 生成的草稿" in x for x in t) == 1
        if lang == "en":
            assert texts(sections[2])[1:] == ["Clinical correlation.", "Follow-up radiograph."]
            assert texts(sections[0])[-1] == "Algorithm: densenet121-res224-all 2.1"
        assert not any("1.2.826" in x for x in texts(sr))  # no UID in the text a reader sees
        # the device is named in the header, not as the report's first lines (OHIF showed its UID there)
        assert not [i for i in sr.ContentSequence if i.RelationshipType == "HAS OBS CONTEXT"]
        assert sr.AuthorObserverSequence[0].ObserverType == "DEV" and sr.AuthorObserverSequence[0].DeviceUID


def test_chinese_narrative_round_trips(scenarios: dict[str, Scenario], tmp_path: Path) -> None:
    sr = scenarios["zh"].narrative
    p = tmp_path / "zh.dcm"
    sr.save_as(p, enforce_file_format=True)
    back = pydicom.dcmread(p)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    t = texts(back)
    assert "右侧气胸。左侧胸腔积液。" in t and "怀疑气胸，已通知。" in t
    assert code_value(find_items(back, ("121049", "DCM"), "CODE")[0]) == ("zh", "RFC5646")
    assert "右侧气胸" in dsrdump(p)  # DCMTK decodes it too (-Ec: UTF-8 console)


# --------------------------------------------------------------------------- unverified
def test_unverified_model_said_everywhere(scenarios: dict[str, Scenario]) -> None:
    objs = scenarios["zh"].objs
    assert any(UNVERIFIED_TEXT in t for t in texts(scenarios["zh"].tid1500))
    assert any(UNVERIFIED_TEXT in t for t in texts(scenarios["zh"].narrative))
    for o in objs:
        assert "UNVERIFIED" in o.SeriesDescription
    sc = scenarios["zh"].by_class(SC_CLASS)[0]
    assert UNVERIFIED_TEXT in sc.ImageComments
    kos = scenarios["zh"].by_class(KOS_CLASS)[0]
    assert any(UNVERIFIED_TEXT in t for t in texts(kos))
    assert not any(UNVERIFIED_TEXT in t for t in texts(scenarios["cxr"].tid1500))
    # panel: the orange warning line is burned in only for the unverified model
    panel_zh = sc.pixel_array[int(sc.Rows) - 400:]
    r, g, b = (panel_zh[..., i].astype(int) for i in range(3))
    assert np.count_nonzero((r > 230) & (g > 120) & (g < 180) & (b < 40)) > 100


# --------------------------------------------------------------------------- SC
def test_fonts_are_real() -> None:
    assert font_path("en") is not None and font_path("en").suffix.lower() in (".ttf", ".ttc", ".otf")
    assert font_path("zh") is not None
    f = TextFont(30)
    runs = f.runs("算法: densenet 2.1，概率")
    assert [t for t, _ in runs] == ["算法", ": densenet 2.1", "，概率"]
    assert runs[0][1] is f.cjk and runs[1][1] is f.latin and f.cjk is not f.latin


def test_sc_header(scenarios: dict[str, Scenario], cr: Dataset) -> None:
    sc = scenarios["cxr"].by_class(SC_CLASS)[0]
    assert sc.SamplesPerPixel == 3 and sc.PhotometricInterpretation == "RGB" and sc.BitsAllocated == 8
    assert sc.BurnedInAnnotation == "YES"
    src = sc.SourceImageSequence[0]
    assert src.ReferencedSOPInstanceUID == cr.SOPInstanceUID
    purpose = src.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
    assert "densenet121-res224-all" in sc.DerivationDescription
    assert sc.Columns == cr.Columns and sc.Rows > cr.Rows  # 1:1 image, panel underneath


def _expected_display(cr: Dataset) -> np.ndarray:
    """Independent of the writer: LINEAR window from the header, then MONOCHROME1 inverted."""
    x = cr.pixel_array.astype(float)
    c, w = float(cr.WindowCenter), float(cr.WindowWidth)
    y = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    return 255.0 - np.round(y * 255.0)


def _windowed(cr: Dataset) -> Dataset:
    """RG1 with a real display window (its own W30000/L15000 spans the whole 15-bit range)."""
    ds = copy.deepcopy(cr)
    ds.WindowCenter, ds.WindowWidth = 12000, 16000
    return ds


def test_full_range_window_is_replaced_by_a_body_percentile_window(cr: Dataset) -> None:
    """Issue 13: RG1's header window burned in left the lungs mid-grey; now lungs are dark, full contrast."""
    img = display_values(cr).astype(float)
    h, w = img.shape
    centre = img[h // 10: h - h // 10, w // 10: w - w // 10]
    lo, hi = np.percentile(centre, [1, 99])
    assert hi - lo >= 200
    rows = slice(h // 3, h // 2)
    lungs = np.concatenate([img[rows, w // 5: w // 3], img[rows, 2 * w // 3: 4 * w // 5]], axis=1)
    assert lungs.mean() < 110 and lungs.mean() + 60 < img[rows, 9 * w // 20: 11 * w // 20].mean()
    old = 255.0 - np.round(np.clip((cr.pixel_array - 14999.5) / 29999 + 0.5, 0, 1) * 255.0)
    assert np.percentile(old[h // 10: h - h // 10, w // 10: w - w // 10], 99) - np.percentile(
        old[h // 10: h - h // 10, w // 10: w - w // 10], 1) < 200  # what the header window gave


def test_sc_polarity_monochrome1(cr: Dataset) -> None:
    cr = _windowed(cr)
    objs = encode(empty_result(), [cr], EncodeOptions())
    sc = next(o for o in objs if o.SOPClassUID == SC_CLASS)
    img = sc.pixel_array[: cr.Rows, : cr.Columns, 0].astype(float)
    expected = _expected_display(cr)
    assert np.abs(img - expected).max() <= 1.0
    stored = cr.pixel_array.astype(float)
    assert np.corrcoef(stored.ravel()[::97], img.ravel()[::97])[0, 1] < -0.9  # inverted, not copied
    # lungs (lateral thirds, mid height) show darker than the mediastinum (central strip) on display
    rows = slice(cr.Rows // 3, cr.Rows // 2)
    cols = cr.Columns
    lungs = np.concatenate([img[rows, cols // 5: cols // 3], img[rows, 2 * cols // 3: 4 * cols // 5]], axis=1)
    mediastinum = img[rows, 9 * cr.Columns // 20: 11 * cr.Columns // 20]
    assert lungs.mean() + 20 < mediastinum.mean()


def test_voi_lut_sequence_is_used() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]  # 256 entries from stored-after-rescale 0, 8-bit output
    item.LUTData = list(range(255, -1, -1))  # an inverting LUT: a writer that ignores it shows the wrong polarity
    ds.VOILUTSequence = [item]
    del ds.RescaleSlope, ds.RescaleIntercept
    x = ds.pixel_array.astype(int)
    expected = 255 - np.clip(x, 0, 255)
    assert np.array_equal(display_values(ds).astype(int), expected)


def test_sc_ct_window_and_upscale(scenarios: dict[str, Scenario], ct_files: list[Path]) -> None:
    hs = ct_headers(ct_files)
    sc = scenarios["empty_ct"].by_class(SC_CLASS)[0]
    middle = hs[len(hs) // 2]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == middle.SOPInstanceUID  # middle slice is key
    s = upscale_factor(middle.Rows, middle.Columns)
    assert s == 8 and sc.Columns == middle.Columns * s  # 128 px slice: panel text would not be legible 1:1
    assert sc.PatientOrientation == ["L", "P"]  # from ImageOrientationPatient 1\0\0\0\1\0


def test_sc_banner_and_panel(scenarios: dict[str, Scenario], cr: Dataset) -> None:
    crit = scenarios["cxr"].by_class(SC_CLASS)[0].pixel_array
    panel = crit[cr.Rows:]
    assert red_pixels(panel[: panel.shape[0] // 3]) > 20_000  # the banner strip
    assert bright_pixels(panel) > 2_000  # white panel text
    quiet = scenarios["empty_ct"].by_class(SC_CLASS)[0].pixel_array
    assert red_pixels(quiet) == 0
    assert bright_pixels(quiet[quiet.shape[0] - 200:]) > 500


def test_zh_sc_names_findings_in_chinese(cr: Dataset) -> None:
    """A finding that carries its Chinese name shows it in the zh panel and next to its outline;
    the English label stays the fallback for a language the pipeline did not name."""
    from node.results.common import Context
    from node.results.sc import _panel, _regions_on

    r = cxr_result(cr)
    r.findings[0].names = {"zh": "气胸"}
    ctx = Context(language="zh", sr_class="", predecessors=[], institution="", manufacturer="", device_uid="1.2.3",
                  series_number_base=900)
    zh_lines = [text.removeprefix("■ ") for text, _ in _panel(r, ctx).lines]  # ■: legend of outline colours
    assert any(t.startswith("气胸:") for t in zh_lines)
    assert not any(t.startswith("Pneumothorax") for t in zh_lines)
    assert any(t.startswith("Pleural effusion:") for t in zh_lines)  # no zh name given: the label
    labels = [d.label for d in _regions_on(r, ref_of(cr), "zh")]
    assert labels[0] == "气胸" and labels[1] == "Pleural effusion"
    ctx.language = "en"
    assert any(t.removeprefix("■ ").startswith("Pneumothorax:") for t, _ in _panel(r, ctx).lines)
    assert _regions_on(r, ref_of(cr), "en")[0].label == "PTX"  # the region's own label in the pipeline's words


def test_sc_regions_and_heatmap_drawn(scenarios: dict[str, Scenario], cr: Dataset) -> None:
    sc = scenarios["cxr"].by_class(SC_CLASS)[0].pixel_array.astype(int)
    plain = encode(empty_result(), [cr], EncodeOptions())[2].pixel_array.astype(int)
    # the critical POLYLINE (red) passes through (300, 300)-(750, 280); the circle (yellow) around (1400, 1500)
    assert red_pixels(sc[270:320, 300:750].astype(np.uint8)) > 200
    ring = sc[1495:1506, 1490:1510]
    assert np.count_nonzero((ring[..., 0] > 200) & (ring[..., 1] > 200) & (ring[..., 2] < 60)) > 10
    # heat map covers rows 10..30 / cols 8..24 of a 64 grid: tinted there, untouched far away
    hy, hx = int(20 / 64 * cr.Rows), int(16 / 64 * cr.Columns)
    assert np.abs(sc[hy, hx] - plain[hy, hx]).sum() > 60
    assert np.abs(sc[1800, 200] - plain[1800, 200]).sum() == 0


def test_chart_overlay_becomes_second_sc(scenarios: dict[str, Scenario]) -> None:
    scs = scenarios["ct"].by_class(SC_CLASS)
    assert [int(s.InstanceNumber) for s in scs] == [1, 2]
    chart = scs[1].pixel_array
    assert chart.shape[1] == 480 and chart.shape[0] > 300
    assert tuple(chart[150, 70]) == (30, 90, 200)  # pipeline pixels kept as rendered
    assert "Noise per slice" in scs[1].DerivationDescription


def test_measurement_rois_are_drawn_on_the_key_image_without_an_sc_per_slice(scenarios: dict[str, Scenario],
                                                                             ct_files: list[Path]) -> None:
    hs = ct_headers(ct_files)
    scs = scenarios["ct"].by_class(SC_CLASS)
    refs = [s.SourceImageSequence[0].ReferencedSOPInstanceUID for s in scs if "SourceImageSequence" in s]
    assert refs[0] == hs[1].SOPInstanceUID  # key = first ROI's slice
    assert hs[3].SOPInstanceUID not in refs  # the fat ROI's slice gets no SC of its own
    px = scs[0].pixel_array.astype(int)[: int(hs[0].Rows) * 8]  # the cyan measurement circle on the key image
    assert np.count_nonzero((px[..., 0] < 40) & (px[..., 1] > 180) & (px[..., 2] > 220)) > 50


def test_multiframe_key_frame(tmp_path: Path) -> None:
    ect = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    ref = ImageRef(str(ect.SeriesInstanceUID), str(ect.SOPInstanceUID), str(ect.SOPClassUID), frame=2)
    r = empty_result()
    r.key_images = [ref]
    path = tmp_path / "ect.dcm"
    ect.save_as(path)
    sc = next(o for o in encode(r, [path], EncodeOptions()) if o.SOPClassUID == SC_CLASS)
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 2
    assert validate(sc) == []


def test_laterality_copied(cr: Dataset) -> None:
    left = copy.deepcopy(cr)
    left.ImageLaterality = "L"
    sc = next(o for o in encode(empty_result(), [left], EncodeOptions()) if o.SOPClassUID == SC_CLASS)
    assert sc.Laterality == "L"
    assert_all_valid([sc])


# --------------------------------------------------------------------------- KOS
def test_kos_references_and_no_concept_names(scenarios: dict[str, Scenario], cr: Dataset) -> None:
    s = scenarios["cxr"]
    kos = s.by_class(KOS_CLASS)[0]
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113000", "DCM")
    refs = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items(kos)
            if i.ValueType in ("IMAGE", "COMPOSITE")}
    assert refs == {cr.SOPInstanceUID} | {o.SOPInstanceUID for o in s.objs[:-1]}
    assert not [i for i in items(kos) if i.ValueType in ("IMAGE", "COMPOSITE") and "ConceptNameCodeSequence" in i]


# --------------------------------------------------------------------------- writing
def test_write_validated_writes_all(scenarios: dict[str, Scenario], tmp_path: Path) -> None:
    objs = scenarios["empty_ct"].objs
    paths = write_validated(objs, tmp_path / "outbox")
    assert sorted(p.name for p in paths) == sorted(f"{o.SOPInstanceUID}.dcm" for o in objs)
    assert sorted(p.name for p in (tmp_path / "outbox").iterdir()) == sorted(p.name for p in paths)
    assert pydicom.dcmread(paths[0]).SOPInstanceUID == objs[0].SOPInstanceUID


def test_write_validated_refuses_broken_object(scenarios: dict[str, Scenario], tmp_path: Path) -> None:
    objs = [copy.deepcopy(o) for o in scenarios["empty_ct"].objs]
    del objs[1].CompletionFlag  # type 1 in SR Document General
    with pytest.raises(ValidationFailed) as err:
        write_validated(objs, tmp_path / "outbox")
    assert "CompletionFlag" in str(err.value) or "Completion Flag" in str(err.value)
    assert not (tmp_path / "outbox").exists() or not list((tmp_path / "outbox").iterdir())


def test_validate_reports_a_broken_sc(scenarios: dict[str, Scenario]) -> None:
    sc = copy.deepcopy(scenarios["empty_ct"].by_class(SC_CLASS)[0])
    del sc.ConversionType  # type 1 in SC Equipment
    problems = validate(sc)
    assert problems and all(p.startswith("dciodvfy: Error") for p in problems)
    assert any("ConversionType" in p for p in problems)


def test_encode_time_cr(scenarios: dict[str, Scenario]) -> None:
    s = scenarios["cxr"]
    print(f"\nencode CR 1955x1841 (4 objects): {s.seconds:.2f} s")
    assert s.seconds < 30


def test_template_shape_ignores_values_but_not_structure(cr: Dataset) -> None:
    """PixelMed is skipped only for a content tree whose shape it already passed: values do not matter,
    items, codes and units do."""
    from node.results.validate import template_shape

    def sr_of(result: PipelineResult) -> Dataset:
        return next(o for o in encode(result, [cr], EncodeOptions()) if o.Modality == "SR")

    a = cxr_result(cr)
    b = cxr_result(cr)
    b.findings[0].probability = 0.12345  # other numbers, other UIDs: same shape
    assert template_shape(sr_of(a)) == template_shape(sr_of(b))
    c = cxr_result(cr)
    c.findings = c.findings[:1]  # one finding fewer: another shape
    assert template_shape(sr_of(a)) != template_shape(sr_of(c))
    d = sr_of(a)
    e = copy.deepcopy(d)
    e.ContentSequence[0].ConceptNameCodeSequence[0].CodeValue = "999999"  # a wrong concept: another shape
    assert template_shape(d) != template_shape(e)


def test_a_passed_shape_skips_pixelmed_but_still_runs_dciodvfy(cr: Dataset, tmp_path: Path) -> None:
    import importlib

    from node.results.validate import _passed_shapes, template_shape

    validate_mod = importlib.import_module("node.results.validate")  # the package's `validate` is the function

    sr = next(o for o in encode(cxr_result(cr), [cr], EncodeOptions()) if o.Modality == "SR")
    assert validate(sr) == []
    assert template_shape(sr) in _passed_shapes
    calls = []
    real = validate_mod._pixelmed_run
    validate_mod._pixelmed_run = lambda p: calls.append(p) or real(p)
    try:
        again = next(o for o in encode(cxr_result(cr), [cr], EncodeOptions()) if o.Modality == "SR")
        assert validate(again) == [] and calls == []
        broken = copy.deepcopy(again)
        del broken.CompletionFlag  # same tree, broken IOD: dciodvfy still catches it
        assert any("Completion" in p for p in validate(broken))
    finally:
        validate_mod._pixelmed_run = real


# --------------------------------------------------------------------------- fast paths say what the slow ones said
def test_group_counts_known_before_building(scenarios: dict[str, Scenario], cr: Dataset, ct_files: list[Path],
                                            head: Dataset) -> None:
    """The PixelMed one-planar-group rule is decided from the result, so the groups are built once."""
    from highdicom.sr import PlanarROIMeasurementsAndQualitativeEvaluations

    from node.results.sources import load_sources
    from node.results.sr import _groups, group_count, planar_group_count

    cases = {"cxr": (cxr_result(cr), [cr]), "zh": (zh_unverified_result(cr), [cr]),
             "ct": (ct_result(ct_files), ct_files), "head": (head_result(head), [head])}
    for name, (result, sources) in cases.items():
        built = _groups(result, load_sources(sources), planar_ok=True)
        planar = sum(isinstance(g, PlanarROIMeasurementsAndQualitativeEvaluations) for g in built)
        assert (group_count(result), planar_group_count(result)) == (len(built), planar), name
    assert planar_group_count(cases["zh"][0]) == 1  # the case the rule is for: it is exercised above


@pytest.mark.parametrize("name", ["cxr", "ct", "zh", "head", "empty_ct"])
def test_tid1500_evidence_is_what_highdicom_collects(scenarios: dict[str, Scenario], cr: Dataset,
                                                     ct_files: list[Path], head: Dataset, name: str) -> None:
    """The document is made around an empty root and given its tree after: its evidence must be what
    highdicom collects from the whole tree, and highdicom must read the document back."""
    from highdicom.sr import Comprehensive3DSR, ComprehensiveSR
    from highdicom.sr.utils import collect_evidence

    sr = scenarios[name].tid1500
    cts = [pydicom.dcmread(p) for p in ct_files]
    headers = {"cxr": [cr], "zh": [cr], "ct": cts, "empty_ct": cts, "head": [head]}[name]
    same_study, _ = collect_evidence(headers, sr, study_instance_uid=sr.StudyInstanceUID)
    assert list(sr.CurrentRequestedProcedureEvidenceSequence) == same_study
    assert "PertinentOtherEvidenceSequence" not in sr
    cls = Comprehensive3DSR if sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34" else ComprehensiveSR
    back = cls.from_dataset(sr)
    assert len(back.content[0].ContentSequence) == len(sr.ContentSequence)  # the whole tree parsed
    parsed = back.content.get_image_measurement_groups() + back.content.get_planar_roi_measurement_groups()
    assert len(parsed) == len(find_items(sr, ("125007", "DCM"), "CONTAINER"))
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500" and sr.ValueType == "CONTAINER"


def test_reference_outside_the_sources_is_refused(cr: Dataset) -> None:
    r = cxr_result(cr)
    r.findings[2].key_images = [ImageRef(generate_uid(), generate_uid(), str(cr.SOPClassUID))]
    with pytest.raises(ValueError, match="not among its sources"):
        encode(r, [cr], EncodeOptions())


@pytest.mark.parametrize("rescale", [None, (2.0, -1024.0)])
def test_display_table_equals_per_pixel_windowing(cr: Dataset, rescale: tuple[float, float] | None) -> None:
    from pydicom.pixels import apply_modality_lut

    from node.results.render import _grey_levels

    ds = _windowed(cr)
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.WindowCenter, ds.WindowWidth = 2 * 12000 - 1024, 32000
    per_pixel = _grey_levels(np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64), ds)
    assert np.array_equal(display_values(ds), per_pixel)


def test_heatmap_blend_matches_the_float_formula() -> None:
    """8-bit blending in PIL against PS-style float alpha blending: within a few grey levels."""
    from PIL import Image

    from node.results.render import _colormap, blend_heatmap

    rng = np.random.default_rng(1)
    rgb = np.repeat(rng.integers(0, 256, (600, 500), dtype=np.uint8)[..., None], 3, axis=-1)
    heat = np.zeros((60, 50), np.float32)
    yy, xx = np.mgrid[0:60, 0:50]
    heat[:] = np.clip(1 - np.hypot(yy - 30, xx - 25) / 25, 0, 1)
    hm = np.clip(np.asarray(Image.fromarray(heat, mode="F").resize((500, 600), Image.BILINEAR)), 0, 1)
    alpha = (0.5 * np.clip((hm - 0.2) / 0.8, 0.0, 1.0))[..., None]
    expected = rgb * (1 - alpha) + _colormap(hm) * alpha
    diff = np.abs(blend_heatmap(rgb, heat).astype(float) - expected)
    assert diff.max() <= 4 and diff.mean() < 0.5
    assert np.array_equal(blend_heatmap(rgb, heat)[hm < 0.19], rgb[hm < 0.19])  # anatomy untouched below 0.2


@pytest.mark.parametrize("text", [
    "The lungs are clear, with no focal consolidation, pulmonary oedema, pulmonary nodule or mass. There is a "
    "pneumothorax (model probability 0.51, threshold 0.0098).  Two spaces stay.",
    "肺野清晰，未见局灶性实变、肺水肿、肺结节或肿块。可见气胸（模型概率 0.51，阈值 0）。" * 3,
    "x" * 120,
])
def test_finding_text_is_broken_into_lines_that_join_back(text: str) -> None:
    """OHIF shows Finding TEXT in a <pre> that never wraps; the lines fit 88 columns (CJK counts two) unless one
    word is longer, and deleting the newlines gives the paragraph back."""
    import unicodedata

    from node.results.narrative import FINDING_COLUMNS, wrap

    out = wrap(text)
    assert out.replace("\n", "") == text
    lines = out.split("\n")
    width = [sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in ln.rstrip()) for ln in lines]
    if text.startswith("x"):
        assert lines == [text]  # one word longer than a line is not cut
    else:
        assert len(lines) > 1 and all(w <= FINDING_COLUMNS for w in width), width
