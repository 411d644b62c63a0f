"""The outbox writer: each object validated (real dciodvfy, dsrdump, PixelMed) while the next is made,
and the result written all or nothing."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from node.results import EncodeOptions, ValidatedWriter, ValidationFailed, encode
from node.results.validate import pixelmed_passed, template_shape
from pipelines.base import Code, Finding, ImageRef, ModelIdentity, PipelineResult

EFFUSION = Code("60046008", "SCT", "Pleural effusion")


@pytest.fixture(scope="module")
def objs() -> list[Dataset]:
    """A small chest X-ray result: measurement SR, narrative SR, SC, KOS."""
    cr = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ref = ImageRef(str(cr.SeriesInstanceUID), str(cr.SOPInstanceUID), str(cr.SOPClassUID))
    r = PipelineResult("cxr", "1.0.0", model=ModelIdentity("densenet", "1", verified=True),
                       findings=[Finding(EFFUSION, "Pleural effusion", True, 0.8)], key_images=[ref])
    return encode(r, [cr], EncodeOptions())


def test_streamed_objects_land_together(objs: list[Dataset], tmp_path: Path) -> None:
    out = tmp_path / "outbox"
    with ValidatedWriter(out) as w:
        for ds in objs:
            w.add(ds)
        assert sorted(p.name.startswith(".tmp-") for p in out.iterdir()) == [True] * len(objs)  # staged, hidden
        paths = w.commit()
    assert [p.name for p in paths] == [f"{o.SOPInstanceUID}.dcm" for o in objs]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # nothing else left
    assert pydicom.dcmread(paths[2]).SOPInstanceUID == objs[2].SOPInstanceUID


def test_each_objects_problems_stay_with_it(objs: list[Dataset], tmp_path: Path) -> None:
    """Validators of all objects run at once; every error line still names its own object."""
    sr, narrative, sc, kos = (copy.deepcopy(o) for o in objs)
    del sr.CompletionFlag  # SR Document General, type 1
    del sc.ConversionType  # SC Equipment, type 1
    out = tmp_path / "outbox"
    with pytest.raises(ValidationFailed) as err, ValidatedWriter(out) as w:
        for ds in (sr, narrative, sc, kos):
            w.add(ds)
        w.commit()
    lines = err.value.problems
    assert any(sr.SOPInstanceUID in ln and "Completion" in ln for ln in lines)
    assert any(sc.SOPInstanceUID in ln and "ConversionType" in ln for ln in lines)
    assert not [ln for ln in lines if narrative.SOPInstanceUID in ln or kos.SOPInstanceUID in ln]
    assert not list(out.iterdir())  # all or nothing: not even the staged files stay


def test_failure_while_encoding_leaves_nothing(objs: list[Dataset], tmp_path: Path) -> None:
    out = tmp_path / "outbox"
    with pytest.raises(RuntimeError), ValidatedWriter(out) as w:
        w.add(objs[0])
        raise RuntimeError("the SC could not be composed")
    assert not list(out.iterdir())


def test_shape_of_the_dataset_is_the_shape_of_its_file(objs: list[Dataset], tmp_path: Path) -> None:
    """PixelMed is skipped on the shape of the in-memory dataset: it must equal the written file's."""
    for ds in objs:
        if ds.Modality in ("SR", "KO"):
            path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            assert template_shape(ds) == template_shape(pydicom.dcmread(path))
    with ValidatedWriter(tmp_path / "outbox") as w:
        w.add(objs[0])
        w.commit()
    assert pixelmed_passed(objs[0])  # passed once: the next report of this shape skips the JVM
