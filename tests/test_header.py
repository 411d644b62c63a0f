"""The hot path's header attributes, collected by the structure check (``node.integrity``) as the data set
streams in, must agree with pydicom on every data set the check finds whole."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from node.integrity import WANTED, StructureCheck


def _dataset_bytes(path: Path) -> tuple[bytes, str]:
    fp = BytesIO(path.read_bytes())
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return fp.read(), str(meta.TransferSyntaxUID)


def quick_header(data: bytes, ts: str, step: int = 4096) -> dict[str, str] | None:
    """The attributes, or None when the check finds the data set torn."""
    check = StructureCheck(ts)
    for i in range(0, len(data), step):
        check.feed(data[i:i + step])
    return None if check.finish() else check.attributes


def _expected(ds: Dataset) -> dict[str, str]:
    return {kw: str(ds.get(kw)) for kw in WANTED.values() if ds.get(kw) not in (None, "")}


def _corpus() -> list[Path]:
    folder = Path(get_testdata_file("CT_small.dcm")).parent
    out = []
    for p in sorted(folder.glob("*.dcm")):
        try:
            raw = p.read_bytes()
            if raw[128:132] == b"DICM" and "TransferSyntaxUID" in pydicom.dcmread(p, stop_before_pixels=True).file_meta:
                out.append(p)
        except Exception:
            continue
    return out


def test_agrees_with_pydicom_on_its_test_corpus() -> None:
    answered = 0
    corpus = _corpus()
    assert len(corpus) > 30
    for path in corpus:
        data, ts = _dataset_bytes(path)
        quick = quick_header(data, ts)
        if quick is None:
            continue
        answered += 1
        assert quick == _expected(pydicom.dcmread(path, stop_before_pixels=True)), path.name
    assert answered >= len(corpus) * 0.9, f"only {answered} of {len(corpus)} files found whole"


def _with_sequences() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "99X", "x"
    item = Dataset()
    item.ReferencedSOPInstanceUID = generate_uid()
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, item])
    for seq_elem, items in ((ds["ReferencedImageSequence"], [item]), (item["PurposeOfReferenceCodeSequence"], [inner])):
        seq_elem.is_undefined_length = True  # as many modalities write them
        for i in items:
            i.is_undefined_length_sequence_item = True
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ImagesInAcquisition = 12
    ds.NumberOfFrames = 3
    ds.Rows = 2
    return ds


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_undefined_length_sequences_are_stepped_over(tmp_path: Path, ts: str) -> None:
    ds = _with_sequences()
    path = tmp_path / "seq.dcm"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, enforce_file_format=True)
    data, _ = _dataset_bytes(path)
    assert b"\xfe\xff\xdd\xe0" in data, "the sequences are written with undefined length"
    assert quick_header(data, ts) == _expected(ds)
    assert quick_header(data, ts)["ImagesInAcquisition"] == "12"


def _encode(ds: Dataset, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def test_unknown_vr_sequence_is_stepped_over_as_implicit() -> None:
    """A sequence whose VR the sender did not know arrives as UN, undefined length, implicit VR inside
    (PS3.5 6.2.2), even in an explicit VR data set."""
    ds = _with_sequences()
    items = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + _encode(item, implicit=True)
                     + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) for item in ds.ReferencedImageSequence)
    assert b"\xfe\xff\xdd\xe0" in items, "the nested sequence is undefined length too"
    un = struct.pack("<HH2s2xI", 0x0008, 0x1140, b"UN", 0xFFFFFFFF) + items + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    before, after = Dataset(), Dataset()
    for elem in ds:
        if elem.tag < 0x00081140:
            before.add(elem)
        elif elem.tag > 0x00081140:
            after.add(elem)
    data = _encode(before, implicit=False) + un + _encode(after, implicit=False)
    assert quick_header(data, ExplicitVRLittleEndian) == _expected(ds)


def test_gives_up_rather_than_guess() -> None:
    data, ts = _dataset_bytes(Path(get_testdata_file("CT_small.dcm")))
    assert quick_header(data, ts) is not None
    cut = data.index(struct.pack("<HH", 0x0020, 0x000D))
    assert quick_header(data[:cut - 3], ts) is None  # cut mid-element
    assert quick_header(data, ExplicitVRBigEndian) is None  # little endian read as big: lengths do not fit
    assert quick_header(b"\x08\x00\x16\x00UI\xff\x7f1.2.3" + b"\xde\xad" * 20, ts) is None
