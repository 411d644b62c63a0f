"""Accuracy of the ct_quality pipeline against a synthetic CT phantom with known truth.

Every case writes real DICOM files (tests/support/phantoms.py), loads them through node.loader and
runs the pipeline class directly. Truth comes from the phantom builder, never from the pipeline:
sigma and means are what the noise generator and label map used, ROI positions are checked on the
phantom's own label map, and reconstruction gains are sigma ratios.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.phantoms import (  # noqa: E402
    AIR,
    FAT,
    HU,
    MUSCLE,
    OUTSIDE,
    TABLE,
    PhantomSpec,
    Recon,
    StudyIds,
    phantom_slice,
    pixel_grid,
    write_dose_sr,
    write_enhanced,
    write_localizer,
    write_recons,
    write_series,
)

from node.loader import load_study  # noqa: E402
from pipelines.base import PipelineResult, Refused, StudyInput  # noqa: E402
from pipelines.ct_quality import CTQualityPipeline  # noqa: E402
from pipelines.ct_quality.dose import ssde_factor  # noqa: E402

log = logging.getLogger(__name__)
TOL = 0.05  # the accuracy the issue asks for: +-5 %
# more, larger ROIs than the defaults where a test checks ROI SD to 5 %: with correlated noise a
# 15 mm circle holds only ~25 independent samples, so precision (not bias) needs the pixel count
ACCURATE_ROIS = {"roi_diameter_mm": 20.0, "roi_slices": 12, "rois_per_slice": 4}


def run(paths: list[Path], **options: Any) -> PipelineResult:
    study = load_study(paths, options=options)
    return CTQualityPipeline().run(study)


def series_details(res: PipelineResult, name_part: str = "") -> dict[str, Any]:
    for d in res.details["series"]:
        if name_part in d["name"]:
            return d
    raise AssertionError(f"no series {name_part!r} in {[d['name'] for d in res.details['series']]}")


def rel(a: float, b: float) -> float:
    return a / b - 1.0


# --------------------------------------------------------------------------- GNL and ROI accuracy
NOISE_CASES = [  # (sigma HU, Gaussian correlation in pixels, band-pass CT-like texture)
    (5.0, 0.0, False), (15.0, 0.0, False), (40.0, 0.0, False), (10.0, 1.0, False), (25.0, 0.7, False),
    (40.0, 1.0, False), (12.0, 1.0, True),
]


@pytest.fixture(scope="module")
def noise_results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[float, float, bool], PipelineResult]:
    out = {}
    for sigma, corr, bandpass in NOISE_CASES:
        d = tmp_path_factory.mktemp(f"noise_{sigma:g}_{corr:g}_{bandpass}")
        spec = PhantomSpec(n_slices=12, sigma=sigma, correlation_px=corr, bandpass=bandpass,
                           seed=int(sigma * 10 + corr * 100))
        paths, _ = write_series(d, spec)
        out[(sigma, corr, bandpass)] = run(paths, **ACCURATE_ROIS)
    return out


@pytest.mark.parametrize("sigma,corr,bandpass", NOISE_CASES)
def test_gnl_within_5_percent(noise_results: dict, sigma: float, corr: float, bandpass: bool) -> None:
    d = series_details(noise_results[(sigma, corr, bandpass)])
    err = rel(d["gnl"], sigma)
    log.info("GNL sigma %g corr %g: %.3f HU (%+.2f %%), texture correction %.3f", sigma, corr, d["gnl"], 100 * err,
             d["gnl_texture_correction"])
    assert abs(err) <= TOL, f"GNL {d['gnl']:.3f} vs true {sigma} ({100 * err:+.2f} %)"
    per = np.array([v for v in d["gnl_per_slice"] if v is not None])
    assert per.size == 12
    assert np.all(np.abs(per / sigma - 1) <= 0.10), "every slice within 10 %"
    # low-pass correlated noise needs (and gets) a larger correction than white noise
    if corr >= 0.7 and not bandpass:
        assert d["gnl_texture_correction"] > 1.04
    elif corr == 0:
        assert d["gnl_texture_correction"] < 1.03


@pytest.mark.parametrize("sigma,corr,bandpass", NOISE_CASES)
def test_roi_sd_snr_cnr_within_5_percent(noise_results: dict, sigma: float, corr: float, bandpass: bool) -> None:
    d = series_details(noise_results[(sigma, corr, bandpass)])
    t = d["tissues"]
    assert {"fat", "muscle", "air"} <= set(t)
    for tissue in ("fat", "muscle", "air"):
        assert abs(rel(t[tissue]["sd"], sigma)) <= TOL, f"{tissue} SD {t[tissue]['sd']:.2f} vs {sigma}"
        assert t[tissue]["n_rois"] >= 12
    true_mean = {"fat": HU[FAT], "muscle": HU[MUSCLE], "air": HU[AIR]}
    for tissue, mu in true_mean.items():
        assert abs(rel(t[tissue]["snr"], mu / sigma)) <= TOL, f"{tissue} SNR {t[tissue]['snr']:.3f} vs {mu / sigma:.3f}"
    assert abs(rel(t["muscle"]["cnr"], (HU[MUSCLE] - HU[FAT]) / sigma)) <= TOL
    assert abs(rel(t["air"]["cnr"], (HU[AIR] - HU[FAT]) / sigma)) <= TOL


def _label_of_roi(spec: PhantomSpec, roi: dict[str, Any]) -> np.ndarray:
    """Labels of the phantom pixels inside the ROI circle, located from its patient coordinates."""
    _, lab = phantom_slice(spec)
    xx, yy, _ = pixel_grid(spec)
    cx, cy, _ = roi["centre_patient_mm"]
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= roi["radius_mm"] ** 2
    return lab[inside]


@pytest.mark.parametrize("case", [(15.0, 0.0, False), (40.0, 1.0, False)])
def test_every_roi_lies_inside_its_tissue(noise_results: dict, case: tuple[float, float, bool]) -> None:
    d = series_details(noise_results[case])
    spec = PhantomSpec()
    want = {"fat": FAT, "muscle": MUSCLE, "air": AIR}
    hu_range = {"fat": (-130, -70), "muscle": (30, 70), "air": (-1030, -970)}
    assert d["rois"], "no ROIs placed"
    for roi in d["rois"]:
        labels = _label_of_roi(spec, roi)
        assert labels.size > 100
        assert np.all(labels == want[roi["tissue"]]), f"{roi['tissue']} ROI {roi['index']} leaves its tissue"
        lo, hi = hu_range[roi["tissue"]]
        assert lo <= roi["mean"] <= hi
    # several per tissue, spread along z
    for tissue in want:
        frames = {r["frame"] for r in d["rois"] if r["tissue"] == tissue}
        assert len(frames) >= 5, f"{tissue} ROIs on {len(frames)} slices only"


# --------------------------------------------------------------------------- reconstruction comparison
@pytest.fixture(scope="module")
def recon_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineResult, dict[str, list[Path]]]:
    d = tmp_path_factory.mktemp("recons")
    spec = PhantomSpec(n_slices=12, seed=7)
    recons = (Recon("FBP", "STANDARD", 25.0), Recon("ASiR-V 50%", "STANDARD", 15.0, "ASiR-V 50%"),
              Recon("DLIR-H", "STANDARD", 8.0, "DLIR High"))
    paths, ids = write_recons(d, spec, recons)
    scout = write_localizer(d, ids)
    all_paths = [p for ps in paths.values() for p in ps] + [scout]
    return run(all_paths, **ACCURATE_ROIS), paths


def test_recon_comparison_same_patient_positions(recon_result: tuple[PipelineResult, dict]) -> None:
    res, _ = recon_result
    assert len(res.details["comparisons"]) == 1
    comp = res.details["comparisons"][0]
    assert len(comp["rows"]) == 3
    series = [series_details(res, name) for name in ("FBP", "ASiR-V", "DLIR-H")]
    positions = [sorted((r["tissue"], tuple(np.round(r["centre_patient_mm"], 6))) for r in s["rois"]) for s in series]
    assert positions[0] == positions[1] == positions[2]
    assert len(positions[0]) >= 30
    # pixel positions agree too (identical geometry), and each series measured its own pixels
    for a, b in zip(series[0]["rois"], series[2]["rois"]):
        assert (a["frame"], a["col"], a["row"]) == (b["frame"], b["col"], b["row"])
    assert series[0]["rois"][0]["sd"] != series[2]["rois"][0]["sd"]


def test_recon_ranking_and_cnr_gain(recon_result: tuple[PipelineResult, dict]) -> None:
    res, _ = recon_result
    comp = res.details["comparisons"][0]
    assert comp["baseline_name"].endswith("FBP") and comp["baseline_basis"] == "identified as FBP"
    assert [n.split(" ", 2)[2] for n in comp["ranking"]] == ["DLIR-H", "ASiR-V 50%", "FBP"]
    truth = {"FBP": 0.0, "ASiR-V 50%": 25 / 15 - 1, "DLIR-H": 25 / 8 - 1}
    for row in comp["rows"]:
        name = row["name"].split(" ", 2)[2]
        for tissue in ("muscle", "air"):
            g = row["cnr_gain"][tissue]
            if truth[name] == 0:
                assert abs(g) < 1e-9
            else:
                assert abs(rel(g, truth[name])) <= TOL, f"{name} {tissue} gain {g:.3f} vs {truth[name]:.3f}"
        for tissue in ("fat", "muscle", "air"):
            sigma = {"FBP": 25.0, "ASiR-V 50%": 15.0, "DLIR-H": 8.0}[name]
            assert abs(rel(row["tissues"][tissue]["sd"], sigma)) <= TOL
    gains = [m for m in res.measurements if m.code.value == "CNRGAIN"]
    assert len(gains) == 6
    table = [o for o in res.overlays if o.name.startswith("comparison")]
    assert len(table) == 1 and table[0].array.dtype == np.uint8 and table[0].array.shape[2] == 3


def test_no_snr_where_it_means_nothing(recon_result: tuple[PipelineResult, dict]) -> None:
    """Below 0 HU (fat, air) mean/SD is a negative "SNR": reported nowhere a reader looks (SR, text), only in
    the details; muscle keeps its SNR."""
    res, _ = recon_result
    snr = [m for m in res.measurements if m.code.value == "111787"]
    assert snr and all(m.value > 0 for m in snr) and all("Paraspinal muscle" in m.label for m in snr)
    text = res.narrative["en"].findings
    assert re.search(r"Paraspinal muscle: mean -?\d+ HU, SD [\d.]+ HU, SNR [\d.]+", text), text
    for tissue in ("Subcutaneous fat", r"Air \(outside body\)"):
        assert re.search(tissue + r": mean -?\d+ HU, SD [\d.]+ HU\.", text), (tissue, text)
    row = res.details["comparisons"][0]["rows"][0]
    assert row["tissues"]["fat"]["snr"] < 0  # still computed, for whoever needs it


def test_localizer_skipped_with_reason(recon_result: tuple[PipelineResult, dict]) -> None:
    res, _ = recon_result
    assert any("LOCALIZER" in why for why in res.details["skipped"].values())
    assert "Scout" in res.narrative["en"].findings


# --------------------------------------------------------------------------- verdicts and refusals
def small(**kw: Any) -> PhantomSpec:
    """256 x 256 at 1.5 mm (same 384 mm FOV): enough for verdict logic, 4x cheaper."""
    base: dict[str, Any] = {"rows": 256, "cols": 256, "spacing": 1.5, "n_slices": 6, "sigma": 10.0}
    base.update(kw)
    return PhantomSpec(**base)


def verdict_of(res: PipelineResult, name_part: str = "") -> tuple[str, str]:
    d = series_details(res, name_part)
    ev = [e for e in res.evaluations if e.group == d["name"]][0]
    assert ev.name.value == "111101" and ev.name.scheme == "DCM"
    assert ev.value.meaning == d["verdict"]
    return d["verdict"], ev.note


def test_clean_scan_passes(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path, small(sigma=8.0))
    verdict, note = verdict_of(run(paths))
    assert verdict == "pass", note


def test_truncated_body_warns(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path, small(body_a=205.0, sigma=8.0))
    res = run(paths)
    verdict, note = verdict_of(res)
    assert verdict == "warn" and "truncated" in note
    d = series_details(res)
    assert len(d["truncated_frames"]) == 6


def test_metal_insert_warns(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path, small(metal=True, sigma=8.0))
    res = run(paths)
    verdict, note = verdict_of(res)
    assert verdict == "warn" and "metal" in note
    assert series_details(res)["metal_frames"] == list(range(6))


def test_missing_slice_fails(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path, small(n_slices=8, missing=[4], sigma=8.0))
    res = run(paths)
    verdict, note = verdict_of(res)
    assert verdict == "fail" and "missing" in note
    assert series_details(res)["missing_slices"] == 1


def test_noise_above_target(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path / "a", small(sigma=17.0))  # abdomen target 15 HU: warn
    assert verdict_of(run(paths))[0] == "warn"
    paths, _ = write_series(tmp_path / "b", small(sigma=30.0))  # > 1.3 x target: fail
    verdict, note = verdict_of(run(paths))
    assert verdict == "fail" and "noise" in note
    # a site target given the way the node passes pipeline config (nested under the pipeline name)
    res = run(paths, ct_quality={"noise_target_hu": {"abdomen_pelvis_contrast": 35.0}})
    assert verdict_of(res)[0] == "pass"
    assert series_details(res)["noise_target"] == 35.0


def test_ctdivol_against_reference_levels(tmp_path: Path) -> None:
    # abdomen with contrast: 19 mGy in the shipped table
    paths, _ = write_series(tmp_path / "a", small(ctdivol=25.0, sigma=8.0))
    res = run(paths)
    verdict, note = verdict_of(res)
    assert verdict == "warn" and "reference level" in note
    pct = [m for m in res.measurements if m.code.value == "DRLPCT"][0]
    assert pct.value == pytest.approx(100 * 25 / 19, abs=0.1)
    # a site table from options overrides the default
    res = run(paths, drl_ctdivol_mgy={"abdomen_pelvis_contrast": 30.0})
    assert verdict_of(res)[0] == "pass"
    # a site protocol name mapped to a table row wins over the keyword rules
    res = run(paths, protocol_keys={"abdomen pelvis w contrast": "chest"})
    assert series_details(res)["drl_key"] == "chest" and series_details(res)["drl"] == 12.0
    # head: 16 cm phantom from the code sequence, head DRL 57 mGy
    head = small(ctdivol=45.0, body_part="HEAD", protocol="ROUTINE HEAD", description="HEAD 5mm",
                 phantom_code="113690", sigma=3.0, body_a=75.0, body_b=95.0, fat_mm=4.0, wall_mm=3.0)
    paths, _ = write_series(tmp_path / "h", head)
    d = series_details(run(paths))
    assert d["drl_key"] == "head" and d["drl"] == 57.0 and d["phantom_cm"] == 16
    assert d["phantom_source"] == "CTDIPhantomTypeCodeSequence"


def test_localizer_only_is_refused(tmp_path: Path) -> None:
    scout = write_localizer(tmp_path, StudyIds())
    with pytest.raises(Refused, match="localizer"):
        run([scout])


def test_dose_sr_only_is_refused(tmp_path: Path) -> None:
    sr = write_dose_sr(tmp_path, StudyIds(), [("ABD", 9.8, 420.0, "113691")])
    with pytest.raises(Refused, match="CT series"):
        run([sr])


def test_non_axial_series_skipped(tmp_path: Path) -> None:
    paths, _ = write_series(tmp_path, small())
    study = load_study(paths)
    study.series[0].orientation = np.array([1.0, 0, 0, 0, 0, -1])  # coronal reformat
    with pytest.raises(Refused, match="non-axial"):
        CTQualityPipeline().run(study)


def test_enhanced_ct_multiframe_measured(tmp_path: Path) -> None:
    p, _ = write_enhanced(tmp_path, PhantomSpec(n_slices=6, sigma=20.0, seed=11))
    study = load_study([p])
    assert study.series[0].is_multiframe
    res = CTQualityPipeline().run(study)
    d = series_details(res)
    assert abs(rel(d["gnl"], 20.0)) <= TOL
    assert d["ctdivol"] == pytest.approx(9.8) and d["phantom_cm"] == 32
    assert d["facts"]["ReconstructionAlgorithm"] == "FILTER_BACK_PROJ"
    assert d["facts"]["KVP"] == "120.0"
    assert all(r.frame is not None for r in res.key_images)


# --------------------------------------------------------------------------- size and dose
def test_wed_ssde_dlp_bmi(tmp_path: Path) -> None:
    spec = PhantomSpec(n_slices=6, sigma=12.0, ctdivol=11.5)
    paths, ids = write_series(tmp_path, spec)
    sr = write_dose_sr(tmp_path, ids, [("SCOUT", 0.2, 3.1, "113691"), (spec.protocol, 11.5, 430.0, "113691")],
                       total_dlp=433.1)
    res = run(paths + [sr])
    d = series_details(res)
    # truth: TG-220 on the noiseless phantom (table excluded)
    hu, lab = phantom_slice(spec)
    body = ~np.isin(lab, [AIR, OUTSIDE, TABLE])
    aw = np.sum(np.clip(hu[body], -1000, None) / 1000 + 1) * spec.spacing**2
    wed = 2 * np.sqrt(aw / np.pi)
    assert abs(rel(d["wed_mm"], wed)) <= 0.01, f"WED {d['wed_mm']:.1f} vs {wed:.1f} mm"
    assert d["ssde"] == pytest.approx(ssde_factor(wed, 32) * 11.5, rel=0.01)
    assert d["dlp"] == pytest.approx(430.0)
    codes = {m.code.value: m for m in res.measurements}
    assert codes["113813"].value == pytest.approx(433.1)
    assert codes["113830"].value == pytest.approx(11.5) and codes["113830"].unit.value == "mGy"
    assert codes["113930"].unit.value == "mGy"
    assert codes["113980"].unit.value == "cm" and codes["113980"].value == pytest.approx(wed / 10, rel=0.01)
    assert codes["39156-5"].value == pytest.approx(78 / 1.76**2, abs=0.05)


def test_dlp_matched_by_irradiation_event_uid(tmp_path: Path) -> None:
    """Two acquisitions with the same CTDIvol: only the event UID tells which DLP is this series'."""
    uid_a, uid_b = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    spec = small(ctdivol=10.0, irradiation_uid=uid_b)
    paths, ids = write_series(tmp_path, spec)
    sr = write_dose_sr(tmp_path, ids, [(spec.protocol, 10.0, 300.0, "113691", uid_a),
                                       ("DELAYED", 10.0, 250.0, "113691", uid_b)])
    d = series_details(run(paths + [sr]))
    assert d["dlp"] == pytest.approx(250.0)


def test_ssde_conversion_factors_match_tg204() -> None:
    # AAPM Report 204 Table 1 (32 cm phantom): 20 cm -> 1.78, 30 cm -> 1.23; (16 cm): 20 cm -> 0.86
    assert ssde_factor(200, 32) == pytest.approx(1.78, abs=0.01)
    assert ssde_factor(300, 32) == pytest.approx(1.23, abs=0.01)
    assert ssde_factor(200, 16) == pytest.approx(0.86, abs=0.01)


# --------------------------------------------------------------------------- result shape
def test_result_contract(recon_result: tuple[PipelineResult, dict], tmp_path: Path) -> None:
    res, paths = recon_result
    assert res.pipeline == "ct_quality" and res.status == "ok"
    assert res.procedure is not None and res.procedure.value == "25045-6"
    codes = {m.code.value for m in res.measurements}
    assert {"112181", "112183", "111787", "CNR", "GNL", "113830", "113930", "113980"} <= codes
    sd = [m for m in res.measurements if m.code.value == "112183"]
    assert all(m.unit.value == "[hnsf'U]" and m.series_uid for m in sd)
    roi_meas = [m for m in res.measurements if m.region is not None]
    assert roi_meas and all(m.region.graphic_type == "CIRCLE" and len(m.region.points) == 2 for m in roi_meas)
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for ps in paths.values() for p in ps}
    assert all(m.region.image.sop_instance_uid in uids for m in roi_meas)
    assert res.key_images and all(k.sop_instance_uid in uids for k in res.key_images)
    for lang in ("en", "zh"):
        assert res.narrative[lang].findings and res.narrative[lang].impression
    assert "Image noise" in res.narrative["en"].findings and "CTDIvol" in res.narrative["en"].findings
    assert "图像噪声" in res.narrative["zh"].findings
    kinds = {o.name.split("-")[0] for o in res.overlays}
    assert {"key", "noise", "comparison"} <= kinds
    for o in res.overlays:
        assert o.kind == "image" and o.array.dtype == np.uint8 and o.array.ndim == 3 and o.array.shape[2] == 3
    back = PipelineResult.load(res.save(tmp_path / "out").parent)
    assert len(back.measurements) == len(res.measurements) and back.evaluations[0].value == res.evaluations[0].value


# --------------------------------------------------------------------------- real images (pydicom-data)
def _real(name: str) -> StudyInput:
    from pydicom.data import get_testdata_file

    return load_study([get_testdata_file(name)])


@pytest.fixture(scope="module")
def real_results() -> dict[str, PipelineResult]:
    return {n: CTQualityPipeline().run(_real(n)) for n in ("693_UNCR.dcm", "693_J2KR.dcm", "explicit_VR-UN.dcm")}


def test_real_head_ct(real_results: dict[str, PipelineResult]) -> None:
    d = series_details(real_results["693_UNCR.dcm"])
    log.info("693_UNCR: GNL %.2f HU, WED %.1f mm, tissues %s", d["gnl"], d["wed_mm"],
             {t: (round(v["mean"], 1), round(v["sd"], 2)) for t, v in d["tissues"].items()})
    assert 2.0 <= d["gnl"] <= 8.0  # brain, 5 mm, 140 kVp
    assert 140 <= d["wed_mm"] <= 200  # adult head
    st = d["tissues"]["soft_tissue"]  # no spine on a head slice: named as soft tissue, not muscle
    assert 20 <= st["mean"] <= 45
    assert d["facts"]["KVP"] == "140" and d["facts"]["ConvolutionKernel"] == "STANDARD"
    assert d["ctdivol"] is None and "CTDIvol not reported" in real_results["693_UNCR.dcm"].narrative["en"].findings
    # JPEG 2000 lossless gives the very same numbers
    j = series_details(real_results["693_J2KR.dcm"])
    assert j["gnl"] == d["gnl"] and j["tissues"] == d["tissues"]


def test_real_abdomen_ct(real_results: dict[str, PipelineResult]) -> None:
    d = series_details(real_results["explicit_VR-UN.dcm"])
    t = d["tissues"]
    log.info("explicit_VR-UN: GNL %.2f HU, WED %.1f mm, tissues %s", d["gnl"], d["wed_mm"],
             {k: (round(v["mean"], 1), round(v["sd"], 2)) for k, v in t.items()})
    assert 5.0 <= d["gnl"] <= 30.0
    assert 200 <= d["wed_mm"] <= 380
    assert d["region"] == "abdomen_pelvis"
    assert -140 <= t["fat"]["mean"] <= -60 and 5 <= t["fat"]["sd"] <= 40
    assert 25 <= t["muscle"]["mean"] <= 80 and 5 <= t["muscle"]["sd"] <= 40
    assert t["muscle"]["label"] == "Paraspinal muscle"
    assert -1010 <= t["air"]["mean"] <= -900
    assert 3 <= t["muscle"]["cnr"] <= 20


def test_real_enhanced_ct_parametric_map_refused() -> None:
    study = _real("eCT_Supplemental.dcm")
    assert study.series[0].is_multiframe and study.series[0].pixels.shape[0] == 2
    with pytest.raises(Refused, match="parametric map"):
        CTQualityPipeline().run(study)


def test_real_enhanced_ct_frames_measured_when_marked_axial(tmp_path: Path) -> None:
    """The multi-frame path on the real Enhanced CT file, once it is not labelled a perfusion map."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleType = "HU"
    ds.SharedFunctionalGroupsSequence[0].CTImageFrameTypeSequence[0].FrameType = ["ORIGINAL", "PRIMARY", "AXIAL",
                                                                                   "NONE"]
    p = tmp_path / "ect.dcm"
    ds.save_as(p)
    res = CTQualityPipeline().run(load_study([p]))
    d = series_details(res)
    log.info("eCT_Supplemental as axial: GNL %s, WED %.1f mm", d["gnl"], d["wed_mm"])
    assert len(d["slice_positions"]) == 2 and d["slice_positions"][1] - d["slice_positions"][0] == pytest.approx(10)
    assert 100 <= d["wed_mm"] <= 200
    assert all(k.frame in (1, 2) for k in res.key_images)


def test_real_small_crop_is_truncated() -> None:
    res = CTQualityPipeline().run(_real("CT_small.dcm"))
    verdict, note = verdict_of(res)
    assert verdict in ("warn", "fail") and "truncated" in note
