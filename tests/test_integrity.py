"""Torn data sets are refused before success is answered (issue 10, item 1).

The walker (``node.integrity``) is checked on pydicom's and pydicom-data's own files, whole and cut, fed
in fragments of every awkward size; then real peers (pynetdicom sending the file's bytes undecoded, as a
broken modality would) check the node answers 0xC000 with the problem named and keeps nothing.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification
from support.dicomgen import ct_series
from support.node import NodeProcess, wait_for
from support.node import spool_files as support_spool_files

from node.integrity import StructureCheck

WHOLE = ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
         "image_dfl.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm",
         "SC_rgb_jpeg_dcmtk.dcm", "explicit_VR-UN.dcm", "rtplan.dcm", "693_J2KR.dcm", "emri_small_RLE.dcm",
         "SC_ybr_full_422_uncompressed.dcm", "liver.dcm", "eCT_Supplemental.dcm"]


def _split(path: str | Path) -> tuple[str, bytes]:
    with open(path, "rb") as f:
        f.read(132)
        meta = _read_file_meta_info(f)
        return str(meta.TransferSyntaxUID), f.read()


def _verdict(ts: str, body: bytes, step: int) -> str | None:
    check = StructureCheck(ts)
    view = memoryview(body)
    for i in range(0, len(body), step):
        check.feed(view[i:i + step])
    return check.finish()


@pytest.mark.parametrize("name", WHOLE)
def test_whole_data_sets_pass_in_any_fragmentation(name: str) -> None:
    ts, body = _split(get_testdata_file(name))
    for step in (len(body), 1 if len(body) < 100_000 else 2, 3, 8, 13, 1000, 16372):
        assert _verdict(ts, body, step) is None, (name, step)


def test_the_walker_collects_the_hot_path_attributes() -> None:
    path = get_testdata_file("MR_small_bigendian.dcm")
    ds = pydicom.dcmread(path)
    ts, body = _split(path)
    check = StructureCheck(ts)
    check.feed(body)
    assert check.finish() is None
    assert check.attributes["SOPInstanceUID"] == ds.SOPInstanceUID
    assert check.attributes["StudyInstanceUID"] == ds.StudyInstanceUID
    assert check.numbers == {"Rows": ds.Rows, "Columns": ds.Columns, "BitsAllocated": ds.BitsAllocated,
                             "SamplesPerPixel": ds.SamplesPerPixel}
    assert ts == ExplicitVRBigEndian


def _explicit_le(ds: pydicom.Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buf, ds)
    return buf.getvalue()


def test_torn_data_sets_are_named() -> None:
    ds = pydicom.dcmread(ct_series(Path("/tmp") / f"ainode-integrity-{generate_uid()}", 1, size=128)[0])
    body = _explicit_le(ds)
    assert _verdict(ExplicitVRLittleEndian, body, 4096) is None
    # Pixel Data declaring 32768 bytes with 16384 sent
    assert _verdict(ExplicitVRLittleEndian, body[:-16384], 4096) == "data set ends inside element (7FE0,0010)"
    # one byte short
    assert _verdict(ExplicitVRLittleEndian, body[:-1], 1000) == "data set ends inside element (7FE0,0010)"
    # a Pixel Data element whose own length is honest but too short for the image
    short = ds.copy()
    short.PixelData = ds.PixelData[:16384]
    assert _verdict(ExplicitVRLittleEndian, _explicit_le(short), 4096) == \
        "Pixel Data has 16384 bytes, image needs 32768"
    # an element length running past the end
    assert _verdict(ExplicitVRLittleEndian, b"\x08\x00\x16\x00UI\xff\x7f1.2.3", 8) == \
        "data set ends inside element (0008,0016)"
    # implicit VR: a sequence item longer than its sequence
    bad_sq = struct.pack("<HHI", 0x0008, 0x1140, 16) + struct.pack("<HHI", 0xFFFE, 0xE000, 40) + b"\x00" * 8
    assert _verdict(ImplicitVRLittleEndian, bad_sq, 5) == "an item runs past the end of its sequence"
    # an undefined-length sequence never closed
    open_sq = struct.pack("<HHI", 0x0008, 0x1140, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    assert _verdict(ImplicitVRLittleEndian, open_sq, 3) == "data set ends inside an open sequence or item"


def test_torn_encapsulated_pixel_data_is_named() -> None:
    ts, body = _split(get_testdata_file("emri_small_RLE.dcm"))  # 10 frames, empty offset table
    assert body[-8:] == b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    assert _verdict(ts, body[:-8], 999) == "encapsulated Pixel Data has no sequence delimiter"
    ts, body = _split(get_testdata_file("emri_small_jpeg_2k_lossless_too_short.dcm"))
    assert _verdict(ts, body, 16372) == "encapsulated Pixel Data has no sequence delimiter"
    # frames re-encapsulated, with and without offsets, whole and short of a frame
    ds = pydicom.dcmread(get_testdata_file("emri_small_RLE.dcm"))
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=10))

    def encoded(items: list[bytes], bot: bool, drop_bot_item: bool = False) -> bytes:
        data = pydicom.encaps.encapsulate(items, has_bot=bot)
        ds.PixelData = data[8:] if drop_bot_item else data
        ds["PixelData"].is_undefined_length = True
        return _explicit_le(ds)

    assert _verdict(ts, encoded(frames, bot=False), 4096) is None
    assert _verdict(ts, encoded(frames, bot=True), 7) is None
    assert _verdict(ts, encoded(frames[:9], bot=False), 4096) == "9 Pixel Data fragment(s) for 10 frames"
    assert _verdict(ts, encoded(frames[:9], bot=True), 4096) == "Basic Offset Table has 9 offsets for 10 frames"
    missing_bot = _verdict(ts, encoded(frames, bot=False, drop_bot_item=True), 4096)
    assert missing_bot is not None and "Basic Offset Table" in missing_bot


def test_deflated_data_sets_are_walked_inflated() -> None:
    ts, body = _split(get_testdata_file("image_dfl.dcm"))
    assert ts == DeflatedExplicitVRLittleEndian
    assert _verdict(ts, body, 100) is None
    assert _verdict(ts, body[:-20], 100) == "deflated data set is cut short"


# ------------------------------------------------------------------------------------------------ at the node
def _file(path: Path, sop_class: str, sop_uid: str, ts: str, body: bytes) -> Path:
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = sop_class, sop_uid, ts
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + buf.getvalue() + body)
    return path


def _torn_files(tmp: Path) -> list[tuple[Path, str]]:
    """(file as a broken modality would send it, the Error Comment the node must answer with)"""
    ds = pydicom.dcmread(ct_series(tmp / "ct", 1, size=128)[0])
    body = _explicit_le(ds)
    out = [(_file(tmp / "short-pixels.dcm", ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian,
                  body[:-16384]), "data set ends inside element (7FE0,0010)"),
           (_file(tmp / "one-short.dcm", ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, body[:-1]),
            "data set ends inside element (7FE0,0010)")]
    half = ds.copy()
    half.PixelData = ds.PixelData[:16384]
    out.append((_file(tmp / "half-pixels.dcm", ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian,
                      _explicit_le(half)), "Pixel Data has 16384 bytes, image needs 32768"))
    rle = pydicom.dcmread(get_testdata_file("emri_small_RLE.dcm"))
    ts, rle_body = _split(get_testdata_file("emri_small_RLE.dcm"))
    out.append((_file(tmp / "no-delimiter.dcm", rle.SOPClassUID, rle.SOPInstanceUID, ts, rle_body[:-8]),
                "encapsulated Pixel Data has no sequence delimiter"))
    j2k = get_testdata_file("emri_small_jpeg_2k_lossless_too_short.dcm")
    out.append((Path(j2k), "encapsulated Pixel Data has no sequence delimiter"))
    return out


def test_torn_data_sets_get_a_failure_with_the_problem_and_nothing_is_kept(node: NodeProcess, tmp_path: Path) -> None:
    torn = _torn_files(tmp_path)
    (good,) = ct_series(tmp_path / "ok", 1, size=32)
    ae = AE(ae_title="MODALITY1")
    for path, _ in torn:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    ae.add_requested_context(pydicom.dcmread(good).SOPClassUID, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    before = support_spool_files(node.storage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes as they are, undecoded, as a modality sends them
    try:
        statuses = [assoc.send_c_store(path) for path, _ in torn]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    ok = assoc.send_c_store(pydicom.dcmread(good))
    assoc.release()
    for (path, comment), status in zip(torn, statuses, strict=True):
        assert (status.Status, status.ErrorComment) == (0xC000, comment), path.name
    assert ok.Status == 0x0000, "the association carries on after a refused instance"
    new = [p for p in support_spool_files(node.storage) if p not in before]
    assert [p.name for p in new] == [f"{pydicom.dcmread(good).SOPInstanceUID}.dcm"], "nothing torn is kept"
    wait_for(lambda: "data set not whole, nothing stored: encapsulated Pixel Data has no sequence delimiter"
             in node.log_text(), 5)


def test_whole_data_sets_in_every_encoding_are_still_stored(node: NodeProcess, tmp_path: Path) -> None:
    names = ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "JPEG2000.dcm",
             "emri_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm"]
    ae = AE(ae_title="MODALITY1")
    metas = [pydicom.dcmread(get_testdata_file(n), stop_before_pixels=True).file_meta for n in names]
    for meta in metas:
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    assert assoc.is_established
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        statuses = [assoc.send_c_store(get_testdata_file(n)).Status for n in names]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assoc.release()
    assert statuses == [0] * len(names)
    stored = {p.stem for p in support_spool_files(node.storage)}
    assert {str(m.MediaStorageSOPInstanceUID) for m in metas} <= stored
    assert RLELossless in {str(m.TransferSyntaxUID) for m in metas}


def test_a_data_set_of_another_sop_class_than_requested_gets_a900(node: NodeProcess, tmp_path: Path) -> None:
    ds = pydicom.dcmread(ct_series(tmp_path / "ct", 1, size=16)[0])
    mr = "1.2.840.10008.5.1.4.1.1.4"
    path = _file(tmp_path / "mismatch.dcm", mr, ds.SOPInstanceUID, ExplicitVRLittleEndian, _explicit_le(ds))
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(mr, ExplicitVRLittleEndian)
    before = support_spool_files(node.storage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)  # the request says MR, the data set is a CT image
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assoc.release()
    assert (status.Status, status.ErrorComment) == (0xA900, "SOPClassUID differs from request")
    assert support_spool_files(node.storage) == before
