"""What PixelMed passed, remembered per measurement group and on disk, against the real PixelMed validator.

Chest X-ray reports have one measurement group per outlined (present) finding; absent findings are
study-level content of the frame (issue 13), so each new combination of present findings is a new frame
and a repeated one is known as a whole. These tests check that only the groups PixelMed has not passed
(in the same frame) are sent to it, that a broken group is still caught, that a fresh process reuses what
another passed, and that a report with every chest X-ray label is checked by PixelMed in full at least once.

What was sent is seen through ``validate.on_pixelmed``: it is called with the file actually handed to
PixelMed, which the tests read back and count groups in.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from node.results import EncodeOptions, encode, validate
from pipelines.base import Finding, ImageRef, ModelIdentity, PipelineResult, Region
from pipelines.cxr.labels import CONCEPTS

V: ModuleType = importlib.import_module("node.results.validate")  # the package's `validate` is the function
FEW = ["effusion", "cardiomegaly", "nodule", "mass"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cr() -> Dataset:
    return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))


def cxr_sr(cr: Dataset, present: set[str], labels: list[str], verified: bool = True) -> Dataset:
    """A chest X-ray measurement SR as the cxr pipeline makes it: a finding per label, present or absent;
    a present one has its class-activation outline and, for pneumothorax, is critical."""
    ref = ImageRef(str(cr.SeriesInstanceUID), str(cr.SOPInstanceUID), str(cr.SOPClassUID))
    findings = []
    for i, key in enumerate(labels):
        c, on = CONCEPTS[key], key in present
        outline = [Region(ref, "POLYLINE", [(300 + i, 300), (750, 280), (800, 900), (320, 950)],
                          f"{c.en} (class activation)")] if on else []
        findings.append(Finding(c.code, c.en.capitalize(), on, 0.9 if on else 0.1,
                                certainty="present" if on else "absent", critical=on and key == "pneumothorax",
                                site=c.site, regions=outline, key_images=[ref]))
    result = PipelineResult("cxr", "1.0.0", model=ModelIdentity("densenet121-res224-all", "2.1", verified=verified),
                            findings=findings, key_images=[ref])
    return next(o for o in encode(result, [cr], EncodeOptions()) if o.Modality == "SR")


def finding_codes(ds: Dataset) -> list[str]:
    """The finding code of each measurement group (the concept of its Present/Absent evaluation)."""
    split = V._Split.of(ds)
    assert split is not None
    labels = {str(c.code.value) for c in CONCEPTS.values()}
    return [code for g in split.groups for it in g.ContentSequence if (code := V._code(it)[0]) in labels]


class Sent:
    """Group finding codes of every document PixelMed got, read back from the file it was handed."""

    def __init__(self) -> None:
        self.docs: list[list[str]] = []

    def __call__(self, path: Path) -> None:
        self.docs.append(finding_codes(pydicom.dcmread(path)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Sent]]:
    """An empty passed-shape cache in a folder of its own, and the record of what PixelMed was sent."""
    folder = tmp_path_factory.mktemp("pixelmed-passed")
    sent = Sent()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AINODE_PIXELMED_CACHE", str(folder))
        mp.setattr(V, "_passed", V._PassedCache())
        mp.setattr(V, "on_pixelmed", sent)
        yield folder, sent


@pytest.fixture(scope="module")
def two_then_three(cr: Dataset, cache: tuple[Path, Sent]) -> tuple[Dataset, Dataset]:
    """{effusion, cardiomegaly} validated (everything new: both outlined groups sent), then {+ nodule}.

    Only outlined findings are measurement groups (issue 13: OHIF needs a region in each); absent ones are
    study-level content, so the set of present findings is part of the frame and a new set is a new frame.
    """
    _, sent = cache
    first = cxr_sr(cr, {"effusion", "cardiomegaly"}, FEW)
    assert validate(first) == []
    assert len(sent.docs) == 1 and len(sent.docs[0]) == 2
    second = cxr_sr(cr, {"effusion", "cardiomegaly", "nodule"}, FEW)
    assert not V.pixelmed_passed(second)
    assert validate(second) == []
    return first, second


def test_a_known_combination_skips_pixelmed(cr: Dataset, cache: tuple[Path, Sent],
                                           two_then_three: tuple[Dataset, Dataset]) -> None:
    """The same present findings again (other UIDs, other probabilities) are known as a whole; a new
    combination is a new frame and PixelMed gets all of its groups."""
    _, sent = cache
    nodule = CONCEPTS["nodule"].code.value
    assert len(sent.docs) == 2
    assert len(sent.docs[1]) == 3 and nodule in sent.docs[1]
    again = cxr_sr(cr, {"effusion", "cardiomegaly", "nodule"}, FEW)
    assert V.pixelmed_passed(again)
    mass_too = cxr_sr(cr, {"effusion", "cardiomegaly", "nodule", "mass"}, FEW)
    assert not V.pixelmed_passed(mass_too) and validate(mass_too) == []
    assert len(sent.docs) == 3 and CONCEPTS["mass"].code.value in sent.docs[2]
    assert V.pixelmed_passed(cxr_sr(cr, {"effusion", "cardiomegaly", "nodule", "mass"}, FEW))


def test_a_changed_frame_is_validated_again(cr: Dataset, cache: tuple[Path, Sent],
                                            two_then_three: tuple[Dataset, Dataset]) -> None:
    """The same groups under an unverified model: the notes container differs, so nothing is known."""
    _, sent = cache
    unverified = cxr_sr(cr, {"effusion", "cardiomegaly", "nodule"}, FEW, verified=False)
    assert not V.pixelmed_passed(unverified)
    n = len(sent.docs)
    assert validate(unverified) == []
    assert len(sent.docs) == n + 1 and len(sent.docs[-1]) == 3


def test_a_broken_group_of_a_known_kind_is_caught(cache: tuple[Path, Sent],
                                                   two_then_three: tuple[Dataset, Dataset]) -> None:
    """Every group of this document passed before, except one with its Tracking Identifier related by
    CONTAINS instead of HAS OBS CONTEXT: PixelMed gets that group and says so, every time."""
    _, sent = cache
    broken = copy.deepcopy(two_then_three[1])
    group = V._Split.of(broken).groups[0]
    tracking = group.ContentSequence[0]
    assert V._code(tracking) == ("112039", "DCM") and tracking.RelationshipType == "HAS OBS CONTEXT"
    tracking.RelationshipType = "CONTAINS"
    for attempt in (1, 2):  # a failure is never remembered as a pass
        n = len(sent.docs)
        assert not V.pixelmed_passed(broken)
        problems = validate(broken)
        assert len(sent.docs) == n + 1, f"attempt {attempt}: PixelMed was not asked"
        assert any(p.startswith("DicomSRValidator: Error") and "Tracking Identifier" in p
                   and "Incorrect relationship" in p for p in problems), problems


def test_a_fresh_process_reuses_what_another_passed(cr: Dataset, cache: tuple[Path, Sent],
                                                    two_then_three: tuple[Dataset, Dataset], tmp_path: Path) -> None:
    """Another worker (a new process, same cache folder) validates an already-passed shape without PixelMed."""
    folder, _ = cache
    path = tmp_path / "same.dcm"
    cxr_sr(cr, {"effusion", "cardiomegaly", "nodule"}, FEW).save_as(path, enforce_file_format=True)
    script = (
        "import importlib, json, sys\n"
        "V = importlib.import_module('node.results.validate')\n"
        "calls = []\n"
        "V.on_pixelmed = calls.append\n"
        "problems = V.validate(sys.argv[1])\n"
        "print(json.dumps({'problems': problems, 'pixelmed_calls': len(calls)}))\n")
    env = dict(os.environ, AINODE_PIXELMED_CACHE=str(folder), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"problems": [], "pixelmed_calls": 0}


def test_every_cxr_label_passes_pixelmed_in_full(cr: Dataset, tmp_path: Path) -> None:
    """All 18 labels of the table present, outlined, pneumothorax critical: with nothing known, PixelMed
    gets the whole report (no group is a repeat of another) and passes it, so every code is checked."""
    sent = Sent()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AINODE_PIXELMED_CACHE", str(tmp_path / "passed"))
        mp.setattr(V, "_passed", V._PassedCache())
        mp.setattr(V, "on_pixelmed", sent)
        labels = list(CONCEPTS)
        sr = cxr_sr(cr, set(labels), labels)
        assert validate(sr) == []
    codes = sorted(str(c.code.value) for c in CONCEPTS.values())
    assert len(sent.docs) == 1 and sorted(sent.docs[0]) == codes


def test_an_unusable_cache_folder_leaves_memory_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("AINODE_PIXELMED_CACHE", str(not_a_folder / "passed"))
    cache = V._PassedCache()
    with caplog.at_level(logging.WARNING, logger=V.__name__):
        cache.record({"a" * 64})
        assert cache.known("a" * 64) and not cache.known("b" * 64)
        cache.record({"b" * 64})
    assert cache.known("b" * 64)
    assert len([r for r in caplog.records if "cannot be shared on disk" in r.getMessage()]) == 1


def test_passed_keys_are_empty_files_in_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AINODE_PIXELMED_CACHE", str(tmp_path / "passed"))
    writer, reader = V._PassedCache(), V._PassedCache()
    assert not reader.known("c" * 64)
    writer.record({"c" * 64})
    assert reader.known("c" * 64)  # another worker's record, seen without restarting
    assert [(p.name, p.stat().st_size) for p in (tmp_path / "passed").iterdir()] == [("c" * 64, 0)]
